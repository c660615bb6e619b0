"""The turn pipeline: LLM tokens -> clauses -> TTS -> audio, every stage streaming into the next, plus the
per-turn latency marks. Blocking engine calls run on per-stage worker threads, never on the event loop."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import re
import threading
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import Any, TypeVar, cast

import numpy as np
from stemme.voice.asr import AsrOptions, Transcript
from stemme.voice.audio import OUTPUT_RATE, StreamResampler, float_to_pcm16
from stemme.voice.batching import BatchingOptions, MicroBatcher
from stemme.voice.llm import (
    ACKNOWLEDGE,
    EchoGuard,
    GenerationOptions,
    ToolCall,
    ToolCallExtractor,
    last_user_text,
    steered,
)
from stemme.voice.tts import Voice, clean_for_speech

from stemme.config import EngineConfig
from stemme.engines import Engines

logger = logging.getLogger(__name__)

Q = TypeVar("Q")


class TtsPriority:
    """Cooperative CPU scheduling for small machines: while speech is being synthesized, language-model
    generation pauses between tokens. The LLM writes several times faster than speech plays (about 30 tokens/s
    against 3 words/s here), but when both run at once on 2 cores, Kokoro slows down 2.6x (measured), which
    delays the first audio. With the gate the stages take turns at full speed."""

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled
        self._busy = 0
        self._cond = threading.Condition()

    @contextlib.contextmanager
    def speaking(self):  # noqa: ANN201
        with self._cond:
            self._busy += 1
        try:
            yield
        finally:
            with self._cond:
                self._busy -= 1
                self._cond.notify_all()

    def wait(self, cancel: threading.Event, timeout: float = 10.0,
             unless: Callable[[], bool] = lambda: False) -> None:
        """Wait while speech is being synthesized, unless ``cancel`` is set or ``unless()`` becomes true (a new
        turn's prompt is waiting: its first token must not wait for another session's speech)."""
        if not self.enabled:
            return
        with self._cond:
            self._cond.wait_for(lambda: self._busy == 0 or cancel.is_set() or unless(), timeout)

    def poke(self) -> None:
        """Re-check waiting conditions now."""
        with self._cond:
            self._cond.notify_all()


@dataclass
class _Stream:
    engine: Any
    messages: list[dict[str, str]]
    options: GenerationOptions
    cancel: threading.Event
    put: Callable[[str | BaseException | None], None]
    gen: Any = None


class _Group:
    """The streams of a batching engine (``batches = True``), decoded together by its ``BatchDecoder``; it takes
    one turn in the scheduler's round like a single stream."""

    def __init__(self, engine: Any, max_batch: int) -> None:
        self.engine = engine
        self.decoder = engine.batch_decoder(max_batch)
        self.streams: dict[int, _Stream] = {}

    def add(self, st: _Stream) -> None:
        row = self.decoder.add(st.messages, st.options)
        st.gen = row
        self.streams[id(row)] = st

    def _end(self, st: _Stream, exc: BaseException | None = None) -> None:
        """The stream leaves the batch (a finished row has left already) and its consumer is told."""
        self.streams.pop(id(st.gen), None)
        self.decoder.remove(st.gen)
        if exc is not None:
            st.put(exc)
        st.put(None)

    def drop_cancelled(self) -> None:
        for st in [s for s in self.streams.values() if s.cancel.is_set()]:
            self._end(st)

    def step(self) -> int:
        """One batched step; returns how many streams it served."""
        try:
            events = self.decoder.step()
        except BaseException as e:  # noqa: BLE001 - handed to every stream's consumer
            for st in list(self.streams.values()):
                self._end(st, e)
            return 0
        for row, piece, done in events:
            found = self.streams.get(id(row))
            if found is None:
                continue
            st = found
            if piece:
                st.put(piece)
            if done:
                self._end(st)
        return len(events)

    def close(self) -> None:
        for st in list(self.streams.values()):
            self._end(st)


