"""LLM backends compared on this machine: ONNX Runtime int8 (Stemme's own loop, and ONNX Runtime GenAI),
CTranslate2 int8, transformers (torch fp32), and ``remote``: an OpenAI-compatible endpoint (models/llm_openai.py),
by default a ``transformers serve`` of the embedded model that this script starts on 127.0.0.1 and stops.
Each backend runs in its own process (clean peak RSS; for remote, the client's only). Prints load time,
first-token latency, tokens/s.

    python bench/llm.py [--backends onnxruntime,ort-genai,ctranslate2,transformers,remote] [--runs 3]
                        [--threads 2] [--tokens 60] [--interleave] [--llm-url URL]

--llm-url: an endpoint of your own for `remote` (STEMME_LLM_MODEL, STEMME_LLM_API_KEY: its model and key).
--interleave: every backend in one process, asked in turn prompt by prompt: a fairer comparison on a busy machine.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, pct, peak_rss_mb  # noqa: E402

PROMPTS = [("en", "What is the capital of France?"), ("fr", "Pourquoi le ciel est-il bleu ?"),
           ("de", "Wie viele Tage hat eine Woche?"), ("es", "¿Qué puedo cocinar para la cena?")]


@contextlib.contextmanager
def transformers_serve(threads: int) -> Iterator[str]:
    """``transformers serve`` of the embedded model's HF checkpoint, offline on a free local port: its API URL."""
    import httpx2
    from stemme.models import export

    from stemme.config import EngineConfig

    hf = export.llm_hf_dir(EngineConfig.from_env().llm_pack, None)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": str(threads)}
    proc = subprocess.Popen([str(Path(sys.executable).with_name("transformers")), "serve", str(hf), "--host",
                             "127.0.0.1", "--port", str(port), "--device", "cpu"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}/v1"
    try:
        for _ in range(600):
            with contextlib.suppress(httpx2.TransportError):
                if httpx2.get(url + "/models", timeout=1).status_code == 200:
                    break
            if proc.poll() is not None:
                raise SystemExit("transformers serve exited (pip install 'transformers[serving]')")
            time.sleep(0.5)
        yield url
    finally:
        proc.terminate()
        proc.wait(30)


def _load(backend: str, threads: int, url: str | None) -> tuple[Any, float]:
    from stemme.models import export

    from stemme.config import EngineConfig
    from stemme.engines import load_llm

    if backend == "remote":
        cfg = EngineConfig.from_env(llm_url=url)
    else:
        cfg = EngineConfig.from_env(llm_backend=backend, llm_threads=threads, device="cpu")
        export.llm_model_dir(backend, cfg.llm_pack, cfg.llm_model)  # one-time conversion, not timed
    t = time.perf_counter()
    llm = load_llm(cfg)
    return llm, time.perf_counter() - t


def _ask(llm: Any, lang: str, question: str, tokens: int) -> tuple[float | None, float, int, str]:
    """One answer: (first-token s, total s, pieces, text)."""
    from stemme.voice.llm import Conversation, GenerationOptions

    conv = Conversation()
    conv.add("user", question)
    t0 = time.perf_counter()
    ft, n, text = None, 0, ""
    for piece in llm.stream(conv.messages(lang), GenerationOptions(max_new_tokens=tokens)):
        if not isinstance(piece, str):
            continue
        if ft is None:
            ft = time.perf_counter() - t0
        n += 1
        text += piece
    return ft, time.perf_counter() - t0, n, text


def child(backends: list[str], runs: int, threads: int, tokens: int, url: str | None = None) -> None:
    """Load the backends in this process; each prompt is then asked of each backend in turn (so that, with
    several, they share the machine's ups and downs), in a rotating order. One JSON line per backend."""
    rss0 = peak_rss_mb()
    loaded = {b: _load(b, threads, url) for b in backends}
    res: dict[str, dict[str, Any]] = {b: {"first": [], "rate": [], "answers": {}} for b in backends}
    for r in range(runs + 1):
        for i, (lang, q) in enumerate(PROMPTS):
            for b in backends[i % len(backends):] + backends[:i % len(backends)]:
                ft, total, n, text = _ask(loaded[b][0], lang, q, tokens)
                if r == 0:
                    res[b]["answers"][lang] = text  # first round is a warm-up
                    continue
                res[b]["first"].append(ft or total)
                if n > 1 and ft is not None:
                    res[b]["rate"].append((n - 1) / (total - ft))
    for b in backends:
        print(json.dumps({"backend": b, "load_s": loaded[b][1], "first_token_s": res[b]["first"],
                          "pieces_per_s": res[b]["rate"], "peak_rss_mb": peak_rss_mb(), "rss_before_load_mb": rss0,
                          "answers": res[b]["answers"]}))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--backends", default="onnxruntime,ort-genai,ctranslate2,transformers")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=60)
    ap.add_argument("--llm-url", default=None, help="endpoint of the remote backend (default: a transformers serve "
                    "of the embedded model, started here)")
    ap.add_argument("--interleave", action="store_true",
                    help="all backends in one process, taking turns prompt by prompt (fairer on a busy machine; "
                         "peak RSS is then the sum)")
    ap.add_argument("--child", default=None)
    args = ap.parse_args()
    if args.child:
        child(args.child.split(","), args.runs, args.threads, args.tokens, args.llm_url)
        return
    with contextlib.ExitStack() as stack:
        if "remote" in args.backends.split(",") and not args.llm_url:
            args.llm_url = stack.enter_context(transformers_serve(args.threads))
        compare(args)


def compare(args: argparse.Namespace) -> None:
    print("machine:", machine())
    print(f"{len(PROMPTS)} chat prompts x {args.runs} runs, greedy, up to {args.tokens} new tokens, "
          f"{args.threads} threads; 'pieces' = streamed text pieces (about one per token)")
    print(f"{'backend':13} {'load s':>7} {'first p50':>9} {'first p95':>9} {'tok/s p50':>9} {'tok/s p95':>9} "
          f"{'peak RSS MB':>11}")
    groups = [args.backends] if args.interleave else args.backends.split(",")
    for group in groups:
        remote = ["--llm-url", args.llm_url] if "remote" in group.split(",") else []
        out = subprocess.run([sys.executable, __file__, "--child", group, "--runs", str(args.runs), "--threads",
                              str(args.threads), "--tokens", str(args.tokens), *remote], capture_output=True, text=True)
        if out.returncode != 0:
            print(f"{group:13} failed: {out.stderr.strip().splitlines()[-1] if out.stderr else out.returncode}")
            continue
        for line in out.stdout.strip().splitlines()[-len(group.split(",")):]:
            r = json.loads(line)
            # "tok/s p95" is the slow tail (5th percentile of the rate), consistent with latency p95
            print(f"{r['backend']:13} {r['load_s']:7.2f} {pct(r['first_token_s'], .5):9.3f} "
                  f"{pct(r['first_token_s'], .95):9.3f} {pct(r['pieces_per_s'], .5):9.1f} "
                  f"{pct(r['pieces_per_s'], .05):9.1f} {r['peak_rss_mb']:11.0f}")
            print("   answers:", json.dumps(r["answers"], ensure_ascii=False)[:400])


if __name__ == "__main__":
    main()
