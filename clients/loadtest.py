"""Load tester: N concurrent simulated devices, each streaming real recorded speech in real time and waiting
for the answer, M turns each. Reports per-stage latency percentiles, replies, errors and dropped turns, as a
table or JSON, and a PNG plot of latency against concurrent sessions when asked.

    stemme loadtest --url ws://127.0.0.1:8000 --sessions 1,2,4 --turns 3 [--binary] [--interrupt 0.2]
                    [--ramp 2] [--duration 300] [--languages per-device|mixed] [--json] [--plot latency.png]

It targets loopback by default and stops by itself: at most sessions x turns turns, and --duration seconds.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import time
from pathlib import Path
from typing import Any

from stemme.clients.talk import RealtimeClient, TurnResult
from stemme.voice.audio import read_wav

STAGES = [("end_of_turn", "end_of_turn_ms"), ("asr", "asr_ms"), ("first_token", "llm_first_token_ms"),
          ("first_audio", "tts_first_audio_ms"), ("voice_to_voice", "voice_to_voice_ms"),
          ("client_v2v", "client_v2v_ms")]
QUANTILES = (0.5, 0.9, 0.95, 0.99)


def _pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    v = sorted(values)
    k = (len(v) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(v) - 1)
    return v[lo] + (v[hi] - v[lo]) * (k - lo)


def _speech_files(speech: Path) -> list[Path]:
    manifest = speech / "manifest.tsv"
    if manifest.is_file():
        import csv

        with open(manifest, newline="") as f:
            rows = [r for r in csv.DictReader(f, delimiter="\t") if r.get("kind") != "isolated word"]
        return [speech / r["path"] for r in rows]
    return sorted(speech.rglob("*.wav"))


async def device(idx: int, url: str, files: list[Path], turns: int, *, binary: bool, key: str | None,
                 interrupt: float, deadline: float, rng: random.Random, out: list[dict[str, Any]]) -> None:
    """One simulated device: a session of ``turns`` spoken turns."""
    try:
        async with RealtimeClient(url, key=key, binary=binary) as c:
            created = await c.wait_for("session.created", timeout=30)
            if created.get("type") != "session.created":
                raise ConnectionError("no session")
            await c.configure()
            for t in range(turns):
                if time.monotonic() > deadline:
                    break
                path = rng.choice(files)
                samples = read_wav(path).samples
                row: dict[str, Any] = {"device": idx, "turn": t, "file": path.name}
                try:
                    if interrupt and rng.random() < interrupt:
                        row.update(await _interrupted_turn(c, samples))
                    else:
                        r = await c.talk(samples, timeout=max(5.0, deadline - time.monotonic()))
                        row.update(_row(r))
                except (asyncio.TimeoutError, ConnectionError) as e:
                    row.update(status="dropped", error=str(e) or type(e).__name__)
                out.append(row)
                if row["status"] in ("closed", "dropped", "unauthorized"):
                    break
    except Exception as e:  # noqa: BLE001 - a refused or broken session is a result, not a crash
        out.append({"device": idx, "turn": -1, "status": "error", "error": f"{type(e).__name__}: {e}"})


def _row(r: TurnResult) -> dict[str, Any]:
    row: dict[str, Any] = {"status": r.status, "reply": bool(r.reply), "audio_s": round(r.audio_seconds, 3),
                           "splits": r.splits}
    row.update({k: v for k, v in r.latency.items() if k.endswith("_ms")})
    if r.first_audio_at and r.last_voice_sent_at:
        row["client_v2v_ms"] = round((r.first_audio_at - r.last_voice_sent_at) * 1000)
    errors = [e for e in r.events if e.get("type") == "error"]
    if errors:
        row["error"] = errors[0]["error"].get("code")
    return row


async def _interrupted_turn(c: RealtimeClient, samples) -> dict[str, Any]:
    """Speak, then speak again as soon as the answer's audio starts: the first answer must be cancelled."""
    first = TurnResult()
    streamer = asyncio.create_task(c.stream(samples, then_silence_s=0.0))
    await streamer
    while True:
        ev = await asyncio.wait_for(c.events.get(), 60)
        if isinstance(ev, bytes) or (isinstance(ev, dict) and ev.get("type") == "response.output_audio.delta"):
            break
        if isinstance(ev, dict) and ev.get("type") == "response.done":
            return {"status": "completed", "interrupted": False}
    r = await c.talk(samples, timeout=60)
    cancelled = any(e.get("type") == "output_audio_buffer.cleared" for e in r.events)
    row = _row(r)
    row["interrupted"] = cancelled
    del first
    return row


def summarise(rows: list[dict[str, Any]], sessions: int, wall: float) -> dict[str, Any]:
    turns = [r for r in rows if r.get("turn", -1) >= 0]
    ok = [r for r in turns if r["status"] == "completed"]
    summary: dict[str, Any] = {
        "sessions": sessions, "turns": len(turns), "completed": len(ok),
        "replies": sum(1 for r in ok if r.get("reply")),
        "dropped": sum(1 for r in turns if r["status"] not in ("completed", "cancelled")),
        "cancelled": sum(1 for r in turns if r["status"] == "cancelled"),
        "split_utterances": sum(r.get("splits", 0) for r in turns),
        "errors": sum(1 for r in rows if r["status"] == "error" or r.get("error")),
        "interrupted": sum(1 for r in turns if r.get("interrupted")), "wall_s": round(wall, 1), "stages": {}}
    for name, key in STAGES:
        vals = [r[key] for r in ok if isinstance(r.get(key), (int, float))]
        summary["stages"][name] = {f"p{int(q * 100)}": (round(_pct(vals, q)) if vals else None) for q in QUANTILES}
        summary["stages"][name]["n"] = len(vals)
    return summary


