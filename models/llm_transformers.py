"""transformers / torch adapter: the reference backend, and the GPU backend (CUDA when present)."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from stemme.models.llm_common import ChatTokenizer
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
        logger.info("LLM transformers loaded from %s on %s in %.2fs", model_dir, device, self.load_seconds)

    def stream(self, messages: list[dict[str, str]], options: GenerationOptions | None = None,
               cancel: threading.Event | None = None) -> Iterator[str]:
        torch = self.torch
        o = options or GenerationOptions()
        ids = self.tokenizer.encode_chat(messages)
        dec = IncrementalDecoder(self.tokenizer.decode)
        with self._lock, torch.inference_mode():
            x = torch.tensor([ids], device=self.device)
            past = None
            for _ in range(o.max_new_tokens):
                if cancel is not None and cancel.is_set():
                    return
                out = self.model(input_ids=x, past_key_values=past, use_cache=True)
                past = out.past_key_values
                logits = out.logits[0, -1]
                if o.temperature > 0:
                    probs = torch.softmax(logits.float() / o.temperature, dim=-1)
                    tok = int(torch.multinomial(probs, 1))
                else:
                    tok = int(torch.argmax(logits))
                if tok in self.tokenizer.eos:
                    return
                piece = dec.push(tok)
                if piece:
                    yield piece
                x = torch.tensor([[tok]], device=self.device)
