"""Tests of dynprompt_sb.toy_corpus: layout, trials, speakers, caching."""

import glob
import os
import re

import numpy as np
import pytest
import soundfile
from scipy import signal

import dynprompt_sb.toy_corpus as toy_corpus
from dynprompt_sb.toy_corpus import make_toy_corpus
from dynprompt_sb.trials import read_trials, trial_utterances

SMALL = dict(
    num_train_speakers=2,
    num_test_speakers=3,
    sessions_per_speaker=2,
    utts_per_session=2,
    min_duration=0.6,
    max_duration=1.0,
)


@pytest.fixture(scope="module")
def small_corpus(tmp_path_factory):
    return make_toy_corpus(tmp_path_factory.mktemp("toy"), **SMALL)


def wav_files(folder):
    return sorted(glob.glob(os.path.join(folder, "wav", "*", "*", "*.wav")))


def test_voxceleb_layout_and_ids(small_corpus):
    assert small_corpus["train_speakers"] == ["id10001", "id10002"]
    assert small_corpus["test_speakers"] == ["id10003", "id10004", "id10005"]
    files = wav_files(small_corpus["data_folder"])
    assert len(files) == 5 * 2 * 2
    pattern = re.compile(r"id1\d{4}/[A-Za-z0-9]{11}/0000[12]\.wav$")
    for path in files:
        assert pattern.search(path.replace(os.sep, "/")), path
    sessions = {os.path.dirname(path) for path in files}
    assert len(sessions) == 5 * 2


def test_wavs_are_16k_mono_pcm16_of_the_asked_durations(small_corpus):
    for path in wav_files(small_corpus["data_folder"]):
        info = soundfile.info(path)
        assert (info.samplerate, info.channels) == (16000, 1)
        assert info.subtype == "PCM_16"
        assert 0.6 <= info.frames / 16000 <= 1.0
        samples, _ = soundfile.read(path)
        assert 0.05 < np.abs(samples).max() < 1.0
        assert np.all(np.isfinite(samples))


def test_utterances_differ_in_length_and_content(small_corpus):
    files = wav_files(small_corpus["data_folder"])
    lengths = {soundfile.info(path).frames for path in files}
    assert len(lengths) == len(files)


def test_trials_balanced_over_test_speakers_only(small_corpus):
    trials_path = small_corpus["trials"]
    assert trials_path == os.path.join(
        small_corpus["data_folder"], "meta", "trials.txt"
    )
    trials = read_trials(trials_path)
    labels = [label for label, _, _ in trials]
    assert labels.count(1) == labels.count(0) > 0
    for label, enrol_id, test_id in trials:
        same_speaker = enrol_id.split("/")[0] == test_id.split("/")[0]
        assert same_speaker == (label == 1)
        assert enrol_id != test_id
    speakers = {u.split("/")[0] for u in trial_utterances(trials)}
    assert speakers == set(small_corpus["test_speakers"])
    test_files = {
        path.replace(os.sep, "/").split("/wav/")[1][: -len(".wav")]
        for path in wav_files(small_corpus["data_folder"])
        if path.replace(os.sep, "/").split("/wav/")[1][:7] in speakers
    }
    assert set(trial_utterances(trials)) == test_files
    assert len({(e, t) for _, e, t in trials}) == len(trials)


def test_same_seed_same_corpus_other_seed_other_corpus(tmp_path):
    tiny = dict(SMALL, num_train_speakers=1, num_test_speakers=2)
    first = make_toy_corpus(tmp_path / "a", seed=3, **tiny)
    again = make_toy_corpus(tmp_path / "b", seed=3, **tiny)
    other = make_toy_corpus(tmp_path / "c", seed=4, **tiny)

    def contents(corpus):
        return [
            open(path, "rb").read() for path in wav_files(corpus["data_folder"])
        ]

    assert contents(first) == contents(again)
    assert open(first["trials"]).read() == open(again["trials"]).read()
    assert contents(first) != contents(other)


def test_rerun_on_a_complete_folder_skips_the_work(tmp_path, monkeypatch):
    tiny = dict(SMALL, num_train_speakers=1, num_test_speakers=2)
    corpus = make_toy_corpus(tmp_path, **tiny)

    def fail(*args, **kwargs):
        raise AssertionError("regenerated a complete corpus")

    monkeypatch.setattr(toy_corpus, "_synthesize", fail)
    assert make_toy_corpus(tmp_path, **tiny) == corpus


