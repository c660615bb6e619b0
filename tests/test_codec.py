"""The Realtime codec: client messages into typed events (every field checked before any state changes), typed
server events onto the wire; and the Session's tables (one handler per client event, one mapping per core
event). No sockets; the Session runs over FAKE engines with a fake answer (named so), which is all its wire
mapping needs."""

from __future__ import annotations

import asyncio
import base64
import json
from collections.abc import AsyncIterator
from types import SimpleNamespace
from typing import Any, get_args

import pytest
from stemme.streaming import events as ev
from stemme.streaming.protocol import (
    BETA_NAMES,
    CLIENT_EVENTS,
    MAX_BINARY_MESSAGE,
    ProtocolError,
    decode_binary,
    decode_client_event,
    encode_event,
    encode_server_event,
)
from stemme.streaming.session import _MAPPERS, Session
from stemme.voice import core
from stemme.voice.pipeline import SpokenClause, TextPiece

from tests.conftest import timeout

AUDIO = base64.b64encode(b"\x00\x01" * 10).decode()
ITEM = {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "Hi"}]}
VALID: dict[str, tuple[dict[str, Any], type[ev.ClientEvent]]] = {
    "session.update": ({"session": {"instructions": "Be brief."}}, ev.SessionUpdate),
    "input_audio_buffer.append": ({"audio": AUDIO}, ev.AudioAppend),
    "input_audio_buffer.commit": ({}, ev.AudioCommit),
    "input_audio_buffer.clear": ({}, ev.AudioClear),
    "conversation.item.create": ({"item": ITEM, "previous_item_id": "root"}, ev.ItemCreate),
    "conversation.item.retrieve": ({"item_id": "item_1"}, ev.ItemRetrieve),
    "conversation.item.delete": ({"item_id": "item_1"}, ev.ItemDelete),
    "conversation.item.truncate": ({"item_id": "item_1", "content_index": 0, "audio_end_ms": 300}, ev.ItemTruncate),
    "response.create": ({"response": {"output_modalities": ["text"], "max_output_tokens": 9}}, ev.ResponseCreate),
    "response.cancel": ({}, ev.ResponseCancel),
    "output_audio_buffer.clear": ({}, ev.OutputAudioClear),
}


def _all_subclasses(cls: type) -> set[type]:
    out: set[type] = set()
    sub: type
    for sub in cls.__subclasses__():
        out |= {sub} | _all_subclasses(sub)
    return out


def test_every_client_event_decodes_to_its_type() -> None:
    assert set(VALID) == CLIENT_EVENTS
    for etype, (fields, kind) in VALID.items():
        event = decode_client_event(json.dumps({"type": etype, "event_id": "evt_7", **fields}))
        assert type(event) is kind and event.event_id == "evt_7", etype
    append = decode_client_event(json.dumps({"type": "input_audio_buffer.append", "audio": AUDIO}))
    assert isinstance(append, ev.AudioAppend) and append.audio == b"\x00\x01" * 10 and append.event_id is None
    create = decode_client_event(json.dumps({"type": "conversation.item.create", "item": ITEM}))
    assert isinstance(create, ev.ItemCreate) and create.item["id"].startswith("item_")
    assert create.item["content"] == [{"type": "input_text", "text": "Hi"}] and create.previous_item_id is None
    resp = decode_client_event(json.dumps(VALID["response.create"][0] | {"type": "response.create"}))
    assert isinstance(resp, ev.ResponseCreate)
    assert resp.overrides.as_dict() == {"output_modalities": ["text"], "max_output_tokens": 9}


