"""The OpenAI Realtime API event protocol, sans-I/O: parse and validate client events, build server events,
and hold the session configuration. No sockets, no asyncio: tested on plain values.

GA event names are emitted; a session may ask for the older beta names (``response.audio.delta``...) with
``?event_names=beta`` or ``session.update`` ``{"session": {"stemme": {"event_names": "beta"}}}``.
"""

from __future__ import annotations

import base64
import binascii
import json
import secrets
from dataclasses import dataclass, field
from typing import Any

from stemme.voice import languages

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


class ProtocolError(Exception):
    """A client event that cannot be honoured; becomes an ``error`` event, the session goes on."""

    def __init__(self, message: str, *, code: str = "invalid_request_error", param: str | None = None,
                 event_id: str | None = None, error_type: str = "invalid_request_error") -> None:
        super().__init__(message)
        self.message = message
        self.code = code
        self.param = param
        self.event_id = event_id
        self.error_type = error_type


def new_id(prefix: str) -> str:
    return f"{prefix}_{secrets.token_hex(10)}"


def error_event(err: ProtocolError) -> dict[str, Any]:
    return {"type": "error", "event_id": new_id("event"), "error": {
        "type": err.error_type, "code": err.code, "message": err.message, "param": err.param,
        "event_id": err.event_id}}


def parse_text(data: str | bytes) -> dict[str, Any]:
    """Parse one JSON client message; raise ProtocolError for anything malformed."""
    if len(data) > MAX_TEXT_MESSAGE:
        raise ProtocolError(f"message of {len(data)} bytes exceeds the limit of {MAX_TEXT_MESSAGE} bytes",
                            code="message_too_large")
    try:
        event = json.loads(data)
    except (ValueError, UnicodeDecodeError) as e:
        raise ProtocolError(f"malformed JSON: {e}", code="invalid_json") from None
    if not isinstance(event, dict):
        raise ProtocolError("an event must be a JSON object", code="invalid_event")
    event_id = event.get("event_id")
    if event_id is not None and not isinstance(event_id, str):
        raise ProtocolError("event_id must be a string", param="event_id", code="invalid_type")
    etype = event.get("type")
    if not isinstance(etype, str):
        raise ProtocolError("missing or non-string 'type'", param="type", event_id=event_id,
                            code="invalid_event")
    if etype not in CLIENT_EVENTS:
        raise ProtocolError(f"unknown event type {etype!r}", param="type", event_id=event_id,
                            code="unknown_event_type")
    return event


