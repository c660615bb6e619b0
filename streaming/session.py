"""The Realtime front door of one conversation: client events in (decoded and checked by the codec in
``protocol.py``, one handler per event type), the voice core's events out as Realtime server events (typed in
``events.py``, encoded by the codec). Socket-free: the server hands it messages and gives it a ``send``
callable that receives each event as the JSON object that goes on the wire (or bytes, for binary audio);
tests drive it the same way.

The conversation itself (turns, VAD, barge-in, history, responses) is the VoiceCore (``voice/core.py``); this
module knows how the Realtime API shows it: items and content parts, event names, audio encoding."""

from __future__ import annotations

import json
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any

import numpy as np
from stemme.streaming import events as ev
from stemme.streaming.protocol import (
    BETA_NAMES,
    SessionConfig,
    decode_binary,
    decode_client_event,
    encode_server_event,
    error_of,
    new_id,
)
from stemme.voice import core
from stemme.voice.audio import ASR_RATE, StreamResampler, g711_to_float, pcm16_to_float
from stemme.voice.core import ResponseRun, VoiceCore
from stemme.voice.pipeline import Stages, TurnMarks

from stemme.engines import Engines
from stemme.errors import ProtocolError, StemmeError
from stemme.logsafe import clip

logger = logging.getLogger(__name__)

AUDIO_CHUNK_BYTES = 9600
"""Bytes of 24 kHz PCM16 per audio delta (200 ms)."""
RESPONSES_PER_MINUTE = 30
"""response.create per session and minute (voice turns are paced by speech itself)."""

Send = Callable[[dict[str, Any] | bytes], None]
Handler = Callable[[Any], Awaitable[None]]
"""A client event's handler (each takes its own event type)."""


