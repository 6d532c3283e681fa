"""Verification trial lists in the VoxCeleb format.

A trial list holds one trial per line, ``label enrol_path test_path``,
with label 1 for a target (same speaker) and 0 for a non-target trial, as
in VoxCeleb1's ``veri_test2.txt``::

    1 id10270/x6uYqmx31kE/00001.wav id10270/8jEAjG6SegY/00008.wav

Utterance ids are the paths without ``.wav``; the wav files live under
``<data_root>/wav/<id>.wav``. Errors name the list and the line, since a
trial list is usually edited or converted by hand.

Authors
 * dynprompt-sb contributors 2026
"""

import os

WAV_SUFFIX = ".wav"


def read_trials(path):
    """Reads a trial list.

    Arguments
    ---------
    path : str or os.PathLike
        A file of ``label enrol_path test_path`` lines; blank lines are
        skipped.

    Returns
    -------
    trials : list of (int, str, str)
        (label, enrol_id, test_id) per trial, in file order.

    Raises
    ------
    FileNotFoundError
        When the list does not exist.
    ValueError
        On a line without exactly three fields or with a label other than
        0 or 1, naming the file and the line.

    Example
    -------
    >>> import os, tempfile
    >>> path = os.path.join(tempfile.mkdtemp(), "trials.txt")
    >>> with open(path, "w") as trial_file:
    ...     _ = trial_file.write("1 a/s1/00001.wav a/s2/00001.wav\\n\\n")
    ...     _ = trial_file.write("0 a/s1/00001.wav b/s3/00002.wav\\n")
    >>> read_trials(path)
    [(1, 'a/s1/00001', 'a/s2/00001'), (0, 'a/s1/00001', 'b/s3/00002')]
    """
    trials = []
    for _, line_number, line in _trial_lines(path):
        fields = line.split()
        if len(fields) != 3 or fields[0] not in ("0", "1"):
            raise ValueError(
                f"{os.fspath(path)}, line {line_number}: expected "
                f"'label enrol_path test_path' with label 0 or 1, got "
                f"{line.strip()!r}"
            )
        label, enrol_path, test_path = fields
        trials.append(
            (int(label), _utterance_id(enrol_path), _utterance_id(test_path))
        )
    return trials


def trial_utterances(trials):
    """Lists every utterance that some trial uses, once each.

    Arguments
    ---------
    trials : list of (int, str, str)
        As returned by ``read_trials``.

    Returns
    -------
    utterance_ids : list of str
        Unique ids, in the order they first appear.

    Example
    -------
    >>> trial_utterances([(1, "a/1", "a/2"), (0, "a/2", "b/1")])
    ['a/1', 'a/2', 'b/1']
    """
    # dict keeps insertion order: a de-duplicated, ordered list.
    return list(
        dict.fromkeys(
            utterance_id
            for _, enrol_id, test_id in trials
            for utterance_id in (enrol_id, test_id)
        )
    )


def check_trial_files(trials, data_root, path_for_message):
    """Checks that every utterance of a trial list has its wav file.

    Arguments
    ---------
    trials : list of (int, str, str)
        As returned by ``read_trials``.
    data_root : str or os.PathLike, or a list of them
        Folder(s) holding ``wav/<id>.wav``. With several (VoxCeleb1 and
        VoxCeleb2, say), the first one holding an utterance provides it.
    path_for_message : str or os.PathLike
        The trial list the trials came from; named in the error, and read
        again only on error, to find the line of the first missing wav.

    Returns
    -------
    wav_paths : dict
        Utterance id -> path of its wav file, for every trial utterance.

    Raises
    ------
    FileNotFoundError
        Naming the trial list, the line and the missing wav.

    Example
    -------
    >>> import os, tempfile
    >>> root = tempfile.mkdtemp()
    >>> os.makedirs(os.path.join(root, "wav", "a", "s1"))
    >>> open(os.path.join(root, "wav", "a", "s1", "1.wav"), "w").close()
    >>> paths = check_trial_files([(1, "a/s1/1", "a/s1/1")], root, "t.txt")
    >>> paths["a/s1/1"] == os.path.join(root, "wav", "a", "s1", "1.wav")
    True
    >>> check_trial_files(
    ...     [(0, "a/s1/1", "b/s1/1")], root, "t.txt"
    ... )  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    FileNotFoundError: t.txt, ...b/s1/1.wav not found
    """
    if isinstance(data_root, (str, os.PathLike)):
        data_root = [data_root]
    wav_dirs = [os.path.join(os.fspath(root), "wav") for root in data_root]
    wav_paths = {}
    missing = []
    for trial_index, (_, enrol_id, test_id) in enumerate(trials):
        for utterance_id in (enrol_id, test_id):
            if utterance_id in wav_paths:
                continue
            wav_path = _find_wav(utterance_id, wav_dirs)
            if wav_path is None:
                missing.append((trial_index, utterance_id))
                # Marked as seen so each missing wav is counted once.
                wav_paths[utterance_id] = None
            else:
                wav_paths[utterance_id] = wav_path
    if missing:
        trial_index, utterance_id = missing[0]
        line = _line_number(path_for_message, trial_index)
        where = "any of " if len(wav_dirs) > 1 else ""
        expected = ", ".join(
            os.path.join(wav_dir, utterance_id + WAV_SUFFIX)
            for wav_dir in wav_dirs
        )
        more = (
            f" ({len(missing) - 1} more trial utterances are missing too)"
            if len(missing) > 1
            else ""
        )
        raise FileNotFoundError(
            f"{os.fspath(path_for_message)}, {line}: {where}{expected} not "
            f"found{more}"
        )
    return wav_paths


def _trial_lines(path):
    """Yields (trial index, line number, line) for each non-blank line."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"Trial list not found: {os.fspath(path)}")
    with open(path, encoding="utf-8") as trial_file:
        trial_index = 0
        for line_number, line in enumerate(trial_file, start=1):
            if line.strip():
                yield trial_index, line_number, line
                trial_index += 1


def _utterance_id(wav_path):
    """Trial-list path -> utterance id (the path without ``.wav``)."""
    if wav_path.endswith(WAV_SUFFIX):
        return wav_path[: -len(WAV_SUFFIX)]
    return wav_path


def _find_wav(utterance_id, wav_dirs):
    """Path of an utterance's wav in the first folder holding it, or None."""
    for wav_dir in wav_dirs:
        wav_path = os.path.join(wav_dir, utterance_id + WAV_SUFFIX)
        if os.path.isfile(wav_path):
            return wav_path
    return None


def _line_number(path, trial_index):
    """Describes where a trial sits in its list: "line N" when readable."""
    try:
        for index, line_number, _ in _trial_lines(path):
            if index == trial_index:
                return f"line {line_number}"
    except (OSError, UnicodeDecodeError):
        pass
    # The trials did not come from a readable file: count trials instead.
    return f"trial {trial_index + 1}"
