"""No egress by construction: every library Stemme loads that can phone home is told not to, before it loads.

Stemme promises that nothing leaves the building. Some of its libraries reach out by default:

- ONNX Runtime (and ONNX Runtime GenAI, which bundles it) has built-in telemetry: it looks up
  ``mobile.events.data.microsoft.com`` and queues events (process path, CPU, model and graph names) in
  ``~/.cache/Microsoft/DeveloperTools/.onnxruntime``. ``ORT_DISABLE_TELEMETRY=1`` turns it off; it is read when
  the library loads, so it must be set before the first ``import onnxruntime``.
- huggingface_hub (used by transformers, tokenizers and faster-whisper) sends telemetry and checks the hub for
  newer files unless it is offline. Stemme loads every model from a local path, so it runs fully offline.
- Others honour the general ``DO_NOT_TRACK`` convention.

``apply()`` runs when the ``stemme`` package is first imported, so it precedes every engine import in Stemme's
own processes and in programs that import Stemme before these libraries. The values are forced, not defaults:
an operator cannot switch telemetry back on by accident through an inherited environment.
"""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from pathlib import Path

OFFLINE_ENV: dict[str, str] = {
    "ORT_DISABLE_TELEMETRY": "1",
    "HF_HUB_OFFLINE": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "HF_HUB_DISABLE_IMPLICIT_TOKEN": "1",
    "HF_HUB_DISABLE_UPDATE_CHECK": "1",
    "HF_DATASETS_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "DISABLE_TELEMETRY": "1",
    "DO_NOT_TRACK": "1",
}
"""Environment switches that close every known outbound channel of Stemme's libraries."""


def apply() -> None:
    """Set the switches in this process's environment (inherited by the processes it starts)."""
    os.environ.update(OFFLINE_ENV)


def disable_loaded_telemetry() -> None:
    """Belt and braces once the engines are loaded: ONNX Runtime's own switch, where the build has it."""
    import sys

    ort = sys.modules.get("onnxruntime")
    off = getattr(ort, "disable_telemetry_events", None)
    if callable(off):
        off()


_PREFIX = "stemme-"


def private_tempdir() -> Path:
    """Give this process a temporary directory of its own and remove it at exit.

    Libraries write temporary files Stemme does not control: phonemizer copies ``libespeak-ng.so`` into a new
    ``mkdtemp()`` directory for each instance and relies on finalizers that do not run at interpreter exit.
    Every such file now lands in ``$TMPDIR/stemme-<pid>-…``, removed when the process exits; directories of
    processes that died without cleaning up (killed) are removed by the next start. Child processes inherit it
    through ``TMPDIR``."""
    base = Path(tempfile.gettempdir())
    _sweep_stale(base)
    path = Path(tempfile.mkdtemp(prefix=f"{_PREFIX}{os.getpid()}-", dir=base))
    tempfile.tempdir = str(path)
    os.environ["TMPDIR"] = str(path)
    atexit.register(shutil.rmtree, path, True)
    return path


def _sweep_stale(base: Path) -> None:
    for d in base.glob(f"{_PREFIX}*-*"):
        pid = d.name[len(_PREFIX):].split("-", 1)[0]
        if pid.isdigit() and not _alive(int(pid)) and d.is_dir():
            shutil.rmtree(d, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
