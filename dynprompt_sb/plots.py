"""Figures for verification results and prompt selection, saved as PNG.

Figures are drawn on matplotlib's Agg canvas without pyplot, so they work
on machines without a display and never touch pyplot's global state (a
training run may plot from any process).

Authors
 * dynprompt-sb contributors 2026
"""

import os

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from scipy.stats import norm

# DET axis ticks, as probabilities; the axes show their normal deviates.
DET_TICKS = (
    0.0001, 0.001, 0.01, 0.02, 0.05, 0.1, 0.2, 0.4, 0.6, 0.8, 0.9,
    0.95, 0.99,
)  # fmt: skip
# Axis range: rates beyond these say little, and squeeze the rest.
DET_LIMITS = (0.0001, 0.99)
# Enough points for a smooth curve at any figure size: DET curves of
# millions of trials are thinned to about this many.
DET_MAX_POINTS = 5000


def plot_det(positive_scores, negative_scores, path, title=None):
    """Plots a DET curve with its equal error rate point.

    Miss probability (targets rejected) against false-alarm probability
    (non-targets accepted), both on normal-deviate scales, where score
    distributions close to Gaussian give near-straight lines.

    Arguments
    ---------
    positive_scores : array-like
        Scores of target trials (higher means same speaker).
    negative_scores : array-like
        Scores of non-target trials.
    path : str or os.PathLike
        The PNG to write; missing parent folders are created.
    title : str or None
        Figure title.

    Returns
    -------
    eer : float
        The equal error rate marked on the curve, as a fraction.

    Example
    -------
    >>> import os, tempfile
    >>> path = os.path.join(tempfile.mkdtemp(), "det.png")
    >>> plot_det([0.9, 0.8, 0.3], [0.1, 0.2, 0.85], path)
    0.3333333333333333
    >>> os.path.getsize(path) > 0
    True
    """
    positives = _finite_scores(positive_scores, "positive_scores")
    negatives = _finite_scores(negative_scores, "negative_scores")
    miss, false_alarm = _det_points(positives, negatives)
    eer = _equal_error_rate(miss, false_alarm)

    # Probabilities of 0 or 1 sit at infinite deviates: clip them to half
    # a trial inside the axis.
    floor = 0.5 / max(len(positives), len(negatives))
    miss_deviate = norm.ppf(np.clip(miss, floor, 1 - floor))
    false_alarm_deviate = norm.ppf(np.clip(false_alarm, floor, 1 - floor))
    keep = _thin(false_alarm_deviate, miss_deviate)

    figure = Figure(figsize=(5.5, 5.5))
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    axes.plot(false_alarm_deviate[keep], miss_deviate[keep], label="DET")
    eer_deviate = norm.ppf(np.clip(eer, floor, 1 - floor))
    axes.plot(
        [eer_deviate],
        [eer_deviate],
        "o",
        color="tab:red",
        label=f"EER = {100 * eer:.2f}%",
    )
    low = norm.ppf(max(floor, DET_LIMITS[0]))
    high = norm.ppf(min(1 - floor, DET_LIMITS[1]))
    ticks = [tick for tick in DET_TICKS if low <= norm.ppf(tick) <= high]
    tick_labels = [f"{100 * tick:g}" for tick in ticks]
    for set_ticks, set_labels, set_limits in (
        (axes.set_xticks, axes.set_xticklabels, axes.set_xlim),
        (axes.set_yticks, axes.set_yticklabels, axes.set_ylim),
    ):
        set_ticks(norm.ppf(ticks))
        set_labels(tick_labels)
        set_limits(low, high)
    axes.plot([low, high], [low, high], ":", color="grey", linewidth=0.8)
    axes.set_xlabel("False alarm probability (%)")
    axes.set_ylabel("Miss probability (%)")
    axes.grid(True, linewidth=0.3)
    axes.legend(loc="upper right")
    axes.set_title(
        title or f"DET ({len(positives)} target, {len(negatives)} non-target)"
    )
    _save(figure, path)
    return eer


def plot_prompt_usage(usage, path, title=None):
    """Plots how often each prompt was selected at each layer.

    Arguments
    ---------
    usage : array-like
        Counts of shape [layers, prompts] (a numpy array or a CPU tensor).
    path : str or os.PathLike
        The PNG to write; missing parent folders are created.
    title : str or None
        Figure title.

    Example
    -------
    >>> import os, tempfile
    >>> path = os.path.join(tempfile.mkdtemp(), "usage.png")
    >>> plot_prompt_usage([[5, 0, 1], [2, 2, 2]], path)
    >>> os.path.getsize(path) > 0
    True
    """
    usage = np.asarray(usage, dtype=float)
    if usage.ndim != 2 or usage.size == 0:
        raise ValueError(
            "plot_prompt_usage: usage must be a non-empty [layers, prompts] "
            f"array, got shape {usage.shape}"
        )
    if not np.all(np.isfinite(usage)) or np.any(usage < 0):
        raise ValueError(
            "plot_prompt_usage: usage must hold finite counts >= 0"
        )
    num_layers, num_prompts = usage.shape
    figure = Figure(
        figsize=(
            min(16.0, 3.0 + 0.3 * num_prompts),
            min(12.0, 2.0 + 0.3 * num_layers),
        )
    )
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    image = axes.imshow(
        usage,
        aspect="auto",
        interpolation="nearest",
        cmap="viridis",
        origin="lower",
        extent=(0.5, num_prompts + 0.5, 0.5, num_layers + 0.5),
    )
    figure.colorbar(image, ax=axes, label="Times selected")
    axes.set_xlabel("Prompt")
    axes.set_ylabel("Layer")
    axes.set_yticks(_integer_ticks(num_layers))
    axes.set_xticks(_integer_ticks(num_prompts))
    axes.set_title(title or "Prompt selection per layer")
    _save(figure, path)


