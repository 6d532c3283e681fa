"""Data preparation for speaker verification on VoxCeleb.

Writes the CSV files the recipe reads, one row per utterance with the
header ``ID,duration,wav,start,stop,spk_id`` (duration in seconds, start
and stop in samples of the file, wav an absolute path):

* ``train.csv`` and ``dev.csv``: the utterances of every speaker that no
  trial list names, split per speaker by ``split_ratio`` (each speaker
  keeps at least one utterance in train, so the classifier knows every
  speaker the dev set asks about);
* ``test.csv``: every utterance named by a trial list, its ID being the
  trial id (the path without ``.wav``).

Each data folder has the VoxCeleb layout
``<data_folder>/wav/<speaker>/<session>/<utterance>.wav``; VoxCeleb1 and
VoxCeleb2 can be given together as a list (VoxCeleb2's m4a files must
first be converted to 16 kHz wav). Trial lists have VoxCeleb's
``veri_test2.txt`` format, ``label enrol_path test_path``, with paths
relative to ``wav/``; the O, E and H lists can be given together.

CN-Celeb1 evaluation
--------------------
CN-Celeb1's eval set fits the same layout once rearranged (copied,
converted from flac, or symlinked) as
``<data_folder>/wav/<speaker>/<genre>/<utterance>.wav``: the genre
(interview, singing, vlog...) takes the place of VoxCeleb's session, e.g.
``eval/test/id00800-singing-01-001.wav`` becomes
``wav/id00800/singing/01-001.wav`` and the enrolment file
``eval/enroll/id00800-enroll.wav`` becomes
``wav/id00800/enroll/enroll.wav``. Its ``trials.lst`` (``enrol_id
test_path label``) is rewritten in the 3-column form
``label enrol_path test_path`` with the new paths, for example
``1 id00800/enroll/enroll.wav id00800/singing/01-001.wav``. The eval
speakers are then excluded from training like VoxCeleb's test speakers.

Authors
 * dynprompt-sb contributors 2026
"""

import csv
import json
import logging
import os
import random

import soundfile

from dynprompt_sb.audio import AudioError
from dynprompt_sb.trials import (
    check_trial_files,
    read_trials,
    trial_utterances,
)

logger = logging.getLogger(__name__)

CSV_HEADER = ["ID", "duration", "wav", "start", "stop", "spk_id"]
TRAIN_CSV = "train.csv"
DEV_CSV = "dev.csv"
TEST_CSV = "test.csv"
# The options the CSVs were prepared with; written after them.
OPTIONS_FILE = "voxceleb_prepare.json"


def prepare_voxceleb(
    data_folder,
    save_folder,
    verification_pairs_file,
    split_ratio=(90, 10),
    seed=1234,
    skip_prep=False,
    min_duration=0.0,
):
    """Prepares the train, dev and test CSV files of VoxCeleb.

    Skips all work when the CSVs and the options file saved beside them
    show that the same options were prepared before. The CSVs are written
    to temporary files and moved in place only once all three are
    complete, so an error never leaves CSVs that a rerun would trust.

    Arguments
    ---------
    data_folder : str or list of str
        Corpus folder(s) with the ``wav/<spk>/<session>/<utt>.wav`` layout.
    save_folder : str
        Where to write ``train.csv``, ``dev.csv``, ``test.csv`` and the
        options file.
    verification_pairs_file : str or list of str
        Trial list(s) in the ``veri_test2.txt`` format. Their speakers are
        removed from train and dev; their utterances make ``test.csv``.
    split_ratio : sequence of two numbers
        Train and dev shares of each speaker's utterances, e.g. (90, 10);
        on small corpora dev still gets its share of all utterances, at
        least one (see ``_split_per_speaker``).
    seed : int
        Seed of the train/dev split.
    skip_prep : bool
        If True, does nothing.
    min_duration : float
        Train and dev utterances shorter than this (seconds) are left out;
        test utterances are always kept, since trials need them.

    Example
    -------
    >>> import os, tempfile
    >>> from dynprompt_sb.toy_corpus import make_toy_corpus
    >>> folder = tempfile.mkdtemp()
    >>> corpus = make_toy_corpus(
    ...     os.path.join(folder, "corpus"),
    ...     num_train_speakers=2,
    ...     num_test_speakers=2,
    ...     sessions_per_speaker=1,
    ...     utts_per_session=2,
    ...     min_duration=0.5,
    ...     max_duration=0.5,
    ... )
    >>> save_folder = os.path.join(folder, "save")
    >>> prepare_voxceleb(
    ...     corpus["data_folder"], save_folder, corpus["trials"], (50, 50)
    ... )
    >>> open(os.path.join(save_folder, "train.csv")).readline().strip()
    'ID,duration,wav,start,stop,spk_id'
    """
    if skip_prep:
        logger.info("skip_prep: not preparing the VoxCeleb CSV files")
        return
    data_folders = _as_list(data_folder, "data_folder")
    trial_files = _as_list(verification_pairs_file, "verification_pairs_file")
    train_share, dev_share = _check_split_ratio(split_ratio)
    if min_duration < 0:
        raise ValueError(f"min_duration must be >= 0, got {min_duration!r}")
    options = dict(
        data_folder=[os.path.abspath(folder) for folder in data_folders],
        verification_pairs_file=[os.path.abspath(f) for f in trial_files],
        split_ratio=[train_share, dev_share],
        seed=seed,
        min_duration=min_duration,
    )
    if _already_prepared(save_folder, options):
        logger.info(
            f"VoxCeleb CSV files in {save_folder} already prepared with "
            "these options: skipping preparation"
        )
        return
    _check_data_folders(data_folders)

    # Trial lists first: they are small, and their errors come before a
    # long scan of the corpus.
    test_wavs = {}
    for trial_file in trial_files:
        trials = read_trials(trial_file)
        if not trials:
            raise ValueError(f"Trial list {trial_file} holds no trials")
        wav_paths = check_trial_files(trials, data_folders, trial_file)
        for utterance_id in trial_utterances(trials):
            test_wavs.setdefault(utterance_id, wav_paths[utterance_id])
    test_speakers = {_speaker_of(utt) for utt in test_wavs}

    corpus_wavs = _scan_wavs(data_folders)
    train_wavs = {
        utterance_id: wav_path
        for utterance_id, wav_path in corpus_wavs.items()
        if _speaker_of(utterance_id) not in test_speakers
    }
    if not train_wavs:
        raise ValueError(
            f"No training utterances: every speaker of "
            f"{', '.join(data_folders)} appears in a trial list"
        )

    train_rows = _csv_rows(train_wavs)
    kept_rows = [row for row in train_rows if row[1] >= min_duration]
    if len(kept_rows) < len(train_rows):
        logger.info(
            f"Left out {len(train_rows) - len(kept_rows)} training "
            f"utterances shorter than {min_duration} s"
        )
    if not kept_rows:
        raise ValueError(
            f"No training utterance is at least {min_duration} s long"
        )
    train, dev = _split_per_speaker(kept_rows, train_share, dev_share, seed)
    test = _csv_rows(test_wavs)

    _write_csvs(
        save_folder,
        {TRAIN_CSV: train, DEV_CSV: dev, TEST_CSV: test},
        options,
    )
    logger.info(
        f"Prepared {save_folder}: {len(train)} train and {len(dev)} dev "
        f"utterances of {len({row[5] for row in kept_rows})} speakers; "
        f"{len(test)} test utterances of {len(test_speakers)} trial "
        f"speakers (left out of train and dev)"
    )