class LlmScheduler:
    """One thread runs every session's generation, a token at a time from each stream in turn, so that a new
    turn's first token does not wait for another session's whole answer; a new stream's first step (the
    prompt) goes first. Backends that decode many streams in one pass (``batches = True``: onnxruntime, the
    CPU default, and transformers, the GPU backend) serve all their streams in one batched step per turn of
    the round (continuous batching, up to ``max_batch`` streams). Backends that cannot interleave
    (``interleaves = False``: CTranslate2 serves one request at a time) run their streams one after the
    other. Work is first come, first served between sessions, and a session has at most one stream."""

    def __init__(self, priority: TtsPriority, *, max_batch: int = 8) -> None:
        self.priority = priority
        self.max_batch = max_batch
        self._cond = threading.Condition()
        self._new: collections.deque[_Stream] = collections.deque()
        self._active: collections.deque[_Stream | _Group] = collections.deque()
        self._groups: dict[int, _Group] = {}
        self._remote = 0
        """Streams of remote engines in progress, each on its own thread (see submit)."""
        self._stop = False
        self.batch_sizes: collections.Counter[int] = collections.Counter()
        """How many batched steps served each number of streams."""
        self.on_batch: Callable[[int], None] | None = None
        self._thread = threading.Thread(target=self._loop, name="stemme-llm", daemon=True)
        self._thread.start()

    @property
    def depth(self) -> int:
        """Streams admitted and not finished."""
        n = len(self._new) + self._remote + sum(1 for a in self._active if isinstance(a, _Stream))
        return n + sum(len(g.streams) for g in self._groups.values())

    def submit(self, engine: Any, messages: list[dict[str, str]], options: GenerationOptions,
               cancel: threading.Event, put: Callable[[str | BaseException | None], None]) -> None:
        st = _Stream(engine, messages, options, cancel, put)
        if getattr(engine, "remote", False):
            # a remote model waits on the network, not on this machine's CPU: its stream gets its own thread,
            # outside the round (a blocked read would stall every session) and not behind the speech gate
            with self._cond:
                self._remote += 1
            threading.Thread(target=self._run_remote, args=(st,), name="stemme-llm-remote", daemon=True).start()
            return
        with self._cond:
            self._new.append(st)
            self._cond.notify()
        self.priority.poke()  # a generation paused for speech gives way to the new prompt

    def _run_remote(self, st: _Stream) -> None:
        exc: BaseException | None = None
        try:
            st.gen = st.engine.stream(st.messages, st.options, st.cancel)
            for piece in st.gen:
                if st.cancel.is_set():
                    break
                st.put(piece)
        except BaseException as e:  # noqa: BLE001 - handed to the stream's consumer
            exc = e
        with self._cond:
            self._remote -= 1
        self._finish(st, exc)

    def shutdown(self) -> None:
        with self._cond:
            self._stop = True
            self._cond.notify()

    def _finish(self, st: _Stream, exc: BaseException | None = None) -> None:
        if st.gen is not None:
            with contextlib.suppress(Exception):
                st.gen.close()  # in this thread: the engine's lock is released where it was taken
        if exc is not None:
            st.put(exc)
        st.put(None)

    def _admit(self, st: _Stream) -> _Stream | _Group | None:
        """Start a new stream; a batching engine's stream joins its group, which is returned to run now. A
        stream whose prompt is refused (too long, say) fails alone: its consumer gets the error, and the other
        streams of the group go on (None: nothing to run)."""
        if getattr(st.engine, "batches", False):
            group = self._groups.get(id(st.engine))
            if group is None:
                group = self._groups[id(st.engine)] = _Group(st.engine, self.max_batch)
            with contextlib.suppress(ValueError):
                self._active.remove(group)
            try:
                group.add(st)
            except Exception as e:  # noqa: BLE001 - handed to the stream's consumer
                self._finish(st, e)
                return group if group.streams else None
            return group
        st.gen = st.engine.stream(st.messages, st.options, st.cancel)
        return st

    def _run_group(self, group: _Group) -> None:
        group.drop_cancelled()
        if group.streams and (n := group.step()):
            self.batch_sizes[n] += 1
            if self.on_batch is not None:
                self.on_batch(n)
        with self._cond:
            if group.streams:
                self._active.append(group)
        cancel = next((s.cancel for s in group.streams.values()), threading.Event())
        self.priority.wait(cancel, unless=lambda: bool(self._new) or group.decoder.pending > 0)

    def _loop(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._new or self._active or self._stop)
                if self._stop:
                    for st in self._new:
                        self._finish(st)
                    for active in self._active:
                        active.close() if isinstance(active, _Group) else self._finish(active)
                    return
                head = self._active[0] if self._active else None
                item: _Stream | _Group | None
                if self._new and (head is None or getattr(head.engine, "interleaves", True)):
                    item = self._admit(self._new.popleft())
                else:
                    item = self._active.popleft()
            if item is None:
                continue
            if isinstance(item, _Group):
                self._run_group(item)
                continue
            st = item
            if st.cancel.is_set():
                self._finish(st)
                continue
            try:
                piece = next(st.gen)
            except StopIteration:
                self._finish(st)
                continue
            except BaseException as e:  # noqa: BLE001 - handed to the stream's consumer
                self._finish(st, e)
                continue
            st.put(piece)
            with self._cond:
                if getattr(st.engine, "interleaves", True):
                    self._active.append(st)
                else:
                    self._active.appendleft(st)
            # generation pauses here while speech is being synthesized, but a new turn's prompt does not wait
            self.priority.wait(st.cancel, unless=lambda: bool(self._new))


