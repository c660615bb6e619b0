"""Wyoming, Home Assistant's protocol for voice services, served beside the WebSocket server and sharing its
engines: speech recognition (``transcribe`` + audio → ``transcript``, with transcript-start/-chunk/-stop),
speech synthesis (``synthesize`` and the streaming ``synthesize-start/-chunk/-stop`` → audio, sentence by
sentence) and the assistant itself as a conversation agent (``transcript`` → ``handled``).

The ``wyoming`` package gives the event types and writes the frames. Frames are read here, by ``FrameReader``
(sans-I/O), because the package's reader ends the connection on any malformed frame and has no size limits:
bad input here gets an ``error`` event and the connection and the server stay up, with the WebSocket's limits.

Wyoming has no authentication and no encryption: listen on a trusted network only. Zeroconf (mDNS) announces
the service on the LAN so that Home Assistant discovers it; it is off unless the operator asks for it
(``--wyoming-zeroconf``), since Stemme makes no network traffic of its own by default.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import json
import logging
import os
import re
import secrets
import threading
import time
import unicodedata
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlparse

import numpy as np
from stemme.voice import languages
from stemme.voice.asr import AsrOptions
from stemme.voice.audio import ASR_RATE, OUTPUT_RATE, StreamResampler, pcm16_to_float
from stemme.voice.llm import Conversation
from stemme.voice.pipeline import (
    ClauseChunker,
    Stages,
    TextPiece,
    TurnMarks,
    clauses_of,
    pushed,
    respond,
    stages_for,
    transcribe,
)
from stemme.voice.tts import Voice, clean_for_speech, split_clauses
from wyoming.asr import Transcript, TranscriptChunk, TranscriptStart, TranscriptStop
from wyoming.audio import AudioChunk, AudioStart, AudioStop
from wyoming.error import Error
from wyoming.event import Event, async_write_event
from wyoming.handle import Handled, NotHandled
from wyoming.info import (
    AsrModel,
    AsrProgram,
    Attribution,
    HandleModel,
    HandleProgram,
    Info,
    TtsProgram,
    TtsVoice,
)
from wyoming.ping import Pong
from wyoming.tts import SynthesizeStopped

from stemme.engines import Engines
from stemme.errors import ConfigError, StemmeError

logger = logging.getLogger(__name__)

MAX_HEADER_BYTES = 1 << 20
"""Bytes of one JSON header line, and of one event's extra JSON data: the WebSocket's largest JSON message."""
MAX_PAYLOAD_BYTES = 1 << 19
"""Bytes of one event's binary payload: the WebSocket's largest binary frame (16 s of 16 kHz PCM16)."""
MAX_SKIP_BYTES = 64 << 20
"""An event announcing more bytes than the limits, but no more than this, is skipped (answered with an error,
the connection stays in step); a larger or malformed length makes the reader look for the next header line."""
MAX_TEXT_CHARS = 16_000
"""Characters of a text to speak or to answer (the WebSocket's limit of an item's text)."""
MAX_AUDIO_SECONDS = 60.0
"""Seconds of audio in one transcription (the WebSocket's input buffer); more is dropped with an error."""
MAX_CONNECTIONS = 32
"""Connections at once (the WebSocket's session limit); one more gets ``server_busy`` and is closed."""
IDLE_TIMEOUT_S = 300.0
"""A connection that sends nothing for this long, while nothing is being done for it, is closed."""
WRITE_TIMEOUT_S = 30.0
"""A client that does not read what it is sent for this long is disconnected (memory stays bounded)."""
AUDIO_CHUNK_SAMPLES = 2048
"""Samples per outgoing audio-chunk event (85 ms at 24 kHz)."""
LOG_CONTENT = os.environ.get("STEMME_LOG_CONTENT", "") == "1"
"""Privacy: transcripts and texts appear in logs only when the operator sets STEMME_LOG_CONTENT=1."""


class WyomingInputError(StemmeError):
    """Input the server cannot honour: becomes an ``error`` event; the connection goes on."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message

    def event(self) -> Event:
        return Error(text=self.message, code=self.code).event()


# --------------------------------------------------------------------------------------------------- framing


@dataclass
class _Pending:
    """A header read, waiting for its data and payload bytes."""

    header: dict[str, Any]
    data_length: int
    payload_length: int


class FrameReader:
    """Wyoming frames from bytes, sans-I/O: ``feed(data)`` returns the events (and input errors) completed.
    A frame is a JSON header line, then ``data_length`` bytes of JSON merged into its data, then
    ``payload_length`` bytes of payload."""

    def __init__(self, *, max_header: int = MAX_HEADER_BYTES, max_payload: int = MAX_PAYLOAD_BYTES,
                 max_skip: int = MAX_SKIP_BYTES) -> None:
        self.max_header = max_header
        self.max_payload = max_payload
        self.max_skip = max_skip
        self._buf = bytearray()
        self._pending: _Pending | None = None
        self._skip = 0
        self._drop_line = False
        self._resync = False
        """After a header that could not be read, lines that are not headers are dropped without a word."""

    def feed(self, data: bytes) -> list[Event | WyomingInputError]:
        self._buf += data
        out: list[Event | WyomingInputError] = []
        while (item := self._next()) is not None:
            if item is not _AGAIN:
                out.append(item)  # type: ignore[arg-type]
        return out

    def _next(self) -> object | None:
        """One event or error, _AGAIN when something was consumed without one, None when more bytes are needed."""
        if self._skip:
            n = min(self._skip, len(self._buf))
            del self._buf[:n]
            self._skip -= n
            return _AGAIN if n and not self._skip else None
        if self._pending is not None:
            return self._complete(self._pending)
        return self._line()

    def _line(self) -> object | None:
        end = self._buf.find(b"\n")
        if end < 0:
            if len(self._buf) <= self.max_header:
                return None
            self._buf.clear()
            self._drop_line = True
            return self._fail("message_too_large", f"a header line longer than {self.max_header} bytes")
        line = bytes(self._buf[:end])
        del self._buf[: end + 1]
        if self._drop_line:
            self._drop_line = False
            return _AGAIN
        if not line.strip():
            return _AGAIN
        return self._header(line)

    def _fail(self, code: str, message: str, *, resync: bool = True) -> object:
        quiet = self._resync and code in ("invalid_json", "invalid_event")  # more of the same garbage
        self._resync = resync
        return _AGAIN if quiet else WyomingInputError(code, message)

    def _header(self, line: bytes) -> object:
        try:
            header = json.loads(line)
        except (ValueError, RecursionError):
            return self._fail("invalid_json", "the header line is not JSON")
        if not isinstance(header, dict) or not isinstance(header.get("type"), str) or not header["type"]:
            return self._fail("invalid_event", "a header must be a JSON object with a string 'type'")
        if not isinstance(header.get("data", {}), dict):
            return self._fail("invalid_event", "'data' must be a JSON object")
        lengths = [header.get(k) or 0 for k in ("data_length", "payload_length")]
        if any(isinstance(n, bool) or not isinstance(n, int) or n < 0 for n in lengths):
            return self._fail("invalid_length", "data_length and payload_length must be non-negative integers")
        return self._sized(header, *lengths)

    def _sized(self, header: dict[str, Any], data_length: int, payload_length: int) -> object:
        if data_length > self.max_header or payload_length > self.max_payload:
            total = data_length + payload_length
            message = (f"an event of {total} bytes exceeds the limits ({self.max_header} bytes of data, "
                       f"{self.max_payload} of payload)")
            if total > self.max_skip:
                return self._fail("message_too_large", message)
            self._skip = total
            return self._fail("message_too_large", message, resync=False)
        self._resync = False
        self._pending = _Pending(header, data_length, payload_length)
        return _AGAIN

    def _complete(self, p: _Pending) -> object | None:
        if len(self._buf) < p.data_length + p.payload_length:
            return None
        self._pending = None
        data_bytes = bytes(self._buf[: p.data_length])
        payload = bytes(self._buf[p.data_length: p.data_length + p.payload_length])
        del self._buf[: p.data_length + p.payload_length]
        data = dict(p.header.get("data") or {})
        if data_bytes:
            try:
                extra = json.loads(data_bytes)
            except (ValueError, RecursionError):
                return WyomingInputError("invalid_json", f"the data of a {p.header['type'][:64]!r} event is not JSON")
            if not isinstance(extra, dict):
                return WyomingInputError("invalid_event", "an event's data must be a JSON object")
            data.update(extra)
        return Event(type=p.header["type"], data=data, payload=payload or None)


_AGAIN = object()


# ------------------------------------------------------------------------------------------- field checks


def _text(data: dict[str, Any], key: str = "text", *, required: bool = True, limit: int = MAX_TEXT_CHARS) -> str:
    value = data.get(key)
    if value is None and not required:
        return ""
    if not isinstance(value, str):
        raise WyomingInputError("invalid_event", f"'{key}' must be a string")
    if len(value) > limit:
        raise WyomingInputError("text_too_long", f"'{key}' is limited to {limit} characters")
    return value


def _language(data: dict[str, Any]) -> str | None:
    value = _text(data, "language", required=False, limit=32)
    return languages.normalise(value) if value else None


def _context(data: dict[str, Any]) -> dict[str, Any]:
    value = data.get("context")
    return value if isinstance(value, dict) else {}


@dataclass(frozen=True)
class AudioFormat:
    rate: int
    """Hertz."""
    width: int
    """Bytes per sample."""
    channels: int

    @classmethod
    def of(cls, data: dict[str, Any]) -> AudioFormat:
        rate, width, channels = (data.get(k) for k in ("rate", "width", "channels"))
        ints = all(isinstance(v, int) and not isinstance(v, bool) for v in (rate, width, channels))
        if not ints or width != 2 or channels not in (1, 2) or not 8000 <= rate <= 48000:  # type: ignore[operator]
            raise WyomingInputError("invalid_audio_format", "audio must be PCM16 (width 2), mono or stereo, "
                                                            "8000-48000 Hz")
        return cls(rate, width, channels)  # type: ignore[arg-type]

    def samples(self, payload: bytes) -> np.ndarray:
        """Mono float32 samples of a payload in this format."""
        if len(payload) % (self.width * self.channels):
            raise WyomingInputError("invalid_audio_format", "an audio chunk must hold whole frames "
                                                            f"({self.width * self.channels} bytes each)")
        x = pcm16_to_float(payload)
        return x.reshape(-1, self.channels).mean(axis=1) if self.channels > 1 else x


# ------------------------------------------------------------------------------------------ shared state


class TextLanguages:
    """The language of texts this server heard or wrote recently, so that a reply follows the language of the
    text it answers, and a reply is spoken by a voice of its language. Only keyed hashes of the texts are kept
    (the key is random and lives in memory), never the texts; entries expire."""

    def __init__(self, size: int = 512, ttl_s: float = 600.0) -> None:
        self._key = secrets.token_bytes(32)
        self._items: OrderedDict[bytes, tuple[str, float]] = OrderedDict()
        self.size = size
        self.ttl_s = ttl_s

    def _hash(self, text: str) -> bytes:
        norm = " ".join(re.sub(r"[^\w\s]", " ", unicodedata.normalize("NFKC", text).casefold()).split())
        return hashlib.blake2b(norm.encode(), key=self._key, digest_size=16).digest()

    def remember(self, text: str, language: str) -> None:
        for piece in {text, *split_clauses(text), *clauses_of(text)}:
            h = self._hash(piece)
            self._items[h] = (language, time.monotonic())
            self._items.move_to_end(h)
        while len(self._items) > self.size:
            self._items.popitem(last=False)

    def get(self, text: str) -> str | None:
        found = self._items.get(self._hash(text))
        if found is None or time.monotonic() - found[1] > self.ttl_s:
            return None
        return found[0]


@dataclass
class _Chat:
    conversation: Conversation
    engine_key: str
    """What the language model's per-conversation cache is keyed by (never the client's id)."""
    used: float = field(default_factory=time.monotonic)


class Conversations:
    """Home Assistant's conversations (by its ``conversation_id``), so that a follow-up question has its
    context; kept in memory only, a few minutes, a bounded number."""

    def __init__(self, size: int = 64, ttl_s: float = 300.0) -> None:
        self._items: OrderedDict[str, _Chat] = OrderedDict()
        self.size = size
        self.ttl_s = ttl_s

    def get(self, conversation_id: str | None) -> _Chat:
        now = time.monotonic()
        for key in [k for k, c in self._items.items() if now - c.used > self.ttl_s]:
            del self._items[key]
        chat = self._items.get(conversation_id) if conversation_id else None
        if chat is None:
            chat = _Chat(Conversation(), "wyoming-" + secrets.token_hex(8))
            if conversation_id:
                self._items[conversation_id] = chat
        chat.used = now
        if conversation_id:
            self._items.move_to_end(conversation_id)
        while len(self._items) > self.size:
            self._items.popitem(last=False)
        return chat


def _attribution() -> Attribution:
    return Attribution(name="Stemme", url="https://github.com/stemme")


def build_info(engines: Engines) -> Info:
    """What this server offers: every language Whisper hears, every voice, the assistant. Loads the voice
    registry: call it from a worker thread."""
    cfg = engines.config
    heard = list(cfg.languages or languages.WHISPER)
    asr_name = os.path.basename(cfg.asr_model.rstrip("/")) if cfg.asr_model else "whisper-base"
    asr = AsrProgram(name="stemme-asr", attribution=_attribution(), installed=True, version=None,
                     description="Stemme speech recognition (faster-whisper): every language Whisper knows",
                     models=[AsrModel(name=asr_name, attribution=_attribution(), installed=True, version=None,
                                      description=f"Whisper ({asr_name}), language detected", languages=heard)],
                     supports_transcript_streaming=True)
    registry = engines.tts.registry
    voices = [TtsVoice(name=v.name, attribution=_attribution(), installed=registry.available(v), version=None,
                       description=v.description or v.name, languages=[v.language]) for v in registry.voices]
    tts = TtsProgram(name="stemme-tts", attribution=_attribution(), installed=True, version=None,
                     description="Stemme speech synthesis (Piper, Kokoro, Pico, espeak-ng), sentence by sentence",
                     voices=voices, supports_synthesize_streaming=True)
    llm_name = cfg.llm_model or cfg.llm_pack
    handle = HandleProgram(name="stemme-assistant", attribution=_attribution(), installed=True, version=None,
                           description="Stemme assistant: answers in the language of the text",
                           models=[HandleModel(name=llm_name, attribution=_attribution(), installed=True,
                                               version=None, description=f"language model {llm_name}",
                                               languages=heard)])
    return Info(asr=[asr], tts=[tts], handle=[handle])


@dataclass
class WyomingOptions:
    """How the Wyoming server behaves (``add_wyoming_arguments`` / ``wyoming_options``)."""

    zeroconf: str | None = None
    """Announce the service on the LAN with mDNS under this name ("" = the host's MAC); None: no announcement."""
    asr_language: str = "detect"
    """detect: Whisper detects the language, leaning toward the one the client names when unsure; client: the
    language the client names is forced (Home Assistant names its pipeline's language)."""
    max_connections: int = MAX_CONNECTIONS
    idle_timeout_s: float = IDLE_TIMEOUT_S


@dataclass
class Service:
    """What the connections of one Wyoming server share."""

    engines: Engines
    stages: Stages
    options: WyomingOptions
    texts: TextLanguages = field(default_factory=TextLanguages)
    chats: Conversations = field(default_factory=Conversations)
    ready: asyncio.Future[None] | None = None
    _info: Info | None = None

    async def info(self) -> Info:
        if self._info is None:
            self._info = await asyncio.to_thread(build_info, self.engines)
        return self._info

    async def wait_ready(self) -> None:
        """Until the models are loaded (requests wait for them rather than fail)."""
        if self.ready is None:
            return
        try:
            await asyncio.shield(self.ready)
        except StemmeError as e:
            raise WyomingInputError("not_ready", f"the models failed to load: {e}") from None
        except Exception:  # noqa: BLE001 - logged where it happened (_load)
            raise WyomingInputError("not_ready", "the models failed to load; see the server's log") from None


# ------------------------------------------------------------------------------------------- connections


@dataclass
class _Utterance:
    format: AudioFormat
    resampler: StreamResampler
    parts: list[np.ndarray] = field(default_factory=list)
    seconds: float = 0.0
    full: bool = False


@dataclass
class _TextStream:
    voice: dict[str, Any]
    """The voice asked for (name, language, speaker)."""
    chunker: ClauseChunker = field(default_factory=ClauseChunker)
    """Cuts the text into clauses as it comes, the first one short (a few words), as for the WebSocket."""
    chars: int = 0
    started: bool = False
    """audio-start was sent."""
    spoken_by: Voice | None = None
    """The voice chosen at the first clause, kept for the whole stream."""


class Connection:
    """One client: events in order, one handler per event type."""

    def __init__(self, service: Service, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.service = service
        self.reader = reader
        self.writer = writer
        self.id = secrets.token_hex(4)
        self.frames = FrameReader()
        self.transcribe_language: str | None = None
        self.utterance: _Utterance | None = None
        self.stream: _TextStream | None = None
        self.handlers: dict[str, Callable[[Event], Awaitable[None]]] = {
            "describe": self.on_describe, "ping": self.on_ping, "select-program": self.on_select_program,
            "transcribe": self.on_transcribe, "audio-start": self.on_audio_start,
            "audio-chunk": self.on_audio_chunk, "audio-stop": self.on_audio_stop,
            "synthesize": self.on_synthesize, "synthesize-start": self.on_synthesize_start,
            "synthesize-chunk": self.on_synthesize_chunk, "synthesize-stop": self.on_synthesize_stop,
            "transcript": self.on_transcript,
        }

    async def send(self, event: Event) -> None:
        await asyncio.wait_for(async_write_event(event, self.writer), WRITE_TIMEOUT_S)

    async def run(self) -> None:
        try:
            while data := await asyncio.wait_for(self.reader.read(1 << 16), self.service.options.idle_timeout_s):
                for item in self.frames.feed(data):
                    await self.dispatch(item)
        except (TimeoutError, asyncio.TimeoutError):
            logger.info("wyoming=%s closed: idle or not reading", self.id)
        except (ConnectionError, asyncio.IncompleteReadError):
            logger.info("wyoming=%s disconnected", self.id)
        finally:
            self.writer.close()
            with contextlib.suppress(Exception):
                await self.writer.wait_closed()

    async def dispatch(self, item: Event | WyomingInputError) -> None:
        try:
            if isinstance(item, WyomingInputError):
                raise item
            handler = self.handlers.get(item.type)
            if handler is None:
                raise WyomingInputError("unknown_event", f"unknown event type {item.type[:64]!r}")
            await handler(item)
        except WyomingInputError as e:
            logger.info("wyoming=%s input error %s", self.id, e.code)
            await self.send(e.event())
        except StemmeError as e:
            logger.warning("wyoming=%s failed: %s", self.id, e.code)
            await self.send(Error(text=str(e), code=e.code).event())
        except (ConnectionError, asyncio.CancelledError, TimeoutError, asyncio.TimeoutError):
            raise
        except Exception as e:  # noqa: BLE001 - reported to the client; the connection and the server go on
            logger.exception("wyoming=%s event %s failed", self.id, item.type if isinstance(item, Event) else "")
            await self.send(Error(text=f"the server failed ({type(e).__name__})", code="internal_error").event())

    # ------------------------------------------------------------------------------------------- info

    async def on_describe(self, event: Event) -> None:
        await self.send((await self.service.info()).event())

    async def on_ping(self, event: Event) -> None:
        await self.send(Pong(text=event.data.get("text") if isinstance(event.data.get("text"), str) else None)
                        .event())

    async def on_select_program(self, event: Event) -> None:
        name = _text(event.data, "name", limit=256)
        info = await self.service.info()
        if name not in {p.name for p in (*info.asr, *info.tts, *info.handle)}:
            raise WyomingInputError("unknown_program", f"no program named {name!r}")

    # -------------------------------------------------------------------------------------------- asr

    async def on_transcribe(self, event: Event) -> None:
        self.transcribe_language = _language(event.data)

    async def on_audio_start(self, event: Event) -> None:
        fmt = AudioFormat.of(event.data)
        self.utterance = _Utterance(fmt, StreamResampler(fmt.rate, ASR_RATE))

    async def on_audio_chunk(self, event: Event) -> None:
        u = self.utterance
        if u is None:
            raise WyomingInputError("audio_not_started", "audio-chunk before audio-start")
        fmt = AudioFormat.of(event.data)
        if fmt != u.format:
            raise WyomingInputError("invalid_audio_format", "an audio chunk's format differs from audio-start's")
        samples = fmt.samples(event.payload or b"")
        if u.full:
            return
        if u.seconds + len(samples) / fmt.rate > MAX_AUDIO_SECONDS:
            u.full = True
            raise WyomingInputError("audio_too_long", f"audio is limited to {MAX_AUDIO_SECONDS:.0f} s; the rest "
                                                      "of this utterance is dropped")
        u.seconds += len(samples) / fmt.rate
        u.parts.append(u.resampler(samples))

    async def on_audio_stop(self, event: Event) -> None:
        u, self.utterance = self.utterance, None
        if u is None:
            raise WyomingInputError("audio_not_started", "audio-stop before audio-start")
        audio = np.concatenate([*u.parts, u.resampler(np.zeros(0, np.float32), last=True)])
        hint, self.transcribe_language = self.transcribe_language, None
        if len(audio) < ASR_RATE // 10:  # under 0.1 s: nothing to hear; an empty transcript, as for silence
            for e in (TranscriptStart(language=hint), Transcript(text="", language=hint), TranscriptStop()):
                await self.send(e.event())
            return
        await self.service.wait_ready()
        t = await transcribe(self.service.engines, self.service.stages, audio, self._asr_options(hint))
        text = t.text.strip()
        if text:
            self.service.texts.remember(text, t.language)
        if LOG_CONTENT:
            logger.info("wyoming=%s transcript (%s): %s", self.id, t.language, text)
        await self.send(TranscriptStart(language=t.language).event())
        for _, _, piece in t.segments or [(0.0, 0.0, text)]:
            if piece.strip():
                await self.send(TranscriptChunk(text=piece).event())
        await self.send(Transcript(text=text, language=t.language).event())
        await self.send(TranscriptStop().event())

    def _asr_options(self, hint: str | None) -> AsrOptions:
        cfg = self.service.engines.config
        allowed = cfg.languages or None
        if hint and self.service.options.asr_language == "client":
            return AsrOptions(language=hint, beam_size=cfg.asr_beam_size)
        if hint:
            return AsrOptions(languages=allowed, prefer=(hint, *languages.SUPPORTED), beam_size=cfg.asr_beam_size)
        return AsrOptions(languages=allowed, beam_size=cfg.asr_beam_size)

    # -------------------------------------------------------------------------------------------- tts

    async def on_synthesize(self, event: Event) -> None:
        if self.stream is not None:
            return  # sent beside a stream for older servers: the stream speaks this text already
        text = _text(event.data)
        await self.service.wait_ready()
        voice = self._voice(_voice_data(event.data), text)
        await self._speak(clauses_of(text), voice, start=True)
        await self.send(AudioStop().event())

    async def on_synthesize_start(self, event: Event) -> None:
        self.stream = _TextStream(_voice_data(event.data))

    async def on_synthesize_chunk(self, event: Event) -> None:
        s = self.stream
        if s is None:
            raise WyomingInputError("synthesis_not_started", "synthesize-chunk before synthesize-start")
        text = _text(event.data)
        s.chars += len(text)
        if s.chars > MAX_TEXT_CHARS:
            raise WyomingInputError("text_too_long", f"a streamed text is limited to {MAX_TEXT_CHARS} characters; "
                                                     "the rest is not spoken")
        await self._speak_stream(s, pushed(s.chunker, text))

    async def on_synthesize_stop(self, event: Event) -> None:
        s, self.stream = self.stream, None
        if s is None:
            raise WyomingInputError("synthesis_not_started", "synthesize-stop before synthesize-start")
        await self._speak_stream(s, s.chunker.flush())
        if s.started:
            await self.send(AudioStop().event())
        await self.send(SynthesizeStopped().event())

    async def _speak_stream(self, s: _TextStream, clauses: list[str]) -> None:
        clauses = [c for c in clauses if clean_for_speech(c)]
        if not clauses:
            return
        await self.service.wait_ready()
        if s.spoken_by is None:
            s.spoken_by = self._voice(s.voice, clauses[0])
        await self._speak(clauses, s.spoken_by, start=not s.started)
        s.started = True

    def _voice(self, wanted: dict[str, Any], text: str) -> Voice:
        """The voice named, unless the text is known to be in another language (a reply of this server): then
        the best voice of the text's language; without a name, the language asked for or the text's."""
        registry = self.service.engines.tts.registry
        known = self.service.texts.get(text)
        name, language = wanted.get("name"), wanted.get("language")
        if name:
            voice = registry.resolve(None, name)
            if known is None or voice.language == known:
                return voice
        return registry.resolve(known or languages.normalise(language) or "en")

    async def _speak(self, clauses: list[str], voice: Voice, *, start: bool) -> None:
        if start:
            await self.send(AudioStart(rate=OUTPUT_RATE, width=2, channels=1).event())
        speed = self.service.engines.config.tts_speed
        for clause in clauses:
            if not clean_for_speech(clause):
                continue
            pcm: bytes = await self.service.stages.tts((self.service.engines, clause, voice, speed))
            for chunk in _chunks(pcm, AUDIO_CHUNK_SAMPLES * 2):
                await self.send(AudioChunk(rate=OUTPUT_RATE, width=2, channels=1, audio=chunk).event())

    # ----------------------------------------------------------------------------------------- handle

    async def on_transcript(self, event: Event) -> None:
        text = _text(event.data).strip()
        if not text:
            raise WyomingInputError("empty_text", "a transcript to answer needs text")
        context = _context(event.data)
        conversation_id = context.get("conversation_id")
        chat = self.service.chats.get(conversation_id if isinstance(conversation_id, str) else None)
        language = self.service.texts.get(text) or _language(event.data)
        await self.service.wait_ready()
        try:
            reply = await self._answer(chat, text, language)
        except StemmeError as e:
            logger.warning("wyoming=%s answer failed: %s", self.id, e.code)
            await self.send(NotHandled(text=str(e), context=context or None).event())
            return
        if not reply:
            await self.send(NotHandled(text="", context=context or None).event())
            return
        if language:
            self.service.texts.remember(reply, language)
        await self.send(Handled(text=reply, context=context or None).event())

    async def _answer(self, chat: _Chat, text: str, language: str | None) -> str:
        conv = chat.conversation
        conv.add("user", text)
        pieces: list[str] = []
        engines = self.service.engines
        async for out in respond(engines, self.service.stages, conv.messages(language), voice=None,
                                 max_tokens=engines.config.llm_max_tokens, cancel=threading.Event(),
                                 marks=TurnMarks(language=language), conversation=chat.engine_key,
                                 shared_prefix=conv.shared_prefix(language), language=language):
            if isinstance(out, TextPiece):
                pieces.append(out.text)
        reply = "".join(pieces).strip()
        conv.add("assistant", reply)
        if LOG_CONTENT:
            logger.info("wyoming=%s reply (%s): %s", self.id, language, reply)
        return reply


def _voice_data(data: dict[str, Any]) -> dict[str, Any]:
    voice = data.get("voice")
    if voice is None:
        return {}
    if not isinstance(voice, dict):
        raise WyomingInputError("invalid_event", "'voice' must be an object")
    return {k: _text(voice, k, required=False, limit=256) or None for k in ("name", "language", "speaker")}


def _chunks(data: bytes, size: int) -> Iterator[bytes]:
    for i in range(0, len(data), size):
        yield data[i: i + size]


# ---------------------------------------------------------------------------------------------- server


class WyomingServer:
    """The listening socket (TCP or Unix), its connections and, when asked, the mDNS announcement."""

    def __init__(self, service: Service, uri: str) -> None:
        self.service = service
        self.uri = uri
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._zeroconf: Any = None
        self._own_stages = False

    @property
    def port(self) -> int | None:
        """The TCP port listened on (useful with port 0)."""
        if self._server is None or not self._server.sockets:
            return None
        name = self._server.sockets[0].getsockname()
        return int(name[1]) if isinstance(name, tuple) else None

    async def start(self) -> None:
        url = urlparse(self.uri)
        if url.scheme == "tcp":
            if not url.hostname or url.port is None:
                raise ConfigError(f"--wyoming {self.uri!r}: a tcp:// URI needs a host and a port")
            self._server = await asyncio.start_server(self._accept, url.hostname, url.port)
        elif url.scheme == "unix":
            self._server = await asyncio.start_unix_server(self._accept, url.path)
        else:
            raise ConfigError(f"--wyoming {self.uri!r}: use tcp://HOST:PORT or unix://PATH")
        logger.info("Wyoming listening on %s", self.uri if url.scheme != "tcp" or url.port else f"port {self.port}")
        if self.service.options.zeroconf is not None:
            await self._announce(url.hostname or "")

    async def _announce(self, host: str) -> None:
        try:
            from wyoming.zeroconf import HomeAssistantZeroconf
        except ImportError:
            raise ConfigError("--wyoming-zeroconf needs the zeroconf package: "
                              "pip install 'wyoming[zeroconf]==1.10.2'") from None
        if self.port is None:
            raise ConfigError("--wyoming-zeroconf needs a tcp:// URI")
        name = self.service.options.zeroconf or None
        bound = host if host not in ("0.0.0.0", "::", "") else None
        self._zeroconf = HomeAssistantZeroconf(port=self.port, name=name, host=bound)
        await self._zeroconf.register_server()
        logger.info("Wyoming announced on the LAN with zeroconf (mDNS) as %s", self._zeroconf.name)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = Connection(self.service, reader, writer)
        if len(self._tasks) >= self.service.options.max_connections:
            with contextlib.suppress(Exception):
                await conn.send(Error(text=f"the server is busy ({self.service.options.max_connections} "
                                           "connections)", code="server_busy").event())
            writer.close()
            return
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)  # type: ignore[arg-type]
        try:
            await conn.run()
        except asyncio.CancelledError:
            pass  # stop() ends the connection; asyncio would report a cancelled connection task as an error
        finally:
            self._tasks.discard(task)  # type: ignore[arg-type]

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._zeroconf is not None:
            with contextlib.suppress(Exception):
                await self._zeroconf._aiozc.async_close()
        ready = self.service.ready
        if ready is not None and not ready.done():
            ready.cancel()
        if self._own_stages:
            self.service.stages.shutdown()


def _load(engines: Engines) -> None:
    try:
        engines.load_all()
    except Exception:
        logger.exception("Wyoming: the models failed to load")
        raise


async def start_wyoming(engines: Engines, uri: str, *, stages: Stages | None = None,
                        **opts: Any) -> WyomingServer:
    """Serve Wyoming on ``uri`` (tcp://HOST:PORT or unix://PATH) with the process's engines; pass the WebSocket
    server's ``stages`` so that both front doors share one worker per stage. Options: WyomingOptions' fields.
    The models load in a worker thread (requests wait for them); ``await server.stop()`` ends it all."""
    service = Service(engines, stages or stages_for(engines.config), WyomingOptions(**opts))
    service.ready = asyncio.ensure_future(asyncio.to_thread(_load, engines))
    service.ready.add_done_callback(lambda f: f.cancelled() or f.exception())  # retrieved: no warning
    server = WyomingServer(service, uri)
    server._own_stages = stages is None
    try:
        await server.start()
    except BaseException:
        await server.stop()
        raise
    return server


def add_wyoming_arguments(parser: argparse.ArgumentParser) -> None:
    """The serve command's Wyoming options (read back with ``wyoming_options(args)``)."""
    env = os.environ.get
    g = parser.add_argument_group("Wyoming (Home Assistant)")
    g.add_argument("--wyoming", metavar="URI", default=env("STEMME_WYOMING") or None,
                   help="also serve Wyoming, e.g. tcp://0.0.0.0:10300 (no authentication: a trusted network only)")
    g.add_argument("--wyoming-zeroconf", metavar="NAME", nargs="?", const="",
                   default=env("STEMME_WYOMING_ZEROCONF"),
                   help="announce the Wyoming service on the LAN with mDNS so that Home Assistant discovers it "
                        "(off by default: Stemme sends nothing on the network unless asked)")
    g.add_argument("--wyoming-asr-language", choices=("detect", "client"), default=env("STEMME_WYOMING_ASR_LANGUAGE",
                                                                                       "detect"),
                   help="detect (default): Whisper detects the language, leaning toward the client's when unsure; "
                        "client: the language the client names is forced")
    g.add_argument("--wyoming-max-connections", type=int, default=int(env("STEMME_WYOMING_MAX_CONNECTIONS",
                                                                          str(MAX_CONNECTIONS))))


def wyoming_options(args: argparse.Namespace) -> dict[str, Any]:
    """start_wyoming's options from the parsed arguments."""
    return {"zeroconf": args.wyoming_zeroconf, "asr_language": args.wyoming_asr_language,
            "max_connections": args.wyoming_max_connections}


async def _serve(engines: Engines, uri: str, opts: dict[str, Any]) -> None:
    from stemme.streaming.server import until_signalled

    server = await start_wyoming(engines, uri, **opts)
    print(f"Stemme Wyoming on {uri} (port {server.port}); loading models…", flush=True)
    await until_signalled()
    await server.stop()


def main(argv: list[str] | None = None) -> int:
    """``python -m stemme.streaming.wyoming --wyoming tcp://127.0.0.1:10300``: Wyoming alone (tests, bench)."""
    from stemme.config import EngineConfig

    parser = argparse.ArgumentParser(description=main.__doc__)
    add_wyoming_arguments(parser)
    parser.add_argument("--log-level", default="INFO")
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    uri = args.wyoming or "tcp://127.0.0.1:10300"
    asyncio.run(_serve(Engines(EngineConfig.from_env()), uri, wyoming_options(args)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
