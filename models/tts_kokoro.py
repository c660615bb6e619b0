"""Kokoro-82M (int8 ONNX) adapter with espeak-ng phonemes, for the European languages.

Style vectors: the Japanese ones of the embedded pack (``kokoro-82m-int8``) and the European and English ones
of ``kokoro-v1.0-voices`` (taken from the kokoro sdist; the same v1.0 model), by name, or a .npy/.npz file.

Inputs: ``tokens`` int64 [1, T+2] (0-padded at both ends), ``style`` float32 [1, 256] chosen by the token count
from the voice's style table, ``speed`` float32 [1]; output float32 audio at 24 kHz.
"""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path
from typing import Any

import numpy as np
from stemme.models import packs
from stemme.voice.audio import Audio
from stemme.voice.tts import Voice

from stemme.errors import ModelLoadError

RATE = 24000
MAX_TOKENS = 510

VECTOR_PACK = "kokoro-v1.0-voices"

PHONEME_FALLBACK = {"ʏ": "y", "ɵ": "ʊ", "ʑ": "ʒ", "ɫ": "l", "ɬ": "l", "ʀ": "ʁ", "ɱ": "m", "ɧ": "ʃ", "ɘ": "ə",
                    "ɭ": "l", "ʉ": "u", "ε": "ɛ", "ʐ": "ʒ"}
"""espeak-ng phonemes missing from Kokoro's vocabulary, mapped to the nearest sound it knows
(German 'ü' in 'zurück', Dutch 'u' in 'dus', Polish 'ź', Swedish and Norwegian 'u', Russian and Lithuanian
dark 'l', Belarusian 'ж'; espeak's Danish writes a Greek epsilon); without this they are silently dropped.
The German diphthong 'eu' (espeak 'ɔø') is read as the English 'oy' Kokoro knows well."""


class EspeakPhonemizer:
    """espeak-ng IPA phonemes through phonemizer, with the library and data of espeakng-loader."""

    def __init__(self) -> None:
        import espeakng_loader
        from phonemizer.backend.espeak.wrapper import EspeakWrapper

        EspeakWrapper.set_library(espeakng_loader.get_library_path())
        EspeakWrapper.set_data_path(espeakng_loader.get_data_path())
        self._backends: dict[str, Any] = {}
        self._lock = threading.Lock()

    def __call__(self, text: str, language: str) -> str:
        from phonemizer.backend import EspeakBackend

        with self._lock:
            backend = self._backends.get(language)
            if backend is None:
                backend = EspeakBackend(language, preserve_punctuation=True, with_stress=True,
                                        language_switch="remove-flags", tie=False)
                self._backends[language] = backend
            return backend.phonemize([text], strip=True, njobs=1)[0]


class KokoroEngine:
    name = "kokoro"

    def __init__(self, model: str | Path | None = None, *, threads: int = 1, device: str = "cpu") -> None:
        self.model_path = Path(model) if model else None
        self.threads = threads
        self.device = device
        self._session = None
        self._vocab: dict[str, int] = {}
        self._styles: dict[str, np.ndarray] = {}
        self._phonemizer: EspeakPhonemizer | None = None
        self._lock = threading.Lock()

    def available(self, voice: Voice) -> bool:
        if voice.model and not Path(voice.model).is_file():
            return False
        if voice.style and voice.style.endswith((".npy", ".npz")) and not Path(voice.style).is_file():
            return False
        if voice.style in packs.KOKORO_VECTORS and not packs.state(packs.get_pack(VECTOR_PACK)).prepared:
            return False
        return bool(self.model_path) or packs.state(packs.get_pack("kokoro-82m-int8")).prepared

    def _load(self) -> None:
        with self._lock:
            if self._session is not None:
                return
            import onnxruntime as ort

            d = packs.ready("kokoro-82m-int8")
            path = self.model_path or d / "model.onnx"
            opts = ort.SessionOptions()
            opts.intra_op_num_threads = self.threads or (os.cpu_count() or 1)
            opts.inter_op_num_threads = 1
            opts.log_severity_level = 3
            providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if self.device == "cuda" else [
                "CPUExecutionProvider"]
            try:
                self._session = ort.InferenceSession(str(path), sess_options=opts, providers=providers)
            except Exception as e:  # noqa: BLE001 - onnxruntime raises its own untyped errors
                raise ModelLoadError(f"cannot load the Kokoro model {path}: {e}") from None
            self._vocab = json.loads((d / "vocab.json").read_text(encoding="utf-8"))["vocab"]
            with np.load(d / "voices.npz") as npz:
                self._styles = {k: npz[k].reshape(-1, 256).astype(np.float32) for k in npz.files}
            self._styles.update(self._vectors())
            self._phonemizer = EspeakPhonemizer()

    @staticmethod
    def _vectors() -> dict[str, np.ndarray]:
        """The v1.0 vectors of the voices pack, when it is prepared (raw little-endian float32, 510 x 256)."""
        if not packs.state(packs.get_pack(VECTOR_PACK)).prepared:
            return {}
        d = packs.ready(VECTOR_PACK)
        return {name: np.fromfile(d / f"{name}.bin", dtype="<f4").reshape(-1, 256) for name in packs.KOKORO_VECTORS}

    def _style(self, voice: Voice) -> np.ndarray:
        name = voice.style or "jm_kumo"
        if name not in self._styles and name.endswith((".npy", ".npz")):
            arr = np.load(name)
            if hasattr(arr, "files"):
                arr = arr[arr.files[0]]
            self._styles[name] = np.asarray(arr, dtype=np.float32).reshape(-1, 256)
        if name not in self._styles:
            raise ModelLoadError(f"Kokoro style {name!r} not found (known: {', '.join(self._styles)})")
        return self._styles[name]

    def tokens(self, text: str, language: str) -> list[int]:
        self._load()
        assert self._phonemizer is not None
        phonemes = self._phonemizer(text, language)
        phonemes = "".join(PHONEME_FALLBACK.get(c, c) for c in phonemes.replace("ɔø", "ɔɪ"))
        return [self._vocab[c] for c in phonemes if c in self._vocab][:MAX_TOKENS]

    def synthesize(self, text: str, voice: Voice, speed: float = 1.0) -> Audio:
        self._load()
        tokens = self.tokens(text, voice.phonemes or "en-us")
        if not tokens:
            return Audio(np.zeros(0, np.float32), RATE)
        styles = self._style(voice)
        ref = styles[min(len(tokens), len(styles) - 1)]
        assert self._session is not None
        audio = self._session.run(None, {
            "tokens": np.array([[0, *tokens, 0]], dtype=np.int64),
            "style": ref.reshape(1, 256),
            "speed": np.array([speed], dtype=np.float32),
        })[0]
        return Audio(np.asarray(audio, dtype=np.float32).reshape(-1), RATE)
