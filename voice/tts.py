"""Speech synthesis: voices per language, the engine interface, and clause-by-clause streaming.

Each language maps to an ordered list of voices; the first one whose engine and files are available speaks.
Operators add voices (a Piper ``.onnx``, a Kokoro style vector, a Pico or espeak-ng language) with a JSON file
(``STEMME_VOICES`` or ``--voices``), placed before the defaults of their language.
"""

from __future__ import annotations

import json
import logging
import re
import threading
from collections.abc import Hashable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from stemme.voice import languages
from stemme.voice.audio import Audio, limit_peak, trim_silence

from stemme.errors import ConfigError, VoiceNotFoundError

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Voice:
    name: str
    """Unique name, e.g. 'piper:en_US-joe-medium' or 'kokoro:jm_kumo:fr'."""
    language: str
    """ISO 639-1 code of the language it speaks."""
    engine: str
    """piper, kokoro, espeak or pico."""
    model: str | None = None
    """Model file (Piper .onnx, Kokoro .onnx); None: the embedded pack."""
    style: str | None = None
    """Kokoro style vector name, or a .npy / .npz file path (Kokoro); Piper speaker id."""
    phonemes: str | None = None
    """espeak-ng language used for phonemes (Kokoro, espeak) or the Pico language tag (e.g. fr-FR)."""
    speed: float = 1.0
    """Default speaking rate of this voice (1 = normal)."""
    description: str = ""


class TtsEngine(Protocol):
    name: str

    def available(self, voice: Voice) -> bool:
        """True when this engine can speak with this voice on this machine (files, binaries present)."""
        ...

    def synthesize(self, text: str, voice: Voice, speed: float = 1.0) -> Audio:
        """Speak one clause. Blocking: call it from a worker thread."""
        ...


_KOKORO_LANG = {"en": "en-us", "fr": "fr-fr", "de": "de", "es": "es", "it": "it", "pt": "pt-br", "nl": "nl",
                "pl": "pl", "cs": "cs", "sv": "sv", "da": "da", "ro": "ro", "fi": "fi"}
_PICO_LANG = {"en": "en-US", "de": "de-DE", "es": "es-ES", "fr": "fr-FR", "it": "it-IT"}
_ESPEAK_LANG = {"en": "en-us", "pt": "pt-br"}


def default_voices() -> list[Voice]:
    """The embedded voices, best first for each language."""
    out = [Voice("piper:en_US-joe-medium", "en", "piper", description="Piper joe, US English (embedded)")]
    for lang in languages.SUPPORTED:
        # Kokoro's European phonemes through its best Japanese style vector: intelligible, with an accent.
        # A little slower than its default rate: measurably better understood (docs/benchmarks.md).
        out.append(Voice(f"kokoro:jm_kumo:{lang}", lang, "kokoro", style="jm_kumo", phonemes=_KOKORO_LANG[lang],
                         speed=0.9, description=f"Kokoro-82M int8, style jm_kumo, {languages.name(lang)} phonemes"))
    for lang, tag in _PICO_LANG.items():
        out.append(Voice(f"pico:{tag}", lang, "pico", phonemes=tag,
                         description="SVOX Pico (if the operator installed libttspico-utils)"))
    for lang in languages.SUPPORTED:
        out.append(Voice(f"espeak:{lang}", lang, "espeak", phonemes=_ESPEAK_LANG.get(lang, lang),
                         description="espeak-ng (last resort)"))
    return out


def load_voice_file(path: str | Path) -> list[Voice]:
    """Read operator voices: a JSON list of objects with Voice's fields."""
    try:
        items = json.loads(Path(path).read_text())
        voices = [Voice(**item) for item in items]
    except (OSError, ValueError, TypeError) as e:
        raise ConfigError(f"cannot read the voice file {path}: {e}") from None
    for v in voices:
        if v.engine not in ("piper", "kokoro", "espeak", "pico"):
            raise ConfigError(f"voice {v.name!r} in {path}: unknown engine {v.engine!r}")
    return voices