def _as_list(value, name):
    """A path or a list of paths, as a non-empty list of str."""
    if isinstance(value, (str, os.PathLike)):
        return [os.fspath(value)]
    values = [os.fspath(item) for item in value]
    if not values:
        raise ValueError(f"{name} is an empty list")
    return values


def _check_split_ratio(split_ratio):
    """(train, dev) shares as floats; rejects unusable ratios."""
    try:
        train_share, dev_share = (float(share) for share in split_ratio)
    except (TypeError, ValueError):
        raise ValueError(
            f"split_ratio must be two numbers (train, dev), got {split_ratio!r}"
        ) from None
    if train_share <= 0 or dev_share < 0:
        raise ValueError(
            f"split_ratio needs a train share > 0 and a dev share >= 0, got "
            f"{split_ratio!r}"
        )
    return train_share, dev_share


def _already_prepared(save_folder, options):
    """Whether all CSVs exist and were prepared with these options."""
    for name in (TRAIN_CSV, DEV_CSV, TEST_CSV):
        if not os.path.isfile(os.path.join(save_folder, name)):
            return False
    try:
        with open(os.path.join(save_folder, OPTIONS_FILE)) as options_file:
            saved = json.load(options_file)
    except (OSError, ValueError):
        return False
    # Through JSON, so tuples compare equal to the lists they become.
    return saved == json.loads(json.dumps(options))


def _check_data_folders(data_folders):
    """Fails, naming the folder, when one is missing or has no wav/."""
    for folder in data_folders:
        if not os.path.isdir(folder):
            raise FileNotFoundError(f"Data folder not found: {folder}")
        wav_dir = os.path.join(folder, "wav")
        if not os.path.isdir(wav_dir):
            raise FileNotFoundError(
                f"Data folder {folder} has no wav/ folder: expected the "
                "VoxCeleb layout wav/<speaker>/<session>/<utterance>.wav"
            )


def _scan_wavs(data_folders):
    """Every utterance of the data folders: id -> absolute wav path.

    The id is the path under ``wav/`` without ``.wav``, with ``/``
    separators, as in the trial lists.
    """
    wavs = {}
    for folder in data_folders:
        wav_dir = os.path.abspath(os.path.join(folder, "wav"))
        found = 0
        for directory, subdirectories, files in os.walk(wav_dir):
            # Sorted walk: the same corpus always lists in the same order.
            subdirectories.sort()
            for name in sorted(files):
                if not name.endswith(".wav"):
                    continue
                wav_path = os.path.join(directory, name)
                relative = os.path.relpath(wav_path, wav_dir)
                utterance_id = relative[: -len(".wav")].replace(os.sep, "/")
                if utterance_id in wavs:
                    raise ValueError(
                        f"Utterance {utterance_id} is in two data folders: "
                        f"{wavs[utterance_id]} and {wav_path}"
                    )
                wavs[utterance_id] = wav_path
                found += 1
        if found == 0:
            raise FileNotFoundError(
                f"No .wav file under {wav_dir}: expected the VoxCeleb "
                "layout wav/<speaker>/<session>/<utterance>.wav"
            )
        logger.info(f"Found {found} wav files under {wav_dir}")
    return wavs


