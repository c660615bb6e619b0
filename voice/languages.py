"""The languages Stemme hears and speaks, and their names (used in the assistant's instructions).

Stemme detects and transcribes every language Whisper knows (``WHISPER``), unless the operator restricts it
(``STEMME_LANGUAGES``). The assistant is told to answer in the user's language by its English name
(``NAMES``). Speech comes from the best voice for that language (voice/tts.py); the European languages
(``EUROPEAN``) were measured one by one (docs/voices.md).
"""

from __future__ import annotations

SUPPORTED = ("en", "fr", "de", "es", "it", "pt", "nl", "pl")
"""The first eight: speech in, transcript, reply and speech out, tested end to end on real recordings."""

WHISPER = (
    "af am ar as az ba be bg bn bo br bs ca cs cy da de el en es et eu fa fi fo fr gl gu ha haw he hi hr ht hu hy "
    "id is it ja jw ka kk km kn ko la lb ln lo lt lv mg mi mk ml mn mr ms mt my ne nl nn no oc pa pl ps pt ro ru "
    "sa sd si sk sl sn so sq sr su sv sw ta te tg th tk tl tr tt uk ur uz vi yi yo zh yue"
).split()
"""Every language Whisper's tokenizer names (the multilingual base model detects 99 of them; ``yue`` is only in
large-v3)."""

EUROPEAN = (
    "en", "fr", "de", "es", "it", "pt", "nl", "pl", "ru", "cs", "uk", "sv", "da", "no", "fi", "el", "ro", "hu",
    "hr", "sk", "bg", "ca", "sl", "lt", "lv", "et", "sr", "mk", "bs", "is", "gl", "eu", "sq", "be", "mt", "cy",
    "lb", "nn", "fo", "br", "oc",
)
"""The languages of Europe that Whisper knows: each gets a transcript, a reply in it and a voice."""

NAMES = {
    "af": "Afrikaans", "am": "Amharic", "ar": "Arabic", "as": "Assamese", "az": "Azerbaijani", "ba": "Bashkir",
    "be": "Belarusian", "bg": "Bulgarian", "bn": "Bengali", "bo": "Tibetan", "br": "Breton", "bs": "Bosnian",
    "ca": "Catalan", "cs": "Czech", "cy": "Welsh", "da": "Danish", "de": "German", "el": "Greek", "en": "English",
    "es": "Spanish", "et": "Estonian", "eu": "Basque", "fa": "Persian", "fi": "Finnish", "fo": "Faroese",
    "fr": "French", "gl": "Galician", "gu": "Gujarati", "ha": "Hausa", "haw": "Hawaiian", "he": "Hebrew",
    "hi": "Hindi", "hr": "Croatian", "ht": "Haitian Creole", "hu": "Hungarian", "hy": "Armenian",
    "id": "Indonesian", "is": "Icelandic", "it": "Italian", "ja": "Japanese", "jw": "Javanese", "ka": "Georgian",
    "kk": "Kazakh", "km": "Khmer", "kn": "Kannada", "ko": "Korean", "la": "Latin", "lb": "Luxembourgish",
    "ln": "Lingala", "lo": "Lao", "lt": "Lithuanian", "lv": "Latvian", "mg": "Malagasy", "mi": "Maori",
    "mk": "Macedonian", "ml": "Malayalam", "mn": "Mongolian", "mr": "Marathi", "ms": "Malay", "mt": "Maltese",
    "my": "Burmese", "ne": "Nepali", "nl": "Dutch", "nn": "Norwegian Nynorsk", "no": "Norwegian",
    "oc": "Occitan", "pa": "Punjabi", "pl": "Polish", "ps": "Pashto", "pt": "Portuguese", "ro": "Romanian",
    "ru": "Russian", "sa": "Sanskrit", "sd": "Sindhi", "si": "Sinhala", "sk": "Slovak", "sl": "Slovenian",
    "sn": "Shona", "so": "Somali", "sq": "Albanian", "sr": "Serbian", "su": "Sundanese", "sv": "Swedish",
    "sw": "Swahili", "ta": "Tamil", "te": "Telugu", "tg": "Tajik", "th": "Thai", "tk": "Turkmen",
    "tl": "Tagalog", "tr": "Turkish", "tt": "Tatar", "uk": "Ukrainian", "ur": "Urdu", "uz": "Uzbek",
    "vi": "Vietnamese", "yi": "Yiddish", "yo": "Yoruba", "zh": "Chinese", "yue": "Cantonese",
}
"""English names of every Whisper language; the reply instruction names the language ("Answer only in
Russian")."""

NATIVE = {
    "en": "English", "fr": "français", "de": "Deutsch", "es": "español", "it": "italiano", "pt": "português",
    "nl": "Nederlands", "pl": "polski", "ru": "русский", "cs": "čeština", "uk": "українська", "sv": "svenska",
    "da": "dansk", "no": "norsk", "fi": "suomi", "el": "Ελληνικά", "ro": "română", "hu": "magyar",
    "hr": "hrvatski", "sk": "slovenčina", "bg": "български", "ca": "català", "sl": "slovenščina",
    "lt": "lietuvių", "lv": "latviešu", "et": "eesti", "sr": "српски", "mk": "македонски", "bs": "bosanski",
    "is": "íslenska", "gl": "galego", "eu": "euskara", "sq": "shqip", "be": "беларуская", "mt": "Malti",
    "cy": "Cymraeg", "lb": "Lëtzebuergesch", "nn": "nynorsk", "fo": "føroyskt", "br": "brezhoneg",
    "oc": "occitan",
}
"""Names of the European languages in themselves, for pickers."""

ESPEAK = {
    "en": "en-us", "fr": "fr-fr", "pt": "pt-br", "no": "nb", "nn": "nb", "zh": "cmn", "gl": "pt", "br": "fr-fr",
    "oc": "ca",
}
"""espeak-ng voice for a Whisper language, where the code differs. Galician, Breton and Occitan have no
espeak-ng voice here: the nearest language reads them (Portuguese, French, Catalan)."""

BORROWED = {"gl": "pt", "br": "fr", "oc": "ca"}
"""Languages read with a neighbour's phonemes."""

ESPEAK_LANGUAGES = frozenset(
    "af am ar as az ba be bg bn bs ca cs cy da de el en es et eu fa fi fo fr gu haw he hi hr ht hu hy id is it ja "
    "ka kk kn ko la lb lt lv mi mk ml mr ms mt my ne nl no pa pl pt ro ru sd si sk sl sq sr sv sw ta te th tk tr "
    "tt uk ur uz vi zh yue".split()
)
"""Whisper languages that espeak-ng (as shipped by espeakng-loader) can read, by their Whisper code."""


def name(code: str) -> str:
    return NAMES.get(code, code)


def espeak_voice(code: str) -> str | None:
    """The espeak-ng language that reads this Whisper language, or None."""
    if code in ESPEAK:
        return ESPEAK[code]
    return code if code in ESPEAK_LANGUAGES else None


def normalise(code: str | None) -> str | None:
    """'en-US' -> 'en'; '' / 'auto' / None -> None."""
    if not code or code.lower() == "auto":
        return None
    return code.replace("_", "-").split("-")[0].lower()
