"""The browser page in real headless Chromium (Debian's /usr/bin/chromium driven by Playwright), with a fake
microphone that plays a recorded WAV. Screenshots land in artifacts/ (a CI artefact)."""

from __future__ import annotations

import contextlib
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
from stemme.voice.audio import Audio, read_wav, write_wav

from tests.conftest import SPEECH, timeout
from tests.test_server import ServerThread

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
ARTIFACTS = Path(__file__).resolve().parent.parent / "artifacts"

pytestmark = pytest.mark.skipif(not Path(CHROMIUM).exists() and not shutil.which("chromium"),
                                reason="Debian chromium is not installed (.ci/run installs it)")


@pytest.fixture(scope="module")
def server(engines):
    s = ServerThread(engines)
    yield s
    s.stop()


def _mic_file(tmp: Path, name: str, speech: str, before: float, after: float) -> Path:
    a = read_wav(SPEECH / speech, rate=48000)
    x = np.concatenate([np.zeros(int(before * 48000), np.float32), a.samples,
                        np.zeros(int(after * 48000), np.float32)])
    path = tmp / name
    write_wav(path, Audio(x, 48000))
    return path


def _browser(playwright, tmp: Path, mic: Path):
    args = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
            "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-quic",
            "--use-fake-ui-for-media-stream", "--use-fake-device-for-media-stream",
            f"--use-file-for-fake-audio-capture={mic}%noloop", "--autoplay-policy=no-user-gesture-required"]
    profile = tmp / "profile"
    profile.mkdir()
    return playwright.chromium.launch_persistent_context(str(profile), executable_path=CHROMIUM, headless=True,
                                                         args=args, viewport={"width": 420, "height": 900},
                                                         bypass_csp=True)


def _wait(page, expr: str, seconds: float) -> None:
    try:
        page.wait_for_function(expr, timeout=timeout(seconds) * 1000)
    except Exception as e:  # noqa: BLE001 - add what the page saw
        stats = page.evaluate("JSON.stringify(window.stemmeStats)")
        raise AssertionError(f"timed out waiting for {expr}; page stats: {stats[:3000]}") from e


@contextlib.contextmanager
def _page_with_mic(server, tmp_path: Path, speech: str, before: float, after: float, start_mic: bool = True):
    """A fresh Chromium whose microphone plays ``speech`` after ``before`` s of silence (counted from the
    click on "Start microphone"); the page is connected and, with ``start_mic``, the microphone started."""
    from playwright.sync_api import sync_playwright

    mic = _mic_file(tmp_path, "mic.wav", speech, before, after)
    with sync_playwright() as p:
        ctx = _browser(p, tmp_path, mic)
        try:
            page = ctx.new_page()
            page.goto(server.url.replace("ws://", "http://") + "/")
            _wait(page, "window.stemmeStats && window.stemmeStats.state === 'ready'", 30)
            if start_mic:
                page.get_by_role("button", name="Start microphone").click()
            yield page
        finally:
            ctx.close()


def test_page_talks_through_a_fake_microphone(server, tmp_path):
    with _page_with_mic(server, tmp_path, "en/asterisk_tt-weasels.wav", 1.0, 12.0) as page:
        _wait(page, "window.stemmeStats.voices > 0", 30)  # the voice list loads beside the connection
        assert page.locator("#language option").count() >= 9  # auto + eight languages
        _wait(page, "window.stemmeStats.transcript.length > 0", 60)
        _wait(page, "window.stemmeStats.reply.length > 0", 60)
        _wait(page, "window.stemmeStats.played > 24000 * 0.5", 60)
        ARTIFACTS.mkdir(exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / "browser-conversation.png"), full_page=True)
        _wait(page, "window.stemmeStats.latency !== null", 60)
        stats = page.evaluate("window.stemmeStats")
        assert "weasel" in stats["transcript"].lower()
        assert stats["language"] == "en"
        assert page.locator("#user-text").inner_text().lower().find("weasel") >= 0
        assert page.locator("#reply-text").inner_text().strip()
        assert stats["latency"]["voice_to_voice_ms"] > 0
        assert "ms" in page.locator("td[data-key=voice_to_voice_ms]").inner_text()
        assert stats["audioIn"] > 16000  # the page streamed microphone audio


