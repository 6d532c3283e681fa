#!/usr/bin/env python3
"""Runs the whole recipe in a few minutes on a CPU, with no download.

It writes a synthetic corpus in the VoxCeleb layout
(``dynprompt_sb.toy_corpus``) and a tiny, randomly initialised WavLM
folder (``save_tiny_wavlm(style="large")``, loaded through the same
``from_pretrained`` path as microsoft/wavlm-large), then runs train.py
with hparams/demo.yaml on them: training, checkpoints, the test stage on
held-out speakers, and the DET and prompt-usage plots.

To run it (``make demo`` does the first):
> python recipes/VoxCeleb/SpeakerRec/demo.py --output demo_output
> python recipes/VoxCeleb/SpeakerRec/demo.py --output demo_output --mode all

``--mode`` picks dynamic prompts (the default), static prompts, no
prompts, full fine-tuning, or all four one after the other with a table
of their results. Options it does not know go to train.py as overrides
(e.g. ``--number_of_epochs=5``). Rerunning resumes or reuses what is
already there.

Authors
 * dynprompt-sb contributors 2026
"""

import argparse
import json
import os
import subprocess
import sys
import time

from dynprompt_sb.tiny_wavlm import save_tiny_wavlm
from dynprompt_sb.toy_corpus import make_toy_corpus

RECIPE_DIR = os.path.dirname(os.path.abspath(__file__))

# train.py overrides of hparams/demo.yaml for each mode.
MODES = {
    "dynamic": ["--prompt_mode=dynamic"],
    "static": ["--prompt_mode=static"],
    "none": ["--prompt_mode=none"],
    "finetune": ["--prompt_mode=none", "--freeze_wavlm=False"],
}

# The toy corpus of the demo; out_n_neurons in demo.yaml matches its
# number of training speakers.
CORPUS = dict(
    num_train_speakers=24,
    num_test_speakers=16,
    sessions_per_speaker=2,
    utts_per_session=4,
    min_duration=1.5,
    max_duration=3.5,
    seed=0,
)


def prepare(output):
    """Writes (or reuses) the toy corpus and the tiny WavLM folder.

    Arguments
    ---------
    output : str
        The demo's output folder.

    Returns
    -------
    data_folder : str
    wavlm_folder : str
    """
    corpus = make_toy_corpus(os.path.join(output, "toy_corpus"), **CORPUS)
    wavlm_folder = os.path.join(output, "tiny_wavlm")
    if not os.path.isfile(os.path.join(wavlm_folder, "config.json")):
        save_tiny_wavlm(wavlm_folder, style="large")
    return corpus["data_folder"], wavlm_folder


def run_mode(mode, output, data_folder, wavlm_folder, extra_args):
    """Runs train.py for one mode and returns its results.

    Arguments
    ---------
    mode : str
        A key of ``MODES``.
    output : str
        The demo's output folder; the run goes to ``<output>/<mode>``.
    data_folder : str
        The toy corpus.
    wavlm_folder : str
        The tiny WavLM.
    extra_args : list of str
        More overrides for train.py.

    Returns
    -------
    results : dict
        The run's results.json.
    """
    run_folder = os.path.join(output, mode)
    command = [
        sys.executable,
        os.path.join(RECIPE_DIR, "train.py"),
        os.path.join(RECIPE_DIR, "hparams", "demo.yaml"),
        f"--data_folder={data_folder}",
        f"--wavlm_source={wavlm_folder}",
        f"--output_folder={run_folder}",
        "--noprogressbar",
        *MODES[mode],
        *extra_args,
    ]
    print("Running:", " ".join(command), flush=True)
    env = dict(os.environ)
    # The demo's tensors are tiny: threads would spend more time waiting on
    # one another than computing (measured: about 5x slower with two
    # threads on two busy cores). Set OMP_NUM_THREADS to choose otherwise.
    env.setdefault("OMP_NUM_THREADS", "1")
    subprocess.run(command, check=True, env=env)
    with open(os.path.join(run_folder, "results.json"), encoding="utf-8") as f:
        return json.load(f)


def describe(mode, results, seconds):
    """Prints one run's metrics and where its files are."""
    print(f"\n== {mode}: {seconds:.0f} s ==")
    for name in ("cosine", "s-norm"):
        if name in results:
            metrics = results[name]
            print(
                f"{name:>7}: EER {100 * metrics['eer']:.2f}%, "
                f"minDCF(0.01) {metrics['min_dcf_0.01']:.4f}, "
                f"minDCF(0.05) {metrics['min_dcf_0.05']:.4f} "
                f"({results['num_trials']} trials)"
            )
    for name, path in results["files"].items():
        print(f"{name:>17}: {path}")


def main(argv=None):
    """Runs the demo."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--output", default="demo_output")
    parser.add_argument("--mode", default="dynamic", choices=[*MODES, "all"])
    args, extra_args = parser.parse_known_args(argv)
    output = os.path.abspath(args.output)

    start = time.time()
    data_folder, wavlm_folder = prepare(output)
    print(
        f"Toy corpus in {data_folder}, tiny WavLM in {wavlm_folder} "
        f"({time.time() - start:.0f} s)",
        flush=True,
    )

    modes = list(MODES) if args.mode == "all" else [args.mode]
    summary = {}
    for mode in modes:
        mode_start = time.time()
        results = run_mode(mode, output, data_folder, wavlm_folder, extra_args)
        summary[mode] = (results, time.time() - mode_start)

    for mode, (results, seconds) in summary.items():
        describe(mode, results, seconds)
    if len(summary) > 1:
        print("\n| mode | EER (%) | EER s-norm (%) | minDCF(0.01) |")
        print("| --- | --- | --- | --- |")
        for mode, (results, _) in summary.items():
            snorm = results.get("s-norm", {}).get("eer")
            snorm = "-" if snorm is None else f"{100 * snorm:.2f}"
            print(
                f"| {mode} | {100 * results['cosine']['eer']:.2f} | {snorm} "
                f"| {results['cosine']['min_dcf_0.01']:.4f} |"
            )
    print(f"\nDemo finished in {time.time() - start:.0f} s")


if __name__ == "__main__":
    main()
