"""Tool calls as the Realtime API defines them, with the embedded model: the official openai SDK declares a
get_weather(city) tool, a question yields a function call with the city in its arguments, the client returns the
result as a function_call_output item and the next response speaks it. Also the pieces: the tool-call extractor,
the protocol's checks, and the echo guard on real model output."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from typing import Any

import pytest
from stemme.streaming.protocol import ProtocolError, SessionConfig, parse_response
from stemme.streaming.tools import ToolError, chat_message, function_item, parse_tool_choice, parse_tools
from stemme.voice.llm import (
    Conversation,
    EchoGuard,
    GenerationOptions,
    ToolCall,
    ToolCallExtractor,
)
from stemme.voice.pipeline import Stages, TextPiece, TurnMarks, respond

from tests.conftest import timeout
from tests.test_server import ServerThread

WEATHER = {"type": "function", "name": "get_weather", "description": "Get the current weather in a city",
           "parameters": {"type": "object", "properties": {"city": {"type": "string", "description": "The city"}},
                          "required": ["city"]}}
QUESTIONS = {"en": "What's the weather in Paris?", "fr": "Quel temps fait-il à Paris ?",
             "de": "Wie ist das Wetter in Paris?", "es": "¿Qué tiempo hace en París?",
             "it": "Che tempo fa a Parigi?", "pt": "Como está o tempo em Paris?",
             "nl": "Wat voor weer is het in Parijs?", "pl": "Jaka jest pogoda w Paryżu?"}
PARIS = ("paris", "parís", "parigi", "parijs", "paryż", "paryz")


# -- pieces --------------------------------------------------------------------------------------------------
def test_extractor_separates_calls_split_across_pieces() -> None:
    x = ToolCallExtractor()
    out: list[str | ToolCall] = []
    for p in ["Sure", "! <tool", "_call>\n{\"name\": \"get_weather\", \"arg", "uments\": {\"city\": \"Paris\"}}\n",
              "</tool_call>", " Done."]:
        out += x.push(p)
    out += x.flush()
    calls = [o for o in out if isinstance(o, ToolCall)]
    assert "".join(o for o in out if isinstance(o, str)) == "Sure!  Done."
    assert len(calls) == 1 and calls[0].name == "get_weather" and json.loads(calls[0].arguments) == {"city": "Paris"}


def test_extractor_keeps_malformed_calls_as_text_and_passes_plain_text() -> None:
    x = ToolCallExtractor()
    out = x.push("<tool_call>{not json}</tool_call>") + x.push("a < b") + x.flush()
    assert all(isinstance(o, str) for o in out) and "".join(map(str, out)) == "<tool_call>{not json}</tool_call>a < b"


def test_forced_call_start_and_name_constraint() -> None:
    """What a required or named tool_choice writes for the embedded model, and the names it allows (a fake
    tokenizer: one token per character)."""
    from types import SimpleNamespace

    from stemme.models.llm_common import NameConstraint, forced_call_start

    tools = [{"type": "function", "function": {"name": n}} for n in ("get_weather", "get_time")]
    named = GenerationOptions(tools=tools, tool_choice={"type": "function", "function": {"name": "get_time"}})
    assert forced_call_start(named) == '<tool_call>\n{"name": "get_time", "arguments": {'
    assert forced_call_start(GenerationOptions(tools=tools, tool_choice="required")) == '<tool_call>\n{"name": "'
    assert forced_call_start(GenerationOptions(tools=tools, tool_choice="auto")) == ""
    assert forced_call_start(GenerationOptions(tool_choice="required")) == ""  # no tools, nothing to call

    fake = SimpleNamespace(tok=SimpleNamespace(encode=lambda text, add_special_tokens=False: [ord(c) for c in text]))
    names = NameConstraint(fake, ["get_weather", "get_time"])  # type: ignore[arg-type]
    ids = [ord(c) for c in 'get_time"']
    assert names.allowed([]) == {ord("g")}
    assert names.allowed(ids[:4]) == {ord("w"), ord("t")}
    assert names.allowed(ids[:8]) == {ord('"')}
    assert names.allowed(ids) is None  # a whole name: the arguments are free


def test_the_forced_start_is_the_first_piece_once() -> None:
    """The batch decoders' rows give the forced start with their first token, also when that token ends the
    answer (fake tokenizer and decoder: token i is the letter i)."""
    from types import SimpleNamespace

    from stemme.models.llm_common import BatchDecoderBase, Row

    opts = GenerationOptions(tools=[{"type": "function", "function": {"name": "f"}}], tool_choice="required",
                             max_new_tokens=5)
    decoder = BatchDecoderBase(SimpleNamespace(eos={0}), 1, threading.RLock())  # type: ignore[arg-type]

    def letters(ids: list[int]) -> str:
        return "".join(chr(96 + i) for i in ids)

    row = Row([1, 2], opts, letters)
    assert decoder._emit(row, 6) == ('<tool_call>\n{"name": "f', False)
    assert decoder._emit(row, 7) == ("g", False)
    ended = Row([1], opts, letters)
    assert decoder._emit(ended, 0) == ('<tool_call>\n{"name": "', True)
    free = Row([1], GenerationOptions(max_new_tokens=5), letters)
    assert decoder._emit(free, 6) == ("f", False)


def test_protocol_checks_tools_and_choice() -> None:
    assert parse_tools([WEATHER])[0]["name"] == "get_weather"
    for bad in ([{"type": "function", "name": "bad name"}], [WEATHER, WEATHER], "x",
                [{"type": "function", "name": "f", "parameters": "x"}], [{"type": "web_search"}]):
        with pytest.raises(ToolError):
            parse_tools(bad)
    assert parse_tool_choice({"type": "function", "name": "get_weather"}, [WEATHER])["name"] == "get_weather"
    with pytest.raises(ToolError):
        parse_tool_choice({"type": "function", "name": "nope"}, [WEATHER])
    cfg = SessionConfig()
    cfg.apply({"tools": [WEATHER], "tool_choice": "required"})
    assert cfg.to_json()["tools"][0]["name"] == "get_weather" and cfg.to_json()["tool_choice"] == "required"
    with pytest.raises(ProtocolError):
        cfg.apply({"tools": [{"name": 5}]})
    assert cfg.tools and cfg.tool_choice == "required"  # a refused update changes nothing
    with pytest.raises(ProtocolError):
        parse_response({"type": "response.create", "response": {"tool_choice": 7}})
    assert parse_response({"type": "response.create", "response": {"tools": []}}).tools == []


def test_function_items_become_chat_messages() -> None:
    call = function_item({"type": "function_call", "call_id": "c1", "name": "get_weather",
                          "arguments": "{\"city\": \"Paris\"}"})
    out = function_item({"type": "function_call_output", "call_id": "c1", "output": "sunny"})
    assert chat_message(call)["tool_calls"][0]["function"]["name"] == "get_weather"
    assert chat_message(out) == {"role": "tool", "tool_call_id": "c1", "content": "sunny"}
    for bad in ({"type": "function_call_output", "call_id": "", "output": "x"},
                {"type": "function_call_output", "call_id": "c", "output": 5},
                {"type": "function_call", "call_id": "c", "name": "x y"}):
        with pytest.raises(ToolError):
            function_item(bad)


# -- the echo guard on real model output ---------------------------------------------------------------------
ECHOED = {"de": "Ich habe heute meinen Schlüssel verloren.", "fr": "Vous avez été expulsé de cette conférence."}
"""Statements the embedded 0.5B model repeated word for word with Stemme's first prompt (issue #9)."""


