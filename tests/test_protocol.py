"""The sans-I/O protocol layer: parsing, validation, session configuration, audio decoding. No sockets."""

from __future__ import annotations

import base64
import json

import numpy as np
import pytest
from stemme.streaming.protocol import (
    MAX_TEXT_MESSAGE,
    ProtocolError,
    SessionConfig,
    decode_audio,
    error_event,
    item_text,
    parse_text,
    validate_item,
)
from stemme.voice.audio import g711_to_float, pcm16_to_float


@pytest.mark.parametrize("raw,code", [
    ("{not json", "invalid_json"),
    ("[1, 2]", "invalid_event"),
    ('{"no_type": 1}', "invalid_event"),
    ('{"type": 5}', "invalid_event"),
    ('{"type": "nope.event"}', "unknown_event_type"),
    ('{"type": "session.update", "event_id": 3}', "invalid_type"),
])
def test_parse_rejects_malformed_messages(raw, code):
    with pytest.raises(ProtocolError) as e:
        parse_text(raw)
    assert e.value.code == code


def test_parse_rejects_oversized_messages():
    with pytest.raises(ProtocolError) as e:
        parse_text("x" * (MAX_TEXT_MESSAGE + 1))
    assert e.value.code == "message_too_large"


def test_audio_field_validation():
    ev = parse_text(json.dumps({"type": "input_audio_buffer.append", "audio": "!!notbase64"}))
    with pytest.raises(ProtocolError, match="base64"):
        decode_audio(ev)
    with pytest.raises(ProtocolError, match="must be str"):
        decode_audio({"type": "input_audio_buffer.append", "audio": 123})
    ok = {"type": "input_audio_buffer.append", "audio": base64.b64encode(b"\x00\x01").decode()}
    assert decode_audio(ok) == b"\x00\x01"


def test_error_event_shape():
    ev = error_event(ProtocolError("bad", code="x", param="p", event_id="e1"))
    assert ev["type"] == "error" and ev["error"] == {"type": "invalid_request_error", "code": "x",
                                                     "message": "bad", "param": "p", "event_id": "e1"}


def test_session_update_ga_and_beta_shapes():
    cfg = SessionConfig()
    cfg.apply({"type": "realtime", "instructions": "Be brief.", "audio": {
        "input": {"format": {"type": "audio/pcm", "rate": 16000}, "turn_detection": None,
                  "transcription": {"model": "whisper-base", "language": "fr-FR"}},
        "output": {"voice": "kokoro:jm_kumo:fr", "speed": 1.2}}})
    assert cfg.input_rate == 16000 and cfg.turn_detection is None and cfg.transcription_language == "fr"
    assert cfg.voice == "kokoro:jm_kumo:fr" and cfg.speed == 1.2 and cfg.instructions == "Be brief."
    cfg.apply({"input_audio_format": "g711_ulaw", "turn_detection": {"type": "server_vad", "threshold": 0.6,
                                                                     "silence_duration_ms": 300}})
    assert cfg.input_format == "audio/pcmu" and cfg.turn_detection and cfg.turn_detection.threshold == 0.6
    j = cfg.to_json()
    assert j["audio"]["input"]["turn_detection"]["silence_duration_ms"] == 300


@pytest.mark.parametrize("session", [
    {"audio": {"input": {"format": {"type": "audio/pcm", "rate": 44100}}}},
    {"audio": {"input": {"turn_detection": {"type": "server_vad", "threshold": "high"}}}},
    {"audio": {"input": {"turn_detection": {"type": "server_vad", "silence_duration_ms": 5}}}},
    {"audio": {"output": {"speed": "fast"}}},
    {"output_modalities": ["video"]},
    {"instructions": 42},
    {"max_output_tokens": -1},
    {"audio": "loud"},
])
def test_session_update_rejects_bad_values_and_keeps_the_old_config(session):
    cfg = SessionConfig()
    before = cfg.to_json()
    with pytest.raises(ProtocolError):
        cfg.apply(session)
    assert cfg.to_json() == before


def test_conversation_items():
    item = validate_item({"type": "conversation.item.create", "item": {
        "type": "message", "role": "user", "content": [{"type": "input_text", "text": "Hallo"}]}})
    assert item["id"].startswith("item_") and item_text(item) == "Hallo"
    with pytest.raises(ProtocolError):
        validate_item({"type": "conversation.item.create", "item": {"type": "function_call"}})
    with pytest.raises(ProtocolError):
        validate_item({"type": "conversation.item.create", "item": {"role": "user", "content": [{"type": "x"}]}})


def test_pcm_and_g711_decoding():
    with pytest.raises(Exception, match="even number"):
        pcm16_to_float(b"\x00\x01\x02")
    x = pcm16_to_float(np.array([0, 16384, -32768], "<i2").tobytes())
    assert np.allclose(x, [0, 0.5, -1.0])
    # G.711: 0xFF (u-law) and 0xD5 (A-law) are the codes for (near) silence
    assert abs(g711_to_float(b"\xff", "pcmu")[0]) < 1e-3
    assert abs(g711_to_float(b"\xd5", "pcma")[0]) < 1e-3
    loud = g711_to_float(bytes([0x00, 0x80]), "pcmu")
    assert loud[0] < -0.9 and loud[1] > 0.9