class Session:
    """One Realtime session: the interface the server uses is the constructor, ``start()``, ``handle_text()`` /
    ``handle_binary()`` for each message, the ``send`` callback, ``error_event()``, ``cancel_response()``,
    ``response``, ``active_tasks`` and ``close()``."""

    def __init__(self, engines: Engines, stages: Stages, send: Send, *, binary_audio: bool = False,
                 beta_names: bool = False, session_id: str | None = None,
                 allowed_languages: tuple[str, ...] | None = None, metrics: Any = None,
                 max_turn_seconds: float = 30.0) -> None:
        self.engines = engines
        self.stages = stages
        self.metrics = metrics
        self._send = send
        self.binary_audio = binary_audio
        self.id = session_id or new_id("sess")
        self.config = SessionConfig(beta_names=beta_names)
        self.core = VoiceCore(engines, stages, self._on_core, self.config, conversation_id=self.id,
                              allowed_languages=allowed_languages, metrics=metrics,
                              max_turn_seconds=max_turn_seconds)
        self._resampler: StreamResampler | None = None
        self._resampler_key: tuple[str, int] | None = None
        self._created: deque[float] = deque()
        """monotonic() times of the last minute's response.create."""
        self._handlers: dict[type[ev.ClientEvent], Handler] = {
            ev.SessionUpdate: self._on_session_update, ev.AudioAppend: self._on_append,
            ev.AudioCommit: self._on_commit, ev.AudioClear: self._on_clear, ev.ItemCreate: self._on_item_create,
            ev.ItemRetrieve: self._on_item_retrieve, ev.ItemDelete: self._on_item_delete,
            ev.ItemTruncate: self._on_item_truncate, ev.ResponseCreate: self._on_response_create,
            ev.ResponseCancel: self._on_response_cancel, ev.OutputAudioClear: self._on_output_clear,
        }
        """One handler per client event type."""

    # ---- the conversation's state, as the server and tests read it ------------------------------------------
    @property
    def response(self) -> ResponseRun | None:
        return self.core.response

    @property
    def _response_starting(self) -> bool:
        return self.core.response_starting

    @_response_starting.setter
    def _response_starting(self, value: bool) -> None:
        self.core.response_starting = value

    @property
    def items(self) -> list[dict[str, Any]]:
        return self.core.items

    @property
    def timelines(self) -> dict[str, list[tuple[int, int, str]]]:
        return self.core.timelines

    @property
    def turns(self) -> int:
        return self.core.turns

    @property
    def latencies(self) -> list[dict[str, Any]]:
        return self.core.latencies

    @property
    def closed(self) -> bool:
        return self.core.closed

    @property
    def allowed_languages(self) -> tuple[str, ...] | None:
        return self.core.allowed_languages

    @property
    def active_tasks(self) -> int:
        return self.core.active_tasks

    # ---- output ---------------------------------------------------------------------------------------
    def send(self, event: ev.ServerEvent | dict[str, Any]) -> None:
        """Send a server event (a typed one, or a JSON object a caller built, such as the server's own)."""
        if self.closed:
            return
        if isinstance(event, ev.ServerEvent):
            self._send(encode_server_event(event, beta_names=self.config.beta_names))
            return
        event.setdefault("event_id", new_id("event"))
        if self.config.beta_names:
            event["type"] = BETA_NAMES.get(event["type"], event["type"])
        self._send(event)

    def error(self, err: ProtocolError) -> None:
        logger.info("session=%s client error %s: %s", self.id, err.code, clip(err.message, 200))
        if self.metrics is not None:
            self.metrics.errors.labels(err.code).inc()
        self.send(error_of(err))

    def error_event(self, code: str, message: str) -> None:
        self.error(ProtocolError(message, code=code, error_type="server_error"))

    async def start(self) -> None:
        self.send(ev.SessionCreated(self.config.to_json()))

    # ---- input ----------------------------------------------------------------------------------------
    async def handle_text(self, data: str | bytes) -> None:
        event: ev.ClientEvent | None = None
        try:
            event = decode_client_event(data)
            await self._handlers[type(event)](event)
        except ProtocolError as e:
            self.error(e)
        except StemmeError as e:
            self.error(ProtocolError(str(e), code=e.code, error_type="server_error"))
        except Exception as e:  # noqa: BLE001 - a bug must not end the session: logged in full, reported
            logger.exception("session=%s failed on %s", self.id, type(event).__name__ if event else "a message")
            self.error_event("internal_error", f"the server failed ({type(e).__name__}); the session goes on")

    async def handle_binary(self, data: bytes) -> None:
        try:
            await self._on_append(decode_binary(data, enabled=self.binary_audio))
        except ProtocolError as e:
            self.error(e)
        except Exception as e:  # noqa: BLE001 - a bug must not end the session: logged in full, reported
            logger.exception("session=%s failed on a binary frame", self.id)
            self.error_event("internal_error", f"the server failed ({type(e).__name__}); the session goes on")

    async def _on_session_update(self, e: ev.SessionUpdate) -> None:
        self.config.apply(e.session, e.event_id)  # all or nothing
        self.core.reset_vad()  # rebuilt with the new parameters
        self.send(ev.SessionUpdated(self.config.to_json()))

    async def _on_append(self, e: ev.AudioAppend) -> None:
        if not e.audio:
            return
        try:
            x = self._to_16k(e.audio)
        except StemmeError as err:
            raise ProtocolError(str(err), code="invalid_audio_format", param="audio", event_id=e.event_id) from None
        await self.core.feed(x, e.event_id)

    async def _on_commit(self, e: ev.AudioCommit) -> None:
        self.core.commit(e.event_id)

    async def _on_clear(self, e: ev.AudioClear) -> None:
        self.core.clear_input()

    async def _on_item_create(self, e: ev.ItemCreate) -> None:
        self.core.insert_item(e.item, e.previous_item_id, e.event_id)

    async def _on_item_retrieve(self, e: ev.ItemRetrieve) -> None:
        self.send(ev.ItemRetrieved(self.core.find_item(e.item_id, e.event_id)))

    async def _on_item_delete(self, e: ev.ItemDelete) -> None:
        self.core.delete_item(e.item_id, e.event_id)
        self.send(ev.ItemDeleted(e.item_id))

    async def _on_item_truncate(self, e: ev.ItemTruncate) -> None:
        self.core.truncate(e.item_id, e.content_index, e.audio_end_ms, e.event_id)

    async def _on_response_create(self, e: ev.ResponseCreate) -> None:
        if self.response is not None or self._response_starting:
            raise ProtocolError("a response is already in progress; cancel it first",
                                code="conversation_already_has_active_response", event_id=e.event_id)
        self._rate_limit(e.event_id)
        now = time.perf_counter()
        self._response_starting = True  # until the response registers itself, a second create is refused
        self.core.spawn(self._respond(TurnMarks(speech_end=now, turn_detected=now), None, e.overrides.as_dict()),
                        response=True)

    async def _respond(self, marks: TurnMarks, language_hint: str | None, overrides: dict[str, Any]) -> None:
        await self.core.respond(marks, language_hint, overrides)

    async def _on_response_cancel(self, e: ev.ResponseCancel) -> None:
        if self.response is None:
            raise ProtocolError("no response is in progress", code="response_cancel_not_active", event_id=e.event_id)
        await self.cancel_response("client_cancelled")

    async def _on_output_clear(self, e: ev.OutputAudioClear) -> None:
        if self.response is not None:
            await self.cancel_response("client_cancelled")
        self.send(ev.OutputAudioBufferCleared(None))

    def _rate_limit(self, eid: str | None) -> None:
        """At most RESPONSES_PER_MINUTE responses asked for by response.create in any minute: the language model
        is shared, and one client looping on response.create must not take it from the others."""
        now = time.monotonic()
        while self._created and now - self._created[0] > 60:
            self._created.popleft()
        if len(self._created) >= RESPONSES_PER_MINUTE:
            raise ProtocolError(f"more than {RESPONSES_PER_MINUTE} responses in a minute; wait a little",
                                code="rate_limit_exceeded", event_id=eid)
        self._created.append(now)

    def _to_16k(self, data: bytes) -> np.ndarray:
        """The edge: audio in the session's input format, as 16 kHz mono float for the core."""
        fmt = self.config.input_format
        if fmt == "audio/pcm":
            x = pcm16_to_float(data)
            rate = self.config.input_rate
        else:
            x = g711_to_float(data, "pcmu" if fmt == "audio/pcmu" else "pcma")
            rate = 8000
        key = (fmt, rate)
        if self._resampler is None or self._resampler_key != key:
            self._resampler = StreamResampler(rate, ASR_RATE)
            self._resampler_key = key
        return self._resampler(x)

    # ---- the core's events, as Realtime events ----------------------------------------------------------
    def _on_core(self, event: core.CoreEvent) -> None:
        for out in _realtime(event, self):
            self.send(out)
        if isinstance(event, core.ClauseSpoken) and self.binary_audio and not self.closed:
            for chunk in _chunks(event.pcm16):
                self._send(chunk)
        elif isinstance(event, core.Failure):
            self.error_event(event.code, event.message)

    def response_json(self, run: ResponseRun, status: str) -> dict[str, Any]:
        return {"id": run.id, "object": "realtime.response", "status": status, "output": list(run.output),
                "output_modalities": ["audio"] if run.audio_out else ["text"], "conversation_id": self.id}

    async def cancel_response(self, reason: str) -> None:
        """Barge-in / response.cancel: stop LLM and TTS now, tell the client to drop buffered audio."""
        await self.core.cancel_response(reason)

    async def close(self) -> None:
        """The client is gone: cancel every piece of work of this session."""
        await self.core.close()


