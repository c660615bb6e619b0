"""The default voice of every European language, through the real ASR: round-trip character error rate on
sentences the voice choice never saw (bench/voices.py chose on other ones), and the voice listing.

Two sentences per language keep this to a couple of minutes on 2 cores."""

from __future__ import annotations

import pytest
from stemme.voice import languages
from stemme.voice.asr import AsrOptions
from stemme.voice.audio import resample

from stemme.scoring import char_errors

FURTHER = {
    "ru": ["Пожалуйста, перезвоните мне завтра утром.", "Я с удовольствием помогу вам с этим."],
    "cs": ["Zavolejte mi prosím zítra ráno zpátky.", "S tím vám rád pomůžu."],
    "uk": ["Будь ласка, передзвоніть мені завтра вранці.", "Я охоче допоможу вам із цим."],
    "sv": ["Ring mig tillbaka i morgon bitti, tack.", "Jag hjälper dig gärna med det."],
    "da": ["Ring venligst tilbage til mig i morgen tidlig.", "Jeg hjælper dig gerne med det."],
    "no": ["Vær så snill og ring meg tilbake i morgen tidlig.", "Jeg hjelper deg gjerne med det."],
    "fi": ["Soita minulle takaisin huomenna aamulla.", "Autan sinua siinä mielelläni."],
    "el": ["Παρακαλώ, πάρτε με τηλέφωνο αύριο το πρωί.", "Μπορώ ευχαρίστως να σας βοηθήσω με αυτό."],
    "ro": ["Vă rog să mă sunați înapoi mâine dimineață.", "Vă pot ajuta cu plăcere cu asta."],
    "hu": ["Kérem, hívjon vissza holnap reggel.", "Szívesen segítek ebben."],
    "hr": ["Molim vas, nazovite me sutra ujutro.", "Rado ću vam pomoći s tim."],
    "sk": ["Zavolajte mi, prosím, zajtra ráno späť.", "Rád vám s tým pomôžem."],
    "bg": ["Моля, обадете ми се утре сутринта.", "С удоволствие ще ви помогна с това."],
    "ca": ["Si us plau, truca'm demà al matí.", "T'hi puc ajudar amb molt de gust."],
    "sl": ["Prosim, pokličite me jutri zjutraj.", "Z veseljem vam pomagam pri tem."],
    "sr": ["Молим вас, позовите ме сутра ујутру.", "Радо ћу вам помоћи у томе."],
    "mk": ["Ве молам, јавете ми се утре наутро.", "Со задоволство ќе ви помогнам со тоа."],
    "bs": ["Molim vas, pozovite me sutra ujutro.", "Rado ću vam pomoći oko toga."],
    "lt": ["Prašau paskambinti man rytoj ryte.", "Mielai jums padėsiu."],
    "lv": ["Lūdzu, piezvaniet man rīt no rīta.", "Es labprāt jums ar to palīdzēšu."],
    "et": ["Palun helistage mulle homme hommikul tagasi.", "Aitan teid selles meeleldi."],
    "is": ["Vinsamlegast hringdu í mig á morgun.", "Ég get gjarnan hjálpað þér með það."],
    "gl": ["Por favor, chámame mañá pola mañá.", "Podo axudarte con iso con moito gusto."],
    "eu": ["Mesedez, deitu iezadazu bihar goizean.", "Gustura lagunduko dizut horretan."],
    "sq": ["Ju lutem, më telefononi nesër në mëngjes.", "Me kënaqësi do t'ju ndihmoj me këtë."],
    "be": ["Калі ласка, перазваніце мне заўтра раніцай.", "Я з задавальненнем дапамагу вам з гэтым."],
}
"""Test sentences (not in bench/data/voice_sentences.json): 'Please call me back tomorrow morning.' and 'I can
gladly help you with that.'"""

