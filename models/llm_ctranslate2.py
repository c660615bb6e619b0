"""CTranslate2 adapter (int8 on CPU, float16 on CUDA): the library faster-whisper already uses."""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from stemme.models.llm_common import ChatTokenizer, forced_call_start
from stemme.voice.llm import GenerationOptions, IncrementalDecoder

from stemme.errors import ModelLoadError

logger = logging.getLogger(__name__)


class CTranslate2Chat:
    name = "ctranslate2"
    interleaves = False
    """A Generator replica serves one request at a time: streams must not be stepped in turn in one thread."""

    def __init__(self, model_dir: str | Path, *, tokenizer_dir: str | Path | None = None, device: str = "auto",
                 threads: int = 0) -> None:
        import ctranslate2

        if device == "auto":
            device = "cuda" if ctranslate2.get_cuda_device_count() > 0 else "cpu"
        t = time.perf_counter()
        try:
            self.generator = ctranslate2.Generator(
                str(model_dir), device=device, compute_type="int8_float16" if device == "cuda" else "int8",
                intra_threads=threads or min(4, os.cpu_count() or 1))
        except (RuntimeError, ValueError, OSError) as e:
            raise ModelLoadError(f"cannot load the CTranslate2 model at {model_dir}: {e}") from None
        self.tokenizer = ChatTokenizer(tokenizer_dir or model_dir)
        self.device = device
        self.path = Path(model_dir)
        self.load_seconds = time.perf_counter() - t
        self._lock = threading.Lock()
        logger.info("LLM ctranslate2 loaded from %s on %s in %.2fs", model_dir, device, self.load_seconds)

    def stream(self, messages: list[dict[str, str]], options: GenerationOptions | None = None,
               cancel: threading.Event | None = None) -> Iterator[str]:
        o = options or GenerationOptions()
        ids = self.tokenizer.encode_chat(messages, options)
        forced = forced_call_start(options)  # the prompt ends with it: it comes with the first token
        tokens = self.tokenizer.tok.convert_ids_to_tokens(ids)
        dec = IncrementalDecoder(self.tokenizer.decode)
        with self._lock:
            steps = self.generator.generate_tokens(
                tokens, max_length=o.max_new_tokens, end_token=[self.tokenizer.tok.convert_ids_to_tokens(i)
                                                                for i in sorted(self.tokenizer.eos)],
                sampling_topk=1 if o.temperature <= 0 else 40, sampling_temperature=max(o.temperature, 1e-3))
            try:
                for step in steps:
                    if cancel is not None and cancel.is_set():
                        return
                    if step.token_id in self.tokenizer.eos:
                        if forced:
                            yield forced
                        return
                    piece = dec.push(step.token_id)
                    if piece or forced:
                        yield forced + piece
                        forced = ""
            finally:
                steps.close()
