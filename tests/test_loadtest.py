"""The load tester against a real server: simulated devices stream recorded speech, and the report counts
their replies and gives per-stage percentiles. The server micro-batches ASR here (as it does on a GPU) so that
two devices speaking at once are transcribed in one batch."""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
from pathlib import Path

from stemme.clients import loadtest
from stemme.voice.batching import BatchingOptions
from stemme.voice.pipeline import StageOptions, Stages

from tests.conftest import SPEECH, timeout
from tests.test_server import ServerThread


def _args(url: str, speech: Path, plot: Path, **kw) -> argparse.Namespace:
    base = dict(url=url, key=None, sessions="2", turns=1, speech=str(speech), ramp=0.0, duration=timeout(150),
                binary=True, interrupt=0.0, seed=1, json=True, plot=str(plot), languages="per-device")
    base.update(kw)
    return argparse.Namespace(**base)


def test_loadtest_reports_two_concurrent_devices_whose_asr_is_batched(engines, tmp_path, capsys):
    speech = tmp_path / "speech"
    speech.mkdir()
    shutil.copy(SPEECH / "en" / "librivox_0880.wav", speech / "a.wav")  # both devices speak the same clip
    stages = Stages(StageOptions(asr_batching=BatchingOptions(max_batch=4, window=timeout(0.4))))
    s = ServerThread(engines, stages=stages)
    try:
        [summary] = asyncio.run(loadtest.run(_args(s.url, speech, tmp_path / "plot.png")))
        printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
        assert printed == summary
        assert summary["sessions"] == 2 and summary["turns"] == 2
        assert summary["completed"] == 2 and summary["replies"] == 2, summary
        assert summary["errors"] == 0 and summary["dropped"] == 0
        v2v = summary["stages"]["voice_to_voice"]
        assert v2v["n"] == 2 and 0 < v2v["p50"] <= v2v["p95"] <= v2v["p99"]
        assert (tmp_path / "plot.png").stat().st_size > 1000
        # the two final transcriptions (and any speculative ones at a pause) ran in fewer batches than requests
        assert stages.asr.items >= 2 and stages.asr.batches < stages.asr.items, (stages.asr.batches,
                                                                                 stages.asr.items)
        body = s.server.metrics.render().decode()
        assert 'stemme_batch_size_bucket{le="2.0",stage="asr"}' in body
    finally:
        s.stop()
