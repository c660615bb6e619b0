"""Device client: streams WAV files (or the microphone) to a Stemme server in real time, as a smart speaker
would, prints the events as JSON lines and saves each reply as a WAV file.

    stemme talk --url ws://127.0.0.1:8000 hello.wav --out replies/ [--binary] [--key K]
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from stemme.voice.audio import ASR_RATE, OUTPUT_RATE, Audio, float_to_pcm16, read_wav, write_wav
from websockets.asyncio.client import ClientConnection, connect

CHUNK_MS = 20


@dataclass
class TurnResult:
    transcript: str = ""
    language: str | None = None
    reply: str = ""
    audio: bytearray = field(default_factory=bytearray)
    """24 kHz PCM16 reply audio."""
    latency: dict[str, Any] = field(default_factory=dict)
    status: str = ""
    events: list[dict[str, Any]] = field(default_factory=list)
    first_audio_at: float | None = None
    """perf_counter() of the first reply audio byte received."""
    last_voice_sent_at: float | None = None
    splits: int = 0
    """Answers cancelled because the speaker went on after a pause (the VAD had ended the turn)."""

    @property
    def audio_seconds(self) -> float:
        return len(self.audio) / 2 / OUTPUT_RATE


class RealtimeClient:
    """A minimal Realtime-API client over ``websockets`` (JSON or the binary-audio extension)."""

    def __init__(self, url: str, *, key: str | None = None, binary: bool = False) -> None:
        base = url.rstrip("/")
        if not base.endswith("/v1/realtime"):
            base += "/v1/realtime"
        self.url = base + ("?audio=binary" if binary else "")
        self.key = key
        self.binary = binary
        self.ws: ClientConnection | None = None
        self.events: asyncio.Queue[dict[str, Any] | bytes] = asyncio.Queue()
        self._reader: asyncio.Task | None = None

    async def __aenter__(self) -> RealtimeClient:
        headers = {"Authorization": f"Bearer {self.key}"} if self.key else None
        self.ws = await connect(self.url, additional_headers=headers, max_size=16 << 20)
        self._reader = asyncio.create_task(self._read())
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self.ws:
            await self.ws.close()
        if self._reader:
            self._reader.cancel()

    async def _read(self) -> None:
        assert self.ws
        try:
            async for m in self.ws:
                self.events.put_nowait(m if isinstance(m, bytes) else json.loads(m))
        except Exception:  # noqa: BLE001 - the connection ended
            pass
        self.events.put_nowait({"type": "stemme.client.closed"})

    async def send(self, event: dict[str, Any]) -> None:
        assert self.ws
        await self.ws.send(json.dumps(event))

    async def send_audio(self, pcm16: bytes) -> None:
        assert self.ws
        if self.binary:
            await self.ws.send(pcm16)
        else:
            await self.send({"type": "input_audio_buffer.append", "audio": base64.b64encode(pcm16).decode()})

    async def configure(self, *, language: str | None = None, voice: str | None = None,
                        silence_ms: int = 500, extra: dict[str, Any] | None = None) -> dict[str, Any]:
        session: dict[str, Any] = {
            "type": "realtime",
            "audio": {"input": {"format": {"type": "audio/pcm", "rate": ASR_RATE},
                                "transcription": {"model": "whisper-base", "language": language},
                                "turn_detection": {"type": "server_vad", "silence_duration_ms": silence_ms}},
                      "output": {"voice": voice} if voice else {}},
        }
        session.update(extra or {})
        await self.send({"type": "session.update", "session": session})
        return await self.wait_for("session.updated")

    async def wait_for(self, etype: str, timeout: float = 30.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            ev = await asyncio.wait_for(self.events.get(), max(0.01, deadline - time.monotonic()))
            if isinstance(ev, dict) and ev.get("type") in (etype, "stemme.client.closed"):
                if ev["type"] != etype:
                    raise ConnectionError(f"connection closed while waiting for {etype}")
                return ev

    async def stream(self, samples: np.ndarray, *, realtime: bool = True, then_silence_s: float = 0.0,
                     stop: asyncio.Event | None = None) -> float:
        """Send 16 kHz audio in 20 ms chunks, paced like a microphone; return when the last voiced chunk went."""
        step = ASR_RATE * CHUNK_MS // 1000
        t0 = time.perf_counter()
        sent = 0
        last_voice = t0

        async def pace() -> None:
            if realtime:
                delay = t0 + sent / ASR_RATE - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)

        for i in range(0, len(samples), step):
            await pace()
            await self.send_audio(float_to_pcm16(samples[i:i + step]))
            sent += len(samples[i:i + step])
            last_voice = time.perf_counter()
        silence = np.zeros(step, np.float32)
        for _ in range(int(then_silence_s * 1000 / CHUNK_MS)):
            if stop is not None and stop.is_set():
                break
            await pace()
            await self.send_audio(float_to_pcm16(silence))
            sent += step
        return last_voice

    async def collect_turn(self, result: TurnResult, timeout: float = 120.0,
                           on_event: Any = None) -> TurnResult:
        """Gather events until response.done (or a transcript that produced no response)."""
        deadline = time.monotonic() + timeout
        in_response = False
        while True:
            try:
                ev = await asyncio.wait_for(self.events.get(), max(0.01, deadline - time.monotonic()))
            except asyncio.TimeoutError:
                result.status = "timeout"
                return result
            if isinstance(ev, bytes):
                if result.first_audio_at is None:
                    result.first_audio_at = time.perf_counter()
                result.audio += ev
                continue
            result.events.append(ev)
            if on_event:
                on_event(ev)
            t = ev.get("type")
            if t == "conversation.item.input_audio_transcription.completed":
                result.transcript = ev.get("transcript", "")
                result.language = (ev.get("stemme") or {}).get("language")
            elif t == "response.created":
                in_response = True
            elif t in ("response.output_audio.delta", "response.audio.delta"):
                if result.first_audio_at is None:
                    result.first_audio_at = time.perf_counter()
                result.audio += base64.b64decode(ev["delta"])
            elif t in ("response.output_audio_transcript.done", "response.audio_transcript.done"):
                result.reply = ev.get("transcript", "")
            elif t in ("response.output_text.done", "response.text.done"):
                result.reply = ev.get("text", "")
            elif t == "response.done":
                details = ev["response"].get("status_details") or {}
                if ev["response"]["status"] == "cancelled" and details.get("reason") == "turn_detected":
                    # the speaker paused mid-utterance and went on: that answer was cancelled, the one to the
                    # rest of the utterance follows
                    result.splits += 1
                    result.reply, result.audio, result.first_audio_at = "", bytearray(), None
                    in_response = False
                    continue
                result.status = ev["response"]["status"]
                result.latency = (ev.get("stemme") or {}).get("latency", {})
                return result
            elif t == "stemme.client.closed":
                result.status = "closed"
                return result
            elif t == "error" and not in_response and ev["error"].get("code") == "invalid_api_key":
                result.status = "unauthorized"
                return result

    async def talk(self, samples: np.ndarray, *, realtime: bool = True, silence_s: float = 3.0,
                   timeout: float = 120.0, on_event: Any = None) -> TurnResult:
        """One spoken turn: stream the utterance then silence (stopped once the answer is complete)."""
        result = TurnResult()
        done = asyncio.Event()
        streamer = asyncio.create_task(self.stream(samples, realtime=realtime, then_silence_s=silence_s,
                                                   stop=done))
        try:
            await self.collect_turn(result, timeout=timeout, on_event=on_event)
        finally:
            done.set()
            result.last_voice_sent_at = await streamer
        return result


async def _talk_main(args: argparse.Namespace) -> int:
    out_dir = Path(args.out) if args.out else None
    if out_dir:
        out_dir.mkdir(parents=True, exist_ok=True)
    if not args.files:
        return await _microphone(args)

    def show(ev: dict[str, Any]) -> None:
        if args.verbose:
            print(json.dumps({k: v for k, v in ev.items() if k != "delta" or "audio" not in ev["type"]},
                             ensure_ascii=False), flush=True)

    async with RealtimeClient(args.url, key=args.key, binary=args.binary) as client:
        first = await client.wait_for("session.created", timeout=30)
        if first.get("type") != "session.created":
            return 1
        await client.configure(language=args.language, voice=args.voice)
        code = 0
        for i, path in enumerate(args.files):
            audio = read_wav(path)
            r = await client.talk(audio.samples, realtime=not args.fast, on_event=show)
            row: dict[str, Any] = {"file": str(path), "transcript": r.transcript, "language": r.language,
                                   "reply": r.reply, "status": r.status, "latency_ms": r.latency,
                                   "reply_seconds": round(r.audio_seconds, 3)}
            if r.first_audio_at and r.last_voice_sent_at:
                row["client_voice_to_voice_ms"] = round((r.first_audio_at - r.last_voice_sent_at) * 1000)
            if out_dir and r.audio:
                wav = out_dir / f"reply-{i + 1:02d}-{Path(path).stem}.wav"
                pcm = np.frombuffer(bytes(r.audio), dtype="<i2").astype(np.float32) / 32768
                write_wav(wav, Audio(pcm, OUTPUT_RATE))
                row["reply_wav"] = str(wav)
            print(json.dumps(row, ensure_ascii=False), flush=True)
            if r.status not in ("completed",):
                code = 1
        return code


async def _microphone(args: argparse.Namespace) -> int:
    """Live conversation: the default microphone in, the default speaker out (needs ``sounddevice``)."""
    try:
        import sounddevice as sd
    except (ImportError, OSError):
        print("stemme: error: no microphone support here: install the 'sounddevice' package (and PortAudio) on a "
              "machine with a sound card, or pass WAV files", file=sys.stderr)
        return 2
    try:
        sd.check_input_settings(samplerate=ASR_RATE, channels=1, dtype="int16")
    except Exception as e:  # noqa: BLE001 - PortAudio reports a missing device in many ways
        print(f"stemme: error: no usable microphone: {e}", file=sys.stderr)
        return 2
    loop = asyncio.get_running_loop()
    mic: asyncio.Queue[bytes] = asyncio.Queue(maxsize=200)

    def on_audio(indata, frames, t, status) -> None:  # noqa: ANN001 - PortAudio callback
        loop.call_soon_threadsafe(lambda b=bytes(indata): mic.full() or mic.put_nowait(b))

    speaker = sd.RawOutputStream(samplerate=OUTPUT_RATE, channels=1, dtype="int16")
    async with RealtimeClient(args.url, key=args.key, binary=args.binary) as client:
        await client.wait_for("session.created", timeout=30)
        await client.configure(language=args.language, voice=args.voice)
        print(json.dumps({"event": "listening", "hint": "speak; Ctrl-C to stop"}), flush=True)

        async def pump() -> None:
            while True:
                await client.send_audio(await mic.get())

        async def events() -> None:
            while True:
                ev = await client.events.get()
                if isinstance(ev, bytes):
                    speaker.write(ev)
                    continue
                t = ev.get("type")
                if t == "response.output_audio.delta":
                    speaker.write(base64.b64decode(ev["delta"]))
                elif t == "output_audio_buffer.cleared":
                    speaker.abort()
                    speaker.start()
                elif t == "conversation.item.input_audio_transcription.completed":
                    print(json.dumps({"event": "transcript", "text": ev["transcript"],
                                      "language": (ev.get("stemme") or {}).get("language")}, ensure_ascii=False),
                          flush=True)
                elif t == "response.done":
                    out = ev["response"].get("output") or [{}]
                    content = (out[0].get("content") or [{}])[0]
                    print(json.dumps({"event": "reply", "text": content.get("transcript", content.get("text")),
                                      "status": ev["response"]["status"],
                                      "latency_ms": (ev.get("stemme") or {}).get("latency")}, ensure_ascii=False),
                          flush=True)
                elif t == "stemme.client.closed":
                    return

        with sd.RawInputStream(samplerate=ASR_RATE, channels=1, dtype="int16", blocksize=ASR_RATE // 50,
                               callback=on_audio), speaker:
            pump_task = asyncio.create_task(pump())
            try:
                await events()
            finally:
                pump_task.cancel()
    return 0


def add_talk_parser(sub: Any) -> None:
    t = sub.add_parser("talk", help="device client: stream WAV files to a server and save the replies")
    t.add_argument("files", nargs="*", type=Path)
    t.add_argument("--url", default="ws://127.0.0.1:8000")
    t.add_argument("--key", default=None)
    t.add_argument("--out", default=None, help="directory for the reply WAV files")
    t.add_argument("--binary", action="store_true", help="binary audio frames (Stemme extension)")
    t.add_argument("--language", default=None, help="pin the language (default: detected)")
    t.add_argument("--voice", default=None)
    t.add_argument("--fast", action="store_true", help="send audio as fast as possible, not in real time")
    t.add_argument("-v", "--verbose", action="store_true", help="print every server event")

    def cmd(args: argparse.Namespace) -> int:
        try:
            return asyncio.run(_talk_main(args))
        except (OSError, ConnectionError) as e:
            print(f"stemme: error: cannot talk to {args.url}: {e}", file=sys.stderr)
            return 1

    t.set_defaults(func=cmd)
