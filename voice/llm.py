"""The language model stage: a chat engine interface, the conversation it serves, and the instructions that
keep answers short and in the user's language."""

from __future__ import annotations

import json
import secrets
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

from stemme.voice import languages

DEFAULT_INSTRUCTIONS = (
    "You are a friendly voice assistant. Your replies are spoken aloud: one or two short sentences, plain words, "
    "no lists, markdown or emojis. Never repeat the user's words back. Answer questions directly with the fact. "
    "When the user tells you something, react to it: show sympathy or joy, or give a short helpful tip. "
    "When greeted, greet back and offer help."
)
"""Measured with bench/dialogue.py against the first prompt (which named the assistant, and the model then put
the name into its answers): fewer echoes, same language accuracy (docs/benchmarks.md, dialogue)."""
TOOLS_INSTRUCTIONS = (
    "You are a friendly voice assistant. Your replies are spoken aloud: one or two short sentences, plain words, "
    "no lists, markdown or emojis. When one of your functions can answer, call it."
)
"""The default instructions when the client offers functions: the default's "answer questions directly" made
the 0.5B model invent a forecast instead of calling get_weather (3 of 8 languages called it, 7 of 8 with these)."""


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
    tools: list[dict[str, Any]] | None = None
    """Functions the model may call, in the chat-completions shape
    (``{"type": "function", "function": {"name", "description", "parameters"}}``); None: no tools."""
    tool_choice: str | dict[str, Any] | None = None
    """auto (default), none, required, or ``{"type": "function", "function": {"name": ...}}``."""
    shared_prefix: int = 0
    """How many leading messages hold no user data (Stemme's own system prompt and example turns): an engine
    may share their key/value cache between all sessions, so that a longer fixed prompt costs nothing per turn.
    0 when the client set its own instructions or tools (sharing those would let one session time another's)."""

    def offered_functions(self) -> list[str]:
        """The names of the functions the model may call (none when tool_choice is "none")."""
        if not self.tools or self.tool_choice == "none":
            return []
        functions = [t.get("function") for t in self.tools]
        return [f["name"] for f in functions if isinstance(f, dict) and isinstance(f.get("name"), str)]

    def named_function(self) -> str | None:
        """The function a named tool_choice (``{"type": "function", "function": {"name": …}}``) makes the model
        call, when tools are offered."""
        choice = self.tool_choice if self.tools else None
        name = choice.get("function", {}).get("name") if isinstance(choice, dict) else None
        return name if isinstance(name, str) and name else None


@dataclass
class ToolCall:
    """A function call the model asked for instead of (or after) speaking."""

    name: str
    arguments: str
    """The arguments as JSON text."""
    id: str = field(default_factory=lambda: "call_" + secrets.token_hex(8))


class ChatEngine(Protocol):
    name: str
    device: str

    def stream(
        self,
        messages: list[dict[str, Any]],
        options: GenerationOptions | None = None,
        cancel: threading.Event | None = None,
    ) -> Iterator[str | ToolCall]:
        """Yield pieces of the answer as they are generated, and a ToolCall for each complete function call;
        stop early when ``cancel`` is set. ``messages`` are chat-completions messages: an assistant message may
        carry ``tool_calls``, and a ``tool`` message (``tool_call_id``, ``content``) carries a call's result.
        Blocking: iterate it from a worker thread."""
        ...


