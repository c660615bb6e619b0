"""Piper adapter (ONNX voices, e.g. the embedded en_US-joe-medium, or any .onnx + .onnx.json by path)."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
from stemme.models import packs
from stemme.voice.audio import Audio
from stemme.voice.tts import Voice

from stemme.errors import ModelLoadError


class PiperEngine:
    name = "piper"

    def __init__(self, *, use_cuda: bool = False) -> None:
        self.use_cuda = use_cuda
        self._voices: dict[str, object] = {}
        self._lock = threading.Lock()

    def _path(self, voice: Voice) -> Path:
        if voice.model:
            return Path(voice.model)
        return packs.pack_dir("piper-en_US-joe-medium") / "en_US-joe-medium.onnx"

    def available(self, voice: Voice) -> bool:
        if voice.model:
            return Path(voice.model).is_file()
        return packs.state(packs.get_pack("piper-en_US-joe-medium")).prepared

    def _load(self, voice: Voice):
        from piper import PiperVoice

        key = str(self._path(voice))
        with self._lock:
            if key not in self._voices:
                if not voice.model:
                    packs.ready("piper-en_US-joe-medium")
                try:
                    self._voices[key] = PiperVoice.load(key, use_cuda=self.use_cuda)
                except (OSError, ValueError, RuntimeError) as e:
                    raise ModelLoadError(f"cannot load the Piper voice {key}: {e}") from None
            return self._voices[key]

    def synthesize(self, text: str, voice: Voice, speed: float = 1.0) -> Audio:
        from piper import SynthesisConfig

        pv = self._load(voice)
        cfg = SynthesisConfig(length_scale=1.0 / max(speed, 0.1), normalize_audio=False,
                              speaker_id=int(voice.style) if voice.style else None)
        chunks = [c.audio_float_array for c in pv.synthesize(text, cfg)]
        rate = pv.config.sample_rate
        samples = np.concatenate(chunks) if chunks else np.zeros(0, np.float32)
        return Audio(samples.astype(np.float32), rate)
