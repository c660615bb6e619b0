"""Speech recognition on real recordings.

Thresholds come from measurement (bench/asr.py, docs/benchmarks.md) on these very files with the default
short-context mode: en 0.05, es 0.15, fr 0.12, it 0.11, nl 0.44 WER. Each bound leaves room for a word or two
of run-to-run and CPU-to-CPU difference (about 40 reference words per language), and stays far below what a
broken engine gives (1.0). Dutch is low-bitrate acted game dialogue: a noisy-condition case.
"""

from __future__ import annotations

from collections import defaultdict

import pytest
from stemme.voice.asr import AsrOptions
from stemme.voice.audio import read_wav
from stemme.voice.languages import SUPPORTED

from stemme.scoring import word_errors
from tests.conftest import SPEECH

WER_MAX = {"en": 0.10, "es": 0.25, "fr": 0.22, "it": 0.20, "nl": 0.60}


def _sentences(manifest):
    return [r for r in manifest if r["kind"] not in ("isolated word", "isolated phrase")]


@pytest.fixture(scope="module")
def wer_by_language(engines, manifest):
    errs = defaultdict(lambda: [0, 0])
    for row in _sentences(manifest):
        audio = read_wav(SPEECH / row["path"])
        t = engines.asr.transcribe(audio.samples, AsrOptions(language=row["language"]))
        e, n = word_errors(t.text, row["transcript"])
        errs[row["language"]][0] += e
        errs[row["language"]][1] += n
    return {k: e / n for k, (e, n) in errs.items()}


@pytest.mark.parametrize("lang", sorted(WER_MAX))
def test_word_error_rate(wer_by_language, lang):
    assert wer_by_language[lang] <= WER_MAX[lang], f"{lang} WER {wer_by_language[lang]:.3f}"


def test_language_detection_restricted_to_configured_languages(engines, manifest):
    # STEMME_LANGUAGES restricts detection (the default detects every language: tests/test_languages.py)
    rows = [r for r in _sentences(manifest) if r["language"] in SUPPORTED]
    right = 0
    wrong = []
    for row in rows:
        t = engines.asr.transcribe(read_wav(SPEECH / row["path"]).samples, AsrOptions(languages=SUPPORTED))
        if t.language == row["language"]:
            right += 1
            assert 0 < t.language_probability <= 1
        else:
            wrong.append((row["path"], t.language))
    # measured: 30/30 right; one miss is tolerated
    assert right >= len(rows) - 1, wrong


def test_full_context_mode_agrees(engines, manifest):
    from stemme.models.faster_whisper_asr import FasterWhisperRecognizer

    asr = engines.asr
    assert isinstance(asr, FasterWhisperRecognizer)
    a = read_wav(SPEECH / "en" / "jfk.wav").samples
    asr.short_context = False
    try:
        full = asr.transcribe(a, AsrOptions(language="en"))
    finally:
        asr.short_context = True
    short = asr.transcribe(a, AsrOptions(language="en"))
    assert full.text and short.text
    assert word_errors(short.text, full.text)[0] <= 2


def test_result_fields(engines):
    a = read_wav(SPEECH / "fr" / "asterisk_conf-onlyperson.wav")
    t = engines.asr.transcribe(a.samples)
    assert t.language == "fr"
    assert "conférence" in t.text.lower() or "conference" in t.text.lower()
    assert abs(t.audio_seconds - a.seconds) < 0.01
    assert t.seconds > 0
