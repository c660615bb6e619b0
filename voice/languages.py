"""The languages Stemme speaks end to end, and their names (used in the assistant's instructions)."""

from __future__ import annotations

SUPPORTED = ("en", "fr", "de", "es", "it", "pt", "nl", "pl")
"""Speech in, transcript, reply and speech out: tested end to end."""

NAMES = {
    "en": "English", "fr": "French", "de": "German", "es": "Spanish", "it": "Italian", "pt": "Portuguese",
    "nl": "Dutch", "pl": "Polish", "cs": "Czech", "ru": "Russian", "sv": "Swedish", "da": "Danish",
    "no": "Norwegian", "fi": "Finnish", "ro": "Romanian", "hu": "Hungarian", "el": "Greek", "uk": "Ukrainian",
}
"""English names of languages Whisper detects; a reply instruction names the language."""

NATIVE = {
    "en": "English", "fr": "français", "de": "Deutsch", "es": "español", "it": "italiano", "pt": "português",
    "nl": "Nederlands", "pl": "polski", "cs": "čeština", "ru": "русский",
}


def name(code: str) -> str:
    return NAMES.get(code, code)


def normalise(code: str | None) -> str | None:
    """'en-US' -> 'en'; '' / 'auto' / None -> None."""
    if not code or code.lower() == "auto":
        return None
    return code.replace("_", "-").split("-")[0].lower()
