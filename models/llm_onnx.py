"""ONNX Runtime with Stemme's own decoding loop: the ORT GenAI model files (int8, GroupQueryAttention), run by
plain onnxruntime so that the streams of many sessions are decoded in one batched pass (continuous batching).

ONNX Runtime GenAI 0.18 has an Engine API for this, but on this model and CPU it fails every request
(ENGINE_EXECUTION_FAILURE; its paged mode needs a model exported with paged attention). The graph itself
batches: GroupQueryAttention reads each row's length from the attention mask (its sum), takes each row's
first ``length`` cached positions and writes the new one after them, and computes rotary positions from that
length. So the rows' caches are right-padded to a common width and the mask has ``length + 1`` ones per row.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from stemme.models.llm_common import BatchDecoderBase, ChatTokenizer, PrefixCache, Row, greedy_or_sample
from stemme.voice.llm import GenerationOptions

from stemme.errors import ModelLoadError

logger = logging.getLogger(__name__)

_DTYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16}


class OnnxChat:
    name = "onnxruntime"
    batches = True
    """The LLM scheduler decodes this engine's streams together (see ``OnnxBatchDecoder``)."""

    def __init__(self, model_dir: str | Path, *, threads: int = 2, device: str = "cpu",
                 prefix_cache_mb: int = 512) -> None:
        import onnxruntime as ort

        model_dir = Path(model_dir)
        t = time.perf_counter()
        try:
            cfg = json.loads((model_dir / "genai_config.json").read_text())["model"]
            dec = cfg["decoder"]
            self.layers = int(dec["num_hidden_layers"])
            self.kv_heads = int(dec["num_key_value_heads"])
            self.head_size = int(dec["head_size"])
            so = ort.SessionOptions()
            so.intra_op_num_threads = threads or (os.cpu_count() or 1)
            so.inter_op_num_threads = 1
            so.log_severity_level = 3
            providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if device == "cuda" else [
                "CPUExecutionProvider"]
            self.session = ort.InferenceSession(str(model_dir / dec.get("filename", "model.onnx")), so,
                                                providers=providers)
        except Exception as e:  # noqa: BLE001 - a bad config (OSError, KeyError...) or onnxruntime's own errors
            raise ModelLoadError(f"cannot load the ONNX model at {model_dir}: {e}") from None
        inputs = {i.name: i for i in self.session.get_inputs()}
        self.kv_dtype = _DTYPES.get(inputs["past_key_values.0.key"].type, np.float32)
        self.id_dtype = np.int32 if inputs["input_ids"].type == "tensor(int32)" else np.int64
        self._present = [o.name for o in self.session.get_outputs()][1:]
        self.tokenizer = ChatTokenizer(model_dir)
        self.device = device
        self.path = model_dir
        self.load_seconds = time.perf_counter() - t
        self._lock = threading.RLock()
        self._rng = np.random.default_rng()
        self.prefix_cache = PrefixCache(prefix_cache_mb * 2**20) if prefix_cache_mb > 0 else None
        logger.info("LLM onnxruntime loaded from %s in %.2fs", model_dir, self.load_seconds)

    def run(self, ids: np.ndarray, mask: np.ndarray, kv: list[tuple[np.ndarray, np.ndarray]]):  # noqa: ANN201
        """One forward pass: logits of the last position [B, V], and the present (keys, values) per layer."""
        feeds = {"input_ids": ids.astype(self.id_dtype), "attention_mask": mask}
        for i, (k, v) in enumerate(kv):
            feeds[f"past_key_values.{i}.key"] = k
            feeds[f"past_key_values.{i}.value"] = v
        outs = dict(zip(["logits", *self._present], self.session.run(None, feeds), strict=True))
        present = [(outs[f"present.{i}.key"], outs[f"present.{i}.value"]) for i in range(self.layers)]
        return outs["logits"][:, -1], present

    def empty_kv(self, batch: int = 1) -> list[tuple[np.ndarray, np.ndarray]]:
        z = np.zeros((batch, self.kv_heads, 0, self.head_size), self.kv_dtype)
        return [(z, z)] * self.layers

    def forget(self, conversation: str) -> None:
        """Drop a conversation's cache (its session closed)."""
        if self.prefix_cache is not None:
            self.prefix_cache.drop(conversation)

    def batch_decoder(self, max_batch: int = 8) -> OnnxBatchDecoder:
        return OnnxBatchDecoder(self, max_batch)

    def stream(self, messages: list[dict[str, str]], options: GenerationOptions | None = None,
               cancel: threading.Event | None = None) -> Iterator[str]:
        yield from self.batch_decoder(1).stream(messages, options or GenerationOptions(), cancel)


