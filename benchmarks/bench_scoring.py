"""Verification scoring at scale: our EER/minDCF and s-norm scorer.

Measures ``dynprompt_sb.scoring`` on synthetic trials and, side by side,
``speechbrain.utils.metric_stats.EER`` and ``minDCF`` at the sizes where
they fit on the machine:

eer, min_dcf
    Synthetic float32 scores, half of them targets (as in VoxCeleb1-O):
    target scores ~ N(2, 1), non-target ~ N(0, 1). Ours at 5k, 20k, 1M and
    10M trials, each metric alone and both in one process (``eer +
    min_dcf``, the target below); SpeechBrain's at 5k and 20k only. Larger
    sizes are estimated instead of run: SpeechBrain's ``minDCF`` builds
    thresholds x scores matrices (about 2n candidate thresholds by n/2
    scores), so its memory is the bytes per matrix element measured at 20k
    times the matrix size (also given at VoxCeleb1-O's 37,611 trials); its
    ``EER`` loops over the thresholds in O(n) memory but O(n^2) time,
    estimated the same way from the 20k run. At
    5k and 20k the values of ours and SpeechBrain's are compared (they
    must agree to 1e-6).
s-norm
    ``cosine_score_trials`` with adaptive s-norm on 1M and 10M trials
    between 20,000 utterances of 192-d random embeddings, against a cohort
    of 5,000 with top_k 300. The trials come from a lazy generator (as a
    trial file would be read), whose cost is part of the time.

Every measurement runs in a fresh subprocess, so that measurements cannot
pollute one another. Peak memory is the growth of the resident set over
the measured call alone: the inputs are built and the libraries imported
first, then the kernel's peak counter is reset (``/proc/self/clear_refs``)
and the peak during the call (``VmHWM``) minus the resident set before it
is reported. Where the counter cannot be reset, ``ru_maxrss`` after the
call minus ``ru_maxrss`` before it is used. Times are one call each, wall
clock, first touch of fresh memory included. MB and GB are 2^20 and 2^30
bytes.

Targets, printed as PASS/FAIL:

1. 10M trials, ``eer`` + ``min_dcf``: under 10 s and 2 GB;
2. s-norm scoring of 10M trials: under 2 GB (its time is reported).

Usage::

    python benchmarks/bench_scoring.py --out bench_output/scoring.json

Authors
 * dynprompt-sb contributors 2026
"""

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time

RESULT_TAG = "BENCH_RESULT "
METRICS = ("eer", "min_dcf")
TARGET_SHARE = 0.5  # targets among the synthetic trials
SMALL_SIZES = (5_000, 20_000)
LARGE_SIZES = (1_000_000, 10_000_000)
# SpeechBrain is only estimated at these sizes; minDCF also at VoxCeleb1-O's
# 37,611 trials, the size where it is known to run out of memory.
ESTIMATED_SIZES = LARGE_SIZES
VOXCELEB1_O = 37_611
SNORM_SIZES = (1_000_000, 10_000_000)
SNORM_SETUP = dict(utterances=20_000, dim=192, cohort=5_000, top_k=300)
TRIAL_BLOCK = 100_000  # trials the s-norm generator draws at once
MAX_SECONDS = 10.0
MAX_MB = 2048.0
GB = 2**30


# --------------------------------------------------------------------------
# Worker: one measurement, in a fresh process
# --------------------------------------------------------------------------