OLD_INSTRUCTIONS = ("You are Stemme, a friendly voice assistant. Your answers are spoken aloud, so answer in one or "
                    "two short, plain sentences, without lists, markdown, code or emojis.")
"""Stemme's first system prompt, under which the model echoed."""


def _old_prompt(lang: str, text: str) -> list[dict[str, Any]]:
    conv = Conversation(instructions=OLD_INSTRUCTIONS, fewshot=False)
    conv.add("user", text)
    return conv.messages(lang)


@pytest.mark.parametrize("lang", sorted(ECHOED))
def test_echo_guard_catches_and_replaces_a_real_echo(engines, lang: str) -> None:
    text = ECHOED[lang]
    raw = "".join(p for p in engines.llm.stream(_old_prompt(lang, text), GenerationOptions(max_new_tokens=30))
                  if isinstance(p, str))
    assert EchoGuard(text).check(raw, final=True), f"the model no longer echoes here: {raw!r}"

    async def guarded() -> tuple[str, TurnMarks]:
        stages = Stages()
        marks = TurnMarks(turn_detected=time.perf_counter())
        out = ""
        try:
            async for p in respond(engines, stages, _old_prompt(lang, text), voice=None, max_tokens=40,
                                   cancel=threading.Event(), marks=marks):
                assert isinstance(p, TextPiece)
                out += p.text
        finally:
            stages.shutdown()
        return out, marks

    reply, marks = asyncio.run(guarded())
    assert marks.extra.get("echo_guard") in ("regenerated", "acknowledged")  # a steered answer, or a last resort
    assert reply.strip() and not EchoGuard(text).check(reply, final=True), reply


