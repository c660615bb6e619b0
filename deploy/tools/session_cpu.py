"""CPU one Stemme replica uses while it serves N conversations: the figure behind the autoscaler's CPU target
(docs/deployment.md, "Capacity planning").

Starts ``stemme serve`` on a free loopback port with the pod's settings (every stage on 2 threads), waits for
/readyz, then for each run reads the server's CPU time (all its threads, from /proc), runs ``stemme loadtest
--sessions N --turns T --json`` (real recordings streamed in real time, each device waiting for its answer),
and reads it again. Prints, per run, the cores used on average (CPU seconds / wall seconds), the CPU seconds
per answered turn (the figure that least depends on how busy the machine is) and the voice-to-voice latency,
then the median and p95 over the runs.

    .venv/bin/python deploy/tools/session_cpu.py --sessions 1 --turns 6 --runs 3
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
STEMME = str(Path(sys.executable).with_name("stemme"))
POD_ENV = {"STEMME_ASR_THREADS": "2", "STEMME_LLM_THREADS": "2", "STEMME_TTS_THREADS": "2", "OMP_NUM_THREADS": "2"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time of a process and all its threads."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def wait_ready(port: int, timeout_s: float = 600.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=2):
                return
        except (urllib.error.URLError, OSError):
            time.sleep(1.0)
    raise TimeoutError(f"the server on port {port} was not ready after {timeout_s:.0f} s")


def one_run(pid: int, port: int, sessions: int, turns: int, seed: int) -> tuple[float, dict]:
    cmd = [STEMME, "loadtest", "--url", f"ws://127.0.0.1:{port}", "--sessions", str(sessions),
           "--turns", str(turns), "--seed", str(seed), "--json"]
    c0, t0 = cpu_seconds(pid), time.monotonic()
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, timeout=1200).stdout
    cores = (cpu_seconds(pid) - c0) / (time.monotonic() - t0)
    return cores, json.loads(out.strip().splitlines()[-1])


def p95(xs: list[float]) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, round(0.95 * (len(xs) - 1)))]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sessions", type=int, default=1)
    p.add_argument("--turns", type=int, default=6)
    p.add_argument("--runs", type=int, default=3)
    args = p.parse_args(argv)
    port = free_port()
    server = subprocess.Popen([STEMME, "serve", "--port", str(port)], env={**os.environ, **POD_ENV},
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_ready(port)
        idle0, t0 = cpu_seconds(server.pid), time.monotonic()
        time.sleep(10.0)
        print(f"idle: {(cpu_seconds(server.pid) - idle0) / (time.monotonic() - t0):.3f} cores")
        cores: list[float] = []
        per_turn: list[float] = []
        for i in range(args.runs):
            c, s = one_run(server.pid, port, args.sessions, args.turns, seed=i + 1)
            cores.append(c)
            per_turn.append(c * s["wall_s"] / max(1, s["completed"]))
            v2v = s["stages"]["voice_to_voice"]
            print(f"run {i + 1}: sessions={args.sessions} completed={s['completed']}/{s['turns']} "
                  f"wall={s['wall_s']}s cores={c:.2f} cpu_s_per_turn={per_turn[-1]:.2f} "
                  f"v2v p50={v2v['p50']} p95={v2v['p95']} ms", flush=True)
        print(f"cores used with {args.sessions} session(s): median {statistics.median(cores):.2f}  "
              f"p95 {p95(cores):.2f}; CPU seconds per turn: median {statistics.median(per_turn):.2f}  "
              f"p95 {p95(per_turn):.2f}  (n={len(cores)} runs of {args.turns} turns)")
    finally:
        server.terminate()
        server.wait(timeout=60)
    return 0


if __name__ == "__main__":
    sys.exit(main())
