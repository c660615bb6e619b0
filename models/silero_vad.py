"""Silero VAD v6 on ONNX Runtime: one shared session, per-stream LSTM state."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
from stemme.models import packs

FRAME = 512
"""Samples per decision at 16 kHz (32 ms)."""
CONTEXT = 64
"""Samples of the previous frame the model sees before each frame."""


class SileroVad:
    """The model. Thread-safe: state lives in the caller's ``SileroState``."""

    def __init__(self, path: str | Path | None = None) -> None:
        path = Path(path) if path else packs.ready("silero-vad") / "silero_vad_v6.onnx"
        opts = ort.SessionOptions()
        opts.inter_op_num_threads = 1
        opts.intra_op_num_threads = 1
        opts.log_severity_level = 3
        self.session = ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])

    def new_state(self) -> SileroState:
        return SileroState()

    def __call__(self, frames: np.ndarray, state: SileroState) -> np.ndarray:
        """Speech probability of each 512-sample frame of ``frames`` (length a multiple of 512)."""
        frames = np.asarray(frames, dtype=np.float32).reshape(-1, FRAME)
        ctx = np.concatenate([state.context[None, :], frames[:-1, -CONTEXT:]], axis=0)
        x = np.concatenate([ctx, frames], axis=1)
        probs, state.h, state.c = self.session.run(None, {"input": x, "h": state.h, "c": state.c})
        state.context = frames[-1, -CONTEXT:].copy()
        return np.asarray(probs, dtype=np.float32).reshape(-1)


class SileroState:
    def __init__(self) -> None:
        self.h = np.zeros((1, 1, 128), dtype=np.float32)
        self.c = np.zeros((1, 1, 128), dtype=np.float32)
        self.context = np.zeros(CONTEXT, dtype=np.float32)