def _chunks(pcm: bytes) -> list[bytes]:
    return [pcm[i:i + AUDIO_CHUNK_BYTES] for i in range(0, len(pcm), AUDIO_CHUNK_BYTES)]


def _ids(run: ResponseRun, item: dict[str, Any], index: int) -> tuple[str, str, int, int]:
    """A content event's (response_id, item_id, output_index, content_index)."""
    return run.id, item["id"], index, 0


def _realtime(event: core.CoreEvent, s: Session) -> list[ev.ServerEvent]:
    """The Realtime events that show a core event (binary audio and failures are sent by the caller)."""
    mapper = _MAPPERS.get(type(event))
    return mapper(event, s) if mapper is not None else []


def _transcript(e: core.TranscriptReady, s: Session) -> list[ev.ServerEvent]:
    t = e.transcript
    return [ev.TranscriptionDelta(e.item_id, 0, t.text),
            ev.TranscriptionCompleted(e.item_id, 0, t.text, {"type": "duration", "seconds": round(t.audio_seconds, 3)},
                                      {"language": t.language, "language_probability": round(t.language_probability, 3),
                                       "asr_ms": round(t.seconds * 1000)})]


def _message_started(e: core.MessageStarted, s: Session) -> list[ev.ServerEvent]:
    part = {"type": "audio", "transcript": ""} if e.run.audio_out else {"type": "text", "text": ""}
    return [ev.OutputItemAdded(e.run.id, e.index, e.item), ev.ItemAdded(e.previous_item_id, e.item),
            ev.ContentPartAdded(*_ids(e.run, e.item, e.index), part)]


