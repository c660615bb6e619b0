"""The dialogue benchmark: does the assistant answer, in the user's language, briefly and correctly?

Runs the conversation set in bench/data/dialogue.json (8 languages; facts, statements, requests for advice,
greetings, follow-ups) through the same path a voice turn takes (the LLM stage with its scheduler and the echo
guard, text out), then scores every reply:

- echo: the reply restates the user's words instead of answering (see ``is_echo``);
- language: the reply's language by a real identifier (lingua) among the European languages, against the user's
  (and among all of lingua's 75 languages, reported beside it);
- fact: a fact or follow-up reply contains an accepted answer;
- short: one or two spoken sentences (at most 2 sentence ends and 45 words);
- first token: milliseconds from the request to the first text piece.

The set has a ``tune`` part (looked at while tuning prompts and the guard) and a ``heldout`` part (never looked
at while tuning): both are reported.

    pip install '.[bench]'    # lingua, the language identifier
    python bench/dialogue.py [--split all|tune|heldout] [--languages en,fr] [--json replies.json]
    python bench/dialogue.py --rescore replies.json   # score saved replies again (no model)
    python bench/dialogue.py --first-token 3     # first-token time: the first prompt against the new one
    STEMME_LLM_URL=http://127.0.0.1:8000/v1 STEMME_LLM_MODEL=... python bench/dialogue.py   # a remote model
"""

from __future__ import annotations

import argparse
import asyncio
import difflib
import json
import re
import statistics
import sys
import threading
import time
import unicodedata
from collections import defaultdict
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, pct  # noqa: E402

DATA = Path(__file__).resolve().parent / "data" / "dialogue.json"
KINDS = ("fact", "followup", "statement", "advice", "greeting")


def normalise(text: str) -> str:
    """Lower case, no accents, no punctuation: for comparing words."""
    text = unicodedata.normalize("NFKD", text.lower())
    text = "".join(c for c in text if not unicodedata.combining(c))
    return re.sub(r"[^\w\s]", " ", text).replace("ł", "l")


def words(text: str) -> list[str]:
    return normalise(text).split()


def is_echo(user: str, reply: str) -> bool:
    """The reply restates the user's words instead of answering: either it repeats most of them in order near
    its start, or it covers most of the user's content words and adds almost nothing of its own."""
    u, r = words(user), words(reply)
    if len(u) < 3 or not r:
        return False
    head = r[: len(u) + 3]
    m = difflib.SequenceMatcher(None, u, head, autojunk=False)
    if sum(b.size for b in m.get_matching_blocks()) >= 0.8 * len(u):
        return True
    content = {w for w in u if len(w) >= 4}
    if len(content) < 3:
        return False
    covered = len(content & set(r)) / len(content)
    new = {w for w in r if len(w) >= 3 and w not in set(u)}
    return covered >= 0.6 and len(new) <= 2


def is_short(reply: str) -> bool:
    ends = len(re.findall(r"[.!?…]+(?:\s|$)", reply.strip()))
    return ends <= 2 and len(reply.split()) <= 45


def fact_right(reply: str, answers: list[str]) -> bool:
    norm = normalise(reply)
    return any(normalise(a).strip() in norm for a in answers)


class LanguageId:
    """lingua, loaded once. ``europe`` (the benchmark's score): the European languages Whisper hears and Stemme
    answers in (stemme.voice.languages.EUROPEAN, 34 of them in lingua): the languages a reply could
    plausibly be in. ``all``: every language lingua knows (75), reported beside it; short replies full of
    names are misread more often among 75 ("La erba è blu." as Azerbaijani)."""

    def __init__(self, universe: str = "europe") -> None:
        from lingua import Language, LanguageDetectorBuilder

        if universe == "all":
            self.detector = LanguageDetectorBuilder.from_all_spoken_languages().build()
            return
        from stemme.voice.languages import EUROPEAN

        known = {lang.iso_code_639_1.name.lower(): lang for lang in Language.all()}
        known["no"] = known["nb"]  # lingua names Norwegian Bokmål
        self.detector = LanguageDetectorBuilder.from_languages(*(known[c] for c in EUROPEAN if c in known)).build()

    def __call__(self, text: str) -> str | None:
        lang = self.detector.detect_language_of(text)
        if lang is None:
            return None
        code = lang.iso_code_639_1.name.lower()
        return "no" if code == "nb" else code


async def run_conversation(engines: Any, stages: Any, conv: dict[str, Any]) -> list[dict[str, Any]]:
    from stemme.voice.llm import Conversation
    from stemme.voice.pipeline import TextPiece, TurnMarks, respond

    history = Conversation()
    out = []
    for turn in conv["turns"]:
        history.add("user", turn["user"])
        marks = TurnMarks(turn_detected=time.perf_counter())
        t0 = time.perf_counter()
        text = ""
        async for piece in respond(engines, stages, history.messages(conv["lang"]), voice=None, marks=marks,
                                   cancel=threading.Event(), conversation=conv["id"],
                                   shared_prefix=history.shared_prefix(conv["lang"]), language=conv["lang"]):
            if isinstance(piece, TextPiece):
                text += piece.text
        first = (marks.first_token - t0) * 1000 if marks.first_token else float("nan")
        history.add("assistant", text)
        out.append({"id": conv["id"], "lang": conv["lang"], "split": conv["split"], **turn, "reply": text.strip(),
                    "first_token_ms": first, "guard": marks.extra.get("echo_guard")})
    engines.llm.forget(conv["id"]) if hasattr(engines.llm, "forget") else None
    return out


