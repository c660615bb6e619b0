"""The language model stage: a chat engine interface, the conversation it serves, and the instructions that
keep answers short and in the user's language."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Protocol

from stemme.voice import languages

DEFAULT_INSTRUCTIONS = (
    "You are Stemme, a friendly voice assistant. Your answers are spoken aloud, so answer in one or two short, "
    "plain sentences, without lists, markdown, code or emojis."
)


@dataclass
class GenerationOptions:
    max_new_tokens: int = 80
    """Upper bound of tokens per answer (spoken answers are short)."""
    temperature: float = 0.0
    """0 decodes greedily (deterministic)."""
    conversation: str | None = None
    """The conversation (session) this answer belongs to: an engine may keep its cache for the conversation's
    next turn. Caches are never shared between conversations (one user's cache must not answer, or time,
    another's). None: nothing is kept."""


class ChatEngine(Protocol):
    name: str
    device: str

    def stream(
        self,
        messages: list[dict[str, str]],
        options: GenerationOptions | None = None,
        cancel: threading.Event | None = None,
    ) -> Iterator[str]:
        """Yield pieces of the answer as they are generated; stop early when ``cancel`` is set.
        Blocking: iterate it from a worker thread."""
        ...


def language_instruction(language: str | None) -> str:
    if not language:
        return "Always answer in the language the user speaks."
    name = languages.name(language)
    return f"The user speaks {name}. Answer only in {name}."


@dataclass
class Conversation:
    """History of one session; ``messages()`` renders it for a chat engine."""

    instructions: str = DEFAULT_INSTRUCTIONS
    max_turns: int = 8
    """Older turns are dropped to keep the prompt (and the first-token time) short: half of them at a time, so
    that the prompt's start stays the same for several turns (the engine reuses its cache, see PrefixCache)."""
    turns: list[dict[str, str]] = field(default_factory=list)

    def window(self) -> list[dict[str, str]]:
        limit = 2 * self.max_turns
        if len(self.turns) <= limit:
            return list(self.turns)
        step = max(2, limit // 2)
        start = -(-(len(self.turns) - limit) // step) * step
        return self.turns[start:]

    def messages(self, language: str | None) -> list[dict[str, str]]:
        """The instructions with the language to answer in, then the recent turns. While the language stays
        the same, the prompt starts with the previous turn's prompt and answer (the engine reuses its cache).
        Moving the language instruction after the turns would keep that start across language changes too,
        but the 0.5B model then echoed more questions (measured, 24 questions in 8 languages)."""
        system = f"{self.instructions} {language_instruction(language)}"
        return [{"role": "system", "content": system}, *self.window()]

    def add(self, role: str, content: str) -> None:
        if content.strip():
            self.turns.append({"role": role, "content": content.strip()})


class IncrementalDecoder:
    """Turns a growing list of token ids into text pieces, holding back incomplete UTF-8 sequences."""

    def __init__(self, decode) -> None:  # decode: Callable[[list[int]], str]
        self._decode = decode
        self._ids: list[int] = []
        self._emitted = 0

    def push(self, token_id: int) -> str:
        self._ids.append(token_id)
        text = self._decode(self._ids)
        if text.endswith("\ufffd"):
            return ""
        piece = text[self._emitted:]
        self._emitted = len(text)
        return piece
