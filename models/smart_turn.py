"""Smart Turn v3.2 (pipecat-ai, BSD-2): an audio end-of-turn classifier. It hears the last 8 s of an utterance
and says whether the speaker has finished (intonation and words, 23 languages), so a turn can end after a
short pause when the sentence is complete, and wait longer when it is not. The ONNX file is taken from the
``pipecat-ai`` wheel (installed without its framework: see models/packs.py, pack ``smart-turn-v3.2``).

Input: Whisper log-mel features (80 x 800) of the last 8 s at 16 kHz, zero-padded at the start and
normalised to zero mean and unit variance; output: the probability that the turn is complete.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from pathlib import Path

import numpy as np
from stemme.models import packs
from stemme.voice.audio import ASR_RATE

from stemme.errors import ModelLoadError

logger = logging.getLogger(__name__)

WINDOW_S = 8


class SmartTurn:
    name = "smart-turn-v3.2"

    def __init__(self, model: str | Path | None = None, *, threads: int = 1) -> None:
        import onnxruntime as ort
        from transformers import WhisperFeatureExtractor

        path = Path(model) if model else packs.ready("smart-turn-v3.2") / "smart-turn-v3.2-cpu.onnx"
        t = time.perf_counter()
        so = ort.SessionOptions()
        so.intra_op_num_threads = threads or (os.cpu_count() or 1)
        so.inter_op_num_threads = 1
        so.log_severity_level = 3
        try:
            self.session = ort.InferenceSession(str(path), sess_options=so, providers=["CPUExecutionProvider"])
        except Exception as e:  # noqa: BLE001 - onnxruntime raises its own untyped errors
            raise ModelLoadError(f"cannot load the end-of-turn model {path}: {e}") from None
        self.features = WhisperFeatureExtractor(chunk_length=WINDOW_S)
        self.path = path
        self._lock = threading.Lock()
        self.load_seconds = time.perf_counter() - t
        logger.info("end-of-turn model loaded from %s in %.2fs", path, self.load_seconds)

    def probability(self, audio: np.ndarray) -> float:
        """Probability that the utterance (16 kHz float32, ending now) is a complete turn."""
        n = WINDOW_S * ASR_RATE
        x = np.asarray(audio, dtype=np.float32)[-n:]
        if len(x) < n:
            x = np.concatenate([np.zeros(n - len(x), np.float32), x])
        feats = self.features(x, sampling_rate=ASR_RATE, return_tensors="np", padding="max_length",
                              max_length=n, truncation=True, do_normalize=True).input_features
        with self._lock:
            out = self.session.run(None, {"input_features": feats.astype(np.float32)})[0]
        return float(np.asarray(out).reshape(-1)[0])
