"""The OpenAI REST endpoints, on the server's own port and with its key: ``POST /v1/audio/transcriptions``,
``POST /v1/audio/speech`` (streamed as it is synthesized), ``POST /v1/chat/completions`` (SSE or not) and
``GET /v1/models``. Chat front-ends (Open WebUI, LibreChat) and the official ``openai`` SDK talk to them.

Every request runs on the engines and stage workers the voice sessions use (ASR micro-batcher, LLM scheduler,
TTS workers), never on the event loop; decoding and encoding audio run in worker threads too. Errors have
OpenAI's shape: ``{"error": {"message", "type", "param", "code"}}``."""

from __future__ import annotations

import asyncio
import hmac
import io
import json
import logging
import struct
import threading
import time
import weakref
from collections.abc import AsyncGenerator, AsyncIterable, AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

import numpy as np
import soundfile as sf
from prometheus_client import Counter
from starlette.datastructures import UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import BaseRoute, Route
from stemme.streaming.protocol import new_id
from stemme.voice import languages
from stemme.voice.asr import AsrOptions, Transcript
from stemme.voice.audio import ASR_RATE, OUTPUT_RATE, StreamResampler
from stemme.voice.llm import GenerationOptions, ToolCall, ToolCallExtractor
from stemme.voice.pipeline import clauses_of, llm_pieces, transcribe
from stemme.voice.tts import Voice, clean_for_speech

from stemme.errors import PromptTooLongError, StemmeError

if TYPE_CHECKING:
    from stemme.streaming.metrics import Metrics
    from stemme.voice.pipeline import Stages

    from stemme.engines import Engines

logger = logging.getLogger(__name__)
T = TypeVar("T")

OPENAI_VOICES = frozenset("alloy ash ballad coral echo fable nova onyx sage shimmer verse marin cedar".split())
"""OpenAI's voice names: each speaks with the default voice of the text's language."""
AUDIO_FORMATS = {"wav": "audio/wav", "pcm": "audio/pcm", "flac": "audio/flac", "mp3": "audio/mpeg",
                 "opus": "audio/opus"}
"""Speech formats and their content types; ``pcm`` is raw 24 kHz mono 16-bit little-endian, as OpenAI's."""
TRANSCRIPT_FORMATS = ("json", "text", "verbose_json", "srt", "vtt")


@dataclass
class RestOptions:
    """Limits of the REST endpoints."""

    max_upload_bytes: int = 25 << 20
    """Largest transcription upload (OpenAI's limit); a larger body is refused with 413 while it arrives."""
    max_audio_seconds: float = 600.0
    """Longest audio to transcribe: it holds the shared speech recognizer (about 0.1 s per second of audio on
    2 cores with whisper-base), so voice sessions wait behind it; longer audio gets 413."""
    max_speech_chars: int = 4096
    """Longest text to speak (OpenAI's limit)."""
    max_json_bytes: int = 1 << 20
    """Largest JSON body (speech, chat)."""
    max_chat_tokens: int = 1024
    """Most tokens one chat completion may ask for (``max_tokens``); the default is ``default_chat_tokens``."""
    default_chat_tokens: int = 512
    max_messages: int = 256
    """Most messages in one chat request; each message's text is limited to 16,000 characters, and the prompt
    to the server's ``llm_max_prompt_tokens``."""
    max_requests: int = 16
    """REST requests served at once; more get 429 ``server_busy`` (the engines' queues are shared with voice
    sessions)."""


MAX_MESSAGE_CHARS = 16_000


class RestHost(Protocol):
    """What the routes need of the server (streaming/server.py: StemmeServer)."""

    engines: Engines
    stages: Stages
    metrics: Metrics
    ready: bool
    draining: bool
    rest_in_progress: Callable[[], int]

    @property
    def config(self) -> Any: ...  # ServerConfig: api_key


class ApiError(Exception):
    """An OpenAI-shaped error response."""

    def __init__(self, status: int, message: str, *, code: str | None = None, param: str | None = None,
                 kind: str = "invalid_request_error") -> None:
        super().__init__(message)
        self.status, self.message, self.code, self.param, self.kind = status, message, code, param, kind

    def response(self) -> JSONResponse:
        body = {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}
        headers = {"WWW-Authenticate": "Bearer"} if self.status == 401 else None
        return JSONResponse(body, self.status, headers=headers)


