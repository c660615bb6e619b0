"""No egress, no data at rest: the real server, in a network namespace with only loopback and under strace,
completes a voice turn; no connect() leaves loopback and no file outside STEMME_HOME holds audio or text.

Needs root (``unshare -n``), iproute2 and strace; .ci/run installs them. Runs on CI, never skipped there."""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from stemme.models import packs

from stemme.privacy import OFFLINE_ENV
from tests.conftest import SPEECH, timeout

SCRIPT = Path(__file__).parent / "egress" / "run_isolated.sh"
WAV = SPEECH / "fr" / "asterisk_conf-onlyperson.wav"

# ONNX Runtime sends no telemetry when it sees a CI service (strings in libonnxruntime.so; seen: with CI=true
# it neither writes its queue nor looks up its host). The probes and the isolated server run without these, so
# that they behave as on an operator's machine and the control can fail on CI as well.
CI_MARKERS = ("CI", "CONTINUOUS_INTEGRATION", "TF_BUILD", "GITHUB_ACTIONS", "GITLAB_CI", "CIRCLECI", "TRAVIS",
              "JENKINS_URL", "CODEBUILD_BUILD_ID", "BUILDKITE", "TEAMCITY_VERSION", "APPVEYOR",
              "BITBUCKET_BUILD_NUMBER", "SYSTEM_TEAMFOUNDATIONCOLLECTIONURI", "BUILD_ID", "RUN_ID")


def _operator_env(**extra: str) -> dict[str, str]:
    """This process's environment as an operator's machine would have it: no switch Stemme sets (the code under
    test must set them itself), no CI marker, no proxy."""
    env = {k: v for k, v in os.environ.items()
           if k not in OFFLINE_ENV and k not in CI_MARKERS and "proxy" not in k.lower()}
    env.update(extra)
    return env


_CONNECT = re.compile(r"connect\(\d+, \{sa_family=(AF_\w+)(.*?)\}")
_INET = re.compile(r'sin_addr=inet_addr\("([^"]+)"\)|inet_pton\(AF_INET6, "([^"]+)"')
_UNIX = re.compile(r'sun_path="([^"]*)"')
_OPEN_W = re.compile(r'(?:openat\(\w+, |creat\()"([^"]+)", ([A-Z_|]+)')


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


_PORT = re.compile(r"sin6?_port=htons\((\d+)\)")


def outbound_connects(log: str, *, own_ports: tuple[int, ...] = ()) -> list[str]:
    """Every connect() that may leave the machine: to an address off loopback, to a name server on any address
    (port 53, loopback included: a local resolver forwards), to a resolver daemon's socket, or, when
    ``own_ports`` is given, to any loopback port but those (a local proxy forwards too)."""
    bad = []
    for line in log.splitlines():
        m = _CONNECT.search(line)
        if not m:
            continue
        family, rest = m.groups()
        if family in ("AF_INET", "AF_INET6"):
            a, port = _INET.search(rest), _PORT.search(rest)
            addr = ipaddress.ip_address((a.group(1) or a.group(2)) if a else "0.0.0.0")
            mapped = getattr(addr, "ipv4_mapped", None)
            local = addr.is_loopback or (mapped is not None and mapped.is_loopback)
            port_n = int(port.group(1)) if port else 0
            if not local or port_n == 53 or (own_ports and port_n not in own_ports):
                bad.append(line.strip())
        elif family == "AF_UNIX":
            path = _UNIX.search(rest)
            if path and ("nscd" in path.group(1) or "resolve" in path.group(1)):
                bad.append(line.strip())  # a name lookup through a local resolver daemon
        elif family not in ("AF_NETLINK",):
            bad.append(line.strip())
    return bad


def written_files(log: str) -> set[str]:
    """Paths opened for writing or created (successfully), from the strace log."""
    out = set()
    for line in log.splitlines():
        m = _OPEN_W.search(line)
        if m and re.search(r"O_WRONLY|O_RDWR|O_CREAT", m.group(2)) and not re.search(r"= -1 ", line):
            out.add(m.group(1))
    return out


