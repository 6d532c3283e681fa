#!/usr/bin/env python3
"""Scores a trained model on any trial list, with any data root.

The model is one of:
 * a train.py output folder: its best checkpoint (lowest dev error) is
   used, or the one given with ``--ckpt``; s-norm takes its cohort from the
   run's training CSV, as the test stage does;
 * a checkpoint folder of a run (``<run>/save/CKPT+...``);
 * a pretrained model folder written by ``dynprompt export``
   (hyperparams.yaml with a ``pretrainer``, and the .ckpt files), loaded
   through ``DynPromptSpeakerRecognition``; it has no training data, so
   it is scored without s-norm.

Embedding, scoring, s-norm, metrics and plots go through the same
functions as train.py's test stage, so both give the same numbers on the
same trials.

Examples:
> python verify.py results/dynprompt/dynamic/1986 \\
      --trials=/corpora/VoxCeleb1/meta/veri_test2.txt \\
      --data_folder=/corpora/VoxCeleb1
> python verify.py results/dynprompt/dynamic/1986 \\
      --trials=cnceleb1_trials.txt --data_folder=/corpora/CN-Celeb/eval \\
      --output_folder=results/cnceleb1

Trial lists are in the VoxCeleb format, ``label enrol_path test_path``;
the audio of a path is ``<data_folder>/wav/<path>`` when ``wav/`` exists,
``<data_folder>/<path>`` otherwise (``.wav`` is added to paths without an
audio extension). Any other ``--key=value`` sets a hyperparameter of the
model (e.g. ``--test_batch_size=4``, ``--score_norm=none``,
``--wavlm_source=/local/wavlm-large``).

Authors
 * dynprompt-sb contributors 2026
"""

import argparse
import os
import re
import sys

import soundfile
import speechbrain as sb
import yaml
from hyperpyyaml import load_hyperpyyaml
from speechbrain.utils.logger import get_logger

# The recipe's own functions, so that both scripts score alike.
from train import (
    SpeakerBrain,
    embedding_dataset,
    speaker_cohort,
    trial_line,
    verify,
)

from dynprompt_sb.audio import AudioError
from dynprompt_sb.trials import read_trials, trial_utterances

logger = get_logger(__name__)

HPARAMS_FILE = "hyperparams.yaml"
# The checkpoint entries that make embeddings; the classifier is not needed.
EMBEDDING_MODULES = ("wavlm", "layer_sum", "normalizer", "embedding_model")
AUDIO_EXTENSIONS = (".wav", ".flac", ".ogg")
# Settings of verification itself, with their values for a pretrained
# folder (whose hyperparams.yaml knows nothing of them).
VERIFY_DEFAULTS = {"score_norm": "none", "num_workers": 0, "cohort_top_k": 300}


def parse_args(argv):
    """Splits the command line into verify.py's options and overrides.

    Arguments
    ---------
    argv : list of str
        The command line, without the program name.

    Returns
    -------
    args : argparse.Namespace
    overrides : dict
        ``--key=value`` options verify.py does not know, each value read
        as yaml (so ``4`` is an int and ``False`` a bool, as with train.py).
    """
    parser = argparse.ArgumentParser(
        description="Score a trained model on a trial list."
    )
    parser.add_argument(
        "source",
        help="A train.py output folder, one of its save/CKPT+... folders, "
        "or a pretrained folder written by `dynprompt export`.",
    )
    parser.add_argument(
        "--trials", required=True, help="Trial list: label enrol test."
    )
    parser.add_argument(
        "--data_folder",
        required=True,
        help="Root of the trial list's audio (its wav/ folder if any).",
    )
    parser.add_argument(
        "--output_folder",
        help="Where scores, plots and results.json go (default: "
        "<source>/verify/<trial list name>).",
    )
    parser.add_argument("--ckpt", help="A checkpoint folder of the run.")
    parser.add_argument("--device", default="cpu", help="e.g. cuda:0")
    parser.add_argument("--noprogressbar", action="store_true")
    args, rest = parser.parse_known_args(argv)

    overrides = {}
    rest = iter(rest)
    for option in rest:
        if not option.startswith("--"):
            parser.error(f"unexpected argument {option!r}")
        key, sep, value = option[2:].partition("=")
        if not sep:
            value = next(rest, None)
            if value is None:
                parser.error(f"option --{key} needs a value")
        overrides[key] = yaml.safe_load(value)
    return args, overrides


