"""Many sessions: admission limit, idle and duration limits, slow readers, operator endpoints, graceful
shutdown, and a soak test of 200 sequential sessions."""

from __future__ import annotations

import asyncio
import gc
import json
import os
import threading

import pytest
from stemme.streaming.server import ServerConfig, StemmeServer
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from tests.conftest import http_get, timeout
from tests.test_server import ServerThread

TEXT_TURN = [
    {"type": "conversation.item.create", "item": {"type": "message", "role": "user",
                                                  "content": [{"type": "input_text", "text": "Say hello."}]}},
    {"type": "response.create", "response": {"output_modalities": ["text"], "max_output_tokens": 4}},
]


async def _recv_until(ws, etype: str, seconds: float = 60) -> dict:
    async with asyncio.timeout(timeout(seconds)):
        while True:
            m = await ws.recv()
            if isinstance(m, str):
                ev = json.loads(m)
                if ev["type"] == etype:
                    return ev


async def _text_turn(ws) -> dict:
    for ev in TEXT_TURN:
        await ws.send(json.dumps(ev))
    return await _recv_until(ws, "response.done")


async def test_sessions_beyond_the_limit_get_busy_while_admitted_ones_work(engines):
    s = ServerThread(engines, max_sessions=2)
    try:
        async with connect(s.url + "/v1/realtime") as a, connect(s.url + "/v1/realtime") as b:
            await _recv_until(a, "session.created")
            await _recv_until(b, "session.created")
            async with connect(s.url + "/v1/realtime") as c:
                ev = json.loads(await c.recv())
                assert ev["type"] == "error" and ev["error"]["code"] == "server_busy"
                with pytest.raises(ConnectionClosed) as e:
                    await c.recv()
                assert e.value.rcvd.code == 1013
            done = await _text_turn(a)
            assert done["response"]["status"] == "completed"
            assert (await _text_turn(b))["response"]["status"] == "completed"
        # a freed place is available again
        async with connect(s.url + "/v1/realtime") as d:
            assert json.loads(await d.recv())["type"] == "session.created"
    finally:
        s.stop()


async def test_idle_session_times_out_and_long_sessions_expire(engines):
    s = ServerThread(engines, idle_timeout_s=1.0, max_session_s=2.5)
    try:
        async with connect(s.url + "/v1/realtime") as ws:
            await _recv_until(ws, "session.created")
            ev = await _recv_until(ws, "error", 10)
            assert ev["error"]["code"] == "idle_timeout"
            with pytest.raises(ConnectionClosed) as e:
                await ws.recv()
            assert e.value.rcvd.code == 1000 and e.value.rcvd.reason == "idle timeout"
        async with connect(s.url + "/v1/realtime") as ws:
            await _recv_until(ws, "session.created")
            with pytest.raises(ConnectionClosed):
                async with asyncio.timeout(timeout(10)):
                    while True:  # active, never idle, but the session has a maximum duration
                        await ws.send(json.dumps({"type": "input_audio_buffer.clear"}))
                        m = json.loads(await ws.recv())
                        if m["type"] == "error":
                            assert m["error"]["code"] == "session_expired"
                        await asyncio.sleep(0.3)
    finally:
        s.stop()


async def test_metrics_and_health_endpoints(engines):
    s = ServerThread(engines)
    try:
        http = s.url.replace("ws://", "http://")
        async with connect(s.url + "/v1/realtime") as ws:
            await _recv_until(ws, "session.created")
            await _text_turn(ws)
            await ws.send("{bad json")
            await _recv_until(ws, "error")
            code, body = await asyncio.to_thread(http_get, http + "/metrics")
            assert code == 200
            assert "stemme_sessions_active 1.0" in body
            assert 'stemme_turns_total{status="completed"}' in body
            assert 'stemme_errors_total{code="invalid_json"} 1.0' in body
            assert 'stemme_stage_seconds_bucket{le="0.5",stage="llm_first_token"}' in body
            assert 'stemme_model_loaded{engine="llm"} 1.0' in body
            assert 'stemme_queue_depth{stage="tts"}' in body
            assert 'stemme_batch_size_count{stage="asr"}' in body and 'stemme_batch_size_count{stage="llm"}' in body
        assert await asyncio.to_thread(http_get, http + "/healthz") == (200, "ok\n")
        assert await asyncio.to_thread(http_get, http + "/readyz") == (200, "ready\n")
    finally:
        s.stop()


