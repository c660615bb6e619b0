"""Loads each engine once per process from an EngineConfig; sessions share them."""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field

from stemme.config import EngineConfig
from stemme.errors import ModelLoadError
from stemme.voice.asr import SpeechRecognizer
from stemme.voice.llm import ChatEngine
from stemme.voice.tts import Synthesizer, VoiceRegistry, default_voices, load_voice_file

logger = logging.getLogger(__name__)


def torch_cuda() -> bool:
    try:
        import torch

        return bool(torch.cuda.is_available())
    except ImportError:
        return False


def resolve_device(device: str) -> str:
    if device != "auto":
        return device
    from stemme.models.faster_whisper_asr import cuda_available

    return "cuda" if cuda_available() or torch_cuda() else "cpu"


def load_vad(cfg: EngineConfig):
    from stemme.models.silero_vad import SileroVad

    return SileroVad()


def load_asr(cfg: EngineConfig) -> SpeechRecognizer:
    from stemme.models.faster_whisper_asr import FasterWhisperRecognizer

    device = resolve_device(cfg.device)
    return FasterWhisperRecognizer(cfg.asr_model, device=device, compute_type=cfg.asr_compute_type,
                                   cpu_threads=cfg.asr_threads, short_context=cfg.asr_short_context,
                                   pad_seconds=cfg.asr_pad_seconds)


def llm_backend(cfg: EngineConfig) -> str:
    if cfg.llm_backend != "auto":
        return cfg.llm_backend
    return "transformers" if resolve_device(cfg.device) == "cuda" and torch_cuda() else "onnxruntime"


def load_llm(cfg: EngineConfig) -> ChatEngine:
    engine = _load_llm(cfg)
    tokenizer = getattr(engine, "tokenizer", None)
    if tokenizer is not None:
        tokenizer.max_prompt_tokens = cfg.llm_max_prompt_tokens
    return engine


def _load_llm(cfg: EngineConfig) -> ChatEngine:
    if cfg.llm_url:  # a remote OpenAI-compatible model: nothing is loaded here
        from stemme.models.llm_openai import RemoteChat

        return RemoteChat(cfg.llm_url, model=cfg.llm_model, api_key=cfg.llm_api_key,
                          connect_timeout=cfg.llm_connect_timeout_s, read_timeout=cfg.llm_read_timeout_s)
    from stemme.models import export

    backend = llm_backend(cfg)
    device = resolve_device(cfg.device)
    model_dir = export.llm_model_dir(backend, cfg.llm_pack, cfg.llm_model)
    if backend == "onnxruntime":
        from stemme.models.llm_onnx import OnnxChat

        return OnnxChat(model_dir, threads=cfg.llm_threads, device="cpu", prefix_cache_mb=cfg.llm_prefix_cache_mb)
    if backend == "ort-genai":
        from stemme.models.llm_ortgenai import OrtGenaiChat

        return OrtGenaiChat(model_dir, threads=cfg.llm_threads, device="cpu")
    if backend == "transformers":
        from stemme.models.llm_transformers import TransformersChat

        return TransformersChat(model_dir, device=device, threads=cfg.llm_threads)
    if backend == "ctranslate2":
        from stemme.models.llm_ctranslate2 import CTranslate2Chat

        return CTranslate2Chat(model_dir, device=device, threads=cfg.llm_threads)
    raise ModelLoadError(f"unknown LLM backend {backend!r}")


def load_tts(cfg: EngineConfig) -> Synthesizer:
    from stemme.models.tts_espeak import EspeakEngine
    from stemme.models.tts_kokoro import KokoroEngine
    from stemme.models.tts_pico import PicoEngine
    from stemme.models.tts_piper import PiperEngine

    device = resolve_device(cfg.device)
    voices = default_voices()
    if cfg.voices_file:
        voices = load_voice_file(cfg.voices_file) + voices
    engines = {
        "piper": PiperEngine(use_cuda=device == "cuda"),
        "kokoro": KokoroEngine(threads=cfg.tts_threads, device=device),
        "espeak": EspeakEngine(),
        "pico": PicoEngine(),
    }
    return Synthesizer(VoiceRegistry(voices, engines), speed=cfg.tts_speed)


def load_turn(cfg: EngineConfig):  # noqa: ANN201
    """The end-of-turn model for semantic_vad, or None when it is off or its pack is not installed (semantic_vad
    then waits for a silence whose length depends on the eagerness)."""
    if not cfg.turn_model_enabled:
        return None
    from stemme.models import packs
    from stemme.models.smart_turn import SmartTurn

    if not cfg.turn_model and not packs.state(packs.get_pack("smart-turn-v3.2")).prepared:
        logger.warning("end-of-turn model not prepared (pip install --no-deps pipecat-ai==1.14.0; "
                       "stemme models prepare): semantic_vad uses silence only")
        return None
    return SmartTurn(cfg.turn_model, threads=1)


@dataclass
class Engines:
    """The shared engines of one process, loaded lazily and once."""

    config: EngineConfig
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    _cache: dict[str, object] = field(default_factory=dict, repr=False)

    def _get(self, name: str, loader):  # noqa: ANN001
        cached = self._cache.get(name)
        if cached is not None:  # loaded: no lock (the loader may hold it for minutes while it loads another model)
            return cached
        with self._lock:
            if name not in self._cache:
                self._cache[name] = loader(self.config)
            return self._cache[name]

    @property
    def vad(self):
        return self._get("vad", load_vad)

    @property
    def asr(self) -> SpeechRecognizer:
        return self._get("asr", load_asr)  # type: ignore[return-value]

    @property
    def llm(self) -> ChatEngine:
        return self._get("llm", load_llm)  # type: ignore[return-value]

    @property
    def tts(self) -> Synthesizer:
        return self._get("tts", load_tts)  # type: ignore[return-value]

    @property
    def turn(self):  # noqa: ANN201
        """The end-of-turn model (SmartTurn), or None."""
        return self._get("turn", load_turn)

    def load_all(self) -> None:
        from stemme import privacy

        for name in ("vad", "asr", "llm", "tts", "turn"):
            getattr(self, name)
        privacy.disable_loaded_telemetry()

    @property
    def loaded(self) -> list[str]:
        return list(self._cache)
