"""SVOX Pico, in process through ``ttspico`` (a small C extension built from its PyPI sdist), with the language
files of the ``pico-svox`` pack. A native but robotic voice for de-DE, fr-FR, es-ES, it-IT, en-US and en-GB:
16 kHz, far below 0.01 CPU-seconds per second of speech."""

from __future__ import annotations

import logging
import threading
from typing import Any

import numpy as np
from stemme.models import packs
from stemme.voice.audio import Audio
from stemme.voice.tts import Voice

from stemme.errors import ModelLoadError

logger = logging.getLogger(__name__)

RATE = 16000
PACK = "pico-svox"
LANGUAGES = ("de-DE", "fr-FR", "es-ES", "it-IT", "en-US", "en-GB")
VOLUME = 50
"""Pico's own volume (100 = its default): at 100 it clips hundreds of samples per sentence (de-DE, en-US); at 50
its peaks stay at -2 to -4 dBFS (measured, docs/voices.md)."""


def _escape(text: str) -> str:
    """Pico reads XML-like markup (<speed>, <pitch>); plain text must not be taken for it."""
    return text.replace("&", " and ").replace("<", " ").replace(">", " ")


class PicoEngine:
    name = "pico"

    def __init__(self) -> None:
        self._engines: dict[str, tuple[Any, threading.Lock]] = {}
        self._lock = threading.Lock()

    def available(self, voice: Voice) -> bool:
        if (voice.phonemes or "en-US") not in LANGUAGES:
            return False
        try:
            import ctts  # noqa: F401 - the extension ttspico builds
        except ImportError:
            return False
        return packs.state(packs.get_pack(PACK)).prepared

    def _engine(self, language: str) -> tuple[Any, threading.Lock]:
        with self._lock:
            if language not in self._engines:
                try:
                    import ctts

                    handle = ctts.engine_create(language_dir=str(packs.ready(PACK)) + "/", language=language)
                    ctts.engine_set_property(handle, "volume", VOLUME)
                except (ImportError, RuntimeError) as e:
                    raise ModelLoadError(f"cannot start SVOX Pico for {language}: {e}") from None
                self._engines[language] = (handle, threading.Lock())
            return self._engines[language]

    def synthesize(self, text: str, voice: Voice, speed: float = 1.0) -> Audio:
        import ctts

        handle, lock = self._engine(voice.phonemes or "en-US")
        chunks: list[bytes] = []

        def collect(_fmt: object, audio: bytes, _final: bool) -> bool:
            chunks.append(bytes(audio))
            return True

        with lock:  # one Pico engine speaks one text at a time
            ctts.engine_set_property(handle, "rate", max(20, min(500, round(100 * speed))))
            ctts.engine_speak(handle, _escape(text), collect)
        pcm = np.frombuffer(b"".join(chunks), dtype="<i2")
        return Audio(pcm.astype(np.float32) / 32768.0, RATE)