def score(rows: list[dict[str, Any]], ident: LanguageId, ident_all: LanguageId) -> None:
    for r in rows:
        r["echo"] = is_echo(r["user"], r["reply"])
        r["detected"] = ident(r["reply"]) if r["reply"] else None
        r["language_ok"] = r["detected"] == r["lang"]
        r["detected_any"] = ident_all(r["reply"]) if r["reply"] else None
        r["language_ok_any"] = r["detected_any"] == r["lang"]
        r["short"] = is_short(r["reply"])
        r["fact_ok"] = fact_right(r["reply"], r["answer"]) if "answer" in r else None


def table(rows: list[dict[str, Any]], key: str) -> list[str]:
    groups: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in rows:
        groups[r[key]].append(r)
    lines = [f"| {key} | turns | echo (non-fact) | language | language, all 75 | facts | short | first token p50 ms "
             "| p95 ms |", "|---|---|---|---|---|---|---|---|---|"]
    for name in sorted(groups, key=lambda g: (KINDS.index(g) if g in KINDS else 99, g)):
        lines.append(_row(name, groups[name]))
    lines.append(_row("**all**", rows))
    return lines


def _row(name: str, rows: list[dict[str, Any]]) -> str:
    nonfact = [r for r in rows if "answer" not in r]
    facts = [r for r in rows if "answer" in r]
    ft = [r["first_token_ms"] for r in rows if r["first_token_ms"] == r["first_token_ms"]]

    def frac(xs: list[bool]) -> str:
        return f"{sum(xs)}/{len(xs)}" if xs else "–"

    return (f"| {name} | {len(rows)} | {frac([r['echo'] for r in nonfact])} | "
            f"{frac([r['language_ok'] for r in rows])} | {frac([r['language_ok_any'] for r in rows])} | "
            f"{frac([r['fact_ok'] for r in facts])} | "
            f"{frac([r['short'] for r in rows])} | {statistics.median(ft):.0f} | {pct(ft, .95):.0f} |")


async def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    from stemme.voice.pipeline import stages_for

    from stemme.config import EngineConfig
    from stemme.engines import Engines

    cfg = EngineConfig.from_env()
    engines = Engines(cfg)
    stages = stages_for(cfg)
    convs = [c for c in json.loads(DATA.read_text())["conversations"]
             if (args.split == "all" or c["split"] == args.split)
             and (not args.languages or c["lang"] in args.languages.split(","))]
    await run_conversation(engines, stages, {"id": "warmup", "lang": "en", "split": "-",
                                             "turns": [{"kind": "greeting", "user": "Hello!"}]})
    rows: list[dict[str, Any]] = []
    for c in convs:
        rows += await run_conversation(engines, stages, c)
    stages.shutdown()
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--split", default="all", choices=["all", "tune", "heldout"])
    ap.add_argument("--languages", default="")
    ap.add_argument("--json", default=None, help="write every reply and its scores here")
    ap.add_argument("--rescore", default=None, metavar="REPLIES_JSON",
                    help="score the replies a --json run saved again (after a change to the scoring), without a model")
    ap.add_argument("--first-token", type=int, default=0, metavar="RUNS",
                    help="only compare first-token times of the first and the new prompt")
    args = ap.parse_args()
    if args.first_token:
        first_tokens(args.first_token)
        return
    rows = json.loads(Path(args.rescore).read_text()) if args.rescore else asyncio.run(run(args))
    score(rows, LanguageId("europe"), LanguageId("all"))
    print("machine:", machine())
    for split in ("tune", "heldout"):
        part = [r for r in rows if r["split"] == split]
        if part:
            print(f"\n### {split} ({len(part)} turns)\n")
            print("\n".join(table(part, "kind")))
    print("\n### per language (both parts)\n")
    print("\n".join(table(rows, "lang")))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, ensure_ascii=False, indent=1))



OLD_INSTRUCTIONS = ("You are Stemme, a friendly voice assistant. Your answers are spoken aloud, so answer in one or "
                    "two short, plain sentences, without lists, markdown, code or emojis.")
"""The first prompt (no example turns), for the first-token comparison."""


def first_tokens(runs: int) -> None:
    """First-token time of a conversation's first turn (the case the longer prompt could slow): the first
    prompt against the new one with its example turns, with and without the shared cache of its fixed start."""
    from stemme.voice.llm import Conversation, GenerationOptions

    from stemme.config import EngineConfig
    from stemme.engines import load_llm

    llm = load_llm(EngineConfig.from_env())
    convs = [c for c in json.loads(DATA.read_text())["conversations"] if c["split"] == "heldout"]
    variants = {"first prompt": (OLD_INSTRUCTIONS, False, False), "new, shared cache": (None, True, True),
                "new, no shared cache": (None, True, False)}
    times: dict[str, list[float]] = {v: [] for v in variants}
    for r in range(runs + 1):
        for c in convs:
            for name, (instructions, fewshot, shared) in variants.items():
                conv = Conversation(fewshot=fewshot) if instructions is None else \
                    Conversation(instructions=instructions, fewshot=fewshot)
                conv.add("user", c["turns"][0]["user"])
                opts = GenerationOptions(max_new_tokens=1, shared_prefix=conv.shared_prefix(c["lang"]) if shared else 0)
                t = time.perf_counter()
                for _ in llm.stream(conv.messages(c["lang"]), opts):
                    break
                if r:  # round 0 warms up (and fills the shared cache)
                    times[name].append((time.perf_counter() - t) * 1000)
    print("machine:", machine())
    print(f"first token of a first turn, {len(convs)} held-out questions x {runs} runs (ms)")
    for name, v in times.items():
        print(f"| {name} | {statistics.median(v):.0f} | {pct(v, .95):.0f} |")


if __name__ == "__main__":
    main()
