"""Two real Stemme replicas behind a real HAProxy (Debian's; `.ci/run` installs it), health-checked on `/readyz`
with HAProxy's default check (`option httpchk`, HTTP/1.0), WebSocket sessions passed through, `stemme loadtest`
through it, and one replica sent SIGTERM mid-run. Shown: the drained replica's sessions are told and reconnect,
new sessions all land on the survivor, no admitted turn is lost, and the `/metrics` of both replicas add up to
the load test's counts. The balancer's configuration is tests/haproxy/stemme.cfg (docs/deployment.md).

A few minutes on 2 cores (two servers load their models). Skip it locally with `-m "not haproxy"`; CI runs it.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import IO, Any, TypeVar

import pytest
from prometheus_client.parser import text_string_to_metric_families
from websockets.sync.client import connect

from tests.conftest import SPEECH, timeout

pytestmark = pytest.mark.haproxy

CONFIG = Path(__file__).parent / "haproxy" / "stemme.cfg"
REPLICA = Path(__file__).parent / "haproxy" / "replica.py"
"""``stemme serve``, holding its port open after its drain until the test has read its final /metrics."""
STEMME = str(Path(sys.executable).parent / "stemme")
CLIPS = ("librivox_0880.wav", "asterisk_tt-weasels.wav", "asterisk_conf-onlyperson.wav", "librivox_0930.wav")
"""Short English recordings (3-3.3 s): the devices' turns."""
SESSIONS, TURNS, PROBES = 3, 2, 2
SPEAKING_S = 1.0
"""After a turn is answered, its device starts the next one at once: this long after, it is speaking (a drain
then refuses that turn: the client is to send it again elsewhere)."""
REPLICA_ENV = {"STEMME_ASR_THREADS": "1", "STEMME_LLM_THREADS": "1", "STEMME_TTS_THREADS": "1",
               "OMP_NUM_THREADS": "1", "STEMME_LANGUAGES": "en", "STEMME_TURN_MODEL_ENABLED": "0"}
"""The smallest settings that hold a conversation: two replicas share the machine's cores; the devices speak
English with server VAD (no end-of-turn model); no warm-up (``--no-warmup``: a replica is ready once its models
are loaded, its first turn pays for the rest)."""
LOG_LINE = re.compile(r"stemme-lb accept=(?P<accept>[\d.]+) server=(?P<server>\S+) status=(?P<status>-?\d+) "
                      r"path=(?P<path>\S+)")
Metrics = dict[str, float]
T = TypeVar("T")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _get(url: str) -> tuple[int, str] | None:
    """Status and body, or None when nothing answers."""
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return int(r.status), r.read().decode()
    except urllib.error.HTTPError as e:
        return int(e.code), e.read().decode()
    except (urllib.error.URLError, OSError):
        return None


def _wait(check: Callable[[], T | None], seconds: float, what: str, every: float = 0.2) -> T:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"timed out after {seconds:.0f} s waiting for {what}")


def _parse_metrics(text: str) -> Metrics:
    """``name{label="v"}`` → value, labels sorted, for the counters and gauges the test reads."""
    out: Metrics = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(s.labels.items()))
            out[f"{s.name}{{{labels}}}" if labels else s.name] = s.value
    return out


@dataclass
class Replica:
    name: str
    port: int
    proc: subprocess.Popen
    log: Path
    release: Path
    """Created by the test once it has read the drained replica's final /metrics: then it stops."""

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def metrics(self) -> Metrics | None:
        got = _get(self.url("/metrics"))
        return _parse_metrics(got[1]) if got and got[0] == 200 else None


@dataclass
class Stack:
    replicas: list[Replica]
    lb_port: int
    stats_port: int
    haproxy: subprocess.Popen
    haproxy_log: Path
    procs: list[subprocess.Popen] = field(default_factory=list)

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.lb_port}"

    def states(self) -> dict[str, str]:
        """HAProxy's view of each replica: UP, DOWN, ... (its stats page, as CSV)."""
        got = _get(f"http://127.0.0.1:{self.stats_port}/stats;csv")
        if not got:
            return {}
        lines = got[1].splitlines()
        header = lines[0].lstrip("# ").split(",")
        rows = [dict(zip(header, line.split(","), strict=False)) for line in lines[1:] if line]
        return {r["svname"]: r["status"] for r in rows if r["pxname"] == "replicas" and r["svname"].startswith("r")}