def trial_audio(trials, trials_path, data_folder):
    """Locates and checks the audio of every trial utterance.

    Arguments
    ---------
    trials : list of (label, enrol_id, test_id)
        As returned by ``read_trials``.
    trials_path : str
        The trial list, named in errors.
    data_folder : str
        The audio root: its ``wav/`` folder when there is one.

    Returns
    -------
    data : dict
        Utterance id -> {"wav", "start", "stop", "duration"}, in the order
        of ``trial_utterances``, for ``embedding_dataset``.
    """
    if not os.path.isdir(data_folder):
        raise FileNotFoundError(f"data_folder {data_folder} does not exist.")
    wav_folder = os.path.join(data_folder, "wav")
    if not os.path.isdir(wav_folder):
        wav_folder = data_folder
    data = {}
    for utt_id in trial_utterances(trials):
        path = os.path.join(wav_folder, utt_id)
        if not path.endswith(AUDIO_EXTENSIONS):
            path += ".wav"
        if not os.path.isfile(path):
            where = trial_line(trials_path, utt_id)
            raise FileNotFoundError(f"{where}: {path} not found")
        try:
            info = soundfile.info(path)
        except (RuntimeError, soundfile.SoundFileError) as error:
            where = trial_line(trials_path, utt_id)
            raise AudioError(f"{where}: cannot read {path}: {error}") from None
        if info.frames == 0:
            where = trial_line(trials_path, utt_id)
            raise AudioError(f"{where}: {path} holds no samples")
        data[utt_id] = {
            "wav": path,
            "start": 0,
            "stop": info.frames,
            "duration": info.frames / info.samplerate,
        }
    return data


def is_exported_model(folder):
    """Whether a folder holds a model written by ``dynprompt export``."""
    path = os.path.join(folder, HPARAMS_FILE)
    if not os.path.isfile(path):
        return False
    with open(path, encoding="utf-8") as hparams_file:
        return bool(re.search(r"^pretrainer\s*:", hparams_file.read(), re.M))


def load_run(source, ckpt, overrides, run_opts):
    """Loads a training run (or one of its checkpoint folders).

    Arguments
    ---------
    source : str
        The run's output folder, or a ``save/CKPT+...`` folder of it.
    ckpt : str or None
        A checkpoint folder to use instead of the best one.
    overrides : dict
        Hyperparameter overrides.
    run_opts : dict
        SpeechBrain run options (device...).

    Returns
    -------
    brain : SpeakerBrain
    hparams : dict
    checkpoint : str
        The folder the weights came from.
    """
    source = os.path.abspath(source)
    run_folder = source
    if not os.path.isdir(os.path.join(source, "save")):
        # A checkpoint folder: the run is two levels up.
        ckpt = ckpt or source
        run_folder = os.path.dirname(os.path.dirname(source))
    hparams_file = os.path.join(run_folder, HPARAMS_FILE)
    if not os.path.isfile(hparams_file):
        raise FileNotFoundError(
            f"{source} is neither a train.py output folder, nor one of its "
            f"checkpoint folders, nor an exported model: {hparams_file} "
            "does not exist."
        )
    # The saved hparams may name the output folder relative to where
    # training ran; the checkpoints are where the run folder is now.
    overrides = {"output_folder": run_folder, **overrides}
    with open(hparams_file, encoding="utf-8") as fin:
        hparams = load_hyperpyyaml(fin, overrides)

    checkpointer = sb.utils.checkpoints.Checkpointer(
        hparams["save_folder"],
        recoverables={
            name: hparams["checkpointer"].recoverables[name]
            for name in EMBEDDING_MODULES
        },
    )
    if ckpt is None:
        checkpoint = checkpointer.find_checkpoint(min_key="ErrorRate")
        if checkpoint is None:
            raise FileNotFoundError(
                f"No end-of-epoch checkpoint in {hparams['save_folder']}."
            )
    else:
        ckpt = os.path.abspath(ckpt)
        paramfiles = {
            name: os.path.join(ckpt, name + ".ckpt")
            for name in EMBEDDING_MODULES
        }
        missing = [
            path for path in paramfiles.values() if not os.path.isfile(path)
        ]
        if missing:
            raise FileNotFoundError(
                f"{ckpt} is not a checkpoint folder: {', '.join(missing)} "
                "not found."
            )
        checkpoint = sb.utils.checkpoints.Checkpoint(
            ckpt, {"end-of-epoch": True}, paramfiles
        )
    checkpointer.load_checkpoint(checkpoint)

    brain = SpeakerBrain(
        modules=hparams["modules"], hparams=hparams, run_opts=run_opts
    )
    return brain, hparams, str(checkpoint.path)


