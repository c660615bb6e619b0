"""The load tester against a real server: simulated devices stream recorded speech, and the report counts
their replies and gives per-stage percentiles. The server micro-batches ASR here (as it does on a GPU) so that
two devices speaking at once are transcribed in one batch."""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import shutil
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from stemme.clients import loadtest, talk
from stemme.clients.talk import SHUTTING_DOWN, Backoff, ReconnectingClient
from stemme.voice.audio import Audio, write_wav
from stemme.voice.batching import BatchingOptions
from stemme.voice.pipeline import StageOptions, Stages
from websockets.asyncio.server import ServerConnection, serve

from tests.conftest import SPEECH, timeout
from tests.test_server import ServerThread


def _args(url: str, speech: Path, plot: Path | None, **kw) -> argparse.Namespace:
    base = dict(url=url, key=None, sessions="2", turns=1, speech=str(speech), ramp=0.0, duration=timeout(150),
                binary=True, interrupt=0.0, seed=1, json=True, plot=str(plot) if plot else None, languages="per-device")
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


# -- Reconnection, against a fake server (no models): the logic only; tests/test_haproxy.py is the real proof --
@dataclass
class FakePlan:
    """What one connection to the fake does: ``serve`` turns; ``refuse`` the session (error
    ``server_shutting_down``, close 1013); or serve ``turns`` turns, then drain at the next one: ``drain`` refuses
    it, ``cancel`` cancels its answer for shutdown (both then close 1001), ``close1008`` closes with 1008."""

    mode: str = "serve"
    turns: int = 0


@dataclass
class FakeDrainingServer:
    """A fake Realtime server: answers a turn once it has received 0.3 s of audio, and drains as planned (the
    last plan repeats). It counts what a real server's /metrics would."""

    plans: list[FakePlan]
    connections: int = 0
    sessions: int = 0
    refused_sessions: int = 0
    completed: int = 0
    refused_turns: int = 0
    cancelled: int = 0
    refused_at: list[float] = field(default_factory=list)
    opened_at: list[float] = field(default_factory=list)
    told: list[list[tuple[str, str]]] = field(default_factory=list)
    """Per session: the conversation items the client created (role, text)."""

    async def handler(self, ws: ServerConnection) -> None:
        plan = self.plans[min(self.connections, len(self.plans) - 1)]
        self.connections += 1
        if plan.mode == "refuse":
            self.refused_sessions += 1
            self.refused_at.append(time.monotonic())
            await ws.send(_fake_error(SHUTTING_DOWN))
            await ws.close(1013, "server shutting down")
            return
        self.sessions += 1
        self.opened_at.append(time.monotonic())
        await ws.send(json.dumps({"type": "session.created", "session": {}}))
        told: list[tuple[str, str]] = []
        self.told.append(told)
        heard = turns = 0
        async for m in ws:
            ev = json.loads(m) if isinstance(m, str) else {"type": "input_audio_buffer.append", "pcm": m}
            if ev["type"] == "session.update":
                await ws.send(json.dumps({"type": "session.updated", "session": {}}))
                continue
            if ev["type"] == "conversation.item.create":
                told.append((ev["item"]["role"], ev["item"]["content"][0]["text"]))
                await ws.send(json.dumps({"type": "conversation.item.added", "item": ev["item"]}))
                continue
            heard += len(ev.get("pcm") or base64.b64decode(ev.get("audio", ""))) // 2
            if heard < 4800:
                continue
            heard = 0
            if plan.mode == "serve" or turns < plan.turns:
                await self._answer(ws, "completed")
                turns += 1
                continue
            await ws.send(json.dumps({"type": "stemme.draining", "event_id": "event_1", "grace_ms": 1000}))
            if plan.mode == "close1008":
                await ws.close(1008, "policy")
                return
            if plan.mode == "drain":
                self.refused_turns += 1
                await ws.send(_fake_error(SHUTTING_DOWN))
            else:
                self.cancelled += 1
                await self._answer(ws, "cancelled")
            await asyncio.sleep(0.05)
            await ws.close(1001, "server shutting down")
            return

    async def _answer(self, ws: ServerConnection, status: str) -> None:
        await ws.send(json.dumps({"type": "conversation.item.input_audio_transcription.completed", "transcript": "hi"}))
        await ws.send(json.dumps({"type": "response.created", "response": {}}))
        response: dict = {"status": status}
        if status == "completed":
            self.completed += 1
            await ws.send(json.dumps({"type": "response.output_audio.delta",
                                      "delta": base64.b64encode(b"\0\0" * 2400).decode()}))
            await ws.send(json.dumps({"type": "response.output_audio_transcript.done", "transcript": "Hello."}))
        else:
            response["status_details"] = {"type": "cancelled", "reason": SHUTTING_DOWN}
        await ws.send(json.dumps({"type": "response.done", "response": response,
                                  "stemme": {"latency": {"voice_to_voice_ms": 100}}}))


def _fake_error(code: str) -> str:
    return json.dumps({"type": "error", "event_id": "event_2",
                       "error": {"type": "server_error", "code": code, "message": "draining"}})


@asynccontextmanager
async def _fake(*plans: FakePlan) -> AsyncIterator[tuple[FakeDrainingServer, str]]:
    fake = FakeDrainingServer(list(plans))
    async with serve(fake.handler, "127.0.0.1", 0) as server:
        port = next(iter(server.sockets)).getsockname()[1]
        yield fake, f"ws://127.0.0.1:{port}"


SPEECH_S = np.random.default_rng(1).uniform(-0.3, 0.3, 6400).astype(np.float32)
"""0.4 s of noise: the fake answers after 0.3 s of audio, whatever it is."""