# -- request bodies --------------------------------------------------------------------------------------------
async def _capped_stream(request: Request, limit: int) -> AsyncGenerator[bytes, None]:
    """The request body, refused with 413 as soon as it passes ``limit`` bytes (before it is all read)."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise ApiError(413, f"request body of {declared} bytes exceeds the limit of {limit} bytes",
                       code="request_too_large")
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise ApiError(413, f"request body exceeds the limit of {limit} bytes", code="request_too_large")
        yield chunk


async def read_json(request: Request, limit: int) -> dict[str, Any]:
    if "json" not in request.headers.get("content-type", "application/json"):
        raise ApiError(415, "send the request body as application/json", code="unsupported_media_type")
    body = b"".join([c async for c in _capped_stream(request, limit)])
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError, RecursionError):
        raise ApiError(400, "the request body is not valid JSON", code="invalid_json") from None
    if not isinstance(data, dict):
        raise ApiError(400, "the request body must be a JSON object", code="invalid_json")
    return data


async def read_form(request: Request, limit: int) -> tuple[dict[str, list[str]], UploadFile | None]:
    """A multipart form held in memory (never spooled to disk: uploads are user data), its fields and file."""
    if not request.headers.get("content-type", "").startswith("multipart/form-data"):
        raise ApiError(415, "send the audio as multipart/form-data with a 'file' field",
                       code="unsupported_media_type")
    parser = MultiPartParser(request.headers, _capped_stream(request, limit), max_files=1, max_fields=32,
                             max_part_size=64 << 10)
    parser.spool_max_size = limit + 1
    try:
        form = await parser.parse()
    except MultiPartException as e:
        raise ApiError(400, f"malformed multipart body: {e.message}", code="invalid_multipart") from None
    fields: dict[str, list[str]] = {}
    upload = None
    for key, value in form.multi_items():
        if isinstance(value, UploadFile):
            upload = value if key == "file" else upload
        else:
            fields.setdefault(key, []).append(value)
    return fields, upload


def _field(fields: dict[str, list[str]], name: str, default: str | None = None) -> str | None:
    values = fields.get(name)
    return values[-1] if values else default


def _string(body: dict[str, Any], name: str, *, required: bool = False, limit: int = 256) -> str | None:
    value = body.get(name)
    if value is None:
        if required:
            raise ApiError(400, f"'{name}' is required", param=name, code="missing_required_parameter")
        return None
    if not isinstance(value, str):
        raise ApiError(400, f"'{name}' must be a string", param=name, code="invalid_type")
    if len(value) > limit:
        raise ApiError(400, f"'{name}' is {len(value)} characters long; the limit is {limit}", param=name,
                       code="string_above_max_length")
    return value


def _number(value: Any, name: str, low: float, high: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
        raise ApiError(400, f"'{name}' must be a number from {low:g} to {high:g}", param=name,
                       code="invalid_value")
    return float(value)


def _language(code: str | None, param: str = "language") -> str | None:
    lang = languages.normalise(code)
    if lang is not None and lang not in languages.NAMES:
        raise ApiError(400, f"unknown language {code!r}: use an ISO 639-1 code such as 'en'", param=param,
                       code="invalid_value")
    return lang


# -- audio in --------------------------------------------------------------------------------------------------
def decode_audio(data: bytes, max_seconds: float) -> np.ndarray:
    """Any file libsndfile reads (WAV, FLAC, MP3, OGG Vorbis/Opus, AIFF...) as 16 kHz mono float32, decoded
    block by block, so a small compressed file cannot expand into more than ``max_seconds`` of audio."""
    try:
        f = sf.SoundFile(io.BytesIO(data))
    except (sf.LibsndfileError, RuntimeError, TypeError) as e:
        raise ApiError(415, f"unsupported or unreadable audio file ({e}); send WAV, FLAC, MP3 or OGG",
                       param="file", code="unsupported_audio_format") from None
    with f:
        if not 0 < f.channels <= 64 or f.samplerate < 1000:
            raise ApiError(415, "audio with an unusable format (channels or sample rate)", param="file",
                           code="unsupported_audio_format")
        out = _decoded_blocks(f, int(max_seconds * f.samplerate))
    audio = np.concatenate(out).astype(np.float32)
    if len(audio) < ASR_RATE // 10:
        raise ApiError(422, "the audio is empty or shorter than 0.1 s", param="file", code="audio_too_short")
    return audio


def _decoded_blocks(f: sf.SoundFile, limit: int) -> list[np.ndarray]:
    """Blocks of mono 16 kHz audio. A stream of unknown length (a streamed FLAC, as /v1/audio/speech makes) is
    read in small blocks: libsndfile fails at its end instead of stopping, and the failure then means the end
    (up to 1023 trailing samples are lost)."""
    unknown = f.frames >= 1 << 62
    size = 1024 if unknown else f.samplerate
    rs = StreamResampler(f.samplerate, ASR_RATE)
    out: list[np.ndarray] = []
    read = 0
    while True:
        try:
            block = f.read(size, dtype="float32", always_2d=True)
        except (sf.LibsndfileError, RuntimeError) as e:
            if unknown and read:
                break
            raise ApiError(415, f"the audio file is damaged: {e}", param="file", code="invalid_audio") from None
        if not len(block):
            break
        read += len(block)
        if read > limit:
            raise ApiError(413, f"audio longer than {limit / f.samplerate:g} s", param="file", code="audio_too_long")
        out.append(rs(np.nan_to_num(block.mean(axis=1)).clip(-1, 1)))
    out.append(rs(np.zeros(0, np.float32), last=True))
    return out


def _timestamp(seconds: float, sep: str) -> str:
    ms = round(seconds * 1000)
    return f"{ms // 3600000:02d}:{ms // 60000 % 60:02d}:{ms // 1000 % 60:02d}{sep}{ms % 1000:03d}"


def transcript_response(t: Transcript, fmt: str) -> Response:
    segments = [(s, e, text.strip()) for s, e, text in t.segments if text.strip()] or [(0.0, t.audio_seconds, t.text)]
    if fmt == "json":
        return JSONResponse({"text": t.text})
    if fmt == "text":
        return PlainTextResponse(t.text + "\n")
    if fmt == "verbose_json":
        return JSONResponse({
            "task": "transcribe", "language": languages.name(t.language).lower(), "duration": t.audio_seconds,
            "text": t.text, "segments": [{"id": i, "seek": 0, "start": s, "end": e, "text": text}
                                         for i, (s, e, text) in enumerate(segments)]})
    sep = "," if fmt == "srt" else "."
    cues = [f"{_timestamp(s, sep)} --> {_timestamp(e, sep)}\n{text}\n" for s, e, text in segments]
    if fmt == "srt":
        return PlainTextResponse("\n".join(f"{i + 1}\n{c}" for i, c in enumerate(cues)))
    return PlainTextResponse("WEBVTT\n\n" + "\n".join(cues), media_type="text/vtt")


# -- audio out -------------------------------------------------------------------------------------------------
class _Sink:
    """A write-only file for libsndfile that hands over new bytes as they are appended. Header fix-ups that
    libsndfile writes at close over bytes already sent are dropped: the stream keeps its "length unknown"
    header, which FLAC and MP3 (constant bit rate) decoders accept."""

    def __init__(self) -> None:
        self.size = 0
        self.pos = 0
        self._new = bytearray()

    def write(self, data: bytes) -> int:
        if self.pos >= self.size:
            self._new += data
            self.size += len(data)
        self.pos += len(data)
        return len(data)

    def seek(self, offset: int, whence: int = 0) -> int:
        self.pos = offset + (0 if whence == 0 else self.pos if whence == 1 else self.size)
        return self.pos

    def tell(self) -> int:
        return self.pos

    def read(self, n: int = -1) -> bytes:
        return b""

    def take(self) -> bytes:
        out, self._new = bytes(self._new), bytearray()
        return out


class AudioEncoder:
    """24 kHz mono PCM16 in, the requested format out, chunk by chunk (a WAV header with unknown length)."""

    def __init__(self, fmt: str) -> None:
        self.fmt = fmt
        self._sink = _Sink()
        self._file: sf.SoundFile | None = None
        if fmt in ("flac", "mp3", "opus"):
            kind = {"flac": ("FLAC", "PCM_16", {}), "opus": ("OGG", "OPUS", {}),
                    "mp3": ("MP3", "MPEG_LAYER_III", {"bitrate_mode": "CONSTANT", "compression_level": 0.5})}
            container, subtype, extra = kind[fmt]
            self._file = sf.SoundFile(self._sink, "w", samplerate=OUTPUT_RATE, channels=1, format=container,
                                      subtype=subtype, **extra)

    def header(self) -> bytes:
        if self.fmt != "wav":
            return self._sink.take()
        fmt = struct.pack("<HHIIHH", 1, 1, OUTPUT_RATE, OUTPUT_RATE * 2, 2, 16)
        return b"RIFF\xff\xff\xff\xffWAVEfmt " + struct.pack("<I", 16) + fmt + b"data\xff\xff\xff\xff"

    def push(self, pcm16: bytes) -> bytes:
        if self._file is None:
            return pcm16
        self._file.write(np.frombuffer(pcm16, "<i2"))
        return self._sink.take()

    def close(self) -> bytes:
        if self._file is not None:
            self._file.close()
        return self._sink.take()


@cache
def _identifier() -> Any:
    import langid.langid as lid

    return lid.LanguageIdentifier.from_modelstring(lid.model, norm_probs=True)


_identifier_lock = threading.Lock()


def _load_identifier() -> None:
    with _identifier_lock:
        _identifier()


PREFER_BELOW = 0.7
"""When langid's best guess for a text is below this probability and outside the eight tested languages, the
likeliest tested language wins (a short French sentence came out Danish at 0.61): tuned on
tests/data/sentences.json, checked on the held-out example turns (docs/benchmarks.md, REST)."""


def text_language(text: str, candidates: tuple[str, ...]) -> str:
    """The language of a text to speak: langid among the ``candidates`` it knows, leaning toward the tested
    languages (languages.SUPPORTED) when it is unsure."""
    with _identifier_lock:
        ident = _identifier()
        known = [c for c in candidates if c in ident.nb_classes]
        ident.set_languages(known or None)
        ranked = ident.rank(text)
    best, p = ranked[0]
    if p < PREFER_BELOW and best not in languages.SUPPORTED:
        best = next((lang for lang, _ in ranked[:3] if lang in languages.SUPPORTED), best)
    return str(best)


def find_voice(voices: list[Voice], available: Callable[[Voice], bool], name: str, language: str) -> Voice | None:
    """A voice by its full name ('kokoro:ff_siwis:fr'), or by its short name ('ff_siwis', 'en_US-joe-medium'),
    that language's first."""
    exact = [v for v in voices if v.name == name]
    short = [v for v in voices if v.name.split(":")[1:2] == [name]]
    found = exact or sorted(short, key=lambda v: v.language != language)
    return next((v for v in found if available(v)), None)


