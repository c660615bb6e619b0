"""Turn pipeline logic (clause chunking, CPU priority) and a Session driven without any socket."""

from __future__ import annotations

import asyncio
import json
import threading
import time

from stemme.streaming.session import Session
from stemme.voice.pipeline import ClauseChunker, Stages, TtsPriority, TurnMarks


def _chunk(text: str, **kw) -> list[str]:
    c = ClauseChunker(**kw)
    out = []
    for word in text.split(" "):
        out += c.push(word + " ")
    return out + c.flush()


def test_first_clause_is_cut_early_later_ones_at_sentence_ends():
    out = _chunk("Vous êtes présentement le seul participant dans cette conférence. Merci beaucoup, et à bientôt "
                 "mon ami, vraiment très bientôt!")
    assert out[0] == "Vous êtes présentement le"
    assert out[1] == "seul participant dans cette conférence."
    assert out[2] == "Merci beaucoup, et à bientôt mon ami, vraiment très bientôt!"


def test_chunker_keeps_decimals_and_cuts_at_commas_when_long():
    out = _chunk("It costs 3.5 euros. Yes, of course, and then, after a long while of waiting around, we left.",
                 first_max_words=20)
    assert out[0] == "It costs 3.5 euros."
    assert all(c.strip() for c in out)
    assert " ".join(out) == "It costs 3.5 euros. Yes, of course, and then, after a long while of waiting around, we left."


def test_tts_priority_pauses_generation_while_speaking():
    prio = TtsPriority()
    cancel = threading.Event()
    waited = []

    def llm() -> None:
        t = time.perf_counter()
        prio.wait(cancel)
        waited.append(time.perf_counter() - t)

    with prio.speaking():
        th = threading.Thread(target=llm)
        th.start()
        time.sleep(0.2)
    th.join(2)
    assert waited and waited[0] >= 0.18
    off = TtsPriority(enabled=False)
    with off.speaking():
        t = time.perf_counter()
        off.wait(cancel)
        assert time.perf_counter() - t < 0.05


def test_turn_marks_report():
    m = TurnMarks(speech_end=1.0, turn_detected=1.5, transcript=1.6, first_token=1.9, first_audio=2.4,
                  language="de")
    r = m.report()
    assert r == {"end_of_turn_ms": 500, "asr_ms": 100, "llm_first_token_ms": 300, "tts_first_audio_ms": 500,
                 "voice_to_voice_ms": 1400, "language": "de"}


async def test_session_without_a_socket(engines):
    sent: list = []
    stages = Stages()
    s = Session(engines, stages, sent.append)
    try:
        await s.start()
        await s.handle_text(json.dumps({"type": "session.update", "session": {"output_modalities": ["text"],
                                                                              "instructions": "Be brief."}}))
        await s.handle_text(json.dumps({"type": "conversation.item.create", "item": {
            "type": "message", "role": "user", "content": [{"type": "input_text", "text": "Bonjour !"}]}}))
        await s.handle_text(json.dumps({"type": "response.create"}))
        async with asyncio.timeout(60):
            while not any(e.get("type") == "response.done" for e in sent if isinstance(e, dict)):
                await asyncio.sleep(0.05)
        types = [e["type"] for e in sent]
        assert types[:2] == ["session.created", "session.updated"]
        assert "response.output_text.delta" in types and "response.output_audio.delta" not in types
        done = next(e for e in sent if e["type"] == "response.done")
        assert done["response"]["status"] == "completed"
        assert done["response"]["output"][0]["content"][0]["text"]
        await s.handle_text("{")
        assert sent[-1]["type"] == "error" and sent[-1]["error"]["code"] == "invalid_json"
    finally:
        await s.close()
        stages.shutdown()
    assert s.active_tasks == 0