def _status_kib(field):
    """A ``/proc/self/status`` field (VmRSS, VmHWM), in KiB."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def measure(call):
    """Runs ``call()`` once; returns its result, seconds and peak MiB.

    Arguments
    ---------
    call : callable
        The measured work; its inputs must already exist.

    Returns
    -------
    result : object
        What ``call`` returned.
    stats : dict
        ``seconds``, ``peak_mb`` (growth of the resident set during the
        call) and ``memory_method``.
    """
    try:
        # Writing 5 resets VmHWM to the current resident set (Linux >= 4.0).
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")
        method = "VmHWM after clear_refs, minus VmRSS before"
        before = _status_kib("VmRSS")
    except OSError:
        method = "ru_maxrss after minus ru_maxrss before"
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    result = call()
    seconds = time.perf_counter() - start
    if method.startswith("VmHWM"):
        peak = _status_kib("VmHWM")
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    stats = dict(
        seconds=seconds,
        peak_mb=max(0, peak - before) / 1024,
        memory_method=method,
    )
    return result, stats


def load_scoring():
    """Loads ``dynprompt_sb/scoring.py`` alone.

    The module needs only numpy and torch, while importing it through the
    package runs ``dynprompt_sb/__init__.py``, which imports transformers:
    seconds per worker that measure nothing. The code measured is the same.
    """
    import importlib.util

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    path = os.path.join(root, "dynprompt_sb", "scoring.py")
    spec = importlib.util.spec_from_file_location("scoring", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def synthetic_scores(n, seed=0):
    """Float32 target and non-target scores, built without temporaries."""
    import numpy as np

    rng = np.random.default_rng(seed)
    n_pos = int(n * TARGET_SHARE)
    pos = rng.standard_normal(n_pos, dtype=np.float32)
    pos += 2
    neg = rng.standard_normal(n - n_pos, dtype=np.float32)
    return pos, neg


def run_metric_worker(spec):
    """EER / minDCF, ours or SpeechBrain's, on ``spec["trials"]`` trials."""
    import numpy as np
    import torch

    pos, neg = synthetic_scores(spec["trials"])
    if spec["impl"] == "speechbrain":
        from speechbrain.utils.metric_stats import EER, minDCF

        pos, neg = torch.from_numpy(pos), torch.from_numpy(neg)
        calls = {"eer": EER, "min_dcf": minDCF}
    else:
        scoring = load_scoring()
        calls = {"eer": scoring.eer, "min_dcf": scoring.min_dcf}
    names = spec["metric"].split("+")

    def run():
        return {name: calls[name](pos, neg) for name in names}

    values, stats = measure(run)
    distinct = len(np.unique(np.concatenate([pos, neg])))
    return dict(
        spec,
        **stats,
        values=values,
        n_pos=len(pos),
        n_neg=len(neg),
        thresholds=2 * distinct - 1,
    )


