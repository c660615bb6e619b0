"""Piper adapter (ONNX voices, e.g. the embedded en_US-joe-medium, or any .onnx + .onnx.json by path).

Batches: a Piper graph takes a batch of phoneme sequences with their lengths, but returns one padded audio
tensor, and the padding is not silent (peaks of 0.03 measured), so each item's length must be known. The graph
computes it (the sum of the rounded phoneme durations, in frames); ``with_lengths`` writes a copy of the voice
(once, beside the other derived models) that also outputs it.
"""

from __future__ import annotations

import hashlib
import logging
import threading
from pathlib import Path

import numpy as np
from stemme.models import packs
from stemme.voice.audio import Audio
from stemme.voice.tts import Voice

from stemme.errors import ModelLoadError

logger = logging.getLogger(__name__)

LENGTHS = "stemme_output_frames"


def with_lengths(src: Path) -> Path | None:
    """A copy of a Piper (VITS) graph that also outputs each item's length in frames, or None when the graph
    does not have the expected shape (the voice is then synthesized one clause at a time)."""
    import onnx
    from stemme.models import export

    key = hashlib.sha256(str(src.resolve()).encode()).hexdigest()[:12]
    out = export.derived_dir("piper-" + key, "batch") / "model.onnx"
    if out.is_file():
        return out
    try:
        m = onnx.load(str(src))
    except Exception as e:  # noqa: BLE001 - onnx raises its own error types
        logger.warning("cannot read %s for batching: %s", src, e)
        return None
    ceil = {n.output[0] for n in m.graph.node if n.op_type == "Ceil"}
    sums = [n for n in m.graph.node if n.op_type == "ReduceSum" and n.input[0] in ceil]
    if len(sums) != 1:
        logger.info("%s: no frame-length node found; its clauses are synthesized one at a time", src.name)
        return None
    ident = onnx.helper.make_node("Identity", [sums[0].output[0]], [LENGTHS], name="stemme_lengths")
    m.graph.node.append(ident)
    m.graph.output.append(onnx.helper.make_tensor_value_info(LENGTHS, onnx.TensorProto.FLOAT, None))
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    onnx.save(m, str(tmp))
    tmp.replace(out)
    return out


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

    def batch_key(self, voice: Voice, speed: float) -> tuple | None:
        """Clauses with the same key may share one batched call (same model, speaker and rate)."""
        return ("piper", str(self._path(voice)), voice.style, round(speed, 3))

    def _batch_session(self, voice: Voice):  # noqa: ANN202
        key = "batch:" + str(self._path(voice))
        pv = self._load(voice)
        with self._lock:
            if key not in self._voices:
                self._voices[key] = None
                path = with_lengths(self._path(voice))
                if path is not None:
                    import onnxruntime as ort

                    providers = pv.session.get_providers()
                    self._voices[key] = ort.InferenceSession(str(path), sess_options=_session_options(pv),
                                                             providers=providers)
            return self._voices[key]

    def synthesize_batch(self, texts: list[str], voice: Voice, speed: float = 1.0) -> list[Audio]:
        """Several clauses (of different sessions) with one voice, in one call of the graph."""
        pv = self._load(voice)
        session = self._batch_session(voice) if len(texts) > 1 else None
        if session is None:
            return [self.synthesize(t, voice, speed) for t in texts]
        sentences: list[tuple[int, list[int]]] = []
        for i, text in enumerate(texts):
            for phonemes in pv.phonemize(text):
                if phonemes:
                    sentences.append((i, pv.phonemes_to_ids(phonemes)))
        rate = pv.config.sample_rate
        parts: list[list[np.ndarray]] = [[] for _ in texts]
        if sentences:
            width = max(len(ids) for _, ids in sentences)
            x = np.zeros((len(sentences), width), np.int64)
            for j, (_, ids) in enumerate(sentences):
                x[j, : len(ids)] = ids
            feeds = {"input": x, "input_lengths": np.array([len(ids) for _, ids in sentences], np.int64),
                     "scales": np.array([pv.config.noise_scale, 1.0 / max(speed, 0.1), pv.config.noise_w_scale],
                                        np.float32)}
            if pv.config.num_speakers > 1:
                sid = int(voice.style) if voice.style else pv.config.default_speaker_id or 0
                feeds["sid"] = np.full(len(sentences), sid, np.int64)
            audio, frames = session.run(["output", LENGTHS], feeds)
            hop = pv.config.hop_length
            for j, (i, _) in enumerate(sentences):
                n = int(np.asarray(frames).reshape(-1)[j]) * hop
                parts[i].append(np.clip(audio[j].reshape(-1)[:n], -1, 1).astype(np.float32))
        return [Audio(np.concatenate(p) if p else np.zeros(0, np.float32), rate) for p in parts]

    def synthesize(self, text: str, voice: Voice, speed: float = 1.0) -> Audio:
        from piper import SynthesisConfig

        pv = self._load(voice)
        cfg = SynthesisConfig(length_scale=1.0 / max(speed, 0.1), normalize_audio=False,
                              speaker_id=int(voice.style) if voice.style else None)
        chunks = [c.audio_float_array for c in pv.synthesize(text, cfg)]
        rate = pv.config.sample_rate
        samples = np.concatenate(chunks) if chunks else np.zeros(0, np.float32)
        return Audio(samples.astype(np.float32), rate)


def _session_options(pv):  # noqa: ANN001, ANN202
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = pv.session.get_session_options().intra_op_num_threads
    so.log_severity_level = 3
    return so
