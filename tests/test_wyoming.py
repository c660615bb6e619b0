"""The Wyoming front door (Home Assistant), tested with the `wyoming` package's own async TCP client against the
real server and the real models: describe, transcription of real recordings in three languages, synthesis
(whole and streamed) transcribed back, the assistant answering a question, and malformed frames. The frame
reader's unit tests need no socket."""

from __future__ import annotations

import argparse
import asyncio
import json
import threading
import wave

import langid
import numpy as np
import pytest
from stemme.streaming.wyoming import (
    MAX_PAYLOAD_BYTES,
    FrameReader,
    WyomingInputError,
    add_wyoming_arguments,
    start_wyoming,
    wyoming_options,
)
from stemme.voice.asr import AsrOptions
from stemme.voice.audio import pcm16_to_float, resample
from stemme.voice.languages import EUROPEAN
from wyoming.asr import Transcribe, Transcript
from wyoming.audio import AudioChunk, AudioStart, AudioStop, wav_to_chunks
from wyoming.client import AsyncTcpClient
from wyoming.error import Error
from wyoming.event import Event
from wyoming.handle import Handled
from wyoming.info import Describe, Info
from wyoming.tts import Synthesize, SynthesizeChunk, SynthesizeStart, SynthesizeStop, SynthesizeVoice

from stemme.scoring import wer
from tests.conftest import SPEECH, timeout

# --------------------------------------------------------------------------------- the frame reader, no socket


def _frame(type_: str, data: dict | None = None, payload: bytes = b"", *, split_data: bool = False) -> bytes:
    header: dict = {"type": type_}
    extra = b""
    if data and split_data:
        extra = json.dumps(data).encode()
        header["data_length"] = len(extra)
    elif data:
        header["data"] = data
    if payload:
        header["payload_length"] = len(payload)
    return json.dumps(header).encode() + b"\n" + extra + payload


def _kinds(items: list) -> list[str]:
    return [i.type if isinstance(i, Event) else f"error:{i.code}" for i in items]


def test_frames_byte_by_byte_with_data_and_payload():
    r = FrameReader()
    stream = _frame("audio-chunk", {"rate": 16000, "width": 2, "channels": 1}, b"\x01\x00" * 5, split_data=True)
    out = []
    for i in range(len(stream)):
        out += r.feed(stream[i: i + 1])
    assert _kinds(out) == ["audio-chunk"]
    assert out[0].data["rate"] == 16000 and out[0].payload == b"\x01\x00" * 5


def test_bad_frames_become_errors_and_the_reader_stays_in_step():
    r = FrameReader()
    out = r.feed(b"not json\n" + b'["a list"]\n' + b'{"type": 5}\n' + _frame("describe"))
    assert _kinds(out) == ["error:invalid_json", "describe"]  # one error until a header parses again
    out = r.feed(b'{"type": "audio-chunk", "payload_length": -3}\n' + _frame("describe"))
    assert _kinds(out) == ["error:invalid_length", "describe"]
    out = r.feed(b'{"type": "x", "data_length": 3}\n{1}' + _frame("ping"))
    assert _kinds(out) == ["error:invalid_json", "ping"]  # bad data JSON, but the lengths kept the stream in step


def test_oversized_payload_is_skipped_and_an_absurd_length_resynchronises():
    r = FrameReader()
    big = b"\x00" * (MAX_PAYLOAD_BYTES + 2)
    out = r.feed(_frame("audio-chunk", {"rate": 16000}, big) + _frame("describe"))
    assert _kinds(out) == ["error:message_too_large", "describe"]
    out = r.feed(b'{"type": "audio-chunk", "payload_length": 1000000000000}\n' + b"\x00\x01garbage\n"
                 + _frame("describe"))
    assert _kinds(out) == ["error:message_too_large", "describe"]
    out = r.feed(b"x" * (r.max_header + 10))
    assert _kinds(out) == ["error:message_too_large"]
    assert _kinds(r.feed(b"rest of that line\n" + _frame("describe"))) == ["describe"]


