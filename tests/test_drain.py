"""Drain (SIGTERM, or ``await server.drain()``), as docs/protocol.md states it: /readyz 503 while the port keeps
listening, sessions told (``stemme.draining``), new sessions refused with 1013 and new turns with
``server_shutting_down``, responses in progress finished (or cancelled at the grace deadline), then 1001; the
``stemme serve`` process exits 0."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import signal
import socket
import sys
import time
from typing import Any

import numpy as np
import pytest
from stemme.clients.talk import Backoff, ReconnectingClient, live
from stemme.voice.audio import float_to_pcm16, read_wav, resample
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from tests.conftest import SPEECH, http_get, timeout
from tests.test_server import ServerThread

STORY: list[dict[str, Any]] = [
    {"type": "conversation.item.create", "item": {"type": "message", "role": "user", "content": [
        {"type": "input_text", "text": "Tell me a long story about a dragon and a knight."}]}},
    {"type": "response.create"}]


def _drain(s: ServerThread) -> asyncio.Future:
    """Start ``s``'s drain on its own loop; the future ends when the drain has."""
    return asyncio.wrap_future(asyncio.run_coroutine_threadsafe(s.server.drain(), s.loop))


async def _next(ws: ClientConnection, etype: str, seen: list[str] | None = None, seconds: float = 120) -> dict:
    """The next event of type ``etype`` (binary frames skipped); every type on the way into ``seen``."""
    async with asyncio.timeout(timeout(seconds)):
        while True:
            m = await ws.recv()
            if isinstance(m, str):
                ev = json.loads(m)
                if seen is not None:
                    seen.append(ev["type"])
                if ev["type"] == etype:
                    return ev


async def _closed(ws: ClientConnection, seen: list[str] | None = None, seconds: float = 120) -> Any:
    """Read to the close; its close frame."""
    with pytest.raises(ConnectionClosed) as e:
        async with asyncio.timeout(timeout(seconds)):
            while True:
                m = await ws.recv()
                if isinstance(m, str) and seen is not None:
                    seen.append(json.loads(m)["type"])
    return e.value.rcvd


async def _speak(ws: ClientConnection, path: str, *, whole: bool = False) -> None:
    """A recorded utterance and 1 s of silence as input_audio_buffer.append events (faster than real time), or
    as one event (``whole``: its speech starts and stops within one message)."""
    pcm = float_to_pcm16(resample(read_wav(SPEECH / path).samples, 16000, 24000))
    pcm += float_to_pcm16(np.zeros(24000, np.float32))
    step = len(pcm) if whole else 9600
    for i in range(0, len(pcm), step):
        await ws.send(json.dumps({"type": "input_audio_buffer.append", "audio": base64.b64encode(pcm[i:i + step])
                                  .decode()}))


async def test_drain_in_process(engines) -> None:
    s = ServerThread(engines, shutdown_grace_s=timeout(120))
    http = s.url.replace("ws://", "http://")
    try:
        async with connect(s.url + "/v1/realtime") as a, connect(s.url + "/v1/realtime") as b, \
                connect(s.url + "/v1/realtime") as d:
            for ws in (a, b, d):
                await _next(ws, "session.created")
            for ev in STORY:
                await a.send(json.dumps(ev))
            a_seen: list[str] = []
            await _next(a, "response.output_audio.delta", a_seen)  # A's answer is being spoken
            drain = _drain(s)
            for ws in (a, b, d):
                ev = await _next(ws, "stemme.draining", a_seen if ws is a else None, 10)
                assert ev["grace_ms"] == int(timeout(120) * 1000) and ev["event_id"]
            assert await asyncio.to_thread(http_get, http + "/readyz") == (503, '{"status": "draining"}')
            assert await asyncio.to_thread(http_get, http + "/healthz") == (200, "ok\n")
            metrics = (await asyncio.to_thread(http_get, http + "/metrics"))[1]
            assert "stemme_draining 1.0" in metrics and "stemme_ready 0.0" in metrics
            async with connect(s.url + "/v1/realtime") as c:  # the port listens: a new session is refused
                err = json.loads(await c.recv())
                assert err["type"] == "error" and err["error"]["type"] == "server_error"
                assert err["error"]["code"] == "server_shutting_down"
                assert (await _closed(c)).code == 1013
            # B's new turns are refused: a response.create, then speech (the VAD would make it a turn)
            await b.send(json.dumps({**STORY[1], "event_id": "evt_b1"}))
            err = await _next(b, "error", seconds=10)
            assert err["error"]["code"] == "server_shutting_down" and err["error"]["event_id"] == "evt_b1"
            await _speak(b, "en/asterisk_conf-onlyperson.wav")
            b_seen: list[str] = []
            err = await _next(b, "error", b_seen, 30)
            assert err["error"]["code"] == "server_shutting_down"
            assert b_seen[-2:] == ["input_audio_buffer.speech_started", "error"], b_seen
            # D's utterance starts and ends within one message: refused too, and never committed nor answered
            await _speak(d, "en/asterisk_conf-onlyperson.wav", whole=True)
            d_seen: list[str] = []
            err = await _next(d, "error", d_seen, 60)
            assert err["error"]["code"] == "server_shutting_down"
            metrics = (await asyncio.to_thread(http_get, http + "/metrics"))[1]
            assert 'stemme_turns_total{status="refused_draining"} 3.0' in metrics
            # A's answer, in progress when the drain began, finishes; then both sessions are closed with 1001
            done = await _next(a, "response.done", a_seen)
            assert done["response"]["status"] == "completed"
            close = await _closed(a, a_seen)
            assert (close.code, close.reason) == (1001, "server shutting down")
            assert (await _closed(b, b_seen)).code == 1001
            assert "response.created" not in b_seen
            assert (await _closed(d, d_seen)).code == 1001
            assert not {"input_audio_buffer.committed", "response.created"} & set(d_seen), d_seen
        await asyncio.wait_for(drain, timeout(30))
        assert s.call(lambda: len(s.server.sessions)) == 0
    finally:
        s.stop()