def test_echo_guard_lets_answers_and_greetings_through() -> None:
    assert not EchoGuard("What is the capital of Spain?").check("The capital of Spain is Madrid.")
    assert not EchoGuard("Guten Morgen, wie geht es dir?").check("Guten Morgen! Mir geht es gut, danke.")
    assert not EchoGuard("Hello!").check("Hello!")  # too short to judge: greeting back is right
    assert EchoGuard("Guten Morgen, wie geht es dir?").check("Guten Morgen, wie geht es dir?")
    assert EchoGuard("Hoy he perdido el autobús otra vez.").check("El autobús ha perdido otra vez hoy.")
    assert EchoGuard("I lost my keys this morning.").check("I lost my", final=False) is None


# -- the round trip through the official SDK -----------------------------------------------------------------
@pytest.fixture(scope="module")
def server(engines):
    s = ServerThread(engines)
    yield s
    s.stop()


async def _until_done(conn, seen: list) -> object:
    async with asyncio.timeout(timeout(180)):
        async for event in conn:
            seen.append(event)
            if event.type == "response.done":
                return event.response
    raise AssertionError("no response.done")


async def _weather_call(conn, lang: str) -> tuple[object, list]:
    await conn.conversation.item.create(item={"type": "message", "role": "user",
                                              "content": [{"type": "input_text", "text": QUESTIONS[lang]}]})
    await conn.response.create()
    seen: list = []
    return await _until_done(conn, seen), seen


async def test_sdk_tool_call_round_trip(server) -> None:
    """English, audio out: the call, then the spoken answer with the result."""
    from openai import AsyncOpenAI

    client = AsyncOpenAI(api_key="unused", websocket_base_url=f"{server.url}/v1")
    async with client.realtime.connect(model="stemme") as conn:
        await conn.session.update(session={"type": "realtime", "tools": [WEATHER], "tool_choice": "auto",
                                           "audio": {"input": {"turn_detection": None}}})
        resp, seen = await _weather_call(conn, "en")
        done = [e for e in seen if e.type == "response.function_call_arguments.done"]
        assert resp.status == "completed" and len(done) == 1, [e.type for e in seen]
        assert done[0].name == "get_weather" and "paris" in json.loads(done[0].arguments)["city"].lower()
        assert any(e.type == "response.function_call_arguments.delta" for e in seen)
        assert [o.type for o in resp.output] == ["function_call"]
        assert resp.output[0].call_id == done[0].call_id

        result = json.dumps({"city": "Paris", "temperature_c": 18, "condition": "sunny"})
        await conn.conversation.item.create(item={"type": "function_call_output", "call_id": done[0].call_id,
                                                  "output": result})
        await conn.response.create()
        seen = []
        resp = await _until_done(conn, seen)
        spoken = next(e.transcript for e in seen if e.type == "response.output_audio_transcript.done")
        assert resp.status == "completed" and any(e.type == "response.output_audio.delta" for e in seen)
        assert "18" in spoken or "sunny" in spoken.lower(), spoken


