"""The ``dynprompt`` command: verify, embed, score, export.

    dynprompt verify A.wav B.wav --model DIR
    dynprompt embed FILES... --model DIR --out emb.npy   (or --out FOLDER)
    dynprompt score TRIALS --data-root ROOT --model DIR [--out DIR]
    dynprompt export RUN_DIR OUT_DIR [--last] [--copy-backbone]

``--model`` is a folder written by ``dynprompt export``; its
``hyperparams.yaml`` runs Python code when loaded, so use trusted folders
only. Scores come from ``dynprompt_sb.scoring``, the functions the recipe's
test stage uses, so the numbers cannot drift apart. An error prints one
line (``dynprompt: error: ...``) and exits with status 1; ``--debug`` shows
the traceback instead.

Authors
 * dynprompt-sb contributors 2026
"""

import argparse
import logging
import os
import sys
import warnings

EXIT_ERROR = 1


def main(argv=None):
    """Runs the ``dynprompt`` command.

    Arguments
    ---------
    argv : list of str, optional
        The arguments, without the program name; by default sys.argv's.

    Returns
    -------
    status : int
        0 on success (errors exit through SystemExit).

    Example
    -------
    >>> main(["--version"])  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    SystemExit: 0
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help(sys.stderr)
        return _fail("give a command: verify, embed, score or export")
    # SpeechBrain and transformers log, and draw progress bars, on every
    # load; the command prints what matters itself.
    logging.basicConfig(level=logging.WARNING)
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()
    try:
        with warnings.catch_warnings():
            # A warning (a resampled file, a backbone outside the model
            # folder) is one line too, without the source line.
            warnings.showwarning = _show_warning
            args.run(args)
    except KeyboardInterrupt:
        return _fail("interrupted")
    except Exception as error:
        if args.debug:
            raise
        return _fail(_one_line(error))
    return 0


def build_parser():
    """The argument parser of ``dynprompt`` and its subcommands.

    Returns
    -------
    parser : argparse.ArgumentParser

    Example
    -------
    >>> args = build_parser().parse_args(
    ...     ["verify", "a.wav", "b.wav", "--model", "m"]
    ... )
    >>> args.command, args.threshold
    ('verify', None)
    """
    from dynprompt_sb import __version__

    parser = argparse.ArgumentParser(
        prog="dynprompt",
        description=(
            "Speaker verification with speaker-aware dynamic prompts on a "
            "frozen WavLM (dynprompt-sb)."
        ),
    )
    parser.add_argument(
        "--version", action="version", version=f"%(prog)s {__version__}"
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    verify = commands.add_parser(
        "verify",
        help="score two audio files and decide: same speaker or not",
        description=(
            "Prints the cosine score of two audio files and the decision at "
            "the model's threshold (the EER threshold of its training run)."
        ),
    )
    verify.add_argument("wav_a", metavar="A.wav")
    verify.add_argument("wav_b", metavar="B.wav")
    _model_arguments(verify)
    verify.add_argument(
        "--threshold",
        type=float,
        help="decide at this score instead of the model's threshold",
    )
    verify.set_defaults(run=run_verify)

    embed = commands.add_parser(
        "embed",
        help="write speaker embeddings of audio files",
        description=(
            "Embeds audio files. --out ending in .npy: one [files, dim] "
            "array, rows in the order of the files; otherwise a folder "
            "with one <name>.npy per file."
        ),
    )
    embed.add_argument("files", nargs="+", metavar="FILE")
    _model_arguments(embed)
    embed.add_argument("--out", required=True, help="an .npy file or a folder")
    embed.add_argument(
        "--batch-size",
        type=int,
        help="files per batch (default: the model's test_batch_size)",
    )
    embed.set_defaults(run=run_embed)

    score = commands.add_parser(
        "score",
        help="score a trial list: EER, minDCF, scores.txt, DET curve",
        description=(
            "Scores a VoxCeleb-style trial list (lines 'label enrol.wav "
            "test.wav', paths under DATA_ROOT/wav/) with cosine scoring, "
            "prints EER and minDCF, and writes scores.txt and det.png."
        ),
    )
    score.add_argument("trials", metavar="TRIALS")
    score.add_argument(
        "--data-root",
        required=True,
        help="folder holding wav/<path> for the list's paths",
    )
    _model_arguments(score)
    score.add_argument(
        "--out",
        default=".",
        help="folder for scores.txt and det.png (default: here)",
    )
    score.add_argument(
        "--batch-size",
        type=int,
        help="files per batch (default: the model's test_batch_size, which "
        "gives the recipe's scores)",
    )
    score.set_defaults(run=run_score)

    export = commands.add_parser(
        "export",
        help="turn a training run into a pretrained model folder",
        description=(
            "Writes OUT_DIR from a recipe output folder: hyperparams.yaml "
            "filled from the run, the weights of its best (or last) "
            "checkpoint, label_encoder.txt and the EER threshold of its "
            "test stage."
        ),
    )
    export.add_argument("run_dir", metavar="RUN_DIR")
    export.add_argument("out_dir", metavar="OUT_DIR")
    export.add_argument(
        "--last",
        action="store_true",
        help="export the last checkpoint instead of the best one",
    )
    export.add_argument(
        "--copy-backbone",
        action="store_true",
        help="copy the WavLM backbone into OUT_DIR/wavlm (offline, movable)",
    )
    export.add_argument(
        "--threshold",
        type=float,
        help="decision threshold (default: the run's EER threshold)",
    )
    export.add_argument(
        "--force",
        action="store_true",
        help="replace OUT_DIR if it exists",
    )
    export.set_defaults(run=run_export)

    for subparser in (verify, embed, score, export):
        subparser.add_argument(
            "--debug",
            action="store_true",
            help="show the traceback of an error",
        )
    parser.set_defaults(debug=False)
    return parser


def run_verify(args):
    """``dynprompt verify``: prints the score and the decision."""
    model = _load_model(args)
    threshold = model._decision_threshold(args.threshold)
    score, decision = model.verify_files(
        args.wav_a, args.wav_b, threshold=threshold
    )
    verdict = "same speaker" if bool(decision) else "different speakers"
    print(f"score {float(score):.6f}  {verdict} (threshold {threshold:.6f})")


def run_embed(args):
    """``dynprompt embed``: writes one array, or one file per input."""
    import numpy as np

    to_folder = not args.out.endswith(".npy")
    names = None
    if to_folder:
        names = _output_names(args.files)
    model = _load_model(args)
    embeddings = model.embed_files(
        args.files, batch_size=args.batch_size, progress=True
    ).numpy()
    if not to_folder:
        parent = os.path.dirname(os.path.abspath(args.out))
        os.makedirs(parent, exist_ok=True)
        np.save(args.out, embeddings)
        print(
            f"wrote {args.out}: {embeddings.shape[0]} x "
            f"{embeddings.shape[1]} embeddings, in the order of the files"
        )
        return
    os.makedirs(args.out, exist_ok=True)
    for name, embedding in zip(names, embeddings, strict=True):
        np.save(os.path.join(args.out, name), embedding)
    print(f"wrote {len(names)} embeddings to {args.out}/")


def run_score(args):
    """``dynprompt score``: metrics on stdout, scores.txt and det.png."""
    from dynprompt_sb.plots import plot_det
    from dynprompt_sb.scoring import verification_metrics, write_scores

    model = _load_model(args)
    trials, scores = model.score_trials(
        args.trials, args.data_root, batch_size=args.batch_size, progress=True
    )
    labels = [label for label, _, _ in trials]
    metrics = verification_metrics(labels, scores)
    os.makedirs(args.out, exist_ok=True)
    score_path = os.path.join(args.out, "scores.txt")
    write_scores(score_path, trials, scores)
    det_path = os.path.join(args.out, "det.png")
    positive = scores[[label == 1 for label in labels]]
    negative = scores[[label == 0 for label in labels]]
    plot_det(
        positive,
        negative,
        det_path,
        title=f"DET, cosine scoring: EER {100 * metrics['eer']:.2f}%",
    )
    print(
        f"{len(trials)} trials: EER {100 * metrics['eer']:.2f}% "
        f"(threshold {metrics['eer_threshold']:.6f}), "
        f"minDCF(0.01) {metrics['min_dcf_0.01']:.4f}, "
        f"minDCF(0.05) {metrics['min_dcf_0.05']:.4f}"
    )
    print(f"wrote {score_path} and {det_path}")


def run_export(args):
    """``dynprompt export``: writes the model folder."""
    from dynprompt_sb.export import export_model

    out = export_model(
        args.run_dir,
        args.out_dir,
        checkpoint="last" if args.last else "best",
        copy_backbone=args.copy_backbone,
        threshold=args.threshold,
        overwrite=args.force,
    )
    print(f"wrote the model folder {out}")


def _model_arguments(subparser):
    """--model and --device, shared by the commands that load a model."""
    subparser.add_argument(
        "--model",
        required=True,
        help="model folder written by `dynprompt export` (trusted only: "
        "its hyperparams.yaml runs code)",
    )
    subparser.add_argument(
        "--device",
        default="cpu",
        help="torch device, e.g. cpu or cuda:0 (default: cpu)",
    )


def _load_model(args):
    from dynprompt_sb.inference import DynPromptSpeakerRecognition

    return DynPromptSpeakerRecognition.from_hparams(
        source=args.model, run_opts={"device": args.device}
    )


def _output_names(files):
    """One .npy name per file; two files with one name are an error."""
    names = {}
    for path in files:
        stem = os.path.splitext(os.path.basename(path))[0]
        name = stem + ".npy"
        if name in names:
            raise ValueError(
                f"{names[name]} and {path} would both be written to {name}; "
                "give an .npy file as --out instead of a folder."
            )
        names[name] = path
    return list(names)


def _one_line(error):
    """An exception as one line: its message, typed when unusual."""
    message = " ".join(str(error).split()) or type(error).__name__
    known = (
        FileNotFoundError,
        FileExistsError,
        NotADirectoryError,
        ValueError,
        KeyError,
        NotImplementedError,
    )
    if isinstance(error, KeyError) and error.args:
        message = str(error.args[0])
    if not isinstance(error, known):
        message = f"{type(error).__name__}: {message}"
    return message


def _show_warning(message, category, filename, lineno, file=None, line=None):
    """Prints a warning as ``dynprompt: warning: ...``."""
    text = " ".join(str(message).split())
    print(f"dynprompt: warning: {text}", file=file or sys.stderr)


def _fail(message):
    """Prints an error line and exits with status 1."""
    print(f"dynprompt: error: {message}", file=sys.stderr)
    sys.exit(EXIT_ERROR)


if __name__ == "__main__":
    sys.exit(main())
