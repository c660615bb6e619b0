"""transformers / torch adapter: the reference backend, and the GPU backend (CUDA when present)."""

from __future__ import annotations

import inspect
import logging
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from stemme.models.llm_common import (
    BatchDecoderBase,
    ChatTokenizer,
    NameConstraint,
    Row,
    called_names,
    forced_call_start,
)
from stemme.voice.llm import GenerationOptions, IncrementalDecoder

from stemme.errors import ModelLoadError

logger = logging.getLogger(__name__)


class TransformersChat:
    name = "transformers"

    def __init__(self, model_dir: str | Path, *, device: str = "auto", threads: int = 0) -> None:
        import torch
        from transformers import AutoModelForCausalLM

        self.torch = torch
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        if threads and device == "cpu":
            torch.set_num_threads(threads)
        dtype = torch.float16 if device == "cuda" else torch.float32
        t = time.perf_counter()
        self.model: Any = None
        try:
            self.model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=dtype, local_files_only=True)
        except (OSError, ValueError) as e:
            raise ModelLoadError(f"cannot load the transformers model at {model_dir}: {e}") from None
        self.model.to(device).eval()
        self.tokenizer = ChatTokenizer(model_dir)
        self.device = device
        self.path = Path(model_dir)
        self.load_seconds = time.perf_counter() - t
        self._lock = threading.RLock()  # re-entered by interleaved streams of the LLM scheduler's thread
        params = inspect.signature(self.model.forward).parameters
        self._cache_arg = "cache" if "cache" in params else "past_key_values"  # renamed in transformers 5.x
        self._keep_arg = "logits_to_keep" in params
        logger.info("LLM transformers loaded from %s on %s in %.2fs", model_dir, device, self.load_seconds)

    def forward(self, input_ids, cache=None, **kw):  # noqa: ANN001, ANN201
        """One forward pass with the key/value cache, computing the logits of the last position only."""
        if self._keep_arg:
            kw["logits_to_keep"] = 1
        out = self.model(input_ids=input_ids, use_cache=True, **{self._cache_arg: cache}, **kw)
        return out.logits[:, -1], getattr(out, "cache", None) or out.past_key_values

    def pick(self, logits, options: GenerationOptions, allowed: set[int] | None = None) -> int:  # noqa: ANN001
        """The next token from one row's logits: greedy at temperature 0, else softmax sampling; only among
        ``allowed`` when given (NameConstraint)."""
        torch = self.torch
        if allowed:
            keep = torch.tensor(sorted(allowed), device=logits.device)
            logits = torch.full_like(logits, float("-inf")).index_copy(0, keep, logits[keep])
        if options.temperature > 0:
            probs = torch.softmax(logits.float() / options.temperature, dim=-1)
            return int(torch.multinomial(probs, 1))
        return int(torch.argmax(logits))

    def stream(self, messages: list[dict[str, str]], options: GenerationOptions | None = None,
               cancel: threading.Event | None = None) -> Iterator[str]:
        torch = self.torch
        o = options or GenerationOptions()
        ids = self.tokenizer.encode_chat(messages, options)
        forced = forced_call_start(options)  # the prompt ends with it: it comes with the first token
        names = NameConstraint(self.tokenizer, called) if (called := called_names(options)) else None
        dec = IncrementalDecoder(self.tokenizer.decode)
        with self._lock, torch.inference_mode():
            x = torch.tensor([ids], device=self.device)
            past = None
            for _ in range(o.max_new_tokens):
                if cancel is not None and cancel.is_set():
                    return
                logits, past = self.forward(x, past)
                tok = self.pick(logits[0], o, names.allowed(dec.ids) if names else None)
                if tok in self.tokenizer.eos:
                    if forced:
                        yield forced
                    return
                piece = dec.push(tok)
                if piece or forced:
                    yield forced + piece
                    forced = ""
                x = torch.tensor([[tok]], device=self.device)

    # ---- batched streams: many sessions' answers decoded in one forward pass per token ----

    batches = True
    """The LLM scheduler may decode this engine's streams together (see ``BatchDecoder``)."""

    def batch_decoder(self, max_batch: int = 8) -> BatchDecoder:
        return BatchDecoder(self, max_batch)


class BatchDecoder(BatchDecoderBase):
    """Continuous batching on torch (see ``BatchDecoderBase``): caches are left-padded to a common length, with
    an attention mask and explicit positions. A step costs about one row's step on a GPU, where decoding is
    memory-bound."""

    def __init__(self, chat: TransformersChat, max_batch: int = 8) -> None:
        super().__init__(chat.tokenizer, max_batch, chat._lock)
        self.chat = chat
        self._cache: Any = None
        """The batch's key/value cache (a transformers ``DynamicCache``), None between batches."""
        self._mask: Any = None
        """The batch's attention mask (a torch tensor), None between batches."""

    def _pick(self, logits, rows: list[Row]) -> list[int]:  # noqa: ANN001
        return [self.chat.pick(logits[i], row.options, row.allowed()) for i, row in enumerate(rows)]

    def _prefill(self, row: Row) -> int:
        torch = self.chat.torch
        with torch.inference_mode():
            logits, cache = self.chat.forward(torch.tensor([row.prompt], device=self.chat.device))
        row.kv = [(k, v) for k, v, *_ in cache]
        row.length = len(row.prompt)
        return self._pick(logits, [row])[0]

    def _unbatch(self) -> None:
        if self._cache is not None:
            width = self._mask.shape[1]
            for i, row in enumerate(self._batch):
                if row.kv is None:
                    pad = width - row.length
                    row.kv = [(k[i:i + 1, :, pad:, :], v[i:i + 1, :, pad:, :]) for k, v, *_ in self._cache]
        self._batch: list[Row] = []
        self._cache, self._mask = None, None

    def _rebatch(self, rows: list[Row]) -> None:
        torch = self.chat.torch
        from transformers import DynamicCache

        width = max(r.length for r in rows)
        layers = []
        for layer in range(len(rows[0].kv)):
            ks, vs = [], []
            for r in rows:
                k, v = r.kv[layer]
                pad = width - r.length
                if pad:
                    k = torch.nn.functional.pad(k, (0, 0, pad, 0))
                    v = torch.nn.functional.pad(v, (0, 0, pad, 0))
                ks.append(k)
                vs.append(v)
            layers.append((torch.cat(ks), torch.cat(vs)))
        mask = torch.zeros((len(rows), width), dtype=torch.long, device=self.chat.device)
        for i, r in enumerate(rows):
            mask[i, width - r.length:] = 1
            r.kv = None
        self._cache = DynamicCache(ddp_cache_data=layers)
        self._mask = mask
        self._batch = list(rows)

    def _decode(self, rows: list[Row]) -> list[int]:
        torch = self.chat.torch
        dev = self.chat.device
        with torch.inference_mode():
            mask = torch.cat([self._mask, torch.ones((len(rows), 1), dtype=torch.long, device=dev)], dim=1)
            ids = torch.tensor([[r.last] for r in rows], device=dev)
            pos = torch.tensor([[r.length] for r in rows], device=dev)
            logits, self._cache = self.chat.forward(ids, self._cache, attention_mask=mask, position_ids=pos)
        self._mask = mask
        return self._pick(logits, rows)