# -- chat ------------------------------------------------------------------------------------------------------
def _content(value: Any, i: int) -> str:
    if value is None or isinstance(value, str):
        text = value or ""
    elif isinstance(value, list) and all(isinstance(p, dict) and p.get("type") == "text"
                                         and isinstance(p.get("text"), str) for p in value):
        text = "".join(p["text"] for p in value)
    else:
        raise ApiError(400, f"messages[{i}].content must be a string or a list of text parts",
                       param=f"messages[{i}].content", code="invalid_value")
    if len(text) > MAX_MESSAGE_CHARS:
        raise ApiError(400, f"messages[{i}].content is longer than {MAX_MESSAGE_CHARS} characters",
                       param=f"messages[{i}].content", code="string_above_max_length")
    return text


def chat_messages(body: dict[str, Any], max_messages: int) -> list[dict[str, Any]]:
    """Validated chat-completions messages, as the engines take them."""
    raw = body.get("messages")
    if not isinstance(raw, list) or not raw or len(raw) > max_messages:
        raise ApiError(400, f"'messages' must be a list of 1 to {max_messages} messages", param="messages",
                       code="invalid_value")
    out: list[dict[str, Any]] = []
    for i, m in enumerate(raw):
        role = m.get("role") if isinstance(m, dict) else None
        if role == "developer":
            role = "system"
        if role not in ("system", "user", "assistant", "tool"):
            raise ApiError(400, f"messages[{i}].role must be system, developer, user, assistant or tool",
                           param=f"messages[{i}].role", code="invalid_value")
        msg: dict[str, Any] = {"role": role, "content": _content(m.get("content"), i)}
        if role == "assistant" and isinstance(m.get("tool_calls"), list):
            msg["tool_calls"] = m["tool_calls"]
        if role == "tool":
            msg["tool_call_id"] = str(m.get("tool_call_id", ""))
        out.append(msg)
    return out


