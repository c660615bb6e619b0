"""End-to-end tests of the voice server over loopback with the real models: voice turns in three languages,
the official openai SDK client, the binary-audio extension, barge-in, bad input, disconnects, auth."""

from __future__ import annotations

import asyncio
import base64
import json
import threading
import time

import langid
import numpy as np
import pytest
from stemme.clients.talk import RealtimeClient
from stemme.streaming.server import ServerConfig, StemmeServer
from stemme.voice.asr import AsrOptions
from stemme.voice.audio import float_to_pcm16, read_wav, resample
from stemme.voice.languages import SUPPORTED
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from stemme.scoring import wer
from tests.conftest import SPEECH, timeout


class ServerThread:
    """A real server on port 0, in its own thread and event loop."""

    def __init__(self, engines, stages=None, **kw) -> None:
        self.loop = asyncio.new_event_loop()
        self.server = StemmeServer(engines, ServerConfig(port=0, warmup=False, **kw), stages=stages)
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        asyncio.run_coroutine_threadsafe(self.server.start(), self.loop).result(timeout(300))
        self.url = f"ws://127.0.0.1:{self.server.port}"

    def call(self, fn):
        return asyncio.run_coroutine_threadsafe(_call(fn), self.loop).result(timeout(10))

    def stop(self) -> None:
        asyncio.run_coroutine_threadsafe(self.server.stop(), self.loop).result(timeout(30))
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout(10))


async def _call(fn):
    return fn()


@pytest.fixture(scope="module")
def server(engines):
    s = ServerThread(engines)
    yield s
    s.stop()


@pytest.fixture(scope="module")
def ident():
    i = langid.langid.LanguageIdentifier.from_modelstring(langid.langid.model, norm_probs=True)
    i.set_languages(list(SUPPORTED))
    return i


def _speech(path: str) -> np.ndarray:
    return read_wav(SPEECH / path).samples


async def _wait_idle(server: ServerThread, engines, seconds: float = 10) -> None:
    deadline = time.monotonic() + timeout(seconds)
    while time.monotonic() < deadline:
        if not server.server.sessions and server.server.stages.llm.depth == 0:
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"work left behind: sessions={len(server.server.sessions)} "
                         f"llm_streams={server.server.stages.llm.depth}")


@pytest.mark.parametrize("path,lang", [
    ("en/asterisk_conf-onlyperson.wav", "en"),
    ("fr/asterisk_tt-weasels.wav", "fr"),
    ("es/asterisk_conf-onlyperson.wav", "es"),
    ("it/asterisk_conf-invalid.wav", "it"),
])
async def test_voice_turn_in_the_users_language(server, engines, ident, manifest, path, lang):
    ref = next(r["transcript"] for r in manifest if r["path"] == path)
    async with RealtimeClient(server.url) as c:
        await c.wait_for("session.created")
        await c.configure()
        r = await c.talk(_speech(path), realtime=False, timeout=timeout(120))
    assert r.status == "completed"
    assert r.language == lang
    assert wer(r.transcript, ref) <= 0.5, r.transcript
    assert r.reply.strip()
    assert ident.classify(r.reply)[0] == lang, r.reply
    assert r.audio_seconds > 0.5
    # the reply audio is speech in the same language
    pcm = np.frombuffer(bytes(r.audio), "<i2").astype(np.float32) / 32768
    heard = engines.asr.transcribe(resample(pcm, 24000, 16000), AsrOptions(languages=SUPPORTED))
    assert heard.language == lang, heard.text
    lat = r.latency
    for key in ("end_of_turn_ms", "asr_ms", "llm_first_token_ms", "tts_first_audio_ms", "voice_to_voice_ms"):
        assert isinstance(lat[key], int) and lat[key] >= 0, lat
    assert lat["voice_to_voice_ms"] >= lat["end_of_turn_ms"]


