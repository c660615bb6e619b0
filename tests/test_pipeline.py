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
    text = "It costs 3.5 euros. Yes, of course, and then, after a long while of waiting around, we left."
    out = _chunk(text, first_max_words=20)
    assert out[0] == "It costs 3.5 euros."
    assert all(c.strip() for c in out)
    assert " ".join(out) == text


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
        off.wait(cancel)  # enabled, this would wait for the end of the speaking block: for ever
        assert time.perf_counter() - t < 1.0


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


class FakeChat:
    """Fake chat engine for the scheduler's logic: yields its name and a counter, logging each step."""

    def __init__(self, log: list, interleaves: bool = True) -> None:
        self.log = log
        self.interleaves = interleaves

    def stream(self, messages, options, cancel):
        name = messages[0]["content"]
        for i in range(3):
            self.log.append(f"{name}{i}")
            yield f"{name}{i}"


def _collect(sched, engine, name, results, done):
    cancel = threading.Event()

    def put(x):
        if x is None:
            done.release()
        else:
            results.setdefault(name, []).append(x)

    sched.submit(engine, [{"role": "user", "content": name}], None, cancel, put)


def _two_streams(interleaves: bool) -> tuple[list, dict]:
    """Submit stream a, let it take one step, submit b, then let the scheduler run both to the end."""
    from stemme.voice.pipeline import LlmScheduler

    log: list = []
    prio = TtsPriority()
    sched = LlmScheduler(prio)
    done = threading.Semaphore(0)
    results: dict = {}
    try:
        with prio.speaking():  # hold the scheduler after its first step so that both streams are queued
            _collect(sched, FakeChat(log, interleaves), "a", results, done)
            time.sleep(0.1)
            _collect(sched, FakeChat(log, interleaves), "b", results, done)
        assert done.acquire(timeout=5) and done.acquire(timeout=5)
    finally:
        sched.shutdown()
    return log, results


def test_llm_scheduler_interleaves_streams_and_serves_new_prompts_first():
    log, results = _two_streams(interleaves=True)
    assert results == {"a": ["a0", "a1", "a2"], "b": ["b0", "b1", "b2"]}
    assert log.index("b0") < log.index("a2"), log  # b's first token did not wait for a's whole answer


def test_llm_scheduler_runs_non_interleaving_backends_one_after_the_other():
    log, results = _two_streams(interleaves=False)
    assert results == {"a": ["a0", "a1", "a2"], "b": ["b0", "b1", "b2"]}
    assert log == ["a0", "a1", "a2", "b0", "b1", "b2"]


async def test_a_second_response_create_is_refused_while_one_starts(engines):
    sent: list = []
    stages = Stages()
    s = Session(engines, stages, sent.append)
    try:
        await s.handle_text(json.dumps({"type": "session.update", "session": {"output_modalities": ["text"]}}))
        await s.handle_text(json.dumps({"type": "response.create"}))
        await s.handle_text(json.dumps({"type": "response.create"}))  # before the first one registered
        errors = [e for e in sent if e["type"] == "error"]
        assert [e["error"]["code"] for e in errors] == ["conversation_already_has_active_response"]
        async with asyncio.timeout(60):
            while not any(e["type"] == "response.done" for e in sent):
                await asyncio.sleep(0.05)
        await asyncio.sleep(0.2)
        assert sum(e["type"] == "response.created" for e in sent) == 1
    finally:
        await s.close()
        stages.shutdown()