def _transcribe_batch(items: list[tuple[Any, np.ndarray, AsrOptions]]) -> list[Transcript | BaseException]:
    engine = items[0][0]
    if len(items) > 1 and hasattr(engine, "transcribe_batch"):
        return engine.transcribe_batch([a for _, a, _ in items], [o for _, _, o in items])
    out: list[Transcript | BaseException] = []
    for _, audio, opts in items:
        try:
            out.append(engine.transcribe(audio, opts))
        except Exception as e:  # noqa: BLE001 - fails this request only
            out.append(e)
    return out


def _tts_key(item: tuple[Any, str, Voice, float]) -> Any:
    engines, _, voice, speed = item
    return engines.tts.batch_key(voice, speed)


def _asr_key(item: tuple[Any, np.ndarray, AsrOptions]) -> Any:
    engine, audio, _ = item
    fits = getattr(engine, "fits_short", None)
    return id(engine) if fits is not None and fits(audio) else None


@dataclass
class StageOptions:
    """How the stages share the machine. ``for_device`` gives the defaults: on a GPU, requests of many
    sessions are batched; on a small CPU, each runs alone and TTS takes priority over the LLM."""

    asr_batching: BatchingOptions = field(default_factory=BatchingOptions)
    tts_batching: BatchingOptions = field(default_factory=BatchingOptions)
    """Clauses of different sessions with the same voice share one call where the engine batches (Piper)."""
    llm_max_batch: int = 8
    """Streams a batching LLM backend decodes in one pass."""
    tts_workers: int = 1
    """Clauses synthesized at once (on a GPU, concurrent ONNX Runtime runs of one shared session)."""
    tts_priority: bool = True
    """Pause LLM generation while TTS runs (a CPU with few cores); off on a GPU."""

    @classmethod
    def for_device(cls, device: str, *, max_batch: int = 0, window_ms: float = -1.0, tts_workers: int = 0,
                   llm_max_batch: int = 0) -> StageOptions:
        gpu = device == "cuda"
        batching = BatchingOptions(max_batch=max_batch or (8 if gpu else 1),
                                   window=(window_ms if window_ms >= 0 else (5.0 if gpu else 0.0)) / 1000)
        return cls(
            asr_batching=batching,
            tts_batching=batching,
            llm_max_batch=llm_max_batch or 8,
            tts_workers=tts_workers or (4 if gpu else 1),
            tts_priority=not gpu,
        )


def stages_for(cfg: EngineConfig) -> Stages:
    """The stages a server runs for this engine configuration (batching on a GPU, see StageOptions)."""
    from stemme.engines import resolve_device

    return Stages(StageOptions.for_device(resolve_device(cfg.device), max_batch=cfg.batch_max,
                                          window_ms=cfg.batch_window_ms, tts_workers=cfg.tts_workers,
                                          llm_max_batch=cfg.llm_max_batch))


