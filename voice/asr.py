"""Speech recognition: the interface the pipeline uses and its result type."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
from stemme.voice import languages as _languages


@dataclass
class Transcript:
    text: str
    language: str
    """ISO 639-1 code, detected or forced."""
    language_probability: float
    """Detection probability (1.0 when the language was forced)."""
    audio_seconds: float
    """Length of the audio transcribed."""
    seconds: float
    """Wall time the transcription took."""
    segments: list[tuple[float, float, str]] = field(default_factory=list)
    """(start, end, text) of each segment, in seconds."""


@dataclass
class AsrOptions:
    language: str | None = None
    """Force this language; None detects it."""
    languages: tuple[str, ...] | None = None
    """When detecting, choose only among these (None or empty: any language Whisper knows)."""
    prefer: tuple[str, ...] = _languages.SUPPORTED
    """When detecting among all languages and Whisper is unsure (its best guess below ``prefer_below``), choose
    the likeliest of these: a prior toward the languages a deployment expects. Short utterances (a single
    word) are where Whisper guesses wildly (German 'Tür' as English, Portuguese 'óculos de sol' as Turkish)."""
    prefer_below: float = 0.5
    """Probability under which the detection leans toward ``prefer``; 0 turns the prior off."""
    beam_size: int = 1
    """1 is greedy (fastest); 5 is Whisper's default."""
    prompt: str | None = None
    """Initial prompt (vocabulary hints)."""


def choose_language(probs: list[tuple[str, float]], o: AsrOptions) -> tuple[str, float]:
    """The language to transcribe in, from Whisper's (language, probability) pairs: restricted to
    ``o.languages`` when given; otherwise Whisper's best guess, unless it is unsure and a preferred language
    is among the candidates."""
    if o.languages:
        allowed = [c for c in probs if c[0] in o.languages]
        if allowed:
            return max(allowed, key=lambda c: c[1])
    best = max(probs, key=lambda c: c[1])
    if best[1] < o.prefer_below and best[0] not in o.prefer:
        preferred = [c for c in probs if c[0] in o.prefer]
        if preferred:
            return max(preferred, key=lambda c: c[1])
    return best


class SpeechRecognizer(Protocol):
    name: str
    device: str

    def transcribe(self, audio: np.ndarray, options: AsrOptions | None = None) -> Transcript:
        """Transcribe 16 kHz mono float32 audio. Blocking: call it from a worker thread."""
        ...