def test_outbound_connect_parser_catches_dns_and_telemetry() -> None:
    """The log parser itself: a resolver lookup and a public address are caught, loopback is not."""
    log = "\n".join([
        '12 connect(5, {sa_family=AF_INET, sin_port=htons(53), sin_addr=inet_addr("10.0.0.2")}, 16) = -1 ENETUNREACH',
        '12 connect(7, {sa_family=AF_INET, sin_port=htons(8000), sin_addr=inet_addr("127.0.0.1")}, 16) = 0',
        '12 connect(8, {sa_family=AF_INET6, sin6_port=htons(443), sin6_flowinfo=htonl(0), '
        'inet_pton(AF_INET6, "2603:1061::1", &sin6_addr), sin6_scope_id=0}, 28) = -1 ENETUNREACH',
        '12 connect(9, {sa_family=AF_UNIX, sun_path="/var/run/nscd/socket"}, 110) = -1 ENOENT',
        '12 connect(10, {sa_family=AF_INET, sin_port=htons(53), sin_addr=inet_addr("127.0.0.11")}, 16) = 0',
        '12 connect(11, {sa_family=AF_INET, sin_port=htons(3128), sin_addr=inet_addr("127.0.0.1")}, 16) = 0',
    ])
    bad = outbound_connects(log)
    assert len(bad) == 4 and "127.0.0.11" in bad[3] and "htons(8000)" not in " ".join(bad)
    strict = outbound_connects(log, own_ports=(8000,))
    assert len(strict) == 5 and "htons(3128)" in strict[4]