async def test_a_device_moves_to_another_replica_with_its_conversation(engines) -> None:
    """A drained replica's device opens its next session on another replica (here: the balancer's choice, set
    by hand) and first tells it the conversation so far: the new server holds the earlier turn as items."""
    a, b = ServerThread(engines, shutdown_grace_s=timeout(60)), ServerThread(engines)
    try:
        async with ReconnectingClient(a.url, backoff=Backoff(first=0.05)) as rc:
            first = await rc.talk(read_wav(SPEECH / "en/asterisk_tt-weasels.wav").samples, timeout=timeout(120))
            assert first.status == "completed" and "weasel" in first.transcript.lower(), first
            rc.url = b.url
            await asyncio.wait_for(_drain(a), timeout(60))
            second = await rc.talk(read_wav(SPEECH / "en/asterisk_conf-onlyperson.wav").samples,
                                   timeout=timeout(120))
            assert second.status == "completed" and second.reconnects == 1, second
            items = b.call(lambda: [it for sess in b.server.sessions for it in sess.core.items])
        texts = [(it.get("role"), c.get("text") or c.get("transcript") or "") for it in items
                 for c in it.get("content") or []]
        assert texts[:2] == [("user", first.transcript.strip()), ("assistant", first.reply.strip())], texts
        assert "conference" in texts[2][1].lower() and rc.replayed == 2, texts
    finally:
        a.stop()
        b.stop()


class FakeSpeaker:
    """Collects what a live conversation plays (a test double for the sound card)."""

    def __init__(self) -> None:
        self.pcm = bytearray()
        self.clears = 0

    def write(self, pcm16: bytes) -> None:
        self.pcm += pcm16

    def clear(self) -> None:
        self.clears += 1


async def _microphone(mic: asyncio.Queue[bytes], paths: list[str], gates: list[asyncio.Event]) -> None:
    """A microphone in real time: for each recording, 0.5 s of silence, the recording, 2 s of silence; the
    recording after the first waits for its gate (the moment the user would speak again); silence between."""
    for i, path in enumerate(paths):
        while i and not gates[i - 1].is_set():
            await mic.put(bytes(640))
            await asyncio.sleep(0.02)
        pcm = float_to_pcm16(np.concatenate([np.zeros(8000, np.float32), read_wav(SPEECH / path).samples,
                                             np.zeros(32000, np.float32)]))
        for j in range(0, len(pcm), 640):
            await mic.put(pcm[j:j + 640])
            await asyncio.sleep(0.02)
    while True:
        await mic.put(bytes(640))
        await asyncio.sleep(0.02)


