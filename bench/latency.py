"""Voice-to-voice latency through the real server: streams real recorded speech in real time (as a device
would), one fresh session per utterance, and prints p50/p95 of each stage.

    python bench/latency.py [--url ws://127.0.0.1:8000] [--rounds 2] [--binary] [--langs en,fr,...]

Languages: any with sentence recordings in tests/data/speech (en, es, fr, it, nl, ru, cs; de and pt hold single
words only, so they are left out). Each language is also reported on its own, with the voice that spoke it.

Without --url it starts a server in this process on a free port (models load once, warm-up included).
Stages (ms, from the server's response.done report):
  end_of_turn   last voiced input sample -> end of turn decided (silence_duration_ms of silence)
  asr           end of turn -> transcript
  llm_first     transcript -> first LLM token
  tts_first     first token -> first audio chunk sent (waits for the first clause, then synthesizes it)
  voice_to_voice  last voiced input sample -> first reply audio byte sent (server clock)
  client_v2v    last audio chunk sent by the client -> first reply audio byte received (client clock)
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import SPEECH, machine, manifest, pct, peak_rss_mb  # noqa: E402
from stemme.clients.talk import RealtimeClient  # noqa: E402
from stemme.streaming.server import ServerConfig, StemmeServer  # noqa: E402
from stemme.voice.audio import read_wav  # noqa: E402

from stemme.config import EngineConfig  # noqa: E402
from stemme.engines import Engines  # noqa: E402

STAGES = [("end_of_turn", "end_of_turn_ms"), ("asr", "asr_ms"), ("llm_first", "llm_first_token_ms"),
          ("tts_first", "tts_first_audio_ms"), ("voice_to_voice", "voice_to_voice_ms")]


async def one(url: str, path: Path, binary: bool, silence_ms: int, semantic: str | None = None) -> dict:
    async with RealtimeClient(url, binary=binary) as c:
        await c.wait_for("session.created")
        await c.configure(silence_ms=silence_ms)
        if semantic:
            td = {"type": "semantic_vad", "eagerness": semantic}
            await c.send({"type": "session.update",
                          "session": {"type": "realtime", "audio": {"input": {"turn_detection": td}}}})
            await c.wait_for("session.updated")
        r = await c.talk(read_wav(path).samples)
        row = dict(r.latency)
        row.update(file=str(path.relative_to(SPEECH)), status=r.status, transcript=r.transcript, reply=r.reply)
        if r.first_audio_at and r.last_voice_sent_at:
            row["client_v2v_ms"] = round((r.first_audio_at - r.last_voice_sent_at) * 1000)
        return row


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--url", default=None)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--binary", action="store_true")
    ap.add_argument("--langs", default="en,fr,es,it,nl")
    ap.add_argument("--per-lang", type=int, default=3)
    ap.add_argument("--silence-ms", type=int, default=500)
    ap.add_argument("--semantic", default=None, metavar="EAGERNESS",
                    help="semantic_vad (the end-of-turn model) with this eagerness instead of server_vad")
    ap.add_argument("--json", action="store_true", help="print every turn as JSON")
    args = ap.parse_args()
    server = None
    url = args.url
    if url is None:
        cfg = EngineConfig.from_env()
        server = StemmeServer(Engines(cfg), ServerConfig(port=0))
        await server.start()
        url = f"ws://127.0.0.1:{server.port}"
        print(f"engines: asr_threads={cfg.asr_threads} llm_threads={cfg.llm_threads} tts_threads={cfg.tts_threads}"
              f" llm={server.engines.llm.name}")
    langs = args.langs.split(",")
    if server:
        warm_voices(server.engines, langs)
    rows = [r for r in manifest() if r["language"] in langs and r["kind"] not in ("isolated word",)]
    files = []
    for lang in langs:
        files += [SPEECH / r["path"] for r in rows if r["language"] == lang][: args.per_lang]
    results = []
    for _ in range(args.rounds):
        for f in files:
            row = await one(url, f, args.binary, args.silence_ms, args.semantic)
            results.append(row)
            if args.json:
                print(json.dumps(row, ensure_ascii=False), flush=True)
    if server:
        await server.stop()
    ok = [r for r in results if r["status"] == "completed" and r.get("voice_to_voice_ms") is not None]
    print("machine:", machine())
    print(f"turns: {len(results)}, completed with audio: {len(ok)}, mode: {'binary' if args.binary else 'json'}")
    print(f"{'stage':16} {'p50 ms':>8} {'p95 ms':>8}")
    for name, key in STAGES + [("client_v2v", "client_v2v_ms")]:
        vals = [r[key] for r in ok if r.get(key) is not None]
        if vals:
            print(f"{name:16} {pct(vals, 0.5):8.0f} {pct(vals, 0.95):8.0f}")
    per_language(ok, langs, server.engines if server else None)
    if server:
        print(f"peak RSS of the process (server with every model, and the client): {peak_rss_mb():.0f} MB")


def warm_voices(engines: Engines, langs: list[str]) -> None:
    """Load each language's default voice before timing (the server warms one voice per engine)."""
    for lang in langs:
        engines.tts.synthesize("Hello.", engines.tts.registry.resolve(lang))


def per_language(ok: list[dict], langs: list[str], engines: Engines | None) -> None:
    print(f"{'lang':4} {'voice':26} {'turns':>5} {'tts_first p50':>13} {'p95':>6} {'v2v p50':>8} {'p95':>6}")
    for lang in langs:
        rows = [r for r in ok if r["file"].startswith(f"{lang}/")]
        if not rows:
            continue
        voice = engines.tts.registry.resolve(lang).name if engines else "(server's default)"
        tts = [r["tts_first_audio_ms"] for r in rows if r.get("tts_first_audio_ms") is not None]
        v2v = [r["voice_to_voice_ms"] for r in rows]
        print(f"{lang:4} {voice:26} {len(rows):5} {pct(tts, .5):13.0f} {pct(tts, .95):6.0f} {pct(v2v, .5):8.0f} "
              f"{pct(v2v, .95):6.0f}")


if __name__ == "__main__":
    asyncio.run(main())
