"""Keys everywhere (issue #12, finding 9): with an API key set, /metrics and /v1/voices need it (or, for
/metrics, the separate metrics key); /healthz and /readyz stay open for load balancers."""

from __future__ import annotations

import urllib.error
import urllib.request

import pytest

from tests.test_server import ServerThread


@pytest.fixture(scope="module")
def keyed(engines):
    s = ServerThread(engines, api_key="s3cret", metrics_key="scrape")
    yield f"http://127.0.0.1:{s.server.port}"
    s.stop()


def _status(url: str, key: str | None = None) -> int:
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {key}"} if key else {})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code


def test_health_checks_stay_open(keyed: str) -> None:
    assert _status(keyed + "/healthz") == 200
    assert _status(keyed + "/readyz") in (200, 503)


def test_metrics_and_voices_need_a_key(keyed: str) -> None:
    for path in ("/metrics", "/v1/voices"):
        assert _status(keyed + path) == 401
        assert _status(keyed + path, "wrong") == 401
        assert _status(keyed + path, "s3cret") == 200
    assert _status(keyed + "/v1/voices?api_key=s3cret") == 200
    assert _status(keyed + "/metrics", "scrape") == 200  # the metrics key opens /metrics only
    assert _status(keyed + "/v1/voices", "scrape") == 401


async def test_browser_origins(engines) -> None:
    """A WebSocket from another web page (or Origin: null) is refused; the server's own origin, localhost, an
    allowed origin and clients without Origin are accepted (issue #12, finding 8)."""
    from websockets.asyncio.client import connect
    from websockets.exceptions import InvalidStatus

    s = ServerThread(engines, allowed_origins=("https://app.example.org",))
    url = f"ws://127.0.0.1:{s.server.port}/v1/realtime"
    try:
        for origin in ("http://evil.example", "null", "file://"):
            with pytest.raises(InvalidStatus) as e:
                async with connect(url, origin=origin):  # type: ignore[arg-type]
                    pass
            assert e.value.response.status_code == 403
        for origin in (None, f"http://127.0.0.1:{s.server.port}", "http://localhost:5173", "https://app.example.org"):
            async with connect(url, origin=origin) as ws:  # type: ignore[arg-type]
                assert "session.created" in await ws.recv()
    finally:
        s.stop()
