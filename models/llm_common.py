"""Shared pieces of the chat-engine adapters: the Hugging Face tokenizer and its chat template."""

from __future__ import annotations

import collections
import json
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from stemme.voice.llm import GenerationOptions, IncrementalDecoder

from stemme.errors import PromptTooLongError


class ChatTokenizer:
    """Renders chat messages with the model's own template and decodes ids (tokenizers, no torch)."""

    max_prompt_tokens = 3072
    """Longest prompt accepted (set from EngineConfig.llm_max_prompt_tokens): far below the model's context, so
    that one session cannot hold the shared model (or the memory of its cache) for long."""

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
        self.kept = {i: t for t in ("<tool_call>", "</tool_call>")
                     if isinstance(i := self.tok.convert_tokens_to_ids(t), int) and i != self.tok.unk_token_id}
        """Special tokens decoded as text: the tags around a function call (see ToolCallExtractor)."""

    def encode_chat(self, messages: list[dict[str, Any]], options: GenerationOptions | None = None) -> list[int]:
        """The prompt's token ids by the model's own chat template, with the options' tools (the template
        describes them and how to call them; a call comes back as text, see ToolCallExtractor)."""
        tools = template_tools(options)
        ids = _token_ids(self.tok.apply_chat_template(_template_messages(messages, options),
                                                      tools=tools,  # type: ignore[arg-type]
                                                      add_generation_prompt=True, tokenize=True))
        if forced := forced_call_start(options):
            ids += self.tok.encode(forced, add_special_tokens=False)
        if len(ids) > self.max_prompt_tokens:
            raise PromptTooLongError(f"the prompt has {len(ids)} tokens; at most {self.max_prompt_tokens} are "
                                     "accepted (shorten the instructions or the conversation)")
        return list(ids)

    def encode_prefix(self, messages: list[dict[str, Any]], prompt: list[int]) -> int:
        """How many tokens of ``prompt`` render exactly ``messages`` (a leading part of its conversation); 0
        when the template does not render them as a prefix."""
        if not messages:
            return 0
        ids = _token_ids(self.tok.apply_chat_template(messages, add_generation_prompt=False, tokenize=True))
        return len(ids) if len(ids) < len(prompt) and prompt[: len(ids)] == ids else 0

    def decode(self, ids: list[int]) -> str:
        if not self.kept or not any(i in self.kept for i in ids):
            return self._text(ids)
        out: list[str] = []
        start = 0
        for n, i in enumerate(ids):
            if i in self.kept:
                out += [self._text(ids[start:n]), self.kept[i]]
                start = n + 1
        out.append(self._text(ids[start:]))
        return "".join(out)

    def _text(self, ids: list[int]) -> str:
        text = self.tok.decode(ids, skip_special_tokens=True)
        return text if isinstance(text, str) else "".join(text)


def _token_ids(encoded: Any) -> list[int]:
    """The token ids of what ``apply_chat_template(tokenize=True)`` returns: a list of ids, or (transformers
    5.x) a mapping with ``input_ids``."""
    if isinstance(encoded, dict) or hasattr(encoded, "input_ids"):
        encoded = encoded["input_ids"]
    return [int(i) for i in encoded]


def template_tools(options: GenerationOptions | None) -> list[dict[str, Any]] | None:
    """The tools to describe in the prompt: none when tool_choice is 'none'."""
    if options is None or not options.tools or options.tool_choice == "none":
        return None
    return options.tools


def forced_call_start(options: GenerationOptions | None) -> str:
    """The start of the answer that a required or named ``tool_choice`` writes for the model, in its chat
    template's call format (Qwen2.5, Hermes: ``<tool_call>{"name": …, "arguments": …}</tool_call>``): the prompt
    ends with it, so the model can only go on with a call; named, with that function's arguments. The engine
    yields it as the answer's first piece (see ToolCallExtractor). "" when the choice leaves the model free."""
    if options is None or not options.tools:
        return ""
    if name := options.named_function():
        return f'<tool_call>\n{{"name": {json.dumps(name)}, "arguments": {{'
    return '<tool_call>\n{"name": "' if options.tool_choice == "required" else ""


