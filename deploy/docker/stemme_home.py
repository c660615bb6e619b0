"""Lay out the container's STEMME_HOME from the models prepared when the image was built.

Stemme fingerprints each prepared model file by size, mtime and inode (``models/packs.py``), and when the
fingerprint does not match it hashes the file again and rewrites the marker beside it. Unpacking an image's
layers on a node gives every file a new inode, so the fingerprints recorded at build time never match in a
container: with the models read-only, the first check would fail to write its marker. At start the
entrypoint therefore makes a small writable STEMME_HOME (an emptyDir in Kubernetes) whose model files are
symbolic links into the image, and verifies every pack once there (sha256, a few seconds), which records
fresh fingerprints. Nothing of the image is written. ``derived/`` (the converted language model) and the rest
are linked whole: they are read, not written, once built.

``--prebuild HOME`` runs at build time: it writes what Stemme would otherwise derive at run time (the Piper
voice's batched graph, used when speech synthesis is batched on a GPU).
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

logger = logging.getLogger("stemme.deploy")

MARKER = ".verified.json"


def link_packs(image_home: Path, home: Path) -> list[str]:
    """Make ``home/packs/<pack>/<file>`` links to the image's pack files; return the pack names."""
    names: list[str] = []
    for src_dir in sorted((image_home / "packs").iterdir()):
        if not src_dir.is_dir():
            continue
        dst_dir = home / "packs" / src_dir.name
        dst_dir.mkdir(parents=True, exist_ok=True)
        for src in sorted(src_dir.iterdir()):
            if src.name == MARKER or src.name.endswith((".partial", ".tmp")) or not src.is_file():
                continue
            _replace_link(dst_dir / src.name, src)
        names.append(src_dir.name)
    return names


def _replace_link(link: Path, target: Path) -> None:
    if link.is_symlink() or link.exists():
        link.unlink()
    link.symlink_to(target)


def link_home(image_home: Path, home: Path) -> list[str]:
    """Link the models of ``image_home`` into ``home``: the pack files one by one (their markers are written
    beside them), everything else (``derived/``, ``downloads/``) as a whole. Return the pack names."""
    home.mkdir(parents=True, exist_ok=True)
    names = link_packs(image_home, home)
    for entry in sorted(image_home.iterdir()):
        if entry.name != "packs":
            _replace_link(home / entry.name, entry)
    return names


def verify(names: list[str], home: Path) -> None:
    """Hash every file of the packs once and record their fingerprints in ``home``."""
    from stemme.models import packs

    for name in names:
        packs.ready(name, home)


def prebuild(home: Path) -> None:
    """Write the derived files Stemme would otherwise create at run time."""
    from stemme.models import packs, tts_piper

    voice = packs.pack_dir("piper-en_US-joe-medium", home) / "en_US-joe-medium.onnx"
    if voice.is_file() and tts_piper.with_lengths(voice) is None:
        logger.warning("the Piper voice has no frame-length node; its clauses are not batched")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--link", nargs=2, metavar=("IMAGE_HOME", "HOME"), type=Path,
                   help="link the models of IMAGE_HOME into the writable HOME and verify them")
    g.add_argument("--prebuild", metavar="HOME", type=Path, help="write derived files at build time")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    t = time.perf_counter()
    if args.prebuild:
        prebuild(args.prebuild)
        return 0
    image_home, home = args.link
    if image_home.resolve() == home.resolve():
        logger.error("STEMME_HOME and the image's model directory are the same: %s", home)
        return 2
    names = link_home(image_home, home)
    verify(names, home)
    logger.info("models of %s verified in %s in %.1fs: %s", image_home, home, time.perf_counter() - t,
                ", ".join(names))
    return 0


if __name__ == "__main__":
    sys.exit(main())
