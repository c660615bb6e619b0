"""One-time conversions of the language model, cached under ``$STEMME_HOME/derived/``:

GGUF (the pack) -> Hugging Face safetensors (de-quantised, for transformers) -> ONNX Runtime GenAI int8
(the CPU default) or CTranslate2 int8. Each output directory is written beside a temporary name and renamed
when complete, with a ``.stemme-complete`` marker naming its source, so an interrupted conversion is redone.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

from stemme.models import packs

from stemme.errors import ModelLoadError, PackError

logger = logging.getLogger(__name__)

_MARK = ".stemme-complete"


def derived_dir(key: str, fmt: str, home: Path | None = None) -> Path:
    return (home or packs.stemme_home()) / "derived" / key / fmt


def _key_for_path(path: Path) -> str:
    return path.name + "-" + hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:10]


def _complete(d: Path) -> bool:
    return (d / _MARK).is_file()


def _build(out: Path, what: str, source: str, fn: Callable[[Path], None], seconds_hint: int) -> Path:
    """Run ``fn(tmp)`` to fill a temporary directory, with a progress bar of elapsed time, then publish it."""
    from tqdm import tqdm

    if _complete(out):
        return out
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    done = threading.Event()
    errors: list[BaseException] = []

    def work() -> None:
        try:
            fn(tmp)
        except BaseException as e:  # noqa: BLE001 - re-raised in the caller's thread
            errors.append(e)
        finally:
            done.set()

    t = threading.Thread(target=work, name=f"convert-{out.name}", daemon=True)
    t.start()
    with tqdm(total=seconds_hint, desc=f"{what} (one time, about {seconds_hint}s)", unit="s",
              bar_format="{desc}: {elapsed}", file=sys.stderr, disable=None) as bar:
        while not done.wait(1.0):
            bar.update(1)
    t.join()
    if errors:
        shutil.rmtree(tmp, ignore_errors=True)
        e = errors[0]
        if isinstance(e, (PackError, ModelLoadError)):
            raise e
        raise ModelLoadError(f"{what} failed: {type(e).__name__}: {e}") from e
    (tmp / _MARK).write_text(json.dumps({"source": source, "at": time.time()}))
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out


def gguf_to_hf(gguf: Path, out: Path) -> Path:
    """De-quantise a GGUF chat model into a float32 safetensors checkpoint transformers and the converters read."""

    def convert(tmp: Path) -> None:
        import torch
        from safetensors.torch import save_model
        from transformers import AutoModelForCausalLM, AutoTokenizer

        tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
        save_model(model, str(tmp / "model.safetensors"))
        cfg = model.config.to_dict()
        cfg.pop("quantization_config", None)
        cfg["architectures"] = [type(model).__name__]  # the ONNX builder needs it
        cfg["torch_dtype"] = "float32"
        (tmp / "config.json").write_text(json.dumps(cfg, indent=1))
        model.generation_config.save_pretrained(str(tmp))
        tok.save_pretrained(str(tmp))

    return _build(out, f"de-quantising {gguf.name}", str(gguf), convert, 60)


def hf_to_ort_genai(hf: Path, out: Path, precision: str = "int8", device: str = "cpu") -> Path:
    """Build an ONNX Runtime GenAI model (int8 weights, lm_head pruned to the last position)."""

    def convert(tmp: Path) -> None:
        cache = tmp / ".cache"
        cmd = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(hf), "-o", str(tmp),
               "-p", precision, "-e", device, "-c", str(cache), "--extra_options", "prune_lm_head=true"]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False, env={**os.environ})
        if proc.returncode != 0:
            raise ModelLoadError("onnxruntime-genai model builder failed: " + proc.stderr.strip()[-800:])
        shutil.rmtree(cache, ignore_errors=True)
        for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json"):
            if (hf / name).is_file() and not (tmp / name).is_file():
                shutil.copy2(hf / name, tmp / name)

    return _build(out, f"building the ONNX Runtime GenAI {precision} model", str(hf), convert, 40)


def hf_to_ct2(hf: Path, out: Path, quantization: str = "int8") -> Path:
    def convert(tmp: Path) -> None:
        import ctranslate2

        ctranslate2.converters.TransformersConverter(str(hf), low_cpu_mem_usage=True).convert(
            str(tmp), quantization=quantization, force=True)
        for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json"):
            if (hf / name).is_file():
                shutil.copy2(hf / name, tmp / name)

    return _build(out, f"converting to CTranslate2 {quantization}", str(hf), convert, 30)


def llm_hf_dir(pack: str | None, path: str | Path | None) -> Path:
    """The Hugging Face checkpoint of the configured model: a path (HF dir or .gguf file) or a pack."""
    if path:
        p = Path(path).expanduser()
        if p.is_file() and p.suffix == ".gguf":
            return gguf_to_hf(p, derived_dir(_key_for_path(p), "hf"))
        if (p / "config.json").is_file():
            return p
        raise ModelLoadError(f"{p} is neither a .gguf file nor a Hugging Face model directory")
    assert pack
    d = packs.ready(pack)
    return gguf_to_hf(d / "model.gguf", derived_dir(pack, "hf"))


def model_kind(path: Path) -> str:
    """What a model directory holds: 'ort-genai', 'ctranslate2', 'hf' or 'gguf'."""
    if path.is_file() and path.suffix == ".gguf":
        return "gguf"
    if (path / "genai_config.json").is_file():
        return "ort-genai"
    if (path / "model.bin").is_file() and (path / "config.json").is_file():
        return "ctranslate2"
    if (path / "config.json").is_file():
        return "hf"
    raise ModelLoadError(f"cannot tell what model {path} holds (expected a .gguf, a Hugging Face, "
                         "an ONNX Runtime GenAI or a CTranslate2 directory)")


def llm_model_dir(backend: str, pack: str | None, path: str | Path | None) -> Path:
    """The directory a backend loads, converting (once) what needs converting."""
    if path:
        p = Path(path).expanduser()
        kind = model_kind(p)
        if kind == backend or (kind == "hf" and backend == "transformers") or (
                kind == "ort-genai" and backend == "onnxruntime"):
            return p
        if kind in ("ort-genai", "ctranslate2"):
            raise ModelLoadError(f"{p} is a {kind} model; it cannot run on the {backend} backend")
        key = _key_for_path(p)
    else:
        key = pack or ""
    hf = llm_hf_dir(pack, path)
    if backend == "transformers":
        return hf
    if backend in ("ort-genai", "onnxruntime"):  # the same model files; onnxruntime runs its own loop
        return hf_to_ort_genai(hf, derived_dir(key, "ort-genai-int8"))
    if backend == "ctranslate2":
        return hf_to_ct2(hf, derived_dir(key, "ct2-int8"))
    raise ModelLoadError(f"unknown LLM backend {backend!r} (onnxruntime, ort-genai, transformers, ctranslate2)")