async def test_sdk_tool_calls_in_eight_languages(server, record_property) -> None:
    """A call with the city in its arguments in at least 6 of the 8 languages (the rate is reported)."""
    from openai import AsyncOpenAI

    client = AsyncOpenAI(api_key="unused", websocket_base_url=f"{server.url}/v1")
    hits = {}
    for lang in QUESTIONS:
        async with client.realtime.connect(model="stemme") as conn:
            await conn.session.update(session={"type": "realtime", "output_modalities": ["text"], "tools": [WEATHER],
                                               "audio": {"input": {"turn_detection": None,
                                                                   "transcription": {"language": lang}}}})
            _, seen = await _weather_call(conn, lang)
            calls = [e for e in seen if e.type == "response.function_call_arguments.done"]
            hits[lang] = bool(calls) and any(p in calls[0].arguments.lower() for p in PARIS)
    record_property("tool_call_rate", f"{sum(hits.values())}/{len(hits)}")
    print("tool calls with the city:", hits)
    assert sum(hits.values()) >= 6, hits


TIMER = {"type": "function", "name": "set_timer", "description": "Start a timer",
         "parameters": {"type": "object", "properties": {"minutes": {"type": "number"}}, "required": ["minutes"]}}


def _answer(engines, text: str, choice: str | dict[str, Any]) -> list[str | ToolCall]:
    """The embedded model's answer through the pipeline (scheduler, extractor, guard), text out."""
    from stemme.streaming.tools import chat_tool_choice, chat_tools
    from stemme.voice.llm import TOOLS_INSTRUCTIONS

    conv = Conversation(instructions=TOOLS_INSTRUCTIONS, fewshot=False)
    conv.add("user", text)

    async def run() -> list[str | ToolCall]:
        stages = Stages()
        out: list[str | ToolCall] = []
        try:
            async for p in respond(engines, stages, conv.messages("en"), voice=None, max_tokens=60,
                                   cancel=threading.Event(), marks=TurnMarks(), tools=chat_tools([WEATHER, TIMER]),
                                   tool_choice=chat_tool_choice(choice)):
                out.append(p.text if isinstance(p, TextPiece) else p)  # type: ignore[arg-type]
        finally:
            stages.shutdown()
        return out

    return asyncio.run(run())


def _calls(out: list[str | ToolCall]) -> list[ToolCall]:
    return [p for p in out if isinstance(p, ToolCall)]


def test_a_named_tool_choice_makes_the_embedded_model_call_that_function(engines) -> None:
    """The answer starts with the call (the prompt ends with its opening): left free, the model calls
    get_weather for a weather question; told to call set_timer, it calls set_timer with object arguments."""
    free = _calls(_answer(engines, "What's the weather in Paris?", "auto"))
    assert [c.name for c in free] == ["get_weather"], free
    named = _answer(engines, "What's the weather in Paris?", {"type": "function", "name": "set_timer"})
    calls = _calls(named)
    assert len(calls) == 1 and calls[0].name == "set_timer", named
    assert isinstance(json.loads(calls[0].arguments), dict), calls[0].arguments
    assert not any(isinstance(p, str) and "tool_call" in p for p in named), named  # no tag spoken


def test_required_tool_choice_makes_the_embedded_model_call_a_declared_function(engines) -> None:
    """Asked for a joke, the model answers in words when free; with tool_choice required it must call, and the
    name can only be one of the declared functions (the decoder allows no other)."""
    free = _answer(engines, "Tell me a joke.", "auto")
    assert not _calls(free) and "".join(p for p in free if isinstance(p, str)).strip(), free
    required = _answer(engines, "Tell me a joke.", "required")
    calls = _calls(required)
    assert len(calls) == 1 and calls[0].name in ("get_weather", "set_timer"), required
    assert isinstance(json.loads(calls[0].arguments), dict), calls[0].arguments
    timer = _calls(_answer(engines, "Set a timer for ten minutes.", "required"))
    assert [c.name for c in timer] == ["set_timer"] and json.loads(timer[0].arguments).get("minutes") == 10, timer


class FakeInventingChat:
    """A fake chat engine (logic test): offered tools, it says ``preamble`` and calls ``call`` (``invented`` is a
    function nobody declared, as the 0.5B wrote when told to call one); told not to call, it answers in words."""

    name, device = "fake", "cpu"

    def __init__(self, call: str = "invented", preamble: str = "", always: bool = False) -> None:
        self.call, self.preamble, self.always = call, preamble, always
        self.choices: list[Any] = []

    def stream(self, messages: Any, options: GenerationOptions, cancel: Any = None) -> Any:
        self.choices.append(options.tool_choice)
        if self.always or (options.tools and options.tool_choice != "none"):
            yield self.preamble
            yield f'<tool_call>\n{{"name": "{self.call}", "arguments": {{}}}}\n</tool_call>'
        else:
            yield "Why did the tomato blush? It saw the salad dressing."