def test_zeroconf_is_off_unless_asked():
    p = argparse.ArgumentParser()
    add_wyoming_arguments(p)
    assert wyoming_options(p.parse_args([]))["zeroconf"] is None
    assert wyoming_options(p.parse_args(["--wyoming-zeroconf"]))["zeroconf"] == ""
    assert wyoming_options(p.parse_args(["--wyoming-zeroconf", "kitchen"]))["zeroconf"] == "kitchen"


def test_input_error_is_an_error_event():
    e = WyomingInputError("text_too_long", "too long").event()
    assert Error.is_type(e.type) and Error.from_event(e).code == "text_too_long"


# ------------------------------------------------------------------------------------------- the real server


class WyomingThread:
    """A real Wyoming server on port 0, in its own thread and event loop."""

    def __init__(self, engines) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.server = self._run(start_wyoming(engines, "tcp://127.0.0.1:0"), 60)
        self._run(self.server.service.wait_ready(), 900)
        self.port = self.server.port

    def _run(self, coro, seconds: float):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout(seconds))

    def stop(self) -> None:
        self._run(self.server.stop(), 30)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout(10))


@pytest.fixture(scope="module")
def server(engines):
    s = WyomingThread(engines)
    yield s
    s.stop()


def _client(server) -> AsyncTcpClient:
    return AsyncTcpClient("127.0.0.1", server.port, read_timeout=timeout(120))


async def _until(client: AsyncTcpClient, last: str) -> list[Event]:
    events = []
    while True:
        e = await client.read_event()
        assert e is not None, f"connection closed before {last}"
        events.append(e)
        if e.type == last or e.type == "error":
            return events


async def test_describe_lists_every_language_voice_and_the_assistant(server):
    async with _client(server) as c:
        await c.write_event(Describe().event())
        info = Info.from_event((await _until(c, "info"))[-1])
    asr = info.asr[0]
    assert asr.supports_transcript_streaming
    assert set(EUROPEAN) <= set(asr.models[0].languages) and len(asr.models[0].languages) >= 99
    tts = info.tts[0]
    assert tts.supports_synthesize_streaming
    spoken = {lang for v in tts.voices if v.installed for lang in v.languages}
    assert set(EUROPEAN) <= spoken
    assert len({v.name for v in tts.voices}) == len(tts.voices)
    assert info.handle and info.handle[0].models[0].languages


def _wav_events(path) -> list[Event]:
    with wave.open(str(path), "rb") as w:
        return [e.event() for e in wav_to_chunks(w, 1024, start_event=True, stop_event=True)]


@pytest.mark.parametrize("path", ["en/asterisk_conf-onlyperson.wav", "fr/asterisk_conf-onlyperson.wav",
                                  "es/asterisk_tt-weasels.wav"])
async def test_transcribe_real_recordings(server, manifest, path):
    row = next(r for r in manifest if r["path"] == path)
    async with _client(server) as c:
        await c.write_event(Transcribe().event())
        for e in _wav_events(SPEECH / path):
            await c.write_event(e)
        events = await _until(c, "transcript-stop")
    kinds = [e.type for e in events]
    assert kinds[0] == "transcript-start" and kinds[-2:] == ["transcript", "transcript-stop"], kinds
    assert "transcript-chunk" in kinds
    final = Transcript.from_event(events[-2])
    assert final.language == row["language"]
    chunks = "".join(e.data["text"] for e in events if e.type == "transcript-chunk")
    assert chunks.strip() == final.text
    assert wer(final.text, row["transcript"]) <= 0.35, final.text


async def test_no_audio_gets_an_empty_transcript_and_the_connection_goes_on(server):
    async with _client(server) as c:
        for e in (Transcribe(language="en"), AudioStart(rate=16000, width=2, channels=1), AudioStop()):
            await c.write_event(e.event())
        events = await _until(c, "transcript-stop")
        assert [e.type for e in events] == ["transcript-start", "transcript", "transcript-stop"], events
        assert Transcript.from_event(events[1]).text == ""
        await c.write_event(Describe().event())
        assert (await _until(c, "info"))[-1].type == "info"


