"""faster-whisper (CTranslate2) adapter: int8 on CPU, float16 on CUDA."""

from __future__ import annotations

import logging
import os
import threading
import time
from pathlib import Path

import numpy as np

from stemme.errors import ModelLoadError
from stemme.models import packs
from stemme.voice.asr import AsrOptions, Transcript

logger = logging.getLogger(__name__)


def cuda_available() -> bool:
    try:
        import ctranslate2

        return ctranslate2.get_cuda_device_count() > 0
    except Exception:  # noqa: BLE001 - a broken CUDA install means: no CUDA
        return False


class FasterWhisperRecognizer:
    """Whisper through faster-whisper. One instance serves every session (calls are serialised)."""

    name = "faster-whisper"

    def __init__(
        self,
        model: str | Path | None = None,
        *,
        device: str = "auto",
        compute_type: str = "auto",
        cpu_threads: int = 0,
    ) -> None:
        from faster_whisper import WhisperModel

        path = Path(model) if model else packs.ready("whisper-base")
        if device == "auto":
            device = "cuda" if cuda_available() else "cpu"
        if compute_type == "auto":
            compute_type = "float16" if device == "cuda" else "int8"
        self.device = device
        self.compute_type = compute_type
        self.path = path
        t = time.perf_counter()
        try:
            self.model = WhisperModel(str(path), device=device, compute_type=compute_type,
                                      cpu_threads=cpu_threads or min(4, os.cpu_count() or 1), local_files_only=True)
        except (RuntimeError, ValueError, OSError) as e:
            raise ModelLoadError(f"cannot load the Whisper model at {path}: {e}") from None
        self.load_seconds = time.perf_counter() - t
        self._lock = threading.Lock()
        logger.info("ASR faster-whisper loaded from %s on %s/%s in %.2fs", path, device, compute_type,
                    self.load_seconds)

    def _detect(self, audio: np.ndarray, allowed: tuple[str, ...]) -> tuple[str, float]:
        _lang, _p, probs = self.model.detect_language(audio)
        best = [(lang, p) for lang, p in probs if lang in allowed]
        if not best:
            return _lang, _p
        lang, p = max(best, key=lambda x: x[1])
        return lang, float(p)

    def transcribe(self, audio: np.ndarray, options: AsrOptions | None = None) -> Transcript:
        o = options or AsrOptions()
        audio = np.asarray(audio, dtype=np.float32)
        t = time.perf_counter()
        with self._lock:
            language = o.language
            prob = 1.0
            if language is None and o.languages:
                language, prob = self._detect(audio, o.languages)
            segments, info = self.model.transcribe(
                audio,
                language=language,
                beam_size=o.beam_size,
                initial_prompt=o.prompt,
                condition_on_previous_text=False,
                without_timestamps=True,
                vad_filter=False,
            )
            segs = [(s.start, s.end, s.text) for s in segments]
        if o.language is None and not o.languages:
            prob = float(info.language_probability)
        text = " ".join(s[2].strip() for s in segs).strip()
        return Transcript(
            text=text,
            language=info.language,
            language_probability=prob,
            audio_seconds=len(audio) / 16000,
            seconds=time.perf_counter() - t,
            segments=segs,
        )
