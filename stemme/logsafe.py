"""Client text in log lines and error messages: escaped and truncated, so that a client cannot forge log
lines (newlines, terminal escapes, bidi overrides) nor fill the log with a 10 KB voice name."""

from __future__ import annotations

CLIP_CHARS = 80
"""Characters of client text kept by default; the rest is replaced by a marker with its length."""

_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t", "\\": "\\\\"}


def _escape(ch: str) -> str:
    if ch in _NAMED:
        return _NAMED[ch]
    code = ord(ch)
    if code < 0x100:
        return f"\\x{code:02x}"
    if code < 0x10000:
        return f"\\u{code:04x}"
    return f"\\U{code:08x}"


def clip(value: object, limit: int = CLIP_CHARS) -> str:
    """``value`` as one printable line of at most ``limit`` characters of its text (escapes excepted), with
    ``…[+N chars]`` when it was longer. Control, format and separator characters, lone surrogates and the
    backslash are escaped (``\\n``, ``\\x1b``, ``\\u202e``, ``\\ud800``), so the result is always valid UTF-8."""
    text = value if isinstance(value, str) else str(value)
    extra = len(text) - limit
    head = text[:limit] if extra > 0 else text
    if not head.isprintable() or "\\" in head:
        head = "".join(ch if ch.isprintable() and ch != "\\" else _escape(ch) for ch in head)
    return f"{head}…[+{extra} chars]" if extra > 0 else head
