"""Text normalisation and error rates for tests and benchmarks (WER, CER)."""

from __future__ import annotations

import re
import unicodedata

_NUMBERS = {"2": "two", "10": "ten"}


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


def char_errors(hyp: str, ref: str) -> tuple[int, int]:
    h, r = normalise(hyp), normalise(ref)
    return _edits(h, r), len(r)


def wer(hyp: str, ref: str) -> float:
    e, n = word_errors(hyp, ref)
    return e / max(n, 1)


def cer(hyp: str, ref: str) -> float:
    e, n = char_errors(hyp, ref)
    return e / max(n, 1)