class Stages:
    """One worker per stage, so stages do not queue behind each other (a long TTS clause never delays the next
    session's VAD) and each engine's threads are budgeted on their own. ASR requests of different sessions are
    micro-batched when ``asr_batching.max_batch`` > 1; the LLM scheduler batches streams of batching backends."""

    def __init__(self, options: StageOptions | None = None) -> None:
        self.options = options or StageOptions()
        self.priority = TtsPriority(self.options.tts_priority)
        self.vad = ThreadPoolExecutor(1, thread_name_prefix="stemme-vad")
        self.asr = MicroBatcher(_transcribe_batch, options=self.options.asr_batching, key=_asr_key, name="asr")
        self.llm = LlmScheduler(self.priority, max_batch=self.options.llm_max_batch)
        self.tts = MicroBatcher(self._synthesize, options=self.options.tts_batching, key=_tts_key, name="tts",
                                workers=self.options.tts_workers)

    def depth(self, stage: str) -> int:
        """Jobs waiting for (or, for the LLM, being served by) a stage."""
        if stage == "llm":
            return self.llm.depth
        if stage in ("asr", "tts"):
            return getattr(self, stage).depth
        return self.vad._work_queue.qsize()

    def _synthesize(self, items: list[tuple[Any, str, Voice, float]]) -> list[bytes]:
        """Clauses sharing a TTS batch key (same voice and rate), as 24 kHz PCM16."""
        engines, _, voice, speed = items[0]
        with self.priority.speaking():
            audios = engines.tts.synthesize_batch([text for _, text, _, _ in items], voice, speed)
        out = []
        for audio in audios:
            rs = StreamResampler(audio.rate, OUTPUT_RATE)
            out.append(float_to_pcm16(rs(audio.samples, last=True)))
        return out

    def shutdown(self) -> None:
        self.llm.shutdown()
        self.asr.shutdown()
        self.tts.shutdown()
        self.vad.shutdown(wait=False, cancel_futures=True)


_SENTENCE_END = re.compile(r"[.!?…。！？]+[\"')\]»]*\s")
_SOFT_END = re.compile(r"[,;:–—]\s")


class ClauseChunker:
    """Cuts a token stream into clauses worth speaking: at sentence ends, at a comma once the clause is long
    enough, or at a word boundary when a clause runs on without punctuation. The first clause is cut early
    (after a few words), so that the first audio does not wait for a whole sentence."""

    def __init__(self, first_min_chars: int = 12, min_chars: int = 40, first_max_words: int = 4,
                 max_words: int = 25) -> None:
        self.first_min_chars = first_min_chars
        self.min_chars = min_chars
        self.first_max_words = first_max_words
        self.max_words = max_words
        self._buf = ""
        self._count = 0

    def _cut(self) -> int | None:
        first = self._count == 0
        for m in _SENTENCE_END.finditer(self._buf):
            if len(self._buf[: m.end()].strip()) >= 2:
                return m.end()
        limit = self.first_min_chars if first else self.min_chars
        for m in _SOFT_END.finditer(self._buf):
            if m.end() >= limit:
                return m.end()
        max_words = self.first_max_words if first else self.max_words
        # words followed by whitespace are complete; cut after max_words of them
        ends = [m.end() for m in re.finditer(r"\S+\s+", self._buf)]
        if len(ends) > max_words:
            return ends[max_words - 1]
        return None

    def push(self, piece: str) -> list[str]:
        self._buf += piece
        out = []
        while (cut := self._cut()) is not None:
            clause, self._buf = self._buf[:cut].strip(), self._buf[cut:]
            if clause:
                out.append(clause)
                self._count += 1
        return out

    def flush(self) -> list[str]:
        clause, self._buf = self._buf.strip(), ""
        return [clause] if clause else []


