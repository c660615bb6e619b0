"""Languages beyond the eight: detection among every Whisper language (no clamp), its prior toward the tested
languages when Whisper is unsure, Russian and Czech recordings against bare faster-whisper, and the names the
reply instruction needs."""

from __future__ import annotations

from collections import defaultdict

import pytest
from stemme.voice import languages
from stemme.voice.asr import AsrOptions, choose_language
from stemme.voice.audio import read_wav

from stemme.config import EngineConfig
from stemme.scoring import word_errors
from tests.conftest import SPEECH

WORDS = ("isolated word", "isolated phrase")
REQUIRED = ("ru", "cs", "uk", "sv", "da", "fi", "el", "ro", "hu", "hr", "sk", "bg", "ca", "no")


def test_every_european_language_is_named_for_the_reply_instruction():
    for code in (*languages.SUPPORTED, *REQUIRED, *languages.EUROPEAN):
        assert languages.name(code) != code, code
        assert code in languages.NATIVE, code
    assert set(languages.WHISPER) <= set(languages.NAMES)
    assert languages.name("ru") == "Russian" and languages.name("cs") == "Czech"


def test_detection_is_not_clamped_by_default():
    assert EngineConfig.from_env({}).languages == ()
    assert EngineConfig.from_env({"STEMME_LANGUAGES": "cs,sk"}).languages == ("cs", "sk")


def test_choose_language_prior_logic():
    # logic only: hand-made probabilities
    sure = [("ru", 0.97), ("pl", 0.02), ("uk", 0.01)]
    unsure = [("tr", 0.42), ("ar", 0.21), ("pt", 0.05), ("en", 0.02)]
    assert choose_language(sure, AsrOptions()) == ("ru", 0.97)
    assert choose_language(unsure, AsrOptions()) == ("pt", 0.05)
    assert choose_language(unsure, AsrOptions(prefer_below=0)) == ("tr", 0.42)
    assert choose_language(sure, AsrOptions(languages=languages.SUPPORTED)) == ("pl", 0.02)
    assert choose_language([("sk", 0.45), ("cs", 0.40)], AsrOptions(prefer=("cs",))) == ("cs", 0.40)


@pytest.fixture(scope="module")
def word_ids(engines, manifest):
    """Language ID on the German and Portuguese single-word recordings: clamped to the eight (the old default),
    over every language with no prior, and over every language with the prior (the new default)."""
    modes = {"clamped": AsrOptions(languages=languages.SUPPORTED), "bare": AsrOptions(prefer_below=0),
             "default": AsrOptions()}
    right: dict[tuple[str, str], int] = defaultdict(int)
    for row in manifest:
        if row["kind"] in WORDS and row["language"] in ("de", "pt"):
            audio = read_wav(SPEECH / row["path"]).samples
            for mode, opts in modes.items():
                right[(mode, row["language"])] += engines.asr.transcribe(audio, opts).language == row["language"]
    return dict(right)


@pytest.mark.parametrize("lang", ["de", "pt"])
def test_single_word_language_id_does_not_regress_without_the_clamp(word_ids, lang):
    # measured (docs/voices.md): de 1/6 in every mode; pt clamped 2/6, bare 1/6, default (prior) 2/6
    assert word_ids[("default", lang)] >= word_ids[("clamped", lang)], word_ids


def test_sentence_language_id_over_every_language(engines, manifest):
    rows = [r for r in manifest if r["kind"] not in WORDS]
    wrong = []
    for row in rows:
        t = engines.asr.transcribe(read_wav(SPEECH / row["path"]).samples, AsrOptions())
        if t.language != row["language"]:
            wrong.append((row["path"], t.language))
    # measured: 2 misses in 38 (a Spanish prompt heard as Italian, as with the clamp; one short Czech line as
    # Slovak); three is tolerated
    assert len(wrong) <= 3, wrong


@pytest.fixture(scope="module")
def ru_cs(engines, manifest):
    """WER per language of Stemme's path (detected language, short context, greedy) and of bare faster-whisper
    (WhisperModel.transcribe with its defaults: detection, 30 s window, beam 5) on the same model."""
    from stemme.models.faster_whisper_asr import FasterWhisperRecognizer

    asr = engines.asr
    assert isinstance(asr, FasterWhisperRecognizer)
    out: dict[str, dict[str, list[int]]] = {"stemme": defaultdict(lambda: [0, 0]),
                                            "bare": defaultdict(lambda: [0, 0])}
    langs: dict[str, list[str]] = defaultdict(list)
    for row in manifest:
        if row["language"] not in ("ru", "cs"):
            continue
        audio = read_wav(SPEECH / row["path"]).samples
        t = asr.transcribe(audio, AsrOptions())
        langs[row["language"]].append(t.language)
        segments, _info = asr.model.transcribe(audio)
        bare = " ".join(s.text.strip() for s in segments)
        for name, text in (("stemme", t.text), ("bare", bare)):
            e, n = word_errors(text, row["transcript"])
            out[name][row["language"]][0] += e
            out[name][row["language"]][1] += n
    wer = {name: {lang: e / n for lang, (e, n) in d.items()} for name, d in out.items()}
    return wer, langs


def test_russian_is_transcribed_in_russian(ru_cs):
    wer, langs = ru_cs
    assert langs["ru"] == ["ru"] * 5, langs
    # measured: Stemme 0.18, bare faster-whisper 0.27, the old clamp 0.97 (docs/voices.md)
    assert wer["stemme"]["ru"] <= wer["bare"]["ru"] + 0.10, wer


def test_czech_is_transcribed_in_czech(ru_cs):
    wer, langs = ru_cs
    assert langs["cs"].count("cs") >= 2, langs
    # measured: Stemme 0.57, bare faster-whisper 0.57 (the same short line heard as Slovak), the old clamp 0.74
    assert wer["stemme"]["cs"] <= wer["bare"]["cs"] + 0.15, wer
