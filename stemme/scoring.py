"""Text normalisation and error rates for tests and benchmarks (WER, CER)."""

from __future__ import annotations

import re
import unicodedata

_NUMBERS = {"2": "two", "10": "ten"}

_SERBIAN_LATIN = dict(zip(
    "абвгдђежзијклљмнњопрстћуфхцчџш",
    ["a", "b", "v", "g", "d", "đ", "e", "ž", "z", "i", "j", "k", "l", "lj", "m", "n", "nj", "o", "p", "r", "s", "t",
     "ć", "u", "f", "h", "c", "č", "dž", "š"], strict=True))
"""Serbian is written in both scripts (and Whisper answers in either): it is scored in Latin letters."""


def script_fold(text: str, language: str | None) -> str:
    """Write a language that has two scripts in one of them, so that a transcript is not wrong for its script."""
    if language == "sr":
        return "".join(_SERBIAN_LATIN.get(c, c) for c in text.lower())
    return text


def normalise(text: str, *, fold_accents: bool = True) -> str:
    """Lower case, no punctuation, single spaces; accents folded (the reference transcripts mix both)."""
    text = unicodedata.normalize("NFKC", text).lower().replace("’", "'")
    if fold_accents:
        text = "".join(c for c in unicodedata.normalize("NFKD", text) if not unicodedata.combining(c))
    text = re.sub(r"[^\w\s']|_", " ", text)
    text = re.sub(r"(?<!\w)'|'(?!\w)", " ", text)
    return re.sub(r"\s+", " ", text).strip()


def _edits(a: list[str] | str, b: list[str] | str) -> int:
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i]
        for j, cb in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
        prev = cur
    return prev[-1]


def word_errors(hyp: str, ref: str) -> tuple[int, int]:
    """(edit distance in words, reference length in words) after normalisation."""
    h, r = normalise(hyp).split(), normalise(ref).split()
    return _edits(h, r), len(r)


def char_errors(hyp: str, ref: str, language: str | None = None) -> tuple[int, int]:
    """(edit distance in characters, reference length) after normalisation; ``language`` folds scripts."""
    h, r = normalise(script_fold(hyp, language)), normalise(script_fold(ref, language))
    return _edits(h, r), len(r)


def wer(hyp: str, ref: str) -> float:
    e, n = word_errors(hyp, ref)
    return e / max(n, 1)


def cer(hyp: str, ref: str) -> float:
    e, n = char_errors(hyp, ref)
    return e / max(n, 1)
