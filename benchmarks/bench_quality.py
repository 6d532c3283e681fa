#!/usr/bin/env python3
"""Quality side by side: dynamic vs static vs frozen vs full fine-tuning.

Every mode trains with the recipe's train.py and hparams/demo.yaml on the
same synthetic toy corpus and tiny WavLM, under the same budget (epochs,
crops, batch, back-end), for several seeds; the held-out speakers' EER and
minDCF are reported as mean and spread. The numbers say how the modes
compare on this toy task with a randomly initialised backbone, not how they
compare on VoxCeleb with a pretrained WavLM.

Run (``make bench`` does it):
> python benchmarks/bench_quality.py --out bench_output/quality.json

Authors
 * dynprompt-sb contributors 2026
"""

import argparse
import json
import os
import sys
import time

import numpy as np

RECIPE_DIR = os.path.join(
    os.path.dirname(os.path.abspath(__file__)),
    "..",
    "recipes",
    "VoxCeleb",
    "SpeakerRec",
)
sys.path.insert(0, RECIPE_DIR)
import demo  # noqa: E402  (the recipe's demo: corpus, WavLM, train.py)

from dynprompt_sb.plots import plot_eer_by_mode  # noqa: E402


def main():
    """Trains every mode for every seed and prints the table."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="bench_output/quality.json")
    parser.add_argument("--seeds", default="1,2,3")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--modes", default=",".join(demo.MODES))
    args = parser.parse_args()

    work = os.path.abspath(os.path.join(os.path.dirname(args.out), "quality"))
    data_folder, wavlm_folder = demo.prepare(work)
    modes = args.modes.split(",")
    seeds = [int(seed) for seed in args.seeds.split(",")]
    runs = []
    for seed in seeds:
        for mode in modes:
            start = time.time()
            results = demo.run_mode(
                mode,
                os.path.join(work, f"seed{seed}"),
                data_folder,
                wavlm_folder,
                [f"--seed={seed}", f"--number_of_epochs={args.epochs}"],
            )
            runs.append(
                dict(
                    mode=mode,
                    seed=seed,
                    seconds=time.time() - start,
                    eer=results["cosine"]["eer"],
                    min_dcf_001=results["cosine"]["min_dcf_0.01"],
                    eer_snorm=results.get("s-norm", {}).get("eer"),
                    files=results["files"],
                )
            )

    summary = {}
    print(
        f"\n{len(seeds)} seeds, {args.epochs} epochs each, "
        f"toy corpus in {data_folder}"
    )
    print("| mode | EER % (mean ± std) | EER s-norm % | minDCF(0.01) | s/run |")
    print("| --- | --- | --- | --- | --- |")
    for mode in modes:
        mine = [run for run in runs if run["mode"] == mode]
        eers = 100 * np.array([run["eer"] for run in mine])
        snorm = 100 * np.array(
            [run["eer_snorm"] for run in mine if run["eer_snorm"] is not None]
        )
        dcf = np.array([run["min_dcf_001"] for run in mine])
        seconds = np.mean([run["seconds"] for run in mine])
        summary[mode] = dict(
            eer_mean=eers.mean(),
            eer_std=eers.std(),
            eer_snorm_mean=snorm.mean() if len(snorm) else None,
            min_dcf_001_mean=dcf.mean(),
            seconds_per_run=seconds,
        )
        snorm_text = (
            f"{snorm.mean():.2f} ± {snorm.std():.2f}" if len(snorm) else "-"
        )
        print(
            f"| {mode} | {eers.mean():.2f} ± {eers.std():.2f} | "
            f"{snorm_text} | {dcf.mean():.4f} | {seconds:.0f} |"
        )

    plot_path = os.path.join(os.path.dirname(args.out), "quality_eer.png")
    plot_eer_by_mode(
        {
            mode: [100 * run["eer"] for run in runs if run["mode"] == mode]
            for mode in modes
        },
        plot_path,
    )
    usage_plot = next(
        (
            run["files"].get("prompt_usage_plot")
            for run in runs
            if run["mode"] == "dynamic"
        ),
        None,
    )
    print(f"EER plot: {plot_path}")
    print(f"Prompt-usage plot of a dynamic run: {usage_plot}")
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w", encoding="utf-8") as out_file:
        json.dump(
            dict(
                seeds=seeds,
                epochs=args.epochs,
                runs=runs,
                summary=summary,
                eer_plot=plot_path,
                prompt_usage_plot=usage_plot,
            ),
            out_file,
            indent=2,
        )


if __name__ == "__main__":
    main()