@pytest.mark.parametrize("message,code,param", [
    ({"type": "response.create", "response": {"output_modalities": 5}}, "invalid_value", "response.output_modalities"),
    ({"type": "response.create", "response": {"max_output_tokens": True}}, "invalid_value",
     "response.max_output_tokens"),
    ({"type": "conversation.item.truncate", "item_id": "i", "content_index": 0}, "missing_required_parameter",
     "audio_end_ms"),
    ({"type": "conversation.item.truncate", "item_id": "i", "content_index": "0", "audio_end_ms": 1}, "invalid_type",
     "content_index"),
    ({"type": "conversation.item.retrieve", "item_id": 5}, "invalid_type", "item_id"),
    ({"type": "conversation.item.create", "item": {**ITEM, "role": "robot"}}, "invalid_value", "item.role"),
    ({"type": "conversation.item.create", "item": {"type": "function_call_output", "call_id": ""}}, "invalid_value",
     "item.call_id"),
    ({"type": "input_audio_buffer.append", "audio": "!!"}, "invalid_base64", "audio"),
    ({"type": "session.update", "session": []}, "invalid_type", "session"),
])
def test_invalid_fields_are_refused_by_the_codec_naming_the_field(message: dict[str, Any], code: str,
                                                                   param: str) -> None:
    with pytest.raises(ProtocolError) as e:
        decode_client_event(json.dumps({**message, "event_id": "evt_9"}))
    assert (e.value.code, e.value.param, e.value.event_id) == (code, param, "evt_9")


def test_binary_frames() -> None:
    with pytest.raises(ProtocolError) as e:
        decode_binary(b"\x00\x00", enabled=False)
    assert e.value.code == "binary_not_enabled"
    with pytest.raises(ProtocolError) as e:
        decode_binary(b"\x00" * (MAX_BINARY_MESSAGE + 1), enabled=True)
    assert e.value.code == "message_too_large"
    assert decode_binary(b"\x01\x02", enabled=True) == ev.AudioAppend(None, b"\x01\x02")


def test_server_events_encode_to_the_wire() -> None:
    kinds = _all_subclasses(ev.ServerEvent) - {ev.ContentEvent}
    types = [getattr(k, "TYPE") for k in kinds]  # noqa: B009 - a ClassVar of every ServerEvent
    assert len(types) == len(set(types)) and all(types)
    delta = encode_server_event(ev.OutputAudioDelta("resp_1", "item_1", 0, 0, b"\x01\x02\x03"))
    assert delta["type"] == "response.output_audio.delta" and base64.b64decode(delta["delta"]) == b"\x01\x02\x03"
    assert "audio" not in delta and delta["event_id"].startswith("event_")
    assert {k: delta[k] for k in ("response_id", "item_id", "output_index", "content_index")} == {
        "response_id": "resp_1", "item_id": "item_1", "output_index": 0, "content_index": 0}
    beta = encode_server_event(ev.OutputTextDelta("r", "i", 0, 0, "Hi"), beta_names=True)
    assert beta["type"] == "response.text.delta" == BETA_NAMES["response.output_text.delta"]
    assert encode_server_event(ev.OutputAudioBufferCleared(None)) | {"event_id": "e"} == {
        "type": "output_audio_buffer.cleared", "response_id": None, "event_id": "e"}
    assert json.loads(encode_event(encode_server_event(ev.Draining(30000))))["grace_ms"] == 30000


# -- the Session's tables and its mapping of the core's events ----------------------------------------------------
def test_one_handler_per_client_event_and_one_mapping_per_core_event() -> None:
    session = Session(_fake_engines(), None, [].append)  # type: ignore[arg-type]
    assert set(session._handlers) == _all_subclasses(ev.ClientEvent)
    assert set(_MAPPERS) | {core.Failure} == set(get_args(core.CoreEvent))


def _fake_engines() -> Any:
    voice = SimpleNamespace(name="fake", engine="fake")
    return SimpleNamespace(config=SimpleNamespace(languages=("en",), llm_max_tokens=40), loaded=set(),
                           llm=SimpleNamespace(remote=False), tts=SimpleNamespace(
                               registry=SimpleNamespace(resolve=lambda lang, name=None: voice)))


async def _fake_respond(engines: Any, stages: Any, messages: Any, *, voice: Any, cancel: Any,
                        **kw: Any) -> AsyncIterator[TextPiece | SpokenClause]:
    """A fake answer: two pieces of text, or two clauses of 0.3 s of silence when there is a voice."""
    for text in ("Hello", " there."):
        await asyncio.sleep(0)
        yield TextPiece(text) if voice is None else SpokenClause(text.strip(), b"\x00\x00" * 7200, 0.3)


