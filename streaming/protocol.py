"""The OpenAI Realtime API event protocol, sans-I/O: parse and validate client events, build server events,
and hold the session configuration. No sockets, no asyncio: tested on plain values.

GA event names are emitted; a session may ask for the older beta names (``response.audio.delta``...) with
``?event_names=beta`` or ``session.update`` ``{"session": {"stemme": {"event_names": "beta"}}}``.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import re
import secrets
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from itertools import compress
from typing import Any

from stemme.streaming import events as ev
from stemme.streaming import tools
from stemme.streaming.events import ResponseOverrides
from stemme.voice import languages

from stemme.errors import ProtocolError
from stemme.logsafe import clip

MAX_TEXT_MESSAGE = 1 << 20
"""Bytes: the largest JSON message accepted (about 20 s of 24 kHz base64 audio); larger gets an error event."""
MAX_BINARY_MESSAGE = 1 << 19
"""Bytes: the largest binary audio frame accepted (about 16 s of 16 kHz PCM16)."""

CLIENT_EVENTS = {
    "session.update", "input_audio_buffer.append", "input_audio_buffer.commit", "input_audio_buffer.clear",
    "conversation.item.create", "conversation.item.retrieve", "conversation.item.truncate",
    "conversation.item.delete", "response.create", "response.cancel", "output_audio_buffer.clear",
}

BETA_NAMES = {
    "response.output_audio.delta": "response.audio.delta",
    "response.output_audio.done": "response.audio.done",
    "response.output_audio_transcript.delta": "response.audio_transcript.delta",
    "response.output_audio_transcript.done": "response.audio_transcript.done",
    "response.output_text.delta": "response.text.delta",
    "response.output_text.done": "response.text.done",
    "conversation.item.added": "conversation.item.created",
}


def new_id(prefix: str) -> str:
    return f"{prefix}_{secrets.token_hex(10)}"


def error_event(err: ProtocolError) -> dict[str, Any]:
    """The ``error`` event that reports ``err``, as it goes on the wire."""
    return encode_server_event(error_of(err))


MAX_JSON_DEPTH = 32
"""Nesting levels of objects and arrays in one client event (the Realtime events need 6); deeper gets an
error event, and JSON too deep for the parser's own recursion is caught, never fatal."""
MAX_JSON_CONTAINERS = 10_000
"""Objects and arrays in one client event (a Realtime event has tens); more gets an error event."""
MAX_NAME_CHARS = 256
"""Characters of a name the client chooses and the server repeats (voice, model, event_id)."""


_CONTAINERS = frozenset((dict, list))
_SURROGATE = re.compile("[\ud800-\udfff]")
_JSON_STRING = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"')


class _Invalid(ValueError):
    """A field of a client payload is invalid; its caller turns it into a ProtocolError with context."""

    def __init__(self, message: str, param: str) -> None:
        super().__init__(message)
        self.param = param


def message_size(data: str | bytes) -> int:
    """Bytes of a message on the wire (UTF-8), whatever Python type it arrives as. ``str.isascii`` is O(1),
    so only a non-ASCII text within the character limit is encoded to count it."""
    if isinstance(data, bytes) or data.isascii() or len(data) > MAX_TEXT_MESSAGE:
        return len(data)
    return len(data.encode("utf-8", "surrogatepass"))


def _no_constant(name: str) -> float:
    raise ValueError(f"{name} is not a JSON number")


def _finite(text: str) -> float:
    x = float(text)
    if not math.isfinite(x):
        raise ValueError(f"number {clip(text, 40)} is out of range")
    return x


