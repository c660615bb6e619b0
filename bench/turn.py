"""End of turn: server_vad (a fixed silence) against semantic_vad with the Smart Turn model, on the recorded
utterances of tests/data/speech (isolated words left out; each is one complete turn, followed here by 2 s of
silence), streamed through the real VAD in 20 ms chunks.

For each setting: how long after the last voiced frame the turn ended (median / p95), how many utterances
were cut before their end (the turn ended at a pause inside the sentence), and the model's time per decision.

    python bench/turn.py [--eagerness auto,high,low]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import SPEECH, machine, manifest, pct  # noqa: E402


def run(clips, opts, end_of_turn=None) -> tuple[list[float], int]:  # noqa: ANN001
    from stemme.models.silero_vad import SileroVad
    from stemme.voice.vad import SpeechStopped, VadStream

    vad_model = SileroVad()
    delays, cut = [], 0
    for audio in clips:
        stream = VadStream(vad_model, opts, end_of_turn)
        x = np.concatenate([audio, np.zeros(32000, np.float32)])
        stops = []
        for i in range(0, len(x), 320):
            for ev in stream.feed(x[i:i + 320]):
                if isinstance(ev, SpeechStopped):
                    stops.append((ev, i + 320))
        if not stops:
            continue
        if len(stops) > 1:
            cut += 1
        ev, at = stops[-1]
        delays.append((at - ev.audio_end_ms * 16) / 16)  # ms of audio after the last voiced frame
    return delays, cut


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--eagerness", default="auto,high,low")
    a = ap.parse_args()
    from stemme.models.smart_turn import SmartTurn
    from stemme.streaming.protocol import TurnDetection
    from stemme.voice.audio import read_wav
    from stemme.voice.vad import VadOptions

    rows = [r for r in manifest() if r["kind"] != "isolated word"]
    clips = [read_wav(SPEECH / r["path"]).samples for r in rows]
    model = SmartTurn()
    times: list[float] = []

    def timed(audio: np.ndarray) -> float:
        t = time.perf_counter()
        p = model.probability(audio)
        times.append(time.perf_counter() - t)
        return p

    print(f"machine: {machine()}\n{len(clips)} sentences ({', '.join(sorted({r['language'] for r in rows}))})")
    print(f"{'setting':34} {'end of turn med/p95 ms':>24} {'cut early':>10}")
    delays, cut = run(clips, VadOptions(silence_duration_ms=500))
    print(f"{'server_vad, silence 500 ms':34} {statistics.median(delays):>11.0f}/{pct(delays, 0.95):<12.0f} "
          f"{cut:>10}")
    for eagerness in a.eagerness.split(","):
        td = TurnDetection(type="semantic_vad", eagerness=eagerness)
        silence, threshold = td.semantic()
        delays, cut = run(clips, VadOptions(silence_duration_ms=silence, complete_threshold=threshold), timed)
        name = f"semantic_vad {eagerness} (p>={threshold}, {silence} ms)"
        print(f"{name:34} {statistics.median(delays):>11.0f}/{pct(delays, 0.95):<12.0f} {cut:>10}")
    print(f"end-of-turn model: {statistics.median(times) * 1000:.0f} ms per decision (p95 "
          f"{pct(times, 0.95) * 1000:.0f} ms, n={len(times)})")


if __name__ == "__main__":
    main()
