"""LLM backends compared on this machine: ONNX Runtime int8 (Stemme's own loop, and ONNX Runtime GenAI),
CTranslate2 int8, transformers (torch fp32).
Each backend runs in its own process (clean peak RSS). Prints load time, first-token latency, tokens/s.

    python bench/llm.py [--backends onnxruntime,ort-genai,ctranslate2,transformers] [--runs 3] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, pct, peak_rss_mb  # noqa: E402

PROMPTS = [("en", "What is the capital of France?"), ("fr", "Pourquoi le ciel est-il bleu ?"),
           ("de", "Wie viele Tage hat eine Woche?"), ("es", "¿Qué puedo cocinar para la cena?")]


def child(backend: str, runs: int, threads: int, tokens: int) -> None:
    from stemme.models import export
    from stemme.voice.llm import Conversation, GenerationOptions

    from stemme.config import EngineConfig
    from stemme.engines import load_llm

    cfg = EngineConfig.from_env(llm_backend=backend, llm_threads=threads, device="cpu")
    export.llm_model_dir(backend, cfg.llm_pack, cfg.llm_model)  # one-time conversion, not timed
    rss0 = peak_rss_mb()
    t = time.perf_counter()
    llm = load_llm(cfg)
    load = time.perf_counter() - t
    first, rate, answers = [], [], {}
    for r in range(runs + 1):
        for lang, q in PROMPTS:
            conv = Conversation()
            conv.add("user", q)
            t0 = time.perf_counter()
            ft = None
            n = 0
            text = ""
            for piece in llm.stream(conv.messages(lang), GenerationOptions(max_new_tokens=tokens)):
                if ft is None:
                    ft = time.perf_counter() - t0
                n += 1
                text += piece
            total = time.perf_counter() - t0
            if r == 0:
                answers[lang] = text  # first round is a warm-up
                continue
            first.append(ft or total)
            if n > 1 and ft is not None:
                rate.append((n - 1) / (total - ft))
    print(json.dumps({"backend": backend, "load_s": load, "first_token_s": first, "pieces_per_s": rate,
                      "peak_rss_mb": peak_rss_mb(), "rss_before_load_mb": rss0, "answers": answers}))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--backends", default="onnxruntime,ort-genai,ctranslate2,transformers")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=60)
    ap.add_argument("--child", default=None)
    args = ap.parse_args()
    if args.child:
        child(args.child, args.runs, args.threads, args.tokens)
        return
    print("machine:", machine())
    print(f"{len(PROMPTS)} chat prompts x {args.runs} runs, greedy, up to {args.tokens} new tokens, "
          f"{args.threads} threads; 'pieces' = streamed text pieces (about one per token)")
    print(f"{'backend':13} {'load s':>7} {'first p50':>9} {'first p95':>9} {'tok/s p50':>9} {'tok/s p95':>9} "
          f"{'peak RSS MB':>11}")
    for b in args.backends.split(","):
        out = subprocess.run([sys.executable, __file__, "--child", b, "--runs", str(args.runs), "--threads",
                              str(args.threads), "--tokens", str(args.tokens)], capture_output=True, text=True)
        if out.returncode != 0:
            print(f"{b:13} failed: {out.stderr.strip().splitlines()[-1] if out.stderr else out.returncode}")
            continue
        r = json.loads(out.stdout.strip().splitlines()[-1])
        # "tok/s p95" is the slow tail (5th percentile of the rate), consistent with latency p95
        print(f"{b:13} {r['load_s']:7.2f} {pct(r['first_token_s'], .5):9.3f} {pct(r['first_token_s'], .95):9.3f} "
              f"{pct(r['pieces_per_s'], .5):9.1f} {pct(r['pieces_per_s'], .05):9.1f} {r['peak_rss_mb']:11.0f}")
        print("   answers:", json.dumps(r["answers"], ensure_ascii=False)[:400])


if __name__ == "__main__":
    main()
