"""The OpenAI REST endpoints, driven by the official ``openai`` SDK against a real server with the real models:
transcriptions of real recordings in three languages and several file formats, streamed speech transcribed
back, chat completions with and without streaming, the model list, the key, and bad input."""

from __future__ import annotations

import asyncio
import io
import json
import threading
import time

import httpx2 as httpx
import numpy as np
import openai
import pytest
import soundfile as sf
from stemme.voice.audio import OUTPUT_RATE, read_wav, resample

from stemme.scoring import wer
from tests.conftest import SPEECH, timeout
from tests.test_server import ServerThread

KEY = "rest-test-key"


@pytest.fixture(scope="module")
def server(engines):
    s = ServerThread(engines, api_key=KEY)
    yield s
    s.stop()


@pytest.fixture(scope="module")
def base_url(server) -> str:
    return server.url.replace("ws://", "http://") + "/v1"


@pytest.fixture(scope="module")
def client(base_url) -> openai.OpenAI:
    return openai.OpenAI(base_url=base_url, api_key=KEY, timeout=timeout(120), max_retries=0)


def _encoded(path: str, fmt: str, *, rate: int | None = None, stereo: bool = False, **kw) -> bytes:
    audio = read_wav(SPEECH / path, rate=None)
    samples = audio.samples if rate is None else resample(audio.samples, audio.rate, rate)
    data = np.stack([samples, samples * 0.5], axis=1) if stereo else samples
    buf = io.BytesIO()
    sf.write(buf, data, rate or audio.rate, format=fmt, **kw)
    return buf.getvalue()


REFERENCES = {
    "en/asterisk_tt-weasels.wav": "Weasels have eaten our phone system",
    "fr/asterisk_conf-onlyperson.wav": "Vous êtes présentement le seul participant dans cette conférence.",
    "es/asterisk_tt-weasels.wav": "Las comadrejas se han comido nuestro sistema telefonico.",
}


@pytest.mark.parametrize("path", list(REFERENCES))
def test_transcribes_real_recordings_in_three_languages(client, path):
    with open(SPEECH / path, "rb") as f:
        t = client.audio.transcriptions.create(model="whisper-1", file=f)
    assert wer(t.text, REFERENCES[path]) <= 0.35, t.text


def test_flac_stereo_44k_and_verbose_json(client):
    data = _encoded("fr/asterisk_tt-weasels.wav", "FLAC", rate=44100, stereo=True)
    t = client.audio.transcriptions.create(model="whisper-1", file=("speech.flac", data), language="fr",
                                           response_format="verbose_json")
    assert t.language == "french"
    assert 2.5 < t.duration < 3.6
    assert wer(t.text, "Des fouineurs ont mangé notre système téléphonique.") <= 0.5, t.text
    assert t.segments and t.segments[0].start == 0.0 and t.segments[-1].end == pytest.approx(t.duration, abs=0.1)


@pytest.mark.parametrize("fmt,subtype", [("MP3", "MPEG_LAYER_III"), ("OGG", "VORBIS"), ("OGG", "OPUS")])
def test_compressed_uploads(client, fmt, subtype):
    data = _encoded("en/asterisk_tt-weasels.wav", fmt, rate=48000 if subtype == "OPUS" else 22050, subtype=subtype)
    text = client.audio.transcriptions.create(model="whisper-1", file=("speech.bin", data), response_format="text")
    assert isinstance(text, str) and "weasel" in text.lower(), text


def test_subtitle_formats(client):
    data = (SPEECH / "en/asterisk_conf-onlyperson.wav").read_bytes()
    srt = client.audio.transcriptions.create(model="whisper-1", file=("a.wav", data), response_format="srt")
    vtt = client.audio.transcriptions.create(model="whisper-1", file=("a.wav", data), response_format="vtt")
    assert srt.startswith("1\n00:00:00,000 --> 00:00:03,"), srt
    assert vtt.startswith("WEBVTT\n\n00:00:00.000 --> 00:00:03."), vtt
    assert "conference" in srt.lower() and "conference" in vtt.lower()


SPOKEN = {
    "fr": "Bonjour, je suis votre assistant. Il fait beau aujourd'hui, nous allons marcher jusqu'au parc. "
          "Merci de me rappeler demain matin.",
    "en": "The weather is nice today, so we will walk to the park. Please call me back tomorrow morning.",
}


