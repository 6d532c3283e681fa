"""Tests of the recipe's voxceleb_prepare: CSVs, splits, reuse, errors."""

import csv
import doctest
import json
import os
import sys

import numpy as np
import pytest
import soundfile

RECIPE_DIR = os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
    "recipes",
    "VoxCeleb",
    "SpeakerRec",
)
sys.path.insert(0, RECIPE_DIR)

import voxceleb_prepare  # noqa: E402
from voxceleb_prepare import prepare_voxceleb  # noqa: E402

from dynprompt_sb.audio import AudioError  # noqa: E402

HEADER = ["ID", "duration", "wav", "start", "stop", "spk_id"]
# Speaker -> session -> number of utterances; id10009 and id10010 are the
# test speakers of the trial list below.
LAYOUT = {
    "id10001": {"sessA": 4, "sessB": 6},
    "id10002": {"sessC": 10},
    "id10003": {"sessD": 1},
    "id10009": {"sessE": 2},
    "id10010": {"sessF": 2},
}
TRIAL_LINES = [
    "1 id10009/sessE/00001.wav id10009/sessE/00002.wav",
    "0 id10009/sessE/00001.wav id10010/sessF/00001.wav",
    "",
    "1 id10010/sessF/00001.wav id10010/sessF/00002.wav",
]


def make_corpus(root, layout=LAYOUT, sample_rate=16000):
    """Writes short wavs of distinct lengths; returns {id: frames}."""
    frames = {}
    for number, (speaker, sessions) in enumerate(sorted(layout.items())):
        for session, count in sessions.items():
            folder = root / "wav" / speaker / session
            folder.mkdir(parents=True, exist_ok=True)
            for utt in range(1, count + 1):
                length = 800 + 37 * utt + 5 * number
                utterance_id = f"{speaker}/{session}/{utt:05d}"
                soundfile.write(
                    str(folder / f"{utt:05d}.wav"),
                    np.zeros(length),
                    sample_rate,
                    subtype="PCM_16",
                )
                frames[utterance_id] = length
    return frames


def write_trials(path, lines=TRIAL_LINES):
    path.write_text("\n".join(lines) + "\n")
    return path


def read_csv(path):
    with open(path, newline="") as csv_file:
        rows = list(csv.reader(csv_file))
    assert rows[0] == HEADER
    return [dict(zip(HEADER, row, strict=True)) for row in rows[1:]]


@pytest.fixture
def corpus(tmp_path):
    frames = make_corpus(tmp_path / "vox1")
    trials = write_trials(tmp_path / "trials.txt")
    return tmp_path / "vox1", trials, frames


def prepare(corpus, save_folder, **options):
    data_folder, trials, _ = corpus
    prepare_voxceleb(str(data_folder), str(save_folder), str(trials), **options)
    return {
        name: read_csv(save_folder / f"{name}.csv")
        for name in ("train", "dev", "test")
    }


def test_rows_describe_each_file(corpus, tmp_path):
    tables = prepare(corpus, tmp_path / "save")
    frames = corpus[2]
    for row in tables["train"] + tables["dev"] + tables["test"]:
        assert os.path.isabs(row["wav"]) and os.path.isfile(row["wav"])
        assert row["wav"].endswith(row["ID"].replace("/", os.sep) + ".wav")
        assert int(row["start"]) == 0
        assert int(row["stop"]) == frames[row["ID"]]
        assert float(row["duration"]) == pytest.approx(
            frames[row["ID"]] / 16000, abs=1e-6
        )
        assert row["spk_id"] == row["ID"].split("/")[0]


def test_trial_speakers_only_in_test(corpus, tmp_path):
    tables = prepare(corpus, tmp_path / "save")
    train_dev_speakers = {
        row["spk_id"] for row in tables["train"] + tables["dev"]
    }
    assert train_dev_speakers == {"id10001", "id10002", "id10003"}
    assert [row["ID"] for row in tables["test"]] == [
        "id10009/sessE/00001",
        "id10009/sessE/00002",
        "id10010/sessF/00001",
        "id10010/sessF/00002",
    ]
    train_dev_ids = [row["ID"] for row in tables["train"] + tables["dev"]]
    assert len(train_dev_ids) == len(set(train_dev_ids)) == 10 + 10 + 1


