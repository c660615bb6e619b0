"""The voice core: one conversation, whatever carries it. It holds the turns (input audio, VAD and end of turn,
speculative and final transcription), barge-in, the history and the response lifecycle, and reports what
happens as typed core events through ``emit``. It knows no wire: a front door (the Realtime session in
``streaming/session.py``) turns client events into calls here and core events into its own protocol's events.

The history is a list of conversation items in the shape the Realtime API gives them (``id``, ``type``,
``role``, ``content``, ``status``; function calls and their outputs), the richest of the protocols Stemme
speaks; the core reads and writes only those fields.

Requests that cannot be honoured in the conversation's state (an item that does not exist, an input buffer
that is full or too short) raise ``ProtocolError`` before anything changes.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
from stemme.streaming.protocol import item_text, new_id
from stemme.streaming.tools import call_item, chat_message, chat_tool_choice, chat_tools
from stemme.voice.asr import AsrOptions, Transcript
from stemme.voice.audio import ASR_RATE
from stemme.voice.llm import DEFAULT_INSTRUCTIONS, TOOLS_INSTRUCTIONS, Conversation, ToolCall
from stemme.voice.pipeline import SpokenClause, Stages, TextPiece, TurnMarks, respond, transcribe
from stemme.voice.vad import SpeechPaused, SpeechStarted, SpeechStopped, VadEvent, VadOptions, VadStream

from stemme.engines import Engines
from stemme.errors import ProtocolError
from stemme.logsafe import clip

logger = logging.getLogger(__name__)

MAX_BUFFER_SECONDS = 60.0
"""Manual-commit input buffer limit."""
LOG_CONTENT = os.environ.get("STEMME_LOG_CONTENT", "") == "1"
"""Privacy: transcripts and replies appear in logs only when the operator sets STEMME_LOG_CONTENT=1."""

Item = dict[str, Any]
"""A conversation item (see the module's docstring)."""


# -- what the core is configured with (a front door's session configuration) ----------------------------------------
class TurnSettings(Protocol):
    """Turn detection: VAD parameters, and what the end of a turn does."""

    @property
    def type(self) -> str: ...  # server_vad or semantic_vad
    @property
    def threshold(self) -> float: ...
    @property
    def prefix_padding_ms(self) -> int: ...
    @property
    def silence_duration_ms(self) -> int: ...
    @property
    def create_response(self) -> bool: ...
    @property
    def interrupt_response(self) -> bool: ...
    def semantic(self) -> tuple[int, float]: ...


class CoreSettings(Protocol):
    """The settings the core reads at each turn and response (a front door may change them between)."""

    @property
    def instructions(self) -> str | None: ...
    @property
    def output_modalities(self) -> list[str]: ...
    @property
    def transcription_language(self) -> str | None: ...
    @property
    def turn_detection(self) -> TurnSettings | None: ...
    @property
    def voice(self) -> str | None: ...
    @property
    def speed(self) -> float: ...
    @property
    def max_output_tokens(self) -> int | None: ...
    @property
    def tools(self) -> list[dict[str, Any]]: ...
    @property
    def tool_choice(self) -> str | dict[str, Any]: ...


# -- core events -----------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class UserSpeechStarted:
    item_id: str
    audio_start_ms: int


@dataclass(frozen=True)
class UserSpeechStopped:
    item_id: str
    audio_end_ms: int


@dataclass(frozen=True)
class AudioCommitted:
    """A user turn's audio became a conversation item (its ItemInserted follows)."""

    item_id: str
    previous_item_id: str | None


@dataclass(frozen=True)
class ItemInserted:
    item: Item
    previous_item_id: str | None


@dataclass(frozen=True)
class InputCleared:
    """The input audio buffer was emptied on request."""


@dataclass(frozen=True)
class TranscriptReady:
    item_id: str
    transcript: Transcript


@dataclass(frozen=True)
class TranscriptFailed:
    item_id: str
    message: str


@dataclass(frozen=True)
class ResponseStarted:
    run: ResponseRun


@dataclass(frozen=True)
class MessageStarted:
    """The response's message item was opened (its first words are coming)."""

    run: ResponseRun
    item: Item
    index: int
    previous_item_id: str | None


@dataclass(frozen=True)
class ClauseSpoken:
    run: ResponseRun
    item: Item
    index: int
    text: str
    """The clause as it extends the transcript (a space before every clause but the first)."""
    pcm16: bytes
    """24 kHz mono PCM16."""


@dataclass(frozen=True)
class TextWritten:
    run: ResponseRun
    item: Item
    index: int
    text: str


@dataclass(frozen=True)
class FunctionCalled:
    run: ResponseRun
    item: Item
    index: int
    call: ToolCall
    previous_item_id: str | None


@dataclass(frozen=True)
class MessageFinished:
    run: ResponseRun
    item: Item
    index: int
    text: str
    previous_item_id: str | None


@dataclass(frozen=True)
class ResponseFinished:
    run: ResponseRun
    status: str
    """completed, cancelled or failed."""
    error: dict[str, Any] | None
    report: dict[str, Any]
    """The turn's latency marks (TurnMarks.report) and audio_ms."""


@dataclass(frozen=True)
class PlaybackCleared:
    """The client must drop the audio it has buffered (barge-in, cancel); None: whatever it holds."""

    response_id: str | None


@dataclass(frozen=True)
class ItemTruncated:
    item_id: str
    content_index: int
    audio_end_ms: int


@dataclass(frozen=True)
class Failure:
    """Work of the conversation failed on the server's side; the conversation goes on."""

    code: str
    message: str


CoreEvent = (UserSpeechStarted | UserSpeechStopped | AudioCommitted | ItemInserted | InputCleared | TranscriptReady
             | TranscriptFailed | ResponseStarted | MessageStarted | ClauseSpoken | TextWritten | FunctionCalled
             | MessageFinished | ResponseFinished | PlaybackCleared | ItemTruncated | Failure)


# -- responses ---------------------------------------------------------------------------------------------------
@dataclass
class ResponsePlan:
    """What one response does (the settings with the request's overrides)."""

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
    task: asyncio.Task[Any] | None = None
    reason: str | None = None
    output: list[Item] = field(default_factory=list)
    """The response's output items in order: its message (opened with the first words) and function calls."""
    message: Item | None = None
    text_out: list[str] = field(default_factory=list)
    timeline: list[tuple[int, int, str]] = field(default_factory=list)
    """(start_ms, end_ms, text) of each clause sent."""
    audio_ms: int = 0


class VoiceCore:
    """One conversation. ``emit`` receives every core event, on the event loop, in order."""

    def __init__(self, engines: Engines, stages: Stages, emit: Callable[[CoreEvent], None], settings: CoreSettings,
                 *, conversation_id: str, allowed_languages: tuple[str, ...] | None = None, metrics: Any = None,
                 max_turn_seconds: float = 30.0) -> None:
        self.engines = engines
        self.stages = stages
        self.emit = emit
        self.settings = settings
        self.id = conversation_id
        self.metrics = metrics
        self.max_turn_seconds = max_turn_seconds
        self.allowed_languages = allowed_languages or engines.config.languages
        self.items: list[Item] = []
        self.timelines: dict[str, list[tuple[int, int, str]]] = {}
        self.response: ResponseRun | None = None
        self.response_starting = False
        """A response was asked for and has not registered itself yet: a second one is refused."""
        self.turns = 0
        self.latencies: list[dict[str, Any]] = []
        self.closed = False
        self.turns_refused = False
        """The server drains: speech that ends is not committed and starts no response (the client is told by
        the server, and sends the turn again elsewhere)."""
        self._buffer: list[np.ndarray] = []
        self._buffer_samples = 0
        self._vad: VadStream | None = None
        self._arrivals: deque[tuple[int, float]] = deque(maxlen=2000)
        self._samples_in = 0
        self._vad_offset = 0
        """Input samples received before the current VAD stream began (its clock starts there)."""
        self._speech_item: str | None = None
        self._speculative: tuple[int, asyncio.Task[Transcript]] | None = None
        """(samples, ASR task) started when speech paused, reused if the turn ends without more speech."""
        self._turn_lock = asyncio.Lock()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._playback: tuple[str, str, float, float] | None = None
        """(response_id, item_id, perf time of the first audio sent, seconds sent) of the last finished
        response: audio is sent faster than real time, so the client may still be playing it."""

    # ---- history ----------------------------------------------------------------------------------------------
    def insert_item(self, item: Item, previous_item_id: str | None, event_id: str | None = None) -> None:
        """Add ``item`` after ``previous_item_id`` ("root": first; None: last)."""
        if previous_item_id and previous_item_id != "root":
            idx = next((i for i, it in enumerate(self.items) if it["id"] == previous_item_id), None)
            if idx is None:
                raise ProtocolError(f"previous_item_id {previous_item_id!r} not found", param="previous_item_id",
                                    code="item_not_found", event_id=event_id)
            self.items.insert(idx + 1, item)
        elif previous_item_id == "root":
            self.items.insert(0, item)
        else:
            self.items.append(item)
        self.emit(ItemInserted(item, self.previous_id(item)))

    def find_item(self, item_id: str, event_id: str | None = None) -> Item:
        for it in self.items:
            if it["id"] == item_id:
                return it
        raise ProtocolError(f"no conversation item {item_id!r}", param="item_id", event_id=event_id,
                            code="item_not_found")

    def delete_item(self, item_id: str, event_id: str | None = None) -> None:
        self.items.remove(self.find_item(item_id, event_id))

    def previous_id(self, item: Item) -> str | None:
        i = next((n for n, it in enumerate(self.items) if it is item), 0)
        return self.items[i - 1]["id"] if i > 0 else None

    def truncate(self, item_id: str, content_index: int, audio_end_ms: int, event_id: str | None = None) -> None:
        """Keep in the history only the words of an assistant item's audio heard before ``audio_end_ms``."""
        item = self.find_item(item_id, event_id)
        if item.get("role") != "assistant":
            raise ProtocolError("only assistant audio items can be truncated", param="item_id", event_id=event_id,
                                code="invalid_value")
        timeline = self.timelines.get(item["id"], [])
        total = timeline[-1][1] if timeline else 0
        if audio_end_ms < 0 or audio_end_ms > total:
            raise ProtocolError(f"audio_end_ms {audio_end_ms} is outside the item's audio (0..{total} ms)",
                                param="audio_end_ms", event_id=event_id, code="invalid_value")
        heard = _heard(timeline, audio_end_ms)
        for c in item["content"]:
            if "transcript" in c:
                c["transcript"] = heard
        self.timelines[item["id"]] = [t for t in timeline if t[0] < audio_end_ms]
        self.emit(ItemTruncated(item["id"], content_index, audio_end_ms))

    # ---- input audio (16 kHz mono float) --------------------------------------------------------------------
    async def feed(self, x: np.ndarray, event_id: str | None = None) -> None:
        """Audio of the user: buffered for a manual commit, or through the VAD (turn detection on)."""
        if not len(x):
            return
        td = self.settings.turn_detection
        if td is None and self._buffer_samples + len(x) > MAX_BUFFER_SECONDS * ASR_RATE:
            raise ProtocolError(f"input audio buffer is full ({MAX_BUFFER_SECONDS:.0f} s); commit or clear it",
                                code="input_audio_buffer_full", event_id=event_id)
        self._samples_in += len(x)
        self._arrivals.append((self._samples_in, time.perf_counter()))
        if td is None:
            self._buffer.append(x)
            self._buffer_samples += len(x)
            return
        vad = self._vad or await self._new_vad(td, len(x))
        events = await asyncio.get_running_loop().run_in_executor(self.stages.vad, vad.feed, x)
        for event in events:
            await self._on_vad(event, td, vad)

    async def _new_vad(self, td: TurnSettings, fed: int) -> VadStream:
        opts = VadOptions(threshold=td.threshold, prefix_padding_ms=td.prefix_padding_ms,
                          silence_duration_ms=td.silence_duration_ms, max_speech_s=self.max_turn_seconds)
        turn = None
        if td.type == "semantic_vad":
            turn = await asyncio.get_running_loop().run_in_executor(self.stages.vad, lambda: self.engines.turn)
            if turn is not None:
                opts.silence_duration_ms, opts.complete_threshold = td.semantic()
        self._vad = VadStream(self.engines.vad, opts, turn.probability if turn is not None else None)
        self._vad_offset = self._samples_in - fed
        return self._vad

    def reset_vad(self) -> None:
        """The turn settings changed: the next audio starts a VAD stream with the new ones."""
        self._vad = None

    async def _on_vad(self, event: VadEvent, td: TurnSettings, vad: VadStream) -> None:
        if isinstance(event, SpeechStarted):
            await self._speech_started(event, td)
        elif isinstance(event, SpeechPaused):
            if self._speculative is not None:
                self._speculative[1].cancel()
            task = self.spawn(transcribe(self.engines, self.stages, event.audio, self._asr_options()))
            self._speculative = (len(event.audio), task)
        elif isinstance(event, SpeechStopped):
            self._speech_stopped(event, td, vad)

    async def _speech_started(self, event: SpeechStarted, td: TurnSettings) -> None:
        self._speech_item = new_id("item")
        self.emit(UserSpeechStarted(self._speech_item, event.audio_start_ms + self._offset_ms()))
        if td.interrupt_response and self.response is not None:
            await self.cancel_response("turn_detected")
        elif td.interrupt_response:
            self._interrupt_playback()

    def _speech_stopped(self, event: SpeechStopped, td: TurnSettings, vad: VadStream) -> None:
        item_id = self._speech_item or new_id("item")
        self._speech_item = None
        end_ms = event.audio_end_ms + self._offset_ms()
        self.emit(UserSpeechStopped(item_id, end_ms))
        if self.turns_refused:
            return
        marks = TurnMarks(speech_end=self._arrival_of(end_ms), turn_detected=time.perf_counter())
        if vad.last_probability is not None:
            marks.extra["end_of_turn_probability"] = round(vad.last_probability, 3)
        marks.extra["end_of_turn_silence_ms"] = max(0, event.decided_ms - event.audio_end_ms)
        self._commit_audio(event.audio, item_id, marks, create_response=td.create_response)

    def _offset_ms(self) -> int:
        return int(self._vad_offset * 1000 / ASR_RATE)

    def _arrival_of(self, ms: int) -> float:
        """Wall time (perf_counter) at which the input sample at ``ms`` arrived."""
        target = ms * ASR_RATE // 1000
        for end, t in self._arrivals:
            if end >= target:
                return t
        return time.perf_counter()

    def commit(self, event_id: str | None = None) -> None:
        """Manual turn: the buffered audio is the user's turn."""
        if self._buffer_samples < ASR_RATE // 10:
            raise ProtocolError(f"input audio buffer too small to commit: {self._buffer_samples * 1000 // ASR_RATE} "
                                "ms, at least 100 ms needed", code="input_audio_buffer_commit_empty",
                                event_id=event_id)
        audio = np.concatenate(self._buffer)
        self._buffer.clear()
        self._buffer_samples = 0
        now = time.perf_counter()
        td = self.settings.turn_detection
        self._commit_audio(audio, new_id("item"), TurnMarks(speech_end=now, turn_detected=now),
                           create_response=bool(td and td.create_response))

    def clear_input(self) -> None:
        self._buffer.clear()
        self._buffer_samples = 0
        if self._vad:
            self._vad.reset()
        self.emit(InputCleared())

    def _commit_audio(self, audio: np.ndarray, item_id: str, marks: TurnMarks, *, create_response: bool) -> None:
        prev = self.items[-1]["id"] if self.items else None
        self.emit(AudioCommitted(item_id, prev))
        item = {"id": item_id, "object": "realtime.item", "type": "message", "role": "user", "status": "completed",
                "content": [{"type": "input_audio", "transcript": None}]}
        self.insert_item(item, prev)
        self.spawn(self._turn(item, audio, marks, create_response))

    # ---- turns -----------------------------------------------------------------------------------------------
    def spawn(self, coro: Coroutine[Any, Any, Any], *, response: bool = False) -> asyncio.Task[Any]:
        """Run ``coro`` as this conversation's task. A task that fails is a bug: it is logged with its traceback,
        a Failure is emitted, and a response's flags are cleared so the conversation is not wedged (``response``
        marks a task started for a response before it registers itself)."""
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(lambda t: self._task_done(t, response))
        return task

    def _task_done(self, task: asyncio.Task[Any], response: bool) -> None:
        self._tasks.discard(task)
        if task.cancelled() or (exc := task.exception()) is None:
            return
        logger.error("session=%s task %s failed", self.id, getattr(task.get_coro(), "__qualname__", "?"),
                     exc_info=exc)
        if response:
            self.response_starting = False
        run = self.response
        if run is not None and run.task is task:
            run.cancel.set()
            self.response = None
        self.emit(Failure("internal_error", f"the server failed ({type(exc).__name__}); the session goes on"))

    def _asr_options(self) -> AsrOptions:
        return AsrOptions(language=self.settings.transcription_language, languages=self.allowed_languages)

    async def _turn(self, item: Item, audio: np.ndarray, marks: TurnMarks, create_response: bool) -> None:
        spec, self._speculative = self._speculative, None
        if spec is not None and spec[0] != len(audio):
            spec[1].cancel()
            spec = None
        async with self._turn_lock:
            t = await self._transcript(item, audio, marks, spec)
            if t is None or not create_response or not t.text.strip():
                return
            if self.response is not None:
                await self.cancel_response("turn_detected")
            await self.respond(marks, t.language, {})

    async def _transcript(self, item: Item, audio: np.ndarray, marks: TurnMarks,
                          spec: tuple[int, asyncio.Task[Transcript]] | None) -> Transcript | None:
        """The turn's transcript (the speculative one when it covers the same audio), written into its item;
        None when transcription failed (reported)."""
        try:
            if spec is not None:
                marks.extra["speculative_asr"] = True
                t = await spec[1]
            else:
                t = await transcribe(self.engines, self.stages, audio, self._asr_options())
        except Exception as e:  # noqa: BLE001 - reported to the client, the conversation goes on
            logger.exception("session=%s transcription failed", self.id)
            self.emit(TranscriptFailed(item["id"], str(e)))
            return None
        marks.transcript = time.perf_counter()
        item["content"][0]["transcript"] = t.text
        item["stemme_language"] = t.language
        self.emit(TranscriptReady(item["id"], t))
        if LOG_CONTENT:
            logger.info("session=%s transcript (%s): %s", self.id, t.language, t.text)
        return t

    # ---- responses -----------------------------------------------------------------------------------------
    async def respond(self, marks: TurnMarks, language_hint: str | None, overrides: dict[str, Any]) -> None:
        """One response: plan, register, generate (emitting its output), close. ``overrides``: the request's
        checked changes to the settings for this response (ResponseOverrides.as_dict)."""
        plan = self.plan(language_hint, overrides)
        marks.language = plan.language
        run = ResponseRun(new_id("resp"), audio_out=plan.audio_out, task=asyncio.current_task())
        self.response = run
        self.response_starting = False
        self.emit(ResponseStarted(run))
        status, error = await self._generate(run, plan, marks)
        self._close_message(run, status)
        self._close_response(run, status, error, marks)

    async def _generate(self, run: ResponseRun, plan: ResponsePlan,
                        marks: TurnMarks) -> tuple[str, dict[str, Any] | None]:
        """Run the pipeline, emitting each output; returns (status, error)."""
        try:
            async for out in self._outputs(run, plan, marks):
                self._emit_output(run, out)
            return ("cancelled" if run.cancel.is_set() and run.reason else "completed"), None
        except asyncio.CancelledError:
            return "cancelled", None
        except Exception as e:  # noqa: BLE001 - one response's failure is reported; the conversation goes on
            logger.exception("session=%s response failed", self.id)
            error = {"type": "server_error", "code": getattr(e, "code", "server_error"), "message": str(e)}
            self.emit(Failure(error["code"], f"the response failed: {e}"))
            return "failed", error
        finally:
            run.cancel.set()
            if self.response is run:
                self.response = None

    async def _outputs(self, run: ResponseRun, plan: ResponsePlan,
                       marks: TurnMarks) -> AsyncIterator[SpokenClause | TextPiece | ToolCall]:
        voice = self.engines.tts.registry.resolve(plan.language, plan.voice) if plan.audio_out else None
        conv = self.conversation(plan.instructions, tools=bool(plan.tools))
        async for out in respond(self.engines, self.stages, conv.messages(plan.language), voice=voice,
                                 speed=self.settings.speed, max_tokens=plan.max_tokens, cancel=run.cancel,
                                 marks=marks, conversation=self.id, tools=plan.tools, tool_choice=plan.tool_choice,
                                 shared_prefix=conv.shared_prefix(plan.language), language=plan.language):
            yield out

    def language(self, hint: str | None) -> str | None:
        """The answer's language: the pinned one, else the turn's, else the last one heard."""
        if self.settings.transcription_language:
            return self.settings.transcription_language
        if hint:
            return hint
        for it in reversed(self.items):
            if it.get("stemme_language"):
                return str(it["stemme_language"])
        return None

    def conversation(self, instructions: str | None, *, tools: bool = False) -> Conversation:
        """The conversation so far, as the language model sees it (with functions offered, Stemme's own
        instructions are the tool-calling variant and there are no example turns)."""
        default = TOOLS_INSTRUCTIONS if tools else DEFAULT_INSTRUCTIONS
        conv = Conversation(instructions=instructions or self.settings.instructions or default, fewshot=not tools)
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

    def plan(self, language_hint: str | None, overrides: dict[str, Any]) -> ResponsePlan:
        """What this response does: the settings with the request's overrides."""
        s = self.settings
        tool_list = overrides.get("tools", s.tools)
        choice = overrides.get("tool_choice", s.tool_choice)
        if isinstance(choice, dict) and not any(t["name"] == choice["name"] for t in tool_list):
            choice = "auto"  # a named tool the session no longer declares
        if self._after_function_result() and not getattr(self.engines.llm, "remote", False):
            tool_list, choice = [], "none"  # the embedded model speaks the result (offered tools, it calls again)
        return ResponsePlan(
            language=self.language(language_hint),
            audio_out="audio" in (overrides.get("output_modalities") or s.output_modalities),
            max_tokens=overrides.get("max_output_tokens") or s.max_output_tokens or self.engines.config.llm_max_tokens,
            instructions=overrides.get("instructions"), voice=overrides.get("voice") or s.voice,
            tools=chat_tools(tool_list), tool_choice=chat_tool_choice(choice))

    def _after_function_result(self) -> bool:
        """The conversation's last item is a function's result: this response reports it."""
        return bool(self.items) and self.items[-1].get("type") == "function_call_output"

    def _emit_output(self, run: ResponseRun, out: SpokenClause | TextPiece | ToolCall) -> None:
        if run.cancel.is_set():
            return  # a step finished after the barge-in: the client was told to drop this answer's audio
        if isinstance(out, ToolCall):
            self._function_call(run, out)
            return
        item, index = self._message(run)
        if isinstance(out, SpokenClause):
            text = out.text if not run.text_out else " " + out.text
            self.emit(ClauseSpoken(run, item, index, text, out.pcm16))
            start = run.audio_ms
            run.audio_ms += round(out.seconds * 1000)
            run.timeline.append((start, run.audio_ms, out.text))
        else:
            self.emit(TextWritten(run, item, index, out.text))
        run.text_out.append(out.text)

    def _add_output(self, run: ResponseRun, item: Item) -> tuple[int, str | None]:
        """A new output item of the response, added to the history; returns (output index, previous item id)."""
        run.output.append(item)
        prev = self.items[-1]["id"] if self.items else None
        self.items.append(item)
        return len(run.output) - 1, prev

    def _message(self, run: ResponseRun) -> tuple[Item, int]:
        """The response's spoken (or written) message item, opened when its first words arrive."""
        if run.message is None:
            run.message = {"id": new_id("item"), "object": "realtime.item", "type": "message", "role": "assistant",
                           "status": "in_progress", "content": []}
            index, prev = self._add_output(run, run.message)
            self.emit(MessageStarted(run, run.message, index, prev))
        return run.message, run.output.index(run.message)

    def _function_call(self, run: ResponseRun, call: ToolCall) -> None:
        item = call_item(call)
        index, prev = self._add_output(run, item)
        self.emit(FunctionCalled(run, item, index, call, prev))
        if LOG_CONTENT:
            logger.info("session=%s function call %s(%s)", self.id, call.name, clip(call.arguments))

    def _close_message(self, run: ResponseRun, status: str) -> None:
        item = run.message
        if item is None:
            return
        spoken = (" ".join(run.text_out) if run.audio_out else "".join(run.text_out)).strip()
        self.timelines[item["id"]] = run.timeline
        kind = ("output_audio", "transcript") if run.audio_out else ("output_text", "text")
        item["content"] = [{"type": kind[0], kind[1]: spoken}]
        item["status"] = "completed" if status == "completed" else "incomplete"
        self.emit(MessageFinished(run, item, run.output.index(item), spoken, self.previous_id(item)))
        if LOG_CONTENT:
            logger.info("session=%s reply: %s", self.id, spoken)

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
        self.emit(ResponseFinished(run, status, error, report))

    # ---- barge-in --------------------------------------------------------------------------------------------
    def _interrupt_playback(self) -> None:
        """Barge-in after the response was fully sent but while the client is still playing it: the client
        drops its buffer, and the history keeps only what has been played so far."""
        if self._playback is None:
            return
        resp_id, item_id, started, seconds = self._playback
        self._playback = None
        played = time.perf_counter() - started
        if played >= seconds:
            return
        self.emit(PlaybackCleared(resp_id))
        try:
            self.truncate(item_id, 0, int(played * 1000))
        except ProtocolError:
            pass  # the item was deleted meanwhile

    async def cancel_response(self, reason: str) -> None:
        """Barge-in / cancel: stop LLM and TTS now, tell the client to drop buffered audio."""
        run = self.response
        if run is None:
            return
        run.reason = reason
        run.cancel.set()
        self.emit(PlaybackCleared(run.id))
        if run.task is not None and run.task is not asyncio.current_task():
            # interrupts the await on the LLM or TTS worker at once; the response then finishes as cancelled.
            # The worker's current step is dropped (LLM stops at its next token).
            run.task.cancel()

    async def close(self) -> None:
        """The conversation is over: cancel every piece of its work, drop its cache."""
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


def _heard(timeline: list[tuple[int, int, str]], end_ms: int) -> str:
    """The words of the clauses (start_ms, end_ms, text) played before ``end_ms`` (a clause cut in the middle
    keeps the share of its words that was played)."""
    kept = []
    for start, end, text in timeline:
        if end <= end_ms:
            kept.append(text)
        elif start < end_ms:
            words = text.split()
            n = int(len(words) * (end_ms - start) / max(1, end - start))
            if n:
                kept.append(" ".join(words[:n]))
    return " ".join(kept)