class OnnxBatchDecoder(BatchDecoderBase):
    """Continuous batching on ONNX Runtime (see ``BatchDecoderBase`` and this module's docstring)."""

    def __init__(self, chat: OnnxChat, max_batch: int = 8) -> None:
        super().__init__(chat.tokenizer, max_batch, chat._lock)
        self.chat = chat
        self._kv: list[tuple[np.ndarray, np.ndarray]] | None = None

    def _prefill(self, row: Row) -> int:
        n = len(row.prompt)
        m, kv = self._cached_start(row)
        logits, row.kv = self.chat.run(np.array([row.prompt[m:]]), np.ones((1, n), np.int64), kv)
        row.length = n
        cache = self.chat.prefix_cache
        if cache is not None and row.shared and m < row.shared:
            cache.store_shared(row.prompt[: row.shared], [(k[:, :, : row.shared].copy(), v[:, :, : row.shared].copy())
                                                          for k, v in row.kv])
        return greedy_or_sample(logits[0], row.options, self.chat._rng, row.allowed())

    def _cached_start(self, row: Row) -> tuple[int, list[tuple[np.ndarray, np.ndarray]]]:
        """How many prompt tokens are cached already, and their keys/values: the conversation's own cache
        (its previous turn), else the shared cache of Stemme's fixed prompt start."""
        cache, owner = self.chat.prefix_cache, row.options.conversation
        if cache is None:
            return 0, self.chat.empty_kv()
        m, kv = cache.take(owner, row.prompt) if owner else (0, None)
        if kv is None and row.shared:
            m, kv = row.shared, cache.take_shared(row.prompt[: row.shared])
        if kv is None:
            return 0, self.chat.empty_kv()
        return m, [(k[:, :, :m], v[:, :, :m]) for k, v in kv]

    def _retire(self, row: Row) -> None:
        cache, owner = self.chat.prefix_cache, row.options.conversation
        if cache is None or row.kv is None or not owner:
            return
        tokens = (row.prompt + row.generated_ids)[: row.length]
        kv = [(k[:, :, : row.length], v[:, :, : row.length]) for k, v in row.kv]
        cache.store(owner, tokens, kv, sum(k.nbytes + v.nbytes for k, v in kv))

    def _unbatch(self) -> None:
        if self._kv is not None:
            for i, row in enumerate(self._batch):
                if row.kv is None:
                    row.kv = [(k[i:i + 1, :, :row.length].copy(), v[i:i + 1, :, :row.length].copy())
                              for k, v in self._kv]
        self._batch: list[Row] = []
        self._kv = None

    def _rebatch(self, rows: list[Row]) -> None:
        if len(rows) == 1:
            self._kv, rows[0].kv = rows[0].kv, None
            self._batch = list(rows)
            return
        width = max(r.length for r in rows)
        c = self.chat
        kv = []
        for layer in range(c.layers):
            k = np.zeros((len(rows), c.kv_heads, width, c.head_size), c.kv_dtype)
            v = np.zeros_like(k)
            for i, r in enumerate(rows):
                rk, rv = r.kv[layer]
                k[i, :, :r.length] = rk[0, :, :r.length]
                v[i, :, :r.length] = rv[0, :, :r.length]
            kv.append((k, v))
        for r in rows:
            r.kv = None
        self._kv = kv
        self._batch = list(rows)

    def _decode(self, rows: list[Row]) -> list[int]:
        assert self._kv is not None
        width = self._kv[0][0].shape[2]
        mask = np.zeros((len(rows), width + 1), np.int64)
        for i, r in enumerate(rows):
            mask[i, : r.length + 1] = 1
        ids = np.array([[r.last] for r in rows])
        logits, self._kv = self.chat.run(ids, mask, self._kv)
        return [greedy_or_sample(logits[i], r.options, self.chat._rng, r.allowed()) for i, r in enumerate(rows)]
