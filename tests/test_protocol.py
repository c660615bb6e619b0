"""The sans-I/O protocol layer: parsing, validation, session configuration, audio decoding. No sockets."""

from __future__ import annotations

import base64
import json

import numpy as np
import pytest
from stemme.streaming.protocol import (
    MAX_TEXT_MESSAGE,
    ProtocolError,
    ResponseOverrides,
    SessionConfig,
    decode_audio,
    encode_event,
    error_event,
    item_text,
    message_size,
    parse_response,
    parse_text,
    validate_item,
)
from stemme.voice.audio import g711_to_float, pcm16_to_float

from stemme.logsafe import clip


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


# -- hostile input (issue 12): every malformed message is a ProtocolError, before any state changes ------------
@pytest.mark.parametrize("raw,code", [
    ("[" * 1000 + "]" * 1000, "invalid_json"),  # RecursionError in json.loads
    ('{"type": "session.update", "x": ' + "[" * 100_000, "invalid_json"),
    ('{"type": "session.update", "x": ' + "[" * 33 + "]" * 33 + "}", "invalid_json"),  # parses; too deep
    ('{"type": "session.update", "x": ' + '{"a":' * 40 + "1" + "}" * 41, "invalid_json"),
    ('{"type": "session.update", "x": [' + ",".join(["[]"] * 10_001) + "]}", "invalid_json"),
    ('{"type": "session.update", "x": Infinity}', "invalid_json"),
    ('{"type": "session.update", "x": -Infinity}', "invalid_json"),
    ('{"type": "session.update", "x": NaN}', "invalid_json"),
    ('{"type": "session.update", "x": 1e309}', "invalid_json"),
    ('{"type": "session.update", "x": 1' + "0" * 5000 + "}", "invalid_json"),
    ('{"type": "session.update", "event_id": "\\ud800"}', "invalid_string"),
    ('{"type": "session.update", "session": {"instructions": "a\\udfffb"}}', "invalid_string"),
    ('{"type": "session.update", "session": {"voice": "\\udc00\\ud800"}}', "invalid_string"),
    ('{"type": "session.update", "\\ud800": 1}', "invalid_string"),
    ('{"type": "session.update", "x": "\ud800"}', "invalid_string"),  # a raw one, from a Python caller
    ('{"type": "session.update", "event_id": "' + "e" * 257 + '"}', "invalid_type"),
    ('{"type": "conversation.item.create", "previous_item_id": 5}', "invalid_type"),
])
def test_parse_rejects_hostile_messages(raw, code):
    with pytest.raises(ProtocolError) as e:
        parse_text(raw)
    assert e.value.code == code


def test_parse_accepts_what_is_fine():
    assert parse_text('{"type": "session.update", "x": ' + "[" * 31 + "]" * 31 + "}")["type"] == "session.update"
    ev = parse_text('{"type": "session.update", "x": "\\ud83d\\ude00 \\\\ud800", "y": 1e308, "z": -0.0}')
    assert ev["x"] == "😀 \\ud800" and ev["y"] == 1e308
    # brackets inside strings are text, not containers
    assert parse_text(json.dumps({"type": "session.update", "t": "[{" * 20_000}))["t"].startswith("[{")
    # the event_id of an event refused for its content comes back, so that the client can match the error
    with pytest.raises(ProtocolError) as e:
        parse_text('{"type": "session.update", "event_id": "e7", "session": {"instructions": "\\ud800"}}')
    assert e.value.event_id == "e7"


