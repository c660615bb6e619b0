"""Streaming voice activity detection: 16 kHz audio in, speech-start / speech-end events out.

The semantics follow the Realtime API's ``server_vad``: ``threshold``, ``prefix_padding_ms`` (audio kept
before the detected start) and ``silence_duration_ms`` (silence that ends the turn).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
from stemme.voice.audio import ASR_RATE

FRAME = 512
"""Samples per VAD decision (32 ms at 16 kHz)."""


class SpeechModel(Protocol):
    def new_state(self) -> object: ...

    def __call__(self, frames: np.ndarray, state: object) -> np.ndarray: ...


@dataclass
class VadOptions:
    threshold: float = 0.5
    """Speech probability at or above which a frame is speech."""
    prefix_padding_ms: int = 300
    """Audio kept before the detected start of speech."""
    silence_duration_ms: int = 500
    """Silence after speech that ends the utterance."""
    min_speech_ms: int = 160
    """Speech needed before a start is announced (rejects clicks and coughs)."""
    max_speech_s: float = 30.0
    """An utterance is cut (ended) after this long."""
    trailing_ms: int = 200
    """Silence kept after the last voiced frame in the utterance audio; also the pause after which the
    end-of-turn model (when there is one) is asked whether the turn is complete."""
    complete_threshold: float = 0.5
    """With an end-of-turn model: the probability at or above which a pause ends the turn at once."""

    @property
    def neg_threshold(self) -> float:
        return max(0.05, self.threshold - 0.15)


@dataclass
class SpeechStarted:
    audio_start_ms: int
    """Start of the utterance (prefix padding included), in ms since the stream began."""


@dataclass
class SpeechStopped:
    audio_end_ms: int
    """End of the last voiced frame, in ms since the stream began."""
    audio: np.ndarray = field(repr=False)
    """The utterance at 16 kHz, prefix padding and a little trailing silence included."""
    forced: bool = False
    """True when the utterance hit ``max_speech_s``."""
    decided_ms: int = 0
    """Where in the stream the end was decided: ``decided_ms - audio_end_ms`` is the silence it waited for."""


@dataclass
class SpeechPaused:
    """Speech went quiet for ``trailing_ms``; the turn ends unless speech resumes within the rest of
    ``silence_duration_ms``. ``audio`` is exactly what SpeechStopped will carry if it does not resume, so
    a consumer may start transcribing it speculatively."""

    audio: np.ndarray = field(repr=False)


VadEvent = SpeechStarted | SpeechStopped | SpeechPaused


class VadStream:
    """Per-stream VAD state over a shared model. Not thread-safe: one stream per session.

    With ``end_of_turn`` (audio -> probability that the speaker has finished; semantic turn detection), the
    first pause of ``trailing_ms`` asks it: a complete turn ends there, at once; an incomplete one waits for
    the full ``silence_duration_ms`` (which semantic_vad sets longer than server_vad's)."""

    def __init__(self, model: SpeechModel, options: VadOptions | None = None,
                 end_of_turn: Callable[[np.ndarray], float] | None = None) -> None:
        self.model = model
        self.options = options or VadOptions()
        self.end_of_turn = end_of_turn
        self.last_probability: float | None = None
        """The end-of-turn model's answer at the last pause (None without a model)."""
        self._state = model.new_state()
        self._pending = np.zeros(0, dtype=np.float32)
        self._history: list[np.ndarray] = []
        """Recent frames before speech (for the prefix padding)."""
        self._utterance: list[np.ndarray] = []
        self._frames_seen = 0
        self._voiced_run = 0
        self._silence_run = 0
        self._speaking = False
        self._candidate = False
        self._start_frame = 0
        self._last_voiced = 0

    @property
    def speaking(self) -> bool:
        return self._speaking

    @property
    def samples_seen(self) -> int:
        return self._frames_seen * FRAME + len(self._pending)

    def reset(self) -> None:
        """Forget buffered audio and any utterance in progress (keeps the clock)."""
        self._pending = np.zeros(0, dtype=np.float32)
        self._history.clear()
        self._utterance.clear()
        self._voiced_run = self._silence_run = 0
        self._speaking = self._candidate = False

    def _ms(self, frames: int) -> int:
        return frames * FRAME * 1000 // ASR_RATE

    def feed(self, samples: np.ndarray) -> list[VadEvent]:
        """Feed 16 kHz float32 samples (any length); return the events they complete."""
        x = np.concatenate([self._pending, np.asarray(samples, dtype=np.float32)])
        n = len(x) // FRAME
        self._pending = x[n * FRAME:]
        if n == 0:
            return []
        frames = x[: n * FRAME].reshape(n, FRAME)
        probs = self.model(frames, self._state)
        events: list[VadEvent] = []
        limits = _Limits.of(self.options)
        for frame, p in zip(frames, np.asarray(probs, dtype=np.float64).tolist(), strict=True):
            self._step(frame, p, limits, events)
        return events

    def _step(self, frame: np.ndarray, p: float, lim: _Limits, events: list[VadEvent]) -> None:
        """One frame of speech probability ``p``: its events (if any) are appended to ``events``."""
        idx = self._frames_seen
        self._frames_seen += 1
        if not (self._speaking or self._candidate):
            if p < self.options.threshold:
                self._remember(frame, lim.pad)
                return
            self._begin_candidate(frame, idx, lim.pad)
        else:
            self._track(frame, idx, p)
        if self._candidate and not self._speaking:
            self._check_candidate(lim, events)
        elif self._speaking:
            self._check_end(idx, lim, events)

    def _remember(self, frame: np.ndarray, pad: int) -> None:
        """A frame before speech, kept for the prefix padding."""
        self._history.append(frame)
        if len(self._history) > max(pad, 1):
            del self._history[0]

    def _begin_candidate(self, frame: np.ndarray, idx: int, pad: int) -> None:
        self._candidate = True
        self._voiced_run = 1
        self._silence_run = 0
        self._start_frame = idx
        self._last_voiced = idx
        self._utterance = [*(self._history[-pad:] if pad else []), frame]
        self._history.clear()

    def _track(self, frame: np.ndarray, idx: int, p: float) -> None:
        """A frame inside a candidate or an utterance: voiced (with hysteresis once speaking) or silent."""
        o = self.options
        self._utterance.append(frame)
        if p >= o.threshold or (self._speaking and p >= o.neg_threshold and self._silence_run == 0):
            self._voiced_run += 1
            self._silence_run = 0
            self._last_voiced = idx
        else:
            self._silence_run += 1

    def _check_candidate(self, lim: _Limits, events: list[VadEvent]) -> None:
        """Enough voiced frames start an utterance; enough silence drops the candidate (a click, a cough)."""
        if self._voiced_run >= lim.min_speech:
            self._speaking = True
            self._candidate = False
            events.append(SpeechStarted(self._ms(max(0, self._start_frame - lim.pad))))
        elif self._silence_run >= lim.silence_end:
            self._candidate = False
            self._voiced_run = self._silence_run = 0
            self._history = self._utterance[-max(lim.pad, 1):]
            self._utterance = []

    def _check_end(self, idx: int, lim: _Limits, events: list[VadEvent]) -> None:
        """A pause (SpeechPaused, or the end at once when the end-of-turn model finds the turn complete), the
        full silence, or the longest utterance ends it (SpeechStopped)."""
        complete = False
        if self._silence_run == lim.trail and lim.trail < lim.silence_end:
            complete = self._pause(events)
        length = idx - self._start_frame + 1
        if complete or self._silence_run >= lim.silence_end or length >= lim.longest:
            keep = len(self._utterance) - max(0, self._silence_run - lim.trail)
            audio = np.concatenate(self._utterance[:keep]) if keep > 0 else np.zeros(0, np.float32)
            events.append(SpeechStopped(self._ms(self._last_voiced + 1), audio, forced=length >= lim.longest,
                                        decided_ms=self._ms(idx + 1)))
            self._utterance = []
            self._speaking = False
            self._voiced_run = self._silence_run = 0

    def _pause(self, events: list[VadEvent]) -> bool:
        """The first pause of ``trailing_ms``: True when the end-of-turn model says the turn is complete."""
        audio = np.concatenate(self._utterance)
        complete = False
        if self.end_of_turn is not None:
            self.last_probability = self.end_of_turn(audio)
            complete = self.last_probability >= self.options.complete_threshold
        if not complete:
            events.append(SpeechPaused(audio))
        return complete


@dataclass(frozen=True)
class _Limits:
    """VadOptions in frames."""

    min_speech: int
    silence_end: int
    pad: int
    trail: int
    longest: int

    @classmethod
    def of(cls, o: VadOptions) -> _Limits:
        frame_ms = FRAME * 1000 / ASR_RATE
        return cls(min_speech=max(1, int(o.min_speech_ms / frame_ms)),
                   silence_end=max(1, int(o.silence_duration_ms / frame_ms)),
                   pad=int(o.prefix_padding_ms / frame_ms), trail=int(o.trailing_ms / frame_ms),
                   longest=int(o.max_speech_s * 1000 / frame_ms))