def _stream_speech(client, text: str, fmt: str, voice: str = "alloy", **kw) -> tuple[list[bytes], float, float, str]:
    started = time.perf_counter()
    chunks: list[bytes] = []
    first = 0.0
    with client.audio.speech.with_streaming_response.create(model="tts-1", voice=voice, input=text,
                                                            response_format=fmt, **kw) as response:
        ctype = response.headers["content-type"]
        for chunk in response.iter_bytes():
            if chunk and not chunks:
                first = time.perf_counter() - started
            chunks.append(chunk)
    return chunks, first, time.perf_counter() - started, ctype


@pytest.mark.parametrize("lang", ["fr", "en"])
def test_speech_streams_and_transcribes_back(client, lang):
    chunks, first, total, ctype = _stream_speech(client, SPOKEN[lang], "wav")
    audio = b"".join(chunks)
    assert ctype == "audio/wav"
    assert audio[:4] == b"RIFF" and audio[8:12] == b"WAVE"
    assert len(chunks) >= 2 and first < total * 0.8, (len(chunks), first, total)  # the first clause came early
    back = client.audio.transcriptions.create(model="whisper-1", file=("speech.wav", audio))
    assert wer(back.text, SPOKEN[lang]) <= 0.3, back.text


@pytest.mark.parametrize("fmt", ["flac", "mp3", "opus", "pcm"])
def test_speech_formats_decode(client, fmt):
    chunks, _, _, ctype = _stream_speech(client, "Please call me back tomorrow morning.", fmt, speed=1.5)
    data = b"".join(chunks)
    assert ctype == {"flac": "audio/flac", "mp3": "audio/mpeg", "opus": "audio/opus", "pcm": "audio/pcm"}[fmt]
    if fmt == "pcm":
        assert len(data) % 2 == 0
        data = _wav(np.frombuffer(data, "<i2").astype(np.float32) / 32768)
    else:
        with sf.SoundFile(io.BytesIO(data)) as f:  # streamed: the header may not know the length
            assert f.samplerate == OUTPUT_RATE and f.channels == 1
    # decoded by the server's own reader (the streamed FLAC's unknown length included)
    back = client.audio.transcriptions.create(model="whisper-1", file=("s." + fmt, data), language="en",
                                              response_format="verbose_json")
    assert 0.8 < back.duration < 3.0, back.duration  # about 2.2 s at normal speed, faster at 1.5
    assert wer(back.text, "Please call me back tomorrow morning.") <= 0.35, back.text


def _wav(samples: np.ndarray) -> bytes:
    buf = io.BytesIO()
    sf.write(buf, samples, OUTPUT_RATE, format="WAV")
    return buf.getvalue()


def test_stemme_voice_names(client, base_url):
    voices = httpx.get(base_url + "/voices", headers={"Authorization": f"Bearer {KEY}"}).json()["voices"]
    french = next(v["name"] for v in voices if v["language"] == "fr" and v["default"])
    with client.audio.speech.with_streaming_response.create(model="tts-1", voice=french, input="Bonjour.",
                                                            response_format="pcm") as response:
        assert response.headers["x-stemme-voice"] == french
        assert len(response.read()) > OUTPUT_RATE // 4


def test_chat_completion(client):
    r = client.chat.completions.create(model="stemme", messages=[
        {"role": "system", "content": "Answer in one short sentence."},
        {"role": "user", "content": "What is the capital of France?"}], max_tokens=30)
    assert r.object == "chat.completion" and r.choices[0].message.role == "assistant"
    assert "paris" in r.choices[0].message.content.lower(), r.choices[0].message.content
    assert r.choices[0].finish_reason in ("stop", "length")


def test_chat_completion_streams(client):
    stream = client.chat.completions.create(model="stemme", stream=True, max_tokens=30, messages=[
        {"role": "user", "content": [{"type": "text", "text": "What is the capital of Italy?"}]}])
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert len(chunks) >= 4 and "rom" in text.lower(), text
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")
    assert all(c.choices[0].finish_reason is None for c in chunks[:-1])


def test_models(client):
    ids = [m.id for m in client.models.list()]
    assert "whisper-base" in ids and "stemme-tts" in ids and len(ids) == 3