def test_half_written_folder_is_regenerated(tmp_path, monkeypatch):
    tiny = dict(SMALL, num_train_speakers=1, num_test_speakers=2)
    real_synthesize = toy_corpus._synthesize
    calls = []

    def crash_on_third(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real_synthesize(*args, **kwargs)

    monkeypatch.setattr(toy_corpus, "_synthesize", crash_on_third)
    with pytest.raises(KeyboardInterrupt):
        make_toy_corpus(tmp_path, **tiny)
    assert not os.path.exists(tmp_path / "meta" / toy_corpus.MARKER_FILE)
    monkeypatch.setattr(toy_corpus, "_synthesize", real_synthesize)

    corpus = make_toy_corpus(tmp_path, **tiny)
    assert len(wav_files(tmp_path)) == 3 * 2 * 2
    assert len(read_trials(corpus["trials"])) == 2 * 2 * 2 * 2
    assert not os.path.exists(tmp_path / "meta" / toy_corpus.PARTIAL_FILE)


def test_other_arguments_replace_the_old_corpus(tmp_path):
    tiny = dict(SMALL, num_train_speakers=2, num_test_speakers=2)
    make_toy_corpus(tmp_path, **tiny)
    corpus = make_toy_corpus(tmp_path, **dict(tiny, num_train_speakers=1))
    speakers = sorted(os.listdir(tmp_path / "wav"))
    assert speakers == corpus["train_speakers"] + corpus["test_speakers"]
    assert len(speakers) == 3


def test_refuses_a_folder_it_did_not_write(tmp_path):
    foreign = tmp_path / "wav" / "id00001" / "abc"
    foreign.mkdir(parents=True)
    (foreign / "00001.wav").write_bytes(b"not ours")
    with pytest.raises(FileExistsError, match="did not write"):
        make_toy_corpus(tmp_path, **SMALL)
    assert (foreign / "00001.wav").read_bytes() == b"not ours"


@pytest.mark.parametrize(
    "bad, match",
    [
        (dict(num_test_speakers=1), "num_test_speakers"),
        (dict(sessions_per_speaker=1, utts_per_session=1), "at least 2"),
        (dict(min_duration=2.0, max_duration=1.0), "min_duration"),
        (dict(sample_rate=4000), "sample_rate"),
        (dict(num_train_speakers=1.5), "num_train_speakers"),
        (dict(seed=-1), "seed"),
    ],
)
def test_bad_arguments_are_named(tmp_path, bad, match):
    with pytest.raises(ValueError, match=match):
        make_toy_corpus(tmp_path, **dict(SMALL, **bad))
    assert not os.path.exists(tmp_path / "wav")


def test_other_sample_rates(tmp_path):
    corpus = make_toy_corpus(
        tmp_path, **dict(SMALL, num_test_speakers=2, sample_rate=8000)
    )
    path = wav_files(corpus["data_folder"])[0]
    samples, sample_rate = soundfile.read(path)
    assert sample_rate == 8000 and np.all(np.isfinite(samples))


def mean_log_mel_spectrum(samples, sample_rate, num_bands=24):
    """Log power in mel-spaced bands, averaged over the utterance."""
    frequencies, power = signal.welch(samples, sample_rate, nperseg=512)
    mel_edges = np.linspace(
        hertz_to_mel(100.0), hertz_to_mel(0.95 * sample_rate / 2), num_bands + 1
    )
    edges = 700.0 * (10 ** (mel_edges / 2595.0) - 1.0)
    band_power = [
        power[(frequencies >= low) & (frequencies < high)].mean()
        for low, high in zip(edges[:-1], edges[1:], strict=True)
    ]
    return np.log(np.array(band_power) + 1e-12)


def hertz_to_mel(hertz):
    return 2595.0 * np.log10(1.0 + hertz / 700.0)


def test_speakers_are_distinguishable_by_their_mean_spectrum(tmp_path):
    """Crude speaker verification: same-speaker utterances sound closer.

    Each utterance is summarised by its mean log mel spectrum, less its
    mean over bands (so loudness does not count); trials are scored by
    the cosine of these vectors after removing their average.
    """
    corpus = make_toy_corpus(
        tmp_path,
        num_train_speakers=1,
        num_test_speakers=10,
        sessions_per_speaker=2,
        utts_per_session=2,
        min_duration=1.0,
        max_duration=1.5,
    )
    trials = read_trials(corpus["trials"])
    summaries = {}
    for utterance_id in trial_utterances(trials):
        path = os.path.join(corpus["data_folder"], "wav", utterance_id)
        samples, sample_rate = soundfile.read(path + ".wav")
        spectrum = mean_log_mel_spectrum(samples, sample_rate)
        summaries[utterance_id] = spectrum - spectrum.mean()
    average = np.mean(list(summaries.values()), axis=0)

    def score(enrol_id, test_id):
        a = summaries[enrol_id] - average
        b = summaries[test_id] - average
        return a @ b / np.linalg.norm(a) / np.linalg.norm(b)

    targets = np.array([score(e, t) for label, e, t in trials if label])
    others = np.array([score(e, t) for label, e, t in trials if not label])
    # Share of (target, non-target) pairs ranked the right way round: 0.5
    # for speakers that all sound alike. Across seeds it lies near 0.8.
    ranked_right = np.mean(targets[:, None] > others[None, :])
    assert ranked_right > 0.7
