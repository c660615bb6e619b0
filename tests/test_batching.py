"""Micro-batching across sessions: the batcher's logic with fake batch functions, the LLM scheduler's
continuous batching with a fake batching engine, then ASR and LLM batches with the real models (their results
must match one-by-one decoding)."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest
from stemme.voice.asr import AsrOptions
from stemme.voice.audio import read_wav
from stemme.voice.batching import BatchingOptions, MicroBatcher
from stemme.voice.llm import GenerationOptions
from stemme.voice.pipeline import LlmScheduler, StageOptions, Stages, TtsPriority, transcribe

from stemme.scoring import wer
from tests.conftest import SPEECH, timeout


class FakeBatchFn:
    """Records the batches it is given; returns each item doubled, or fails the items named 'bad'."""

    def __init__(self, delay: float = 0.0) -> None:
        self.batches: list[list] = []
        self.delay = delay

    def __call__(self, items):
        self.batches.append(list(items))
        time.sleep(self.delay)
        return [ValueError(f"bad item {x}") if x == "bad" else x * 2 for x in items]


def test_requests_that_arrive_within_the_window_share_one_batch():
    fn = FakeBatchFn()
    b = MicroBatcher(fn, options=BatchingOptions(max_batch=8, window=0.3))
    try:
        futs = [b.submit(i) for i in range(3)]
        assert [f.result(timeout=5) for f in futs] == [0, 2, 4]
        assert fn.batches == [[0, 1, 2]]
        assert (b.batches, b.items) == (1, 3)
    finally:
        b.shutdown()


def test_a_batch_never_exceeds_max_batch_and_keeps_arrival_order():
    fn = FakeBatchFn()
    b = MicroBatcher(fn, options=BatchingOptions(max_batch=2, window=0.3))
    try:
        futs = [b.submit(i) for i in range(5)]
        assert [f.result(timeout=5) for f in futs] == [0, 2, 4, 6, 8]
        assert fn.batches == [[0, 1], [2, 3], [4]]
    finally:
        b.shutdown()


def test_with_batching_off_every_request_runs_alone_in_order():
    fn = FakeBatchFn(delay=0.05)
    b = MicroBatcher(fn, options=BatchingOptions(max_batch=1, window=3.0))
    try:
        t = time.perf_counter()
        futs = [b.submit(i) for i in range(3)]
        assert [f.result(timeout=10) for f in futs] == [0, 2, 4]
        assert fn.batches == [[0], [1], [2]]
        assert time.perf_counter() - t < 3.0  # no window is waited for when batching is off (0.15 s of work)
    finally:
        b.shutdown()


def test_only_requests_with_the_same_key_share_a_batch():
    fn = FakeBatchFn()
    b = MicroBatcher(fn, options=BatchingOptions(max_batch=8, window=0.3),
                     key=lambda x: None if x >= 100 else x % 2)
    try:
        futs = [b.submit(x) for x in (1, 2, 3, 100, 4)]
        assert [f.result(timeout=5) for f in futs] == [2, 4, 6, 200, 8]
        assert fn.batches == [[1, 3], [2, 4], [100]]
    finally:
        b.shutdown()


def test_a_failing_item_fails_alone_and_a_failing_batch_fails_all_its_items():
    fn = FakeBatchFn()
    b = MicroBatcher(fn, options=BatchingOptions(max_batch=8, window=0.2))
    try:
        ok, bad = b.submit("a"), b.submit("bad")
        assert ok.result(timeout=5) == "aa"
        with pytest.raises(ValueError, match="bad item"):
            bad.result(timeout=5)
    finally:
        b.shutdown()

    def broken(items):
        raise RuntimeError("engine crashed")

    b = MicroBatcher(broken, options=BatchingOptions(max_batch=8, window=0.2))
    try:
        futs = [b.submit(i) for i in range(2)]
        for f in futs:
            with pytest.raises(RuntimeError, match="engine crashed"):
                f.result(timeout=5)
        assert b.submit(5).exception(timeout=5) is not None  # the stage keeps serving after a failure
    finally:
        b.shutdown()


def test_cancelled_requests_are_skipped_and_shutdown_cancels_waiting_ones():
    gate = threading.Event()
    seen: list = []

    def slow(items):
        seen.extend(items)
        gate.wait(5)
        return items

    b = MicroBatcher(slow, options=BatchingOptions(max_batch=1))
    first = b.submit("first")
    time.sleep(0.1)
    second, third = b.submit("second"), b.submit("third")
    assert second.cancel()
    b.shutdown()
    gate.set()
    assert first.result(timeout=5) == "first"
    assert third.cancelled()
    assert seen == ["first"]
    with pytest.raises(RuntimeError, match="shut down"):
        b.submit("late")


async def test_the_batcher_is_awaitable_from_the_event_loop():
    b = MicroBatcher(FakeBatchFn(), options=BatchingOptions(max_batch=4, window=0.1))
    try:
        assert await asyncio.gather(b(1), b(2)) == [2, 4]
        assert b.batches == 1
    finally:
        b.shutdown()


def test_stage_defaults_batch_on_a_gpu_and_not_on_a_cpu():
    cpu, gpu = StageOptions.for_device("cpu"), StageOptions.for_device("cuda")
    assert cpu.asr_batching.max_batch == 1 and cpu.tts_workers == 1 and cpu.tts_priority
    assert gpu.asr_batching.max_batch > 1 and gpu.asr_batching.window > 0 and gpu.tts_workers > 1
    assert not gpu.tts_priority
    forced = StageOptions.for_device("cpu", max_batch=4, window_ms=20)
    assert forced.asr_batching.max_batch == 4 and forced.asr_batching.window == pytest.approx(0.02)


# ---- the LLM scheduler with a batching engine --------------------------------------------------------------

class FakeBatchingChat:
    """A fake batching backend: each row 'generates' its prompt's name followed by a count, one token per
    step; ``steps`` records which rows each step served."""

    batches = True
    interleaves = True

    def __init__(self, length: int = 4, fail_at: int | None = None, delay: float = 0.0) -> None:
        self.length = length
        self.fail_at = fail_at
        self.delay = delay
        self.steps: list[list[str]] = []

    def batch_decoder(self, max_batch):
        return FakeDecoder(self, max_batch)


class FakeRow:
    def __init__(self, name: str) -> None:
        self.name = name
        self.count = 0


class FakeDecoder:
    def __init__(self, chat: FakeBatchingChat, max_batch: int) -> None:
        self.chat, self.max_batch = chat, max_batch
        self.rows: list[FakeRow] = []
        self.new: list[FakeRow] = []

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def pending(self) -> int:
        return len(self.new)

    def add(self, messages, options):
        row = FakeRow(messages[-1]["content"])
        self.rows.append(row)
        self.new.append(row)
        return row

    def remove(self, row) -> None:
        if row in self.rows:
            self.rows.remove(row)
        if row in self.new:
            self.new.remove(row)

    def step(self):
        if self.chat.fail_at is not None and len(self.chat.steps) == self.chat.fail_at:
            raise RuntimeError("out of memory")
        time.sleep(self.chat.delay)
        rows = [self.new.pop(0)] if self.new else self.rows[: self.max_batch]
        self.chat.steps.append([r.name for r in rows])
        events = []
        for r in rows:
            piece = f"{r.name}{r.count}"
            r.count += 1
            done = r.count >= self.chat.length
            events.append((r, piece, done))
            if done:
                self.remove(r)
        return events


def _submit(sched, engine, name, out, done, cancel=None):
    def put(x):
        if x is None:
            done.release()
        else:
            out.setdefault(name, []).append(x)

    sched.submit(engine, [{"role": "user", "content": name}], GenerationOptions(), cancel or threading.Event(), put)


def test_llm_scheduler_decodes_a_batching_engines_streams_together():
    chat = FakeBatchingChat()
    prio = TtsPriority()
    sched = LlmScheduler(prio, max_batch=8)
    done = threading.Semaphore(0)
    out: dict = {}
    try:
        with prio.speaking():  # queue all three before the scheduler's first batched step
            _submit(sched, chat, "a", out, done)
            time.sleep(0.1)
            _submit(sched, chat, "b", out, done)
            _submit(sched, chat, "c", out, done)
        for _ in range(3):
            assert done.acquire(timeout=5)
    finally:
        sched.shutdown()
    assert out == {k: [f"{k}{i}" for i in range(4)] for k in "abc"}
    assert ["a", "b", "c"] in chat.steps  # one forward pass served all three streams
    assert sched.batch_sizes[3] >= 1
    # each new stream's prompt ran before the others' next token (first token first)
    assert chat.steps.index(["b"]) < chat.steps.index(["a", "b", "c"])


def test_a_cancelled_stream_leaves_the_batch_and_the_others_go_on():
    chat = FakeBatchingChat(length=50, delay=0.01)
    sched = LlmScheduler(TtsPriority(False), max_batch=8)
    done = threading.Semaphore(0)
    out: dict = {}
    cancel = threading.Event()
    try:
        _submit(sched, chat, "a", out, done, cancel)
        _submit(sched, chat, "b", out, done)
        time.sleep(0.05)
        cancel.set()
        assert done.acquire(timeout=5) and done.acquire(timeout=5)
    finally:
        sched.shutdown()
    assert len(out["b"]) == 50
    assert len(out.get("a", [])) < 50


def test_an_engine_failure_reaches_every_stream_of_the_batch():
    chat = FakeBatchingChat(length=10, fail_at=3)
    prio = TtsPriority()
    sched = LlmScheduler(prio, max_batch=8)
    done = threading.Semaphore(0)
    out: dict = {}
    try:
        with prio.speaking():
            _submit(sched, chat, "a", out, done)
            time.sleep(0.1)
            _submit(sched, chat, "b", out, done)
        assert done.acquire(timeout=5) and done.acquire(timeout=5)
    finally:
        sched.shutdown()
    for name in "ab":
        assert any(isinstance(x, RuntimeError) for x in out[name]), out


# ---- real models -------------------------------------------------------------------------------------------

def _clips(manifest, n):
    rows = [r for r in manifest if r["kind"] == "sentence" and float(r["duration_s"]) < 8][:n]
    return rows, [read_wav(SPEECH / r["path"]).samples for r in rows]


def test_whisper_batch_matches_one_by_one_transcription(engines, manifest):
    asr = engines.asr
    rows, clips = _clips(manifest, 3)
    opts = AsrOptions(languages=engines.config.languages)
    single = [asr.transcribe(c, opts) for c in clips]
    batch = asr.transcribe_batch(clips, [opts] * len(clips))
    assert [t.language for t in batch] == [t.language for t in single] == [r["language"] for r in rows]
    for r, s, b in zip(rows, single, batch, strict=True):
        # padding the shorter clips to the longest one may change a word, not the transcript
        assert wer(b.text, r["transcript"]) <= wer(s.text, r["transcript"]) + 0.15, (b.text, s.text)


async def test_concurrent_sessions_asr_requests_are_micro_batched(engines, manifest):
    rows, clips = _clips(manifest, 3)
    stages = Stages(StageOptions(asr_batching=BatchingOptions(max_batch=4, window=timeout(0.5))))
    try:
        opts = AsrOptions(languages=engines.config.languages)
        engines.asr  # noqa: B018 - loaded before the timing window starts
        results = await asyncio.gather(*(transcribe(engines, stages, c, opts) for c in clips))
        assert stages.asr.batches == 1 and stages.asr.items == 3
        for r, t in zip(rows, results, strict=True):
            assert t.language == r["language"]
            assert wer(t.text, r["transcript"]) < 0.5, t.text
    finally:
        stages.shutdown()


def _chat(backend: str, **kw):
    from stemme.config import EngineConfig
    from stemme.engines import load_llm

    return load_llm(EngineConfig.from_env(llm_backend=backend, device="cpu", llm_threads=2, **kw))


@pytest.fixture(scope="module", params=["onnxruntime", "transformers"])
def batching_chat(request):
    # no prefix cache: a prompt continued from a cache decodes the same in substance, not bit for bit
    return _chat(request.param, llm_prefix_cache_mb=0)


def test_batched_streams_decode_exactly_like_single_streams(batching_chat):
    """Rows join the batch at different steps (continuous batching) and still decode what they decode alone:
    the padding is masked and each row keeps its own positions."""
    prompts = ["What is the capital of France?", "Écris une phrase sur la mer.", "Wie spät ist es in Berlin?"]
    msgs = [[{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": p}] for p in prompts]
    o = GenerationOptions(max_new_tokens=24)
    single = ["".join(batching_chat.stream(m, o)) for m in msgs]
    dec = batching_chat.batch_decoder(8)
    out: dict = {}
    rows = []
    widest = 0
    for step in range(200):
        if step in (0, 3, 6):
            rows.append(dec.add(msgs[len(rows)], o))
        if not len(dec):
            break
        events = dec.step()
        widest = max(widest, len(events))
        for row, piece, _done in events:
            out.setdefault(id(row), []).append(piece)
    assert widest == 3
    assert ["".join(out[id(r)]) for r in rows] == single
    assert all(single)


def test_onnxruntime_loop_decodes_like_ort_genai(engines):
    """Stemme's own ONNX Runtime loop (the CPU default) and ONNX Runtime GenAI run the same model files: greedy
    answers must be the same."""
    own = _chat("onnxruntime", llm_prefix_cache_mb=0)
    genai = _chat("ort-genai")
    msgs = [{"role": "user", "content": "Name three colours of the rainbow."}]
    o = GenerationOptions(max_new_tokens=30)
    assert "".join(own.stream(msgs, o)) == "".join(genai.stream(msgs, o))


def test_piper_batch_is_understood_and_each_clause_keeps_its_own_length(engines, sentences):
    """A batch of Piper clauses in one graph call: the graph's own frame counts cut each clause, so no clause
    carries the padding of a longer one, and every clause is still understood."""
    from stemme.voice.audio import resample

    from stemme.scoring import char_errors

    tts = engines.tts
    voice = tts.registry.resolve("en", "piper:en_US-joe-medium")
    texts = sentences["en"][:3]
    assert tts.batch_key(voice) is not None
    batch = tts.synthesize_batch(texts, voice)
    single = [tts.synthesize(t, voice) for t in texts]
    errors = total = 0
    for text, b, s in zip(texts, batch, single, strict=True):
        assert abs(b.seconds - s.seconds) < 0.15 * s.seconds + 0.1, (text, b.seconds, s.seconds)
        heard = engines.asr.transcribe(resample(b.samples, b.rate, 16000), AsrOptions(language="en")).text
        e, n = char_errors(heard, text)
        errors, total = errors + e, total + n
    assert errors / total <= 0.15


async def test_tts_stage_batches_clauses_of_different_sessions(engines):
    voice = engines.tts.registry.resolve("en", "piper:en_US-joe-medium")
    kokoro = engines.tts.registry.resolve("fr")
    stages = Stages(StageOptions(tts_batching=BatchingOptions(max_batch=4, window=timeout(0.5))))
    try:
        pcm = await asyncio.gather(stages.tts((engines, "Good morning.", voice, 1.0)),
                                   stages.tts((engines, "How can I help you today?", voice, 1.0)),
                                   stages.tts((engines, "Bonjour à vous.", kokoro, 1.0)))
        assert all(len(p) > 24000 for p in pcm)  # each is more than half a second of 24 kHz PCM16
        assert len(pcm[1]) > len(pcm[0])
        # the two Piper clauses shared one call; Kokoro (graph fixed at batch size 1) ran alone
        assert (stages.tts.batches, stages.tts.items) == (2, 3)
    finally:
        stages.shutdown()


def test_a_voice_graph_without_a_frame_length_node_is_not_batched(tmp_path, monkeypatch):
    import onnx
    from stemme.models.tts_piper import with_lengths

    monkeypatch.setenv("STEMME_HOME", str(tmp_path / "home"))
    x = onnx.helper.make_tensor_value_info("input", onnx.TensorProto.FLOAT, [1])
    y = onnx.helper.make_tensor_value_info("output", onnx.TensorProto.FLOAT, [1])
    graph = onnx.helper.make_graph([onnx.helper.make_node("Identity", ["input"], ["output"])], "g", [x], [y])
    path = tmp_path / "odd.onnx"
    onnx.save(onnx.helper.make_model(graph), str(path))
    assert with_lengths(path) is None
    (tmp_path / "broken.onnx").write_bytes(b"not a model")
    assert with_lengths(tmp_path / "broken.onnx") is None


# ---- the next turn reuses the conversation's cache ----------------------------------------------------------

def test_prefix_cache_serves_a_conversation_its_own_cache_only():
    from stemme.models.llm_common import PrefixCache

    c = PrefixCache(max_bytes=300)
    c.store("alice", list(range(40)), ["kv-a"], 100)
    assert c.take("alice", list(range(60))) == (40, ["kv-a"])
    assert c.take("alice", list(range(20)), min_tokens=16) == (19, ["kv-a"])  # one token is always left to run
    assert c.take("alice", list(range(10)) + [7] * 30, min_tokens=16) == (0, None)  # too short a match
    assert c.take("bob", list(range(60))) == (0, None)  # the same words from another user: not served
    c.store("alice", list(range(50)), ["kv-a2"], 100)  # the next turn replaces the conversation's entry
    assert c.size_bytes == 100 and c.take("alice", list(range(60))) == (50, ["kv-a2"])
    for name in ("bob", "carol", "dan"):
        c.store(name, [1] * 20, [name], 100)
    assert c.size_bytes == 300 and c.take("alice", list(range(60))) == (0, None)  # least recently used out
    c.store("erin", [1] * 1000, ["huge"], 10_000)  # larger than the whole cache: not kept
    assert c.size_bytes == 300
    c.drop("bob")
    c.store("bob", [1] * 20, ["late"], 100)  # an answer that finished after its session closed
    assert c.take("bob", [1] * 30) == (0, None) and c.size_bytes == 200


def test_the_next_turn_prefills_only_its_new_words(engines):
    """With the prefix cache, the second and third turns start from the previous turns' cache, and the answers
    still use the whole history."""
    from stemme.voice.llm import Conversation

    chat = engines.llm if engines.llm.name == "onnxruntime" else _chat("onnxruntime")
    cache = chat.prefix_cache
    hits, reused = cache.hits, cache.reused_tokens
    conv = Conversation()
    o = GenerationOptions(max_new_tokens=30, conversation="test-zofia")
    answers = []
    for q in ["My name is Zofia and I live in Kraków.", "What is the weather like there in winter?",
              "What is my name?"]:
        conv.add("user", q)
        answers.append("".join(chat.stream(conv.messages("en"), o)))
        conv.add("assistant", answers[-1])
    assert cache.hits - hits == 2
    assert cache.reused_tokens - reused > 100  # the system prompt, the first turns and their answers
    assert "zofia" in answers[-1].lower(), answers
    chat.forget("test-zofia")
    assert cache.take("test-zofia", [0] * 100) == (0, None)


def test_a_new_turns_first_token_does_not_wait_for_another_sessions_speech():
    chat = FakeBatchingChat(length=10)
    prio = TtsPriority()
    sched = LlmScheduler(prio, max_batch=8)
    done = threading.Semaphore(0)
    out: dict = {}
    try:
        with prio.speaking():  # another session's speech is being synthesized the whole time
            _submit(sched, chat, "a", out, done)
            time.sleep(0.2)
            _submit(sched, chat, "b", out, done)
            time.sleep(0.2)
            assert out.get("b", [])[:1] == ["b0"], out  # b's prompt ran although speech goes on
            assert len(out["a"]) < 10  # while a's generation stays paused behind the speech
        assert done.acquire(timeout=5) and done.acquire(timeout=5)
    finally:
        sched.shutdown()
    assert out["a"] == [f"a{i}" for i in range(10)] and out["b"] == [f"b{i}" for i in range(10)]