def test_the_size_limit_counts_bytes():
    emoji = json.dumps({"type": "session.update", "x": "😀" * 1_000_000}, ensure_ascii=False)
    assert len(emoji) < MAX_TEXT_MESSAGE < len(emoji.encode())
    with pytest.raises(ProtocolError) as e:
        parse_text(emoji)
    assert e.value.code == "message_too_large" and str(len(emoji.encode())) in e.value.message
    assert message_size("é" * 10) == 20 and message_size(b"ab") == 2
    fits = '{"type": "session.update", "x": "' + "é" * ((MAX_TEXT_MESSAGE - 40) // 2) + '"}'
    assert message_size(fits) <= MAX_TEXT_MESSAGE and parse_text(fits)["type"] == "session.update"


def _td(**kw):
    return {"audio": {"input": {"turn_detection": {"type": "server_vad", **kw}}}}


@pytest.mark.parametrize("session,param", [
    ({"input_audio_format": ["pcm16"]}, "session.input_audio_format"),
    ({"input_audio_format": {"a": 1}}, "session.input_audio_format"),
    ({"input_audio_format": None}, "session.input_audio_format"),
    (_td(threshold=10 ** 400), "session.audio.input.turn_detection.threshold"),  # OverflowError before
    (_td(threshold=float("inf")), "session.audio.input.turn_detection.threshold"),
    (_td(threshold=float("nan")), "session.audio.input.turn_detection.threshold"),
    (_td(threshold=True), "session.audio.input.turn_detection.threshold"),
    (_td(silence_duration_ms=float("inf")), "session.audio.input.turn_detection.silence_duration_ms"),
    (_td(prefix_padding_ms=10 ** 400), "session.audio.input.turn_detection.prefix_padding_ms"),
    (_td(prefix_padding_ms=[]), "session.audio.input.turn_detection.prefix_padding_ms"),
    (_td(silence_duration_ms="500"), "session.audio.input.turn_detection.silence_duration_ms"),
    (_td(create_response="false"), "session.audio.input.turn_detection.create_response"),
    ({"audio": {"input": {"turn_detection": {"type": "semantic_vad", "eagerness": ["low"]}}}},
     "session.audio.input.turn_detection.eagerness"),
    ({"audio": {"input": {"turn_detection": {"type": ["server_vad"]}}}}, "session.audio.input.turn_detection"),
    ({"audio": {"input": {"format": {"type": "audio/pcm", "rate": True}}}}, "session.audio.input.format.rate"),
    ({"audio": {"input": {"format": {"type": ["audio/pcm"]}}}}, "session.audio.input.format"),
    ({"audio": {"input": {"transcription": {"language": "x" * 50}}}}, "session.audio.input.transcription.language"),
    ({"audio": {"input": {"transcription": {"model": 5}}}}, "session.audio.input.transcription.model"),
    ({"audio": {"input": []}}, "session.audio.input"),
    ({"audio": {"output": {"voice": "v" * 10_000}}}, "session.audio.output.voice"),
    ({"audio": {"output": {"voice": "a\nb"}}}, "session.audio.output.voice"),
    ({"audio": {"output": {"speed": True}}}, "session.audio.output.speed"),
    ({"audio": {"output": {"speed": 1e308}}}, "session.audio.output.speed"),
    ({"audio": {"output": {"format": {"type": "audio/pcm", "rate": [24000]}}}}, "session.audio.output.format"),
    ({"output_modalities": [["audio"]]}, "session.output_modalities"),
    ({"max_output_tokens": True}, "session.max_output_tokens"),
    ({"max_output_tokens": 10 ** 400}, "session.max_output_tokens"),
    ({"stemme": []}, "session.stemme"),
    ({"stemme": {"event_names": 1}}, "session.stemme.event_names"),
    ({"model": {"a": 1}}, "session.model"),
])
def test_session_update_checks_every_field_type_and_range(session, param):
    cfg = SessionConfig()
    before = cfg.to_json()
    with pytest.raises(ProtocolError) as e:
        cfg.apply(session, "e1")
    assert e.value.param == param and e.value.code == "invalid_value" and e.value.event_id == "e1"
    assert cfg.to_json() == before


def test_session_update_numbers_at_their_bounds():
    cfg = SessionConfig()
    cfg.apply(_td(threshold=0.01, prefix_padding_ms=2000, silence_duration_ms=100.0, create_response=False,
                  interrupt_response=None))
    td = cfg.turn_detection
    assert td and td.prefix_padding_ms == 2000 and td.silence_duration_ms == 100 and not td.create_response
    assert td.interrupt_response  # null: the default
    cfg.apply({"audio": {"output": {"speed": 4}}, "max_output_tokens": "inf", "stemme": {"event_names": "beta"}})
    assert cfg.speed == 4.0 and cfg.max_output_tokens is None and cfg.beta_names


@pytest.mark.parametrize("response,param", [
    ({"output_modalities": 5}, "response.output_modalities"),  # wedged the session before (issue 12)
    ({"modalities": "text"}, "response.output_modalities"),
    ({"max_output_tokens": True}, "response.max_output_tokens"),
    ({"max_output_tokens": 0}, "response.max_output_tokens"),
    ({"instructions": 5}, "response.instructions"),
    ({"voice": {"a": 1}}, "response.audio.output.voice"),
    ({"audio": {"output": {"voice": "v" * 300}}}, "response.audio.output.voice"),
    ({"audio": []}, "response.audio"),
    ({"audio": {"output": {"format": {"type": "audio/pcmu"}}}}, "response.audio.output.format"),
    ({"metadata": [1]}, "response.metadata"),
    ({"conversation": 3}, "response.conversation"),
    ([1], "response"),
])
def test_response_overrides_are_checked(response, param):
    with pytest.raises(ProtocolError) as e:
        parse_response({"type": "response.create", "event_id": "e2", "response": response})
    assert e.value.param == param and e.value.event_id == "e2"


def test_response_overrides_are_typed():
    assert parse_response({"type": "response.create"}) == ResponseOverrides()
    ov = parse_response({"type": "response.create", "response": {
        "modalities": ["audio", "text"], "instructions": "Short.", "max_response_output_tokens": 7,
        "audio": {"output": {"voice": "kokoro:ff_siwis:fr"}}, "conversation": "auto", "metadata": None}})
    assert ov == ResponseOverrides(["audio"], "Short.", 7, "kokoro:ff_siwis:fr")
    assert ov.as_dict() == {"output_modalities": ["audio"], "instructions": "Short.", "max_output_tokens": 7,
                            "voice": "kokoro:ff_siwis:fr"}


def test_events_that_cannot_be_utf8_are_sent_escaped():
    text = encode_event({"type": "x", "a": "é\ud800"})
    assert text.encode("utf-8") and json.loads(text)["a"] == "é\ud800"
    assert encode_event({"type": "x", "a": "é"}) == '{"type": "x", "a": "é"}'
    with pytest.raises(TypeError):
        encode_event({"type": "x", "a": object()})


def test_client_text_in_logs_is_escaped_and_clipped():
    assert clip("kokoro:ff_siwis:fr") == "kokoro:ff_siwis:fr"
    assert clip("a\nb\r\x1b[31m\u202e\\\ud800é") == "a\\nb\\r\\x1b[31m\\u202e\\\\\\ud800é"
    long = clip("v" * 10_000, 80)
    assert long == "v" * 80 + "…[+9920 chars]"
    assert clip(None) == "None" and clip("\n" * 500, 10) == "\\n" * 10 + "…[+490 chars]"
    clip("\udc00" * 100).encode("utf-8")
