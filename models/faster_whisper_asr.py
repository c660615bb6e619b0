"""faster-whisper (CTranslate2) adapter: int8 on CPU, float16 on CUDA."""

from __future__ import annotations

import logging
import os
import threading
import time
from pathlib import Path

import numpy as np
from stemme.models import packs
from stemme.voice.asr import AsrOptions, Transcript, choose_language

from stemme.errors import ModelLoadError

logger = logging.getLogger(__name__)


def cuda_available() -> bool:
    try:
        import ctranslate2

        return ctranslate2.get_cuda_device_count() > 0
    except Exception:  # noqa: BLE001 - a broken CUDA install means: no CUDA
        return False


class FasterWhisperRecognizer:
    """Whisper through faster-whisper. One instance serves every session (calls are serialised)."""

    name = "faster-whisper"

    def __init__(
        self,
        model: str | Path | None = None,
        *,
        device: str = "auto",
        compute_type: str = "auto",
        cpu_threads: int = 0,
        short_context: bool = True,
        pad_seconds: float = 10.0,
    ) -> None:
        from faster_whisper import WhisperModel

        path = Path(model) if model else packs.ready("whisper-base")
        if device == "auto":
            device = "cuda" if cuda_available() else "cpu"
        if compute_type == "auto":
            compute_type = "float16" if device == "cuda" else "int8"
        self.device = device
        self.compute_type = compute_type
        self.short_context = short_context
        self.pad_seconds = pad_seconds
        self.path = path
        t = time.perf_counter()
        try:
            self.model = WhisperModel(str(path), device=device, compute_type=compute_type,
                                      cpu_threads=cpu_threads or min(4, os.cpu_count() or 1), local_files_only=True)
        except (RuntimeError, ValueError, OSError) as e:
            raise ModelLoadError(f"cannot load the Whisper model at {path}: {e}") from None
        from faster_whisper.tokenizer import Tokenizer
        from faster_whisper.transcribe import get_suppressed_tokens

        fw_tok = Tokenizer(self.model.hf_tokenizer, True, task="transcribe", language="en")
        self._suppress = list(get_suppressed_tokens(fw_tok, [-1]))
        self.load_seconds = time.perf_counter() - t
        self._lock = threading.Lock()
        logger.info("ASR faster-whisper loaded from %s on %s/%s in %.2fs", path, device, compute_type,
                    self.load_seconds)

    def _detect(self, audio: np.ndarray, o: AsrOptions) -> tuple[str, float]:
        _lang, _p, probs = self.model.detect_language(audio)
        lang, p = choose_language([(lang, float(p)) for lang, p in probs], o)
        return lang, float(p)

    def _prompt(self, language: str, o: AsrOptions) -> list[int]:
        tok = self.model.hf_tokenizer
        prompt = [tok.token_to_id("<|startoftranscript|>"), tok.token_to_id(f"<|{language}|>"),
                  tok.token_to_id("<|transcribe|>"), tok.token_to_id("<|notimestamps|>")]
        if o.prompt:
            prompt = [tok.token_to_id("<|startofprev|>"), *tok.encode(" " + o.prompt.strip()).ids[-100:], *prompt]
        return prompt

    def _short_batch(self, audios: list[np.ndarray], opts: list[AsrOptions]) -> list[tuple[str, str, float]]:
        """Encode only the utterances (plus ``pad_seconds`` of silence) instead of a 30 s window, several
        utterances in one batch.

        Whisper pads every input to 30 s; for a 3 s utterance that is 10x the encoder work. CTranslate2
        accepts shorter mel inputs; with about 2 s of trailing silence the decoder still ends cleanly
        (without it, it tends to repeat itself). Language detection reuses the same encoder output. In a
        batch, every utterance is padded with silence to the longest one (plus ``pad_seconds``).
        """
        import ctranslate2

        m = self.model
        longest = max(len(a) for a in audios)
        total = longest + int(self.pad_seconds * 16000)
        feats = []
        for a in audios:
            x = np.zeros(total, np.float32)
            x[: len(a)] = a
            f = m.feature_extractor(x)
            feats.append(f[:, : min(3000, f.shape[-1] - f.shape[-1] % 2)])
        batch = np.ascontiguousarray(np.stack(feats).astype(np.float32))
        enc = m.model.encode(ctranslate2.StorageView.from_array(batch), to_cpu=False)
        tok = m.hf_tokenizer
        langs: list[tuple[str, float]] = [(o.language, 1.0) if o.language else ("", 0.0) for o in opts]
        if any(o.language is None for o in opts):
            detected = m.model.detect_language(enc)
            for i, o in enumerate(opts):
                if o.language is None:
                    langs[i] = choose_language([(t[2:-2], float(p)) for t, p in detected[i]], o)
        prompts = [self._prompt(lang, o) for (lang, _), o in zip(langs, opts, strict=True)]
        max_len = min(224, 16 + int(longest / 16000 * 10)) + max(len(p) for p in prompts) - 4
        res = m.model.generate(enc, prompts, beam_size=max(o.beam_size for o in opts), max_length=max_len,
                               suppress_blank=True, suppress_tokens=self._suppress)
        eot = tok.token_to_id("<|endoftext|>")
        out = []
        for r, (lang, prob) in zip(res, langs, strict=True):
            ids = [i for i in r.sequences_ids[0] if i < eot]
            out.append((tok.decode(ids).strip(), lang, float(prob)))
        return out

    def fits_short(self, audio: np.ndarray) -> bool:
        return self.short_context and len(audio) <= (30 - self.pad_seconds) * 16000

    def transcribe_batch(self, audios: list[np.ndarray], options: list[AsrOptions | None]) -> list[Transcript]:
        """Transcribe several utterances (of different sessions) in one encoder and decoder batch: on a GPU a
        batch of 8 costs about what one does. Utterances too long for the short context are transcribed one
        by one."""
        t = time.perf_counter()
        audios = [np.asarray(a, dtype=np.float32) for a in audios]
        opts = [o or AsrOptions() for o in options]
        short = [i for i, a in enumerate(audios) if self.fits_short(a)]
        out: list[Transcript | None] = [None] * len(audios)
        if short:
            with self._lock:
                results = self._short_batch([audios[i] for i in short], [opts[i] for i in short])
            took = time.perf_counter() - t
            for i, (text, language, prob) in zip(short, results, strict=True):
                secs = len(audios[i]) / 16000
                out[i] = Transcript(text=text, language=language, language_probability=prob, audio_seconds=secs,
                                    seconds=took, segments=[(0.0, secs, text)])
        for i, a in enumerate(audios):
            if out[i] is None:
                out[i] = self.transcribe(a, opts[i])
        return [x for x in out if x is not None]

    def transcribe(self, audio: np.ndarray, options: AsrOptions | None = None) -> Transcript:
        o = options or AsrOptions()
        audio = np.asarray(audio, dtype=np.float32)
        t = time.perf_counter()
        if self.fits_short(audio):
            return self.transcribe_batch([audio], [o])[0]
        with self._lock:
            language = o.language
            prob = 1.0
            if language is None:
                language, prob = self._detect(audio, o)
            segments, info = self.model.transcribe(
                audio,
                language=language,
                beam_size=o.beam_size,
                initial_prompt=o.prompt,
                condition_on_previous_text=False,
                without_timestamps=True,
                vad_filter=False,
            )
            segs = [(s.start, s.end, s.text) for s in segments]
        text = " ".join(s[2].strip() for s in segs).strip()
        return Transcript(
            text=text,
            language=info.language,
            language_probability=prob,
            audio_seconds=len(audio) / 16000,
            seconds=time.perf_counter() - t,
            segments=segs,
        )
