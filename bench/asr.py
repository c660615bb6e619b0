"""ASR benchmark: load time, real-time factor, latency per utterance, WER and language-ID accuracy per
language, peak RSS. Usage: python bench/asr.py [--threads N] [--runs R] [--languages]

--languages adds the language-ID comparison of issue #10 (clamped to the eight tested languages, every Whisper
language bare, every Whisper language with the prior toward the eight when Whisper is unsure) and, for every
sentence recording, the WER of Stemme's path (language detected) against bare faster-whisper
(WhisperModel.transcribe with its defaults) on the same model."""

from __future__ import annotations

import argparse
import sys
import time
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import SPEECH, machine, manifest, peak_rss_mb, summary  # noqa: E402
from stemme.voice.asr import AsrOptions, SpeechRecognizer  # noqa: E402
from stemme.voice.audio import read_wav  # noqa: E402
from stemme.voice.languages import SUPPORTED  # noqa: E402

from stemme.config import EngineConfig  # noqa: E402
from stemme.engines import load_asr  # noqa: E402
from stemme.scoring import word_errors  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--languages", action="store_true", help="language ID modes and WER against bare faster-whisper")
    args = ap.parse_args()
    print("machine:", machine())
    loads = []
    for _ in range(args.runs):
        t = time.perf_counter()
        asr = load_asr(EngineConfig.from_env(asr_threads=args.threads))
        loads.append(time.perf_counter() - t)
    print(f"ASR {asr.name} device={asr.device} threads={args.threads}")
    print("load s:", summary(loads))
    cfg = EngineConfig.from_env()
    rtf, lat = [], []
    errs: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    lid: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for run in range(args.runs):
        for row in manifest():
            audio = read_wav(SPEECH / row["path"])
            t = asr.transcribe(audio.samples, AsrOptions(languages=cfg.languages))
            lat.append(t.seconds)
            rtf.append(t.seconds / audio.seconds)
            if run == 0:
                lang = row["language"]
                kind = "words" if row["kind"] in ("isolated word", "isolated phrase") else "sentences"
                lid[f"{lang} {kind}"][0] += t.language == lang
                lid[f"{lang} {kind}"][1] += 1
                if kind == "sentences":
                    forced = asr.transcribe(audio.samples, AsrOptions(language=lang))
                    e, n = word_errors(forced.text, row["transcript"])
                    errs[lang][0] += e
                    errs[lang][1] += n
    print("latency per utterance s:", summary(lat))
    print("real-time factor:", summary(rtf))
    print("WER (language forced, normalised):", ", ".join(f"{k} {e / n:.3f}" for k, (e, n) in sorted(errs.items())))
    print("language ID (default options: STEMME_LANGUAGES, else every language with the prior):",
          ", ".join(f"{k} {a}/{b}" for k, (a, b) in sorted(lid.items())))
    if args.languages:
        compare_languages(asr)
    print(f"peak RSS MB: {peak_rss_mb():.0f}")


LID_MODES = {"clamped to the eight": AsrOptions(languages=SUPPORTED),
             "every language, bare": AsrOptions(prefer_below=0),
             "every language + prior (default)": AsrOptions()}


def compare_languages(asr: SpeechRecognizer) -> None:
    lid: dict[str, dict[str, list[int]]] = {m: defaultdict(lambda: [0, 0]) for m in LID_MODES}
    wer: dict[str, dict[str, list[int]]] = {"stemme": defaultdict(lambda: [0, 0]), "bare": defaultdict(lambda: [0, 0])}
    for row in manifest():
        audio = read_wav(SPEECH / row["path"])
        lang = row["language"]
        kind = "words" if row["kind"] in ("isolated word", "isolated phrase") else "sentences"
        for mode, opts in LID_MODES.items():
            t = asr.transcribe(audio.samples, opts)
            lid[mode][f"{lang} {kind}"][0] += t.language == lang
            lid[mode][f"{lang} {kind}"][1] += 1
            if mode.endswith("(default)") and kind == "sentences":
                _add(wer["stemme"][lang], t.text, row["transcript"])
        if kind == "sentences":
            segments, _info = asr.model.transcribe(audio.samples)  # type: ignore[attr-defined]
            _add(wer["bare"][lang], " ".join(s.text.strip() for s in segments), row["transcript"])
    for mode, d in lid.items():
        print(f"language ID, {mode}:", ", ".join(f"{k} {a}/{b}" for k, (a, b) in sorted(d.items())))
    for name, d in wer.items():
        label = "Stemme (detected language)" if name == "stemme" else "bare faster-whisper"
        print(f"WER {label}:", ", ".join(f"{k} {e / n:.3f}" for k, (e, n) in sorted(d.items())))


def _add(acc: list[int], hyp: str, ref: str) -> None:
    e, n = word_errors(hyp, ref)
    acc[0] += e
    acc[1] += n


if __name__ == "__main__":
    main()