async def _audio(c: AsyncTcpClient, last: str, seen: tuple[Event, ...] = ()) -> tuple[np.ndarray, list[Event]]:
    events = [*seen, *await _until(c, last)]
    assert events[-1].type == last, [e.type for e in events][-3:]
    starts = [AudioStart.from_event(e) for e in events if e.type == "audio-start"]
    assert len(starts) == 1 and starts[0].width == 2 and starts[0].channels == 1
    pcm = b"".join(AudioChunk.from_event(e).audio for e in events if e.type == "audio-chunk")
    return resample(pcm16_to_float(pcm), starts[0].rate, 16000), events


@pytest.mark.parametrize("lang,voice,text", [
    ("en", None, "The weather is lovely today. Let us go for a walk in the park."),
    ("fr", "kokoro:ff_siwis:fr", "Il fait très beau aujourd'hui. Allons nous promener dans le parc."),
])
async def test_synthesize_then_transcribe_back(server, engines, lang, voice, text):
    async with _client(server) as c:
        await c.write_event(Synthesize(text=text, voice=SynthesizeVoice(name=voice) if voice else None).event())
        audio, _ = await _audio(c, "audio-stop")
    assert len(audio) / 16000 > 2.0
    t = engines.asr.transcribe(audio, AsrOptions(language=lang))
    assert wer(t.text, text) <= 0.3, t.text


async def test_streaming_synthesis_speaks_before_the_text_ends(server, engines):
    first, rest = "Good morning, this is the first sentence. ", "And here comes the second one, a bit later."
    async with _client(server) as c:
        await c.write_event(SynthesizeStart().event())
        for word in first.split(" "):
            await c.write_event(SynthesizeChunk(text=word + " ").event())
        e = await c.read_event()  # audio arrives while the rest of the text has not been sent
        assert e is not None and e.type == "audio-start"
        for word in rest.split(" "):
            await c.write_event(SynthesizeChunk(text=word + " ").event())
        await c.write_event(Synthesize(text=first + rest).event())  # Home Assistant's copy for older servers
        await c.write_event(SynthesizeStop().event())
        audio, events = await _audio(c, "synthesize-stopped", (e,))
    assert [e.type for e in events][-2:] == ["audio-stop", "synthesize-stopped"]
    t = engines.asr.transcribe(audio, AsrOptions(language="en"))
    assert wer(t.text, first + rest) <= 0.3, t.text  # every sentence, once (the copy was ignored)


async def test_handle_answers_a_question(server):
    async with _client(server) as c:
        await c.write_event(Transcript(text="What is the capital of France?", language="en",
                                       context={"conversation_id": "t1"}).event())
        events = await _until(c, "handled")
    assert events[-1].type == "handled", events[-1]
    handled = Handled.from_event(events[-1])
    assert "paris" in (handled.text or "").lower()
    assert handled.context == {"conversation_id": "t1"}


async def test_reply_follows_the_language_of_what_was_heard(server, engines):
    """Home Assistant sends its pipeline's language ("en") with the text; the text was French speech that this
    server transcribed: the answer is French, and synthesizing it without a voice speaks French."""
    question = "Bonjour, quelle est la capitale de l'Italie ?"
    async with _client(server) as c:
        await c.write_event(Synthesize(text=question, voice=SynthesizeVoice(name="kokoro:ff_siwis:fr")).event())
        audio, _ = await _audio(c, "audio-stop")
    pcm = (np.clip(audio, -1, 1) * 32767).astype("<i2").tobytes()
    async with _client(server) as c:
        await c.write_event(Transcribe(language="en").event())
        await c.write_event(AudioStart(rate=16000, width=2, channels=1).event())
        await c.write_event(AudioChunk(rate=16000, width=2, channels=1, audio=pcm).event())
        await c.write_event(AudioStop().event())
        heard = Transcript.from_event((await _until(c, "transcript-stop"))[-2])
    assert heard.language == "fr", heard
    async with _client(server) as c:
        await c.write_event(Transcript(text=heard.text, language="en").event())
        reply = Handled.from_event((await _until(c, "handled"))[-1]).text or ""
    ident = langid.langid.LanguageIdentifier.from_modelstring(langid.langid.model, norm_probs=True)
    ident.set_languages(["en", "fr", "de", "es", "it", "pt", "nl", "pl"])
    assert ident.classify(reply)[0] == "fr", reply
    async with _client(server) as c:
        await c.write_event(Synthesize(text=reply).event())
        spoken, _ = await _audio(c, "audio-stop")
    t = engines.asr.transcribe(spoken, AsrOptions())
    assert t.language == "fr", t.text


