"""The remote language model (models/llm_openai.py): against a real ``transformers serve`` that these tests start
(offline, on 127.0.0.1, serving the embedded model's Hugging Face directory) for streaming, cancel, history,
tool definitions and the voice pipeline; against a closed port for the unreachable case and ``/readyz``.

What the embedded 0.5B model behind ``transformers serve`` cannot show (it writes a call as bare JSON, without
the ``<tool_call>`` tags the server parses, so the server never sends ``tool_calls``; retries; HTTP errors)
is tested against a FAKE endpoint, ``FakeEndpoint``, that replays hand-written streams in the shapes of
transformers serve and vLLM."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx2
import pytest
from stemme.models.llm_openai import LlmError, LlmUnavailableError, RemoteChat
from stemme.voice.llm import Conversation, GenerationOptions, ToolCall
from stemme.voice.pipeline import Stages, TextPiece, TurnMarks, respond
from websockets.asyncio.client import connect

from stemme.config import EngineConfig
from stemme.engines import Engines
from tests.conftest import http_get, timeout
from tests.test_server import ServerThread

WEATHER = [{"type": "function", "function": {
    "name": "get_weather", "description": "Get the current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "description": "the city"}},
                   "required": ["city"]}}}]


def _free_port() -> int:
    """A port nothing listens on (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _connections_to(port: int) -> set[int]:
    """The local ports of the open (ESTABLISHED) client connections to ``port`` on this machine, from
    /proc/net/tcp: a test follows its own connection by its port, whatever other clients' pooled connections do
    meanwhile (the server closes idle ones after a few seconds)."""
    ports = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as f:
            for line in f.readlines()[1:]:
                cols = line.split()
                if cols[3] == "01" and int(cols[2].rsplit(":", 1)[1], 16) == port:
                    ports.add(int(cols[1].rsplit(":", 1)[1], 16))
    return ports


@pytest.fixture(scope="module")
def tserve(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real ``transformers serve`` of the embedded model's HF checkpoint; yields its API base URL."""
    from stemme.models import export

    hf = export.llm_hf_dir(EngineConfig.from_env().llm_pack, None)
    port = _free_port()
    log = tmp_path_factory.mktemp("tserve") / "serve.log"
    exe = Path(sys.executable).with_name("transformers")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1"}
    with open(log, "wb") as out:
        proc = subprocess.Popen([str(exe), "serve", str(hf), "--host", "127.0.0.1", "--port", str(port),
                                 "--device", "cpu"], env=env, stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/v1"
    try:
        deadline = time.monotonic() + timeout(180)
        while True:
            assert proc.poll() is None, f"transformers serve exited: {log.read_text()[-2000:]}"
            assert time.monotonic() < deadline, f"transformers serve did not start: {log.read_text()[-2000:]}"
            try:
                if httpx2.get(url + "/models", timeout=1).status_code == 200:
                    break
            except httpx2.TransportError:
                pass
            time.sleep(0.5)
        list(RemoteChat(url, read_timeout=timeout(120)).stream(_ask("Hi"), GenerationOptions(max_new_tokens=1)))
        yield url  # warmed up: its first request is several times slower than the next ones
    finally:
        proc.terminate()
        try:
            proc.wait(timeout(15))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="module")
def remote(tserve: str) -> RemoteChat:
    # transformers serve may still finish a cancelled test's stream before it starts the next one: on a loaded
    # CPU that takes longer than the 30 s default
    return RemoteChat(tserve, read_timeout=timeout(120))


def _ask(question: str, *history: str) -> list[dict[str, Any]]:
    conv = Conversation(instructions="You are a helpful assistant. Answer in one short sentence.")
    for i, text in enumerate((*history, question)):
        conv.add("user" if i % 2 == 0 else "assistant", text)
    return conv.messages("en")


# -- against a real transformers serve ---------------------------------------------------------------------

def test_streams_pieces_as_they_are_generated(remote: RemoteChat) -> None:
    t0 = time.perf_counter()
    arrivals: list[tuple[float, str | ToolCall]] = []
    msgs = Conversation().messages("en")[:1] + [{"role": "user", "content": "What is the capital of France?"}]
    for piece in remote.stream(msgs, GenerationOptions(max_new_tokens=10)):
        arrivals.append((time.perf_counter() - t0, piece))
    end = time.perf_counter() - t0
    text = "".join(p for _, p in arrivals if isinstance(p, str))
    assert "Paris" in text, text
    assert len(arrivals) >= 4, arrivals  # one piece per token, not one block
    assert arrivals[0][0] < end - 0.05 and arrivals[-1][0] - arrivals[0][0] > 0.05, arrivals  # spread in time
    assert remote.model is not None and remote.model.endswith("hf")  # learnt from /models (none configured)


def test_cancel_closes_the_stream_at_once(tserve: str) -> None:
    port = int(tserve.rsplit(":", 1)[1].split("/")[0])
    engine = RemoteChat(tserve, read_timeout=timeout(120))  # its own connection pool
    cancel = threading.Event()
    pieces: list[str | ToolCall] = []
    ended = threading.Event()

    def consume() -> None:
        for p in engine.stream(_ask("Write a long story about a dragon and a knight."),
                               GenerationOptions(max_new_tokens=80), cancel):
            pieces.append(p)
        ended.set()

    before = _connections_to(port)  # other clients' pooled connections, which may close at any time
    threading.Thread(target=consume, daemon=True).start()
    deadline = time.monotonic() + timeout(120)
    while len(pieces) < 2:
        assert time.monotonic() < deadline and not ended.is_set()
        time.sleep(0.01)
    mine = _connections_to(port) - before
    assert len(mine) == 1, mine  # the stream's own connection
    t = time.perf_counter()
    cancel.set()
    assert ended.wait(timeout(1.0)), "the stream did not stop within 1 s of the cancel"
    stopped = time.perf_counter() - t
    assert len(pieces) < 20, len(pieces)
    assert not mine & _connections_to(port)  # the HTTP stream is closed, not left to run
    print(f"stopped {stopped * 1000:.0f} ms after the cancel")

    before = _connections_to(port)
    gen = engine.stream(_ask("Count from one to one hundred."), GenerationOptions(max_new_tokens=80))
    assert isinstance(next(gen), str)
    mine = _connections_to(port) - before
    assert len(mine) == 1, mine
    gen.close()  # the consumer leaves: the connection goes with it
    assert not mine & _connections_to(port)


def test_history_is_passed(remote: RemoteChat) -> None:
    """The name is only in the earlier turn."""
    msgs = _ask("What is my name?", "My name is Marguerite.", "Nice to meet you, Marguerite!")
    text = "".join(p for p in remote.stream(msgs, GenerationOptions(max_new_tokens=12)) if isinstance(p, str))
    assert "Marguerite" in text, text


def test_tool_definitions_reach_the_model(remote: RemoteChat) -> None:
    """The tool list is passed through: the model answers with a call of get_weather for Paris. The 0.5B model
    writes it as bare JSON, without the <tool_call> tags that transformers serve parses, so it arrives as text
    here; turning delta.tool_calls into ToolCall objects is tested with the fake endpoint below."""
    msgs = [{"role": "system", "content": "You are a helpful assistant."},
            {"role": "user", "content": "What's the weather in Paris?"}]
    out = list(remote.stream(msgs, GenerationOptions(max_new_tokens=18, tools=WEATHER, tool_choice="auto")))
    text = "".join(p for p in out if isinstance(p, str)) + "".join(p.name + p.arguments for p in out
                                                                   if isinstance(p, ToolCall))
    assert "get_weather" in text and "Paris" in text, out


async def test_the_voice_pipeline_streams_a_remote_answer(tserve: str) -> None:
    """Through the LLM scheduler (the remote stream runs on its own thread), as a session's turn does."""
    engines = Engines(EngineConfig.from_env(llm_url=tserve, llm_read_timeout_s=timeout(120)))
    stages = Stages()
    try:
        pieces = [p.text async for p in respond(engines, stages, _ask("What is the capital of Italy?"), voice=None,
                                                max_tokens=8, cancel=threading.Event(), marks=TurnMarks())
                  if isinstance(p, TextPiece)]
        assert "Rome" in "".join(pieces) and len(pieces) >= 3, pieces
        assert stages.llm.depth == 0 and engines.loaded == ["llm"]  # no local model was loaded
    finally:
        stages.shutdown()


# -- an unreachable endpoint -------------------------------------------------------------------------------

def test_unreachable_url_fails_fast_with_a_clear_error(caplog: pytest.LogCaptureFixture) -> None:
    url = f"http://127.0.0.1:{_free_port()}/v1"
    engine = RemoteChat(url, model="any", api_key="sk-do-not-leak", connect_timeout=2.0)
    t = time.perf_counter()
    with pytest.raises(LlmUnavailableError) as e:
        list(engine.stream(_ask("Hello?")))
    assert time.perf_counter() - t < 2.0  # refused at once: two quick retries, well within the connect timeout
    assert e.value.code == "llm_unavailable"
    assert url in str(e.value) and "refused" in str(e.value).lower()
    assert "sk-do-not-leak" not in str(e.value) and "sk-do-not-leak" not in caplog.text
    assert engine.probe() is not None and url in (engine.probe() or "")


@pytest.fixture(scope="module")
def down_server() -> Iterator[ServerThread]:
    """A Stemme server whose language model URL points at a closed port."""
    s = ServerThread(Engines(EngineConfig.from_env(llm_url=f"http://127.0.0.1:{_free_port()}/v1")))
    yield s
    s.stop()


def _get(url: str) -> tuple[int, str]:
    return http_get(url, 5)


async def test_readyz_reports_an_unreachable_endpoint(down_server: ServerThread) -> None:
    base = down_server.url.replace("ws://", "http://")
    status, body = await asyncio.to_thread(_get, base + "/readyz")
    assert status == 503 and "language model unreachable" in body and "refused" in body.lower(), body
    assert await asyncio.to_thread(_get, base + "/healthz") == (200, "ok\n")


async def test_a_failed_answer_is_reported_and_the_session_goes_on(down_server: ServerThread) -> None:
    async with connect(down_server.url + "/v1/realtime") as ws:
        assert json.loads(await ws.recv())["type"] == "session.created"
        await ws.send(json.dumps({"type": "session.update", "session": {"output_modalities": ["text"]}}))
        await ws.send(json.dumps({"type": "conversation.item.create", "item": {
            "type": "message", "role": "user", "content": [{"type": "input_text", "text": "Hello?"}]}}))
        await ws.send(json.dumps({"type": "response.create"}))
        seen = []
        async with asyncio.timeout(timeout(20)):
            while (ev := json.loads(await ws.recv()))["type"] != "response.done":
                seen.append(ev)
        assert not [e for e in seen if e["type"] == "response.output_text.delta"], seen
        assert ev["response"]["status"] == "failed"
        assert ev["response"]["status_details"]["error"]["code"] == "llm_unavailable"
        await ws.send(json.dumps({"type": "session.update", "session": {"instructions": "Be brief."}}))
        async with asyncio.timeout(timeout(10)):
            while (ev := json.loads(await ws.recv()))["type"] != "session.updated":
                pass


# -- a FAKE endpoint, for what the real one here cannot show -----------------------------------------------

@dataclass
class Reply:
    status: int = 200
    events: list[str] = field(default_factory=list)
    """``data:`` payloads, sent one by one."""
    stall_s: float = 0.0
    """Then wait this long before ending the stream."""
    drop: bool = False
    """Then cut the connection without ending the stream."""
    body: str = ""


class FakeEndpoint:
    """A FAKE OpenAI-compatible server: each POST gets the next scripted Reply; GET /models lists one model."""

    def __init__(self, replies: list[Reply]) -> None:
        self.replies = list(replies)
        self.requests: list[dict[str, Any]] = []
        self.headers: list[dict[str, str]] = []
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                self._send(200, "application/json", json.dumps({"data": [{"id": "fake-model"}]}).encode())

            def do_POST(self) -> None:
                fake.requests.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
                fake.headers.append(dict(self.headers))
                r = fake.replies.pop(0)
                if r.status != 200:
                    self._send(r.status, "application/json", r.body.encode())
                    return
                self.send_response(200)
                self.send_header("Content-Type", "text/event-stream")
                self.end_headers()
                for data in r.events:
                    self.wfile.write(f"data: {data}\n\n".encode())
                    self.wfile.flush()
                time.sleep(r.stall_s)
                if r.drop:
                    self.connection.shutdown(socket.SHUT_RDWR)

            def _send(self, status: int, ctype: str, body: bytes) -> None:
                self.send_response(status)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def _chunk(delta: dict[str, Any], finish: str | None = None) -> str:
    choice: dict[str, Any] = {"delta": delta, "index": 0}
    if finish:
        choice["finish_reason"] = finish
    return json.dumps({"id": "x", "object": "chat.completion.chunk", "model": "fake-model", "choices": [choice]})


# transformers serve: a whole call in one delta (the shape of its _streaming() with ChoiceDeltaToolCall)
WHOLE_CALL = [_chunk({"role": "assistant"}), _chunk({"tool_calls": [{
    "index": 0, "type": "function", "id": "req_tool_call_0",
    "function": {"name": "get_weather", "arguments": "{\"city\": \"Paris\"}"}}]}), _chunk({}, "tool_calls")]
# vLLM / OpenAI: the name first, then the arguments in pieces; two calls; then [DONE]
FRAGMENTS = [_chunk({"role": "assistant", "content": ""}),
             _chunk({"tool_calls": [{"index": 0, "id": "chatcmpl-tool-1", "type": "function",
                                     "function": {"name": "get_weather", "arguments": ""}}]}),
             _chunk({"tool_calls": [{"index": 0, "function": {"arguments": "{\"city\": "}}]}),
             _chunk({"tool_calls": [{"index": 0, "function": {"arguments": "\"Paris\"}"}}]}),
             _chunk({"tool_calls": [{"index": 1, "id": "chatcmpl-tool-2", "type": "function",
                                     "function": {"name": "get_weather", "arguments": "{\"city\": \"Oslo\"}"}}]}),
             _chunk({}, "tool_calls"), "[DONE]"]


def test_tool_call_sse_parsing_on_written_streams_fake_endpoint() -> None:
    fake = FakeEndpoint([Reply(events=WHOLE_CALL), Reply(events=FRAGMENTS)])
    try:
        engine = RemoteChat(fake.url, api_key="k3y")
        history = [{"role": "user", "content": "Weather?"},
                   {"role": "assistant", "content": None, "tool_calls": [{"id": "c0", "type": "function",
                    "function": {"name": "get_weather", "arguments": "{\"city\": \"Rome\"}"}}]},
                   {"role": "tool", "tool_call_id": "c0", "content": "sunny"},
                   {"role": "user", "content": "What's the weather in Paris?"}]
        opts = GenerationOptions(max_new_tokens=30, temperature=0.3, tools=WEATHER, tool_choice="required")
        whole = list(engine.stream(history, opts))
        assert [(c.name, json.loads(c.arguments), c.id) for c in whole if isinstance(c, ToolCall)] == [
            ("get_weather", {"city": "Paris"}, "req_tool_call_0")] and len(whole) == 1
        parts = list(engine.stream(history, opts))
        assert [(c.name, json.loads(c.arguments), c.id) for c in parts if isinstance(c, ToolCall)] == [
            ("get_weather", {"city": "Paris"}, "chatcmpl-tool-1"), ("get_weather", {"city": "Oslo"}, "chatcmpl-tool-2")]
        body = fake.requests[0]
        assert body["messages"] == history and body["tools"] == WEATHER and body["tool_choice"] == "required"
        assert (body["model"], body["stream"], body["max_tokens"], body["temperature"]) == ("fake-model", True, 30, 0.3)
        assert fake.headers[0]["Authorization"] == "Bearer k3y"
    finally:
        fake.close()


def test_retries_only_before_the_first_token_fake_endpoint() -> None:
    text = [_chunk({"content": "Hello"}), _chunk({"content": " there."}, "stop"), "[DONE]"]
    fake = FakeEndpoint([Reply(status=503, body="{}"), Reply(events=text),
                         Reply(events=[_chunk({"content": "Hel"})], drop=True), Reply(events=text)])
    try:
        engine = RemoteChat(fake.url, model="m")
        assert "".join(p for p in engine.stream(_ask("Hi")) if isinstance(p, str)) == "Hello there."
        assert len(fake.requests) == 2  # the 503 was retried
        got: list[str | ToolCall] = []
        with pytest.raises(LlmUnavailableError):
            for p in engine.stream(_ask("Hi")):
                got.append(p)
        assert got == ["Hel"] and len(fake.requests) == 3  # cut after a token: an error, no second answer
    finally:
        fake.close()


def test_http_errors_become_clear_errors_without_the_key_fake_endpoint() -> None:
    fake = FakeEndpoint([Reply(status=401, body='{"error": {"message": "bad key sk-secret"}}'),
                         Reply(status=400, body='{"error": {"message": "model m unknown (key sk-secret)"}}'),
                         Reply(events=[_chunk({"content": "Hi"}), '{"error": "out of memory"}'])])
    try:
        engine = RemoteChat(fake.url, model="m", api_key="sk-secret")
        for expected in ("refused the API key (HTTP 401)", "rejected the request (HTTP 400): model m unknown",
                         "failed mid-answer: out of memory"):
            with pytest.raises(LlmError) as e:
                list(engine.stream(_ask("Hi")))
            assert e.value.code == "llm_error" and expected in str(e.value), str(e.value)
            assert "sk-secret" not in str(e.value)
        assert len(fake.requests) == 3  # none of these is retried
    finally:
        fake.close()


def test_a_stalled_remote_stream_stalls_nothing_else_fake_endpoint() -> None:
    """A remote stream blocked on the network runs on its own thread: a local engine's stream (a FAKE one here)
    submitted after it finishes at once, and cancelling the blocked one closes it at once."""

    class FakeLocalEngine:
        def stream(self, messages: Any, options: Any = None, cancel: Any = None) -> Iterator[str]:
            yield from ("local ", "answer")

    fake = FakeEndpoint([Reply(events=[_chunk({"role": "assistant"})], stall_s=30)])
    stages = Stages()
    try:
        remote_out: list[Any] = []
        local_out: list[Any] = []
        cancel = threading.Event()
        stages.llm.submit(RemoteChat(fake.url, model="m"), _ask("Hi"), GenerationOptions(), cancel,
                          remote_out.append)
        time.sleep(0.2)  # the remote read is now blocked
        stages.llm.submit(FakeLocalEngine(), _ask("Hi"), GenerationOptions(), threading.Event(), local_out.append)
        deadline = time.monotonic() + timeout(5)
        while None not in local_out:
            assert time.monotonic() < deadline, "the local stream waited behind the remote one"
            time.sleep(0.01)
        assert local_out == ["local ", "answer", None] and remote_out == []
        t = time.perf_counter()
        cancel.set()
        while None not in remote_out:
            assert time.perf_counter() - t < timeout(1), "the blocked remote stream did not stop on cancel"
            time.sleep(0.01)
        assert remote_out == [None] and stages.llm.depth == 0
    finally:
        stages.shutdown()
        fake.close()
