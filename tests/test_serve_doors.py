"""`stemme serve` as an operator starts it with every front door: https/wss with the self-signed certificate, and
Wyoming beside it in the same process. One subprocess, real models; SIGTERM ends both and the process exits 0."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from stemme.models.packs import stemme_home
from wyoming.client import AsyncTcpClient
from wyoming.info import Describe, Info

from tests.conftest import timeout

NAME = "stemme.lan"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ready(port: int, ctx: ssl.SSLContext) -> bool:
    """/readyz over https answers 200 (with the self-signed certificate as the only trusted one)."""
    req = urllib.request.Request(f"https://127.0.0.1:{port}/readyz", headers={"Host": f"{NAME}:{port}"})
    try:
        with urllib.request.urlopen(req, timeout=5, context=ctx) as r:
            return r.status == 200
    except OSError:  # not listening yet, or 503 while the models load
        return False


async def _describe(port: int) -> Info:
    async with AsyncTcpClient("127.0.0.1", port, read_timeout=timeout(60)) as c:
        await c.write_event(Describe().event())
        while True:
            e = await c.read_event()
            assert e is not None and e.type != "error", e
            if Info.is_type(e.type):
                return Info.from_event(e)


def _verifying_context(cert: Path) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(cert))
    ctx.check_hostname = False  # urllib connects to 127.0.0.1; the name is checked below with server_hostname
    return ctx


def test_serve_with_self_signed_tls_and_wyoming(tmp_path: Path) -> None:
    port, wport = _free_port(), _free_port()
    log = (tmp_path / "serve.log").open("w")
    proc = subprocess.Popen([sys.executable, "-m", "stemme.cli", "serve", "--port", str(port), "--no-warmup",
                             "--self-signed", "--self-signed-host", NAME, "--wyoming", f"tcp://127.0.0.1:{wport}"],
                            stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        cert = stemme_home() / "tls" / "self-signed.crt"
        deadline = time.monotonic() + timeout(300)
        while not cert.exists() and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.2)
        ctx = _verifying_context(cert)
        while not _ready(port, ctx):
            assert proc.poll() is None and time.monotonic() < deadline, (tmp_path / "serve.log").read_text()[-3000:]
            time.sleep(1)
        with socket.create_connection(("127.0.0.1", port)) as raw, \
                ssl.create_default_context(cafile=str(cert)).wrap_socket(raw, server_hostname=NAME) as tls:
            assert tls.version() in ("TLSv1.2", "TLSv1.3")  # the certificate is valid for the LAN name
        info = asyncio.run(_describe(wport))
        assert info.asr and info.tts and info.handle
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout(120)) == 0, (tmp_path / "serve.log").read_text()[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()
        log.close()
    out = (tmp_path / "serve.log").read_text()
    assert f"wss://127.0.0.1:{port}" in out and f"Wyoming on tcp://127.0.0.1:{wport}" in out
