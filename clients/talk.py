"""Device client: streams WAV files (or the microphone) to a Stemme server in real time, as a smart speaker
would, prints the events as JSON lines and saves each reply as a WAV file.

    stemme talk --url ws://127.0.0.1:8000 hello.wav --out replies/ [--binary] [--key K]

Behind a load balancer, a replica that drains (SIGTERM) tells its sessions (``stemme.draining``), refuses new
turns (``server_shutting_down``) and closes with 1001; a replica that is busy or stopping refuses new sessions
with 1013. ``ReconnectingClient`` then opens a new session on the same URL (the balancer picks a replica;
backoff 0.2 s doubling to 2 s, at most 10 tries) and sends the turn again; every turn ends completed or
failed with its reason. The conversation goes with it: the new session is given the recent turns (what the user
said and what was answered) as conversation items before the turn, so a follow-up still makes sense.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import json
import logging
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from stemme.voice.audio import ASR_RATE, OUTPUT_RATE, Audio, float_to_pcm16, read_wav, write_wav
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

logger = logging.getLogger(__name__)

CHUNK_MS = 20
SHUTTING_DOWN = "server_shutting_down"
"""The error code of a draining server: a new turn (or session) is refused; send it again elsewhere."""
RETRY_CLOSE_CODES = frozenset({1001, 1013})
"""Close codes after which a client reconnects: going away (drained), try again later (busy, stopping)."""
REFUSAL_CODES = frozenset({SHUTTING_DOWN, "server_busy", "server_not_ready"})
"""Error codes with which a server refuses a new session (then closes it with 1013)."""


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
    reason: str = ""
    """Why the turn did not complete (an error code, a close code, a timeout), empty when it did."""
    close_code: int | None = None
    attempts: int = 1
    """How many times the turn was sent (1 + the times a draining server refused or ended it)."""
    reconnects: int = 0
    """New sessions opened for this turn (a draining or refusing server, see ``ReconnectingClient``)."""
    refused: int = 0
    """Attempts refused by a draining server (``server_shutting_down``)."""
    drain_cancelled: int = 0
    """Attempts whose answer the server cancelled at the end of its drain grace period."""

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
        self.draining = False
        """The server said it drains (``stemme.draining``): the next turn belongs on a new session."""
        self.closed = False
        self.close_code: int | None = None

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
                ev = m if isinstance(m, bytes) else json.loads(m)
                if isinstance(ev, dict) and ev.get("type") == "stemme.draining":
                    self.draining = True
                self.events.put_nowait(ev)
        except Exception:  # noqa: BLE001 - the connection ended
            pass
        self.closed = True
        self.close_code = self.ws.close_code
        self.events.put_nowait({"type": "stemme.client.closed", "code": self.close_code})

    async def handshake(self, timeout: float = 30.0) -> dict[str, Any]:
        """Wait for ``session.created``; a refusal (an ``error`` event, then a close) raises ``Refused``."""
        deadline = time.monotonic() + timeout
        error: dict[str, Any] = {}
        while True:
            ev = await asyncio.wait_for(self.events.get(), max(0.01, deadline - time.monotonic()))
            if not isinstance(ev, dict):
                continue
            if ev.get("type") == "session.created":
                return ev
            if ev.get("type") == "error":
                error = ev.get("error") or {}
            elif ev.get("type") == "stemme.client.closed":
                code = error.get("code") or f"closed {ev.get('code')}"
                raise Refused(code, ev.get("code"), final=code == "invalid_api_key")

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
        return await self.wait_for_any((etype,), timeout)

    async def wait_for_any(self, etypes: tuple[str, ...], timeout: float = 30.0) -> dict[str, Any]:
        """The next event of one of ``etypes`` (others are skipped); ConnectionError if the connection closes."""
        deadline = time.monotonic() + timeout
        while True:
            ev = await asyncio.wait_for(self.events.get(), max(0.01, deadline - time.monotonic()))
            if isinstance(ev, dict) and ev.get("type") in (*etypes, "stemme.client.closed"):
                if ev["type"] not in etypes:
                    raise ConnectionError(f"connection closed while waiting for {', '.join(etypes)}")
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
                result.status, result.reason = "timeout", f"no response.done within {timeout:.0f} s"
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
                if details.get("reason") == SHUTTING_DOWN or (details.get("error") or {}).get("code") == SHUTTING_DOWN:
                    result.reason = SHUTTING_DOWN
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
                result.status, result.close_code = "closed", ev.get("code")
                result.reason = f"connection closed ({ev.get('code')})"
                return result
            elif t == "error" and ev["error"].get("code") == SHUTTING_DOWN:
                result.status, result.reason = "refused", SHUTTING_DOWN  # a draining server refused this turn
                return result
            elif t == "error" and not in_response and ev["error"].get("code") == "invalid_api_key":
                result.status, result.reason = "unauthorized", "invalid_api_key"
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
            try:
                result.last_voice_sent_at = await streamer
            except ConnectionClosed:
                pass  # the server closed the session: collect_turn reported it
        return result


class Refused(ConnectionError):
    """The server refused a session (busy, starting, draining: an error event and a close with 1013), or the
    connection could not be made."""

    def __init__(self, reason: str, close_code: int | None = None, *, final: bool = False) -> None:
        super().__init__(reason)
        self.reason = reason
        self.close_code = close_code
        self.final = final
        """Trying again cannot help (a wrong key, an origin or path the server refuses)."""


@dataclass(frozen=True)
class Backoff:
    """How a client reconnects: the same URL (the balancer picks a replica), waiting ``first`` seconds before
    the first try, doubling up to ``most``, at most ``tries`` tries per reconnection."""

    first: float = 0.2
    most: float = 2.0
    tries: int = 10

    def delays(self) -> list[float]:
        return [min(self.most, self.first * 2 ** i) for i in range(self.tries)]


def retry_reason(r: TurnResult) -> str | None:
    """Why a turn is to be sent again on a new session, or None: a draining server refused it
    (``server_shutting_down``), cancelled its answer at the end of its grace period, or closed the session
    with 1001 or 1013 before the answer."""
    if r.status == "refused":
        return SHUTTING_DOWN
    if r.status in ("cancelled", "failed") and r.reason == SHUTTING_DOWN:
        return SHUTTING_DOWN
    if r.status == "closed" and r.close_code in RETRY_CLOSE_CODES:
        return f"closed {r.close_code}"
    return None


Setup = Callable[[RealtimeClient], Awaitable[Any]]


class ReconnectingClient:
    """Spoken turns that survive a draining or refusing server. Each turn runs on the current session; when the
    server refuses it, cancels it for shutdown or closes with 1001/1013, a new session is opened on the same URL
    (``Backoff``) and the turn is sent again. A session that was told ``stemme.draining`` is left after its
    turn: the next turn starts on a new one, which is first given the conversation so far (the last
    ``keep_turns`` completed turns, as user and assistant items). Counters: ``sessions`` opened, ``refusals`` of
    sessions, ``reconnects``, ``told_draining`` (sessions the server said it drains), ``replayed`` items."""

    def __init__(self, url: str, *, key: str | None = None, binary: bool = False, backoff: Backoff | None = None,
                 setup: Setup | None = None, keep_turns: int = 8) -> None:
        self.url, self.key, self.binary = url, key, binary
        self.keep_turns = keep_turns
        self.history: list[tuple[str, str]] = []
        """(role, text) of the completed turns, oldest first: what a new session is told."""
        self.replayed = 0
        self.backoff = backoff or Backoff()
        self.setup = setup
        """Run on every new session after ``session.created`` (e.g. ``session.update``)."""
        self.client: RealtimeClient | None = None
        self.gone: str | None = None
        """Why the session ended for good (a close that is not a retry, an unauthorised key)."""
        self._leave = False
        """The current session refused or cancelled a turn for shutdown: the next attempt needs a new one."""
        self.sessions = self.refusals = self.reconnects = self.told_draining = 0

    def remember(self, r: TurnResult) -> None:
        """Keep a completed turn for the next session (the last ``keep_turns``)."""
        if r.status == "completed" and r.transcript.strip() and r.reply.strip():
            self.history += [("user", r.transcript.strip()), ("assistant", r.reply.strip())]
            del self.history[:-2 * self.keep_turns]

    async def _replay(self, c: RealtimeClient) -> None:
        """Tell a new session the conversation so far, one item at a time (each is acknowledged)."""
        for role, text in self.history:
            kind = "input_text" if role == "user" else "output_text"
            await c.send({"type": "conversation.item.create",
                          "item": {"type": "message", "role": role, "content": [{"type": kind, "text": text}]}})
            ev = await c.wait_for_any(("conversation.item.added", "error"), timeout=30)
            if ev["type"] == "error":
                raise Refused(str((ev.get("error") or {}).get("code") or "replay refused"))
            self.replayed += 1

    async def __aenter__(self) -> ReconnectingClient:
        await self._open(first=True)
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._drop()

    async def reconnect(self) -> None:
        """Leave the current session and open a new one, told the conversation so far (``Refused`` when none
        opens within the backoff's tries)."""
        await self._drop()
        await self._open()
        self.reconnects += 1

    async def _drop(self) -> None:
        if self.client is not None:
            self.told_draining += self.client.draining
            await self.client.__aexit__()
            self.client = None

    async def _try(self) -> RealtimeClient:
        c = RealtimeClient(self.url, key=self.key, binary=self.binary)
        try:
            await c.__aenter__()
        except InvalidStatus as e:
            code = e.response.status_code
            raise Refused(f"HTTP {code}", final=code < 500 and code != 429) from None
        try:
            await c.handshake()
            if self.setup is not None:
                await self.setup(c)
            await self._replay(c)
        except BaseException:
            await c.__aexit__()
            raise
        return c

    async def _open(self, *, first: bool = False) -> None:
        """A new session, with backoff. The first connection fails at once when nothing listens (a wrong URL);
        later ones (a replica went away, the balancer has not noticed yet) keep trying."""
        last = ""
        for i, delay in enumerate(self.backoff.delays()):
            if not (first and i == 0):
                await asyncio.sleep(delay)
            try:
                self.client = await self._try()
                self.sessions += 1
                self._leave = False
                return
            except Refused as e:
                self.refusals += 1
                last = e.reason
                if e.final:
                    raise
            except (OSError, asyncio.TimeoutError, ConnectionError) as e:
                if first:
                    raise
                last = f"{type(e).__name__}: {e}"
            logger.info("no session on %s (%s); trying again", self.url, last)
        raise Refused(f"no session after {self.backoff.tries} tries: {last}")

    async def talk(self, samples: np.ndarray, *, realtime: bool = True, timeout: float = 120.0,
                   on_event: Any = None) -> TurnResult:
        """One turn, sent again on a new session as often as a draining server asks (at most ``tries``)."""
        reconnects = refused = drain_cancelled = splits = 0
        for attempt in range(1, self.backoff.tries + 1):
            if self.gone:
                return TurnResult(status="failed", reason=self.gone, attempts=attempt - 1, reconnects=reconnects)
            if self.client is None or self._leave or self.client.draining or self.client.closed:
                try:
                    await self.reconnect()
                except Refused as e:
                    return TurnResult(status="failed", reason=e.reason, attempts=attempt - 1, reconnects=reconnects,
                                      refused=refused, drain_cancelled=drain_cancelled)
                reconnects += 1
            c = self.client
            assert c is not None
            r = await c.talk(samples, realtime=realtime, timeout=timeout, on_event=on_event)
            r.attempts, r.reconnects = attempt, reconnects
            refused += r.status == "refused"
            drain_cancelled += r.status in ("cancelled", "failed") and r.reason == SHUTTING_DOWN
            splits += r.splits  # answers cancelled because the speaker went on, in every attempt
            r.refused, r.drain_cancelled, r.splits = refused, drain_cancelled, splits
            why = retry_reason(r)
            if why is None:
                self.remember(r)
                if r.status in ("closed", "unauthorized"):
                    self.gone = r.reason or r.status
                return r
            logger.info("turn sent again on a new session (%s)", why)
            self._leave = True  # this session will not take the turn
        r.status, r.reason = "failed", f"still refused after {self.backoff.tries} attempts: {r.reason}"
        return r


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

    async def setup(c: RealtimeClient) -> None:
        await c.configure(language=args.language, voice=args.voice)

    backoff = Backoff(tries=args.reconnect_tries)
    async with ReconnectingClient(args.url, key=args.key, binary=args.binary, setup=setup, backoff=backoff) as client:
        code = 0
        for i, path in enumerate(args.files):
            audio = read_wav(path)
            r = await client.talk(audio.samples, realtime=not args.fast, on_event=show)
            row: dict[str, Any] = {"file": str(path), "transcript": r.transcript, "language": r.language,
                                   "reply": r.reply, "status": r.status, "latency_ms": r.latency,
                                   "reply_seconds": round(r.audio_seconds, 3), "reconnects": r.reconnects,
                                   "attempts": r.attempts}
            if r.reason:
                row["reason"] = r.reason
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


class Speaker(Protocol):
    """Where a live conversation's answers play: 24 kHz PCM16 in, dropped at once on ``clear`` (barge-in)."""

    def write(self, pcm16: bytes) -> None: ...

    def clear(self) -> None: ...


def _say(out: dict[str, Any]) -> None:
    print(json.dumps(out, ensure_ascii=False), flush=True)


async def live(rc: ReconnectingClient, mic: asyncio.Queue[bytes], speaker: Speaker,
               say: Callable[[dict[str, Any]], None] = _say) -> int:
    """A live conversation: microphone blocks (16 kHz PCM16) to the session, its answers to ``speaker``. When the
    session ends for a drain or a restart (1001, 1013), a new one is opened on the same URL and told the
    conversation so far (``ReconnectingClient``); the microphone's blocks wait in ``mic`` meanwhile. Returns
    when the server closes for another reason (1 when that is an error) or no new session can be opened."""
    while True:
        c = rc.client
        assert c is not None
        code = await _live_session(c, rc, mic, speaker, say)
        if code not in RETRY_CLOSE_CODES:
            say({"event": "closed", "code": code})
            return 0 if code == 1000 else 1
        try:
            await rc.reconnect()
        except Refused as e:
            say({"event": "gone", "reason": e.reason})
            return 1
        say({"event": "reconnected", "sessions": rc.sessions, "replayed": rc.replayed})


async def _live_session(c: RealtimeClient, rc: ReconnectingClient, mic: asyncio.Queue[bytes], speaker: Speaker,
                        say: Callable[[dict[str, Any]], None]) -> int | None:
    """One session of a live conversation, until it closes (its close code), or until it is draining and no
    answer is in progress (1001: the next words go to a new session rather than be refused)."""

    async def pump() -> None:
        with contextlib.suppress(ConnectionClosed):
            while not c.closed:
                await c.send_audio(await mic.get())

    pump_task = asyncio.create_task(pump())
    heard, answering = "", False
    try:
        while True:
            if c.draining and not answering:
                return 1001
            ev = await c.events.get()
            if isinstance(ev, bytes):
                speaker.write(ev)
                continue
            t = ev.get("type")
            if t == "response.output_audio.delta":
                speaker.write(base64.b64decode(ev["delta"]))
            elif t == "output_audio_buffer.cleared":
                speaker.clear()
            elif t == "conversation.item.input_audio_transcription.completed":
                heard = ev["transcript"]
                say({"event": "transcript", "text": heard, "language": (ev.get("stemme") or {}).get("language")})
            elif t == "response.created":
                answering = True
            elif t == "response.done":
                answering = False
                _answered(ev, heard, rc, say)
            elif t == "stemme.draining":
                say({"event": "draining", "grace_ms": ev.get("grace_ms")})
            elif t == "stemme.client.closed":
                return c.close_code
    finally:
        pump_task.cancel()


def _answered(ev: dict[str, Any], heard: str, rc: ReconnectingClient, say: Callable[[dict[str, Any]], None]) -> None:
    reply, status = _reply_text(ev), ev["response"]["status"]
    rc.remember(TurnResult(status=status, transcript=heard, reply=reply or ""))
    say({"event": "reply", "text": reply, "status": status, "latency_ms": (ev.get("stemme") or {}).get("latency")})


def _reply_text(ev: dict[str, Any]) -> str | None:
    out = ev["response"].get("output") or [{}]
    content = (out[0].get("content") or [{}])[0]
    return content.get("transcript", content.get("text"))


class _SoundDeviceSpeaker:
    def __init__(self, stream: Any) -> None:
        self.stream = stream

    def write(self, pcm16: bytes) -> None:
        self.stream.write(pcm16)

    def clear(self) -> None:
        self.stream.abort()
        self.stream.start()


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
    mic: asyncio.Queue[bytes] = asyncio.Queue(maxsize=200)  # 4 s: what is said while a new session opens

    def put(block: bytes) -> None:
        if not mic.full():
            mic.put_nowait(block)

    def on_audio(indata, frames, t, status) -> None:  # noqa: ANN001 - PortAudio callback
        loop.call_soon_threadsafe(put, bytes(indata))

    async def setup(c: RealtimeClient) -> None:
        await c.configure(language=args.language, voice=args.voice)

    speaker = sd.RawOutputStream(samplerate=OUTPUT_RATE, channels=1, dtype="int16")
    backoff = Backoff(tries=args.reconnect_tries)
    async with ReconnectingClient(args.url, key=args.key, binary=args.binary, setup=setup, backoff=backoff) as rc:
        _say({"event": "listening", "hint": "speak; Ctrl-C to stop"})
        with sd.RawInputStream(samplerate=ASR_RATE, channels=1, dtype="int16", blocksize=ASR_RATE // 50,
                               callback=on_audio), speaker:
            return await live(rc, mic, _SoundDeviceSpeaker(speaker))


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
    t.add_argument("--reconnect-tries", type=int, default=Backoff.tries,
                   help="tries to open a new session when the server drains or restarts (default %(default)s)")

    def cmd(args: argparse.Namespace) -> int:
        try:
            return asyncio.run(_talk_main(args))
        except (OSError, ConnectionError) as e:
            print(f"stemme: error: cannot talk to {args.url}: {e}", file=sys.stderr)
            return 1

    t.set_defaults(func=cmd)
