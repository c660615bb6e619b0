"""The server's HTTP edge on Starlette + uvicorn: HTTP/1.0 health checks as load balancers send them, a WebSocket
to an unknown path, TLS (https and wss on one port), and a client that stops reading, at the socket level."""

from __future__ import annotations

import asyncio
import json
import socket
import ssl
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest
from websockets.asyncio.client import connect
from websockets.client import ClientProtocol
from websockets.exceptions import InvalidStatus
from websockets.frames import Frame
from websockets.uri import parse_uri

from tests.conftest import timeout
from tests.test_server import ServerThread


@pytest.fixture(scope="module")
def server(engines):
    s = ServerThread(engines)
    yield s
    s.stop()


def _raw_http(port: int, request: bytes) -> bytes:
    """Send ``request`` as is on a fresh TCP connection; everything the server answers until it closes."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout(10)) as sock:
        sock.sendall(request)
        out = b""
        while chunk := sock.recv(65536):
            out += chunk
    return out


@pytest.mark.parametrize("path,body", [("/healthz", b"ok\n"), ("/readyz", b"ready\n")])
def test_http10_health_checks(server, path: str, body: bytes) -> None:
    """HAProxy's default ``option httpchk`` speaks HTTP/1.0 without a Host header."""
    answer = _raw_http(server.server.port, f"GET {path} HTTP/1.0\r\n\r\n".encode())
    head, _, got = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 "), head
    assert got == body
    assert b"connection: close" in head.lower()
    head = _raw_http(server.server.port, f"HEAD {path} HTTP/1.0\r\n\r\n".encode())
    assert head.startswith(b"HTTP/1.1 200 ") and head.endswith(b"\r\n\r\n"), head


async def test_websocket_to_an_unknown_path_is_refused(server) -> None:
    with pytest.raises(InvalidStatus) as e:
        async with connect(server.url + "/v1/nothing-here"):
            pass
    assert e.value.response.status_code == 404
    assert b"/v1/realtime" in e.value.response.body


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    d = tmp_path_factory.mktemp("tls")
    cert, key = d / "cert.pem", d / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=localhost",
                    "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True, timeout=timeout(60))
    return cert, key


async def test_tls_serves_https_and_wss_on_one_port(engines, certificate: tuple[Path, Path]) -> None:
    cert, key = certificate
    s = ServerThread(engines, ssl_certfile=str(cert), ssl_keyfile=str(key))
    try:
        port = s.server.port
        ctx = ssl.create_default_context(cafile=str(cert))
        with urllib.request.urlopen(f"https://localhost:{port}/healthz", context=ctx, timeout=timeout(10)) as r:
            assert r.status == 200 and r.read() == b"ok\n"
        async with connect(f"wss://localhost:{port}/v1/realtime", ssl=ctx) as ws:
            assert json.loads(await ws.recv())["type"] == "session.created"
            await ws.send(json.dumps({"type": "input_audio_buffer.clear"}))
            assert json.loads(await ws.recv())["type"] == "input_audio_buffer.cleared"
        # plain HTTP on the TLS port gets no answer from the application
        assert b"ok" not in _raw_http(port, b"GET /healthz HTTP/1.0\r\n\r\n")
    finally:
        s.stop()


class RawClient:
    """A WebSocket client on a bare socket (websockets' sans-I/O protocol), whose reading the test controls: it
    can stop reading altogether, with a small receive buffer so that the server's side fills up soon."""

    def __init__(self, port: int) -> None:
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        self.sock.settimeout(timeout(10))
        self.sock.connect(("127.0.0.1", port))
        self.proto = ClientProtocol(parse_uri(f"ws://127.0.0.1:{port}/v1/realtime"), max_size=None)
        self.proto.send_request(self.proto.connect())
        self._flush()
        while not self.proto.events_received():  # the handshake's response
            self.proto.receive_data(self.sock.recv(65536))
        assert self.proto.handshake_exc is None, self.proto.handshake_exc

    def _flush(self) -> None:
        self.sock.sendall(b"".join(self.proto.data_to_send()))

    def send(self, event: dict) -> None:
        self.proto.send_text(json.dumps(event).encode())
        self._flush()

    def read_to_the_end(self) -> tuple[list[Frame], BaseException | None]:
        """Read until the connection ends: the frames received and how it ended (None: a clean EOF)."""
        frames: list[Frame] = []
        try:
            while data := self.sock.recv(65536):
                self.proto.receive_data(data)
                frames += [e for e in self.proto.events_received() if isinstance(e, Frame)]
        except OSError as e:
            return frames, e
        return frames, None


async def _wait(predicate, seconds: float) -> float:
    t = time.monotonic()
    async with asyncio.timeout(timeout(seconds)):
        while not predicate():
            await asyncio.sleep(0.05)
    return time.monotonic() - t


async def test_a_client_that_stops_reading_is_cut_off(engines) -> None:
    """Issue #12, finding 6: a client that stops reading has its session cancelled (no more generation, nothing
    queued grows) and, as it does not answer the close frame either, its connection aborted."""
    s = ServerThread(engines, max_outbound_bytes=256 * 1024, slow_reader_abort_s=1.0)
    try:
        c = RawClient(s.server.port)
        c.send({"type": "conversation.item.create", "item": {"type": "message", "role": "user", "id": "big",
                                                             "content": [{"type": "input_text", "text": "x" * 15000}]}})
        c.send({"type": "conversation.item.create", "item": {"type": "message", "role": "user", "content": [
            {"type": "input_text", "text": "Tell me a long story about the sea."}]}})
        c.send({"type": "response.create"})
        await _wait(lambda: s.call(lambda: s.server.stages.llm.depth) > 0, 60)  # the answer is being generated
        try:
            for _ in range(400):  # about 6 MB of answers to read, more than any socket buffer holds
                c.send({"type": "conversation.item.retrieve", "item_id": "big"})
        except OSError:  # the server stopped listening to this client (cut off) before the 400th
            pass
        cut = await _wait(lambda: not s.call(lambda: len(s.server.sessions)), 30)
        await _wait(lambda: s.call(lambda: s.server.stages.llm.depth) == 0, 10)  # generation stops at its next step
        assert s.call(lambda: sum(x.queued for x in s.server.connections)) == 0
        assert 'stemme_sessions_rejected_total{reason="client_too_slow"} 1.0' in s.call(s.server._metrics).decode()
        frames, end = await asyncio.to_thread(c.read_to_the_end)
        # aborted: no closing handshake. (Whether the close frame itself reached the client's buffers before the
        # reset depends on how much the kernel's socket buffers took: on a quiet machine they grow to hold it.)
        assert isinstance(end, ConnectionResetError), (end, frames[-1:])
        assert cut < timeout(30)
    finally:
        s.stop()