def table(s: dict[str, Any]) -> str:
    lines = [f"sessions={s['sessions']} turns={s['turns']} completed={s['completed']} replies={s['replies']} "
             f"dropped={s['dropped']} cancelled={s['cancelled']} errors={s['errors']} interrupted={s['interrupted']} "
             f"split={s['split_utterances']} wall={s['wall_s']}s",
             f"{'stage':16}" + "".join(f"{'p' + str(int(q * 100)):>8}" for q in QUANTILES) + f"{'n':>6}"]
    for name, _ in STAGES:
        st = s["stages"][name]
        cells = [st[f"p{int(q * 100)}"] for q in QUANTILES]
        lines.append(f"{name:16}" + "".join(f"{c if c is not None else '-':>8}" for c in cells) + f"{st['n']:>6}")
    return "\n".join(lines)


def plot(summaries: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    xs = [s["sessions"] for s in summaries]
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for stage, style in (("voice_to_voice", "-o"), ("asr", "--s"), ("first_token", "--^"), ("first_audio", "--v")):
        for q, alpha in (("p50", 1.0), ("p95", 0.5)):
            ys = [s["stages"][stage][q] for s in summaries]
            ax.plot(xs, [y if y is not None else float("nan") for y in ys], style, alpha=alpha,
                    label=f"{stage} {q}")
    ax.axhline(2500, color="red", lw=0.8, ls=":", label="2.5 s")
    ax.set_xlabel("concurrent sessions")
    ax.set_ylabel("latency (ms)")
    ax.set_title("Stemme latency against concurrent sessions")
    ax.legend(fontsize=7, ncol=2)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


async def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    files = _speech_files(Path(args.speech))
    if not files:
        raise SystemExit(f"no speech files under {args.speech}")
    summaries = []
    for n in [int(x) for x in str(args.sessions).split(",")]:
        rng = random.Random(args.seed + n)
        rows: list[dict[str, Any]] = []
        t0 = time.monotonic()
        deadline = t0 + args.duration
        tasks = []
        by_lang: dict[str, list[Path]] = {}
        for f in files:
            by_lang.setdefault(f.parent.name, []).append(f)
        for i in range(n):
            mine = files
            if getattr(args, "languages", "per-device") == "per-device":
                mine = by_lang[sorted(by_lang)[rng.randrange(len(by_lang))]]
            tasks.append(asyncio.create_task(device(i, args.url, mine, args.turns, binary=args.binary,
                                                    key=args.key, interrupt=args.interrupt, deadline=deadline,
                                                    rng=random.Random(rng.random()), out=rows)))
            if args.ramp and n > 1:
                await asyncio.sleep(args.ramp / n)
        try:
            await asyncio.wait_for(asyncio.gather(*tasks), timeout=args.duration + 60)
        except asyncio.TimeoutError:
            for t in tasks:
                t.cancel()
        s = summarise(rows, n, time.monotonic() - t0)
        summaries.append(s)
        print(json.dumps(s) if args.json else table(s) + "\n", flush=True)
    if args.plot:
        plot(summaries, Path(args.plot))
    return summaries


def add_loadtest_parser(sub: Any) -> None:
    default_speech = Path(__file__).resolve().parent.parent / "tests" / "data" / "speech"
    p = sub.add_parser("loadtest", help="N concurrent simulated devices streaming real speech")
    p.add_argument("--url", default="ws://127.0.0.1:8000")
    p.add_argument("--key", default=None)
    p.add_argument("--sessions", default="1", help="concurrent sessions; a list (1,2,4) runs each in turn")
    p.add_argument("--turns", type=int, default=3, help="turns per session")
    p.add_argument("--speech", default=str(default_speech), help="directory of WAV files (manifest.tsv optional)")
    p.add_argument("--ramp", type=float, default=0.0, help="seconds over which sessions start")
    p.add_argument("--duration", type=float, default=600.0, help="hard stop, seconds per level")
    p.add_argument("--binary", action="store_true", help="binary audio frames (else the standard JSON form)")
    p.add_argument("--interrupt", type=float, default=0.0, help="fraction of turns interrupted by the user")
    p.add_argument("--languages", choices=["per-device", "mixed"], default="per-device",
                   help="per-device: each simulated user speaks one language (the files of one folder), as real "
                        "users mostly do; mixed: every turn in a random language (the worst case for caches)")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--json", action="store_true")
    p.add_argument("--plot", default=None, help="PNG of latency against concurrent sessions")

    def cmd(args: argparse.Namespace) -> int:
        try:
            summaries = asyncio.run(run(args))
        except OSError as e:
            print(f"stemme: error: cannot reach {args.url}: {e}", file=sys.stderr)
            return 1
        return 0 if all(s["completed"] for s in summaries) else 1

    p.set_defaults(func=cmd)