def pushed(chunker: ClauseChunker, text: str) -> list[str]:
    """The clauses a text completes, fed word by word as a language model writes (the WebSocket's path), so that
    the first clause is cut after a few words even when the whole text comes at once."""
    return [c for word in re.findall(r"\S+\s*|\s+", text) for c in chunker.push(word)]


def clauses_of(text: str) -> list[str]:
    """A whole text's clauses to speak one by one (Wyoming's synthesize, REST speech), cut as the WebSocket's
    answers are: the first one short, so that the first audio comes soon."""
    chunker = ClauseChunker()
    return pushed(chunker, text) + chunker.flush()


@dataclass
class TurnMarks:
    """perf_counter() times of one turn; ``report()`` gives milliseconds."""

    speech_end: float | None = None
    """When the last voiced input sample arrived (or the commit / text item for manual turns)."""
    turn_detected: float | None = None
    """When the end of the turn was decided (silence_duration_ms after speech_end, or commit)."""
    transcript: float | None = None
    first_token: float | None = None
    first_audio: float | None = None
    """When the first clause's audio was synthesized and sent."""
    language: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def report(self) -> dict[str, Any]:
        def ms(a: float | None, b: float | None) -> int | None:
            return None if a is None or b is None else round((b - a) * 1000)

        out = {
            "end_of_turn_ms": ms(self.speech_end, self.turn_detected),
            "asr_ms": ms(self.turn_detected, self.transcript),
            "llm_first_token_ms": ms(self.transcript or self.turn_detected, self.first_token),
            "tts_first_audio_ms": ms(self.first_token, self.first_audio),
            "voice_to_voice_ms": ms(self.speech_end, self.first_audio),
            "language": self.language,
        }
        out.update(self.extra)
        return out


@dataclass
class TextPiece:
    text: str


@dataclass
class SpokenClause:
    text: str
    pcm16: bytes
    """24 kHz mono PCM16."""
    seconds: float


def loop_putter(loop: asyncio.AbstractEventLoop, queue: asyncio.Queue[Q]) -> Callable[[Q], None]:
    """The hand-off from an engine thread to the event loop: ``put(x)`` queues ``x`` on ``loop``, from any thread.
    When the loop has closed (its session is gone, the process is stopping), ``x`` is dropped: nobody listens
    any more, and the shared engine thread that calls ``put`` must go on serving the other sessions."""

    def put(x: Q) -> None:
        try:
            loop.call_soon_threadsafe(queue.put_nowait, x)
        except RuntimeError:  # "Event loop is closed"
            logger.debug("a result for a closed event loop was dropped")

    return put


async def transcribe(engines: Engines, stages: Stages, audio: np.ndarray, options: AsrOptions) -> Transcript:
    """Transcribe on the ASR stage's worker (batched with other sessions' requests when batching is on)."""
    return await stages.asr((engines.asr, audio, options))


async def llm_pieces(engines: Engines, stages: Stages, messages: list[dict[str, Any]], options: GenerationOptions,
                     cancel: threading.Event) -> AsyncGenerator[str | ToolCall, None]:
    """Bridge a generation on the LLM scheduler's thread to an async iterator."""
    q: asyncio.Queue[str | ToolCall | BaseException | None] = asyncio.Queue()
    stages.llm.submit(engines.llm, messages, options, cancel, loop_putter(asyncio.get_running_loop(), q))
    finished = False
    try:
        while True:
            x = await q.get()
            if x is None:
                finished = True
                break
            if isinstance(x, BaseException):
                raise x
            yield x
    finally:
        if not finished:
            cancel.set()  # the consumer left early: the scheduler drops the stream before its next token


