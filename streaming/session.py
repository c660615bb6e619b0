"""One client session: the Realtime protocol state machine over the turn pipeline. Socket-free: the server
hands it messages and gives it a ``send`` callable; tests drive it the same way."""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import os
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from stemme.streaming.protocol import (
    BETA_NAMES,
    MAX_BINARY_MESSAGE,
    ProtocolError,
    SessionConfig,
    decode_audio,
    error_event,
    field_of,
    item_text,
    new_id,
    parse_response,
    parse_text,
    validate_item,
)
from stemme.streaming.tools import ToolError, call_item, chat_message, chat_tool_choice, chat_tools, function_item
from stemme.voice.asr import AsrOptions
from stemme.voice.audio import ASR_RATE, StreamResampler, g711_to_float, pcm16_to_float
from stemme.voice.llm import DEFAULT_INSTRUCTIONS, TOOLS_INSTRUCTIONS, Conversation, ToolCall
from stemme.voice.pipeline import SpokenClause, Stages, TextPiece, TurnMarks, respond, transcribe
from stemme.voice.vad import SpeechPaused, SpeechStarted, SpeechStopped, VadOptions, VadStream

from stemme.engines import Engines
from stemme.errors import StemmeError
from stemme.logsafe import clip

logger = logging.getLogger(__name__)

AUDIO_CHUNK_BYTES = 9600
"""Bytes of 24 kHz PCM16 per audio delta (200 ms)."""
MAX_BUFFER_SECONDS = 60.0
"""Manual-commit input buffer limit."""
LOG_CONTENT = os.environ.get("STEMME_LOG_CONTENT", "") == "1"
"""Privacy: transcripts and replies appear in logs only when the operator sets STEMME_LOG_CONTENT=1."""

RESPONSES_PER_MINUTE = 30
"""response.create per session and minute (voice turns are paced by speech itself)."""

Send = Callable[[dict[str, Any] | bytes], None]


@dataclass
class ResponsePlan:
    """What one response does (the session's configuration with response.create's overrides)."""

    language: str | None
    audio_out: bool
    max_tokens: int
    instructions: str | None
    voice: str | None
    tools: list[dict[str, Any]] | None
    """Chat-completions shape."""
    tool_choice: str | dict[str, Any]


@dataclass
class ResponseRun:
    id: str
    audio_out: bool = True
    cancel: threading.Event = field(default_factory=threading.Event)
    task: asyncio.Task | None = None
    reason: str | None = None
    output: list[dict[str, Any]] = field(default_factory=list)
    """The response's output items in order: its message (opened with the first words) and function calls."""
    message: dict[str, Any] | None = None
    text_out: list[str] = field(default_factory=list)
    timeline: list[tuple[int, int, str]] = field(default_factory=list)
    """(start_ms, end_ms, text) of each clause sent."""
    audio_ms: int = 0

    def ids(self, item: dict[str, Any], index: int) -> dict[str, Any]:
        return {"response_id": self.id, "item_id": item["id"], "output_index": index, "content_index": 0}


