"""Load tester: N concurrent simulated devices, each streaming real recorded speech in real time and waiting
for the answer, M turns each. Reports per-stage latency percentiles, replies, errors and dropped turns, as a
table or JSON, and a PNG plot of latency against concurrent sessions when asked.

    stemme loadtest --url ws://127.0.0.1:8000 --sessions 1,2,4 --turns 3 [--binary] [--interrupt 0.2]
                    [--ramp 2] [--duration 300] [--languages per-device|mixed] [--json] [--plot latency.png]

It targets loopback by default and stops by itself: at most sessions x turns turns, and --duration seconds.
Behind a balancer, a device whose server drains reconnects and sends its turn again (``ReconnectingClient``);
the report counts the turns completed, retried (and the reconnects), failed (by reason) and lost (none may be).
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

from stemme.clients.talk import Backoff, RealtimeClient, ReconnectingClient, TurnResult
from stemme.voice.audio import read_wav
from websockets.exceptions import ConnectionClosed

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
                 interrupt: float, deadline: float, rng: random.Random, out: list[dict[str, Any]],
                 backoff: Backoff | None = None) -> None:
    """One simulated device: ``turns`` spoken turns, on as many sessions as draining servers make it open. Each
    turn's row is in ``out`` from the moment it starts (``in_progress`` until it ends: one left so was lost);
    then one ``device`` row with the session counters."""

    async def setup(c: RealtimeClient) -> None:
        await c.configure()

    rc = ReconnectingClient(url, key=key, binary=binary, backoff=backoff, setup=setup)
    try:
        async with rc:
            await _turns(rc, idx, files, turns, interrupt=interrupt, deadline=deadline, rng=rng, out=out)
    except Exception as e:  # noqa: BLE001 - a refused or broken session is a result, not a crash
        out.append({"device": idx, "turn": -1, "status": "error", "error": f"{type(e).__name__}: {e}"})
    finally:
        out.append({"device": idx, "turn": -1, "status": "device", "sessions": rc.sessions,
                    "session_refusals": rc.refusals, "reconnects": rc.reconnects, "told_draining": rc.told_draining})


async def _turns(rc: ReconnectingClient, idx: int, files: list[Path], turns: int, *, interrupt: float,
                 deadline: float, rng: random.Random, out: list[dict[str, Any]]) -> None:
    for t in range(turns):
        if time.monotonic() > deadline:
            break
        path = rng.choice(files)
        samples = read_wav(path).samples
        row: dict[str, Any] = {"device": idx, "turn": t, "file": path.name, "status": "in_progress"}
        out.append(row)
        try:
            c = rc.client
            if interrupt and rng.random() < interrupt and c is not None and not (c.draining or c.closed):
                row.update(await _interrupted_turn(c, samples))
            else:
                row.update(_row(await rc.talk(samples, timeout=max(5.0, deadline - time.monotonic()))))
        except (asyncio.TimeoutError, ConnectionError, ConnectionClosed) as e:
            row.update(status="failed", reason=str(e) or type(e).__name__)
        if rc.gone:
            break


def _row(r: TurnResult) -> dict[str, Any]:
    row: dict[str, Any] = {"status": r.status, "reply": bool(r.reply), "audio_s": round(r.audio_seconds, 3),
                           "splits": r.splits, "attempts": r.attempts, "reconnects": r.reconnects,
                           "refused": r.refused, "drain_cancelled": r.drain_cancelled}
    if r.reason and r.status != "completed":
        row["reason"] = r.reason
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
    """Counts and percentiles of one level. Turns: ``completed`` (``retried``: after ``reconnects``),
    ``failed`` (with their ``failures`` by reason), ``lost`` (started, never ended: the run was cut short)."""
    turns = [r for r in rows if r.get("turn", -1) >= 0]
    devices = [r for r in rows if r["status"] == "device"]
    ok = [r for r in turns if r["status"] == "completed"]
    failed = [r for r in turns if r["status"] not in ("completed", "cancelled", "in_progress")]
    failures: dict[str, int] = {}
    for r in failed:
        why = str(r.get("reason") or r["status"])
        failures[why] = failures.get(why, 0) + 1
    lost = sum(1 for r in turns if r["status"] == "in_progress")
    summary: dict[str, Any] = {
        "sessions": sessions, "turns": len(turns), "completed": len(ok),
        "replies": sum(1 for r in ok if r.get("reply")),
        "retried": sum(1 for r in ok if r.get("attempts", 1) > 1 or r.get("reconnects", 0)),
        "failed": len(failed), "failures": failures, "lost": lost, "dropped": len(failed) + lost,
        "cancelled": sum(1 for r in turns if r["status"] == "cancelled"),
        "reconnects": sum(r.get("reconnects", 0) for r in devices),
        "refused_turns": sum(r.get("refused", 0) for r in turns),
        "drain_cancelled": sum(r.get("drain_cancelled", 0) for r in turns),
        "sessions_opened": sum(r.get("sessions", 0) for r in devices),
        "session_refusals": sum(r.get("session_refusals", 0) for r in devices),
        "told_draining": sum(r.get("told_draining", 0) for r in devices),
        "split_utterances": sum(r.get("splits", 0) for r in turns),
        "errors": sum(1 for r in rows if r["status"] == "error" or r.get("error")),
        "interrupted": sum(1 for r in turns if r.get("interrupted")), "wall_s": round(wall, 1), "stages": {}}
    for name, key in STAGES:
        vals = [r[key] for r in ok if isinstance(r.get(key), (int, float))]
        cells = {q: _pct(vals, q) for q in QUANTILES}
        summary["stages"][name] = {f"p{int(q * 100)}": (round(v) if v is not None else None) for q, v in cells.items()}
        summary["stages"][name]["n"] = len(vals)
    return summary


def table(s: dict[str, Any]) -> str:
    lines = [f"sessions={s['sessions']} turns={s['turns']} completed={s['completed']} replies={s['replies']} "
             f"dropped={s['dropped']} cancelled={s['cancelled']} errors={s['errors']} interrupted={s['interrupted']} "
             f"split={s['split_utterances']} wall={s['wall_s']}s",
             f"retried={s['retried']} failed={s['failed']} lost={s['lost']} reconnects={s['reconnects']} "
             f"refused_turns={s['refused_turns']} sessions_opened={s['sessions_opened']} "
             f"told_draining={s['told_draining']} failures={json.dumps(s['failures'])}",
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
    backoff = Backoff(tries=getattr(args, "reconnect_tries", Backoff.tries))
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
                                                    rng=random.Random(rng.random()), out=rows, backoff=backoff)))
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
    p.add_argument("--reconnect-tries", type=int, default=Backoff.tries,
                   help="tries per reconnection when a server drains or refuses (backoff 0.2 s doubling to 2 s)")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--json", action="store_true")
    p.add_argument("--plot", default=None, help="PNG of latency against concurrent sessions")

    def cmd(args: argparse.Namespace) -> int:
        try:
            summaries = asyncio.run(run(args))
        except OSError as e:
            print(f"stemme: error: cannot reach {args.url}: {e}", file=sys.stderr)
            return 1
        return 0 if all(s["completed"] and not s["lost"] for s in summaries) else 1

    p.set_defaults(func=cmd)