def called_names(options: GenerationOptions | None) -> list[str]:
    """The names a ``required`` tool_choice lets the model call (the answer's start stops at the name)."""
    return options.offered_functions() if options is not None and options.tool_choice == "required" else []


class NameConstraint:
    """Keeps a forced call's name to a declared function: while the model writes the name, only tokens that
    continue one of the names (as this tokenizer writes ``name"``) are allowed. Engines that pick each token
    themselves apply it (ONNX Runtime, transformers); elsewhere the model's own choice stands."""

    def __init__(self, tokenizer: ChatTokenizer, names: list[str]) -> None:
        self.spellings = [tokenizer.tok.encode(f'{n}"', add_special_tokens=False) for n in names]

    def allowed(self, generated: list[int]) -> set[int] | None:
        """The tokens allowed next; None once a name is complete (or none fits: the model is free)."""
        k = len(generated)
        if any(len(s) <= k and s == generated[: len(s)] for s in self.spellings):
            return None
        nxt = {s[k] for s in self.spellings if len(s) > k and s[:k] == generated}
        return nxt or None


def _template_messages(messages: list[dict[str, Any]], options: GenerationOptions | None) -> list[dict[str, Any]]:
    """Chat-completions messages as chat templates expect them: call arguments as objects, not JSON text; a
    required or named tool_choice is also said in the instructions (the answer's start forces it, see
    ``forced_call_start``)."""
    out = []
    for m in messages:
        if m.get("tool_calls"):
            calls = [{**c, "function": {**c["function"], "arguments": _json_object(c["function"].get("arguments"))}}
                     for c in m["tool_calls"]]
            m = {**m, "tool_calls": calls, "content": m.get("content") or ""}
        out.append(m)
    name = options.named_function() if options is not None else None
    required = options is not None and bool(options.tools) and options.tool_choice == "required"
    if (name or required) and out and out[0].get("role") == "system":
        must = f"Call the function {name}." if name else "Answer by calling one of the functions."
        out[0] = {**out[0], "content": f"{out[0]['content']} {must}"}
    return out


def _json_object(arguments: Any) -> Any:
    if isinstance(arguments, str):
        try:
            return json.loads(arguments)
        except ValueError:
            return arguments
    return arguments


class Row:
    """One stream of a batch decoder: its own key/value cache while it is out of a batch, and its decoding
    state."""

    def __init__(self, ids: list[int], options: GenerationOptions, decode) -> None:  # noqa: ANN001
        self.prompt = ids
        self.options = options
        self.decoder = IncrementalDecoder(decode)
        self.kv: list[Any] | None = None
        """Per layer (keys, values) of this row alone, held while the row is out of a batch."""
        self.length = 0
        """Tokens in this row's cache."""
        self.shared = 0
        """Leading prompt tokens whose cache all sessions may share (GenerationOptions.shared_prefix)."""
        self.generated_ids: list[int] = []
        self.last = 0
        self.generated = 0
        self.done = False
        self.forced = forced_call_start(options)
        """The answer's start that the prompt already holds (a forced function call): the first piece."""
        self.names: NameConstraint | None = None
        """Set by the decoder for a ``required`` call: the name must be a declared function's."""

    def allowed(self) -> set[int] | None:
        """The tokens this row may pick next (None: any)."""
        return self.names.allowed(self.generated_ids) if self.names is not None else None