class Session:
    def __init__(self, engines: Engines, stages: Stages, send: Send, *, binary_audio: bool = False,
                 beta_names: bool = False, session_id: str | None = None,
                 allowed_languages: tuple[str, ...] | None = None, metrics: Any = None,
                 max_turn_seconds: float = 30.0) -> None:
        self.engines = engines
        self.stages = stages
        self.metrics = metrics
        self.max_turn_seconds = max_turn_seconds
        self._send = send
        self.binary_audio = binary_audio
        self.id = session_id or new_id("sess")
        self.config = SessionConfig(beta_names=beta_names)
        self.allowed_languages = allowed_languages or engines.config.languages
        self.items: list[dict[str, Any]] = []
        self.timelines: dict[str, list[tuple[int, int, str]]] = {}
        self._buffer: list[np.ndarray] = []
        self._buffer_samples = 0
        self._resampler: StreamResampler | None = None
        self._resampler_key: tuple[str, int] | None = None
        self._vad: VadStream | None = None
        self._arrivals: deque[tuple[int, float]] = deque(maxlen=2000)
        self._samples_in = 0
        self._vad_offset = 0
        """Input samples received before the current VAD stream began (its clock starts there)."""
        self._speech_item: str | None = None
        self._speculative: tuple[int, asyncio.Task] | None = None
        """(samples, ASR task) started when speech paused, reused if the turn ends without more speech."""
        self._turn_lock = asyncio.Lock()
        self._tasks: set[asyncio.Task] = set()
        self.response: ResponseRun | None = None
        self._response_starting = False
        self._playback: tuple[str, str, float, float] | None = None
        """(response_id, item_id, perf time of the first audio sent, seconds sent) of the last finished
        response: the server sends audio faster than real time, so the client may still be playing it."""
        self._created: deque[float] = deque()
        """monotonic() times of the last minute's response.create."""
        self.closed = False
        self.turns = 0
        self.latencies: list[dict[str, Any]] = []

    # ---- output ---------------------------------------------------------------------------------------
    def send(self, event: dict[str, Any]) -> None:
        if self.closed:
            return
        event.setdefault("event_id", new_id("event"))
        if self.config.beta_names and event["type"] in BETA_NAMES:
            event["type"] = BETA_NAMES[event["type"]]
        self._send(event)

    def error(self, err: ProtocolError) -> None:
        logger.info("session=%s client error %s: %s", self.id, err.code, clip(err.message, 200))
        if self.metrics is not None:
            self.metrics.errors.labels(err.code).inc()
        self.send(error_event(err))

    def error_event(self, code: str, message: str) -> None:
        self.error(ProtocolError(message, code=code, error_type="server_error"))

    async def start(self) -> None:
        self.send({"type": "session.created", "session": self.config.to_json()})

    # ---- input ----------------------------------------------------------------------------------------
    async def handle_text(self, data: str | bytes) -> None:
        event: dict[str, Any] = {}
        try:
            event = parse_text(data)
            await self._dispatch(event)
        except ProtocolError as e:
            self.error(e)
        except StemmeError as e:
            self.error(ProtocolError(str(e), code=e.code, error_type="server_error"))
        except Exception as e:  # noqa: BLE001 - a bug must not end the session: logged in full, reported
            logger.exception("session=%s failed on %s", self.id, event.get("type", "a message"))
            self.error_event("internal_error", f"the server failed ({type(e).__name__}); the session goes on")

    async def handle_binary(self, data: bytes) -> None:
        try:
            if not self.binary_audio:
                raise ProtocolError("binary frames need the binary-audio extension (connect with ?audio=binary)",
                                    code="binary_not_enabled")
            if len(data) > MAX_BINARY_MESSAGE:
                raise ProtocolError(f"binary frame of {len(data)} bytes exceeds {MAX_BINARY_MESSAGE}",
                                    code="message_too_large")
            await self._append_audio(data)
        except ProtocolError as e:
            self.error(e)
        except Exception as e:  # noqa: BLE001 - a bug must not end the session: logged in full, reported
            logger.exception("session=%s failed on a binary frame", self.id)
            self.error_event("internal_error", f"the server failed ({type(e).__name__}); the session goes on")

    async def _dispatch(self, event: dict[str, Any]) -> None:
        t = event["type"]
        eid = event.get("event_id")
        if t == "input_audio_buffer.append":
            await self._append_audio(decode_audio(event), eid)
        elif t == "session.update":
            self.config.apply(field_of(event, "session", dict), eid)
            self._vad = None  # rebuilt with the new parameters
            self.send({"type": "session.updated", "session": self.config.to_json()})
        elif t == "input_audio_buffer.commit":
            await self._commit(eid)
        elif t == "input_audio_buffer.clear":
            self._buffer.clear()
            self._buffer_samples = 0
            if self._vad:
                self._vad.reset()
            self.send({"type": "input_audio_buffer.cleared"})
        elif t == "conversation.item.create":
            self._insert_item(self._new_item(event), event.get("previous_item_id"))
        elif t == "conversation.item.retrieve":
            item = self._find_item(field_of(event, "item_id", str), eid)
            self.send({"type": "conversation.item.retrieved", "item": item})
        elif t == "conversation.item.delete":
            item = self._find_item(field_of(event, "item_id", str), eid)
            self.items.remove(item)
            self.send({"type": "conversation.item.deleted", "item_id": item["id"]})
        elif t == "conversation.item.truncate":
            self._truncate(event)
        elif t == "response.create":
            overrides = parse_response(event)  # every field checked before any flag is set
            if self.response is not None or self._response_starting:
                raise ProtocolError("a response is already in progress; cancel it first",
                                    code="conversation_already_has_active_response", event_id=eid)
            self._rate_limit(eid)
            marks = TurnMarks(speech_end=time.perf_counter(), turn_detected=time.perf_counter())
            self._response_starting = True  # until _respond registers itself, a second create is refused
            self._spawn(self._respond(marks, None, overrides.as_dict()), response=True)
        elif t == "response.cancel":
            if self.response is None:
                raise ProtocolError("no response is in progress", code="response_cancel_not_active", event_id=eid)
            await self.cancel_response("client_cancelled")
        elif t == "output_audio_buffer.clear":
            if self.response is not None:
                await self.cancel_response("client_cancelled")
            self.send({"type": "output_audio_buffer.cleared", "response_id": None})

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
        fmt = self.config.input_format
        if fmt == "audio/pcm":
            x = pcm16_to_float(data)
            rate = self.config.input_rate
        else:
            x = g711_to_float(data, "pcmu" if fmt == "audio/pcmu" else "pcma")
            rate = 8000
        key = (fmt, rate)
        if self._resampler_key != key:
            self._resampler = StreamResampler(rate, ASR_RATE)
            self._resampler_key = key
        assert self._resampler is not None
        return self._resampler(x)

    async def _append_audio(self, data: bytes, eid: str | None = None) -> None:
        if not data:
            return
        try:
            x = self._to_16k(data)
        except StemmeError as e:
            raise ProtocolError(str(e), code="invalid_audio_format", param="audio", event_id=eid) from None
        now = time.perf_counter()
        self._samples_in += len(x)
        self._arrivals.append((self._samples_in, now))
        td = self.config.turn_detection
        if td is None:
            if self._buffer_samples + len(x) > MAX_BUFFER_SECONDS * ASR_RATE:
                raise ProtocolError(f"input audio buffer is full ({MAX_BUFFER_SECONDS:.0f} s); commit or clear it",
                                    code="input_audio_buffer_full", event_id=eid)
            self._buffer.append(x)
            self._buffer_samples += len(x)
            return
        loop = asyncio.get_running_loop()
        if self._vad is None:
            opts = VadOptions(threshold=td.threshold, prefix_padding_ms=td.prefix_padding_ms,
                              silence_duration_ms=td.silence_duration_ms, max_speech_s=self.max_turn_seconds)
            turn = None
            if td.type == "semantic_vad":
                turn = await loop.run_in_executor(self.stages.vad, lambda: self.engines.turn)
                if turn is not None:
                    opts.silence_duration_ms, opts.complete_threshold = td.semantic()
            self._vad = VadStream(self.engines.vad, opts, turn.probability if turn is not None else None)
            self._vad_offset = self._samples_in - len(x)
        vad = self._vad
        events = await loop.run_in_executor(self.stages.vad, vad.feed, x)
        for ev in events:
            if isinstance(ev, SpeechStarted):
                self._speech_item = new_id("item")
                self.send({"type": "input_audio_buffer.speech_started",
                           "audio_start_ms": ev.audio_start_ms + self._offset_ms(), "item_id": self._speech_item})
                if td.interrupt_response and self.response is not None:
                    await self.cancel_response("turn_detected")
                elif td.interrupt_response:
                    self._interrupt_playback()
            elif isinstance(ev, SpeechPaused):
                if self._speculative is not None:
                    self._speculative[1].cancel()
                opts = self._asr_options()
                task = self._spawn(transcribe(self.engines, self.stages, ev.audio, opts))
                self._speculative = (len(ev.audio), task)
            elif isinstance(ev, SpeechStopped):
                item_id = self._speech_item or new_id("item")
                self._speech_item = None
                end_ms = ev.audio_end_ms + self._offset_ms()
                self.send({"type": "input_audio_buffer.speech_stopped", "audio_end_ms": end_ms, "item_id": item_id})
                marks = TurnMarks(speech_end=self._arrival_of(end_ms), turn_detected=time.perf_counter())
                if vad.last_probability is not None:
                    marks.extra["end_of_turn_probability"] = round(vad.last_probability, 3)
                self._commit_audio(ev.audio, item_id, marks, create_response=td.create_response)

    def _offset_ms(self) -> int:
        return int(self._vad_offset * 1000 / ASR_RATE)

    def _arrival_of(self, ms: int) -> float:
        """Wall time (perf_counter) at which the input sample at ``ms`` arrived."""
        target = ms * ASR_RATE // 1000
        for end, t in self._arrivals:
            if end >= target:
                return t
        return time.perf_counter()

    async def _commit(self, eid: str | None) -> None:
        if self._buffer_samples < ASR_RATE // 10:
            raise ProtocolError(f"input audio buffer too small to commit: {self._buffer_samples * 1000 // ASR_RATE} "
                                "ms, at least 100 ms needed", code="input_audio_buffer_commit_empty", event_id=eid)
        audio = np.concatenate(self._buffer)
        self._buffer.clear()
        self._buffer_samples = 0
        now = time.perf_counter()
        td = self.config.turn_detection
        self._commit_audio(audio, new_id("item"), TurnMarks(speech_end=now, turn_detected=now),
                           create_response=bool(td and td.create_response))

    def _commit_audio(self, audio: np.ndarray, item_id: str, marks: TurnMarks, *, create_response: bool) -> None:
        prev = self.items[-1]["id"] if self.items else None
        self.send({"type": "input_audio_buffer.committed", "previous_item_id": prev, "item_id": item_id})
        item = {"id": item_id, "object": "realtime.item", "type": "message", "role": "user", "status": "completed",
                "content": [{"type": "input_audio", "transcript": None}]}
        self._insert_item(item, prev)
        self._spawn(self._turn(item, audio, marks, create_response))

    @staticmethod
    def _new_item(event: dict[str, Any]) -> dict[str, Any]:
        """A client's conversation item, checked: a message, or a function call or its output."""
        item = field_of(event, "item", dict)
        if item.get("type") not in ("function_call", "function_call_output"):
            return validate_item(event)
        try:
            return function_item(item)
        except ToolError as e:
            raise ProtocolError(f"conversation.item.create: {e}", param=e.param, event_id=event.get("event_id"),
                                code="invalid_value") from None

    def _insert_item(self, item: dict[str, Any], previous_item_id: str | None) -> None:
        if previous_item_id and previous_item_id != "root":
            idx = next((i for i, it in enumerate(self.items) if it["id"] == previous_item_id), None)
            if idx is None:
                raise ProtocolError(f"previous_item_id {previous_item_id!r} not found", param="previous_item_id",
                                    code="item_not_found")
            self.items.insert(idx + 1, item)
        elif previous_item_id == "root":
            self.items.insert(0, item)
        else:
            self.items.append(item)
        i = self.items.index(item)
        prev = self.items[i - 1]["id"] if i > 0 else None
        self.send({"type": "conversation.item.added", "previous_item_id": prev, "item": item})
        self.send({"type": "conversation.item.done", "previous_item_id": prev, "item": item})

    def _find_item(self, item_id: str, eid: str | None) -> dict[str, Any]:
        for it in self.items:
            if it["id"] == item_id:
                return it
        raise ProtocolError(f"no conversation item {item_id!r}", param="item_id", event_id=eid, code="item_not_found")

    def _truncate(self, event: dict[str, Any]) -> None:
        eid = event.get("event_id")
        item = self._find_item(field_of(event, "item_id", str), eid)
        field_of(event, "content_index", int)
        end_ms = field_of(event, "audio_end_ms", int)
        if item.get("role") != "assistant":
            raise ProtocolError("only assistant audio items can be truncated", param="item_id", event_id=eid,
                                code="invalid_value")
        timeline = self.timelines.get(item["id"], [])
        total = timeline[-1][1] if timeline else 0
        if end_ms < 0 or end_ms > total:
            raise ProtocolError(f"audio_end_ms {end_ms} is outside the item's audio (0..{total} ms)",
                                param="audio_end_ms", event_id=eid, code="invalid_value")
        kept = []
        for start, end, text in timeline:
            if end <= end_ms:
                kept.append(text)
            elif start < end_ms:
                words = text.split()
                n = int(len(words) * (end_ms - start) / max(1, end - start))
                if n:
                    kept.append(" ".join(words[:n]))
        heard = " ".join(kept)
        for c in item["content"]:
            if "transcript" in c:
                c["transcript"] = heard
        self.timelines[item["id"]] = [t for t in timeline if t[0] < end_ms]
        self.send({"type": "conversation.item.truncated", "item_id": item["id"],
                   "content_index": event["content_index"], "audio_end_ms": end_ms})

    # ---- turns ----------------------------------------------------------------------------------------
    def _spawn(self, coro, *, response: bool = False) -> asyncio.Task:  # noqa: ANN001
        """Run ``coro`` as this session's task. A task that fails is a bug: it is logged with its traceback,
        the client gets an ``error`` event, and a response task's flags are cleared so the session is not
        wedged (``response`` marks a task started by response.create before it registers itself)."""
        task = asyncio.create_task(coro)
        self._tasks.add(task)

        def done(t: asyncio.Task) -> None:
            self._tasks.discard(t)
            if t.cancelled() or t.exception() is None:
                return
            logger.error("session=%s task %s failed", self.id, getattr(t.get_coro(), "__qualname__", "?"),
                         exc_info=t.exception())
            if response:
                self._response_starting = False
            run = self.response
            if run is not None and run.task is t:
                run.cancel.set()
                self.response = None
            self.error_event("internal_error", f"the server failed ({type(t.exception()).__name__}); "
                                               "the session goes on")

        task.add_done_callback(done)
        return task

    def _asr_options(self) -> AsrOptions:
        return AsrOptions(language=self.config.transcription_language, languages=self.allowed_languages)

    async def _turn(self, item: dict[str, Any], audio: np.ndarray, marks: TurnMarks, create_response: bool) -> None:
        spec, self._speculative = self._speculative, None
        if spec is not None and spec[0] != len(audio):
            spec[1].cancel()
            spec = None
        async with self._turn_lock:
            try:
                if spec is not None:
                    marks.extra["speculative_asr"] = True
                    t = await spec[1]
                else:
                    t = await transcribe(self.engines, self.stages, audio, self._asr_options())
            except Exception as e:  # noqa: BLE001 - reported to the client, the session goes on
                logger.exception("session=%s transcription failed", self.id)
                self.send({"type": "conversation.item.input_audio_transcription.failed", "item_id": item["id"],
                           "content_index": 0, "error": {"type": "server_error", "message": str(e)}})
                return
            marks.transcript = time.perf_counter()
            item["content"][0]["transcript"] = t.text
            item["stemme_language"] = t.language
            self.send({"type": "conversation.item.input_audio_transcription.delta", "item_id": item["id"],
                       "content_index": 0, "delta": t.text})
            self.send({"type": "conversation.item.input_audio_transcription.completed", "item_id": item["id"],
                       "content_index": 0, "transcript": t.text,
                       "usage": {"type": "duration", "seconds": round(t.audio_seconds, 3)},
                       "stemme": {"language": t.language, "language_probability": round(t.language_probability, 3),
                                  "asr_ms": round(t.seconds * 1000)}})
            if LOG_CONTENT:
                logger.info("session=%s transcript (%s): %s", self.id, t.language, t.text)
            if not create_response or not t.text.strip():
                return
            if self.response is not None:
                await self.cancel_response("turn_detected")
            await self._respond(marks, t.language, {})

    def _language(self, hint: str | None) -> str | None:
        if self.config.transcription_language:
            return self.config.transcription_language
        if hint:
            return hint
        for it in reversed(self.items):
            if it.get("stemme_language"):
                return it["stemme_language"]
        return None

    def _conversation(self, instructions: str | None, *, tools: bool = False) -> Conversation:
        """The conversation so far, as the language model sees it (with functions offered, Stemme's own
        instructions are the tool-calling variant and there are no example turns)."""
        default = TOOLS_INSTRUCTIONS if tools else DEFAULT_INSTRUCTIONS
        conv = Conversation(instructions=instructions or self.config.instructions or default, fewshot=not tools)
        for it in self.items:
            if (message := chat_message(it)) is not None:
                conv.turns.append(message)
                continue
            text = item_text(it)
            if it.get("role") == "system":
                conv.instructions += " " + text
            elif it.get("role") in ("user", "assistant"):
                conv.add(it["role"], text)
        return conv

    def _plan(self, language_hint: str | None, overrides: dict[str, Any]) -> ResponsePlan:
        """What this response does: the session's configuration with response.create's overrides."""
        tool_list = overrides.get("tools", self.config.tools)
        choice = overrides.get("tool_choice", self.config.tool_choice)
        if isinstance(choice, dict) and not any(t["name"] == choice["name"] for t in tool_list):
            choice = "auto"  # a named tool the session no longer declares
        if self._after_function_result() and not getattr(self.engines.llm, "remote", False):
            tool_list, choice = [], "none"  # the embedded model speaks the result (offered tools, it calls again)
        return ResponsePlan(
            language=self._language(language_hint),
            audio_out="audio" in (overrides.get("output_modalities") or self.config.output_modalities),
            max_tokens=overrides.get("max_output_tokens") or self.config.max_output_tokens
            or self.engines.config.llm_max_tokens,
            instructions=overrides.get("instructions"),
            voice=overrides.get("voice") or self.config.voice,
            tools=chat_tools(tool_list), tool_choice=chat_tool_choice(choice))

    def _after_function_result(self) -> bool:
        """The conversation's last item is a function's result: this response reports it."""
        return bool(self.items) and self.items[-1].get("type") == "function_call_output"

    async def _respond(self, marks: TurnMarks, language_hint: str | None, overrides: dict[str, Any]) -> None:
        plan = self._plan(language_hint, overrides)
        marks.language = plan.language
        run = ResponseRun(new_id("resp"), audio_out=plan.audio_out, task=asyncio.current_task())
        self.response = run
        self._response_starting = False
        self.send({"type": "response.created", "response": self._response_json(run, "in_progress")})
        status, error = "completed", None
        try:
            voice = self.engines.tts.registry.resolve(plan.language, plan.voice) if plan.audio_out else None
            conv = self._conversation(plan.instructions, tools=bool(plan.tools))
            async for out in respond(self.engines, self.stages, conv.messages(plan.language), voice=voice,
                                     speed=self.config.speed, max_tokens=plan.max_tokens, cancel=run.cancel,
                                     marks=marks, conversation=self.id, tools=plan.tools,
                                     tool_choice=plan.tool_choice, shared_prefix=conv.shared_prefix(plan.language),
                                     language=plan.language):
                self._emit(run, out)
            if run.cancel.is_set() and run.reason:
                status = "cancelled"
        except asyncio.CancelledError:
            status = "cancelled"
        except Exception as e:  # noqa: BLE001 - one response's failure is reported; the session goes on
            logger.exception("session=%s response failed", self.id)
            status, error = "failed", {"type": "server_error", "code": getattr(e, "code", "server_error"),
                                       "message": str(e)}
            self.error_event(error["code"], f"the response failed: {e}")
        finally:
            run.cancel.set()
            if self.response is run:
                self.response = None
        self._close_message(run, status)
        self._close_response(run, status, error, marks)

    def _emit(self, run: ResponseRun, out: SpokenClause | TextPiece | ToolCall) -> None:
        if isinstance(out, ToolCall):
            self._function_call(run, out)
            return
        item = self._message(run)
        ids = run.ids(item, run.output.index(item))
        if isinstance(out, SpokenClause):
            text = out.text if not run.text_out else " " + out.text
            self.send({"type": "response.output_audio_transcript.delta", **ids, "delta": text})
            self._send_audio(out.pcm16, ids)
            start = run.audio_ms
            run.audio_ms += round(out.seconds * 1000)
            run.timeline.append((start, run.audio_ms, out.text))
        else:
            self.send({"type": "response.output_text.delta", **ids, "delta": out.text})
        run.text_out.append(out.text)

    def _add_output(self, run: ResponseRun, item: dict[str, Any], **shown: Any) -> int:
        """A new output item of the response, added to the conversation (announced with the ``shown`` fields
        changed); returns its output index."""
        run.output.append(item)
        prev = self.items[-1]["id"] if self.items else None
        self.items.append(item)
        index = len(run.output) - 1
        announced = {**item, **shown}
        self.send({"type": "response.output_item.added", "response_id": run.id, "output_index": index,
                   "item": announced})
        self.send({"type": "conversation.item.added", "previous_item_id": prev, "item": announced})
        return index

    def _message(self, run: ResponseRun) -> dict[str, Any]:
        """The response's spoken (or written) message item, opened when its first words arrive."""
        if run.message is None:
            run.message = {"id": new_id("item"), "object": "realtime.item", "type": "message", "role": "assistant",
                           "status": "in_progress", "content": []}
            index = self._add_output(run, run.message)
            part = {"type": "audio", "transcript": ""} if run.audio_out else {"type": "text", "text": ""}
            self.send({"type": "response.content_part.added", **run.ids(run.message, index), "part": part})
        return run.message

    def _function_call(self, run: ResponseRun, call: ToolCall) -> None:
        """A function call the model made: its item, its arguments (one delta), done."""
        item = call_item(call)
        index = self._add_output(run, item, status="in_progress", arguments="")
        ids = {"response_id": run.id, "item_id": item["id"], "output_index": index, "call_id": call.id}
        self.send({"type": "response.function_call_arguments.delta", **ids, "delta": call.arguments})
        self.send({"type": "response.function_call_arguments.done", **ids, "name": call.name,
                   "arguments": call.arguments})
        self.send({"type": "response.output_item.done", "response_id": run.id, "output_index": index, "item": item})
        self.send({"type": "conversation.item.done", "previous_item_id": self._previous_id(item), "item": item})
        if LOG_CONTENT:
            logger.info("session=%s function call %s(%s)", self.id, call.name, clip(call.arguments))

    def _previous_id(self, item: dict[str, Any]) -> str | None:
        i = next((n for n, it in enumerate(self.items) if it is item), 0)
        return self.items[i - 1]["id"] if i > 0 else None

    def _close_message(self, run: ResponseRun, status: str) -> None:
        item = run.message
        if item is None:
            return
        spoken = (" ".join(run.text_out) if run.audio_out else "".join(run.text_out)).strip()
        self.timelines[item["id"]] = run.timeline
        kind = ("output_audio", "transcript") if run.audio_out else ("output_text", "text")
        item["content"] = [{"type": kind[0], kind[1]: spoken}]
        item["status"] = "completed" if status == "completed" else "incomplete"
        ids = run.ids(item, run.output.index(item))
        if run.audio_out:
            self.send({"type": "response.output_audio.done", **ids})
            self.send({"type": "response.output_audio_transcript.done", **ids, "transcript": spoken})
            part = {"type": "audio", "transcript": spoken}
        else:
            self.send({"type": "response.output_text.done", **ids, "text": spoken})
            part = {"type": "text", "text": spoken}
        self.send({"type": "response.content_part.done", **ids, "part": part})
        self.send({"type": "response.output_item.done", "response_id": run.id, "output_index": ids["output_index"],
                   "item": item})
        self.send({"type": "conversation.item.done", "previous_item_id": self._previous_id(item), "item": item})
        if LOG_CONTENT:
            logger.info("session=%s reply: %s", self.id, spoken)

    def _response_json(self, run: ResponseRun, status: str) -> dict[str, Any]:
        return {"id": run.id, "object": "realtime.response", "status": status, "output": list(run.output),
                "output_modalities": ["audio"] if run.audio_out else ["text"], "conversation_id": self.id}

    def _close_response(self, run: ResponseRun, status: str, error: dict[str, Any] | None,
                        marks: TurnMarks) -> None:
        report = marks.report()
        report["audio_ms"] = run.audio_ms
        if status == "completed" and run.audio_ms and marks.first_audio is not None and run.message is not None:
            self._playback = (run.id, run.message["id"], marks.first_audio, run.audio_ms / 1000)
        self.turns += 1
        self.latencies.append(report)
        if self.metrics is not None:
            self.metrics.observe_turn(status, report)
        logger.info("session=%s response=%s status=%s latency %s", self.id, run.id, status, json.dumps(report))
        resp = self._response_json(run, status)
        resp["metadata"] = {"stemme_latency": json.dumps(report, separators=(",", ":"))}
        if status == "cancelled":
            resp["status_details"] = {"type": "cancelled", "reason": run.reason or "client_cancelled"}
        if error:
            resp["status_details"] = {"type": "failed", "error": error}
        self.send({"type": "response.done", "response": resp, "stemme": {"latency": report}})

    def _interrupt_playback(self) -> None:
        """Barge-in after the response was fully sent but while the client is still playing it: tell the
        client to drop its buffer and keep in the history only what has been played so far."""
        if self._playback is None:
            return
        resp_id, item_id, started, seconds = self._playback
        played = time.perf_counter() - started
        if played >= seconds:
            self._playback = None
            return
        self._playback = None
        self.send({"type": "output_audio_buffer.cleared", "response_id": resp_id})
        try:
            self._truncate({"type": "conversation.item.truncate", "item_id": item_id, "content_index": 0,
                            "audio_end_ms": int(played * 1000)})
        except ProtocolError:
            pass  # the item was deleted meanwhile

    def _send_audio(self, pcm: bytes, ids: dict[str, Any]) -> None:
        for i in range(0, len(pcm), AUDIO_CHUNK_BYTES):
            chunk = pcm[i:i + AUDIO_CHUNK_BYTES]
            if self.binary_audio:
                if not self.closed:
                    self._send(chunk)
            else:
                self.send({"type": "response.output_audio.delta", **ids,
                           "delta": base64.b64encode(chunk).decode()})

    async def cancel_response(self, reason: str) -> None:
        """Barge-in / response.cancel: stop LLM and TTS now, tell the client to drop buffered audio."""
        run = self.response
        if run is None:
            return
        run.reason = reason
        run.cancel.set()
        self.send({"type": "output_audio_buffer.cleared", "response_id": run.id})
        if run.task is not None and run.task is not asyncio.current_task():
            # interrupts the await on the LLM or TTS worker at once; the response loop then sends
            # response.done(cancelled). The worker's current step is dropped (LLM stops at its next token).
            run.task.cancel()

    async def close(self) -> None:
        """The client is gone: cancel every piece of work of this session."""
        self.closed = True
        if self.response is not None:
            self.response.reason = "disconnected"
            self.response.cancel.set()
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        if "llm" in self.engines.loaded and hasattr(self.engines.llm, "forget"):
            self.engines.llm.forget(self.id)  # the conversation's cache goes with it

    @property
    def active_tasks(self) -> int:
        return len(self._tasks)
