"""Tests of dynprompt_sb.trials: parsing VoxCeleb trial lists."""

import os

import pytest

from dynprompt_sb.trials import (
    check_trial_files,
    read_trials,
    trial_utterances,
)

LINES = [
    "1 id10270/x6uYqmx31kE/00001.wav id10270/8jEAjG6SegY/00008.wav",
    "",
    "0 id10270/x6uYqmx31kE/00001.wav id10300/ize_eiCFEg0/00003.wav",
    "1 id10300/ize_eiCFEg0/00003.wav id10300/ize_eiCFEg0/00004.wav",
]


def write_lines(path, lines, newline="\n"):
    path.write_text(newline.join(lines) + newline)
    return path


def touch_wavs(root, utterance_ids):
    for utterance_id in utterance_ids:
        path = root / "wav" / (utterance_id + ".wav")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"")


def test_reads_labels_and_ids_without_suffix(tmp_path):
    trials = read_trials(write_lines(tmp_path / "t.txt", LINES))
    assert trials == [
        (1, "id10270/x6uYqmx31kE/00001", "id10270/8jEAjG6SegY/00008"),
        (0, "id10270/x6uYqmx31kE/00001", "id10300/ize_eiCFEg0/00003"),
        (1, "id10300/ize_eiCFEg0/00003", "id10300/ize_eiCFEg0/00004"),
    ]


def test_windows_line_endings_and_trailing_blank_lines(tmp_path):
    path = write_lines(tmp_path / "t.txt", LINES + ["", "  "], "\r\n")
    assert len(read_trials(path)) == 3


@pytest.mark.parametrize(
    "bad_line",
    [
        "1 id1/a/1.wav",
        "1 id1/a/1.wav id1/a/2.wav extra",
        "2 id1/a/1.wav id1/a/2.wav",
        "target id1/a/1.wav id1/a/2.wav",
    ],
)
def test_malformed_line_names_file_line_and_content(tmp_path, bad_line):
    path = write_lines(tmp_path / "bad.txt", LINES + [bad_line])
    with pytest.raises(ValueError) as error:
        read_trials(path)
    message = str(error.value)
    assert str(path) in message
    assert "line 5" in message
    assert bad_line in message


def test_missing_list_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="absent.txt"):
        read_trials(tmp_path / "absent.txt")


def test_trial_utterances_unique_in_first_seen_order(tmp_path):
    trials = read_trials(write_lines(tmp_path / "t.txt", LINES))
    assert trial_utterances(trials) == [
        "id10270/x6uYqmx31kE/00001",
        "id10270/8jEAjG6SegY/00008",
        "id10300/ize_eiCFEg0/00003",
        "id10300/ize_eiCFEg0/00004",
    ]


def test_check_trial_files_maps_ids_to_wavs(tmp_path):
    trial_path = write_lines(tmp_path / "t.txt", LINES)
    trials = read_trials(trial_path)
    touch_wavs(tmp_path / "data", trial_utterances(trials))
    wav_paths = check_trial_files(trials, tmp_path / "data", trial_path)
    assert set(wav_paths) == set(trial_utterances(trials))
    assert all(os.path.isfile(path) for path in wav_paths.values())


def test_missing_wav_names_list_line_and_wav(tmp_path):
    trial_path = write_lines(tmp_path / "t.txt", LINES)
    trials = read_trials(trial_path)
    present = [u for u in trial_utterances(trials) if "00004" not in u]
    touch_wavs(tmp_path / "data", present)
    with pytest.raises(FileNotFoundError) as error:
        check_trial_files(trials, tmp_path / "data", trial_path)
    message = str(error.value)
    # The fourth line of the file (after a blank line) names 00004.
    assert f"{trial_path}, line 4" in message
    expected = tmp_path / "data" / "wav" / "id10300/ize_eiCFEg0/00004.wav"
    assert str(expected) in message


def test_missing_wav_count_is_reported(tmp_path):
    trial_path = write_lines(tmp_path / "t.txt", LINES)
    trials = read_trials(trial_path)
    (tmp_path / "data" / "wav").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="line 1.*3 more"):
        check_trial_files(trials, tmp_path / "data", trial_path)


def test_several_data_roots_are_searched_in_order(tmp_path):
    trial_path = write_lines(tmp_path / "t.txt", LINES)
    trials = read_trials(trial_path)
    utterances = trial_utterances(trials)
    touch_wavs(tmp_path / "vox1", utterances[:2])
    touch_wavs(tmp_path / "vox2", utterances[1:])
    wav_paths = check_trial_files(
        trials, [tmp_path / "vox1", tmp_path / "vox2"], trial_path
    )
    assert str(tmp_path / "vox1") in wav_paths[utterances[1]]
    assert str(tmp_path / "vox2") in wav_paths[utterances[3]]