CER_MAX = 0.30
TESTED = ("ru", "cs", "uk", "sv", "fi", "el", "ro", "hu", "hr", "sk", "bg", "ca")
"""The further languages whose round trip is held to CER_MAX here (the issue asks for at least ten). Measured
on these sentences (docs/voices.md): 0.06 (fi) to 0.24 (el). Not held to it: Danish (0.47: Whisper base hears
the accented Danish badly, and espeak-ng's Danish phonemes are themselves rough), and the languages in FURTHER
measured in docs/voices.md only."""


@pytest.fixture(scope="module")
def round_trip(engines):
    """CER and what Whisper heard, per language, with the default voice (loaded once for the module)."""
    tts, asr = engines.tts, engines.asr
    out = {}
    for lang in TESTED:
        voice = tts.registry.resolve(lang)
        errors = total = 0
        heard = []
        for text in FURTHER[lang]:
            audio = tts.synthesize(text, voice)
            t = asr.transcribe(resample(audio.samples, audio.rate, 16000), AsrOptions(language=lang))
            e, n = char_errors(t.text, text, language=lang)
            errors, total = errors + e, total + n
            heard.append(t.text)
        out[lang] = (errors / total, voice.name, heard)
    return out


@pytest.mark.parametrize("lang", TESTED)
def test_round_trip_in_further_european_languages(round_trip, lang):
    cer, voice, heard = round_trip[lang]
    assert cer <= CER_MAX, f"{lang} via {voice}: CER {cer:.3f}; heard {heard}"


def test_every_european_language_has_a_voice(engines):
    reg = engines.tts.registry
    for lang in languages.EUROPEAN:
        v = reg.resolve(lang)
        assert v.language == lang and reg.available(v), lang


def test_default_voices_are_native_where_a_native_voice_exists(engines):
    reg = engines.tts.registry
    assert reg.resolve("en").name == "piper:en_US-joe-medium"
    assert reg.resolve("fr").style == "ff_siwis"
    assert reg.resolve("es").style in ("ef_dora", "em_alex", "em_santa")
    assert reg.resolve("it").style in ("if_sara", "im_nicola")
    assert reg.resolve("pt").style in ("pf_dora", "pm_alex", "pm_santa")
    assert reg.resolve("de").engine == "pico"
    for lang in languages.EUROPEAN:
        assert reg.resolve(lang).style != "jm_kumo", lang


def test_every_voice_is_listed_with_engine_language_and_notes(engines):
    reg = engines.tts.registry
    listed = [v for lang in languages.EUROPEAN for v in reg.for_language(lang)]
    assert {v.engine for v in listed} >= {"kokoro", "pico", "piper", "espeak"}
    for v in listed:
        assert v.language in languages.NAMES and v.description, v


def test_v1_voices_offers_every_european_language_and_its_voices(engines):
    from stemme.streaming.server import ServerConfig, StemmeServer

    data = StemmeServer(engines, ServerConfig(port=0)).voices()
    codes = [lang["code"] for lang in data["languages"]]
    assert codes[: len(languages.SUPPORTED)] == list(languages.SUPPORTED)
    assert set(languages.EUROPEAN) <= set(codes)
    by_lang: dict[str, list[dict]] = {}
    for v in data["voices"]:
        assert {"name", "language", "engine", "description", "default"} <= set(v)
        by_lang.setdefault(v["language"], []).append(v)
    for code in languages.EUROPEAN:
        assert [v["default"] for v in by_lang[code]].count(True) == 1, code
    assert by_lang["de"][0]["engine"] == "pico" and by_lang["cs"][0]["engine"] == "kokoro"


def test_stemme_voices_command_lists_engine_and_notes():
    import json
    import subprocess
    import sys

    p = subprocess.run([sys.executable, "-m", "stemme.cli", "voices", "--json"], capture_output=True, text=True,
                       timeout=300)
    assert p.returncode == 0, p.stderr
    rows = [json.loads(line) for line in p.stdout.splitlines()]
    defaults = {r["language"]: r for r in rows if r["default"]}
    assert set(defaults) >= set(languages.EUROPEAN)
    assert defaults["ru"]["engine"] == "kokoro" and defaults["ru"]["language_name"] == "Russian"
    assert all(r["description"] for r in rows)