async def test_official_openai_sdk_client(server):
    from openai import AsyncOpenAI

    client = AsyncOpenAI(api_key="unused", websocket_base_url=f"{server.url}/v1")
    audio24 = resample(_speech("en/asterisk_tt-weasels.wav"), 16000, 24000)
    silence = np.zeros(24000 * 2, np.float32)
    seen: list[str] = []
    transcript = reply = ""
    audio_bytes = 0
    async with client.realtime.connect(model="stemme") as conn:
        await conn.session.update(session={"type": "realtime", "output_modalities": ["audio"], "audio": {
            "input": {"format": {"type": "audio/pcm", "rate": 24000},
                      "turn_detection": {"type": "server_vad", "silence_duration_ms": 500}}}})
        pcm = float_to_pcm16(np.concatenate([audio24, silence]))
        for i in range(0, len(pcm), 9600):
            await conn.input_audio_buffer.append(audio=base64.b64encode(pcm[i:i + 9600]).decode())
        async with asyncio.timeout(timeout(120)):
            async for event in conn:
                seen.append(event.type)
                if event.type == "conversation.item.input_audio_transcription.completed":
                    transcript = event.transcript
                elif event.type == "response.output_audio.delta":
                    audio_bytes += len(base64.b64decode(event.delta))
                elif event.type == "response.output_audio_transcript.done":
                    reply = event.transcript
                elif event.type == "response.done":
                    assert event.response.status == "completed"
                    assert json.loads(event.response.metadata["stemme_latency"])["voice_to_voice_ms"] > 0
                    break
        for t in ("session.created", "session.updated", "input_audio_buffer.speech_started",
                  "input_audio_buffer.speech_stopped", "input_audio_buffer.committed",
                  "conversation.item.input_audio_transcription.completed", "response.created",
                  "response.output_audio_transcript.delta", "response.output_audio.delta",
                  "response.output_audio.done", "response.done"):
            assert t in seen, t
        assert "weasel" in transcript.lower()
        assert reply and audio_bytes > 24000

        # manual turn: no VAD, commit, response.create (text out)
        await conn.session.update(session={"type": "realtime", "output_modalities": ["text"],
                                           "audio": {"input": {"turn_detection": None}}})
        await conn.input_audio_buffer.append(audio=base64.b64encode(float_to_pcm16(
            resample(_speech("en/asterisk_vm-tocallback.wav"), 16000, 24000))).decode())
        await conn.input_audio_buffer.commit()
        text = ""
        async with asyncio.timeout(timeout(120)):
            async for event in conn:
                if event.type == "conversation.item.input_audio_transcription.completed":
                    assert "call" in event.transcript.lower()
                    await conn.response.create()
                elif event.type == "response.output_text.delta":
                    text += event.delta
                elif event.type == "response.done":
                    assert event.response.status == "completed"
                    break
        assert text.strip()

        # text input, then cancel the response mid-way
        await conn.conversation.item.create(item={"type": "message", "role": "user", "content": [
            {"type": "input_text", "text": "Write a long story about a dragon, at least ten sentences."}]})
        await conn.response.create()
        statuses = []
        async with asyncio.timeout(timeout(120)):
            async for event in conn:
                if event.type == "response.output_text.delta" and not statuses:
                    statuses.append("streaming")
                    await conn.response.cancel()
                elif event.type == "response.done":
                    statuses.append(event.response.status)
                    break
        assert statuses == ["streaming", "cancelled"]


async def test_binary_audio_extension(server):
    async with RealtimeClient(server.url, binary=True) as c:
        await c.wait_for("session.created")
        await c.configure()
        r = await c.talk(_speech("it/asterisk_tt-weasels.wav"), realtime=False, timeout=timeout(120))
    assert r.status == "completed" and r.language == "it"
    assert r.audio_seconds > 0.5
    assert not any(e["type"] == "response.output_audio.delta" for e in r.events), "audio must travel as binary"


async def test_barge_in_cancels_the_answer_and_keeps_what_was_sent(server, engines):
    async with RealtimeClient(server.url) as c:
        await c.wait_for("session.created")
        await c.configure()
        await c.send({"type": "conversation.item.create", "item": {"type": "message", "role": "user", "content": [
            {"type": "input_text", "text": "Tell me a very long story about a dragon and a knight."}]}})
        await c.send({"type": "response.create"})
        sent_text = []
        got_audio = False
        # the user speaks as soon as the answer starts playing
        async with asyncio.timeout(timeout(120)):
            while True:
                ev = await c.events.get()
                if ev["type"] == "response.output_audio_transcript.delta":
                    sent_text.append(ev["delta"])
                if ev["type"] == "response.output_audio.delta":
                    got_audio = True
                    item_id = ev["item_id"]
                    break
        assert got_audio
        speaker = asyncio.create_task(c.stream(_speech("en/asterisk_conf-onlyperson.wav"), realtime=True,
                                               then_silence_s=2.0))
        order = []
        async with asyncio.timeout(timeout(120)):
            while True:
                ev = await c.events.get()
                if isinstance(ev, bytes):
                    continue
                if ev["type"] == "response.output_audio_transcript.delta" and "response.done" not in order:
                    sent_text.append(ev["delta"])
                if ev["type"] in ("input_audio_buffer.speech_started", "output_audio_buffer.cleared"):
                    order.append(ev["type"])
                if ev["type"] == "response.done" and "response.done" not in order:
                    order.append("response.done")
                    assert ev["response"]["status"] == "cancelled"
                    assert ev["response"]["status_details"]["reason"] == "turn_detected"
                    kept = ev["response"]["output"][0]["content"][0]["transcript"]
                    assert kept == "".join(sent_text).strip()
                    break
        assert order[:3] == ["input_audio_buffer.speech_started", "output_audio_buffer.cleared", "response.done"]
        await c.send({"type": "conversation.item.retrieve", "item_id": item_id})
        ev = await c.wait_for("conversation.item.retrieved")
        assert ev["item"]["status"] == "incomplete"
        # the interruption itself becomes the next turn, answered in full
        r = await c.collect_turn(__import__("stemme.clients.talk", fromlist=["TurnResult"]).TurnResult(),
                                 timeout=timeout(120))
        await speaker
        assert r.status == "completed" and "conference" in r.transcript.lower()


