"""Speech recognition: the interface the pipeline uses and its result type."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import numpy as np


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
    """When detecting, choose only among these (None: any language Whisper knows)."""
    beam_size: int = 1
    """1 is greedy (fastest); 5 is Whisper's default."""
    prompt: str | None = None
    """Initial prompt (vocabulary hints)."""


class SpeechRecognizer(Protocol):
    name: str
    device: str

    def transcribe(self, audio: np.ndarray, options: AsrOptions | None = None) -> Transcript:
        """Transcribe 16 kHz mono float32 audio. Blocking: call it from a worker thread."""
        ...
