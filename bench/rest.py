"""The OpenAI REST endpoints through the official openai SDK, one request at a time: median and p95 of

  speech_first   request sent -> first audio byte of /v1/audio/speech (streamed WAV, after its 44-byte header),
                 for two-sentence texts (tests/data/sentences.json): the first clause (a few words) is sent when
                 it is made
  speech_total   request sent -> last byte
  speech_rtf     speech_total / seconds of audio made
  transcribe     upload sent -> transcript of /v1/audio/transcriptions (real recordings, tests/data/speech)
  transcribe_rtf transcription time / seconds of audio
  chat_first     request sent -> first content token of /v1/chat/completions (stream=True)

plus the word error rate of the transcriptions against the manifest, and, when the server runs in this process,
speech_direct_rtf: the same text synthesized by a direct engine call (no HTTP) right after, for comparison.

    python bench/rest.py [--url http://127.0.0.1:8000] [--key K] [--rounds 2] [--langs en,fr,es,it,de]

Without --url it starts a server in this process on a free port (models load once, warm-up included).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Any

import openai

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, SPEECH, machine, manifest, pct  # noqa: E402

from stemme.scoring import wer  # noqa: E402

QUESTIONS = ["What is the capital of France?", "Quelle est la capitale de l'Italie ?",
             "Wie heißt die Hauptstadt von Spanien?", "Name a colour of the sky."]


def speech_once(client: openai.OpenAI, text: str, language: str = "") -> dict[str, Any]:
    started = time.perf_counter()
    first = None
    size = 0
    with client.audio.speech.with_streaming_response.create(model="tts-1", voice="alloy", input=text,
                                                            response_format="wav") as response:
        for chunk in response.iter_bytes():
            size += len(chunk)
            if first is None and size > 44:
                first = time.perf_counter() - started
    total = time.perf_counter() - started
    seconds = (size - 44) / 2 / 24000
    return {"speech_first": first or total, "speech_total": total, "language": language,
            "speech_rtf": total / seconds if seconds else float("nan"), "voice": response.headers["x-stemme-voice"]}


def direct_rtf(held: Any, text: str, voice_name: str) -> float:
    """The RTF of a direct engine call (no HTTP, no stage worker) with the voice the server chose."""
    engines = held[0].engines
    voice = next(v for v in engines.tts.registry.voices if v.name == voice_name)
    started = time.perf_counter()
    audio = engines.tts.synthesize(text, voice)
    return (time.perf_counter() - started) / audio.seconds


def two_sentences(sentences: list[str]) -> list[str]:
    """Each sentence followed by the next (the last by the first)."""
    return [f"{a} {b}" for a, b in zip(sentences, sentences[1:] + sentences[:1], strict=True)]


def transcribe_once(client: openai.OpenAI, row: dict[str, str]) -> dict[str, Any]:
    data = (SPEECH / row["path"]).read_bytes()
    started = time.perf_counter()
    t = client.audio.transcriptions.create(model="whisper-1", file=(Path(row["path"]).name, data))
    took = time.perf_counter() - started
    return {"transcribe": took, "transcribe_rtf": took / float(row["duration_s"]),
            "wer": wer(t.text, row["transcript"]),
            "language": row["language"]}


def chat_once(client: openai.OpenAI, question: str) -> dict[str, float]:
    started = time.perf_counter()
    stream = client.chat.completions.create(model="stemme", stream=True, max_tokens=30,
                                            messages=[{"role": "user", "content": question}])
    first = None
    for chunk in stream:
        if first is None and chunk.choices and chunk.choices[0].delta.content:
            first = time.perf_counter() - started
    return {"chat_first": first or time.perf_counter() - started}


def start_server() -> tuple[str, Any]:
    """A real server in a thread of this process (streaming/server.py with the REST routes)."""
    from stemme.streaming.server import ServerConfig, StemmeServer

    from stemme.config import EngineConfig
    from stemme.engines import Engines

    loop = asyncio.new_event_loop()
    server = StemmeServer(Engines(EngineConfig.from_env()), ServerConfig(port=0))
    threading.Thread(target=loop.run_forever, daemon=True).start()
    asyncio.run_coroutine_threadsafe(server.start(), loop).result()
    return f"http://127.0.0.1:{server.port}", (server, loop)


def report(rows: list[dict[str, Any]]) -> None:
    print(f"{'measure':18} {'median':>8} {'p95':>8} {'n':>4}")
    for key in ("speech_first", "speech_total", "speech_rtf", "speech_direct_rtf", "transcribe", "transcribe_rtf",
                "chat_first"):
        vals = [r[key] for r in rows if key in r]
        if vals:
            print(f"{key:18} {statistics.median(vals):8.3f} {pct(vals, 0.95):8.3f} {len(vals):4}")
    speech = [r for r in rows if "speech_first" in r]
    for lang in dict.fromkeys(r["language"] for r in speech):
        mine = [r for r in speech if r["language"] == lang]
        first = [r["speech_first"] for r in mine]
        rtf = [r["speech_rtf"] for r in mine]
        print(f"speech {lang} ({mine[0]['voice']}): first median {statistics.median(first):.3f} p95 "
              f"{pct(first, 0.95):.3f}, RTF median {statistics.median(rtf):.3f}")
    errs = [r for r in rows if "wer" in r]
    for lang in dict.fromkeys(r["language"] for r in errs):
        w = [r["wer"] for r in errs if r["language"] == lang]
        print(f"WER {lang}: {statistics.mean(w):.3f} over {len(w)} recordings")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--url", default=None, help="http://host:port of a running server")
    ap.add_argument("--key", default="none")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--langs", default="en,fr,es,it,de")
    ap.add_argument("--per-lang", type=int, default=3)
    ap.add_argument("--json", action="store_true", help="print every measurement as JSON")
    args = ap.parse_args()
    url, held = args.url, None
    if url is None:
        url, held = start_server()
    client = openai.OpenAI(base_url=url.rstrip("/") + "/v1", api_key=args.key, timeout=300, max_retries=0)
    langs = args.langs.split(",")
    texts = json.loads((ROOT / "tests" / "data" / "sentences.json").read_text())
    sentences = [(text, lang) for lang in langs for text in two_sentences(texts.get(lang, []))[: args.per_lang]]
    recordings = [r for lang in langs for r in [m for m in manifest() if m["language"] == lang
                                                and m["kind"] != "isolated word"][: args.per_lang]]
    speech_once(client, "Hello.")  # the first request loads the text-language identifier
    rows: list[dict[str, Any]] = []
    for _ in range(args.rounds):
        for s, lang in sentences:
            rows.append(speech_once(client, s, lang))
            if held is not None:
                rows[-1]["speech_direct_rtf"] = direct_rtf(held, s, rows[-1]["voice"])
        rows += [transcribe_once(client, r) for r in recordings]
        rows += [chat_once(client, q) for q in QUESTIONS]
    if args.json:
        for r in rows:
            print(json.dumps(r))
    print("machine:", machine())
    print(f"server: {url}; sentences: {len(sentences)}, recordings: {len(recordings)}, rounds: {args.rounds}")
    report(rows)


if __name__ == "__main__":
    main()