def test_split_per_speaker_by_ratio(corpus, tmp_path):
    tables = prepare(corpus, tmp_path / "save", split_ratio=[70, 30])

    def count(table, speaker):
        return sum(row["spk_id"] == speaker for row in table)

    for speaker, total in (("id10001", 10), ("id10002", 10)):
        assert count(tables["train"], speaker) == 7
        assert count(tables["dev"], speaker) == total - 7
    # A speaker with one utterance keeps it in train.
    assert count(tables["train"], "id10003") == 1
    assert count(tables["dev"], "id10003") == 0


def test_small_corpus_still_gets_a_dev_set(tmp_path):
    # 90/10 of 4 utterances rounds to 4/0 per speaker; dev must still get
    # 10% of the 16 training utterances, spread over speakers.
    layout = {f"id1000{n}": {"s": 4} for n in range(1, 5)}
    layout["id10009"] = {"sessE": 2}
    layout["id10010"] = {"sessF": 2}
    make_corpus(tmp_path / "vox", layout)
    trials = write_trials(tmp_path / "trials.txt")
    corpus = (tmp_path / "vox", trials, None)
    tables = prepare(corpus, tmp_path / "save", split_ratio=(90, 10))
    assert len(tables["dev"]) == 2
    assert len({row["spk_id"] for row in tables["dev"]}) == 2
    assert {row["spk_id"] for row in tables["train"]} == set(layout) - {
        "id10009",
        "id10010",
    }


def test_split_follows_the_seed(corpus, tmp_path):
    def dev_ids(seed, save):
        tables = prepare(corpus, tmp_path / save, seed=seed)
        return [row["ID"] for row in tables["dev"]]

    assert dev_ids(1, "a") == dev_ids(1, "b")
    assert dev_ids(1, "a") != dev_ids(2, "c")


def test_several_folders_and_trial_lists(tmp_path):
    make_corpus(tmp_path / "vox1")
    make_corpus(tmp_path / "vox2", {"id00001": {"s": 3}, "id00002": {"t": 2}})
    first = write_trials(tmp_path / "o.txt")
    second = write_trials(
        tmp_path / "h.txt", ["0 id10001/sessA/00001.wav id00002/t/00001.wav"]
    )
    save = tmp_path / "save"
    prepare_voxceleb(
        [str(tmp_path / "vox1"), str(tmp_path / "vox2")],
        str(save),
        [str(first), str(second)],
    )
    train_dev = read_csv(save / "train.csv") + read_csv(save / "dev.csv")
    speakers = {row["spk_id"] for row in train_dev}
    assert speakers == {"id10002", "id10003", "id00001"}
    test = {row["ID"]: row["wav"] for row in read_csv(save / "test.csv")}
    assert len(test) == 4 + 2
    assert str(tmp_path / "vox2") in test["id00002/t/00001"]


def test_min_duration_drops_short_training_utterances(corpus, tmp_path):
    frames = corpus[2]
    limit = 1000 / 16000
    tables = prepare(corpus, tmp_path / "save", min_duration=limit)
    kept = tables["train"] + tables["dev"]
    assert all(float(row["duration"]) >= limit for row in kept)
    expected = sum(
        1
        for utterance_id, length in frames.items()
        if length >= 1000
        and not utterance_id.startswith(("id10009", "id10010"))
    )
    assert len(kept) == expected < 21
    # Test utterances stay, whatever their length.
    assert len(tables["test"]) == 4


def test_rerun_with_same_options_skips(corpus, tmp_path, monkeypatch):
    save = tmp_path / "save"
    prepare(corpus, save)
    before = {
        name: os.stat(save / name).st_mtime_ns for name in os.listdir(save)
    }

    def fail(*args, **kwargs):
        raise AssertionError("reread the corpus")

    monkeypatch.setattr(voxceleb_prepare.soundfile, "info", fail)
    monkeypatch.setattr(voxceleb_prepare, "read_trials", fail)
    prepare(corpus, save, split_ratio=(90, 10))
    after = {
        name: os.stat(save / name).st_mtime_ns for name in os.listdir(save)
    }
    assert after == before


def test_rerun_with_other_options_prepares_again(corpus, tmp_path):
    save = tmp_path / "save"
    prepare(corpus, save, seed=1)
    prepare(corpus, save, seed=2)
    with open(save / voxceleb_prepare.OPTIONS_FILE) as options_file:
        assert json.load(options_file)["seed"] == 2