async def test_truncate_keeps_what_was_heard(server):
    async with RealtimeClient(server.url) as c:
        await c.wait_for("session.created")
        await c.send({"type": "conversation.item.create", "item": {"type": "message", "role": "user", "content": [
            {"type": "input_text", "text": "Describe a sunny day at the beach in three sentences."}]}})
        await c.send({"type": "response.create"})
        from stemme.clients.talk import TurnResult

        r = await c.collect_turn(TurnResult(), timeout=timeout(120))
        assert r.status == "completed"
        done = next(e for e in r.events if e["type"] == "response.done")
        item = done["response"]["output"][0]
        full = item["content"][0]["transcript"]
        await c.send({"type": "conversation.item.truncate", "item_id": item["id"], "content_index": 0,
                      "audio_end_ms": 300})
        ev = await c.wait_for("conversation.item.truncated")
        assert ev["audio_end_ms"] == 300
        await c.send({"type": "conversation.item.retrieve", "item_id": item["id"]})
        kept = (await c.wait_for("conversation.item.retrieved"))["item"]["content"][0]["transcript"]
        assert len(kept) < len(full)
        await c.send({"type": "conversation.item.truncate", "item_id": item["id"], "content_index": 0,
                      "audio_end_ms": 10_000_000})
        err = await c.wait_for("error")
        assert err["error"]["param"] == "audio_end_ms"


BAD_INPUTS = [
    ("{oops", "invalid_json"),
    (json.dumps({"type": "no.such.event"}), "unknown_event_type"),
    (json.dumps({"type": "input_audio_buffer.append", "audio": "@@@"}), "invalid_base64"),
    (json.dumps({"type": "input_audio_buffer.append", "audio": base64.b64encode(b"\x01\x02\x03").decode()}),
     "invalid_audio_format"),
    (json.dumps({"type": "input_audio_buffer.append", "audio": 12}), "invalid_type"),
    (json.dumps({"type": "session.update", "session": {"audio": {"input": {"turn_detection": {
        "type": "server_vad", "threshold": "loud"}}}}}), "invalid_value"),
    (json.dumps({"type": "session.update", "session": "x"}), "invalid_type"),
    (json.dumps({"type": "conversation.item.truncate", "item_id": "nope", "content_index": 0, "audio_end_ms": 1}),
     "item_not_found"),
    (json.dumps({"type": "input_audio_buffer.commit"}), "input_audio_buffer_commit_empty"),
    (json.dumps({"type": "response.cancel"}), "response_cancel_not_active"),
    ("x" * (1 << 20 + 1), "message_too_large"),
]


async def test_bad_input_gets_an_error_event_and_the_session_keeps_working(server):
    async with connect(server.url + "/v1/realtime", max_size=None) as ws:
        assert json.loads(await ws.recv())["type"] == "session.created"
        await ws.send(json.dumps({"type": "session.update", "session": {"audio": {"input": {"turn_detection": None}}}}))
        assert json.loads(await ws.recv())["type"] == "session.updated"
        for raw, code in BAD_INPUTS:
            await ws.send(raw)
            ev = json.loads(await asyncio.wait_for(ws.recv(), timeout(10)))
            assert ev["type"] == "error", (raw[:60], ev)
            assert ev["error"]["code"] == code, (raw[:60], ev)
            assert ev["error"]["message"]
        await ws.send(b"\x00\x00" * 100)  # binary without the extension
        ev = json.loads(await ws.recv())
        assert ev["error"]["code"] == "binary_not_enabled"
        # still alive and working
        await ws.send(json.dumps({"type": "session.update", "session": {"instructions": "Answer in one word."}}))
        assert json.loads(await ws.recv())["type"] == "session.updated"


async def test_oversized_binary_frame(server):
    async with connect(server.url + "/v1/realtime?audio=binary", max_size=None) as ws:
        await ws.recv()
        await ws.send(b"\x00" * (1 << 20))
        ev = json.loads(await ws.recv())
        assert ev["error"]["code"] == "message_too_large"
        await ws.send(json.dumps({"type": "input_audio_buffer.clear"}))
        assert json.loads(await ws.recv())["type"] == "input_audio_buffer.cleared"


