"""espeak-ng as a voice of last resort (robotic, but it speaks about a hundred languages).

Uses the library and data shipped by espeakng-loader through ctypes, in synchronous mode."""

from __future__ import annotations

import ctypes
import threading

import numpy as np
from stemme.voice.audio import Audio
from stemme.voice.tts import Voice

from stemme.errors import ModelLoadError

_AUDIO_OUTPUT_SYNCHRONOUS = 2
_POS_CHARACTER = 1
_CHARS_UTF8 = 1
_RATE_PARAM = 1
_CALLBACK = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.c_void_p)


class EspeakEngine:
    name = "espeak"

    def __init__(self) -> None:
        self._lib = None
        self._rate = 22050
        self._lock = threading.Lock()
        self._buf: list[np.ndarray] = []
        self._cb = _CALLBACK(self._on_audio)

    def _on_audio(self, wav, n, _events) -> int:  # noqa: ANN001 - ctypes callback
        if n > 0 and wav:
            self._buf.append(np.ctypeslib.as_array(wav, shape=(n,)).astype(np.float32) / 32768.0)
        return 0

    def _load(self):
        if self._lib is None:
            try:
                import espeakng_loader

                lib = ctypes.CDLL(espeakng_loader.get_library_path())
                data = espeakng_loader.get_data_path().encode()
                rate = lib.espeak_Initialize(_AUDIO_OUTPUT_SYNCHRONOUS, 0, ctypes.c_char_p(data), 0)
            except (OSError, ImportError) as e:
                raise ModelLoadError(f"cannot load espeak-ng: {e}") from None
            if rate <= 0:
                raise ModelLoadError("espeak-ng failed to initialise (data path?)")
            lib.espeak_SetSynthCallback(self._cb)
            self._lib, self._rate = lib, rate
        return self._lib

    def available(self, voice: Voice) -> bool:
        try:
            import espeakng_loader

            return bool(espeakng_loader.get_library_path())
        except ImportError:
            return False

    def synthesize(self, text: str, voice: Voice, speed: float = 1.0) -> Audio:
        with self._lock:
            lib = self._load()
            if lib.espeak_SetVoiceByName(ctypes.c_char_p((voice.phonemes or voice.language).encode())) != 0:
                raise ModelLoadError(f"espeak-ng has no voice {voice.phonemes or voice.language!r}")
            lib.espeak_SetParameter(_RATE_PARAM, int(175 * speed), 0)
            self._buf = []
            data = text.encode("utf-8") + b"\0"
            lib.espeak_Synth(ctypes.c_char_p(data), ctypes.c_size_t(len(data)), 0, _POS_CHARACTER, 0,
                             _CHARS_UTF8, None, None)
            lib.espeak_Synchronize()
            samples = np.concatenate(self._buf) if self._buf else np.zeros(0, np.float32)
            self._buf = []
        return Audio(samples, self._rate)