def _encodes(value: Any) -> bool:
    """Whether ``value`` (any parsed JSON) can go back on the wire: no lone surrogate in any string or key."""
    if isinstance(value, str) and value.isascii():
        return True
    try:
        json.dumps(value, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _check_strings(data: str | bytes, event: dict[str, Any]) -> None:
    """Refuse a lone surrogate (``"\\ud800"``) anywhere: it is not text, and repeating it would fail at send
    time. A message holds one only as a ``\\u`` escape (UTF-8 off the wire cannot carry one) or, from a
    caller in Python, as a raw character: both are searched in C, and only then is the event encoded."""
    escaped = "\\u" in data if isinstance(data, str) else b"\\u" in data
    if not escaped and not (isinstance(data, str) and _SURROGATE.search(data)) or _encodes(event):
        return
    bad = next((k for k, v in event.items() if not _encodes(k) or not _encodes(v)), "?")
    raise _Invalid(f"'{clip(bad, 40)}' holds a lone surrogate (\\ud800-\\udfff), which is not text", "")


def _check_shape(value: Any) -> None:
    """Depth and number of the objects and arrays of a parsed event, one level at a time without recursion;
    scalars are skipped in C (``compress``), so a list of 500,000 numbers costs no Python loop."""
    level, depth, seen = [value], 1, 1
    while level:
        if depth > MAX_JSON_DEPTH:
            raise _Invalid(f"JSON nested deeper than {MAX_JSON_DEPTH} levels", "")
        if seen > MAX_JSON_CONTAINERS:
            raise _Invalid(f"more than {MAX_JSON_CONTAINERS} objects and arrays in one event", "")
        below: list[Any] = []
        for node in level:
            children = node.values() if isinstance(node, dict) else node
            below.extend(compress(children, map(_CONTAINERS.__contains__, map(type, children))))
        level, depth, seen = below, depth + 1, seen + len(below)


def _clean_id(event: Any) -> str | None:
    """The client's event_id, when it is safe to repeat in an error event."""
    eid = event.get("event_id") if isinstance(event, dict) else None
    if not isinstance(eid, str) or len(eid) > MAX_NAME_CHARS:
        return None
    try:
        eid.encode("utf-8")
    except UnicodeEncodeError:
        return None
    return eid


def _containers_over_limit(data: str | bytes) -> bool:
    """Whether the message opens more objects and arrays than allowed, known before json.loads builds them
    all (200,000 empty lists take it a few hundred ms). Counting brackets is C speed; only when there are
    enough of them are the strings (which may hold brackets) cut out to count exactly: by splitting at the
    quotes when no quote is escaped, else with a regular expression."""
    text = data if isinstance(data, str) else data.decode("utf-8", "replace")
    if text.count("[") + text.count("{") <= MAX_JSON_CONTAINERS:
        return False
    bare = _JSON_STRING.sub("", text) if '\\"' in text else "".join(text.split('"')[::2])
    return bare.count("[") + bare.count("{") > MAX_JSON_CONTAINERS


def _decode(data: str | bytes) -> Any:
    size = message_size(data)
    if size > MAX_TEXT_MESSAGE:
        raise ProtocolError(f"message of {size} bytes exceeds the limit of {MAX_TEXT_MESSAGE} bytes",
                            code="message_too_large")
    if _containers_over_limit(data):
        raise ProtocolError(f"more than {MAX_JSON_CONTAINERS} objects and arrays in one event", code="invalid_json")
    try:
        return json.loads(data, parse_constant=_no_constant, parse_float=_finite)
    except RecursionError:
        raise ProtocolError(f"JSON nested deeper than {MAX_JSON_DEPTH} levels", code="invalid_json") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise ProtocolError(f"malformed JSON: {clip(e, 160)}", code="invalid_json") from None


def encode_event(event: dict[str, Any]) -> str:
    """One server event as JSON text that can go on the wire. A string that is not valid Unicode (a lone
    surrogate from anywhere) is sent escaped (``\\ud800``, as JSON allows) rather than fail in the writer
    and drop the connection. TypeError or ValueError: the event holds something that is not JSON (a bug)."""
    data = json.dumps(event, ensure_ascii=False)
    if data.isascii():
        return data
    try:
        data.encode("utf-8")
    except UnicodeEncodeError:
        return json.dumps(event)
    return data


def parse_text(data: str | bytes) -> dict[str, Any]:
    """Parse one JSON client message; raise ProtocolError for anything malformed: too many bytes, bad JSON,
    too deep, a number JSON does not allow (NaN, Infinity, 1e309), a lone surrogate in any string, a
    missing or unknown type. Nothing is changed before this returns."""
    event = _decode(data)
    if not isinstance(event, dict):
        raise ProtocolError("an event must be a JSON object", code="invalid_event")
    try:
        _check_shape(event)
    except _Invalid as e:
        raise ProtocolError(str(e), code="invalid_json", event_id=_clean_id(event)) from None
    try:
        _check_strings(data, event)
    except _Invalid as e:
        raise ProtocolError(str(e), code="invalid_string", event_id=_clean_id(event)) from None
    event_id = event.get("event_id")
    if event_id is not None and (not isinstance(event_id, str) or len(event_id) > MAX_NAME_CHARS):
        raise ProtocolError(f"event_id must be a string of at most {MAX_NAME_CHARS} characters", param="event_id",
                            code="invalid_type")
    etype = event.get("type")
    if not isinstance(etype, str):
        raise ProtocolError("missing or non-string 'type'", param="type", event_id=event_id,
                            code="invalid_event")
    if etype not in CLIENT_EVENTS:
        raise ProtocolError(f"unknown event type '{clip(etype)}'", param="type", event_id=event_id,
                            code="unknown_event_type")
    prev = event.get("previous_item_id")
    if prev is not None and not isinstance(prev, str):
        raise ProtocolError(f"{etype}: 'previous_item_id' must be a string", param="previous_item_id",
                            event_id=event_id, code="invalid_type")
    return event


def field_of(event: dict[str, Any], name: str, kind: type | tuple[type, ...], *, required: bool = True,
             default: Any = None) -> Any:
    """``event[name]`` checked to be of ``kind`` (a boolean is never taken for a number)."""
    value = event.get(name, default)
    if value is None:
        if required:
            raise ProtocolError(f"{event['type']}: missing '{name}'", param=name, event_id=event.get("event_id"),
                                code="missing_required_parameter")
        return default
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
        raise ProtocolError(f"{event['type']}: '{name}' must be {' or '.join(k.__name__ for k in kinds)}",
                            param=name, event_id=event.get("event_id"), code="invalid_type")
    return value


def decode_audio(event: dict[str, Any]) -> bytes:
    b64 = field_of(event, "audio", str)
    try:
        return base64.b64decode(b64, validate=True)
    except (binascii.Error, ValueError):
        raise ProtocolError("input_audio_buffer.append: 'audio' is not valid base64", param="audio",
                            event_id=event.get("event_id"), code="invalid_base64") from None


def _number(value: Any, lo: float, hi: float, param: str) -> float:
    """A JSON number within lo..hi: booleans, strings, NaN and infinities are refused. Compared before any
    conversion, so that an integer of 400 digits is out of range, not an OverflowError."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _Invalid(f"{param} must be a number", param)
    if (isinstance(value, float) and not math.isfinite(value)) or not lo <= value <= hi:
        raise _Invalid(f"{param} must be in {lo:g}..{hi:g}", param)
    return float(value)


def _name(value: Any, param: str) -> str:
    """A name the client picks (voice, model): a string of printable characters, not too long."""
    if not isinstance(value, str):
        raise _Invalid(f"{param} must be a string", param)
    if len(value) > MAX_NAME_CHARS or not value.isprintable():
        raise _Invalid(f"{param} must be at most {MAX_NAME_CHARS} printable characters", param)
    return value


def _object(value: Any, param: str) -> dict[str, Any]:
    """An optional JSON object: absent or null is empty."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise _Invalid(f"'{param}' must be an object", param)
    return value


def _modalities(value: Any, param: str) -> list[str]:
    if not isinstance(value, list) or not value or any(not isinstance(m, str) or m not in ("audio", "text")
                                                        for m in value):
        raise _Invalid("'output_modalities' must be ['audio'] or ['text']", param)
    return ["audio"] if "audio" in value else ["text"]


def _max_tokens(value: Any, param: str) -> int | None:
    """``max_output_tokens``: 1..4096, or "inf" (None: no cap of its own)."""
    if value == "inf":
        return None
    if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= 4096:
        raise _Invalid("max_output_tokens must be an integer in 1..4096 or 'inf'", param)
    return value


MAX_INSTRUCTIONS_CHARS = 16_000
"""Characters of instructions (session or response), about 4,000 tokens; the whole prompt is also capped in
tokens by the engine (EngineConfig.llm_max_prompt_tokens). A longer prompt would hold the shared language model
for seconds and delay every other session."""
MAX_ITEM_TEXT_CHARS = 16_000
"""Characters of one text content of a conversation item."""


def _text(value: Any, param: str, limit: int = MAX_INSTRUCTIONS_CHARS) -> str | None:
    if value is not None and not isinstance(value, str):
        raise _Invalid(f"'{param}' must be a string", param)
    if value is not None and len(value) > limit:
        raise _Invalid(f"'{param}' is limited to {limit} characters", param)
    return value


def _flag(value: Any, param: str) -> bool:
    """A boolean that defaults to true when absent or null."""
    if value is None:
        return True
    if not isinstance(value, bool):
        raise _Invalid(f"{param} must be true or false", param)
    return value


@dataclass
class TurnDetection:
    type: str = "server_vad"
    threshold: float = 0.5
    prefix_padding_ms: int = 300
    silence_duration_ms: int = 500
    create_response: bool = True
    interrupt_response: bool = True
    eagerness: str = "auto"
    """semantic_vad: low, medium, high or auto (medium)."""

    def to_json(self) -> dict[str, Any]:
        out = {"type": self.type, "threshold": self.threshold, "prefix_padding_ms": self.prefix_padding_ms,
               "silence_duration_ms": self.silence_duration_ms, "create_response": self.create_response,
               "interrupt_response": self.interrupt_response, "idle_timeout_ms": None}
        if self.type == "semantic_vad":
            out["eagerness"] = self.eagerness
        return out

    def semantic(self) -> tuple[int, float]:
        """semantic_vad with the end-of-turn model: (the silence that ends an incomplete turn in ms, the
        probability at which a 200 ms pause ends a turn). Low eagerness waits longer and wants more certainty."""
        return _EAGERNESS_MODEL.get(self.eagerness, _EAGERNESS_MODEL["auto"])

    @classmethod
    def from_json(cls, td: Any, current: TurnDetection | None) -> TurnDetection | None:
        """A ``turn_detection`` object (or null: off), every value checked; unset numbers keep ``current``'s."""
        param = "audio.input.turn_detection"
        if td is None:
            return None
        if not isinstance(td, dict) or td.get("type") not in ("server_vad", "semantic_vad"):
            raise _Invalid("turn_detection must be null or of type server_vad / semantic_vad", param)
        cur = current or cls()
        t = cls(type=td["type"])
        t.threshold = _number(td.get("threshold", cur.threshold), 0.0, 1.0, f"{param}.threshold")
        t.prefix_padding_ms = int(_number(td.get("prefix_padding_ms", cur.prefix_padding_ms), 0, 2000,
                                          f"{param}.prefix_padding_ms"))
        t.silence_duration_ms = int(_number(td.get("silence_duration_ms", cur.silence_duration_ms), 100, 5000,
                                            f"{param}.silence_duration_ms"))
        if not 0.0 < t.threshold < 1.0:
            raise _Invalid("turn_detection threshold must be between 0 and 1 (exclusive)", f"{param}.threshold")
        if t.type == "semantic_vad":
            eagerness = td.get("eagerness", "auto")
            if not isinstance(eagerness, str) or eagerness not in _EAGERNESS_SILENCE:
                raise _Invalid("eagerness must be low, medium, high or auto", f"{param}.eagerness")
            t.eagerness = eagerness
            t.silence_duration_ms = _EAGERNESS_SILENCE[eagerness]
        t.create_response = _flag(td.get("create_response"), f"{param}.create_response")
        t.interrupt_response = _flag(td.get("interrupt_response"), f"{param}.interrupt_response")
        return t


_EAGERNESS_SILENCE = {"low": 900, "medium": 600, "auto": 600, "high": 350}
"""semantic_vad without the end-of-turn model: the silence that ends a turn."""
_EAGERNESS_MODEL = {"low": (2000, 0.7), "medium": (1200, 0.5), "auto": (1200, 0.5), "high": (700, 0.3)}


@dataclass
class SessionConfig:
    """What ``session.update`` can change."""

    instructions: str | None = None
    output_modalities: list[str] = field(default_factory=lambda: ["audio"])
    input_format: str = "audio/pcm"
    """audio/pcm, audio/pcmu or audio/pcma."""
    input_rate: int = 24000
    """Hertz of audio/pcm input: 24000 (the API's) or 16000."""
    transcription_language: str | None = None
    """Pin the user's language (ISO 639-1); None detects it per turn."""
    transcription_model: str = "whisper-base"
    turn_detection: TurnDetection | None = field(default_factory=TurnDetection)
    voice: str | None = None
    """A voice name from `stemme voices`; None: the best voice of the turn's language."""
    speed: float = 1.0
    max_output_tokens: int | None = None
    model: str = "stemme"
    beta_names: bool = False
    tools: list[dict[str, Any]] = field(default_factory=list)
    """Functions the model may call (Realtime shape, see streaming/tools.py)."""
    tool_choice: str | dict[str, Any] = "auto"

    def apply(self, session: dict[str, Any], event_id: str | None = None) -> None:
        """Apply a ``session.update`` payload (GA shape, and the beta flat fields). Every field is checked on
        a copy first: on any invalid value nothing changes and a ProtocolError names the field."""
        try:
            new = self._updated(session)
        except _Invalid as e:
            raise ProtocolError(f"session.update: {e}", param=f"session.{e.param}".rstrip("."), event_id=event_id,
                                code="invalid_value") from None
        self.__dict__.update(new.__dict__)

    def _updated(self, session: Any) -> SessionConfig:
        if not isinstance(session, dict):
            raise _Invalid("'session' must be an object", "")
        new = replace(self)
        audio = _object(session.get("audio"), "audio")
        inp, out = _object(audio.get("input"), "audio.input"), _object(audio.get("output"), "audio.output")
        if "instructions" in session:
            new.instructions = _text(session["instructions"], "instructions")
        mods = session.get("output_modalities", session.get("modalities"))
        if mods is not None:
            new.output_modalities = _modalities(mods, "output_modalities")
        new._set_input_format(session, inp)
        _check_output_format(out.get("format"))
        new._set_transcription(inp.get("transcription", session.get("input_audio_transcription")))
        if "turn_detection" in inp or "turn_detection" in session:
            td = inp["turn_detection"] if "turn_detection" in inp else session["turn_detection"]
            new.turn_detection = TurnDetection.from_json(td, new.turn_detection)
        new._set_voice(out, session)
        mot = session.get("max_output_tokens", session.get("max_response_output_tokens"))
        if mot is not None:
            new.max_output_tokens = _max_tokens(mot, "max_output_tokens")
        new._set_extensions(session)
        new._set_tools(session)
        return new

    def _set_tools(self, session: dict[str, Any]) -> None:
        try:
            if session.get("tools") is not None:
                self.tools = tools.parse_tools(session["tools"])
            if session.get("tool_choice") is not None:
                self.tool_choice = tools.parse_tool_choice(session["tool_choice"], self.tools)
        except tools.ToolError as e:
            raise _Invalid(str(e), e.param) from None

    def _set_input_format(self, session: dict[str, Any], inp: dict[str, Any]) -> None:
        param = "audio.input.format"
        fmt = inp.get("format")
        if "input_audio_format" in session:  # beta: a name
            name = session["input_audio_format"]
            if not isinstance(name, str) or name not in _BETA_FORMATS:
                raise _Invalid("input_audio_format must be pcm16, g711_ulaw or g711_alaw", "input_audio_format")
            fmt = _BETA_FORMATS[name]
        if fmt is None:
            return
        if not isinstance(fmt, dict) or fmt.get("type") not in ("audio/pcm", "audio/pcmu", "audio/pcma"):
            raise _Invalid("audio.input.format.type must be audio/pcm, audio/pcmu or audio/pcma", param)
        self.input_format = fmt["type"]
        if fmt["type"] != "audio/pcm":
            self.input_rate = 8000
            return
        rate = fmt.get("rate", 24000)
        if isinstance(rate, bool) or rate not in (16000, 24000):
            raise _Invalid("audio/pcm input rate must be 16000 or 24000", f"{param}.rate")
        self.input_rate = int(rate)

    def _set_transcription(self, trans: Any) -> None:
        param = "audio.input.transcription"
        if trans is None:
            return
        if not isinstance(trans, dict):
            raise _Invalid("'transcription' must be an object", param)
        lang = trans.get("language")
        if lang is not None and not isinstance(lang, str):
            raise _Invalid("transcription.language must be a string", f"{param}.language")
        code = languages.normalise(lang)
        if code is not None and not _LANGUAGE_CODE.fullmatch(code):
            raise _Invalid("transcription.language must be a language code (ISO 639-1, e.g. 'fr')",
                           f"{param}.language")
        self.transcription_language = code
        if trans.get("model") is not None:
            self.transcription_model = _name(trans["model"], f"{param}.model")

    def _set_voice(self, out: dict[str, Any], session: dict[str, Any]) -> None:
        voice = out.get("voice", session.get("voice"))
        if voice is not None:
            self.voice = _name(voice, "audio.output.voice")
        speed = out.get("speed", session.get("speed"))
        if speed is not None:
            self.speed = _number(speed, 0.25, 4.0, "audio.output.speed")

    def _set_extensions(self, session: dict[str, Any]) -> None:
        ext = _object(session.get("stemme"), "stemme")
        if "event_names" in ext:
            if not isinstance(ext["event_names"], str):
                raise _Invalid("stemme.event_names must be a string ('beta' for the older names)",
                               "stemme.event_names")
            self.beta_names = ext["event_names"] == "beta"
        if session.get("model") is not None:
            self.model = _name(session["model"], "model")

    def to_json(self) -> dict[str, Any]:
        fmt: dict[str, Any] = {"type": self.input_format}
        if self.input_format == "audio/pcm":
            fmt["rate"] = self.input_rate
        return {
            "type": "realtime",
            "object": "realtime.session",
            "model": self.model,
            "instructions": self.instructions or "",
            "output_modalities": self.output_modalities,
            "max_output_tokens": self.max_output_tokens or "inf",
            "audio": {
                "input": {
                    "format": fmt,
                    "transcription": {"model": self.transcription_model, "language": self.transcription_language},
                    "turn_detection": self.turn_detection.to_json() if self.turn_detection else None,
                    "noise_reduction": None,
                },
                "output": {"format": {"type": "audio/pcm", "rate": 24000}, "voice": self.voice or "auto",
                           "speed": self.speed},
            },
            "tools": self.tools,
            "tool_choice": self.tool_choice,
        }


def parse_response(event: dict[str, Any]) -> ResponseOverrides:
    """Validate ``response.create``'s ``response`` before anything starts; raise ProtocolError naming the
    field. Fields Stemme does not use are checked for their type only (``conversation``, ``metadata``)."""
    try:
        return _response_overrides(event.get("response"))
    except _Invalid as e:
        raise ProtocolError(f"response.create: {e}", param=f"response.{e.param}".rstrip("."),
                            event_id=event.get("event_id"), code="invalid_value") from None


def _response_overrides(resp: Any) -> ResponseOverrides:
    if resp is not None and not isinstance(resp, dict):
        raise _Invalid("'response' must be an object", "")
    resp = resp or {}
    out = _object(_object(resp.get("audio"), "audio").get("output"), "audio.output")
    _check_output_format(out.get("format"))
    _object(resp.get("metadata"), "metadata")
    if resp.get("conversation") not in (None, "auto", "none"):
        raise _Invalid("conversation must be 'auto' or 'none'", "conversation")
    mods = resp.get("output_modalities", resp.get("modalities"))
    mot = resp.get("max_output_tokens", resp.get("max_response_output_tokens"))
    voice = out.get("voice", resp.get("voice"))
    try:
        tool_list = tools.parse_tools(resp["tools"]) if resp.get("tools") is not None else None
        choice = _response_tool_choice(resp.get("tool_choice"), tool_list)
    except tools.ToolError as e:
        raise _Invalid(str(e), e.param) from None
    return ResponseOverrides(
        tools=tool_list, tool_choice=choice,
        output_modalities=_modalities(mods, "output_modalities") if mods is not None else None,
        instructions=_text(resp.get("instructions"), "instructions"),
        max_output_tokens=_max_tokens(mot, "max_output_tokens") if mot is not None else None,
        voice=_name(voice, "audio.output.voice") if voice is not None else None)


def _response_tool_choice(value: Any, tool_list: list[dict[str, Any]] | None) -> str | dict[str, Any] | None:
    """A response's tool_choice. Naming a function without tools of its own, it is checked against the
    session's tools when the response starts."""
    if value is None:
        return None
    if tool_list is not None or value in ("auto", "none", "required"):
        return tools.parse_tool_choice(value, tool_list or [])
    name = value.get("name") if isinstance(value, dict) and value.get("type") == "function" else None
    if not isinstance(name, str):
        raise tools.ToolError("tool_choice must be auto, none, required or {'type': 'function', 'name': …}",
                              "tool_choice")
    return {"type": "function", "name": name}


def _check_output_format(fmt: Any) -> None:
    if fmt is not None and (not isinstance(fmt, dict) or fmt.get("type") != "audio/pcm"
                            or fmt.get("rate", 24000) != 24000 or isinstance(fmt.get("rate"), bool)):
        raise _Invalid("output format must be audio/pcm at 24000 Hz", "audio.output.format")


_BETA_FORMATS: dict[str, dict[str, Any]] = {
    "pcm16": {"type": "audio/pcm", "rate": 24000}, "g711_ulaw": {"type": "audio/pcmu"},
    "g711_alaw": {"type": "audio/pcma"}}
_LANGUAGE_CODE = re.compile(r"[a-z]{2,3}")


def item_text(item: dict[str, Any]) -> str:
    """The text of a conversation item (input_text, text, or a transcript)."""
    parts = []
    for c in item.get("content") or []:
        if not isinstance(c, dict):
            continue
        for key in ("text", "transcript"):
            if isinstance(c.get(key), str):
                parts.append(c[key])
                break
    return " ".join(p.strip() for p in parts if p and p.strip())


def validate_item(event: dict[str, Any]) -> dict[str, Any]:
    """Check a ``conversation.item.create`` item; return a normalised copy with an id."""
    eid = event.get("event_id")
    item = field_of(event, "item", dict)
    itype = item.get("type", "message")
    if itype != "message":
        raise ProtocolError(f"conversation.item.create: item type {itype!r} is not supported (only 'message')",
                            param="item.type", event_id=eid, code="unsupported_item_type")
    role = item.get("role")
    if role not in ("user", "assistant", "system"):
        raise ProtocolError("conversation.item.create: role must be user, assistant or system", param="item.role",
                            event_id=eid, code="invalid_value")
    content = item.get("content")
    if not isinstance(content, list) or not content:
        raise ProtocolError("conversation.item.create: content must be a non-empty list", param="item.content",
                            event_id=eid, code="invalid_value")
    out = []
    for c in content:
        if not isinstance(c, dict) or c.get("type") not in ("input_text", "text", "output_text") or not isinstance(
                c.get("text"), str):
            raise ProtocolError("conversation.item.create: only text content (input_text / output_text with "
                                "'text') is supported", param="item.content", event_id=eid, code="invalid_value")
        if len(c["text"]) > MAX_ITEM_TEXT_CHARS:
            raise ProtocolError(f"conversation.item.create: a text is limited to {MAX_ITEM_TEXT_CHARS} characters",
                                param="item.content", event_id=eid, code="invalid_value")
        ctype = "input_text" if role in ("user", "system") else "output_text"
        out.append({"type": ctype, "text": c["text"]})
    item_id = item.get("id") if isinstance(item.get("id"), str) else new_id("item")
    return {"id": item_id, "object": "realtime.item", "type": "message", "role": role, "status": "completed",
            "content": out}


def parse_item(event: dict[str, Any]) -> dict[str, Any]:
    """A client's ``conversation.item.create`` item, checked: a message, or a function call or its output."""
    item = field_of(event, "item", dict)
    if item.get("type") not in ("function_call", "function_call_output"):
        return validate_item(event)
    try:
        return tools.function_item(item)
    except tools.ToolError as e:
        raise ProtocolError(f"conversation.item.create: {e}", param=e.param, event_id=event.get("event_id"),
                            code="invalid_value") from None


# -- the codec: typed events from the wire and to it ------------------------------------------------------------
def _truncate_event(event: dict[str, Any]) -> ev.ItemTruncate:
    return ev.ItemTruncate(event.get("event_id"), field_of(event, "item_id", str),
                           field_of(event, "content_index", int), field_of(event, "audio_end_ms", int))


_DECODERS: dict[str, Callable[[dict[str, Any]], ev.ClientEvent]] = {
    "session.update": lambda e: ev.SessionUpdate(e.get("event_id"), field_of(e, "session", dict)),
    "input_audio_buffer.append": lambda e: ev.AudioAppend(e.get("event_id"), decode_audio(e)),
    "input_audio_buffer.commit": lambda e: ev.AudioCommit(e.get("event_id")),
    "input_audio_buffer.clear": lambda e: ev.AudioClear(e.get("event_id")),
    "conversation.item.create": lambda e: ev.ItemCreate(e.get("event_id"), parse_item(e), e.get("previous_item_id")),
    "conversation.item.retrieve": lambda e: ev.ItemRetrieve(e.get("event_id"), field_of(e, "item_id", str)),
    "conversation.item.delete": lambda e: ev.ItemDelete(e.get("event_id"), field_of(e, "item_id", str)),
    "conversation.item.truncate": _truncate_event,
    "response.create": lambda e: ev.ResponseCreate(e.get("event_id"), parse_response(e)),
    "response.cancel": lambda e: ev.ResponseCancel(e.get("event_id")),
    "output_audio_buffer.clear": lambda e: ev.OutputAudioClear(e.get("event_id")),
}
"""One decoder per client event type (CLIENT_EVENTS): each checks the event's own fields."""
assert set(_DECODERS) == CLIENT_EVENTS


def decode_client_event(data: str | bytes) -> ev.ClientEvent:
    """One JSON client message as a typed event, every field the event carries checked: raise ProtocolError
    (naming the field) for anything malformed. Nothing is changed before this returns."""
    event = parse_text(data)
    return _DECODERS[event["type"]](event)


def decode_binary(data: bytes, *, enabled: bool) -> ev.AudioAppend:
    """A binary frame (the binary-audio extension): raw audio in the session's input format."""
    if not enabled:
        raise ProtocolError("binary frames need the binary-audio extension (connect with ?audio=binary)",
                            code="binary_not_enabled")
    if len(data) > MAX_BINARY_MESSAGE:
        raise ProtocolError(f"binary frame of {len(data)} bytes exceeds {MAX_BINARY_MESSAGE}",
                            code="message_too_large")
    return ev.AudioAppend(None, data)


def encode_server_event(event: ev.ServerEvent, *, beta_names: bool = False) -> dict[str, Any]:
    """A server event as the JSON object that goes on the wire (``encode_event`` makes it text), with a new
    ``event_id``; ``beta_names``: the older names of the events that were renamed (BETA_NAMES)."""
    etype = BETA_NAMES.get(event.TYPE, event.TYPE) if beta_names else event.TYPE
    return {"type": etype, **event.payload(), "event_id": new_id("event")}


def error_of(err: ProtocolError) -> ev.Error:
    """The ``error`` event that reports ``err``."""
    return ev.Error({"type": err.error_type, "code": err.code, "message": err.message, "param": err.param,
                     "event_id": err.event_id})
