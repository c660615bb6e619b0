"""ONNX Runtime GenAI adapter (the fastest CPU backend measured here; int8 weights, pruned lm_head)."""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from stemme.models.llm_common import ChatTokenizer, forced_call_start
from stemme.voice.llm import GenerationOptions, IncrementalDecoder

from stemme.errors import ModelLoadError

logger = logging.getLogger(__name__)


class OrtGenaiChat:
    name = "ort-genai"

    def __init__(self, model_dir: str | Path, *, tokenizer_dir: str | Path | None = None, threads: int = 2,
                 device: str = "cpu") -> None:
        import onnxruntime_genai as og

        self.og = og
        model_dir = Path(model_dir)
        t = time.perf_counter()
        try:
            cfg = og.Config(str(model_dir))
            opts = {"intra_op_num_threads": threads, "inter_op_num_threads": 1}
            cfg.overlay(json.dumps({"model": {"decoder": {"session_options": opts}}}))
            if device == "cuda":
                cfg.clear_providers()
                cfg.append_provider("cuda")
            self.model = og.Model(cfg)
        except Exception as e:  # noqa: BLE001 - og raises plain RuntimeError/OSError on a bad model dir
            raise ModelLoadError(f"cannot load the ONNX Runtime GenAI model at {model_dir}: {e}") from None
        self.tokenizer = ChatTokenizer(tokenizer_dir or model_dir)
        self.device = device
        self.path = model_dir
        self.load_seconds = time.perf_counter() - t
        self._lock = threading.RLock()  # re-entered by interleaved streams of the LLM scheduler's thread
        logger.info("LLM ort-genai loaded from %s in %.2fs", model_dir, self.load_seconds)

    def stream(self, messages: list[dict[str, str]], options: GenerationOptions | None = None,
               cancel: threading.Event | None = None) -> Iterator[str]:
        o = options or GenerationOptions()
        ids = self.tokenizer.encode_chat(messages, options)
        forced = forced_call_start(options)  # the prompt ends with it: it comes with the first token
        og = self.og
        with self._lock:
            params = og.GeneratorParams(self.model)
            search: dict = {"max_length": len(ids) + o.max_new_tokens}
            if o.temperature > 0:
                search.update(do_sample=True, temperature=o.temperature, top_p=0.9)
            else:
                search.update(do_sample=False)
            params.set_search_options(**search)
            gen = og.Generator(self.model, params)
            gen.append_tokens(ids)
            dec = IncrementalDecoder(self.tokenizer.decode)
            try:
                while not gen.is_done():
                    if cancel is not None and cancel.is_set():
                        return
                    gen.generate_next_token()
                    tok = int(gen.get_next_tokens()[0])
                    if tok in self.tokenizer.eos:
                        if forced:
                            yield forced
                        return
                    piece = dec.push(tok)
                    if piece or forced:
                        yield forced + piece
                        forced = ""
            finally:
                del gen