def field_of(event: dict[str, Any], name: str, kind: type | tuple[type, ...], *, required: bool = True,
             default: Any = None) -> Any:
    value = event.get(name, default)
    if value is None:
        if required:
            raise ProtocolError(f"{event['type']}: missing '{name}'", param=name, event_id=event.get("event_id"),
                                code="missing_required_parameter")
        return default
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        kinds = kind if isinstance(kind, tuple) else (kind,)
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

    def apply(self, session: dict[str, Any], event_id: str | None = None) -> None:
        """Apply a ``session.update`` payload (GA shape, and the beta flat fields); validate every field."""

        def bad(msg: str, param: str) -> ProtocolError:
            return ProtocolError(f"session.update: {msg}", param=f"session.{param}", event_id=event_id,
                                 code="invalid_value")

        if not isinstance(session, dict):
            raise bad("'session' must be an object", "")
        new = SessionConfig(**{k: getattr(self, k) for k in self.__dataclass_fields__})
        if "instructions" in session:
            if session["instructions"] is not None and not isinstance(session["instructions"], str):
                raise bad("'instructions' must be a string", "instructions")
            new.instructions = session["instructions"]
        mods = session.get("output_modalities", session.get("modalities"))
        if mods is not None:
            if not isinstance(mods, list) or not mods or any(m not in ("audio", "text") for m in mods):
                raise bad("'output_modalities' must be ['audio'] or ['text']", "output_modalities")
            new.output_modalities = ["audio"] if "audio" in mods else ["text"]
        audio = session.get("audio") or {}
        if not isinstance(audio, dict):
            raise bad("'audio' must be an object", "audio")
        inp = audio.get("input") or {}
        out = audio.get("output") or {}
        if not isinstance(inp, dict) or not isinstance(out, dict):
            raise bad("'audio.input' and 'audio.output' must be objects", "audio")
        fmt = inp.get("format")
        if "input_audio_format" in session:  # beta
            fmt = {"pcm16": {"type": "audio/pcm", "rate": 24000}, "g711_ulaw": {"type": "audio/pcmu"},
                   "g711_alaw": {"type": "audio/pcma"}}.get(session["input_audio_format"], {"type": "?"})
        if fmt is not None:
            if not isinstance(fmt, dict) or fmt.get("type") not in ("audio/pcm", "audio/pcmu", "audio/pcma"):
                raise bad("audio.input.format.type must be audio/pcm, audio/pcmu or audio/pcma", "audio.input.format")
            new.input_format = fmt["type"]
            rate = fmt.get("rate", 24000 if fmt["type"] == "audio/pcm" else 8000)
            if fmt["type"] == "audio/pcm" and rate not in (16000, 24000):
                raise bad("audio/pcm input rate must be 16000 or 24000", "audio.input.format.rate")
            new.input_rate = int(rate) if fmt["type"] == "audio/pcm" else 8000
        ofmt = out.get("format")
        if ofmt is not None and (not isinstance(ofmt, dict) or ofmt.get("type") != "audio/pcm"
                                 or ofmt.get("rate", 24000) != 24000):
            raise bad("output format must be audio/pcm at 24000 Hz", "audio.output.format")
        trans = inp.get("transcription", session.get("input_audio_transcription"))
        if trans is not None:
            if not isinstance(trans, dict):
                raise bad("'transcription' must be an object", "audio.input.transcription")
            lang = trans.get("language")
            if lang is not None and not isinstance(lang, str):
                raise bad("transcription.language must be a string", "audio.input.transcription.language")
            new.transcription_language = languages.normalise(lang)
            if isinstance(trans.get("model"), str):
                new.transcription_model = trans["model"]
        td_key_present = "turn_detection" in inp or "turn_detection" in session
        if td_key_present:
            td = inp["turn_detection"] if "turn_detection" in inp else session["turn_detection"]
            if td is None:
                new.turn_detection = None
            elif not isinstance(td, dict) or td.get("type") not in ("server_vad", "semantic_vad"):
                raise bad("turn_detection must be null or of type server_vad / semantic_vad",
                          "audio.input.turn_detection")
            else:
                cur = new.turn_detection or TurnDetection()
                t = TurnDetection(type=td["type"])
                try:
                    t.threshold = float(td.get("threshold", cur.threshold))
                    t.prefix_padding_ms = int(td.get("prefix_padding_ms", cur.prefix_padding_ms))
                    t.silence_duration_ms = int(td.get("silence_duration_ms", cur.silence_duration_ms))
                except (TypeError, ValueError):
                    raise bad("turn_detection numbers are malformed", "audio.input.turn_detection") from None
                if td["type"] == "semantic_vad":
                    t.eagerness = str(td.get("eagerness", "auto"))
                    if t.eagerness not in _EAGERNESS_SILENCE:
                        raise bad("eagerness must be low, medium, high or auto", "audio.input.turn_detection")
                    t.silence_duration_ms = _EAGERNESS_SILENCE[t.eagerness]
                t.create_response = bool(td.get("create_response", True))
                t.interrupt_response = bool(td.get("interrupt_response", True))
                if not (0.0 < t.threshold < 1.0) or not (0 <= t.prefix_padding_ms <= 2000) or not (
                        100 <= t.silence_duration_ms <= 5000):
                    raise bad("turn_detection values out of range (0<threshold<1, prefix_padding_ms 0..2000, "
                              "silence_duration_ms 100..5000)", "audio.input.turn_detection")
                new.turn_detection = t
        voice = out.get("voice", session.get("voice"))
        if voice is not None:
            if not isinstance(voice, str):
                raise bad("voice must be a string", "audio.output.voice")
            new.voice = voice
        speed = out.get("speed", session.get("speed"))
        if speed is not None:
            if not isinstance(speed, (int, float)) or not (0.25 <= speed <= 4.0):
                raise bad("speed must be a number in 0.25..4", "audio.output.speed")
            new.speed = float(speed)
        mot = session.get("max_output_tokens", session.get("max_response_output_tokens"))
        if mot is not None:
            if mot == "inf":
                new.max_output_tokens = None
            elif not isinstance(mot, int) or isinstance(mot, bool) or not (1 <= mot <= 4096):
                raise bad("max_output_tokens must be an integer in 1..4096 or 'inf'", "max_output_tokens")
            else:
                new.max_output_tokens = mot
        ext = session.get("stemme")
        if isinstance(ext, dict) and "event_names" in ext:
            new.beta_names = ext["event_names"] == "beta"
        if isinstance(session.get("model"), str):
            new.model = session["model"]
        self.__dict__.update(new.__dict__)

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
            "tools": [],
            "tool_choice": "auto",
        }


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
        ctype = "input_text" if role in ("user", "system") else "output_text"
        out.append({"type": ctype, "text": c["text"]})
    item_id = item.get("id") if isinstance(item.get("id"), str) else new_id("item")
    return {"id": item_id, "object": "realtime.item", "type": "message", "role": role, "status": "completed",
            "content": out}