def _start(cmd: list[str], log: Path, env: dict[str, str]) -> subprocess.Popen:
    out: IO[bytes] = open(log, "wb")  # noqa: SIM115 - the child writes it; closed with the process
    return subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env={**os.environ, **env},
                            start_new_session=True)


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[Stack]:
    haproxy = shutil.which("haproxy") or "/usr/sbin/haproxy"
    assert Path(haproxy).exists(), "HAProxy is missing: apt-get install haproxy (.ci/run installs it)"
    procs: list[subprocess.Popen] = []
    try:
        replicas = []
        for name in ("r1", "r2"):
            port = _free_port()
            release = tmp_path / f"{name}.release"
            proc = _start([sys.executable, str(REPLICA), "--port", str(port), "--no-warmup"], tmp_path / f"{name}.log",
                          {**REPLICA_ENV, "STEMME_TEST_RELEASE": str(release)})
            procs.append(proc)
            replicas.append(Replica(name, port, proc, tmp_path / f"{name}.log", release))
        for r in replicas:
            _wait(partial(_ready, r), timeout(300), f"{r.name} ready (log: {r.log})", every=1.0)
        lb, stats = _free_port(), _free_port()
        env = {"HAPROXY_BIND": f"127.0.0.1:{lb}", "HAPROXY_STATS": f"127.0.0.1:{stats}",
               **{f"HAPROXY_{r.name.upper()}": f"127.0.0.1:{r.port}" for r in replicas}}
        proxy = _start([haproxy, "-db", "-f", str(CONFIG)], tmp_path / "haproxy.log", env)
        procs.append(proxy)
        s = Stack(replicas, lb, stats, proxy, tmp_path / "haproxy.log", procs)
        _wait(lambda: s.states() == {"r1": "UP", "r2": "UP"}, timeout(30), "HAProxy to see both replicas up")
        yield s
    finally:
        for p in procs:
            _stop(p)


def _ready(r: Replica) -> bool:
    if r.proc.poll() is not None:
        raise AssertionError(f"{r.name} exited with {r.proc.returncode}:\n{r.log.read_text()[-3000:]}")
    return (_get(r.url("/readyz")) or (0, ""))[0] == 200


def _speech(tmp_path: Path) -> Path:
    d = tmp_path / "speech" / "en"
    d.mkdir(parents=True)
    for clip in CLIPS:
        shutil.copy(SPEECH / "en" / clip, d / clip)
    return d.parent


def _mid_run(replicas: list[Replica]) -> tuple[Replica, Replica, Metrics] | None:
    """Once a turn is done (every device has a turn left), the replica that answered it is the victim."""
    scrapes = [r.metrics() or {} for r in replicas]
    done = [m.get('stemme_turns_total{status="completed"}', 0) for m in scrapes]
    i = max(range(2), key=lambda k: done[k])
    if not done[i] or not scrapes[i].get("stemme_sessions_active"):
        return None
    return replicas[i], replicas[1 - i], scrapes[i]


@dataclass
class Drain:
    last: Metrics
    """The drained replica's /metrics once its sessions are gone: final (a turn needs a session)."""
    scrapes: int
    down_at: float
    """time.time() when HAProxy first showed the replica out of rotation."""


def _follow_drain(s: Stack, victim: Replica, seconds: float) -> Drain:
    """Scrape the draining replica's /metrics until its sessions are gone (it holds its port open for that,
    see REPLICA), note when HAProxy takes it out, then let it stop."""
    scrapes = 0
    down_at = 0.0
    deadline = time.monotonic() + seconds
    while True:
        assert time.monotonic() < deadline, f"{victim.name} still has sessions {seconds:.0f} s after SIGTERM"
        assert victim.proc.poll() is None, f"{victim.name} exited during its drain: {victim.log.read_text()[-3000:]}"
        if not down_at and not s.states().get(victim.name, "UP").startswith("UP"):
            down_at = time.time()
        m = victim.metrics()
        scrapes += m is not None
        if m is not None and m["stemme_sessions_active"] == 0 and m["stemme_draining"] == 1 and down_at:
            victim.release.touch()
            return Drain(m, scrapes, down_at)
        time.sleep(0.1)


def _probe(url: str) -> str:
    """A new session through the balancer: connect, see ``session.created``, leave."""
    with connect(url + "/v1/realtime", open_timeout=10) as ws:
        return str(json.loads(ws.recv(timeout=10))["type"])


def _sessions(log: Path) -> list[dict[str, Any]]:
    """HAProxy's log lines of WebSocket sessions: when accepted, which replica, the status (101: upgraded)."""
    rows = [m.groupdict() for m in map(LOG_LINE.search, log.read_text().splitlines()) if m]
    return [{**r, "accept": float(r["accept"]), "status": int(r["status"])} for r in rows
            if r["path"].startswith("/v1/realtime")]


