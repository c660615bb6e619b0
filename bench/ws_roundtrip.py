"""The WebSocket path's own latency, through the real server on loopback: event round trips and text-in, audio-out
turns. Written to compare server implementations like with like (issue #11: the move to Starlette + uvicorn).

    python bench/ws_roundtrip.py [--events 300] [--turns 20] [--rounds 3] [--server-file OLD_SERVER.py]

It starts the server in this process, in its own thread and event loop (as the tests do), models loaded once.
--server-file loads ``StemmeServer``/``ServerConfig`` from another copy of streaming/server.py (e.g. the one
before the move: ``git show ac455ad:streaming/server.py > /tmp/server_before.py``).
Figures (ms, client clock, median and p95 of each round, then over all rounds):
  event_rtt      input_audio_buffer.clear -> input_audio_buffer.cleared (no model involved: the server's own path)
  created        response.create -> response.created
  first_audio    response.create -> first response.output_audio.delta (language model and voice included)
  done           response.create -> response.done
On a machine shared with other work the figures are noisy: compare runs made back to back, and rerun both.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import statistics
import sys
import threading
import time
from pathlib import Path
from types import ModuleType
from typing import Any

from websockets.asyncio.client import ClientConnection, connect

from stemme.config import EngineConfig
from stemme.engines import Engines

TURN = [{"type": "session.update", "session": {"audio": {"input": {"turn_detection": None}}}},
        {"type": "conversation.item.create", "item": {"type": "message", "role": "user", "content": [
            {"type": "input_text", "text": "Say hello to Anna."}]}},
        {"type": "response.create", "response": {"max_output_tokens": 8}}]


def _server_module(path: str | None) -> ModuleType:
    if path is None:
        from stemme.streaming import server

        return server
    spec = importlib.util.spec_from_file_location("stemme_server_under_test", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def _start(module: ModuleType, engines: Engines) -> tuple[Any, asyncio.AbstractEventLoop, threading.Thread]:
    loop = asyncio.new_event_loop()
    server = module.StemmeServer(engines, module.ServerConfig(port=0, warmup=True))
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    asyncio.run_coroutine_threadsafe(server.start(), loop).result(900)
    return server, loop, thread


async def _until(ws: ClientConnection, etype: str) -> dict[str, Any]:
    while True:
        m = await ws.recv()
        if isinstance(m, str):
            ev = json.loads(m)
            if ev["type"] == etype:
                return ev


async def _event_rtts(url: str, n: int) -> list[float]:
    out: list[float] = []
    async with connect(url) as ws:
        await _until(ws, "session.created")
        for i in range(n + 20):  # 20 warm-up round trips
            t = time.perf_counter()
            await ws.send(json.dumps({"type": "input_audio_buffer.clear"}))
            await _until(ws, "input_audio_buffer.cleared")
            if i >= 20:
                out.append((time.perf_counter() - t) * 1000)
    return out


async def _turns(url: str, n: int) -> dict[str, list[float]]:
    out: dict[str, list[float]] = {"created": [], "first_audio": [], "done": []}
    for i in range(n + 2):  # 2 warm-up turns
        async with connect(url) as ws:
            await _until(ws, "session.created")
            for ev in TURN[:2]:
                await ws.send(json.dumps(ev))
            await _until(ws, "session.updated")
            t = time.perf_counter()
            await ws.send(json.dumps(TURN[2]))
            marks: dict[str, float] = {}
            while "done" not in marks:
                m = await ws.recv()
                if isinstance(m, bytes):
                    continue
                etype = json.loads(m)["type"]
                key = {"response.created": "created", "response.output_audio.delta": "first_audio",
                       "response.done": "done"}.get(etype)
                if key and key not in marks:
                    marks[key] = (time.perf_counter() - t) * 1000
        if i >= 2:
            for k, v in marks.items():
                out[k].append(v)
    return out


def _p(xs: list[float], q: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, int(round(q * (len(s) - 1))))]


def _row(name: str, xs: list[float]) -> str:
    return f"{name:12s} n={len(xs):4d}  median {statistics.median(xs):8.2f} ms   p95 {_p(xs, 0.95):8.2f} ms"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--events", type=int, default=300)
    ap.add_argument("--turns", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--server-file", default=None)
    ap.add_argument("--json", default=None, help="also write every sample to this file")
    args = ap.parse_args()
    module = _server_module(args.server_file)
    server, loop, thread = _start(module, Engines(EngineConfig.from_env()))
    url = f"ws://127.0.0.1:{server.port}/v1/realtime"
    every: dict[str, list[float]] = {"event_rtt": [], "created": [], "first_audio": [], "done": []}
    try:
        for r in range(args.rounds):
            rtts = asyncio.run(_event_rtts(url, args.events))
            turns = asyncio.run(_turns(url, args.turns)) if args.turns else {}
            print(f"round {r + 1}: {_row('event_rtt', rtts)}")
            every["event_rtt"] += rtts
            for k, v in turns.items():
                print(f"round {r + 1}: {_row(k, v)}")
                every[k] += v
        print(f"all rounds ({args.server_file or 'streaming/server.py'}):")
        for k, v in every.items():
            if v:
                print("  " + _row(k, v))
        if args.json:
            Path(args.json).write_text(json.dumps(every))
    finally:
        asyncio.run_coroutine_threadsafe(server.stop(), loop).result(60)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)


if __name__ == "__main__":
    main()