def generation_options(body: dict[str, Any], opts: RestOptions) -> GenerationOptions:
    if body.get("n", 1) != 1:
        raise ApiError(400, "only n=1 is supported", param="n", code="unsupported_value")
    if body.get("stop") not in (None, [], ""):
        raise ApiError(400, "'stop' is not supported", param="stop", code="unsupported_parameter")
    limit = body.get("max_completion_tokens", body.get("max_tokens"))
    max_tokens = opts.default_chat_tokens if limit is None else int(_number(limit, "max_tokens", 1,
                                                                               opts.max_chat_tokens))
    temperature = body.get("temperature")
    tools = body.get("tools")
    if tools is not None and not (isinstance(tools, list) and all(isinstance(t, dict) for t in tools)):
        raise ApiError(400, "'tools' must be a list of objects", param="tools", code="invalid_type")
    choice = _chat_tool_choice(body.get("tool_choice"), tools or [])
    return GenerationOptions(max_new_tokens=max_tokens, tools=tools or None, tool_choice=choice,
                             temperature=0.0 if temperature is None else _number(temperature, "temperature", 0, 2))


def _chat_tool_choice(choice: Any, tools: list[dict[str, Any]]) -> str | dict[str, Any] | None:
    """``auto``, ``none``, ``required`` or ``{"type": "function", "function": {"name": …}}`` naming one of the
    request's tools, as OpenAI checks it (a call is forced on the embedded model, so it must be one offered)."""
    if choice is None or choice in ("auto", "none"):
        return choice
    names = {f.get("name") for t in tools if isinstance(f := t.get("function"), dict)}
    if choice == "required":
        if not tools:
            raise ApiError(400, "'tool_choice' required needs 'tools'", param="tool_choice", code="invalid_value")
        return choice
    function = choice.get("function") if isinstance(choice, dict) and choice.get("type") == "function" else None
    name = function.get("name") if isinstance(function, dict) else None
    if not isinstance(name, str) or name not in names:
        raise ApiError(400, "'tool_choice' must be auto, none, required or {'type': 'function', 'function': "
                       "{'name': …}} naming one of 'tools'", param="tool_choice", code="invalid_value")
    return {"type": "function", "function": {"name": name}}


