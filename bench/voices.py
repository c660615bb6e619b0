"""Voices per language: round-trip character error rate (synthesize, transcribe back with the embedded Whisper
base, language forced, normalised CER), first-clause time, real-time factor, and the level of the output (peak,
RMS, clipped samples, silence left at the edges).

    python bench/voices.py                          # the default voice of every European language
    python bench/voices.py --langs nl,pl --candidates   # every candidate voice, to choose among them
    python bench/voices.py --voices kokoro:ff_siwis,pico:fr-FR --langs fr --split dev
    python bench/voices.py --runs 3 --markdown      # timing repeated, tables for the docs

Sentences: bench/data/voice_sentences.json, the same eight meanings per language; 'dev' was used to choose
the voices, 'held_out' was kept aside until the choice was made (both are reported). The tests use other
sentences. Timings are wall-clock on this machine; run it on a quiet machine for numbers you can compare.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, machine, pct  # noqa: E402
from stemme.voice import languages  # noqa: E402
from stemme.voice.asr import AsrOptions, SpeechRecognizer  # noqa: E402
from stemme.voice.audio import Audio, resample, write_wav  # noqa: E402
from stemme.voice.tts import Synthesizer, Voice, make_voice, split_clauses  # noqa: E402

from stemme.config import EngineConfig  # noqa: E402
from stemme.engines import load_asr, load_tts  # noqa: E402
from stemme.scoring import char_errors  # noqa: E402

SENTENCES = ROOT / "bench" / "data" / "voice_sentences.json"
EUROPEAN_VECTORS = ("ff_siwis", "ef_dora", "em_alex", "if_sara", "im_nicola", "pf_dora", "pm_alex", "af_heart",
                    "bf_emma")
"""Kokoro vectors tried for languages that have none of their own."""
NATIVE_VECTORS = {"en": ("af_heart", "af_bella", "am_michael", "bf_emma", "bm_george"), "fr": ("ff_siwis",),
                  "es": ("ef_dora", "em_alex", "em_santa"), "it": ("if_sara", "im_nicola"),
                  "pt": ("pf_dora", "pm_alex", "pm_santa")}
PICO = {"en": ("en-US", "en-GB"), "de": ("de-DE",), "fr": ("fr-FR",), "es": ("es-ES",), "it": ("it-IT",)}


def parse_voice(lang: str, spec: str) -> Voice:
    """'kokoro:ff_siwis', 'kokoro:jm_kumo@0.9', 'pico:de-DE', 'piper:en_US-joe-medium', 'espeak'."""
    engine, _, rest = spec.partition(":")
    style, _, speed = rest.partition("@")
    return make_voice(lang, engine, style or None, speed=float(speed) if speed else 1.0)


def candidates(lang: str) -> list[Voice]:
    """Every voice worth measuring for a language: its own vectors (or all European ones), Pico, espeak-ng,
    and the Japanese vector that spoke every language before."""
    specs = [f"kokoro:{v}" for v in NATIVE_VECTORS.get(lang, EUROPEAN_VECTORS)]
    specs += [f"pico:{tag}" for tag in PICO.get(lang, ())]
    specs += ["kokoro:jm_kumo@0.9", "espeak"]
    if lang == "en":
        specs.insert(0, "piper:en_US-joe-medium")
    return [parse_voice(lang, s) for s in specs]


@dataclass
class Result:
    lang: str
    voice: str
    split: str
    errors: int = 0
    chars: int = 0
    first: list[float] = field(default_factory=list)
    rtf: list[float] = field(default_factory=list)
    peak: float = 0.0
    rms: list[float] = field(default_factory=list)
    clipped: int = 0
    edges_ms: list[float] = field(default_factory=list)
    heard: list[str] = field(default_factory=list)

    @property
    def cer(self) -> float:
        return self.errors / max(self.chars, 1)

    def row(self) -> dict[str, object]:
        return {"lang": self.lang, "voice": self.voice, "split": self.split, "cer": round(self.cer, 4),
                "first_p50": round(pct(self.first, .5), 3), "first_p95": round(pct(self.first, .95), 3),
                "rtf_p50": round(pct(self.rtf, .5), 3), "rtf_p95": round(pct(self.rtf, .95), 3),
                "peak_dbfs": round(_db(self.peak), 1), "rms_dbfs": round(_db(float(np.mean(self.rms))), 1),
                "clipped": self.clipped, "edge_silence_ms_max": round(max(self.edges_ms), 0), "heard": self.heard}


def _db(x: float) -> float:
    return 20 * math.log10(max(x, 1e-9))


def _edge_silence_ms(a: Audio, threshold: float = 0.01) -> float:
    loud = np.nonzero(np.abs(a.samples) > threshold)[0]
    if len(loud) == 0:
        return a.seconds * 1000
    return max(loud[0], len(a.samples) - 1 - loud[-1]) / a.rate * 1000


def speak(tts: Synthesizer, text: str, voice: Voice) -> tuple[Audio, float, float]:
    """Clause by clause as the pipeline does: (audio with 0.12 s gaps, first-clause seconds, total seconds)."""
    parts, first = [], 0.0
    t0 = time.perf_counter()
    for i, clause in enumerate(split_clauses(text)):
        parts.append(tts.synthesize(clause, voice))
        if i == 0:
            first = time.perf_counter() - t0
    total = time.perf_counter() - t0
    rate = parts[0].rate
    gap = np.zeros(int(0.12 * rate), np.float32)
    samples = np.concatenate([x for p in parts for x in (p.samples, gap)][:-1])
    return Audio(samples, rate), first, total


def measure(tts: Synthesizer, asr: SpeechRecognizer, lang: str, voice: Voice, split: str, texts: list[str],
            runs: int, save: Path | None) -> Result:
    r = Result(lang, voice.name, split)
    for i, text in enumerate(texts):
        for run in range(runs):
            audio, first, total = speak(tts, text, voice)
            r.first.append(first)
            r.rtf.append(total / max(audio.seconds, 1e-6))
            if run:
                continue
            x = audio.samples
            r.peak = max(r.peak, float(np.max(np.abs(x))))
            r.rms.append(float(np.sqrt(np.mean(x ** 2))))
            r.clipped += int(np.sum(np.abs(x) >= 0.999))
            r.edges_ms.append(_edge_silence_ms(tts.synthesize(split_clauses(text)[0], voice)))
            heard = asr.transcribe(resample(x, audio.rate, 16000), AsrOptions(language=lang)).text
            e, n = char_errors(heard, text, language=lang)
            r.errors += e
            r.chars += n
            r.heard.append(heard)
            if save:
                save.mkdir(parents=True, exist_ok=True)
                write_wav(save / f"{lang}_{voice.name.replace(':', '_')}_{split}{i}.wav", audio)
    return r


def markdown(rows: list[dict[str, object]]) -> str:
    out = ["| lang | voice | CER dev | CER held-out | first clause p50 / p95 s | RTF p50 | peak / RMS dBFS | clipped |",
           "|---|---|---|---|---|---|---|---|"]
    by: dict[tuple[object, object], dict[object, dict[str, object]]] = {}
    for r in rows:
        by.setdefault((r["lang"], r["voice"]), {})[r["split"]] = r
    for (lang, voice), s in by.items():
        d, h = s.get("dev", {}), s.get("held_out", {})
        any_ = h or d
        out.append(f"| {lang} | `{voice}` | {d.get('cer', '')} | {h.get('cer', '')} | "
                   f"{any_['first_p50']} / {any_['first_p95']} | {any_['rtf_p50']} | "
                   f"{any_['peak_dbfs']} / {any_['rms_dbfs']} | {any_['clipped']} |")
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--langs", default=",".join(languages.EUROPEAN))
    ap.add_argument("--voices", default=None, help="comma-separated voice specs (default: the default voice)")
    ap.add_argument("--candidates", action="store_true", help="every candidate voice of each language")
    ap.add_argument("--split", choices=["dev", "held_out", "both"], default="both")
    ap.add_argument("--limit", type=int, default=0, help="only the first N sentences of each split")
    ap.add_argument("--runs", type=int, default=1, help="synthesis repeats for the timings")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--save", type=Path, default=None, help="write every synthesized sentence here (WAV)")
    ap.add_argument("--markdown", action="store_true")
    args = ap.parse_args()
    data = json.loads(SENTENCES.read_text())
    cfg = EngineConfig.from_env(tts_threads=args.threads)
    tts, asr = load_tts(cfg), load_asr(cfg)
    print("machine:", machine(), file=sys.stderr)
    rows = []
    splits = ["dev", "held_out"] if args.split == "both" else [args.split]
    for lang in args.langs.split(","):
        if lang not in data:
            print(f"{lang}: no sentences, skipped", file=sys.stderr)
            continue
        if args.candidates:
            voices = candidates(lang)
        elif args.voices:
            voices = [parse_voice(lang, s) for s in args.voices.split(",")]
        else:
            voices = [tts.registry.resolve(lang)]
        for voice in voices:
            if not tts.registry.engines[voice.engine].available(voice):
                print(f"{lang}: {voice.name} not available here, skipped", file=sys.stderr)
                continue
            tts.synthesize("ok", voice)  # warm-up: load the engine and the voice
            for split in splits:
                texts = data[lang][split][: args.limit or None]
                r = measure(tts, asr, lang, voice, split, texts, args.runs, args.save).row()
                rows.append(r)
                print(json.dumps(r, ensure_ascii=False), flush=True)
    if args.markdown:
        print(markdown(rows))


if __name__ == "__main__":
    main()
