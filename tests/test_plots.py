"""Tests of dynprompt_sb.plots: DET curve, prompt usage, EER bars."""

import numpy as np
import pytest
import torch
from matplotlib.image import imread

from dynprompt_sb.plots import plot_det, plot_eer_by_mode, plot_prompt_usage

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def assert_png(path):
    with open(path, "rb") as image_file:
        assert image_file.read(8) == PNG_SIGNATURE
    height, width = imread(path).shape[:2]
    assert height > 100 and width > 100


def brute_force_eer(positives, negatives):
    """Rates at the threshold where they are closest, averaged."""
    thresholds = np.concatenate([positives, negatives])[:, None]
    miss = np.mean(positives[None, :] < thresholds, axis=1)
    false_alarm = np.mean(negatives[None, :] >= thresholds, axis=1)
    closest = np.argmin(np.abs(miss - false_alarm))
    return (miss[closest] + false_alarm[closest]) / 2


def test_det_writes_png_and_returns_the_eer(tmp_path):
    rng = np.random.default_rng(0)
    positives = rng.normal(2.0, 1.0, 600)
    negatives = rng.normal(0.0, 1.0, 900)
    path = tmp_path / "nested" / "det.png"
    eer = plot_det(positives, negatives, path, title="toy")
    assert_png(path)
    assert eer == pytest.approx(brute_force_eer(positives, negatives), abs=2e-3)
    # Two unit Gaussians 2 apart cross at 1: EER = P(N(0, 1) > 1).
    assert eer == pytest.approx(0.1587, abs=0.02)


@pytest.mark.parametrize(
    "positives, negatives, expected",
    [
        ([2.0, 3.0], [0.0, 1.0], 0.0),  # separated
        ([0.0, 1.0], [2.0, 3.0], 1.0),  # reversed
        ([0.9, 0.8, 0.3], [0.1, 0.2, 0.85], 1 / 3),
        ([1.0, 1.0], [1.0, 1.0], 0.5),  # all tied
    ],
)
def test_det_eer_of_small_cases(tmp_path, positives, negatives, expected):
    eer = plot_det(positives, negatives, tmp_path / "det.png")
    assert eer == pytest.approx(expected)


def test_det_of_many_trials_is_thinned_and_fast(tmp_path):
    rng = np.random.default_rng(1)
    eer = plot_det(
        rng.normal(1.0, 1.0, 100_000),
        rng.normal(0.0, 1.0, 400_000),
        tmp_path / "det.png",
    )
    assert_png(tmp_path / "det.png")
    assert eer == pytest.approx(0.3085, abs=0.01)


@pytest.mark.parametrize(
    "positives, negatives, match",
    [
        ([], [0.1], "positive_scores is empty"),
        ([0.1], [], "negative_scores is empty"),
        ([0.1, np.nan], [0.2], "positive_scores holds NaN"),
        ([0.1], [np.inf], "negative_scores holds NaN or infinite"),
    ],
)
def test_det_rejects_bad_scores(tmp_path, positives, negatives, match):
    with pytest.raises(ValueError, match=match):
        plot_det(positives, negatives, tmp_path / "det.png")


def test_prompt_usage_heat_map(tmp_path):
    usage = torch.randint(0, 10, (12, 20))
    plot_prompt_usage(usage, tmp_path / "usage.png", title="usage")
    assert_png(tmp_path / "usage.png")


@pytest.mark.parametrize(
    "usage, match",
    [
        (np.ones(5), "shape"),
        (np.ones((0, 3)), "shape"),
        (np.array([[1.0, -1.0]]), ">= 0"),
        (np.array([[1.0, np.nan]]), "finite"),
    ],
)
def test_prompt_usage_rejects_bad_arrays(tmp_path, usage, match):
    with pytest.raises(ValueError, match=match):
        plot_prompt_usage(usage, tmp_path / "usage.png")


def test_eer_bars(tmp_path):
    results = {"frozen": [9.1, 9.5, 9.0], "prompts": [7.2, 7.0], "one": [8]}
    plot_eer_by_mode(results, tmp_path / "eer.png")
    assert_png(tmp_path / "eer.png")


@pytest.mark.parametrize(
    "results, match",
    [
        ({}, "no mode"),
        ({"frozen": []}, "'frozen' needs at least one"),
        ({"frozen": [1.0, float("nan")]}, "'frozen'"),
    ],
)
def test_eer_bars_reject_bad_results(tmp_path, results, match):
    with pytest.raises(ValueError, match=match):
        plot_eer_by_mode(results, tmp_path / "eer.png")