class VoiceRegistry:
    def __init__(self, voices: list[Voice], engines: dict[str, TtsEngine]) -> None:
        self.voices = voices
        self.engines = engines
        self._available: dict[str, bool] = {}

    def available(self, voice: Voice) -> bool:
        if voice.name not in self._available:
            engine = self.engines.get(voice.engine)
            self._available[voice.name] = bool(engine and engine.available(voice))
        return self._available[voice.name]

    def for_language(self, language: str, *, only_available: bool = True) -> list[Voice]:
        language = languages.normalise(language) or "en"
        return [v for v in self.voices if v.language == language and (not only_available or self.available(v))]

    def languages(self) -> list[str]:
        return sorted({v.language for v in self.voices if self.available(v)})

    def resolve(self, language: str | None, name: str | None = None) -> Voice:
        if name:
            for v in self.voices:
                if v.name == name or v.name.split(":")[1:2] == [name]:
                    if v.language == (languages.normalise(language) or v.language) or language is None:
                        if not self.available(v):
                            raise VoiceNotFoundError(f"voice {v.name!r} is not available on this machine")
                        return v
            # a name that is not for this language falls back to the language's best voice
            if language is None:
                raise VoiceNotFoundError(f"no voice named {name!r}; see `stemme voices`")
        lang = languages.normalise(language) or "en"
        found = self.for_language(lang)
        if not found:
            raise VoiceNotFoundError(f"no voice is available for language {lang!r}; see `stemme voices`")
        return found[0]


_CLAUSE_END = re.compile(r"(?<=[.!?;:…。！？])\s+|(?<=[,，])\s+|\n+")


def split_clauses(text: str, min_chars: int = 24) -> list[str]:
    """Split text into speakable clauses: sentences, and long sentences at commas.
    Pieces shorter than ``min_chars`` join the next one so that each call to the engine is worth its cost."""
    pieces = [p.strip() for p in _CLAUSE_END.split(text) if p and p.strip()]
    out: list[str] = []
    buf = ""
    for p in pieces:
        buf = f"{buf} {p}".strip()
        if len(buf) >= min_chars or buf[-1:] in ".!?…":
            out.append(buf)
            buf = ""
    if buf:
        if out and len(buf) < min_chars // 2 and out[-1][-1:] not in ".!?…":
            out[-1] = f"{out[-1]} {buf}"
        else:
            out.append(buf)
    return out


_SPEAKABLE = re.compile(r"[*_`#>|~]+|\[(.*?)\]\(.*?\)")


def clean_for_speech(text: str) -> str:
    """Drop markdown marks and emojis a small model may write; they are not meant to be read aloud."""
    text = _SPEAKABLE.sub(lambda m: m.group(1) or " ", text)
    text = re.sub(r"[\U0001F000-\U0001FAFF\u2600-\u27BF]", "", text)
    return re.sub(r"\s+", " ", text).strip()


@dataclass
class Synthesizer:
    """Speaks text with the registry's voices, clause by clause, trimmed and level-limited."""

    registry: VoiceRegistry
    speed: float = 1.0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def _rate(self, voice: Voice, speed: float | None) -> float:
        return (speed or self.speed) * voice.speed

    @staticmethod
    def _finish(audio: Audio) -> Audio:
        return Audio(limit_peak(trim_silence(audio.samples, audio.rate)), audio.rate)

    def synthesize(self, text: str, voice: Voice, speed: float | None = None) -> Audio:
        engine = self.registry.engines[voice.engine]
        return self._finish(engine.synthesize(clean_for_speech(text), voice, self._rate(voice, speed)))

    def batch_key(self, voice: Voice, speed: float | None = None) -> Hashable | None:
        """Clauses with equal keys may be synthesized in one call (``synthesize_batch``); None: alone."""
        fn = getattr(self.registry.engines.get(voice.engine), "batch_key", None)
        return fn(voice, self._rate(voice, speed)) if fn is not None else None

    def synthesize_batch(self, texts: list[str], voice: Voice, speed: float | None = None) -> list[Audio]:
        """Several clauses (of different sessions) with one voice: one engine call where the engine batches."""
        engine = self.registry.engines[voice.engine]
        cleaned = [clean_for_speech(t) for t in texts]
        rate = self._rate(voice, speed)
        if len(texts) > 1 and hasattr(engine, "synthesize_batch"):
            audios = engine.synthesize_batch(cleaned, voice, rate)
        else:
            audios = [engine.synthesize(t, voice, rate) for t in cleaned]
        return [self._finish(a) for a in audios]

    def stream(self, text: str, voice: Voice, speed: float | None = None) -> Iterator[Audio]:
        """Yield one Audio per clause; the first is ready without waiting for the rest of the text."""
        for clause in split_clauses(text):
            if clean_for_speech(clause):
                yield self.synthesize(clause, voice, speed)

