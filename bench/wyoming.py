"""Wyoming benchmark (what Home Assistant sees), through the `wyoming` package's client over TCP:

- ASR: every sentence recording of tests/data/speech sent at once (as Home Assistant does after its VAD);
  latency from audio-stop to the transcript, real-time factor (that latency / audio length), WER and language
  detection, for the recordings tests/test_wyoming.py uses and, apart, for the held-out rest;
- TTS: a two-sentence text per language (tests/data/sentences.json; no text of the tests), whole
  (``synthesize``) and streamed word by word at 10 words/s like a language model (``synthesize-start/-chunk/
  -stop``): time to first audio, real-time factor (total / audio length), WER of the audio transcribed back;
- handle: time to the assistant's answer for one question per language.

    python bench/wyoming.py [--runs 3] [--only asr,tts,handle] [--url tcp://HOST:PORT] [--json out.json]

Without --url a server is started in this process on a free port (the models load first), with
``asr_language="client"`` so that the TTS round trip is transcribed in its language (a server given by --url
should run with --wyoming-asr-language client for the same). Figures are the median and p95 over every sample
of every run.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import threading
import time
import wave
from collections import defaultdict
from pathlib import Path
from typing import Any

_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]
sys.path.append(str(_HERE))  # for common.py, after the packages: this file's name would hide the wyoming package
from common import ROOT, SPEECH, machine, manifest, pct  # noqa: E402
from stemme.streaming.wyoming import start_wyoming  # noqa: E402
from stemme.voice.audio import pcm16_to_float, resample  # noqa: E402
from wyoming.asr import Transcribe, Transcript  # noqa: E402
from wyoming.audio import AudioChunk, AudioStart, AudioStop, wav_to_chunks  # noqa: E402
from wyoming.client import AsyncTcpClient  # noqa: E402
from wyoming.event import Event  # noqa: E402
from wyoming.tts import Synthesize, SynthesizeChunk, SynthesizeStart, SynthesizeStop, SynthesizeVoice  # noqa: E402

from stemme.config import EngineConfig  # noqa: E402
from stemme.engines import Engines  # noqa: E402
from stemme.scoring import word_errors  # noqa: E402

TESTED = {"en/asterisk_conf-onlyperson.wav", "fr/asterisk_conf-onlyperson.wav", "es/asterisk_tt-weasels.wav"}
"""Recordings tests/test_wyoming.py transcribes: reported apart from the held-out rest."""
QUESTIONS = {
    "en": "What is the capital of Spain?", "fr": "Quelle est la capitale de l'Espagne ?",
    "de": "Was ist die Hauptstadt von Spanien?", "es": "¿Cuál es la capital de Francia?",
    "it": "Qual è la capitale della Spagna?", "pt": "Qual é a capital da Espanha?",
    "nl": "Wat is de hoofdstad van Spanje?", "pl": "Jaka jest stolica Hiszpanii?",
}
WORDS_PER_S = 10.0
"""How fast the streamed text arrives (a language model on a small CPU writes about this fast)."""


async def _until(c: AsyncTcpClient, last: str) -> list[tuple[float, Event]]:
    out = []
    while True:
        e = await c.read_event()
        if e is None:
            raise RuntimeError(f"connection closed before {last}")
        out.append((time.perf_counter(), e))
        if e.type in (last, "error"):
            if e.type == "error":
                raise RuntimeError(f"server error: {e.data}")
            return out


async def transcribe(host: str, port: int, events: list[Event],
                     language: str | None = None) -> tuple[float, Transcript]:
    async with AsyncTcpClient(host, port) as c:
        await c.write_event(Transcribe(language=language).event())
        for e in events:
            await c.write_event(e)
        sent = time.perf_counter()
        got = await _until(c, "transcript-stop")
    final = next(e for _, e in got if e.type == "transcript")
    return time.perf_counter() - sent, Transcript.from_event(final)


def _wav_events(path: Path) -> tuple[list[Event], float]:
    with wave.open(str(path), "rb") as w:
        seconds = w.getnframes() / w.getframerate()
        return [e.event() for e in wav_to_chunks(w, 1024, start_event=True, stop_event=True)], seconds


async def bench_asr(host: str, port: int, runs: int) -> dict[str, Any]:
    rows = [r for r in manifest() if r["kind"] not in ("isolated word", "isolated phrase")]
    out: dict[str, Any] = {}
    for group in ("tested", "held_out"):
        lat: list[float] = []
        rtf: list[float] = []
        errs: defaultdict[str, list[int]] = defaultdict(lambda: [0, 0])
        right = 0
        chosen = [r for r in rows if (r["path"] in TESTED) == (group == "tested")]
        for _ in range(runs):
            for r in chosen:
                events, seconds = _wav_events(SPEECH / r["path"])
                s, t = await transcribe(host, port, events)
                lat.append(s)
                rtf.append(s / seconds)
                e, n = word_errors(t.text, r["transcript"])
                errs[r["language"]][0] += e
                errs[r["language"]][1] += n
                right += t.language == r["language"]
        out[group] = {"files": len(chosen), "latency_s": _stats(lat), "rtf": _stats(rtf),
                      "wer": {k: round(e / n, 3) for k, (e, n) in sorted(errs.items())},
                      "language_accuracy": round(right / max(1, len(lat)), 3)}
    return out


async def _synth_events(c: AsyncTcpClient, text: str, lang: str, streamed: bool) -> float:
    """Send the text (with the language, as Home Assistant sends a voice); returns when all of it was sent."""
    voice = SynthesizeVoice(language=lang)
    if not streamed:
        await c.write_event(Synthesize(text=text, voice=voice).event())
        return time.perf_counter()
    await c.write_event(SynthesizeStart(voice=voice).event())
    for word in text.split(" "):
        await c.write_event(SynthesizeChunk(text=word + " ").event())
        await asyncio.sleep(1 / WORDS_PER_S)
    await c.write_event(SynthesizeStop().event())
    return time.perf_counter()


async def synthesize(host: str, port: int, text: str, lang: str, streamed: bool) -> dict[str, Any]:
    async with AsyncTcpClient(host, port) as c:
        t0 = time.perf_counter()
        writer = asyncio.ensure_future(_synth_events(c, text, lang, streamed))
        got = await _until(c, "synthesize-stopped" if streamed else "audio-stop")
        text_done = await writer
    first = next(t for t, e in got if e.type == "audio-chunk")
    start = next(AudioStart.from_event(e) for _, e in got if e.type == "audio-start")
    pcm = b"".join(AudioChunk.from_event(e).audio for _, e in got if e.type == "audio-chunk")
    audio = resample(pcm16_to_float(pcm), start.rate, 16000)
    total = got[-1][0] - t0
    return {"first_audio_s": first - t0, "first_before_text_end": first < text_done, "total_s": total,
            "audio_s": len(audio) / 16000, "audio": audio}


async def bench_tts(host: str, port: int, runs: int) -> dict[str, Any]:
    sentences = json.loads((ROOT / "tests" / "data" / "sentences.json").read_text())
    out: dict[str, Any] = {}
    for streamed in (False, True):
        first: list[float] = []
        rtf: list[float] = []
        errs: defaultdict[str, list[int]] = defaultdict(lambda: [0, 0])
        early = 0
        for _ in range(runs):
            for lang, texts in sentences.items():
                text = " ".join(texts[:2])
                r = await synthesize(host, port, text, lang, streamed)
                first.append(r["first_audio_s"])
                rtf.append(r["total_s"] / r["audio_s"])
                early += r["first_before_text_end"]
                pcm = (r["audio"].clip(-1, 1) * 32767).astype("<i2").tobytes()
                _, t = await transcribe(host, port, [AudioStart(16000, 2, 1).event(),
                                                     AudioChunk(16000, 2, 1, pcm).event(), AudioStop().event()],
                                        language=lang)
                e, n = word_errors(t.text, text)
                errs[lang][0] += e
                errs[lang][1] += n
        out["streamed" if streamed else "whole"] = {
            "first_audio_s": _stats(first), "rtf": _stats(rtf),
            "first_audio_before_text_end": f"{early}/{len(first)}",
            "wer_back": {k: round(e / n, 3) for k, (e, n) in sorted(errs.items())}}
    return out


async def bench_handle(host: str, port: int, runs: int) -> dict[str, Any]:
    """Each language's first answer computes the shared cache of its instructions and example turns (what
    `stemme serve` does at start-up): that first round is not timed."""
    lat = []
    for i in range(runs + 1):
        for lang, q in QUESTIONS.items():
            async with AsyncTcpClient(host, port) as c:
                t0 = time.perf_counter()
                await c.write_event(Transcript(text=q, language=lang).event())
                await _until(c, "handled")
                if i:
                    lat.append(time.perf_counter() - t0)
    return {"answer_s": _stats(lat)}


def _stats(values: list[float]) -> dict[str, float]:
    return {"median": round(pct(values, 0.5), 3), "p95": round(pct(values, 0.95), 3), "n": len(values)}


class _InProcess:
    """A Wyoming server on a free port in its own thread and loop."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        threading.Thread(target=self.loop.run_forever, daemon=True).start()
        engines = Engines(EngineConfig.from_env())
        # the language a request names is forced (Home Assistant's pipeline language): the TTS round trip is
        # transcribed in the language it was meant to be; the ASR figures name none, so Whisper detects it
        self.server = self._run(start_wyoming(engines, "tcp://127.0.0.1:0", asr_language="client"))
        self._run(self.server.service.wait_ready())
        self._run(self.server.service.info())

    def _run(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result()

    def stop(self) -> None:
        self._run(self.server.stop())


async def run(host: str, port: int, runs: int, parts: list[str]) -> dict[str, Any]:
    await transcribe(host, port, _wav_events(SPEECH / "en" / "asterisk_tt-weasels.wav")[0])  # warm-up
    benches = {"asr": bench_asr, "tts": bench_tts, "handle": bench_handle}
    out: dict[str, Any] = {"machine": machine(), "runs": runs}
    for part in parts:
        out[part] = await benches[part](host, port, runs)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--url", help="a running server, tcp://HOST:PORT (default: one started here)")
    ap.add_argument("--json", help="also write the results here")
    ap.add_argument("--only", default="asr,tts,handle", help="comma-separated parts: asr, tts, handle")
    args = ap.parse_args()
    local = None
    if args.url:
        host, port = args.url.removeprefix("tcp://").rsplit(":", 1)
    else:
        local = _InProcess()
        host, port = "127.0.0.1", str(local.server.port)
    try:
        result = asyncio.run(run(host, int(port), args.runs, args.only.split(",")))
    finally:
        if local is not None:
            local.stop()
    print(json.dumps(result, indent=2, ensure_ascii=False))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2, ensure_ascii=False))


if __name__ == "__main__":
    main()