def test_error_leaves_previous_csvs_untouched(corpus, tmp_path):
    save = tmp_path / "save"
    prepare(corpus, save)
    before = {name: (save / name).read_bytes() for name in os.listdir(save)}
    corrupt = corpus[0] / "wav" / "id10002" / "sessC" / "99999.wav"
    corrupt.write_bytes(b"RIFF....WAVEnot really")
    with pytest.raises(AudioError, match="99999.wav"):
        prepare(corpus, save, seed=7)
    after = {name: (save / name).read_bytes() for name in os.listdir(save)}
    assert after == before


def test_crash_while_swapping_csvs_forces_a_new_preparation(
    corpus, tmp_path, monkeypatch
):
    save = tmp_path / "save"
    prepare(corpus, save, seed=1)
    real_replace = os.replace
    calls = []

    def crash_on_second(source, destination):
        calls.append(destination)
        if len(calls) == 2:
            raise OSError("disk gone")
        real_replace(source, destination)

    monkeypatch.setattr(voxceleb_prepare.os, "replace", crash_on_second)
    with pytest.raises(OSError, match="disk gone"):
        prepare(corpus, save, seed=2)
    monkeypatch.setattr(voxceleb_prepare.os, "replace", real_replace)
    assert not any(name.endswith(".tmp") for name in os.listdir(save))
    # train.csv is new, dev.csv old: neither options set may be trusted.
    for seed in (1, 2):
        options = dict(
            data_folder=[os.path.abspath(corpus[0])],
            verification_pairs_file=[os.path.abspath(corpus[1])],
            split_ratio=[90.0, 10.0],
            seed=seed,
            min_duration=0.0,
        )
        assert not voxceleb_prepare._already_prepared(str(save), options)


def test_skip_prep_writes_nothing(tmp_path):
    prepare_voxceleb(
        str(tmp_path / "absent"),
        str(tmp_path / "save"),
        str(tmp_path / "absent.txt"),
        skip_prep=True,
    )
    assert not (tmp_path / "save").exists()


def test_missing_or_empty_data_folder_is_named(tmp_path):
    trials = write_trials(tmp_path / "trials.txt")
    with pytest.raises(FileNotFoundError, match="nowhere"):
        prepare_voxceleb(
            str(tmp_path / "nowhere"), str(tmp_path / "save"), str(trials)
        )
    (tmp_path / "empty" / "wav").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="empty"):
        prepare_voxceleb(
            str(tmp_path / "empty"), str(tmp_path / "save"), str(trials)
        )


def test_trial_naming_a_missing_wav(corpus, tmp_path):
    data_folder, _, _ = corpus
    trials = write_trials(
        tmp_path / "broken.txt",
        TRIAL_LINES + ["0 id10009/sessE/00001.wav id10010/sessF/00042.wav"],
    )
    with pytest.raises(FileNotFoundError) as error:
        prepare_voxceleb(str(data_folder), str(tmp_path / "save"), str(trials))
    message = str(error.value)
    assert "broken.txt, line 5" in message and "00042.wav" in message
    assert not (tmp_path / "save" / "train.csv").exists()


def test_malformed_trial_line(corpus, tmp_path):
    trials = write_trials(tmp_path / "bad.txt", ["1 only_one_path.wav"])
    with pytest.raises(ValueError, match="bad.txt, line 1"):
        prepare_voxceleb(str(corpus[0]), str(tmp_path / "save"), str(trials))


def test_empty_trial_list(corpus, tmp_path):
    trials = write_trials(tmp_path / "empty.txt", [""])
    with pytest.raises(ValueError, match="empty.txt holds no trials"):
        prepare_voxceleb(str(corpus[0]), str(tmp_path / "save"), str(trials))


@pytest.mark.parametrize("ratio", [(0, 10), (90,), (90, -1), "90/10"])
def test_bad_split_ratio(corpus, tmp_path, ratio):
    with pytest.raises(ValueError, match="split_ratio"):
        prepare(corpus, tmp_path / "save", split_ratio=ratio)


def test_module_example_runs():
    failures, attempted = doctest.testmod(voxceleb_prepare)
    assert attempted > 0 and failures == 0