def load_exported(source, overrides, run_opts):
    """Loads a model folder written by ``dynprompt export``.

    Arguments
    ---------
    source : str
        The model folder.
    overrides : dict
        Overrides of its hyperparams.yaml, and verification settings
        (``score_norm``, ``num_workers``, ``cohort_top_k``).
    run_opts : dict
        SpeechBrain run options (device...).

    Returns
    -------
    brain : SpeakerBrain
    hparams : dict
    checkpoint : str
        The model folder.
    """
    # Imported here: only this kind of source needs the interface.
    from dynprompt_sb.inference import DynPromptSpeakerRecognition

    overrides = dict(overrides)
    settings = {
        key: overrides.pop(key, default)
        for key, default in VERIFY_DEFAULTS.items()
    }
    model = DynPromptSpeakerRecognition.from_hparams(
        source=os.path.abspath(source), overrides=overrides, run_opts=run_opts
    )
    hparams = {**vars(model.hparams), **settings}
    brain = SpeakerBrain(
        modules=dict(model.mods), hparams=hparams, run_opts=run_opts
    )
    return brain, hparams, os.path.abspath(source)


def main(argv=None):
    """Scores a model on a trial list; returns the results dict."""
    args, overrides = parse_args(sys.argv[1:] if argv is None else argv)
    # The inputs are checked first: a bad trial list fails in a second.
    trials = read_trials(args.trials)
    if not trials:
        raise ValueError(f"Trial list {args.trials} holds no trial.")
    data = trial_audio(trials, args.trials, args.data_folder)
    if not os.path.isdir(args.source):
        raise FileNotFoundError(f"Model folder not found: {args.source}")

    trials_name = os.path.splitext(os.path.basename(args.trials))[0]
    output_folder = args.output_folder or os.path.join(
        args.source, "verify", trials_name
    )
    sb.create_experiment_directory(output_folder)
    run_opts = {"device": args.device, "noprogressbar": args.noprogressbar}
    if is_exported_model(args.source):
        brain, hparams, checkpoint = load_exported(
            args.source, overrides, run_opts
        )
    else:
        brain, hparams, checkpoint = load_run(
            args.source, args.ckpt, overrides, run_opts
        )

    if hparams["score_norm"] == "s-norm" and not os.path.isfile(
        hparams.get("train_annotation", "")
    ):
        raise FileNotFoundError(
            "s-norm takes its cohort from the training CSV "
            f"{hparams.get('train_annotation')}, which is not there: pass "
            "--score_norm=none, or --train_annotation=<train.csv>."
        )

    return verify(
        brain,
        hparams,
        embedding_dataset(data, hparams),
        trials,
        output_folder,
        cohort_fn=lambda: speaker_cohort(brain, hparams),
        info={
            "source": os.path.abspath(args.source),
            "checkpoint": checkpoint,
            "verification_file": os.path.abspath(args.trials),
            "data_folder": os.path.abspath(args.data_folder),
        },
    )


if __name__ == "__main__":
    main()