def _clause(e: core.ClauseSpoken, s: Session) -> list[ev.ServerEvent]:
    ids = _ids(e.run, e.item, e.index)
    out: list[ev.ServerEvent] = [ev.OutputAudioTranscriptDelta(*ids, e.text)]
    if not s.binary_audio:
        out += [ev.OutputAudioDelta(*ids, chunk) for chunk in _chunks(e.pcm16)]
    return out


def _function_call(e: core.FunctionCalled, s: Session) -> list[ev.ServerEvent]:
    run, item, call = e.run, e.item, e.call
    announced = {**item, "status": "in_progress", "arguments": ""}
    ref = (run.id, item["id"], e.index, call.id)
    return [ev.OutputItemAdded(run.id, e.index, announced), ev.ItemAdded(e.previous_item_id, announced),
            ev.FunctionCallArgumentsDelta(*ref, call.arguments),
            ev.FunctionCallArgumentsDone(*ref, call.name, call.arguments),
            ev.OutputItemDone(run.id, e.index, item), ev.ItemDone(e.previous_item_id, item)]


def _message_finished(e: core.MessageFinished, s: Session) -> list[ev.ServerEvent]:
    ids = _ids(e.run, e.item, e.index)
    out: list[ev.ServerEvent]
    if e.run.audio_out:
        out = [ev.OutputAudioDone(*ids), ev.OutputAudioTranscriptDone(*ids, e.text)]
        part = {"type": "audio", "transcript": e.text}
    else:
        out = [ev.OutputTextDone(*ids, e.text)]
        part = {"type": "text", "text": e.text}
    return out + [ev.ContentPartDone(*ids, part), ev.OutputItemDone(e.run.id, e.index, e.item),
                  ev.ItemDone(e.previous_item_id, e.item)]


def _response_finished(e: core.ResponseFinished, s: Session) -> list[ev.ServerEvent]:
    resp = s.response_json(e.run, e.status)
    resp["metadata"] = {"stemme_latency": json.dumps(e.report, separators=(",", ":"))}
    if e.status == "cancelled":
        resp["status_details"] = {"type": "cancelled", "reason": e.run.reason or "client_cancelled"}
    if e.error:
        resp["status_details"] = {"type": "failed", "error": e.error}
    return [ev.ResponseDone(resp, {"latency": e.report})]


_MAPPERS: dict[type, Callable[[Any, Session], list[ev.ServerEvent]]] = {
    core.UserSpeechStarted: lambda e, s: [ev.InputSpeechStarted(e.audio_start_ms, e.item_id)],
    core.UserSpeechStopped: lambda e, s: [ev.InputSpeechStopped(e.audio_end_ms, e.item_id)],
    core.AudioCommitted: lambda e, s: [ev.InputAudioBufferCommitted(e.previous_item_id, e.item_id)],
    core.ItemInserted: lambda e, s: [ev.ItemAdded(e.previous_item_id, e.item), ev.ItemDone(e.previous_item_id, e.item)],
    core.InputCleared: lambda e, s: [ev.InputAudioBufferCleared()],
    core.TranscriptReady: _transcript,
    core.TranscriptFailed: lambda e, s: [ev.TranscriptionFailed(e.item_id, 0, {"type": "server_error",
                                                                                "message": e.message})],
    core.ResponseStarted: lambda e, s: [ev.ResponseCreated(s.response_json(e.run, "in_progress"))],
    core.MessageStarted: _message_started,
    core.ClauseSpoken: _clause,
    core.TextWritten: lambda e, s: [ev.OutputTextDelta(*_ids(e.run, e.item, e.index), e.text)],
    core.FunctionCalled: _function_call,
    core.MessageFinished: _message_finished,
    core.ResponseFinished: _response_finished,
    core.PlaybackCleared: lambda e, s: [ev.OutputAudioBufferCleared(e.response_id)],
    core.ItemTruncated: lambda e, s: [ev.ItemTruncated(e.item_id, e.content_index, e.audio_end_ms)],
}
"""One mapping per core event type (Failure: an error event, sent by Session._on_core)."""
