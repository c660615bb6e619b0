"""The voice core without a wire and without models: its turns, barge-in, history and response lifecycle, driven
with FAKE engines (a fake VAD model that calls loud frames speech, a fake transcriber, a fake answer) so that
only the core's own logic runs; and the hand-off from engine threads to a closed event loop, with the real
LLM scheduler and micro-batcher threads. The real models run the same core in tests/test_pipeline.py,
tests/test_server.py and tests/test_fuzz.py."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
from stemme.streaming.protocol import SessionConfig, TurnDetection
from stemme.voice import core
from stemme.voice.asr import Transcript
from stemme.voice.batching import MicroBatcher
from stemme.voice.llm import GenerationOptions
from stemme.voice.pipeline import LlmScheduler, TextPiece, TtsPriority, TurnMarks, loop_putter

from stemme.errors import PromptTooLongError, ProtocolError
from tests.conftest import timeout

RATE = 16000


class FakeSpeechModel:
    """A fake VAD model: a frame is speech when it is loud."""

    def new_state(self) -> object:
        return None

    def __call__(self, frames: np.ndarray, state: object) -> np.ndarray:
        return (np.abs(frames).mean(axis=1) > 0.1).astype(np.float32)


def fake_engines() -> Any:
    return SimpleNamespace(config=SimpleNamespace(languages=("en", "fr"), llm_max_tokens=40), vad=FakeSpeechModel(),
                           turn=None, llm=SimpleNamespace(remote=False), loaded=set())


class Harness:
    """A core over fake engines; ``events`` holds what it emitted, ``prompts`` what the fake answer was asked."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, *, answer: list[str] | None = None,
                 fail: BaseException | None = None, slow: bool = False) -> None:
        self.events: list[core.CoreEvent] = []
        self.prompts: list[list[dict[str, Any]]] = []
        self.settings = SessionConfig(output_modalities=["text"],
                                      turn_detection=TurnDetection(silence_duration_ms=300, prefix_padding_ms=0))
        self.executor = ThreadPoolExecutor(1)
        stages: Any = SimpleNamespace(vad=self.executor)
        self.core = core.VoiceCore(fake_engines(), stages, self.events.append, self.settings,
                                   conversation_id="sess_fake")
        self.answer, self.fail, self.slow = answer or ["Hi", " there."], fail, slow
        monkeypatch.setattr(core, "respond", self.fake_respond)
        monkeypatch.setattr(core, "transcribe", self.fake_transcribe)

    async def fake_transcribe(self, engines: Any, stages: Any, audio: np.ndarray, options: Any) -> Transcript:
        await asyncio.sleep(0)
        return Transcript("hello there", "fr", 0.9, len(audio) / RATE, 0.01)

    async def fake_respond(self, engines: Any, stages: Any, messages: list[dict[str, Any]], *, cancel: Any,
                           **kw: Any) -> AsyncIterator[TextPiece]:
        """A fake answer: its pieces (forever, when slow, until cancelled), or a failure."""
        self.prompts.append(messages)
        if self.fail is not None:
            raise self.fail
        while True:
            for piece in self.answer:
                await asyncio.sleep(0.01)
                if cancel.is_set():
                    return
                yield TextPiece(piece)
            if not self.slow:
                return

    def kinds(self) -> list[str]:
        return [type(e).__name__ for e in self.events]

    async def until(self, kind: type, count: int = 1) -> None:
        async with asyncio.timeout(timeout(10)):
            while sum(isinstance(e, kind) for e in self.events) < count:
                await asyncio.sleep(0.01)

    async def speak(self, seconds: float = 0.6, silence: float = 0.5) -> None:
        """Loud noise (speech to the fake model), then silence, in 100 ms chunks as a device sends them."""
        rng = np.random.default_rng(0)
        audio = np.concatenate([rng.uniform(-0.5, 0.5, int(seconds * RATE)), np.zeros(int(silence * RATE))])
        for i in range(0, len(audio), RATE // 10):
            await self.core.feed(audio[i:i + RATE // 10].astype(np.float32))

    async def close(self) -> None:
        await self.core.close()
        self.executor.shutdown()


@pytest.fixture
def harness(monkeypatch: pytest.MonkeyPatch) -> Iterator[Harness]:
    h = Harness(monkeypatch)
    yield h
    h.executor.shutdown()


async def test_a_voice_turn_runs_from_speech_to_the_answer_in_order(harness: Harness) -> None:
    await harness.speak()
    await harness.until(core.ResponseFinished)
    await harness.close()
    assert harness.kinds() == [
        "UserSpeechStarted", "UserSpeechStopped", "AudioCommitted", "ItemInserted", "TranscriptReady",
        "ResponseStarted", "MessageStarted", "TextWritten", "TextWritten", "MessageFinished", "ResponseFinished"]
    started, stopped = harness.events[0], harness.events[1]
    assert isinstance(started, core.UserSpeechStarted) and isinstance(stopped, core.UserSpeechStopped)
    assert started.item_id == stopped.item_id and 0 <= started.audio_start_ms < stopped.audio_end_ms <= 700
    user, reply = harness.core.items
    assert user["id"] == stopped.item_id and user["content"][0]["transcript"] == "hello there"
    assert reply["role"] == "assistant" and reply["content"] == [{"type": "output_text", "text": "Hi there."}]
    assert reply["status"] == "completed" and harness.core.language(None) == "fr"
    assert harness.prompts[0][-1] == {"role": "user", "content": "hello there"}
    done = harness.events[-1]
    assert isinstance(done, core.ResponseFinished) and done.status == "completed" and done.error is None
    assert done.report["language"] == "fr" and harness.core.turns == 1 and harness.core.response is None


async def test_speech_over_an_answer_cancels_it_and_starts_the_next_turn(monkeypatch: pytest.MonkeyPatch) -> None:
    h = Harness(monkeypatch, slow=True)
    await h.speak()
    await h.until(core.TextWritten)
    run = h.core.response
    assert run is not None
    await h.speak()  # barge-in
    await h.until(core.ResponseFinished)
    first = next(e for e in h.events if isinstance(e, core.ResponseFinished))
    assert first.run is run and first.status == "cancelled" and run.reason == "turn_detected"
    assert any(isinstance(e, core.PlaybackCleared) and e.response_id == run.id for e in h.events)
    await h.until(core.ResponseStarted, 2)  # the second utterance is answered
    await h.close()
    assert h.core.response is None and h.core.active_tasks == 0
    assert run.message is not None and run.message["status"] == "incomplete"


async def test_a_failed_response_is_reported_and_the_next_one_runs(monkeypatch: pytest.MonkeyPatch) -> None:
    h = Harness(monkeypatch, fail=PromptTooLongError("the prompt has 9000 tokens"))
    await h.core.respond(TurnMarks(), None, {})
    failure = next(e for e in h.events if isinstance(e, core.Failure))
    done = h.events[-1]
    assert failure.code == "prompt_too_long" and isinstance(done, core.ResponseFinished)
    assert done.status == "failed" and done.error is not None and done.error["code"] == "prompt_too_long"
    assert h.core.response is None
    h.fail = None
    await h.core.respond(TurnMarks(), None, {"max_output_tokens": 5})
    last = h.events[-1]
    assert isinstance(last, core.ResponseFinished) and last.status == "completed"
    await h.close()


async def test_a_crashing_task_is_logged_reported_and_clears_the_response_flags(
        harness: Harness, caplog: pytest.LogCaptureFixture) -> None:
    async def crash() -> None:
        raise TypeError("boom")

    harness.core.response_starting = True
    with caplog.at_level(logging.ERROR, logger="stemme.voice.core"):
        task = harness.core.spawn(crash(), response=True)
        await asyncio.gather(task, return_exceptions=True)
        await asyncio.sleep(0)
    assert not harness.core.response_starting and harness.core.active_tasks == 0
    assert [(e.code, "TypeError" in e.message) for e in harness.events if isinstance(e, core.Failure)] == [
        ("internal_error", True)]
    assert any("sess_fake" in r.getMessage() and r.exc_info for r in caplog.records)


async def test_requests_that_cannot_be_honoured_change_nothing(harness: Harness) -> None:
    c = harness.core
    c.insert_item({"id": "a", "type": "message", "role": "user", "content": []}, None)
    before = [dict(it) for it in c.items]
    n = len(harness.events)
    with pytest.raises(ProtocolError) as e:
        c.insert_item({"id": "b", "type": "message", "role": "user", "content": []}, "nope", "evt_1")
    assert e.value.code == "item_not_found" and e.value.event_id == "evt_1"
    with pytest.raises(ProtocolError) as e:
        c.truncate("a", 0, 10)
    assert e.value.code == "invalid_value"  # not an assistant item
    with pytest.raises(ProtocolError) as e:
        c.delete_item("zzz")
    assert e.value.code == "item_not_found"
    with pytest.raises(ProtocolError) as e:
        c.commit()
    assert e.value.code == "input_audio_buffer_commit_empty"
    assert [dict(it) for it in c.items] == before and len(harness.events) == n
    harness.settings.turn_detection = None  # manual turns: the buffer fills up to its limit
    await c.feed(np.zeros(int(core.MAX_BUFFER_SECONDS * RATE), np.float32))
    with pytest.raises(ProtocolError) as e:
        await c.feed(np.zeros(RATE, np.float32))
    assert e.value.code == "input_audio_buffer_full"
    c.commit()
    await harness.until(core.TranscriptReady)
    committed = [e for e in harness.events if isinstance(e, core.AudioCommitted)]
    assert len(committed) == 1 and committed[0].previous_item_id == "a"
    heard = next(e for e in harness.events if isinstance(e, core.TranscriptReady))
    assert heard.transcript.audio_seconds == core.MAX_BUFFER_SECONDS  # the refused second was not kept
    await harness.close()


async def test_truncation_keeps_the_words_that_were_heard(harness: Harness) -> None:
    c = harness.core
    item: dict[str, Any] = {"id": "r", "type": "message", "role": "assistant",
            "content": [{"type": "output_audio", "transcript": "One two three. Four five six."}]}
    c.insert_item(item, None)
    c.timelines["r"] = [(0, 1000, "One two three."), (1000, 2000, "Four five six.")]
    with pytest.raises(ProtocolError):
        c.truncate("r", 0, 2500)  # beyond the audio: nothing changes
    assert item["content"][0]["transcript"] == "One two three. Four five six."
    c.truncate("r", 0, 1700)
    assert item["content"][0]["transcript"] == "One two three. Four five"
    assert c.timelines["r"] == [(0, 1000, "One two three."), (1000, 2000, "Four five six.")]
    assert harness.events[-1] == core.ItemTruncated("r", 0, 1700)
    await harness.close()


# -- the hand-off from engine threads to the event loop ---------------------------------------------------------
class FakeChat:
    """A fake chat engine: three words, one per step."""

    def stream(self, messages: Any, options: Any, cancel: Any = None) -> Iterator[str]:
        for word in ("one", " two", " three"):
            time.sleep(0.01)
            yield word


def test_a_closed_event_loop_does_not_kill_the_shared_llm_thread() -> None:
    scheduler = LlmScheduler(TtsPriority(enabled=False))
    dead = asyncio.new_event_loop()
    dead_queue: asyncio.Queue[Any] = asyncio.Queue()
    dead.close()
    put = loop_putter(dead, dead_queue)
    put("nothing")  # a closed loop: dropped, no exception
    scheduler.submit(FakeChat(), [], GenerationOptions(), threading.Event(), put)

    async def a_live_session() -> list[Any]:
        q: asyncio.Queue[Any] = asyncio.Queue()
        put_live = loop_putter(asyncio.get_running_loop(), q)
        scheduler.submit(FakeChat(), [], GenerationOptions(), threading.Event(), put_live)
        out = []
        async with asyncio.timeout(timeout(10)):
            while (x := await q.get()) is not None:
                out.append(x)
        return out

    try:
        assert asyncio.run(a_live_session()) == ["one", " two", " three"]
        assert scheduler._thread.is_alive()
    finally:
        scheduler.shutdown()


def test_a_closed_event_loop_does_not_kill_a_stage_worker(caplog: pytest.LogCaptureFixture) -> None:
    release = threading.Event()

    def run_batch(items: list[int]) -> list[int]:
        release.wait(timeout(10))
        return [i * 2 for i in items]

    batcher: MicroBatcher[int, int] = MicroBatcher(run_batch, name="fake")
    loop = asyncio.new_event_loop()
    try:
        waiting = loop.create_task(batcher(1))  # a session waits for its result...
        loop.run_until_complete(asyncio.sleep(0.05))
    finally:
        loop.close()  # ...and its loop is gone before the result comes
    with caplog.at_level(logging.DEBUG):
        release.set()
        try:
            assert asyncio.run(batcher(21)) == 42  # the worker thread lives on
        finally:
            batcher.shutdown()
    assert not waiting.done()
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING], caplog.records
    assert any("closed event loop" in r.getMessage() for r in caplog.records)


async def test_a_cancelled_wait_withdraws_its_item_from_the_stage() -> None:
    release = threading.Event()
    ran: list[list[int]] = []

    def run_batch(items: list[int]) -> list[int]:
        ran.append(items)
        release.wait(timeout(10))
        return items

    batcher: MicroBatcher[int, int] = MicroBatcher(run_batch, name="fake")
    try:
        first = asyncio.create_task(batcher(1))
        await asyncio.sleep(0.05)  # the worker runs item 1 and waits
        second = asyncio.create_task(batcher(2))
        await asyncio.sleep(0.01)
        second.cancel()  # item 2 is withdrawn before a worker takes it
        with pytest.raises(asyncio.CancelledError):
            await second
        release.set()
        assert await first == 1
        assert await batcher(3) == 3 and ran == [[1], [3]]
    finally:
        batcher.shutdown()
