"""Malformed input never ends a session: the seeded corpus of tests/fuzzing.py through the codec (fast), a
response task that crashes (with a fake response, named so), and 10,000 frames against a real server with
the real models, then a normal voice turn."""

from __future__ import annotations

import asyncio
import json
import logging
import re
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from stemme.clients.talk import RealtimeClient
from stemme.streaming.protocol import (
    ProtocolError,
    encode_event,
    error_event,
)
from stemme.streaming.session import Session
from stemme.voice.audio import read_wav
from websockets.asyncio.client import ClientConnection, connect

from stemme.engines import Engines
from stemme.scoring import wer
from tests.conftest import SPEECH, timeout
from tests.fuzzing import Corpus, barrage, codec
from tests.test_server import ServerThread

FRAMES = 10_000
SEED = 12


def test_the_corpus_is_seeded() -> None:
    a = [f.data for f in Corpus(SEED).frames(300)]
    assert a == [f.data for f in Corpus(SEED).frames(300)]
    assert a != [f.data for f in Corpus(SEED + 1).frames(300)]


def test_every_corpus_frame_is_accepted_or_a_protocol_error() -> None:
    outcomes: dict[str, int] = {}
    for frame in Corpus(SEED).frames(FRAMES):
        if isinstance(frame.data, bytes):
            continue
        try:
            codec(frame.data)
            code = "ok"
        except ProtocolError as e:  # anything else (TypeError, OverflowError, RecursionError) fails the test
            code = e.code
            encode_event(error_event(e)).encode("utf-8")  # the error event itself can go on the wire
        outcomes[code] = outcomes.get(code, 0) + 1
    for code in ("ok", "invalid_json", "invalid_string", "invalid_value", "invalid_type", "message_too_large",
                 "invalid_base64", "unknown_event_type", "invalid_event"):
        assert outcomes.get(code, 0) > 0, outcomes


class _FakeEngines:
    """A fake: Session reads only ``config.languages`` from its engines until a turn runs."""

    class config:  # noqa: N801 - mirrors Engines.config
        languages = ("en",)


async def test_a_crashing_response_task_is_reported_and_clears_the_response_flags(
        caplog: pytest.LogCaptureFixture) -> None:
    sent: list[dict[str, Any]] = []
    session = Session(_FakeEngines(), None, sent.append, session_id="sess_fake")  # type: ignore[arg-type]
    calls: list[dict[str, Any]] = []

    async def fake_respond(marks: object, hint: str | None, overrides: dict[str, Any]) -> None:
        # a fake response: it fails before it registers itself
        calls.append(overrides)
        raise TypeError("boom")

    session._respond = fake_respond  # type: ignore[method-assign]
    create = json.dumps({"type": "response.create", "response": {"output_modalities": ["text"]}})
    with caplog.at_level(logging.ERROR, logger="stemme.streaming.session"):
        for _ in range(2):
            await session.handle_text(create)
            await asyncio.sleep(0)
            await asyncio.sleep(0)
            assert not session._response_starting and session.response is None
    assert len(calls) == 2 and calls[0] == {"output_modalities": ["text"]}
    codes = [e["error"]["code"] for e in sent if e["type"] == "error"]
    assert codes == ["internal_error", "internal_error"], sent  # never conversation_already_has_active_response
    assert any("sess_fake" in r.getMessage() and r.exc_info for r in caplog.records)


# -- a real server ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def server(engines: Engines) -> Iterator[ServerThread]:
    s = ServerThread(engines)
    yield s
    s.stop()


async def _until(ws: ClientConnection, match: Callable[[dict[str, Any]], bool],
                 seconds: float = 60) -> dict[str, Any]:
    async with asyncio.timeout(timeout(seconds)):
        while True:
            m = await ws.recv()
            if isinstance(m, str) and match(ev := json.loads(m)):
                return ev  # type: ignore[no-any-return]


async def test_bad_response_overrides_are_refused_and_do_not_wedge_the_session(server: ServerThread) -> None:
    async with connect(server.url + "/v1/realtime") as ws:
        await _until(ws, lambda e: e["type"] == "session.created")
        bad_overrides: list[dict[str, Any]] = [
            {"output_modalities": 5}, {"max_output_tokens": True}, {"instructions": ["x"]},
            {"output_modalities": ["text"], "voice": {"a": 1}}, {"audio": {"output": []}}]
        for bad in bad_overrides:
            await ws.send(json.dumps({"type": "response.create", "response": bad}))
            ev = await _until(ws, lambda e: e["type"] == "error")
            assert ev["error"]["code"] == "invalid_value" and ev["error"]["param"].startswith("response"), ev
        await ws.send(json.dumps({"type": "response.create", "response": {"output_modalities": ["text"],
                                                                          "max_output_tokens": 3}}))
        done = await _until(ws, lambda e: e["type"] in ("response.done", "error"))
        assert done["type"] == "response.done" and done["response"]["status"] == "completed", done