def _csv_rows(wavs):
    """CSV rows [ID, duration, wav, start, stop, spk_id] of utterances.

    Durations come from the file headers (soundfile.info), without
    decoding the audio.
    """
    rows = []
    for utterance_id, wav_path in wavs.items():
        try:
            info = soundfile.info(wav_path)
        except (RuntimeError, soundfile.SoundFileError) as error:
            raise AudioError(
                f"Cannot read audio file {wav_path}: {error}"
            ) from error
        if info.frames <= 0:
            raise AudioError(f"Audio file {wav_path} holds no samples")
        rows.append(
            [
                utterance_id,
                round(info.frames / info.samplerate, 6),
                os.path.abspath(wav_path),
                0,
                info.frames,
                _speaker_of(utterance_id),
            ]
        )
    return rows


def _split_per_speaker(rows, train_share, dev_share, seed):
    """Splits each speaker's rows into train and dev by the shares.

    Each speaker gives dev its share of its utterances, rounded down, and
    the remainders go, largest first, to speakers with room left until
    dev holds its share of all utterances (at least one when its share is
    not zero). Rounding per speaker alone would leave dev empty on small
    corpora: 90/10 of 4 utterances rounds to 4 and 0. Every speaker keeps
    at least one utterance in train.

    Returns
    -------
    train, dev : list of rows
        Each sorted by ID.
    """
    by_speaker = {}
    for row in sorted(rows):
        by_speaker.setdefault(row[5], []).append(row)
    speakers = sorted(by_speaker)
    generator = random.Random(seed)
    for speaker in speakers:
        generator.shuffle(by_speaker[speaker])

    dev_fraction = dev_share / (train_share + dev_share)
    quotas = {s: dev_fraction * len(by_speaker[s]) for s in speakers}
    room = {s: len(by_speaker[s]) - 1 for s in speakers}
    dev_counts = {s: min(int(quotas[s]), room[s]) for s in speakers}
    target = round(dev_fraction * len(rows))
    if dev_fraction > 0:
        target = max(1, target)
    target = min(target, sum(room.values()))
    # Largest remainder first; random among equal remainders.
    tie_breaks = {s: generator.random() for s in speakers}
    by_remainder = sorted(
        speakers,
        key=lambda s: (quotas[s] - dev_counts[s], tie_breaks[s]),
        reverse=True,
    )
    while sum(dev_counts.values()) < target:
        for speaker in by_remainder:
            if sum(dev_counts.values()) == target:
                break
            if dev_counts[speaker] < room[speaker]:
                dev_counts[speaker] += 1

    train, dev = [], []
    for speaker in speakers:
        speaker_rows = by_speaker[speaker]
        dev_count = dev_counts[speaker]
        train.extend(speaker_rows[: len(speaker_rows) - dev_count])
        dev.extend(speaker_rows[len(speaker_rows) - dev_count :])
    return sorted(train), sorted(dev)


def _write_csvs(save_folder, tables, options):
    """Writes all CSVs, then the options file; all or nothing.

    Each table goes to a temporary file in ``save_folder`` first; only
    when every one is written are they moved over the old CSVs.
    """
    os.makedirs(save_folder, exist_ok=True)
    # Named per process, so that two runs never write the same file.
    suffix = f".{os.getpid()}.tmp"
    temporary_paths = {}
    try:
        for name, rows in tables.items():
            temporary_paths[name] = os.path.join(save_folder, name + suffix)
            with open(
                temporary_paths[name], "w", newline="", encoding="utf-8"
            ) as csv_file:
                writer = csv.writer(csv_file)
                writer.writerow(CSV_HEADER)
                writer.writerows(rows)
        # Options first out, last in: a crash while the CSVs are being
        # swapped leaves no options file, so the rerun prepares again.
        options_path = os.path.join(save_folder, OPTIONS_FILE)
        if os.path.exists(options_path):
            os.remove(options_path)
        for name in list(temporary_paths):
            os.replace(temporary_paths[name], os.path.join(save_folder, name))
            del temporary_paths[name]
        temporary_paths[OPTIONS_FILE] = options_path + suffix
        with open(
            temporary_paths[OPTIONS_FILE], "w", encoding="utf-8"
        ) as options_file:
            json.dump(options, options_file, indent=2)
        os.replace(temporary_paths[OPTIONS_FILE], options_path)
        del temporary_paths[OPTIONS_FILE]
    finally:
        for temporary_path in temporary_paths.values():
            if os.path.exists(temporary_path):
                os.remove(temporary_path)


def _speaker_of(utterance_id):
    """The speaker of an id: its first path component."""
    return utterance_id.split("/", 1)[0]
