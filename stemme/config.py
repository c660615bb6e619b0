"""Configuration: plain dataclasses, built from the environment (STEMME_*) and the command line at the entry
point only. Every model and voice can be given by path."""

from __future__ import annotations

import os
from dataclasses import dataclass, field, fields


def _cores() -> int:
    return os.cpu_count() or 1


@dataclass
class EngineConfig:
    device: str = "auto"
    """auto (CUDA when present), cpu or cuda."""
    asr_model: str | None = None
    """A CTranslate2 Whisper directory; None: the embedded whisper-base pack."""
    asr_compute_type: str = "auto"
    """auto: int8 on CPU, float16 on CUDA."""
    asr_beam_size: int = 1
    """1: greedy decoding (lowest latency)."""
    asr_short_context: bool = True
    """Encode only the utterance plus asr_pad_seconds of silence, not a 30 s window (4x faster here)."""
    asr_pad_seconds: float = 10.0
    """Silence appended in short-context mode (less is faster, more is closer to Whisper's training)."""
    asr_threads: int = field(default_factory=_cores)
    """CPU threads of the ASR engine (it runs alone in a turn, so it may take every core)."""
    turn_model_enabled: bool = True
    """Use the audio end-of-turn model (Smart Turn v3.2) for semantic_vad turn detection."""
    turn_model: str | None = None
    """An end-of-turn ONNX model of Smart Turn v3's interface; None: the embedded smart-turn-v3.2 pack."""
    llm_pack: str = "qwen2.5-coder-0.5b"
    """Embedded model pack of the language model (qwen2.5-coder-0.5b, or qwen2.5-coder-1.5b)."""
    llm_model: str | None = None
    """A .gguf file, a Hugging Face, ONNX Runtime GenAI or CTranslate2 directory; overrides llm_pack. With
    llm_url: the remote model's name, as the endpoint lists it under /models (None: the first one listed)."""
    llm_url: str | None = None
    """Base URL of an OpenAI-compatible API (vLLM, llama.cpp server, Ollama, TGI, transformers serve), e.g.
    http://vllm:8000/v1: answers stream from its /chat/completions and no local language model is loaded."""
    llm_api_key: str | None = field(default=None, repr=False)
    """Sent as Authorization: Bearer to llm_url; never logged (prefer the environment to the command line)."""
    llm_connect_timeout_s: float = 3.0
    """Longest wait for a connection to llm_url; quick failures (refused, HTTP 429/502/503/504) are retried
    twice before the first token, with 0.2 s then 0.4 s of backoff, never after it."""
    llm_read_timeout_s: float = 30.0
    """Longest silence of llm_url, before the first token or between two; then the answer fails."""
    llm_backend: str = "auto"
    """auto (transformers on CUDA, onnxruntime on CPU), onnxruntime (the ORT GenAI model run by Stemme's own
    batching loop), ort-genai, transformers or ctranslate2."""
    llm_threads: int = field(default_factory=lambda: min(4, _cores()))
    """CPU threads of the LLM (measured on 2 cores: 2 threads beat 1, even while TTS overlaps)."""
    llm_prefix_cache_mb: int = 512
    """Memory for the key/value caches of recent conversations (onnxruntime backend): the next turn prefills
    only its new words (first token 0.09 s instead of 0.3-0.45 s by the third turn, measured). 0 turns it off."""
    llm_max_tokens: int = 80
    """Longest answer, in tokens."""
    llm_max_prompt_tokens: int = 3072
    """Longest prompt (instructions, examples, history), in tokens: a longer one is refused with an error event.
    Far below the model's context, so that one session cannot hold the shared model for long."""
    tts_threads: int = field(default_factory=lambda: min(2, _cores()))
    """CPU threads of Kokoro."""
    tts_speed: float = 1.0
    """Speaking-rate multiplier applied to every voice."""
    batch_max: int = 0
    """Largest micro-batch of ASR requests from different sessions; 0: auto (8 on CUDA, 1 = off on CPU)."""
    batch_window_ms: float = -1.0
    """How long the oldest request waits for others to join its batch; -1: auto (5 ms on CUDA, 0 on CPU)."""
    llm_max_batch: int = 8
    """Streams decoded in one pass by a batching LLM backend (transformers, the CUDA default)."""
    tts_workers: int = 0
    """Clauses synthesized at the same time; 0: auto (4 on CUDA, 1 on CPU)."""
    voices_file: str | None = None
    """JSON list of operator voices (see voice/tts.py: Voice); they come before the defaults."""
    languages: tuple[str, ...] = ()
    """Languages the ASR may detect (STEMME_LANGUAGES=cs,sk,de). Empty (the default): every language Whisper
    knows, leaning toward the eight tested ones (voice/languages.py: SUPPORTED) only when Whisper is unsure
    (best guess below 0.5, e.g. a single word; voice/asr.py: AsrOptions.prefer)."""

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None, **overrides: object) -> EngineConfig:
        env = dict(os.environ if env is None else env)
        cfg = cls()
        for f in fields(cls):
            key = "STEMME_" + f.name.upper()
            if key in env and env[key] != "":
                raw = env[key]
                cur = getattr(cfg, f.name)
                if isinstance(cur, bool):
                    val: object = raw.lower() in ("1", "true", "yes", "on")
                elif isinstance(cur, int):
                    val = int(raw)
                elif isinstance(cur, float):
                    val = float(raw)
                elif isinstance(cur, tuple):
                    val = tuple(x.strip() for x in raw.split(",") if x.strip())
                else:
                    val = raw
                setattr(cfg, f.name, val)
        for k, v in overrides.items():
            if v is not None:
                setattr(cfg, k, v)
        return cfg