def test_wrong_key_refused(base_url):
    bad = openai.OpenAI(base_url=base_url, api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as e:
        bad.models.list()
    assert e.value.body["code"] == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        bad.audio.speech.create(model="tts-1", voice="alloy", input="Hello.")
    r = httpx.post(base_url + "/chat/completions", json={"messages": [{"role": "user", "content": "Hi"}]})
    assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"


@pytest.mark.parametrize("kwargs,code", [
    ({"speed": 10.0}, "invalid_value"),
    ({"speed": 0.0}, "invalid_value"),
    ({"input": "x" * 5000}, "string_above_max_length"),
    ({"input": "   "}, "invalid_value"),
    ({"voice": "no-such-voice"}, "voice_not_found"),
    ({"response_format": "aac"}, "unsupported_value"),
])
def test_bad_speech_requests(client, kwargs, code):
    args = {"model": "tts-1", "voice": "alloy", "input": "Hello there.", **kwargs}
    with pytest.raises(openai.BadRequestError) as e:
        client.audio.speech.create(**args)
    assert e.value.status_code == 400 and e.value.body["code"] == code


def _post(base_url: str, path: str, **kw) -> httpx.Response:
    return httpx.post(base_url + path, headers={"Authorization": f"Bearer {KEY}", **kw.pop("headers", {})},
                      timeout=timeout(60), **kw)


def test_bad_transcription_requests(client, base_url):
    with pytest.raises(openai.APIStatusError) as e:
        client.audio.transcriptions.create(model="whisper-1", file=("notes.txt", b"not audio at all" * 100))
    assert e.value.status_code == 415 and e.value.body["code"] == "unsupported_audio_format"
    empty = _wav(np.zeros(100, np.float32))
    with pytest.raises(openai.UnprocessableEntityError):
        client.audio.transcriptions.create(model="whisper-1", file=("empty.wav", empty))
    with pytest.raises(openai.BadRequestError):
        client.audio.transcriptions.create(model="whisper-1", file=("a.wav", empty), language="xx-nope")
    r = _post(base_url, "/audio/transcriptions", data={"model": "whisper-1"}, files={"other": ("a", b"1")})
    assert r.status_code == 400 and r.json()["error"]["param"] == "file"
    r = _post(base_url, "/audio/transcriptions", json={"file": "x"})
    assert r.status_code == 415 and r.json()["error"]["type"] == "invalid_request_error"


def test_upload_size_cap(base_url):
    too_big = b"\0" * ((25 << 20) + 1024)
    r = _post(base_url, "/audio/transcriptions", files={"file": ("big.wav", too_big)})
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"


def test_bad_chat_requests(client, base_url):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="stemme", messages=[])
    assert e.value.body["param"] == "messages"
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="stemme", messages=[{"role": "robot", "content": "Hi"}])
    assert e.value.body["param"] == "messages[0].role"
    with pytest.raises(openai.BadRequestError) as e:  # over the prompt cap, before any token
        client.chat.completions.create(model="stemme", stream=True, messages=[
            {"role": "user", "content": "word " * 3000}, {"role": "user", "content": "word " * 3000}])
    assert e.value.body["code"] == "context_length_exceeded"
    r = _post(base_url, "/chat/completions", content=b"{not json", headers={"Content-Type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json"
    r = _post(base_url, "/chat/completions", content=b"[" * 100_000, headers={"Content-Type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json"  # nested past the parser: no 500
    r = _post(base_url, "/chat/completions", json={"messages": [{"role": "user", "content": "Hi"}],
                                                   "max_tokens": 10**6})
    assert r.status_code == 400 and r.json()["error"]["param"] == "max_tokens"


WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Get the weather in a city",
                                            "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                                           "required": ["city"]}}}
TIMER = {"type": "function", "function": {
    "name": "set_timer", "description": "Start a timer",
    "parameters": {"type": "object", "properties": {"minutes": {"type": "number"}}, "required": ["minutes"]}}}


def test_chat_tool_choice(client, base_url):
    """A named tool_choice is a call of that function (forced on the embedded model); one that names no offered
    tool, or is malformed, is a 400 as OpenAI answers it, not a call of a function the client never declared."""
    r = client.chat.completions.create(model="stemme", max_tokens=40, tools=[WEATHER, TIMER],
                                       tool_choice={"type": "function", "function": {"name": "set_timer"}},
                                       messages=[{"role": "user", "content": "What's the weather in Paris?"}])
    calls = r.choices[0].message.tool_calls
    assert calls and [c.function.name for c in calls] == ["set_timer"], r.choices[0].message
    assert isinstance(json.loads(calls[0].function.arguments), dict)
    for choice in ({"type": "function", "function": {"name": "get_time"}}, {"type": "function", "function": None},
                   {"function": "set_timer"}, "sometimes", 7):
        r = _post(base_url, "/chat/completions", json={"messages": [{"role": "user", "content": "Hi"}],
                                                       "tools": [WEATHER], "tool_choice": choice})
        assert r.status_code == 400 and r.json()["error"]["param"] == "tool_choice", (choice, r.text)
    r = _post(base_url, "/chat/completions", json={"messages": [{"role": "user", "content": "Hi"}],
                                                   "tool_choice": "required"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "tool_choice"


def test_event_loop_free_during_long_transcription(server, client, base_url):
    """A 40 s upload is decoded and transcribed off the event loop: /healthz keeps answering meanwhile."""
    parts = [read_wav(SPEECH / p).samples for p in REFERENCES] * 4
    long = _wav(resample(np.concatenate(parts), 16000, OUTPUT_RATE))
    result: dict[str, str] = {}

    def run() -> None:
        started = time.perf_counter()
        result["text"] = client.audio.transcriptions.create(model="whisper-1", file=("long.wav", long)).text
        result["took"] = f"{time.perf_counter() - started}"

    worker = threading.Thread(target=run)
    worker.start()
    worst = 0.0
    while worker.is_alive():
        started = time.perf_counter()
        assert httpx.get(server.url.replace("ws://", "http://") + "/healthz", timeout=timeout(10)).status_code == 200
        worst = max(worst, time.perf_counter() - started)
        time.sleep(0.05)
    worker.join()
    assert "weasel" in result["text"].lower()
    took = float(result["took"])
    assert worst < took / 3, (worst, took)  # on the loop, one health check would wait for the whole transcription


def _poll(check, seconds: float) -> bool:
    end = time.monotonic() + timeout(seconds)
    while time.monotonic() < end:
        if check():
            return True
        time.sleep(0.02)
    return False


def test_a_transcription_nobody_waits_for_is_withdrawn(server, client, base_url):
    """A long upload whose client hangs up while it waits behind another transcription leaves the ASR queue at
    once: the shared recogniser never spends its time on it."""
    import socket
    from urllib.parse import urlsplit

    def upload(times: int) -> bytes:
        return _wav(resample(np.concatenate([read_wav(SPEECH / p).samples for p in REFERENCES] * times), 16000,
                             OUTPUT_RATE))

    long, short = upload(8), upload(1)  # about 80 s, which keeps the recogniser busy, and 10 s
    asr = server.server.stages.asr
    before = asr.items
    first = threading.Thread(target=lambda: client.audio.transcriptions.create(model="whisper-1",
                                                                               file=("a.wav", long)))
    first.start()
    assert _poll(lambda: asr.items > before, 30)  # the first upload is being transcribed
    req = httpx.Request("POST", base_url + "/audio/transcriptions", files={"file": ("b.wav", short)},
                        data={"model": "whisper-1"}, headers={"Authorization": f"Bearer {KEY}"})
    body = req.read()
    head = "".join(f"{k}: {v}\r\n" for k, v in req.headers.items() if k.lower() != "connection")
    url = urlsplit(base_url)
    sock = socket.create_connection((url.hostname, url.port), timeout=timeout(10))
    sock.sendall(f"POST {url.path}/audio/transcriptions HTTP/1.1\r\n{head}Connection: close\r\n\r\n".encode()
                 + body)
    try:
        assert _poll(lambda: asr.depth == 1, 30), "the second upload should wait behind the first"
    finally:
        sock.close()
    withdrawn = _poll(lambda: asr.depth == 0, 3)
    still_busy = first.is_alive()
    first.join(timeout(120))
    assert withdrawn and still_busy, (withdrawn, still_busy)  # it left the queue before the first one finished
    time.sleep(0.5)
    assert asr.items == before + 1  # and was never transcribed


def test_draining_server_refuses_new_requests(engines):
    s = ServerThread(engines, api_key=KEY)
    try:
        asyncio.run_coroutine_threadsafe(s.server.drain(), s.loop).result(timeout(30))
        base = s.url.replace("ws://", "http://") + "/v1"
        r = _post(base, "/chat/completions", json={"messages": [{"role": "user", "content": "Hi"}]})
        assert r.status_code == 503 and r.json()["error"]["code"] == "server_shutting_down"
        r = _post(base, "/audio/speech", json={"input": "Hello.", "voice": "alloy"})
        assert r.status_code == 503
    finally:
        s.stop()


async def test_request_slots_are_released_however_a_stream_ends():
    """The REST request counter: a streamed body releases its slot when it ends, and when it is dropped without
    ever being read (a client gone before the response started). Plain async generators, no server."""
    import gc

    from stemme.streaming.rest import ApiError, _Gate, released

    async def body():
        yield b"a"
        yield b"b"

    gate = _Gate(2)
    assert [c async for c in released(body(), gate.take())] == [b"a", b"b"] and gate.busy == 0
    stream = released(body(), gate.take())
    gate.take()
    with pytest.raises(ApiError) as e:
        gate.take()
    assert e.value.status == 429 and e.value.code == "server_busy"
    del stream
    gc.collect()
    assert gate.busy == 1