class BatchDecoderBase:
    """Continuous batching: rows (streams of different sessions) join and leave at any token.

    A new row's prompt is prefilled on its own and its first token returned at once; from the next step it is
    decoded with every other row in one forward pass. The rows' caches are padded to a common length (with an
    attention mask, so padding changes nothing), joined when the membership changes and reused as one batched
    cache while it stays the same. Subclasses give the engine's forward passes and cache layout."""

    _batch: list[Row]
    """The rows decoded together now, in the order of the batched cache."""

    def __init__(self, tokenizer: ChatTokenizer, max_batch: int, lock: threading.RLock) -> None:
        self.tokenizer = tokenizer
        self.max_batch = max_batch
        self.lock = lock
        self.rows: list[Row] = []
        self._new: list[Row] = []
        self._batch: list[Row] = []

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def pending(self) -> int:
        """Rows whose prompt has not run yet."""
        return len(self._new)

    def add(self, messages: list[dict[str, str]], options: GenerationOptions) -> Row:
        row = Row(self.tokenizer.encode_chat(messages, options), options, self.tokenizer.decode)
        if options.shared_prefix and not options.tools:
            row.shared = self.tokenizer.encode_prefix(messages[: options.shared_prefix], row.prompt)
        if names := called_names(options):
            row.names = NameConstraint(self.tokenizer, names)
        self.rows.append(row)
        self._new.append(row)
        return row

    def remove(self, row: Row) -> None:
        if row in self._batch:
            self._unbatch()  # every row of the batch, this one included, gets its own cache back
        if row in self.rows:
            self.rows.remove(row)
        if row in self._new:
            self._new.remove(row)
        if row.kv is not None:
            self._retire(row)
        row.kv = None

    def _emit(self, row: Row, tok: int) -> tuple[str, bool]:
        row.generated += 1
        row.generated_ids.append(tok)
        row.last = tok
        forced = row.forced if row.generated == 1 else ""
        if tok in self.tokenizer.eos:
            row.done = True
            return forced, True
        piece = forced + row.decoder.push(tok)
        row.done = row.generated >= row.options.max_new_tokens
        return piece, row.done

    def step(self) -> list[tuple[Row, str, bool]]:
        """Prefill the oldest row that joined (it returns its first token), or else decode one token for every
        row (up to max_batch). Returns (row, text piece, finished) for each row served; finished rows leave."""
        events: list[tuple[Row, str, bool]] = []
        with self.lock:
            if self._new:
                row = self._new.pop(0)
                tok = self._prefill(row)
                events.append((row, *self._emit(row, tok)))
            else:
                rows = [r for r in self.rows if not r.done][: self.max_batch]
                if rows != self._batch:
                    self._unbatch()
                    self._rebatch(rows)
                for r, tok in zip(rows, self._decode(rows), strict=True):
                    r.length += 1
                    events.append((r, *self._emit(r, tok)))
        for r, _, done in events:
            if done:
                self.remove(r)
        return events

    def stream(self, messages: list[dict[str, str]], options: GenerationOptions,
               cancel: threading.Event | None = None) -> Iterator[str]:
        """A single stream through the batch decoder (for callers outside the LLM scheduler)."""
        row = self.add(messages, options)
        try:
            while row in self.rows:
                if cancel is not None and cancel.is_set():
                    return
                for r, piece, _ in self.step():
                    if r is row and piece:
                        yield piece
        finally:
            self.remove(row)

    # -- engine specific ----------------------------------------------------------------------------------
    def _prefill(self, row: Row) -> int:
        """Run the row's prompt alone, keep its cache in ``row.kv``, set ``row.length``; return its first
        token."""
        raise NotImplementedError

    def _decode(self, rows: list[Row]) -> list[int]:
        """One token for each row of the current batch (``self._batch == rows``)."""
        raise NotImplementedError

    def _rebatch(self, rows: list[Row]) -> None:
        """Join the rows' own caches into one batched cache."""
        raise NotImplementedError

    def _unbatch(self) -> None:
        """Split the batched cache back into the rows' own caches; empties ``self._batch``."""
        raise NotImplementedError

    def _retire(self, row: Row) -> None:
        """A row leaves with its cache (finished or cancelled); an engine may keep it for the next turn."""