async def test_malformed_input_gets_an_error_event_and_the_connection_goes_on(server: ServerThread) -> None:
    cases = [
        ("[" * 1000 + "]" * 1000, "invalid_json"),
        ('{"type":"session.update","session":{"audio":{"input":{"turn_detection":{"type":"server_vad",'
         '"silence_duration_ms":Infinity}}}}}', "invalid_json"),
        ('{"type":"session.update","session":{"turn_detection":{"type":"server_vad","prefix_padding_ms":1e309}}}',
         "invalid_json"),
        ('{"type":"session.update","session":{"turn_detection":{"type":"server_vad","threshold":1e400}}}',
         "invalid_json"),
        ('{"type":"session.update","session":{"input_audio_format":["pcm16"]}}', "invalid_value"),
        ('{"type":"session.update","session":{"input_audio_format":{"a":1}}}', "invalid_value"),
        ('{"type":"session.update","event_id":"\\ud800"}', "invalid_string"),
        ('{"type":"session.update","session":{"instructions":"hi \\udfff"}}', "invalid_string"),
        ('{"type":"conversation.item.create","item":{"type":"message","role":"user","content":[{"type":'
         '"input_text","text":"\\ud800"}]}}', "invalid_string"),
        (json.dumps({"type": "conversation.item.create", "x": "😀" * 1_000_000}, ensure_ascii=False),
         "message_too_large"),
        (json.dumps({"type": "session.update", "session": {"voice": "v" * 10_000}}), "invalid_value"),
    ]
    async with connect(server.url + "/v1/realtime", max_size=None) as ws:
        await _until(ws, lambda e: e["type"] == "session.created")
        for raw, code in cases:
            await ws.send(raw)
            ev = await _until(ws, lambda e: e["type"] == "error")
            assert ev["error"]["code"] == code, (raw[:80], ev)
        await ws.send(json.dumps({"type": "session.update", "session": {"instructions": "Be brief."}}))
        assert (await _until(ws, lambda e: e["type"] in ("session.updated", "error")))["type"] == "session.updated"


async def test_ten_thousand_fuzzed_frames_then_a_voice_turn(server: ServerThread, manifest: list[dict[str, str]],
                                                            caplog: pytest.LogCaptureFixture,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    caplog.set_level(logging.INFO, logger="stemme")
    async with asyncio.timeout(timeout(900)):  # about 2 minutes on 2 quiet cores; 4 when shared with others
        report = await barrage(server.url, frames=FRAMES, seed=SEED, connections=8,
                               check_seconds=timeout(300))
    figures = report.to_json()
    with capsys.disabled():
        print("\nfuzz report:", json.dumps(figures, indent=1))
    assert report.frames == FRAMES
    assert not report.closes, figures  # no 1011, no socket dropped without a close frame, no close at all
    assert report.wedged == 0, figures
    assert "internal_error" not in report.errors, figures  # no handler or task raised
    for code in ("invalid_json", "invalid_string", "invalid_value", "message_too_large", "binary_not_enabled",
                 "invalid_base64", "unknown_event_type"):
        assert report.errors[code] > 0, figures
    # client text reached no log line verbatim: every line is printable and short
    for r in caplog.records:
        if not r.name.startswith("stemme"):
            continue
        msg = r.getMessage()
        assert r.levelno < logging.ERROR, msg[:300]
        assert len(msg) < 2000 and msg.isprintable(), msg[:300]
    assert not re.search(r"v{300}", caplog.text)
    # then a normal voice turn, on a new connection
    path = "en/asterisk_conf-onlyperson.wav"
    ref = next(r["transcript"] for r in manifest if r["path"] == path)
    async with RealtimeClient(server.url) as c:
        await c.wait_for("session.created")
        await c.configure()
        r = await c.talk(read_wav(SPEECH / path).samples, realtime=False, timeout=timeout(120))
    assert r.status == "completed", r.events[-3:]
    assert wer(r.transcript, ref) <= 0.5, r.transcript
    assert r.reply.strip() and r.audio_seconds > 0.5