async def guarded_pieces(engines: Engines, stages: Stages, messages: list[dict[str, Any]],
                         options: GenerationOptions, cancel: threading.Event, marks: TurnMarks,
                         language: str | None = None) -> AsyncGenerator[str | ToolCall, None]:
    """The answer's pieces, with function calls separated from the words (ToolCallExtractor) and the echo
    guard in front: the first words are held until the guard can judge them, and an answer that copies the
    user's words is dropped before anything is spoken. Then a steered answer is generated; if that one echoes
    too, a short acknowledgement in the user's language is spoken instead (``marks.extra["echo_guard"]``). A
    call of a function the client did not declare is never passed on: before anything of the answer was
    released, the attempt is made again in words (tools were offered, the model invented one); else the call is
    dropped (``marks.extra["undeclared_call"]``: "regenerated" or "dropped")."""
    attempts = [("regenerated", messages, False), ("acknowledged", steered(messages), True)]
    while attempts:
        outcome, msgs, warmer = attempts[0]
        opts = replace(options, temperature=max(options.temperature, 0.3)) if warmer else options
        verdict = None
        async for p in _judged(engines, stages, msgs, opts, cancel, marks):
            if p is _ECHO or p is _UNDECLARED:
                verdict = p
                break
            yield cast("str | ToolCall", p)
        if verdict is None or cancel.is_set():
            return
        if verdict is _UNDECLARED:
            marks.extra["undeclared_call"] = "regenerated"
            options = replace(options, tool_choice="none")  # the same attempt again, in words
            continue
        marks.extra["echo_guard"] = outcome
        attempts.pop(0)
    yield ACKNOWLEDGE.get(language or "", ACKNOWLEDGE["en"])


_ECHO = object()
"""Sent by _judged instead of the answer's words when they copy the user's."""
_UNDECLARED = object()
"""Sent by _judged when the model calls a function the client did not declare (a small model may invent one)
while tools were offered and nothing of the answer was released: the answer is generated again in words."""


def _undeclared(call: ToolCall, options: GenerationOptions, released: bool, marks: TurnMarks) -> object | None:
    """What to do with a call: None passes it on; _UNDECLARED retries in words; _DROP drops it."""
    offered = options.offered_functions()
    if call.name in offered:
        return None
    logger.warning("the model called a function it was not offered; %s", "dropped" if released else "retrying")
    if released or not offered:
        marks.extra["undeclared_call"] = "dropped"
        return _DROP
    return _UNDECLARED


_DROP = object()


async def _judged(engines: Engines, stages: Stages, messages: list[dict[str, Any]], options: GenerationOptions,
                  cancel: threading.Event, marks: TurnMarks) -> AsyncGenerator[object, None]:
    """One attempt: its pieces once the echo guard let its first words through, or _ECHO (or _UNDECLARED)."""
    guard = EchoGuard(last_user_text(messages))
    held: list[str] = []
    released = False
    attempt = _extracted(llm_pieces(engines, stages, messages, options, threading.Event()), marks, options)
    try:
        async for p in attempt:
            if cancel.is_set():
                return
            if isinstance(p, ToolCall) and (call := _undeclared(p, options, released, marks)) is not None:
                if call is _DROP:
                    continue
                yield call
                return
            if isinstance(p, ToolCall) or not guard.active:
                released = True
                yield p
                continue
            held.append(p)
            verdict = guard.check("".join(held))
            if verdict is None:
                continue
            guard.active = False
            if verdict:
                yield _ECHO
                return
            released = True
            for h in held:
                yield h
            held.clear()
        if held and guard.check("".join(held), final=True):
            yield _ECHO
            return
        for h in held:
            yield h
    finally:
        await attempt.aclose()


_SPOKEN_END = re.compile(r"(?<=[^\W\d_])[.!?…。！？]+[\"')\]»]*(?=\s)")
"""A sentence end: punctuation after a letter (not a list number), before whitespace."""


async def _sentences(pieces: AsyncGenerator[str | ToolCall, None],
                     limit: int) -> AsyncGenerator[str | ToolCall, None]:
    """At most ``limit`` sentences of text: a spoken reply is one or two sentences, and a small model that
    runs on (lists, repeated phrases) is stopped there, which also frees the LLM for other sessions."""
    text = ""
    try:
        async for p in pieces:
            if isinstance(p, ToolCall) or limit <= 0:
                yield p
                continue
            ends = [m.end() for m in _SPOKEN_END.finditer(text + p + " ")]
            if len(ends) >= limit and ends[limit - 1] <= len(text + p):
                cut = ends[limit - 1] - len(text)
                if cut > 0:
                    yield p[:cut]
                return
            text += p
            yield p
    finally:
        await pieces.aclose()