async def test_live_microphone_moves_to_another_replica_with_its_conversation(engines) -> None:
    """`stemme talk` without files (the microphone): when its replica drains, the live conversation goes on on
    another one, which is told the earlier turn; the second answer plays too."""
    a, b = ServerThread(engines, shutdown_grace_s=timeout(60)), ServerThread(engines)
    moved, events = asyncio.Event(), []
    speaker, mic = FakeSpeaker(), asyncio.Queue(maxsize=200)

    def say(ev: dict) -> None:
        events.append(ev)
        if ev["event"] == "reconnected":
            moved.set()  # the user speaks again once the device is on the other replica

    try:
        async with ReconnectingClient(a.url, backoff=Backoff(first=0.05)) as rc:
            feeder = asyncio.create_task(_microphone(mic, ["en/asterisk_tt-weasels.wav",
                                                           "en/asterisk_conf-onlyperson.wav"], [moved]))
            talk = asyncio.create_task(live(rc, mic, speaker, say))
            async with asyncio.timeout(timeout(120)):
                while not any(e["event"] == "reply" for e in events):
                    await asyncio.sleep(0.1)
            first_audio = len(speaker.pcm)
            rc.url = b.url
            await asyncio.wait_for(_drain(a), timeout(60))
            async with asyncio.timeout(timeout(120)):
                while sum(e["event"] == "reply" for e in events) < 2:
                    await asyncio.sleep(0.1)
            items = b.call(lambda: [it for sess in b.server.sessions for it in sess.core.items])
            talk.cancel()
            feeder.cancel()
        kinds = [e["event"] for e in events]
        assert kinds.count("reconnected") == 1 and "draining" in kinds, kinds
        transcripts = [e["text"] for e in events if e["event"] == "transcript"]
        assert "weasel" in transcripts[0].lower() and "conference" in transcripts[1].lower(), transcripts
        assert first_audio > 0 and len(speaker.pcm) > first_audio  # both answers played
        roles = [it.get("role") for it in items]
        assert roles[:3] == ["user", "assistant", "user"] and rc.replayed == 2, roles
    finally:
        a.stop()
        b.stop()


async def test_drain_deadline_cancels_the_response(engines) -> None:
    s = ServerThread(engines, shutdown_grace_s=0.5)
    try:
        async with connect(s.url + "/v1/realtime") as a:
            await _next(a, "session.created")
            for ev in STORY:
                await a.send(json.dumps(ev))
            await _next(a, "response.created")
            drain = _drain(s)
            seen: list[str] = []
            done = await _next(a, "response.done", seen, 60)
            assert done["response"]["status"] == "cancelled", done
            assert done["response"]["status_details"]["reason"] == "server_shutting_down"
            assert "stemme.draining" in seen
            assert (await _closed(a)).code == 1001
        await asyncio.wait_for(drain, timeout(30))
    finally:
        s.stop()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def _wait_ready(url: str, proc: Any, seconds: float) -> None:
    deadline = time.monotonic() + timeout(seconds)
    while time.monotonic() < deadline:
        assert proc.returncode is None, "the server exited while starting"
        try:
            if (await asyncio.to_thread(http_get, url + "/readyz"))[0] == 200:
                return
        except OSError:
            pass
        await asyncio.sleep(1)
    raise AssertionError("the server did not become ready")


async def test_sigterm_during_a_long_reply_exits_0_after_response_done(tmp_path) -> None:
    port = _free_port()
    log = tmp_path / "server.log"
    with open(log, "wb") as out:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "stemme.cli", "serve", "--port", str(port), "--no-warmup", "--drain-grace",
            str(timeout(120)), stdout=out, stderr=out, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        await _wait_ready(f"http://127.0.0.1:{port}", proc, 600)
        async with connect(f"ws://127.0.0.1:{port}/v1/realtime") as ws:
            await _next(ws, "session.created")
            for ev in STORY:
                await ws.send(json.dumps(ev))
            seen: list[str] = []
            await _next(ws, "response.output_audio.delta", seen)
            proc.send_signal(signal.SIGTERM)
            await _next(ws, "stemme.draining", seen, 10)
            code, body = await asyncio.to_thread(http_get, f"http://127.0.0.1:{port}/readyz")
            assert (code, json.loads(body)) == (503, {"status": "draining"})  # the port still listens
            done = await _next(ws, "response.done", seen)
            assert done["response"]["status"] in ("completed", "cancelled"), done
            close = await _closed(ws, seen)  # after response.done (_next raises if the close comes first)
            assert close.code == 1001
        assert await asyncio.wait_for(proc.wait(), timeout(60)) == 0, log.read_text()[-3000:]
        assert "terminate called" not in log.read_text()
        assert "still running at exit" not in log.read_text()  # every engine thread was joined
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
