"""Shared pieces of the chat-engine adapters: the Hugging Face tokenizer and its chat template."""

from __future__ import annotations

import json
from pathlib import Path


class ChatTokenizer:
    """Renders chat messages with the model's own template and decodes ids (tokenizers, no torch)."""

    def __init__(self, hf_dir: str | Path) -> None:
        from transformers import AutoTokenizer

        self.tok = AutoTokenizer.from_pretrained(str(hf_dir), local_files_only=True)
        eos: set[int] = set()
        gen = Path(hf_dir) / "generation_config.json"
        if gen.is_file():
            e = json.loads(gen.read_text()).get("eos_token_id")
            eos.update(e if isinstance(e, list) else [e] if e is not None else [])
        for t in ("<|im_end|>", "<|endoftext|>", "<|eot_id|>", "<end_of_turn>"):
            i = self.tok.convert_tokens_to_ids(t)
            if isinstance(i, int) and i != self.tok.unk_token_id and i is not None:
                eos.add(i)
        if self.tok.eos_token_id is not None:
            eos.add(self.tok.eos_token_id)
        self.eos = eos

    def encode_chat(self, messages: list[dict[str, str]]) -> list[int]:
        ids = self.tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        if isinstance(ids, dict) or hasattr(ids, "input_ids"):
            ids = ids["input_ids"]
        return list(ids)

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=True)