class FakeSlowEngines:
    """Fake for the readiness logic only: loading blocks until released."""

    def __init__(self, real) -> None:
        self.config = real.config
        self.release = threading.Event()
        self.loaded: list[str] = []

    def load_all(self) -> None:
        self.release.wait(30)
        self.loaded = ["vad", "asr", "llm", "tts"]


async def test_not_ready_until_models_are_loaded(engines):
    fake = FakeSlowEngines(engines)
    server = StemmeServer(fake, ServerConfig(port=0, warmup=False))  # type: ignore[arg-type]
    await server.start(wait_ready=False)
    try:
        http = f"http://127.0.0.1:{server.port}"
        assert await asyncio.to_thread(http_get, http + "/healthz") == (200, "ok\n")
        assert (await asyncio.to_thread(http_get, http + "/readyz"))[0] == 503
        async with connect(f"ws://127.0.0.1:{server.port}/v1/realtime") as ws:
            assert json.loads(await ws.recv())["error"]["code"] == "server_not_ready"
        fake.release.set()
        await asyncio.wait_for(server._loading, timeout(10))
        assert await asyncio.to_thread(http_get, http + "/readyz") == (200, "ready\n")
    finally:
        fake.release.set()
        await server.stop()


async def test_slow_reader_is_disconnected_without_growing_memory(engines):
    s = ServerThread(engines, max_outbound_bytes=64 * 1024)
    try:
        # a client that never reads: the TCP window fills, the server's queue for it hits the bound
        async with connect(s.url + "/v1/realtime", max_queue=1, max_size=None) as ws:
            await ws.send(json.dumps({"type": "conversation.item.create", "item": {
                "type": "message", "role": "user", "content": [{"type": "input_text",
                                                                "text": "Tell me a long story about the sea."}]}}))
            await ws.send(json.dumps({"type": "response.create"}))
            await asyncio.sleep(timeout(15))
            with pytest.raises(ConnectionClosed) as e:
                async with asyncio.timeout(timeout(30)):
                    while True:
                        await ws.recv()
            assert e.value.rcvd is not None and e.value.rcvd.code == 1008
        async with asyncio.timeout(timeout(10)):
            while s.call(lambda: len(s.server.sessions)):
                await asyncio.sleep(0.05)
    finally:
        s.stop()


async def test_graceful_shutdown_finishes_the_running_turn(engines):
    s = ServerThread(engines, shutdown_grace_s=30)
    async with connect(s.url + "/v1/realtime") as ws:
        await _recv_until(ws, "session.created")
        for ev in TEXT_TURN:
            await ws.send(json.dumps(ev))
        await _recv_until(ws, "response.created")
        stopping = asyncio.create_task(asyncio.to_thread(s.stop))
        done = await _recv_until(ws, "response.done")
        assert done["response"]["status"] == "completed"
        with pytest.raises(ConnectionClosed) as e:
            async with asyncio.timeout(timeout(30)):
                while True:
                    await ws.recv()
        assert e.value.rcvd.code == 1001
        await stopping


def _rss_kb() -> int:
    with open(f"/proc/{os.getpid()}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


async def test_soak_200_sequential_sessions(engines):
    s = ServerThread(engines)
    try:
        async def one() -> None:
            async with connect(s.url + "/v1/realtime") as ws:
                await _recv_until(ws, "session.created")
                await ws.send(json.dumps({"type": "input_audio_buffer.append", "audio": "AAAAAA=="}))
                assert (await _text_turn(ws))["response"]["status"] == "completed"

        for _ in range(20):  # warm: allocator pools, caches
            await one()
        gc.collect()
        tasks_before = s.call(lambda: len(__import__("asyncio").all_tasks()))
        rss_before = _rss_kb()
        for _ in range(200):
            await one()
        await asyncio.sleep(0.5)
        gc.collect()
        rss_after = _rss_kb()
        assert s.call(lambda: len(s.server.sessions)) == 0
        assert s.call(lambda: len(__import__("asyncio").all_tasks())) <= tasks_before
        growth = (rss_after - rss_before) / rss_before
        assert growth < 0.05, f"RSS grew {growth:.1%} ({rss_before} kB -> {rss_after} kB)"
    finally:
        s.stop()
