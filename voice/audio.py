"""Audio values and conversions. Inside Stemme audio is float32 mono in [-1, 1] with its rate beside it;
the edges convert once: PCM16 / G.711 in, PCM16 out. Resampling uses soxr (no hand-rolled filters)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile as sf
import soxr

from stemme.errors import AudioFormatError

ASR_RATE = 16000
"""Hertz: what the VAD and the ASR engine take."""
OUTPUT_RATE = 24000
"""Hertz: what the server sends to clients (PCM16)."""


@dataclass(frozen=True)
class Audio:
    """A piece of mono audio."""

    samples: np.ndarray
    """float32, mono, in [-1, 1]."""
    rate: int
    """Hertz."""

    @property
    def seconds(self) -> float:
        return len(self.samples) / self.rate if self.rate else 0.0

    def to(self, rate: int) -> Audio:
        return Audio(resample(self.samples, self.rate, rate), rate)


def resample(samples: np.ndarray, src_rate: int, dst_rate: int) -> np.ndarray:
    if src_rate == dst_rate or len(samples) == 0:
        return np.asarray(samples, dtype=np.float32)
    return soxr.resample(np.asarray(samples, dtype=np.float32), src_rate, dst_rate, quality="HQ").astype(np.float32)


class StreamResampler:
    """Resamples a stream chunk by chunk without clicks at chunk borders (soxr keeps the filter state)."""

    def __init__(self, src_rate: int, dst_rate: int) -> None:
        self.src_rate = src_rate
        self.dst_rate = dst_rate
        self._rs = None if src_rate == dst_rate else soxr.ResampleStream(src_rate, dst_rate, 1, dtype="float32")

    def __call__(self, samples: np.ndarray, last: bool = False) -> np.ndarray:
        x = np.asarray(samples, dtype=np.float32)
        if self._rs is None:
            return x
        return self._rs.resample_chunk(x, last=last)


def pcm16_to_float(data: bytes) -> np.ndarray:
    if len(data) % 2:
        raise AudioFormatError(f"PCM16 audio must have an even number of bytes, got {len(data)}")
    return np.frombuffer(data, dtype="<i2").astype(np.float32) / 32768.0


def float_to_pcm16(samples: np.ndarray) -> bytes:
    x = np.clip(np.asarray(samples, dtype=np.float32), -1.0, 32767 / 32768)
    return (x * 32768.0).round().astype("<i2").tobytes()


def _g711_tables() -> tuple[np.ndarray, np.ndarray]:
    # ITU-T G.711 expansion tables, computed from the standard's bit layout.
    ulaw = np.zeros(256, dtype=np.int16)
    alaw = np.zeros(256, dtype=np.int16)
    for i in range(256):
        u = ~i & 0xFF
        t = ((u & 0x0F) << 3) + 0x84
        t <<= (u & 0x70) >> 4
        ulaw[i] = (0x84 - t) if (u & 0x80) else (t - 0x84)
        a = i ^ 0x55
        t = (a & 0x0F) << 4
        seg = (a & 0x70) >> 4
        if seg == 0:
            t += 8
        elif seg == 1:
            t += 0x108
        else:
            t += 0x108
            t <<= seg - 1
        alaw[i] = t if (a & 0x80) else -t
    return ulaw, alaw


_ULAW, _ALAW = _g711_tables()


def g711_to_float(data: bytes, law: str) -> np.ndarray:
    table = _ULAW if law == "pcmu" else _ALAW
    return table[np.frombuffer(data, dtype=np.uint8)].astype(np.float32) / 32768.0


def read_wav(path: str | Path, rate: int | None = ASR_RATE) -> Audio:
    """Read any soundfile-readable file as mono float32, resampled to ``rate`` (None keeps the file's)."""
    try:
        data, sr = sf.read(str(path), dtype="float32", always_2d=True)
    except (sf.LibsndfileError, RuntimeError) as e:
        raise AudioFormatError(f"cannot read audio file {path}: {e}") from None
    mono = data.mean(axis=1).astype(np.float32)
    audio = Audio(mono, int(sr))
    return audio.to(rate) if rate else audio


def write_wav(path: str | Path, audio: Audio) -> None:
    sf.write(str(path), np.clip(audio.samples, -1, 1), audio.rate, subtype="PCM_16")


def trim_silence(samples: np.ndarray, rate: int, *, threshold_db: float = -50.0, pad_ms: float = 60.0) -> np.ndarray:
    """Cut leading and trailing silence (frames quieter than threshold_db below the peak), keeping pad_ms."""
    if len(samples) == 0:
        return samples
    peak = float(np.max(np.abs(samples)))
    if peak <= 1e-6:
        return samples[:0]
    frame = max(1, rate // 100)
    n = len(samples) // frame
    if n == 0:
        return samples
    rms = np.sqrt(np.mean(samples[: n * frame].reshape(n, frame) ** 2, axis=1) + 1e-12)
    loud = np.nonzero(20 * np.log10(rms / peak) > threshold_db)[0]
    if len(loud) == 0:
        return samples[:0]
    pad = int(rate * pad_ms / 1000)
    start = max(0, loud[0] * frame - pad)
    end = min(len(samples), (loud[-1] + 1) * frame + pad)
    return samples[start:end]


def limit_peak(samples: np.ndarray, ceiling: float = 0.89) -> np.ndarray:
    """Scale down audio whose peak passes ``ceiling`` (about -1 dBFS) so that it never clips."""
    peak = float(np.max(np.abs(samples))) if len(samples) else 0.0
    if peak > ceiling:
        return (samples * (ceiling / peak)).astype(np.float32)
    return samples.astype(np.float32, copy=False)