def plot_eer_by_mode(results, path, title=None, ylabel="EER (%)"):
    """Bar chart of the mean EER per mode, with the spread over runs.

    Arguments
    ---------
    results : dict
        Mode name -> list of EERs (one per run or seed).
    path : str or os.PathLike
        The PNG to write; missing parent folders are created.
    title : str or None
        Figure title.
    ylabel : str
        Label of the EER axis; say whether the EERs are fractions or
        percentages.

    Example
    -------
    >>> import os, tempfile
    >>> path = os.path.join(tempfile.mkdtemp(), "eer.png")
    >>> plot_eer_by_mode({"frozen": [9.1, 9.5], "prompts": [7.2, 7.0]}, path)
    >>> os.path.getsize(path) > 0
    True
    """
    if not results:
        raise ValueError("plot_eer_by_mode: results holds no mode")
    modes = list(results)
    means, spreads = [], []
    for mode in modes:
        eers = np.asarray(results[mode], dtype=float).ravel()
        if eers.size == 0 or not np.all(np.isfinite(eers)):
            raise ValueError(
                f"plot_eer_by_mode: mode {mode!r} needs at least one finite "
                f"EER, got {results[mode]!r}"
            )
        means.append(eers.mean())
        # The standard deviation over runs; one run has no spread.
        spreads.append(eers.std(ddof=1) if eers.size > 1 else 0.0)

    figure = Figure(figsize=(max(4.0, 1.2 * len(modes) + 2.0), 4.0))
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    positions = np.arange(len(modes))
    bars = axes.bar(positions, means, yerr=spreads, capsize=4, color="tab:blue")
    labels = [
        f"{mean:.2f} ± {spread:.2f}\n(n={len(results[mode])})"
        for mode, mean, spread in zip(modes, means, spreads, strict=True)
    ]
    axes.bar_label(bars, labels=labels, padding=3, fontsize=8)
    axes.set_xticks(positions)
    axes.set_xticklabels(modes, rotation=20, ha="right")
    axes.set_ylabel(ylabel)
    top = float(np.max(np.add(means, spreads)))
    axes.set_ylim(0, 1.25 * top if top > 0 else 1.0)
    axes.set_title(title or "EER by mode (mean ± std over runs)")
    _save(figure, path)


def _finite_scores(scores, name):
    """Scores as a 1-D float array; rejects empty or non-finite input."""
    scores = np.asarray(scores, dtype=float).ravel()
    if scores.size == 0:
        raise ValueError(f"plot_det: {name} is empty")
    if not np.all(np.isfinite(scores)):
        raise ValueError(f"plot_det: {name} holds NaN or infinite scores")
    return scores


def _det_points(positives, negatives):
    """Miss and false-alarm rates at every distinct threshold.

    A trial is accepted when its score is >= the threshold. Thresholds run
    from below the lowest score (nothing missed) to above the highest
    (nothing falsely accepted).
    """
    thresholds = np.unique(np.concatenate([positives, negatives]))
    thresholds = np.append(thresholds, np.inf)
    miss = np.searchsorted(np.sort(positives), thresholds, side="left")
    accepted_negatives = len(negatives) - np.searchsorted(
        np.sort(negatives), thresholds, side="left"
    )
    return miss / len(positives), accepted_negatives / len(negatives)


def _equal_error_rate(miss, false_alarm):
    """Where the miss and false-alarm rates cross, interpolated.

    Between the last threshold with false_alarm > miss and the next one,
    both rates move linearly; the EER is where they meet.
    """
    crossed = int(np.argmax(miss >= false_alarm))
    if crossed == 0:
        return float((miss[0] + false_alarm[0]) / 2)
    gap_before = false_alarm[crossed - 1] - miss[crossed - 1]
    gap_after = miss[crossed] - false_alarm[crossed]
    weight = gap_before / (gap_before + gap_after)
    return float(
        miss[crossed - 1] + weight * (miss[crossed] - miss[crossed - 1])
    )


def _thin(x, y):
    """Indices of points at least a small step apart along the curve."""
    if len(x) <= DET_MAX_POINTS:
        return np.arange(len(x))
    steps = np.hypot(np.diff(x), np.diff(y))
    travelled = np.concatenate([[0.0], np.cumsum(steps)])
    spacing = travelled[-1] / DET_MAX_POINTS
    # The first point of each spacing-long stretch, plus the last point.
    _, first = np.unique(np.floor(travelled / spacing), return_index=True)
    return np.union1d(first, [len(x) - 1])


def _integer_ticks(count):
    """At most ~12 ticks over 1..count, always integers."""
    step = max(1, int(np.ceil(count / 12)))
    return np.arange(1, count + 1, step)


def _save(figure, path):
    """Writes the figure as PNG, creating the parent folder."""
    path = os.fspath(path)
    parent = os.path.dirname(path)
    if parent:
        os.makedirs(parent, exist_ok=True)
    figure.tight_layout()
    figure.savefig(path, format="png", dpi=100)
