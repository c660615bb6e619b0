"""Streaming VAD: the logic with a fake model, and the real Silero model on real speech."""

from __future__ import annotations

import numpy as np
from stemme.voice.audio import read_wav
from stemme.voice.vad import FRAME, SpeechPaused, SpeechStarted, SpeechStopped, VadOptions, VadStream

from tests.conftest import SPEECH


class FakeSpeechModel:
    """Fake for logic tests: a frame is 'speech' when its mean absolute amplitude passes 0.1."""

    def new_state(self):
        return None

    def __call__(self, frames, state):
        return (np.abs(frames).mean(axis=1) > 0.1).astype(np.float32)


def _signal(pattern: list[tuple[bool, float]]) -> np.ndarray:
    return np.concatenate([np.full(int(s * 16000), 0.5 if on else 0.0, np.float32) for on, s in pattern])


def feed_in_chunks(vad: VadStream, x: np.ndarray, chunk: int = 320, paused: bool = False):
    events = []
    for i in range(0, len(x), chunk):
        events += vad.feed(x[i:i + chunk])
    return events if paused else [e for e in events if not isinstance(e, SpeechPaused)]


def test_pause_carries_exactly_the_audio_of_the_stop():
    vad = VadStream(FakeSpeechModel(), VadOptions(silence_duration_ms=500, trailing_ms=200))
    ev = feed_in_chunks(vad, _signal([(False, 0.5), (True, 1.0), (False, 0.2), (True, 0.5), (False, 1.0)]),
                        paused=True)
    kinds = [type(e) for e in ev]
    assert kinds == [SpeechStarted, SpeechPaused, SpeechPaused, SpeechStopped]
    assert len(ev[1].audio) < len(ev[2].audio)  # speech resumed after the first pause
    assert np.array_equal(ev[2].audio, ev[3].audio)


def test_start_and_stop_with_padding_and_silence_duration():
    vad = VadStream(FakeSpeechModel(), VadOptions(prefix_padding_ms=300, silence_duration_ms=500))
    ev = feed_in_chunks(vad, _signal([(False, 1.0), (True, 1.0), (False, 1.0)]))
    assert [type(e) for e in ev] == [SpeechStarted, SpeechStopped]
    assert abs(ev[0].audio_start_ms - 700) <= 64  # 1000 ms start - 300 ms padding
    assert abs(ev[1].audio_end_ms - 2000) <= 64
    # utterance = padding + speech + some trailing silence, never the whole stream
    assert 1.25 <= len(ev[1].audio) / 16000 <= 1.6


def test_short_pause_does_not_end_the_turn_and_clicks_are_ignored():
    vad = VadStream(FakeSpeechModel(), VadOptions(silence_duration_ms=500, min_speech_ms=160))
    ev = feed_in_chunks(vad, _signal([(False, 0.5), (True, 0.064), (False, 1.0), (True, 0.6), (False, 0.3),
                                      (True, 0.6), (False, 0.8)]))
    assert [type(e) for e in ev] == [SpeechStarted, SpeechStopped]


def test_max_speech_forces_an_end():
    vad = VadStream(FakeSpeechModel(), VadOptions(max_speech_s=2.0))
    ev = feed_in_chunks(vad, _signal([(True, 5.0)]))
    stops = [e for e in ev if isinstance(e, SpeechStopped)]
    assert stops and stops[0].forced


def test_odd_chunk_sizes_keep_the_clock():
    vad = VadStream(FakeSpeechModel())
    x = _signal([(False, 1.0), (True, 1.0), (False, 1.0)])
    ev = feed_in_chunks(vad, x, chunk=333)
    assert vad.samples_seen == len(x)
    assert isinstance(ev[0], SpeechStarted)


def test_silero_detects_real_speech(engines):
    a = read_wav(SPEECH / "en" / "asterisk_tt-weasels.wav")
    x = np.concatenate([np.zeros(16000, np.float32), a.samples, np.zeros(16000, np.float32)])
    vad = VadStream(engines.vad, VadOptions(silence_duration_ms=700))
    ev = feed_in_chunks(vad, x, chunk=480)
    assert [type(e) for e in ev] == [SpeechStarted, SpeechStopped]
    assert 300 <= ev[0].audio_start_ms <= 1600
    speech = ev[1].audio
    assert 1.5 <= len(speech) / 16000 <= len(x) / 16000 - 1.0


def test_silero_stays_quiet_on_silence_and_noise(engines):
    rng = np.random.default_rng(0)
    vad = VadStream(engines.vad)
    x = np.concatenate([np.zeros(16000, np.float32), (rng.standard_normal(32000) * 0.003).astype(np.float32)])
    assert feed_in_chunks(vad, x) == []
    assert FRAME == 512


class FakeEndOfTurn:
    """Fake end-of-turn model for logic tests: answers a fixed probability and records the audio it heard."""

    def __init__(self, p: float) -> None:
        self.p = p
        self.heard: list[int] = []

    def __call__(self, audio):
        self.heard.append(len(audio))
        return self.p


def test_a_complete_turn_ends_at_the_first_pause_and_an_incomplete_one_waits():
    x = _signal([(False, 0.5), (True, 1.0), (False, 2.5)])
    opts = VadOptions(silence_duration_ms=1200, trailing_ms=200, complete_threshold=0.5)
    sure = FakeEndOfTurn(0.9)
    ev = feed_in_chunks(VadStream(FakeSpeechModel(), opts, sure), x, paused=True)
    assert [type(e) for e in ev] == [SpeechStarted, SpeechStopped]  # no pause event: the turn just ended
    ended_early = ev[1]
    unsure = FakeEndOfTurn(0.1)
    vad = VadStream(FakeSpeechModel(), opts, unsure)
    ev = feed_in_chunks(vad, x, paused=True)
    assert [type(e) for e in ev] == [SpeechStarted, SpeechPaused, SpeechStopped]
    assert vad.last_probability == 0.1 and len(sure.heard) == len(unsure.heard) == 1
    # the same utterance either way; only the moment differs (200 ms against 1200 ms of silence)
    assert np.array_equal(ended_early.audio, ev[2].audio)
    assert ended_early.audio_end_ms == ev[2].audio_end_ms


def test_the_end_of_turn_model_is_asked_at_every_pause():
    eot = FakeEndOfTurn(0.2)
    vad = VadStream(FakeSpeechModel(), VadOptions(silence_duration_ms=1000, trailing_ms=200), eot)
    ev = feed_in_chunks(vad, _signal([(False, 0.3), (True, 0.8), (False, 0.4), (True, 0.8), (False, 1.5)]))
    assert [type(e) for e in ev] == [SpeechStarted, SpeechStopped]
    assert len(eot.heard) == 2 and eot.heard[0] < eot.heard[1]


def test_smart_turn_hears_complete_and_cut_sentences():
    """The real end-of-turn model: a whole sentence followed by 200 ms of silence is complete; its first half
    is not (two clips where the half ends inside a clause)."""
    from stemme.models.smart_turn import SmartTurn

    model = SmartTurn()
    for path in ("en/asterisk_tt-weasels.wav", "fr/asterisk_conf-onlyperson.wav"):
        audio = read_wav(SPEECH / path).samples
        pause = np.zeros(3200, np.float32)
        assert model.probability(np.concatenate([audio, pause])) > 0.8, path
        assert model.probability(np.concatenate([audio[: len(audio) // 2], pause])) < 0.3, path