def test_page_interrupts_the_answer(server, tmp_path):
    # the user starts speaking (0.3 s after the microphone starts) while the typed question's answer plays
    with _page_with_mic(server, tmp_path, "en/asterisk_conf-onlyperson.wav", 0.3, 10.0, start_mic=False) as page:
        page.get_by_label("Type instead of speaking").fill("Tell me a long story about a dragon and a knight.")
        page.keyboard.press("Enter")
        _wait(page, "window.stemmeStats.played > 12000", 60)  # the answer is playing
        page.get_by_role("button", name="Start microphone").click()
        _wait(page, "window.stemmeStats.cleared >= 1", 60)  # the user spoke over it
        t = time.monotonic()
        stats = page.evaluate("window.stemmeStats")
        assert stats["responses"] == 1 and "output_audio_buffer.cleared" in stats["events"], stats["events"]
        # playback stopped at once: buffered audio dropped, nothing more plays of the old answer until the
        # next answer (the barge-in's own turn) starts
        page.wait_for_timeout(300)
        before = page.evaluate("[window.stemmeStats.played, window.stemmeStats.responses]")
        page.wait_for_timeout(700)
        after = page.evaluate("[window.stemmeStats.played, window.stemmeStats.responses]")
        assert after[0] == before[0] or after[1] > 1, (before, after)
        assert page.evaluate("window.stemmeStats.stale") == 0 or after[1] > 1
        _wait(page, "window.stemmeStats.transcript.toLowerCase().includes('conference')", 60)
        ARTIFACTS.mkdir(exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / "browser-interrupted.png"), full_page=True)
        assert time.monotonic() - t < timeout(120)


def _plain_browser(p, tmp_path: Path, *, mic: bool):
    args = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
            "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-quic"]
    if mic:
        args += ["--use-fake-ui-for-media-stream", "--use-fake-device-for-media-stream"]
    profile = tmp_path / "profile-plain"
    profile.mkdir()
    return p.chromium.launch_persistent_context(str(profile), executable_path=CHROMIUM, headless=True, args=args,
                                                bypass_csp=True)


def test_page_explains_a_refused_key_and_connects_with_the_right_one(engines, tmp_path):
    from playwright.sync_api import sync_playwright

    s = ServerThread(engines, api_key="letmein")
    try:
        with sync_playwright() as p:
            ctx = _plain_browser(p, tmp_path, mic=False)
            page = ctx.new_page()
            page.goto(s.url.replace("ws://", "http://") + "/")
            _wait(page, "window.stemmeStats.state === 'error'", 30)
            assert "API key" in page.locator("#message").inner_text()
            assert page.locator("#key").is_visible()
            page.get_by_label("API key").fill("letmein")
            page.get_by_role("button", name="Connect").click()
            _wait(page, "window.stemmeStats.state === 'ready'", 30)
            ctx.close()
    finally:
        s.stop()


def test_page_explains_a_denied_microphone_and_an_unreachable_server(server, tmp_path):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        ctx = _plain_browser(p, tmp_path, mic=False)  # no fake UI: the permission prompt is denied
        page = ctx.new_page()
        page.goto(server.url.replace("ws://", "http://") + "/")
        _wait(page, "window.stemmeStats.state === 'ready'", 30)
        page.get_by_role("button", name="Start microphone").click()
        _wait(page, "document.getElementById('message').textContent.includes('icrophone')", 30)
        assert page.get_by_role("button", name="Start microphone").is_visible()
        ctx.close()


def test_page_explains_an_unreachable_server(tmp_path):
    """The page's files are served (by Playwright) from an address where no Stemme server listens."""
    from playwright.sync_api import sync_playwright
    from stemme.streaming.server import WEB_DIR

    def fulfil(route) -> None:
        path = route.request.url.split("127.0.0.1:9", 1)[1].split("?")[0]
        if path == "/":
            route.fulfill(path=str(WEB_DIR / "index.html"), content_type="text/html")
        elif path.startswith("/static/"):
            ctype = "text/css" if path.endswith(".css") else "text/javascript"
            route.fulfill(path=str(WEB_DIR / path[len("/static/"):]), content_type=ctype)
        else:
            route.fulfill(status=404, body="")

    with sync_playwright() as p:
        ctx = _plain_browser(p, tmp_path, mic=False)
        page = ctx.new_page()
        page.route("http://127.0.0.1:9/**", fulfil)
        page.goto("http://127.0.0.1:9/")
        _wait(page, "window.stemmeStats.state === 'error'", 30)
        assert "Cannot reach the Stemme server" in page.locator("#message").inner_text()
        assert page.locator("#state").inner_text() == "Server unreachable"
        ctx.close()