FEWSHOT: dict[str, tuple[tuple[str, str], ...]] = {
    "en": (
        ('I burnt the cake I was baking.',
         'Oh no, what a pity! Next time, try a slightly lower oven temperature.'),
        ('Hello, how are you?',
         "I'm fine, thank you! What can I do for you?"),
        ('What is the capital of Japan?',
         'The capital of Japan is Tokyo.'),
    ),
    "fr": (
        ("J'ai brûlé le gâteau que je faisais.",
         'Oh non, quel dommage ! La prochaine fois, baisse un peu la température du four.'),
        ('Salut, comment vas-tu ?',
         'Je vais bien, merci ! Que puis-je faire pour toi ?'),
        ('Quelle est la capitale du Japon ?',
         'La capitale du Japon est Tokyo.'),
    ),
    "de": (
        ('Ich habe den Kuchen verbrennen lassen.',
         'Oh nein, wie schade! Versuch es nächstes Mal mit etwas weniger Hitze im Ofen.'),
        ("Hallo, wie geht's?",
         'Mir geht es gut, danke! Was kann ich für dich tun?'),
        ('Was ist die Hauptstadt von Japan?',
         'Die Hauptstadt von Japan ist Tokio.'),
    ),
    "es": (
        ('Se me ha quemado el pastel que estaba haciendo.',
         '¡Oh, qué pena! La próxima vez, prueba con el horno un poco más bajo.'),
        ('Hola, ¿cómo estás?',
         '¡Muy bien, gracias! ¿En qué puedo ayudarte?'),
        ('¿Cuál es la capital de Japón?',
         'La capital de Japón es Tokio.'),
    ),
    "it": (
        ('Ho bruciato la torta che stavo preparando.',
         "Oh no, che peccato! La prossima volta prova con il forno un po' più basso."),
        ('Ciao, come va?',
         'Bene, grazie! Cosa posso fare per te?'),
        ('Qual è la capitale del Giappone?',
         'La capitale del Giappone è Tokyo.'),
    ),
    "pt": (
        ('Queimei o bolo que estava a fazer.',
         'Oh não, que pena! Da próxima vez, experimenta o forno um pouco mais baixo.'),
        ('Olá, como estás?',
         'Estou bem, obrigado! Em que posso ajudar?'),
        ('Qual é a capital do Japão?',
         'A capital do Japão é Tóquio.'),
    ),
    "nl": (
        ('Ik heb de taart laten aanbranden.',
         'Ach, wat jammer! Probeer de oven de volgende keer iets lager te zetten.'),
        ('Hallo, hoe gaat het?',
         'Goed, dank je! Wat kan ik voor je doen?'),
        ('Wat is de hoofdstad van Japan?',
         'De hoofdstad van Japan is Tokio.'),
    ),
    "pl": (
        ('Spaliłem ciasto, które piekłem.',
         'Och, jaka szkoda! Następnym razem spróbuj trochę niższej temperatury piekarnika.'),
        ('Cześć, jak się masz?',
         'Dobrze, dziękuję! W czym mogę pomóc?'),
        ('Jaka jest stolica Japonii?',
         'Stolicą Japonii jest Tokio.'),
    ),
}
"""Example turns per language: a statement met with a reaction, a greeting returned, a fact stated. None of them
is in the dialogue benchmark (bench/data/dialogue.json)."""


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
    turns: list[dict[str, Any]] = field(default_factory=list)
    """Chat messages: user and assistant turns, and function calls with their results."""
    fewshot: bool = True
    """Start with example turns in the user's language (FEWSHOT): they show the model how to answer
    (react to a statement, greet back, state a fact) instead of repeating the user. They hold no user data.
    Off when tools are offered: examples answered in words teach the small model not to call a function
    (measured: "What's the weather in Paris?" got an invented forecast instead of a get_weather call)."""

    max_chars: int = 6000
    """Older turns are also dropped (two at a time) while the recent ones hold more characters than this,
    about 1,500-2,000 tokens: the prompt stays under the engine's cap however long the items are."""

    def window(self) -> list[dict[str, Any]]:
        limit = 2 * self.max_turns
        start = 0
        if len(self.turns) > limit:
            step = max(2, limit // 2)
            start = -(-(len(self.turns) - limit) // step) * step
        while start < len(self.turns) - 1 and sum(len(str(t.get("content") or "")) for t in
                                                  self.turns[start:]) > self.max_chars:
            start += 2
        return self.turns[start:]

    def messages(self, language: str | None) -> list[dict[str, Any]]:
        """The instructions with the language to answer in, then the recent turns. While the language stays
        the same, the prompt starts with the previous turn's prompt and answer (the engine reuses its cache).
        Moving the language instruction after the turns would keep that start across language changes too,
        but the 0.5B model then echoed more questions (measured, 24 questions in 8 languages)."""
        system = f"{self.instructions} {language_instruction(language)}"
        shots = [m for u, a in (FEWSHOT.get(language or "", ()) if self.fewshot else ())
                 for m in ({"role": "user", "content": u}, {"role": "assistant", "content": a})]
        return [{"role": "system", "content": system}, *shots, *self.window()]

    def shared_prefix(self, language: str | None) -> int:
        """How many leading messages of ``messages(language)`` hold no user data: Stemme's own instructions
        and example turns (0 when the instructions are the client's)."""
        if self.instructions != DEFAULT_INSTRUCTIONS:
            return 0
        return 1 + 2 * len(FEWSHOT.get(language or "", ()) if self.fewshot else ())

    def add(self, role: str, content: str) -> None:
        if content.strip():
            self.turns.append({"role": role, "content": content.strip()})


class IncrementalDecoder:
    """Turns a growing list of token ids into text pieces, holding back incomplete UTF-8 sequences."""

    def __init__(self, decode) -> None:  # decode: Callable[[list[int]], str]
        self._decode = decode
        self._ids: list[int] = []
        self._emitted = 0

    @property
    def ids(self) -> list[int]:
        """The token ids pushed so far."""
        return self._ids

    def push(self, token_id: int) -> str:
        self._ids.append(token_id)
        text = self._decode(self._ids)
        if text.endswith("\ufffd"):
            return ""
        piece = text[self._emitted:]
        self._emitted = len(text)
        return piece


_CALL_OPEN, _CALL_CLOSE = "<tool_call>", "</tool_call>"


class ToolCallExtractor:
    """Separates function calls written as text from the words to speak, for models whose chat template
    writes calls inline (Qwen2.5 and Hermes-style templates: ``<tool_call>{"name": …, "arguments": {…}}
    </tool_call>``). Text before a call is released as it comes; a call is held until it closes, then returned
    as a ToolCall (malformed JSON is returned as text, so nothing is silently lost). With ``bare_json`` (tools
    were offered) an answer that is a bare ``{"name": …, "arguments": …}`` object is a call too: small models
    often write it without the tags."""

    def __init__(self, *, bare_json: bool = False) -> None:
        self._buf = ""
        self._in_call = False
        self._bare = bare_json
        self._started = False
        self._calls: set[tuple[str, str]] = set()

    def push(self, piece: str | ToolCall) -> list[str | ToolCall]:
        if isinstance(piece, ToolCall):
            return [piece]
        if self._bare and not self._started:
            return self._push_start(piece)
        self._buf += piece
        out: list[str | ToolCall] = []
        while True:
            if self._in_call:
                end = self._buf.find(_CALL_CLOSE)
                if end < 0:
                    return out
                out.append(self._parse(self._buf[:end]))
                self._buf, self._in_call = self._buf[end + len(_CALL_CLOSE):], False
                continue
            start = self._buf.find(_CALL_OPEN)
            if start >= 0:
                if self._buf[:start]:
                    out.append(self._buf[:start])
                self._buf, self._in_call = self._buf[start + len(_CALL_OPEN):], True
                continue
            keep = _partial_tag(self._buf)
            if len(self._buf) > keep:
                out.append(self._buf[: len(self._buf) - keep])
                self._buf = self._buf[len(self._buf) - keep:]
            return out

    def _push_start(self, piece: str) -> list[str | ToolCall]:
        """The answer's first characters decide: bare JSON objects are held as calls until each closes (a
        small model may repeat one: a call made twice in an answer counts once)."""
        self._buf += piece
        head = self._buf.lstrip()
        if not head:
            return []
        if not head.startswith("{"):
            self._started, buf, self._buf = True, self._buf, ""
            return self.push(buf)
        self._in_call = True
        try:
            obj, end = json.JSONDecoder().raw_decode(head)
        except ValueError:
            return []  # not closed yet
        self._in_call, self._buf = False, head[end:]
        call = self._parse(head[:end], tags=False)
        if not isinstance(call, ToolCall):
            self._started, buf, self._buf = True, head, ""
            return [buf]
        seen = (call.name, call.arguments) in self._calls
        self._calls.add((call.name, call.arguments))
        return ([] if seen else [call]) + (self._push_start("") if self._buf.strip() else [])

    def flush(self) -> list[str | ToolCall]:
        """The end of the answer: an unclosed call is parsed if it is complete JSON."""
        buf, self._buf = self._buf, ""
        if self._in_call:
            self._in_call = False
            if self._bare and not self._started:
                return [self._parse(buf.strip(), tags=False)]
            return [self._parse(buf)]
        return [buf] if buf else []

    @staticmethod
    def _parse(body: str, tags: bool = True) -> str | ToolCall:
        try:
            call = json.loads(body.strip())
            name, args = call["name"], call.get("arguments", {})
        except (ValueError, KeyError, TypeError, AttributeError):
            name = None
        if not isinstance(name, str):
            return f"{_CALL_OPEN}{body}{_CALL_CLOSE}" if tags else body
        return ToolCall(name=name, arguments=args if isinstance(args, str) else json.dumps(args, ensure_ascii=False))


def _partial_tag(buf: str) -> int:
    """How many characters at the end of ``buf`` could be the start of ``<tool_call>``."""
    for n in range(min(len(_CALL_OPEN) - 1, len(buf)), 0, -1):
        if _CALL_OPEN.startswith(buf[-n:]):
            return n
    return 0


def _words(text: str) -> list[str]:
    import re
    import unicodedata

    text = unicodedata.normalize("NFKD", text.lower())
    text = "".join(c for c in text if not unicodedata.combining(c))
    return re.sub(r"[^\w\s]", " ", text).split()


class EchoGuard:
    """Notices an answer that starts by copying the user's words ("I lost my keys." → "I lost my keys."), a
    habit of small models, before any of it is spoken. The first words of the answer are held until there are
    enough of them to judge: ``check`` answers None (need more), False (release them) or True (an echo: steer
    and generate again). Greetings and other utterances under three words are never judged (greeting back is
    right), and a question's answer may reuse its words in another order ("the capital of Spain is…")."""

    def __init__(self, user_text: str, *, words: int = 6) -> None:
        self.user = _words(user_text)
        self.need = min(len(self.user), words)
        self.active = len(self.user) >= 3
        self.question = user_text.rstrip().endswith(("?", "？", ";")) or user_text.lstrip().startswith("¿")

    def check(self, answer: str, *, final: bool = False) -> bool | None:
        if not self.active:
            return False
        words = _words(answer)
        if not final and words and answer[-1:].isalnum():
            words.pop()  # the last word may still be growing ("Schl" of "Schlüssel")
        head = words[: self.need]
        if len(head) < self.need and not final:
            return None
        if not head:
            return False
        import difflib

        m = difflib.SequenceMatcher(None, self.user[: self.need], head, autojunk=False)
        if sum(b.size for b in m.get_matching_blocks()) >= 0.8 * self.need:
            return True  # the user's words, in order
        if self.question:
            return False
        user = set(self.user)
        return sum(w in user for w in head) >= max(3, 0.8 * len(head))  # a statement restated in other order


ACKNOWLEDGE = {
    "en": "I see. Tell me more about it, I'm listening.",
    "fr": "Je vois. Dites-m'en un peu plus, je vous écoute.",
    "de": "Verstehe. Erzähl mir mehr davon, ich höre zu.",
    "es": "Entiendo. Cuéntame un poco más, te escucho.",
    "it": "Capisco. Dimmi di più, ti ascolto volentieri.",
    "pt": "Entendo. Conta-me um pouco mais, estou a ouvir.",
    "nl": "Ik begrijp het. Vertel me er wat meer over, ik luister.",
    "pl": "Rozumiem. Opowiedz mi o tym coś więcej, słucham.",
}
"""What the assistant says when two answers in a row only repeated the user (the echo guard's last resort)."""

STEER = ("The user's last message must not be repeated or rephrased: reply to it in your own words (react, "
         "answer, or offer help).")
"""Added to the instructions when the echo guard asks for a new answer."""


def last_user_text(messages: list[dict[str, Any]]) -> str:
    for m in reversed(messages):
        if m.get("role") == "user" and isinstance(m.get("content"), str):
            return m["content"]
    return ""


def steered(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The same conversation with the anti-echo instruction added to its system message."""
    if messages and messages[0].get("role") == "system":
        return [{**messages[0], "content": f"{messages[0]['content']} {STEER}"}, *messages[1:]]
    return [{"role": "system", "content": STEER}, *messages]