def _guarded(chat: FakeInventingChat, tools: list[dict[str, Any]] | None) -> tuple[list[Any], TurnMarks]:
    from types import SimpleNamespace

    from stemme.streaming.tools import chat_tools
    from stemme.voice.pipeline import guarded_pieces

    conv = Conversation(fewshot=False)
    conv.add("user", "Tell me a joke.")
    marks = TurnMarks()
    options = GenerationOptions(tools=chat_tools(tools) if tools else None, tool_choice="auto" if tools else None)

    async def run() -> list[Any]:
        stages = Stages()
        try:
            return [p async for p in guarded_pieces(SimpleNamespace(llm=chat), stages,  # type: ignore[arg-type]
                                                    conv.messages("en"), options, threading.Event(), marks, "en")]
        finally:
            stages.shutdown()

    return asyncio.run(run()), marks


def test_a_call_of_an_undeclared_function_is_answered_in_words_instead() -> None:
    chat = FakeInventingChat("invented")
    out, marks = _guarded(chat, [WEATHER])
    assert "".join(out).startswith("Why did the tomato") and chat.choices == ["auto", "none"], out
    assert marks.extra.get("undeclared_call") == "regenerated" and "echo_guard" not in marks.extra


def test_a_declared_call_passes() -> None:
    chat = FakeInventingChat("get_weather")
    out, marks = _guarded(chat, [WEATHER])
    assert [type(p) for p in out] == [ToolCall] and out[0].name == "get_weather" and chat.choices == ["auto"]
    assert "undeclared_call" not in marks.extra


def test_an_undeclared_call_after_spoken_words_is_dropped_without_a_second_answer() -> None:
    chat = FakeInventingChat("invented", preamble="Sure, let me check that for you right now. ")
    out, marks = _guarded(chat, [WEATHER])
    assert "".join(p for p in out if isinstance(p, str)).startswith("Sure, let me check")
    assert not any(isinstance(p, ToolCall) for p in out) and chat.choices == ["auto"], out
    assert marks.extra.get("undeclared_call") == "dropped"


def test_a_call_without_any_tools_offered_is_dropped_without_a_retry() -> None:
    chat = FakeInventingChat("get_weather", always=True)
    out, marks = _guarded(chat, None)
    assert not any(isinstance(p, ToolCall) for p in out) and chat.choices == [None], out
    assert marks.extra.get("undeclared_call") == "dropped"


async def test_sdk_response_with_a_named_tool_choice(server) -> None:
    """Through the official SDK: a response.create naming a function yields a call of that function."""
    from openai import AsyncOpenAI

    client = AsyncOpenAI(api_key="unused", websocket_base_url=f"{server.url}/v1")
    async with client.realtime.connect(model="stemme") as conn:
        await conn.session.update(session={"type": "realtime", "output_modalities": ["text"],
                                           "tools": [WEATHER, TIMER], "audio": {"input": {"turn_detection": None}}})
        await conn.conversation.item.create(item={"type": "message", "role": "user", "content": [
            {"type": "input_text", "text": QUESTIONS["en"]}]})
        await conn.response.create(response={"tool_choice": {"type": "function", "name": "set_timer"}})
        seen: list = []
        resp = await _until_done(conn, seen)
        done = [e for e in seen if e.type == "response.function_call_arguments.done"]
        assert resp.status == "completed" and [d.name for d in done] == ["set_timer"], [e.type for e in seen]
        assert isinstance(json.loads(done[0].arguments), dict)


def test_echo_guard_waits_for_whole_words() -> None:
    guard = EchoGuard("Ich habe heute meinen Schlüssel verloren.")
    assert guard.check("Ich habe heute meine Schlüssel ver") is None  # "ver…" is not a word yet
    assert guard.check("Ich habe heute meine Schlüssel verloren.")