async def _run_response(monkeypatch: pytest.MonkeyPatch, session_update: dict[str, Any], **kw: Any) -> list[Any]:
    monkeypatch.setattr(core, "respond", _fake_respond)
    sent: list[Any] = []
    s = Session(_fake_engines(), None, sent.append, **kw)  # type: ignore[arg-type]
    await s.handle_text(json.dumps({"type": "session.update", "session": session_update}))
    await s.handle_text(json.dumps({"type": "conversation.item.create", "item": ITEM}))
    await s.handle_text(json.dumps({"type": "response.create"}))
    async with asyncio.timeout(timeout(10)):
        while not any(isinstance(e, dict) and e["type"] == "response.done" for e in sent):
            await asyncio.sleep(0.01)
    await s.close()
    return sent


async def test_a_text_response_on_the_wire(monkeypatch: pytest.MonkeyPatch) -> None:
    sent = await _run_response(monkeypatch, {"output_modalities": ["text"]})
    assert [e["type"] for e in sent] == [
        "session.updated", "conversation.item.added", "conversation.item.done", "response.created",
        "response.output_item.added", "conversation.item.added", "response.content_part.added",
        "response.output_text.delta", "response.output_text.delta", "response.output_text.done",
        "response.content_part.done", "response.output_item.done", "conversation.item.done", "response.done"]
    done = sent[-1]
    assert done["response"]["status"] == "completed" and done["response"]["output_modalities"] == ["text"]
    assert done["response"]["output"][0]["content"] == [{"type": "output_text", "text": "Hello there."}]
    assert json.loads(done["response"]["metadata"]["stemme_latency"]) == done["stemme"]["latency"]
    assert sent[3]["response"]["status"] == "in_progress" and len({e["event_id"] for e in sent}) == len(sent)
    assert sent[5]["previous_item_id"] == sent[1]["item"]["id"] == sent[12]["previous_item_id"]


async def test_an_audio_response_on_the_wire_in_base64_binary_and_beta_names(monkeypatch: pytest.MonkeyPatch) -> None:
    sent = await _run_response(monkeypatch, {})
    types = [e["type"] for e in sent]
    assert types.count("response.output_audio.delta") == 4  # 2 clauses of 0.3 s: 9600 + 4800 bytes each
    assert types.count("response.output_audio_transcript.delta") == 2
    pcm = b"".join(base64.b64decode(e["delta"]) for e in sent if e["type"] == "response.output_audio.delta")
    assert pcm == b"\x00\x00" * 14400
    done = next(e for e in sent if e["type"] == "response.output_audio_transcript.done")
    assert done["transcript"] == "Hello there."
    binary = await _run_response(monkeypatch, {}, binary_audio=True)
    assert [len(e) for e in binary if isinstance(e, bytes)] == [9600, 4800, 9600, 4800]
    assert not any(isinstance(e, dict) and e["type"] == "response.output_audio.delta" for e in binary)
    beta = await _run_response(monkeypatch, {}, beta_names=True)
    beta_types = {e["type"] for e in beta}
    assert {"response.audio.delta", "response.audio_transcript.done", "conversation.item.created"} <= beta_types
    assert not beta_types & set(BETA_NAMES)


async def test_a_refused_response_create_changes_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    sent: list[Any] = []
    s = Session(_fake_engines(), None, sent.append)  # type: ignore[arg-type]
    await s.handle_text(json.dumps({"type": "response.create", "response": {"output_modalities": 5}}))
    assert sent[-1]["type"] == "error" and sent[-1]["error"]["code"] == "invalid_value"
    assert not s._response_starting and s.response is None and s.active_tasks == 0 and not s._created
    monkeypatch.setattr(core, "respond", _fake_respond)
    await s.handle_text(json.dumps({"type": "response.create", "response": {"output_modalities": ["text"]}}))
    async with asyncio.timeout(timeout(10)):
        while sent[-1]["type"] != "response.done":
            await asyncio.sleep(0.01)
    assert sent[-1]["response"]["status"] == "completed"
    await s.close()