@pytest.fixture(scope="module")
def isolated_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    for tool in ("unshare", "strace", "ip"):
        assert shutil.which(tool), f"{tool} is needed (.ci/run installs it)"
    assert os.geteuid() == 0, "unshare -n needs root (CI runs as root)"
    out = tmp_path_factory.mktemp("egress")
    home, tmp = out / "home", out / "tmp"
    home.mkdir()
    tmp.mkdir()
    env = _operator_env(HOME=str(home), TMPDIR=str(tmp), XDG_CACHE_HOME=str(home / ".cache"),
                        STEMME_HOME=str(packs.stemme_home()), PYTHONDONTWRITEBYTECODE="1", PYTHONUNBUFFERED="1")
    port = _free_port()
    (out / "port").write_text(str(port))
    proc = subprocess.run(["unshare", "-n", "bash", str(SCRIPT), sys.executable, str(out), str(WAV),
                           str(port)], env=env, timeout=timeout(900), capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr + (out / "server.log").read_text()[-3000:]
    return out


def test_voice_turn_completes_without_network(isolated_run: Path) -> None:
    status = (isolated_run / "status").read_text()
    assert "talk=0" in status and "server=0" in status, status + (isolated_run / "talk.err").read_text()
    turns = [json.loads(x) for x in (isolated_run / "talk.jsonl").read_text().splitlines() if x.startswith("{")]
    assert turns and turns[0].get("transcript") and turns[0].get("reply"), turns


def test_no_connect_leaves_loopback(isolated_run: Path) -> None:
    log = (isolated_run / "strace.log").read_text()
    assert log.count("openat(") > 100, "the trace did not run"
    port = int((isolated_run / "port").read_text())
    assert outbound_connects(log, own_ports=(port,)) == []


def test_no_user_data_written_outside_stemme_home(isolated_run: Path) -> None:
    """Every file the server wrote outside STEMME_HOME: none may remain holding the turn's audio or text."""
    log = (isolated_run / "strace.log").read_text()
    home = str(packs.stemme_home())
    written = {p for p in written_files(log)
               if not p.startswith((home, "/dev/", "/proc/", "/sys/")) and not p.startswith(str(isolated_run) + "/")}
    turn = json.loads(next(x for x in (isolated_run / "talk.jsonl").read_text().splitlines() if x.startswith("{")))
    words = [w for w in re.findall(r"\w{5,}", f"{turn['transcript']} {turn['reply']}")][:12]
    for path in written:
        p = Path(path)
        if p.is_file():
            data = p.read_bytes()
            assert not data.startswith(b"RIFF"), f"{path} holds audio"
            text = data.decode("utf-8", "ignore")
            assert not [w for w in words if w in text], f"{path} holds the conversation's text"
    leftovers = [str(p) for p in (isolated_run / "home").rglob("*") if p.is_file()]
    leftovers += [str(p) for p in (isolated_run / "tmp").rglob("*")]
    assert leftovers == [], f"files left behind in HOME/TMPDIR: {leftovers}"


_ORT_PROBE = """
import sys, time
if sys.argv[1] == "stemme":
    import stemme  # noqa: F401 - switches telemetry off before onnxruntime loads
import numpy as np, onnxruntime as ort
from faster_whisper.utils import get_assets_path
s = ort.InferenceSession(get_assets_path() + "/silero_vad_v6.onnx", providers=["CPUExecutionProvider"])
time.sleep(float(sys.argv[2]))
"""


# The probe's own resolver settings, bind-mounted over the machine's in a private mount namespace: a name server
# off loopback, so that its lookups show the same way on any machine (a CI host may resolve through a loopback
# stub, a resolver daemon, or not at all).
_PROBE_NET = """ip link set lo up
printf 'nameserver 192.0.2.53\\n' > {d}/resolv.conf; printf 'hosts: files dns\\n' > {d}/nsswitch.conf
mount --bind {d}/resolv.conf /etc/resolv.conf && mount --bind {d}/nsswitch.conf /etc/nsswitch.conf || exit 9
"""


def _ort_probe(tmp: Path, mode: str, seconds: float, *, until_connect: bool = False) -> tuple[list[str], list[str]]:
    """ONNX Runtime alone in a namespace with only loopback, under strace, for at most ``seconds`` (or until its
    first outbound connect()): those connect() calls and the files it leaves in HOME, in an operator's
    environment (``_operator_env``)."""
    home = tmp / mode
    home.mkdir()
    env = _operator_env(HOME=str(home), PYTHONDONTWRITEBYTECODE="1")
    log = tmp / f"{mode}.log"
    cmd = _PROBE_NET.format(d=tmp) + f"exec strace -f -qq --seccomp-bpf -e trace=connect -o {log} " \
        f"{sys.executable} -c '{_ORT_PROBE}' {mode} {seconds}"
    proc = subprocess.Popen(["unshare", "-n", "-m", "bash", "-c", cmd], env=env, start_new_session=True)
    deadline = time.monotonic() + timeout(seconds + 60)
    while proc.poll() is None and time.monotonic() < deadline:
        if until_connect and log.exists() and outbound_connects(log.read_text()):
            break
        time.sleep(0.5)
    time.sleep(2 if until_connect else 0)  # its event queue is written around the first upload attempt
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)  # unshare, strace and the probe
    proc.wait(timeout(30))
    assert proc.returncode != 9, "could not give the probe its own resolver settings (mount --bind)"
    text = log.read_text() if log.exists() else ""
    return outbound_connects(text), [str(p) for p in home.rglob("*") if p.is_file()]


def test_control_onnxruntime_phones_home_without_the_switch(tmp_path: Path) -> None:
    """The check can fail: ONNX Runtime on its own writes its event queue into HOME at once, and then looks up
    its telemetry host (seen 9 s after start)."""
    connects, files = _ort_probe(tmp_path, "bare", 90, until_connect=True)
    assert any("onnxruntime.db" in f for f in files), files
    assert connects, "expected ONNX Runtime's telemetry lookups without ORT_DISABLE_TELEMETRY"


def test_importing_stemme_silences_onnxruntime(tmp_path: Path) -> None:
    connects, files = _ort_probe(tmp_path, "stemme", 25)
    assert connects == [] and files == []