def snorm_inputs(n_trials, seed=0):
    """Embeddings, cohort and a lazy generator of ``n_trials`` trials."""
    from itertools import chain

    import numpy as np
    import torch

    utts, dim = SNORM_SETUP["utterances"], SNORM_SETUP["dim"]
    generator = torch.Generator().manual_seed(seed)
    per_speaker = 20
    ids = [f"id{i // per_speaker:05d}/vid/{i:05d}" for i in range(utts)]
    vectors = torch.randn(utts, dim, generator=generator)
    embeddings = dict(zip(ids, vectors, strict=True))
    cohort = torch.randn(SNORM_SETUP["cohort"], dim, generator=generator)

    def blocks():
        rng = np.random.default_rng(seed)
        for start in range(0, n_trials, TRIAL_BLOCK):
            size = min(TRIAL_BLOCK, n_trials - start)
            enrol = rng.integers(0, utts, size)
            test = rng.integers(0, utts, size)
            labels = (enrol // per_speaker == test // per_speaker).astype(int)
            yield zip(
                labels.tolist(),
                map(ids.__getitem__, enrol.tolist()),
                map(ids.__getitem__, test.tolist()),
                strict=True,
            )

    return chain.from_iterable(blocks()), embeddings, cohort


def run_snorm_worker(spec):
    """s-norm scoring of ``spec["trials"]`` trials."""
    scoring = load_scoring()
    trials, embeddings, cohort = snorm_inputs(spec["trials"])

    def run():
        return scoring.cosine_score_trials(
            trials, embeddings, cohort, top_k=SNORM_SETUP["top_k"]
        )

    scores, stats = measure(run)
    return dict(spec, **stats, scored=len(scores), **SNORM_SETUP)


def run_worker(spec):
    """Runs one measurement and prints its result on a tagged line."""
    if spec["impl"] == "snorm":
        result = run_snorm_worker(spec)
    else:
        result = run_metric_worker(spec)
    print(RESULT_TAG + json.dumps(result), flush=True)


# --------------------------------------------------------------------------
# Parent: plan, spawn, estimate, report
# --------------------------------------------------------------------------


def plan_runs():
    """The measurements, in the order they run."""
    runs = []
    for n in SMALL_SIZES:
        for impl in ("ours", "speechbrain"):
            runs += [dict(impl=impl, metric=m, trials=n) for m in METRICS]
    for n in LARGE_SIZES:
        runs += [dict(impl="ours", metric=m, trials=n) for m in METRICS]
        runs.append(dict(impl="ours", metric="eer+min_dcf", trials=n))
    runs += [dict(impl="snorm", metric="s-norm", trials=n) for n in SNORM_SIZES]
    return runs


def spawn_worker(spec):
    """Runs one measurement in a fresh Python process.

    Arguments
    ---------
    spec : dict
        ``impl`` (ours, speechbrain, snorm), ``metric`` and ``trials``.

    Returns
    -------
    result : dict
        The worker's result, or the spec with an ``error``.
    """
    command = [sys.executable, os.path.abspath(__file__)]
    command += ["--worker", json.dumps(spec)]
    process = subprocess.run(command, capture_output=True, text=True)
    for line in process.stdout.splitlines():
        if line.startswith(RESULT_TAG):
            return json.loads(line[len(RESULT_TAG) :])
    error = (process.stderr or process.stdout).strip().splitlines()[-5:]
    return dict(
        spec, error=f"exit code {process.returncode}: " + "\n".join(error)
    )


def find(results, impl, metric, trials):
    """The successful result of one measurement, or None."""
    for result in results:
        if (result["impl"], result["metric"], result["trials"]) == (
            impl,
            metric,
            trials,
        ) and "error" not in result:
            return result
    return None


def estimate_speechbrain(results):
    """Skipped SpeechBrain rows, extrapolated from its largest measured run.

    ``minDCF`` holds a thresholds x positives matrix (float32 copies and
    boolean comparisons), then the same for negatives; its peak scales
    with thresholds x max(positives, negatives). ``EER`` compares every
    score with every threshold, one threshold at a time: its time scales
    with thresholds x trials, its memory with trials.
    """
    largest = max(SMALL_SIZES)
    rows = []
    dcf = find(results, "speechbrain", "min_dcf", largest)
    if dcf is not None:
        elements = dcf["thresholds"] * max(dcf["n_pos"], dcf["n_neg"])
        bytes_per_element = dcf["peak_mb"] * 2**20 / elements
        for n in (VOXCELEB1_O,) + ESTIMATED_SIZES:
            n_pos = int(n * TARGET_SHARE)
            need = (2 * n - 1) * max(n_pos, n - n_pos) * bytes_per_element
            rows.append(
                dict(
                    impl="speechbrain",
                    metric="min_dcf",
                    trials=n,
                    skipped=f"skipped (would need ~{_bytes(need)})",
                    estimated_gb=need / GB,
                    bytes_per_matrix_element=bytes_per_element,
                )
            )
    rate = find(results, "speechbrain", "eer", largest)
    if rate is not None:
        per_pair = rate["seconds"] / (rate["thresholds"] * largest)
        for n in ESTIMATED_SIZES:
            seconds = per_pair * (2 * n - 1) * n
            rows.append(
                dict(
                    impl="speechbrain",
                    metric="eer",
                    trials=n,
                    skipped=f"skipped (would take ~{_duration(seconds)})",
                    estimated_seconds=seconds,
                )
            )
    return rows


def compare_values(results):
    """Max difference between ours and SpeechBrain's, per size and metric."""
    checks = []
    for n in SMALL_SIZES:
        for metric in METRICS:
            ours = find(results, "ours", metric, n)
            theirs = find(results, "speechbrain", metric, n)
            if ours is None or theirs is None:
                continue
            a, b = ours["values"][metric], theirs["values"][metric]
            diff = max(abs(a[0] - b[0]), abs(a[1] - b[1]))
            checks.append(
                dict(trials=n, metric=metric, max_abs_diff=diff, ok=diff < 1e-6)
            )
    return checks


def check_targets(results):
    """PASS/FAIL of the two targets."""
    n = max(LARGE_SIZES)
    both = find(results, "ours", "eer+min_dcf", n)
    snorm = find(results, "snorm", "s-norm", max(SNORM_SIZES))
    targets = []
    name = f"{n // 10**6}M trials (eer + min_dcf) under 10 s and 2 GB"
    if both is None:
        targets.append(dict(target=name, passed=False, detail="not measured"))
    else:
        passed = both["seconds"] < MAX_SECONDS and both["peak_mb"] < MAX_MB
        detail = f"{both['seconds']:.2f} s, {both['peak_mb']:,.0f} MB"
        targets.append(dict(target=name, passed=passed, detail=detail))
    name = f"s-norm scoring of {max(SNORM_SIZES) // 10**6}M trials under 2 GB"
    if snorm is None:
        targets.append(dict(target=name, passed=False, detail="not measured"))
    else:
        passed = snorm["peak_mb"] < MAX_MB
        detail = f"{snorm['peak_mb']:,.0f} MB, in {snorm['seconds']:.1f} s"
        targets.append(dict(target=name, passed=passed, detail=detail))
    return targets


def _bytes(count):
    """A byte count in GB, or TB when over 1,000 GB."""
    if count >= 1000 * GB:
        return f"{count / (1024 * GB):,.0f} TB"
    return f"{count / GB:,.1f} GB"


def _duration(seconds):
    """A duration in seconds, minutes, hours or days."""
    for unit, size in (("days", 86400), ("h", 3600), ("min", 60)):
        if seconds >= 2 * size:
            return f"{seconds / size:,.1f} {unit}"
    return f"{seconds:.0f} s"


def _seconds(seconds):
    """A measured time, with more decimals for short ones."""
    return f"{seconds:.4f}" if seconds < 0.1 else f"{seconds:.2f}"


def _label(result):
    """Row label of a result."""
    if result["impl"] == "snorm":
        return "ours s-norm scoring"
    names = {"eer": "EER", "min_dcf": "minDCF", "eer+min_dcf": "EER+minDCF"}
    if result["impl"] == "speechbrain":
        return f"speechbrain {names[result['metric']]}"
    return f"ours {result['metric'].replace('+', ' + ')}"


def _outcome(result):
    """Result column: the metric values, or what the s-norm run scored."""
    if result["impl"] == "snorm":
        return f"{result['scored']:,} scores"
    values = result["values"]
    return "  ".join(
        f"{name}={value:.6f} @ {threshold:.6f}"
        for name, (value, threshold) in values.items()
    )


def format_table(results, estimates):
    """The results as a fixed-width text table."""
    header = f"{'measurement':<24}{'trials':>12}{'time (s)':>11}"
    header += f"{'peak (MB)':>12}  result"
    lines = [header, "-" * len(header)]
    rows = sorted(
        results + estimates,
        key=lambda r: (r["impl"] == "snorm", r["trials"], r["impl"]),
    )
    for result in rows:
        start = f"{_label(result):<24}{result['trials']:>12,}"
        if "error" in result:
            lines.append(f"{start}  FAILED: {result['error']}")
        elif "skipped" in result:
            lines.append(f"{start}{'':>23}  {result['skipped']}")
        else:
            lines.append(
                f"{start}{_seconds(result['seconds']):>11}"
                f"{result['peak_mb']:>12,.1f}  {_outcome(result)}"
            )
    return "\n".join(lines)


def machine_info():
    """CPU, cores and library versions."""
    import numpy
    import speechbrain
    import torch

    cpu_model = platform.processor() or "unknown"
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    cpu_model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return dict(
        cpu_model=cpu_model,
        usable_cores=len(os.sched_getaffinity(0)),
        python=platform.python_version(),
        numpy=numpy.__version__,
        torch=torch.__version__,
        speechbrain=speechbrain.__version__,
    )


def parse_args(argv=None):
    """Command-line options."""
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--out", default="bench_output/scoring.json")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv=None):
    """Runs every measurement, prints the table and writes the JSON."""
    args = parse_args(argv)
    if args.worker:
        run_worker(json.loads(args.worker))
        return
    started = time.perf_counter()
    results = []
    for spec in plan_runs():
        result = spawn_worker(spec)
        results.append(result)
        status = result.get("error", "")[:60] or (
            f"{result['seconds']:.2f} s, {result['peak_mb']:,.1f} MB"
        )
        print(
            f"[{time.perf_counter() - started:6.1f} s] {spec['impl']} "
            f"{spec['metric']} {spec['trials']:,}: {status}",
            flush=True,
        )
    estimates = estimate_speechbrain(results)
    checks = compare_values(results)
    targets = check_targets(results)

    print()
    print(format_table(results, estimates))
    print()
    for check in checks:
        verdict = "equal" if check["ok"] else "DIFFERENT"
        print(
            f"ours vs speechbrain, {check['metric']} at {check['trials']:,} "
            f"trials: {verdict} (max abs diff {check['max_abs_diff']:.1e})"
        )
    for target in targets:
        verdict = "PASS" if target["passed"] else "FAIL"
        print(f"{verdict}  {target['target']}: {target['detail']}")
    total = time.perf_counter() - started
    print(f"total {total:.0f} s")

    report = dict(
        machine=machine_info(),
        setup=dict(target_share=TARGET_SHARE, snorm=SNORM_SETUP),
        measurements=results,
        speechbrain_estimates=estimates,
        agreement=checks,
        targets=targets,
        total_seconds=total,
    )
    folder = os.path.dirname(os.path.abspath(args.out))
    os.makedirs(folder, exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(report, f, indent=2)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
