"""TTS benchmark: for the default voice of each language, real-time factor, time to first audio (first clause
of a two-sentence text), round-trip character error rate through the ASR, plus load time and peak RSS.

    python bench/tts.py [--runs 3] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, machine, pct, peak_rss_mb  # noqa: E402
from stemme.voice.asr import AsrOptions  # noqa: E402
from stemme.voice.audio import resample  # noqa: E402
from stemme.voice.languages import SUPPORTED  # noqa: E402

from stemme.config import EngineConfig  # noqa: E402
from stemme.engines import load_asr, load_tts  # noqa: E402
from stemme.scoring import char_errors  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    sentences = json.loads((ROOT / "tests" / "data" / "sentences.json").read_text())
    cfg = EngineConfig.from_env(tts_threads=args.threads)
    t = time.perf_counter()
    tts = load_tts(cfg)
    asr = load_asr(cfg)
    print("machine:", machine())
    print(f"tts threads={args.threads}; runs={args.runs}; engines created in {time.perf_counter() - t:.2f}s")
    print(f"{'lang':4} {'voice':24} {'load s':>6} {'RTF p50':>7} {'RTF p95':>7} {'first p50':>9} {'first p95':>9} "
          f"{'CER':>5}")
    for lang in SUPPORTED:
        voice = tts.registry.resolve(lang)
        t = time.perf_counter()
        tts.synthesize("Ok.", voice)
        load = time.perf_counter() - t
        rtf, first = [], []
        errs = total = 0
        for run in range(args.runs):
            for s in sentences[lang]:
                t = time.perf_counter()
                a = tts.synthesize(s, voice)
                rtf.append((time.perf_counter() - t) / max(a.seconds, 1e-6))
                if run == 0:
                    h = asr.transcribe(resample(a.samples, a.rate, 16000), AsrOptions(language=lang))
                    e, n = char_errors(h.text, s)
                    errs += e
                    total += n
            two = f"{sentences[lang][1]} {sentences[lang][2]}"
            t = time.perf_counter()
            next(tts.stream(two, voice))
            first.append(time.perf_counter() - t)
        print(f"{lang:4} {voice.name:24} {load:6.2f} {pct(rtf, .5):7.3f} {pct(rtf, .95):7.3f} {pct(first, .5):9.3f} "
              f"{pct(first, .95):9.3f} {errs / total:5.3f}")
    print(f"peak RSS MB (TTS + ASR): {peak_rss_mb():.0f}")


if __name__ == "__main__":
    main()
