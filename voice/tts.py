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


def make_voice(language: str, engine: str, style: str | None = None, *, speed: float = 1.0,
               description: str = "") -> Voice:
    """A voice for a language by engine: 'kokoro' with a style vector (espeak-ng phonemes of the language),
    'pico' with a Pico language tag in ``style`` (e.g. de-DE), 'espeak', or 'piper' with its model name."""
    if engine == "kokoro":
        name = f"kokoro:{style}:{language}" + ("" if speed == 1.0 else f"@{speed:g}")
        return Voice(name, language, engine, style=style, phonemes=languages.espeak_voice(language), speed=speed,
                     description=description)
    if engine == "pico":
        return Voice(f"pico:{style}", language, engine, phonemes=style, speed=speed, description=description)
    if engine == "espeak":
        return Voice(f"espeak:{language}", language, engine, phonemes=languages.espeak_voice(language) or language,
                     speed=speed, description=description)
    if engine == "piper":
        return Voice(f"piper:{style}", language, engine, speed=speed, description=description)
    raise ConfigError(f"unknown voice engine {engine!r}")


NATIVE_CHOICE: dict[str, tuple[tuple[str, str, str], ...]] = {
    "en": (("piper", "en_US-joe-medium", "Piper joe, US English (native)"),
           ("kokoro", "af_heart", "Kokoro v1.0 af_heart, US English (native)"),
           ("pico", "en-US", "SVOX Pico, US English (native, robotic)"),
           ("pico", "en-GB", "SVOX Pico, British English (native, robotic)")),
    "fr": (("kokoro", "ff_siwis", "Kokoro v1.0 ff_siwis (native French)"),
           ("pico", "fr-FR", "SVOX Pico (native French, robotic, fastest)")),
    "es": (("kokoro", "ef_dora", "Kokoro v1.0 ef_dora (native Spanish)"),
           ("kokoro", "em_alex", "Kokoro v1.0 em_alex (native Spanish)"),
           ("kokoro", "em_santa", "Kokoro v1.0 em_santa (native Spanish)"),
           ("pico", "es-ES", "SVOX Pico (native Spanish, robotic, fastest)")),
    "it": (("kokoro", "if_sara", "Kokoro v1.0 if_sara (native Italian)"),
           ("kokoro", "im_nicola", "Kokoro v1.0 im_nicola (native Italian)"),
           ("pico", "it-IT", "SVOX Pico (native Italian, robotic, fastest)")),
    "pt": (("kokoro", "pf_dora", "Kokoro v1.0 pf_dora (native Brazilian Portuguese)"),
           ("kokoro", "pm_alex", "Kokoro v1.0 pm_alex (native Brazilian Portuguese)"),
           ("kokoro", "pm_santa", "Kokoro v1.0 pm_santa (native Brazilian Portuguese)")),
    "de": (("pico", "de-DE", "SVOX Pico (native German, robotic, fastest)"),
           ("kokoro", "im_nicola", "Kokoro v1.0 im_nicola with German phonemes (Italian accent)")),
}
"""Languages with a native voice: the candidates, best first by measurement (docs/voices.md)."""

STAND_IN = "im_nicola"
"""The Kokoro vector that reads languages without a voice of their own (through espeak-ng phonemes) best:
measured against the other European and English vectors in Dutch, Polish and Russian (docs/voices.md)."""


def voice_choice(lang: str) -> list[tuple[str, str | None, str]]:
    """(engine, style, notes) of a language's voices, best first; espeak-ng last wherever it reads the language."""
    name = languages.name(lang)
    lent = languages.BORROWED.get(lang)
    reading = f"{name} read with {languages.name(lent)} phonemes" if lent else f"{name} phonemes"
    out: list[tuple[str, str | None, str]] = list(NATIVE_CHOICE.get(lang, ()))
    if not out and lang in languages.EUROPEAN and languages.espeak_voice(lang):
        out.append(("kokoro", STAND_IN, f"Kokoro v1.0 {STAND_IN} with {reading} (no native neural voice: "
                                        "an Italian accent)"))
    if languages.espeak_voice(lang):
        out.append(("espeak", None, f"espeak-ng{', ' + reading if lent else ''} (robotic; last resort)"))
    return out


def default_voices() -> list[Voice]:
    """The embedded voices, best first for each language: every Whisper language that some voice reads."""
    return [make_voice(lang, engine, style, description=notes)
            for lang in dict.fromkeys((*languages.EUROPEAN, *languages.WHISPER))
            for engine, style, notes in voice_choice(lang)]


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