async def _extracted(pieces: AsyncGenerator[str | ToolCall, None], marks: TurnMarks,
                     options: GenerationOptions) -> AsyncGenerator[str | ToolCall, None]:
    extractor = ToolCallExtractor(bare_json=bool(options.tools) and options.tool_choice != "none")
    try:
        async for p in pieces:
            if marks.first_token is None:
                marks.first_token = time.perf_counter()
            for out in extractor.push(p):
                yield out
        for out in extractor.flush():
            yield out
    finally:
        await pieces.aclose()


async def respond(
    engines: Engines,
    stages: Stages,
    messages: list[dict[str, Any]],
    *,
    voice: Voice | None,
    speed: float = 1.0,
    max_tokens: int = 80,
    cancel: threading.Event,
    marks: TurnMarks,
    conversation: str | None = None,
    tools: list[dict[str, Any]] | None = None,
    tool_choice: str | dict[str, Any] | None = None,
    shared_prefix: int = 0,
    max_sentences: int = 2,
    language: str | None = None,
) -> AsyncIterator[TextPiece | SpokenClause | ToolCall]:
    """Generate the answer. With a voice: yield SpokenClause as each clause is synthesized, while the LLM keeps
    writing (TTS of clause n overlaps generation of clause n+1). Without: yield TextPiece per token. A function
    call the model makes is yielded as a ToolCall. ``conversation`` (the session id) lets the engine keep this
    conversation's cache for its next turn; ``shared_prefix`` counts the leading messages without user data
    (GenerationOptions). The answer stops after ``max_sentences`` sentences (0: no limit). ``language`` is the
    language of the answer (the echo guard's last resort speaks it)."""
    opts = GenerationOptions(max_new_tokens=max_tokens, conversation=conversation, tools=tools,
                             tool_choice=tool_choice, shared_prefix=shared_prefix)
    pieces = _sentences(guarded_pieces(engines, stages, messages, opts, cancel, marks, language), max_sentences)
    if voice is None:
        try:
            async for p in pieces:
                yield p if isinstance(p, ToolCall) else TextPiece(p)
        finally:
            await pieces.aclose()
        return
    async for out in _spoken(engines, stages, pieces, voice, speed, cancel, marks):
        yield out


async def _spoken(engines: Engines, stages: Stages, pieces: AsyncGenerator[str | ToolCall, None], voice: Voice,
                  speed: float, cancel: threading.Event, marks: TurnMarks) -> AsyncIterator[SpokenClause | ToolCall]:
    """Clauses of the answer synthesized one by one while the LLM goes on writing the next."""
    clauses: asyncio.Queue[str | ToolCall | BaseException | None] = asyncio.Queue()

    async def produce() -> None:
        chunker = ClauseChunker()
        try:
            async for p in pieces:
                if isinstance(p, ToolCall):
                    for c in chunker.flush():
                        clauses.put_nowait(c)
                    clauses.put_nowait(p)
                    continue
                for c in chunker.push(p):
                    clauses.put_nowait(c)
            for c in chunker.flush():
                clauses.put_nowait(c)
        except asyncio.CancelledError:
            raise
        except BaseException as e:  # noqa: BLE001 - re-raised by the consumer
            clauses.put_nowait(e)
        finally:
            clauses.put_nowait(None)

    producer = asyncio.create_task(produce())
    try:
        while (c := await clauses.get()) is not None:
            if isinstance(c, BaseException):
                raise c
            if cancel.is_set():
                break
            if isinstance(c, ToolCall):
                yield c
                continue
            if not clean_for_speech(c):
                continue
            pcm = await stages.tts((engines, c, voice, speed))
            if cancel.is_set():
                break
            if marks.first_audio is None:
                marks.first_audio = time.perf_counter()
            yield SpokenClause(c, pcm, len(pcm) / 2 / OUTPUT_RATE)
    finally:
        producer.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await producer
        await pieces.aclose()
