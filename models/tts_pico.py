"""SVOX Pico through ``pico2wave`` (Debian's libttspico-utils, non-free): used only where the operator installed
it. Pico writes a WAV file, so each clause goes through a private temporary file that is removed at once."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile

from stemme.voice.audio import Audio, read_wav
from stemme.voice.tts import Voice

from stemme.errors import ModelLoadError


class PicoEngine:
    name = "pico"

    def __init__(self, binary: str = "pico2wave") -> None:
        self.binary = binary

    def available(self, voice: Voice) -> bool:
        return shutil.which(self.binary) is not None

    def synthesize(self, text: str, voice: Voice, speed: float = 1.0) -> Audio:
        exe = shutil.which(self.binary)
        if exe is None:
            raise ModelLoadError(f"{self.binary} is not installed (Debian: libttspico-utils)")
        tmpdir = "/dev/shm" if os.path.isdir("/dev/shm") else None
        fd, path = tempfile.mkstemp(suffix=".wav", dir=tmpdir)
        os.close(fd)
        try:
            proc = subprocess.run([exe, "-l", voice.phonemes or "en-US", "-w", path, text], capture_output=True,
                                  timeout=60, check=False)
            if proc.returncode != 0:
                raise ModelLoadError(f"{self.binary} failed: {proc.stderr.decode(errors='replace').strip()}")
            return read_wav(path, rate=None)
        finally:
            os.unlink(path)