def test_a_drained_replica_hands_its_sessions_over_and_no_turn_is_lost(stack: Stack, tmp_path: Path) -> None:
    cmd = [STEMME, "loadtest", "--url", stack.ws_url, "--sessions", str(SESSIONS), "--turns", str(TURNS),
           "--binary", "--json", "--ramp", "2", "--speech", str(_speech(tmp_path)), "--duration", str(timeout(300))]
    load = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    stack.procs.append(load)
    victim, survivor, _ = _wait(lambda: _mid_run(stack.replicas), timeout(240), "a completed turn")
    time.sleep(SPEAKING_S)
    before = victim.metrics()
    assert before is not None
    t_term = time.time()
    victim.proc.send_signal(signal.SIGTERM)
    drain = _follow_drain(stack, victim, timeout(120))
    assert victim.proc.wait(timeout(30)) == 0, victim.log.read_text()[-3000:]
    assert [_probe(stack.ws_url) for _ in range(PROBES)] == ["session.created"] * PROBES
    out, err = load.communicate(timeout=timeout(420))
    assert load.returncode == 0, err[-3000:]
    s = json.loads(out.strip().splitlines()[-1])
    after = survivor.metrics()
    assert after is not None
    stack.haproxy.send_signal(signal.SIGUSR1)  # soft stop: the log is complete
    stack.haproxy.wait(timeout(30))
    lb = _sessions(stack.haproxy_log)
    _report(s, before, drain, after, lb, t_term)
    _no_turn_lost(s)
    _told_and_reconnected(s, before, lb, t_term, victim)
    _new_sessions_on_the_survivor(lb, drain, survivor)
    _metrics_add_up(s, before, drain, after)


def _report(s: dict[str, Any], before: Metrics, drain: Drain, after: Metrics, lb: list[dict[str, Any]],
            t_term: float) -> None:
    """The figures, printed for docs/benchmarks.md (pytest -s shows them)."""
    keys = ("sessions", "turns", "completed", "retried", "failed", "lost", "reconnects", "refused_turns",
            "drain_cancelled", "session_refusals", "sessions_opened", "told_draining", "wall_s")
    print(json.dumps({"loadtest": {k: s[k] for k in keys},
                      "victim_sessions_at_sigterm": before.get("stemme_sessions_active"),
                      "victim_scrapes_while_draining": drain.scrapes,
                      "victim_sessions_at_last_scrape": drain.last.get("stemme_sessions_active"),
                      "haproxy_took_it_out_after_s": round(drain.down_at - t_term, 2),
                      "lb_sessions": len(lb), "voice_to_voice": s["stages"]["voice_to_voice"]}), flush=True)


def _no_turn_lost(s: dict[str, Any]) -> None:
    assert s["turns"] == SESSIONS * TURNS, s
    assert (s["completed"], s["failed"], s["lost"]) == (SESSIONS * TURNS, 0, 0), s


def _told_and_reconnected(s: dict[str, Any], before: Metrics, lb: list[dict[str, Any]], t_term: float,
                          victim: Replica) -> None:
    held = int(before["stemme_sessions_active"])
    assert s["told_draining"] == held >= 1, (s, held)
    assert s["reconnects"] >= held, s  # each told device had turns left: it went on on a new session
    # a reconnect that came before the balancer noticed was refused by the draining replica (1013) and retried
    late = [r for r in lb if r["accept"] >= t_term and r["server"] == victim.name]
    assert s["session_refusals"] == len(late), (s, late)


def _new_sessions_on_the_survivor(lb: list[dict[str, Any]], drain: Drain, survivor: Replica) -> None:
    new = [r for r in lb if r["accept"] >= drain.down_at]
    assert len(new) >= PROBES, new
    assert {r["server"] for r in new} == {survivor.name}, new
    assert all(r["status"] == 101 for r in new), new


def _metrics_add_up(s: dict[str, Any], before: Metrics, drain: Drain, after: Metrics) -> None:
    last = drain.last
    assert last["stemme_draining"] == 1 and last["stemme_ready"] == 0, last

    def total(key: str) -> float:
        return last.get(key, 0) + after.get(key, 0)

    assert last["stemme_sessions_total"] == before["stemme_sessions_total"], (before, last)
    assert total('stemme_turns_total{status="completed"}') == s["completed"], (last, after, s)
    assert total('stemme_turns_total{status="refused_draining"}') == s["refused_turns"], (last, after, s)
    assert total('stemme_turns_total{status="cancelled"}') == s["split_utterances"] + s["drain_cancelled"], s
    assert total("stemme_sessions_total") == s["sessions_opened"] + PROBES, (last, after, s)
