"""The page over https from a LAN name, as a user on another machine would reach it: `stemme serve --self-signed`'s
certificate, Chromium resolving the name to this machine (--host-resolver-rules) and accepting the certificate
(--ignore-certificate-errors). Browsers give the microphone only to secure contexts, so this is what makes the page
usable off localhost. A full voice turn must work; the origin check lets the page's own origin in."""

from __future__ import annotations

from pathlib import Path

import pytest

from stemme import tls
from tests.test_browser import ARTIFACTS, CHROMIUM, _mic_file, _wait
from tests.test_server import ServerThread

NAME = "stemme.lan"

pytestmark = pytest.mark.skipif(not Path(CHROMIUM).exists(),
                                reason="Debian chromium is not installed (.ci/run installs it)")


def _https_browser(p, tmp: Path, mic: Path):
    args = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
            "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-quic",
            f"--host-resolver-rules=MAP {NAME} 127.0.0.1", "--ignore-certificate-errors",
            "--use-fake-ui-for-media-stream", "--use-fake-device-for-media-stream",
            f"--use-file-for-fake-audio-capture={mic}%noloop", "--autoplay-policy=no-user-gesture-required"]
    profile = tmp / "profile"
    profile.mkdir()
    return p.chromium.launch_persistent_context(str(profile), executable_path=CHROMIUM, headless=True, args=args,
                                                viewport={"width": 420, "height": 900}, bypass_csp=True)


def test_page_over_https_from_a_lan_name_completes_a_voice_turn(engines, tmp_path: Path) -> None:
    from playwright.sync_api import sync_playwright

    files = tls.self_signed(tmp_path / "home", [NAME])
    server = ServerThread(engines, ssl_certfile=str(files.certfile), ssl_keyfile=str(files.keyfile))
    mic = _mic_file(tmp_path, "mic.wav", "en/asterisk_tt-weasels.wav", 1.0, 12.0)
    try:
        with sync_playwright() as p:
            ctx = _https_browser(p, tmp_path, mic)
            try:
                page = ctx.new_page()
                page.goto(f"https://{NAME}:{server.server.port}/")
                assert page.evaluate("window.isSecureContext && !!navigator.mediaDevices")
                _wait(page, "window.stemmeStats && window.stemmeStats.state === 'ready'", 30)
                page.get_by_role("button", name="Start microphone").click()
                _wait(page, "window.stemmeStats.transcript.length > 0", 90)
                _wait(page, "window.stemmeStats.played > 24000 * 0.5", 90)
                ARTIFACTS.mkdir(exist_ok=True)
                page.screenshot(path=str(ARTIFACTS / "browser-https-lan.png"), full_page=True)
                stats = page.evaluate("window.stemmeStats")
                assert "weasel" in stats["transcript"].lower()
                assert stats["reply"].strip()
                assert stats["audioIn"] > 16000
            finally:
                ctx.close()
    finally:
        server.stop()
