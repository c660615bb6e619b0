"""The language model: answers in the user's language, streams, and stops when cancelled."""

from __future__ import annotations

import threading

import langid
import pytest
from stemme.voice.languages import SUPPORTED
from stemme.voice.llm import Conversation, GenerationOptions

QUESTIONS = {
    # open questions: their answers are long enough for a text language identifier to be reliable
    "en": "Why is the sky blue?",
    "fr": "Pourquoi le ciel est-il bleu ?",
    "de": "Warum ist der Himmel blau?",
    "es": "¿Por qué el cielo es azul?",
    "it": "Perché il cielo è blu?",
    "pt": "Por que o céu é azul?",
    "nl": "Waarom is de lucht blauw?",
    "pl": "Dlaczego niebo jest niebieskie?",
}


@pytest.fixture(scope="module")
def identifier():
    ident = langid.langid.LanguageIdentifier.from_modelstring(langid.langid.model, norm_probs=True)
    ident.set_languages(list(SUPPORTED))
    return ident


@pytest.mark.parametrize("lang", SUPPORTED)
def test_answers_in_the_users_language(engines, identifier, lang):
    conv = Conversation()
    conv.add("user", QUESTIONS[lang])
    answer = "".join(engines.llm.stream(conv.messages(lang), GenerationOptions(max_new_tokens=60)))
    assert answer.strip(), "empty answer"
    detected, _p = identifier.classify(answer)
    assert detected == lang, f"{lang}: answer {answer!r} looks like {detected}"


def test_streams_pieces_and_stops_on_cancel(engines):
    conv = Conversation()
    conv.add("user", "Tell me a long story about a dragon and a knight.")
    cancel = threading.Event()
    pieces = []
    for piece in engines.llm.stream(conv.messages("en"), GenerationOptions(max_new_tokens=200), cancel):
        pieces.append(piece)
        if len(pieces) == 3:
            cancel.set()
    assert len(pieces) == 3, "generation must stop at the next token once cancelled"
    cancel2 = threading.Event()
    cancel2.set()
    assert list(engines.llm.stream(conv.messages("en"), None, cancel2)) == []


def test_history_is_used(engines):
    conv = Conversation()
    conv.add("user", "My name is Zofia. Please remember it.")
    conv.add("assistant", "Nice to meet you, Zofia.")
    conv.add("user", "What is my name?")
    answer = "".join(engines.llm.stream(conv.messages("en"), GenerationOptions(max_new_tokens=30)))
    assert "zofia" in answer.lower()


def test_conversation_keeps_recent_turns_only():
    conv = Conversation(max_turns=2, fewshot=False)  # the window alone, without the example turns
    for i in range(5):
        conv.add("user", f"q{i}")
        conv.add("assistant", f"a{i}")
    msgs = conv.messages("de")
    assert msgs[0]["role"] == "system" and "German" in msgs[0]["content"]
    assert [m["content"] for m in msgs[1:]] == ["q3", "a3", "q4", "a4"]


def test_old_turns_are_dropped_in_steps_so_the_prompt_start_stays_the_same():
    conv = Conversation(max_turns=4, fewshot=False)  # the window alone, without the example turns
    starts = []
    for i in range(12):
        conv.add("user", f"q{i}")
        conv.add("assistant", f"a{i}")
        window = conv.messages("en")[1:]
        assert min(2 * (i + 1), 6) <= len(window) <= 8 and window[-1]["content"] == f"a{i}"
        starts.append(window[0]["content"])
    # the first kept turn moves two turns at a time, not at every turn
    assert starts == ["q0"] * 4 + ["q2", "q2", "q4", "q4", "q6", "q6", "q8", "q8"]


def test_example_turns_come_in_the_users_language_and_are_shared():
    conv = Conversation()
    conv.add("user", "Hallo!")
    msgs = conv.messages("de")
    assert [m["role"] for m in msgs[1:7]] == ["user", "assistant"] * 3 and msgs[-1]["content"] == "Hallo!"
    assert "Tokio" in msgs[6]["content"] and conv.shared_prefix("de") == 7
    assert Conversation(instructions="Be a pirate.").shared_prefix("de") == 0  # client instructions: not shared
    assert len(Conversation().messages("sv")) == 1  # no examples written for Swedish: none