async def test_fake_a_refused_turn_is_sent_again_on_a_new_session_after_backoff():
    async with _fake(FakePlan("drain", turns=1), FakePlan("refuse"), FakePlan("serve")) as (fake, url):
        async with ReconnectingClient(url) as rc:
            rows = [await rc.talk(SPEECH_S, timeout=10) for _ in range(3)]
        assert [r.status for r in rows] == ["completed"] * 3, [(r.status, r.reason) for r in rows]
        assert [(r.attempts, r.reconnects, r.refused) for r in rows] == [(1, 0, 0), (2, 1, 1), (1, 0, 0)]
        assert (rc.sessions, rc.refusals, rc.reconnects, rc.told_draining) == (2, 1, 1, 1)
        assert (fake.connections, fake.completed, fake.refused_turns) == (3, 3, 1)
        # the new session was told the conversation so far (the first turn) before the turn was sent again
        assert fake.told == [[], [("user", "hi"), ("assistant", "Hello.")]] and rc.replayed == 2
        # backoff: 0.2 s before the first try (refused), 0.4 s before the second
        assert fake.refused_at[0] - fake.opened_at[0] >= 0.2
        assert fake.opened_at[1] - fake.refused_at[0] >= 0.4


async def test_fake_an_answer_cancelled_for_shutdown_is_asked_again():
    async with _fake(FakePlan("cancel", turns=0), FakePlan("serve")) as (fake, url):
        async with ReconnectingClient(url, backoff=Backoff(first=0.01)) as rc:
            r = await rc.talk(SPEECH_S, timeout=10)
        assert (r.status, r.attempts, r.reconnects, r.drain_cancelled) == ("completed", 2, 1, 1)
        assert (fake.cancelled, fake.completed) == (1, 1)


async def test_fake_a_turn_fails_with_its_reason_when_every_retry_is_refused():
    async with _fake(FakePlan("drain", turns=0), FakePlan("refuse")) as (fake, url):
        async with ReconnectingClient(url, backoff=Backoff(first=0.01, most=0.02, tries=3)) as rc:
            r = await rc.talk(SPEECH_S, timeout=10)
        assert r.status == "failed" and "no session after 3 tries: server_shutting_down" in r.reason, r.reason
        assert (r.refused, fake.refused_sessions, fake.completed) == (1, 3, 0)


async def test_fake_a_close_that_is_no_drain_fails_the_turn_and_ends_the_device():
    async with _fake(FakePlan("close1008", turns=1), FakePlan("serve")) as (fake, url):
        async with ReconnectingClient(url, backoff=Backoff(first=0.01)) as rc:
            rows = [await rc.talk(SPEECH_S, timeout=10) for _ in range(3)]
        assert [(r.status, r.reason) for r in rows] == [("completed", ""), ("closed", "connection closed (1008)"),
                                                        ("failed", "connection closed (1008)")]
        assert fake.connections == 1  # 1008 is no invitation to reconnect


async def test_fake_loadtest_counts_completed_retried_and_reconnects_like_the_servers(tmp_path):
    speech = tmp_path / "speech" / "xx"
    speech.mkdir(parents=True)
    write_wav(speech / "noise.wav", Audio(SPEECH_S, 16000))
    plans = (FakePlan("drain", turns=1), FakePlan("serve"), FakePlan("refuse"), FakePlan("serve"))
    async with _fake(*plans) as (fake, url):
        args = _args(url, speech.parent, None, turns=3, binary=False, duration=60)
        [s] = await loadtest.run(args)
    assert (s["turns"], s["completed"], s["failed"], s["lost"], s["dropped"]) == (6, 6, 0, 0, 0), s
    assert (s["retried"], s["reconnects"], s["session_refusals"], s["told_draining"]) == (1, 1, 1, 1), s
    # what the client counted is what the server counted
    assert s["completed"] == fake.completed and s["refused_turns"] == fake.refused_turns == 1
    assert s["sessions_opened"] == fake.sessions == 3


def test_loadtest_reports_a_turn_cut_short_as_lost():
    rows = [{"device": 0, "turn": 0, "status": "completed", "attempts": 2, "reconnects": 1},
            {"device": 0, "turn": 1, "status": "in_progress"},
            {"device": 1, "turn": 0, "status": "failed", "reason": "no session after 10 tries: HTTP 503"},
            {"device": 0, "turn": -1, "status": "device", "sessions": 2, "reconnects": 1}]
    s = loadtest.summarise(rows, 2, 1.0)
    assert (s["completed"], s["retried"], s["lost"], s["failed"], s["dropped"]) == (1, 1, 1, 1, 2)
    assert s["failures"] == {"no session after 10 tries: HTTP 503": 1}
    assert (s["sessions_opened"], s["reconnects"]) == (2, 1)


async def test_fake_talk_prints_attempts_and_reconnects_per_turn(tmp_path, capsys):
    wav = tmp_path / "a.wav"
    write_wav(wav, Audio(SPEECH_S, 16000))
    args = argparse.Namespace(key=None, out=None, binary=False, language=None, voice=None, fast=False, verbose=False,
                              files=[wav, wav, wav], reconnect_tries=10)
    async with _fake(FakePlan("drain", turns=1), FakePlan("serve")) as (fake, url):
        args.url = url
        code = await talk._talk_main(args)
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert code == 0
    assert [(r["status"], r["attempts"], r["reconnects"]) for r in rows] == [("completed", 1, 0), ("completed", 2, 1),
                                                                            ("completed", 1, 0)]
    assert fake.refused_turns == 1 and "reason" not in rows[1]