async def _raw(server) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection("127.0.0.1", server.port)


async def _read(reader: asyncio.StreamReader) -> Event:
    line = await asyncio.wait_for(reader.readline(), timeout(30))
    header = json.loads(line)
    data = header.get("data") or {}
    if header.get("data_length"):
        data.update(json.loads(await reader.readexactly(header["data_length"])))
    if header.get("payload_length"):
        await reader.readexactly(header["payload_length"])
    return Event(header["type"], data)


async def test_malformed_frames_get_errors_and_the_connection_stays_up(server):
    reader, writer = await _raw(server)
    bad = [
        (b"this is not json\n", "invalid_json"),
        (_frame("no-such-event"), "unknown_event"),
        (b'{"type": "audio-chunk", "payload_length": "many"}\n', "invalid_length"),
        (b'{"type": "audio-chunk", "payload_length": 99999999999999}\n', "message_too_large"),
        (_frame("audio-chunk", {"rate": 16000, "width": 2, "channels": 1}, b"\x00\x00"), "audio_not_started"),
        (_frame("audio-start", {"rate": 16000, "width": 4, "channels": 1}), "invalid_audio_format"),
        (_frame("synthesize", {"text": "x" * 16_001}), "text_too_long"),
        (_frame("synthesize", {"text": 42}), "invalid_event"),
        (_frame("synthesize", {"text": "Hello.", "voice": {"name": "no-such-voice"}}), "voice_not_found"),
        (_frame("transcript", {"text": "  "}), "empty_text"),
        (_frame("synthesize-chunk", {"text": "Hi."}), "synthesis_not_started"),
    ]
    try:
        for frame, code in bad:
            writer.write(frame)
            await writer.drain()
            e = await _read(reader)
            assert e.type == "error" and e.data["code"] == code, (frame[:60], e)
        writer.write(_frame("audio-start", {"rate": 16000, "width": 2, "channels": 1})
                     + _frame("audio-chunk", {"rate": 16000, "width": 2, "channels": 1}, b"\x00")
                     + _frame("describe"))
        await writer.drain()
        e = await _read(reader)
        assert e.data.get("code") == "invalid_audio_format"  # half a sample
        assert (await _read(reader)).type == "info"  # still up, and in step
    finally:
        writer.close()


async def test_too_much_audio_is_refused_and_the_rest_still_transcribed(server):
    second = b"\x00\x00" * 16000
    async with _client(server) as c:
        await c.write_event(AudioStart(rate=16000, width=2, channels=1).event())
        for _ in range(61):
            await c.write_event(AudioChunk(rate=16000, width=2, channels=1, audio=second).event())
        await c.write_event(AudioStop().event())
        refused = await _until(c, "error")
        events = await _until(c, "transcript-stop")
    assert refused[-1].data["code"] == "audio_too_long"
    assert [e.type for e in events][-2:] == ["transcript", "transcript-stop"]


async def test_disconnect_mid_synthesis_leaves_the_server_up(server):
    reader, writer = await _raw(server)
    writer.write(_frame("synthesize", {"text": "A long text to speak. " * 20}))
    await writer.drain()
    writer.close()
    async with _client(server) as c:
        await c.write_event(Describe().event())
        assert (await _until(c, "info"))[-1].type == "info"
    stages = server.server.service.stages
    for _ in range(int(timeout(60) * 10)):  # the rest of the text is not spoken for nobody
        await asyncio.sleep(0.1)
        if stages.depth("tts") == 0 and not server.server._tasks:
            break
    assert stages.depth("tts") == 0 and not server.server._tasks
