"""The `stemme` command as a user runs it (subprocesses, real models)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import soundfile as sf

from tests.conftest import SPEECH


def run(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "stemme.cli", *args], capture_output=True, text=True,
                          timeout=timeout)


def test_models_lists_packs_as_json():
    p = run("models", "--json")
    assert p.returncode == 0, p.stderr
    rows = [json.loads(line) for line in p.stdout.splitlines()]
    names = {r["name"]: r for r in rows}
    assert names["whisper-base"]["state"] == "ready"
    assert names["qwen2.5-coder-0.5b"]["state"] == "ready"


def test_transcribe_prints_one_json_line_per_file():
    files = [SPEECH / "en" / "jfk.wav", SPEECH / "it" / "asterisk_tt-weasels.wav"]
    p = run("transcribe", *map(str, files))
    assert p.returncode == 0, p.stderr
    rows = [json.loads(line) for line in p.stdout.splitlines()]
    assert [r["path"] for r in rows] == [str(f) for f in files]
    assert set(rows[0]) == {"path", "text", "language", "language_probability", "seconds"}
    assert rows[0]["language"] == "en" and "country" in rows[0]["text"].lower()
    assert rows[1]["language"] == "it" and "donnole" in rows[1]["text"].lower()
    forced = json.loads(run("transcribe", str(files[0]), "--language", "en").stdout)
    assert forced["language_probability"] == 1.0


def test_say_writes_speech(tmp_path: Path):
    out = tmp_path / "hola.wav"
    p = run("say", "Hola, ¿cómo estás?", "--lang", "es", "-o", str(out))
    assert p.returncode == 0, p.stderr
    data, rate = sf.read(out)
    assert rate == 24000 and len(data) / rate > 0.6
    assert json.loads(p.stdout)["voice"].startswith("kokoro:")


def test_voices_lists_each_language():
    p = run("voices", "--json")
    assert p.returncode == 0, p.stderr
    rows = [json.loads(line) for line in p.stdout.splitlines()]
    defaults = {r["language"]: r["name"] for r in rows if r["default"]}
    assert set(defaults) >= {"en", "fr", "de", "es", "it", "pt", "nl", "pl"}
    assert defaults["en"] == "piper:en_US-joe-medium"


def test_chat_streams_an_answer():
    p = run("chat", "What is two plus two? Answer with a number.", "--lang", "en", "--max-tokens", "20")
    assert p.returncode == 0, p.stderr
    assert "4" in p.stdout or "four" in p.stdout.lower()


def test_failures_exit_non_zero_with_one_line(tmp_path: Path):
    p = run("transcribe", str(tmp_path / "missing.wav"))
    assert p.returncode == 1
    assert len(p.stderr.strip().splitlines()) == 1 and "missing.wav" in p.stderr
    p = run("say", "hello", "--lang", "xx", "-o", str(tmp_path / "x.wav"))
    assert p.returncode == 1 and "no voice" in p.stderr and "Traceback" not in p.stderr