def _tool_call(call: ToolCall, index: int) -> dict[str, Any]:
    return {"index": index, "id": call.id, "type": "function",
            "function": {"name": call.name, "arguments": call.arguments}}


def _stemme_error(e: StemmeError) -> ApiError:
    if isinstance(e, PromptTooLongError):
        return ApiError(400, str(e), param="messages", code="context_length_exceeded")
    return ApiError(500, str(e) or "the language model failed", code=e.code, kind="server_error")


# -- the routes ------------------------------------------------------------------------------------------------
class _Gate:
    """Counts REST requests in progress; beyond ``limit``, 429."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.busy = 0

    def take(self) -> _Slot:
        if self.busy >= self.limit:
            raise ApiError(429, f"the server is busy ({self.limit} requests at once); try again shortly",
                           code="server_busy", kind="server_error")
        self.busy += 1
        return _Slot(self)


class _Slot:
    def __init__(self, gate: _Gate) -> None:
        self._gate: _Gate | None = gate

    def release(self) -> None:
        """Once only: the end of a streamed body and its garbage collection may both call it."""
        if self._gate is not None:
            self._gate.busy -= 1
            self._gate = None


def released(body: AsyncIterable[Any], slot: _Slot) -> AsyncIterator[Any]:
    """``body``, releasing ``slot`` when it ends, fails or is closed, and also when it is dropped without ever
    being iterated (a client gone before the response started)."""

    async def chunks() -> AsyncIterator[Any]:
        try:
            async for chunk in body:
                yield chunk
        finally:
            slot.release()

    gen = chunks()
    weakref.finalize(gen, slot.release)
    return gen


Handler = Callable[[Request], Awaitable[Response]]


class RestApi:
    """The endpoints of one server."""

    def __init__(self, server: RestHost, options: RestOptions | None = None) -> None:
        self.server = server
        self.options = options or RestOptions()
        self.created = int(time.time())
        self._gate = _Gate(self.options.max_requests)
        self._requests = Counter("stemme_rest_requests", "REST requests answered", ["endpoint", "status"],
                                 registry=server.metrics.registry)
        threading.Thread(target=_load_identifier, name="stemme-langid", daemon=True).start()  # loads in the background

    @property
    def engines(self) -> Engines:
        return self.server.engines

    def routes(self) -> list[BaseRoute]:
        return [
            Route("/v1/audio/transcriptions", self._guard("transcriptions", self.transcriptions), methods=["POST"]),
            Route("/v1/audio/speech", self._guard("speech", self.speech), methods=["POST"]),
            Route("/v1/chat/completions", self._guard("chat", self.chat), methods=["POST"]),
            Route("/v1/models", self._guard("models", self.models, gated=False), methods=["GET"]),
        ]

    # -- admission -------------------------------------------------------------------------------------------
    def _authorise(self, request: Request) -> None:
        key = self.server.config.api_key
        if not key:
            return
        auth = request.headers.get("authorization", "")
        offered = auth[7:].strip() if auth.lower().startswith("bearer ") else ""
        if not hmac.compare_digest(offered.encode(), key.encode()):
            raise ApiError(401, "missing or invalid API key: send 'Authorization: Bearer <key>'",
                           code="invalid_api_key")

    def _check_ready(self) -> None:
        if self.server.draining:
            raise ApiError(503, "the server is shutting down; try another replica or again shortly",
                           code="server_shutting_down", kind="server_error")
        if not self.server.ready:
            raise ApiError(503, "the server is loading its models; try again shortly", code="server_not_ready",
                           kind="server_error")

    def _guard(self, name: str, handler: Handler, *, gated: bool = True) -> Handler:
        async def endpoint(request: Request) -> Response:
            started = time.perf_counter()
            try:
                response = await self._admitted(request, handler, gated)
            except ApiError as e:
                response = e.response()
            except Exception:
                logger.exception("REST %s failed", name)
                response = ApiError(500, "internal error", code="internal_error", kind="server_error").response()
            self._requests.labels(name, str(response.status_code)).inc()
            logger.info("REST %s %d in %.0f ms", name, response.status_code, (time.perf_counter() - started) * 1000)
            return response

        return endpoint

    async def _admitted(self, request: Request, handler: Handler, gated: bool) -> Response:
        self._authorise(request)
        if not gated:
            return await handler(request)
        self._check_ready()
        slot = self._gate.take()
        try:
            response = await handler(request)
        except BaseException:
            slot.release()
            raise
        if isinstance(response, StreamingResponse):
            response.body_iterator = released(response.body_iterator, slot)
        else:
            slot.release()
        return response

    # -- /v1/models ------------------------------------------------------------------------------------------
    def model_ids(self) -> dict[str, str]:
        cfg = self.engines.config
        llm = cfg.llm_model if cfg.llm_url else (Path(cfg.llm_model).name if cfg.llm_model else cfg.llm_pack)
        asr = Path(cfg.asr_model).name if cfg.asr_model else "whisper-base"
        return {"chat": llm or "remote", "transcription": asr, "speech": "stemme-tts"}

    async def models(self, request: Request) -> Response:
        data = [{"id": mid, "object": "model", "created": self.created, "owned_by": "stemme"}
                for mid in dict.fromkeys(self.model_ids().values())]
        return JSONResponse({"object": "list", "data": data})

    # -- /v1/audio/transcriptions ----------------------------------------------------------------------------
    async def transcriptions(self, request: Request) -> Response:
        fields, upload = await read_form(request, self.options.max_upload_bytes)
        if upload is None:
            raise ApiError(400, "'file' is required (the audio, as a multipart file)", param="file",
                           code="missing_required_parameter")
        fmt = _field(fields, "response_format", "json")
        if fmt not in TRANSCRIPT_FORMATS:
            raise ApiError(400, f"response_format must be one of {', '.join(TRANSCRIPT_FORMATS)}",
                           param="response_format", code="invalid_value")
        if "word" in fields.get("timestamp_granularities[]", []) + fields.get("timestamp_granularities", []):
            raise ApiError(400, "word timestamps are not supported", param="timestamp_granularities",
                           code="unsupported_value")
        prompt = _field(fields, "prompt")
        options = AsrOptions(language=_language(_field(fields, "language")),
                             languages=self.engines.config.languages or None,
                             prompt=prompt[:2000] if prompt else None)
        data = await upload.read()
        audio = await asyncio.to_thread(decode_audio, data, self.options.max_audio_seconds)
        transcript = await unless_gone(request, transcribe(self.engines, self.server.stages, audio, options))
        return transcript_response(transcript, fmt or "json")

    # -- /v1/audio/speech ------------------------------------------------------------------------------------
    async def speech(self, request: Request) -> Response:
        body = await read_json(request, self.options.max_json_bytes)
        text = _string(body, "input", required=True, limit=self.options.max_speech_chars) or ""
        if not clean_for_speech(text):
            raise ApiError(400, "'input' has nothing to speak", param="input", code="invalid_value")
        fmt = body.get("response_format") or "mp3"
        if fmt not in AUDIO_FORMATS:
            raise ApiError(400, f"response_format {fmt!r} is not available here; use one of "
                           f"{', '.join(AUDIO_FORMATS)}", param="response_format", code="unsupported_value")
        if body.get("stream_format", "audio") != "audio":
            raise ApiError(400, "only stream_format 'audio' is supported", param="stream_format",
                           code="unsupported_value")
        speed = 1.0 if body.get("speed") is None else _number(body["speed"], "speed", 0.25, 4.0)
        voice = await self._speech_voice(body, text)
        return StreamingResponse(self._speak(text, voice, speed, fmt), media_type=AUDIO_FORMATS[fmt],
                                 headers={"X-Stemme-Voice": voice.name, "Cache-Control": "no-cache"})

    async def _speech_voice(self, body: dict[str, Any], text: str) -> Voice:
        name = _string(body, "voice") or "alloy"
        registry = self.engines.tts.registry
        lang = _language(_string(body, "language"))  # a Stemme extension; else detected from the text
        if lang is None and (name in OPENAI_VOICES or ":" not in name):
            candidates = self.engines.config.languages or tuple(registry.languages())
            lang = await asyncio.to_thread(text_language, text, candidates)
        if name in OPENAI_VOICES:
            found = registry.for_language(lang or "en") or registry.for_language("en")
            if not found:
                raise ApiError(400, f"no voice speaks {languages.name(lang or 'en')} here", param="voice",
                               code="voice_not_found")
            return found[0]
        voice = find_voice(registry.voices, registry.available, name, lang or "en")
        if voice is None:
            raise ApiError(400, f"no voice named {name!r} is available (GET /v1/voices lists them, or use an "
                           "OpenAI name such as 'alloy')", param="voice", code="voice_not_found")
        return voice

    async def _speak(self, text: str, voice: Voice, speed: float, fmt: str) -> AsyncIterator[bytes]:
        """Clause by clause on the TTS stage: the first clause's audio leaves before the next is made, and the
        first clause is a few words (clauses_of), as in the WebSocket's answers."""
        encoder = await asyncio.to_thread(AudioEncoder, fmt)
        head = encoder.header()
        try:
            for clause in clauses_of(text):
                if not clean_for_speech(clause):
                    continue
                pcm = await self.server.stages.tts((self.engines, clause, voice, speed))
                chunk = head + await asyncio.to_thread(encoder.push, pcm)
                head = b""
                if chunk:
                    yield chunk
            yield head + await asyncio.to_thread(encoder.close)
        except (StemmeError, ValueError, RuntimeError):
            logger.exception("speech synthesis failed mid-stream (voice %s); the audio ends here", voice.name)

    # -- /v1/chat/completions --------------------------------------------------------------------------------
    async def chat(self, request: Request) -> Response:
        body = await read_json(request, self.options.max_json_bytes)
        messages = chat_messages(body, self.options.max_messages)
        options = generation_options(body, self.options)
        stream = body.get("stream", False)
        if not isinstance(stream, bool):
            raise ApiError(400, "'stream' must be true or false", param="stream", code="invalid_type")
        cancel = threading.Event()  # set when the client goes away: the shared language model stops this answer
        watch = asyncio.create_task(_watch_disconnect(request, cancel))
        pieces = self._pieces(messages, options, cancel)
        try:
            try:
                first = await anext(pieces, None)  # errors before the first token (prompt too long) are HTTP errors
            except StemmeError as e:
                await pieces.aclose()
                raise _stemme_error(e) from None
            if stream:  # Starlette stops the stream itself when the client goes away
                return StreamingResponse(self._sse(first, pieces, options), media_type="text/event-stream",
                                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
            return await self._completion(first, pieces, options)
        finally:
            watch.cancel()

    async def _pieces(self, messages: list[dict[str, Any]], options: GenerationOptions,
                      cancel: threading.Event) -> AsyncGenerator[str | ToolCall, None]:
        """The answer's text pieces and function calls, generated on the shared LLM scheduler. A call of a
        function the request did not offer (a small model may invent one) is dropped, never returned."""
        offered = options.offered_functions()
        extractor = ToolCallExtractor(bare_json=bool(options.tools) and options.tool_choice != "none")
        source = llm_pieces(self.engines, self.server.stages, messages, options, cancel)

        def kept(outs: list[str | ToolCall]) -> list[str | ToolCall]:
            if any(isinstance(o, ToolCall) and o.name not in offered for o in outs):
                logger.warning("the model called a function it was not offered; dropped")
            return [o for o in outs if not (isinstance(o, ToolCall) and o.name not in offered)]

        try:
            async for p in source:
                for out in kept(extractor.push(p)):
                    yield out
            for out in kept(extractor.flush()):
                yield out
        finally:
            await source.aclose()

    def _envelope(self, cid: str, kind: str, choice: dict[str, Any]) -> dict[str, Any]:
        return {"id": cid, "object": kind, "created": int(time.time()), "model": self.model_ids()["chat"],
                "choices": [choice]}

    async def _completion(self, first: str | ToolCall | None, pieces: AsyncGenerator[str | ToolCall, None],
                          options: GenerationOptions) -> Response:
        parts: list[str | ToolCall] = [] if first is None else [first]
        try:
            parts += [p async for p in pieces]
        except StemmeError as e:
            raise _stemme_error(e) from None
        text = "".join(p for p in parts if isinstance(p, str))
        calls = [_tool_call(c, i) for i, c in enumerate(p for p in parts if isinstance(p, ToolCall))]
        for c in calls:
            del c["index"]
        message: dict[str, Any] = {"role": "assistant", "content": text or (None if calls else "")}
        if calls:
            message["tool_calls"] = calls
        reason = "tool_calls" if calls else "length" if len(parts) >= options.max_new_tokens else "stop"
        choice = {"index": 0, "message": message, "finish_reason": reason}
        return JSONResponse(self._envelope(new_id("chatcmpl"), "chat.completion", choice))

    async def _sse(self, first: str | ToolCall | None, pieces: AsyncGenerator[str | ToolCall, None],
                   options: GenerationOptions) -> AsyncIterator[bytes]:
        cid = new_id("chatcmpl")

        def event(delta: dict[str, Any], reason: str | None = None) -> bytes:
            chunk = self._envelope(cid, "chat.completion.chunk", {"index": 0, "delta": delta,
                                                                  "finish_reason": reason})
            return b"data: " + json.dumps(chunk, ensure_ascii=False).encode() + b"\n\n"

        yield event({"role": "assistant", "content": ""})
        count, calls = 0, 0
        try:
            p = first
            while p is not None:
                count += 1
                if isinstance(p, ToolCall):
                    yield event({"tool_calls": [_tool_call(p, calls)]})
                    calls += 1
                elif p:
                    yield event({"content": p})
                p = await anext(pieces, None)
        except StemmeError as e:
            err = _stemme_error(e)
            payload = {"error": {"message": err.message, "type": err.kind, "param": err.param, "code": err.code}}
            yield b"data: " + json.dumps(payload).encode() + b"\n\n"
            return
        finally:
            await pieces.aclose()
        yield event({}, "tool_calls" if calls else "length" if count >= options.max_new_tokens else "stop")
        yield b"data: [DONE]\n\n"


async def unless_gone(request: Request, work: Awaitable[T]) -> T:
    """Await ``work`` unless the client goes away first: then it is cancelled (a job still queued on a stage is
    withdrawn, so a long upload nobody waits for any more does not hold the shared ASR) and a 499 is raised."""
    task = asyncio.ensure_future(work)
    gone = threading.Event()
    watch = asyncio.create_task(_watch_disconnect(request, gone))
    try:
        await asyncio.wait({task, watch}, return_when=asyncio.FIRST_COMPLETED)
        if task.done():
            return task.result()
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        raise ApiError(499, "the client closed the request", code="client_closed_request")
    finally:
        watch.cancel()
        task.cancel()


async def _watch_disconnect(request: Request, cancel: threading.Event) -> None:
    """Set ``cancel`` once the client has gone (its request body was read: the next message is the disconnect)."""
    while not cancel.is_set():
        if await request.is_disconnected():
            cancel.set()
            return
        await asyncio.sleep(0.25)


def rest_routes(server: RestHost, options: RestOptions | None = None) -> list[BaseRoute]:
    """The OpenAI REST routes of ``server``, for its Starlette app; ``server.rest_in_progress`` then counts the
    requests being served (a drain waits for them)."""
    api = RestApi(server, options)
    server.rest_in_progress = lambda: api._gate.busy
    return api.routes()
