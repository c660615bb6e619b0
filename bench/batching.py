"""What batching across sessions buys on this machine (CPU or CUDA).

ASR: N utterances transcribed one by one against one batch (faster-whisper, short context): the time the
first and the last session wait. TTS: the same for N clauses with one Piper voice. LLM: N concurrent streams
decoded by the LLM scheduler, batched against interleaved token by token (and ORT GenAI, which interleaves):
time to each stream's first token, and tokens/s per stream and in all.

    python bench/batching.py [--device cpu|cuda] [--sizes 1,2,4] [--runs 3] [--tokens 48] [--skip-llm]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import SPEECH, machine, manifest, pct  # noqa: E402

PROMPTS = ["What is the capital of France?", "Pourquoi le ciel est-il bleu ?", "Wie viele Tage hat eine Woche?",
           "¿Qué puedo cocinar para la cena?", "Qual è il fiume più lungo d'Italia?",
           "Wat is een goede naam voor een hond?", "Como se faz um bolo simples?", "Jak długo gotować jajko na twardo?"]


def bench_asr(device: str, sizes: list[int], runs: int) -> list[dict]:
    from stemme.models.faster_whisper_asr import FasterWhisperRecognizer
    from stemme.voice.asr import AsrOptions
    from stemme.voice.audio import read_wav

    asr = FasterWhisperRecognizer(device=device)
    rows = [r for r in manifest() if r["kind"] == "sentence" and 2.5 <= float(r["duration_s"]) <= 6][:16]
    clips = [read_wav(SPEECH / r["path"]).samples for r in rows]
    opts = AsrOptions(languages=("en", "fr", "de", "es", "it", "pt", "nl", "pl"))
    asr.transcribe(clips[0], opts)
    return _one_by_one_vs_batch(clips, sizes, runs, lambda c: asr.transcribe(c, opts),
                                lambda group: asr.transcribe_batch(group, [opts] * len(group)))


def _one_by_one_vs_batch(items: list, sizes: list[int], runs: int, one, batch) -> list[dict]:  # noqa: ANN001
    """For each N: the time the first and the last of N requests wait one by one, and one batch of N."""
    out = []
    for n in sizes:
        seq_last, seq_first, batched = [], [], []
        for r in range(runs):
            group = [items[(r * n + i) % len(items)] for i in range(n)]
            t = time.perf_counter()
            for i, x in enumerate(group):
                one(x)
                if i == 0:
                    seq_first.append(time.perf_counter() - t)
            seq_last.append(time.perf_counter() - t)
            t = time.perf_counter()
            batch(group)
            batched.append(time.perf_counter() - t)
        out.append({"sessions": n, "one_by_one_first_s": seq_first, "one_by_one_last_s": seq_last,
                    "batch_s": batched})
    return out


CLAUSES = ["Good morning, how can I help?", "The train leaves at nine.", "It will be sunny and warm today.",
           "Sure, here is a simple recipe.", "Paris is the capital of France.", "I am not sure about that.",
           "Let me check the weather for you.", "That sounds like a good plan."]


def bench_tts(device: str, sizes: list[int], runs: int) -> list[dict]:
    from stemme.config import EngineConfig
    from stemme.engines import load_tts

    tts = load_tts(EngineConfig.from_env(device=device))
    voice = tts.registry.resolve("en", "piper:en_US-joe-medium")
    tts.synthesize_batch(CLAUSES[:2], voice)  # builds the batch graph once
    return _one_by_one_vs_batch(CLAUSES, sizes, runs, lambda c: tts.synthesize(c, voice),
                                lambda group: tts.synthesize_batch(group, voice))


def _print_groups(title: str, rows: list[dict]) -> None:
    print(f"\n{title} (seconds: median / p95)")
    print(f"{'N':>3} {'1-by-1 first':>14} {'1-by-1 last':>14} {'batch (all)':>14}")
    for r in rows:
        cells = [f"{statistics.median(r[k]):.3f}/{pct(r[k], 0.95):.3f}"
                 for k in ("one_by_one_first_s", "one_by_one_last_s", "batch_s")]
        print(f"{r['sessions']:>3} " + " ".join(f"{c:>14}" for c in cells))


def _streams(chat, scheduler_max_batch: int, n: int, tokens: int) -> dict:
    """n streams submitted together to a fresh LLM scheduler; returns first-token times and rates."""
    from stemme.voice.llm import GenerationOptions
    from stemme.voice.pipeline import LlmScheduler, TtsPriority

    sched = LlmScheduler(TtsPriority(False), max_batch=scheduler_max_batch)
    done = threading.Semaphore(0)
    first: dict[int, float] = {}
    count: dict[int, int] = {}
    end: dict[int, float] = {}
    t0 = time.perf_counter()
    for i in range(n):
        def put(x, i=i):
            now = time.perf_counter()
            if x is None:
                end[i] = now
                done.release()
            elif isinstance(x, str):
                first.setdefault(i, now)
                count[i] = count.get(i, 0) + 1
        msgs = [{"role": "system", "content": "Answer in one long sentence."},
                {"role": "user", "content": PROMPTS[i % len(PROMPTS)]}]
        sched.submit(chat, msgs, GenerationOptions(max_new_tokens=tokens), threading.Event(), put)
    for _ in range(n):
        done.acquire(timeout=600)
    sched.shutdown()
    total = max(end.values()) - t0
    rates = [(count[i] - 1) / (end[i] - first[i]) for i in range(n) if count.get(i, 0) > 1 and end[i] > first[i]]
    return {"first_token_s": [first[i] - t0 for i in range(n) if i in first], "per_stream_tok_s": rates,
            "total_tok_s": sum(count.values()) / total, "batch_sizes": dict(sched.batch_sizes)}


class Interleaved:
    """An engine without its batch decoder: the scheduler interleaves its streams token by token."""

    batches, interleaves = False, True

    def __init__(self, engine) -> None:  # noqa: ANN001
        self.stream = engine.stream


def bench_llm(device: str, sizes: list[int], runs: int, tokens: int) -> list[dict]:
    from stemme.models import export
    from stemme.models.llm_transformers import TransformersChat

    hf = TransformersChat(export.llm_model_dir("transformers", "qwen2.5-coder-0.5b", None), device=device)
    engines = {"transformers-batched": hf, "transformers-interleaved": Interleaved(hf)}
    if device == "cpu":
        from stemme.config import EngineConfig
        from stemme.engines import load_llm

        onnx = load_llm(EngineConfig.from_env(llm_backend="onnxruntime", device="cpu"))
        engines["onnxruntime-batched"] = onnx
        engines["onnxruntime-interleaved"] = Interleaved(onnx)
        engines["ort-genai-interleaved"] = load_llm(EngineConfig.from_env(llm_backend="ort-genai", device="cpu"))
    out = []
    for name, chat in engines.items():
        _streams(chat, 8, 1, 4)  # warm-up
        for n in sizes:
            agg: dict = {"first_token_s": [], "per_stream_tok_s": [], "total_tok_s": []}
            for _ in range(runs):
                r = _streams(chat, 8, n, tokens)
                agg["first_token_s"] += r["first_token_s"]
                agg["per_stream_tok_s"] += r["per_stream_tok_s"]
                agg["total_tok_s"].append(r["total_tok_s"])
            out.append({"engine": name, "streams": n, **agg})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--sizes", default="1,2,4")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--tokens", type=int, default=48)
    ap.add_argument("--skip-llm", action="store_true")
    ap.add_argument("--json", default=None, help="also write the raw results here")
    a = ap.parse_args()
    sizes = [int(x) for x in a.sizes.split(",")]
    print(f"machine: {machine()}  device: {a.device}")
    res: dict = {"device": a.device, "machine": machine(), "asr": bench_asr(a.device, sizes, a.runs),
                 "tts": bench_tts(a.device, sizes, a.runs)}
    _print_groups("ASR, N utterances of 2.5-6 s", res["asr"])
    _print_groups("TTS, N short clauses, Piper en_US-joe-medium", res["tts"])
    if not a.skip_llm:
        res["llm"] = bench_llm(a.device, sizes, a.runs, a.tokens)
        print(f"\nLLM, N concurrent streams of {a.tokens} tokens (qwen2.5-coder-0.5b)")
        print(f"{'engine':26} {'N':>3} {'first token med/p95 s':>22} {'tok/s per stream':>17} {'tok/s total':>12}")
        for r in res["llm"]:
            ft = f"{statistics.median(r['first_token_s']):.3f}/{pct(r['first_token_s'], 0.95):.3f}"
            ps = statistics.median(r["per_stream_tok_s"]) if r["per_stream_tok_s"] else float("nan")
            total = statistics.median(r["total_tok_s"])
            print(f"{r['engine']:26} {r['streams']:>3} {ft:>22} {ps:>17.1f} {total:>12.1f}")
    if a.json:
        Path(a.json).write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