async def test_dropped_connection_leaves_no_work_behind(server, engines):
    ws = await connect(server.url + "/v1/realtime")
    await ws.recv()
    story = {"type": "input_text", "text": "Tell me a long story about the sea."}
    await ws.send(json.dumps({"type": "conversation.item.create",
                              "item": {"type": "message", "role": "user", "content": [story]}}))
    await ws.send(json.dumps({"type": "response.create"}))
    async with asyncio.timeout(timeout(60)):
        while True:
            ev = await ws.recv()
            if isinstance(ev, str) and json.loads(ev)["type"] == "response.output_audio.delta":
                break
    ws.transport.abort()  # abrupt: no close handshake
    await _wait_idle(server, engines)
    assert server.call(lambda: len(server.server.sessions)) == 0


async def test_api_key_is_required_when_configured(engines):
    s = ServerThread(engines, api_key="s3cret")
    try:
        async with connect(s.url + "/v1/realtime") as ws:
            ev = json.loads(await ws.recv())
            assert ev["type"] == "error" and ev["error"]["code"] == "invalid_api_key"
            with pytest.raises(ConnectionClosed) as e:
                await ws.recv()
            assert e.value.rcvd.code == 1008 and "API key" in e.value.rcvd.reason
        async with connect(s.url + "/v1/realtime", additional_headers={"Authorization": "Bearer s3cret"}) as ws:
            assert json.loads(await ws.recv())["type"] == "session.created"
        async with connect(s.url + "/v1/realtime?api_key=s3cret") as ws:
            assert json.loads(await ws.recv())["type"] == "session.created"
        async with connect(s.url + "/v1/realtime", additional_headers={"Authorization": "Bearer wrong"}) as ws:
            assert json.loads(await ws.recv())["error"]["code"] == "invalid_api_key"
    finally:
        s.stop()


async def test_health_endpoint(server):
    import urllib.request

    body = await asyncio.to_thread(lambda: urllib.request.urlopen(server.url.replace("ws", "http") + "/healthz").read())
    assert body == b"ok\n"


async def test_stemme_talk_device_client(server, tmp_path):
    import sys

    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "stemme.cli", "talk", "--url", server.url, "--out", str(tmp_path), "--binary",
        str(SPEECH / "fr" / "asterisk_conf-onlyperson.wav"), stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), timeout(180))
    assert proc.returncode == 0, err.decode()
    row = json.loads(out.decode().strip().splitlines()[-1])
    assert row["language"] == "fr" and "conf" in row["transcript"].lower()
    assert row["reply"] and row["latency_ms"]["voice_to_voice_ms"] > 0
    import soundfile as sf

    data, rate = sf.read(row["reply_wav"])
    assert rate == 24000 and len(data) / rate > 0.5


async def test_semantic_vad_ends_a_complete_sentence_at_a_short_pause(server):
    """semantic_vad with the end-of-turn model: a complete sentence is answered after 200 ms of silence, not
    after the 500 ms server_vad would wait; the latency report carries the model's answer."""
    async with RealtimeClient(server.url) as c:
        await c.wait_for("session.created")
        updated = await c.configure(extra={})
        assert updated["session"]["audio"]["input"]["turn_detection"]["type"] == "server_vad"
        session = {"type": "realtime", "audio": {"input": {"turn_detection": {"type": "semantic_vad",
                                                                              "eagerness": "auto"}}}}
        await c.send({"type": "session.update", "session": session})
        td = (await c.wait_for("session.updated"))["session"]["audio"]["input"]["turn_detection"]
        assert td["type"] == "semantic_vad" and td["eagerness"] == "auto"
        r = await c.talk(_speech("en/asterisk_tt-weasels.wav"), timeout=timeout(120))
    assert r.status == "completed" and r.reply.strip()
    assert "weasel" in r.transcript.lower()
    assert r.latency["end_of_turn_probability"] > 0.5
    # the turn ended after 200 ms of the stream's silence, not 500 (in audio time: the same on a loaded machine)
    assert r.latency["end_of_turn_silence_ms"] < 400, r.latency
    assert r.latency["end_of_turn_ms"] < timeout(1500), r.latency


async def test_semantic_vad_eagerness_is_checked(server):
    async with RealtimeClient(server.url) as c:
        await c.wait_for("session.created")
        bad = {"type": "realtime", "audio": {"input": {"turn_detection": {"type": "semantic_vad",
                                                                          "eagerness": "impatient"}}}}
        await c.send({"type": "session.update", "session": bad})
        err = await c.wait_for("error")
        assert "eagerness" in err["error"]["message"]