class PrefixCache:
    """The key/value cache of each conversation's last answer, kept for its next turn: the next prompt starts
    with the previous prompt and answer, so only the new part is prefilled (a 15-turn conversation's prompt is
    about 600 tokens). One entry per conversation, never used by another one (a shared cache would let one
    user learn from response times what another asked). In memory only; least recently used first out, at
    most ``max_bytes``."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._entries: collections.OrderedDict[str, tuple[tuple[int, ...], list[Any], int]] = \
            collections.OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self._closed: collections.deque[str] = collections.deque(maxlen=4096)
        """Conversations dropped lately: an answer cancelled by the close may finish after it."""
        self.hits = 0
        self.reused_tokens = 0
        self._shared: collections.OrderedDict[tuple[int, ...], list[Any]] = collections.OrderedDict()
        """Key/value caches of fixed prompt starts that hold no user data (Stemme's system prompt and example
        turns per language): shared by every session; a few dozen at most."""
        self.shared_hits = 0

    @property
    def size_bytes(self) -> int:
        return self._bytes

    def store(self, owner: str, tokens: list[int], kv: list[Any], nbytes: int) -> None:
        with self._lock:
            old = self._entries.pop(owner, None)
            if old is not None:
                self._bytes -= old[2]
            if nbytes > self.max_bytes or not tokens or owner in self._closed:
                return
            self._entries[owner] = (tuple(tokens), kv, nbytes)
            self._bytes += nbytes
            while self._bytes > self.max_bytes:
                _, (_, _, n) = self._entries.popitem(last=False)
                self._bytes -= n

    def take(self, owner: str, ids: list[int], min_tokens: int = 16) -> tuple[int, list[Any] | None]:
        """How much of ``ids`` the conversation's cache holds (at most len(ids) - 1 tokens, so that one is left
        to run) and the cache: (0, None) when it holds fewer than ``min_tokens``. The entry stays until the
        conversation stores its next one."""
        with self._lock:
            entry = self._entries.get(owner)
            if entry is None:
                return 0, None
            tokens, kv, _ = entry
            n = min(len(tokens), len(ids) - 1)
            m = 0
            while m < n and tokens[m] == ids[m]:
                m += 1
            if m < min_tokens:
                return 0, None
            self._entries.move_to_end(owner)
            self.hits += 1
            self.reused_tokens += m
            return m, kv

    def take_shared(self, prefix: list[int]) -> list[Any] | None:
        """The cache of a fixed prompt start, if one was stored."""
        with self._lock:
            kv = self._shared.get(tuple(prefix))
            if kv is not None:
                self._shared.move_to_end(tuple(prefix))
                self.shared_hits += 1
            return kv

    def store_shared(self, prefix: list[int], kv: list[Any], max_entries: int = 32) -> None:
        with self._lock:
            self._shared[tuple(prefix)] = kv
            while len(self._shared) > max_entries:
                self._shared.popitem(last=False)

    def drop(self, owner: str) -> None:
        """Forget a conversation (its session closed)."""
        with self._lock:
            self._closed.append(owner)
            old = self._entries.pop(owner, None)
            if old is not None:
                self._bytes -= old[2]


def greedy_or_sample(logits, options: GenerationOptions, rng, allowed: set[int] | None = None) -> int:  # noqa: ANN001
    """Pick the next token from one row's logits (numpy): greedy at temperature 0, else softmax sampling; only
    among ``allowed`` when given (NameConstraint)."""
    import numpy as np

    if allowed:
        keep = np.fromiter(allowed, np.int64)
        masked = np.full_like(logits, -np.inf)
        masked[keep] = logits[keep]
        logits = masked
    if options.temperature <= 0:
        return int(np.argmax(logits))
    z = logits.astype(np.float64) / options.temperature
    p = np.exp(z - z.max())
    p /= p.sum()
    return int(rng.choice(len(p), p=p))
