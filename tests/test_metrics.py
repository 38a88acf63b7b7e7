"""Tests for malaria_cells.metrics: hand-computed cases first, then sklearn cross-checks and the bootstrap."""

from __future__ import annotations

import math

import numpy as np
import pytest
from sklearn.metrics import (
    average_precision_score,
    brier_score_loss,
    f1_score,
    matthews_corrcoef,
    roc_auc_score,
)

from malaria_cells.metrics import (
    COUNT_NAMES,
    METRIC_NAMES,
    binary_metrics,
    bootstrap_ci,
    bootstrap_samples,
    choose_threshold,
    confusion,
    paired_difference_ci,
    per_patient_table,
    reliability_curve,
    sensitivity_at_specificity,
    specificity_at_sensitivity,
)

NAN = float("nan")

# The 10-cell reference case: 6 Parasitized, 4 Uninfected, threshold 0.5.
#   Parasitized probs 0.9 0.8 0.7 0.6 | 0.4 0.3  -> 4 TP, 2 FN
#   Uninfected probs  0.55            | 0.2 0.1 0.05 -> 1 FP, 3 TN
TEN_Y = [1, 1, 1, 1, 1, 1, 0, 0, 0, 0]
TEN_P = [0.9, 0.8, 0.7, 0.6, 0.4, 0.3, 0.55, 0.2, 0.1, 0.05]


def _check(result: dict[str, float], expected: dict[str, float]) -> None:
    """Assert every expected metric, treating NaN == NaN."""
    for name, value in expected.items():
        if isinstance(value, float) and math.isnan(value):
            assert math.isnan(result[name]), f"{name}: expected NaN, got {result[name]}"
        else:
            assert result[name] == pytest.approx(value, abs=1e-12), name


# (id, y_true, prob, threshold, expected metrics)
METRIC_CASES = [
    (
        "ten_cells",
        TEN_Y,
        TEN_P,
        0.5,
        {
            "accuracy": 7 / 10,  # (TP 4 + TN 3) / 10
            "sensitivity": 4 / 6,  # TP / (TP + FN) = 4 / (4 + 2)
            "specificity": 3 / 4,  # TN / (TN + FP) = 3 / (3 + 1)
            "ppv": 4 / 5,  # TP / (TP + FP) = 4 / (4 + 1)
            "npv": 3 / 5,  # TN / (TN + FN) = 3 / (3 + 2)
            "f1": 8 / 11,  # 2TP / (2TP + FP + FN) = 8 / (8 + 1 + 2)
            # (TP*TN - FP*FN) / sqrt((TP+FP)(TP+FN)(TN+FP)(TN+FN)) = (12 - 2) / sqrt(5*6*4*5) = 10 / sqrt(600)
            "mcc": 10 / math.sqrt(600),
            # Uninfected below each Parasitized score: 4,4,4,4 (0.9..0.6), 3,3 (0.4, 0.3 beat all but 0.55)
            # -> 22 of 6*4 = 24 pairs
            "roc_auc": 22 / 24,
            # Ranked descending: P P P P N P P N N N; precision at each Parasitized hit: 1,1,1,1,5/6,6/7;
            # AP = (1/6)(4 + 5/6 + 6/7) = (1/6)(239/42) = 239/252
            "pr_auc": 239 / 252,
            # Parasitized (1-p)^2: .01+.04+.09+.16+.36+.49 = 1.15; Uninfected p^2: .3025+.04+.01+.0025 = .355;
            # (1.15 + .355) / 10
            "brier": 0.1505,
            # floor(15p) puts every cell in its own bin, so ECE = mean |y - p|
            # = (.1+.2+.3+.4+.6+.7 + .55+.2+.1+.05) / 10 = 3.2 / 10
            "ece": 0.32,
            "n": 10,
            "n_pos": 6,
            "n_neg": 4,
        },
    ),
    (
        "auc_with_tie",
        [0, 0, 1, 1],
        [0.1, 0.4, 0.4, 0.8],
        0.5,
        {
            # Pairs (Parasitized, Uninfected): (0.4,0.1)=1, (0.4,0.4)=tie=1/2, (0.8,0.1)=1, (0.8,0.4)=1 -> 3.5/4
            "roc_auc": 3.5 / 4,
            # Descending thresholds: 0.8 -> TP1 FP0 (prec 1, recall 1/2); 0.4 -> TP2 FP1 (prec 2/3, recall 1)
            # AP = 1/2 * 1 + 1/2 * 2/3 = 5/6
            "pr_auc": 5 / 6,
            # Only 0.8 >= 0.5: TP1 FN1 TN2 FP0
            "sensitivity": 1 / 2,
            "specificity": 1.0,
            "accuracy": 3 / 4,
        },
    ),
    (
        "perfect",
        [0, 0, 1, 1],
        [0.1, 0.2, 0.8, 0.9],
        0.5,
        {
            "accuracy": 1.0,
            "sensitivity": 1.0,
            "specificity": 1.0,
            "ppv": 1.0,
            "npv": 1.0,
            "f1": 1.0,
            "mcc": 1.0,
            "roc_auc": 1.0,
            "pr_auc": 1.0,
            "brier": (0.01 + 0.04 + 0.04 + 0.01) / 4,  # p^2 for Uninfected, (1-p)^2 for Parasitized
        },
    ),
    (
        "inverted",
        [0, 0, 1, 1],
        [0.9, 0.8, 0.2, 0.1],
        0.5,
        {
            "accuracy": 0.0,
            "sensitivity": 0.0,
            "specificity": 0.0,
            "ppv": 0.0,  # TP 0 / (TP 0 + FP 2)
            "npv": 0.0,
            "f1": 0.0,
            "mcc": -1.0,  # (0*0 - 2*2) / sqrt(2*2*2*2)
            "roc_auc": 0.0,
            # Descending: N N P P; precision at the two hits: 1/3, 2/4 -> AP = (1/2)(1/3 + 1/2) = 5/12
            "pr_auc": 5 / 12,
            "brier": (0.81 + 0.64 + 0.64 + 0.81) / 4,
        },
    ),
    (
        "only_uninfected",
        [0, 0, 0],
        [0.2, 0.6, 0.1],
        0.5,
        {
            "sensitivity": NAN,  # no Parasitized cells
            "specificity": 2 / 3,  # TN 2 / (TN 2 + FP 1)
            "ppv": 0.0,  # TP 0 / flagged 1
            "npv": 1.0,
            "f1": 0.0,  # 0 / (0 + FP 1 + 0)
            "mcc": 0.0,  # TP+FN = 0 -> zero denominator -> 0 by convention
            "roc_auc": NAN,
            "pr_auc": NAN,
            "n_pos": 0,
            "n_neg": 3,
        },
    ),
    (
        "only_parasitized",
        [1, 1],
        [0.7, 0.3],
        0.5,
        {
            "sensitivity": 1 / 2,
            "specificity": NAN,  # no Uninfected cells
            "npv": 0.0,  # TN 0 / predicted-negative 1
            "mcc": 0.0,
            "roc_auc": NAN,
            "pr_auc": 1.0,  # every flagged cell is Parasitized at every threshold
        },
    ),
    (
        "only_uninfected_none_flagged",
        [0, 0],
        [0.1, 0.2],
        0.5,
        {
            "ppv": NAN,  # nothing predicted Parasitized
            "f1": NAN,  # 2TP + FP + FN = 0
            "accuracy": 1.0,
            "mcc": 0.0,
        },
    ),
    (
        "all_predicted_uninfected",
        [0, 1, 0, 1],
        [0.1, 0.2, 0.3, 0.4],
        0.5,
        {
            "ppv": NAN,
            "sensitivity": 0.0,
            "mcc": 0.0,  # TP+FP = 0 -> zero denominator -> 0 (sklearn convention)
            "roc_auc": 3 / 4,  # pairs: (0.2 > 0.1), (0.4 > 0.1), (0.4 > 0.3) win; (0.2 < 0.3) loses
        },
    ),
    (
        "brier_ece_shared_bins",
        [0, 1, 1, 1],
        [0.1, 0.1, 0.9, 0.9],
        0.5,
        {
            # (0.1^2 + 0.9^2 + 0.1^2 + 0.1^2) / 4 = 0.84 / 4
            "brier": 0.21,
            # bin [1/15, 2/15): 2 cells, observed 1/2 vs mean prob 0.1 -> gap 0.4
            # bin [13/15, 14/15): 2 cells, observed 1 vs mean prob 0.9 -> gap 0.1
            # ECE = 2/4 * 0.4 + 2/4 * 0.1
            "ece": 0.25,
        },
    ),
    (
        "threshold_is_inclusive",
        [0, 1],
        [0.3, 0.7],
        0.7,
        {"sensitivity": 1.0, "specificity": 1.0},  # prob >= threshold counts as Parasitized
    ),
]


@pytest.mark.parametrize(
    ("y", "prob", "threshold", "expected"), [c[1:] for c in METRIC_CASES], ids=[c[0] for c in METRIC_CASES]
)
def test_binary_metrics_hand_cases(y: list[int], prob: list[float], threshold: float, expected: dict) -> None:
    _check(binary_metrics(y, prob, threshold), expected)


def test_binary_metrics_keys_and_types() -> None:
    result = binary_metrics(TEN_Y, TEN_P, 0.5)
    assert set(result) == set(METRIC_NAMES) | set(COUNT_NAMES)
    assert all(isinstance(result[name], float) for name in METRIC_NAMES)
    assert all(isinstance(result[name], int) for name in COUNT_NAMES)


def test_confusion_ten_cells() -> None:
    pred = [int(p >= 0.5) for p in TEN_P]
    assert confusion(TEN_Y, pred) == {"tp": 4, "fp": 1, "tn": 3, "fn": 2}


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_binary_metrics_match_sklearn(seed: int) -> None:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, 400)
    # Rounded probabilities create many ties, the hard case for AUC and AP.
    prob = np.round(np.clip(0.3 * y + 0.7 * rng.random(400), 0, 1), 2)
    result = binary_metrics(y, prob, 0.45)
    pred = prob >= 0.45
    assert result["roc_auc"] == pytest.approx(roc_auc_score(y, prob))
    assert result["pr_auc"] == pytest.approx(average_precision_score(y, prob))
    assert result["mcc"] == pytest.approx(matthews_corrcoef(y, pred))
    assert result["f1"] == pytest.approx(f1_score(y, pred))
    assert result["brier"] == pytest.approx(brier_score_loss(y, prob))


def test_ece_agrees_with_reliability_bins() -> None:
    rng = np.random.default_rng(3)
    y = rng.integers(0, 2, 300)
    prob = rng.random(300)
    _, observed, counts = reliability_curve(y, prob)
    idx = np.minimum((prob * 15).astype(int), 14)
    mean_prob = np.array([prob[idx == b].mean() if counts[b] else 0.0 for b in range(15)])
    filled = counts > 0
    expected = np.sum(counts[filled] / 300 * np.abs(observed[filled] - mean_prob[filled]))
    assert binary_metrics(y, prob, 0.5)["ece"] == pytest.approx(expected)


def test_reliability_curve_bins() -> None:
    centers, observed, counts = reliability_curve([0, 1, 1, 0], [0.0, 1.0, 0.99, 0.5])
    assert centers == pytest.approx((np.arange(15) + 0.5) / 15)
    assert counts.tolist() == [1, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 2]  # 0.5 * 15 = 7.5 -> bin 7
    assert observed[0] == 0.0 and observed[7] == 0.0 and observed[14] == 1.0
    assert np.isnan(observed[1])  # empty bin


@pytest.mark.parametrize(
    ("y", "prob", "bad"),
    [
        ([0, 1], [0.5], "length"),
        ([0, 2], [0.5, 0.5], "labels"),
        ([0, 1], [0.5, 1.5], "prob"),
        ([0, 1], [0.5, NAN], "nan"),
    ],
)
def test_invalid_input_raises(y: list, prob: list, bad: str) -> None:
    with pytest.raises(ValueError):
        binary_metrics(y, prob, 0.5)


# (id, y_true, prob, method, expected threshold)
THRESHOLD_CASES = [
    # Separable with the gap (0.2, 0.8) containing 0.5: 0.5 is optimal, so it is kept.
    ("keeps_0.5", [0, 0, 1, 1], [0.1, 0.2, 0.8, 0.9], "youden", 0.5),
    # Only t in (0.6, 0.7] separates (J = 1; t = 0.5 gives J = 1 + 1/2 - 1): midpoint 0.65.
    ("gap_midpoint", [0, 0, 1, 1], [0.1, 0.6, 0.7, 0.9], "youden", 0.65),
    # Uninfected 0.1 0.2 0.3 0.4 0.7 0.75, Parasitized 0.6 0.8.
    # Youden: t in (0.4, 0.6] -> 1 + 4/6 - 1 = 0.667 beats t in (0.75, 0.8] -> 1/2 + 1 - 1 = 0.5; contains 0.5.
    ("youden_imbalanced", [0, 0, 0, 0, 0, 0, 1, 1], [0.1, 0.2, 0.3, 0.4, 0.7, 0.75, 0.6, 0.8], "youden", 0.5),
    # Accuracy: t in (0.75, 0.8] -> (1 + 6)/8 beats t = 0.5 -> (2 + 4)/8: midpoint 0.775.
    ("accuracy_imbalanced", [0, 0, 0, 0, 0, 0, 1, 1], [0.1, 0.2, 0.3, 0.4, 0.7, 0.75, 0.6, 0.8], "accuracy", 0.775),
    # y 0 1 0 1 at 0.1 0.3 0.8 0.9: J = 0.5 both for (0.1, 0.3] (midpoint 0.2) and (0.8, 0.9] (midpoint 0.85);
    # 0.2 is 0.30 from 0.5, 0.85 is 0.35 away -> 0.2.
    ("tie_closest_to_half", [0, 1, 0, 1], [0.1, 0.3, 0.8, 0.9], "youden", 0.2),
    # The one Parasitized cell (0.7) ranks below two Uninfected ones. Accuracy flagging >= 0.5: 1/4, >= 0.65: 2/4,
    # >= 0.75: 1/4, >= 0.85: 2/4, nothing: 3/4 -> best is above every score, midpoint (0.9 + 1) / 2.
    ("accuracy_flag_nothing", [0, 1, 0, 0], [0.6, 0.7, 0.8, 0.9], "accuracy", 0.95),
]


@pytest.mark.parametrize(
    ("y", "prob", "method", "expected"), [c[1:] for c in THRESHOLD_CASES], ids=[c[0] for c in THRESHOLD_CASES]
)
def test_choose_threshold(y: list[int], prob: list[float], method: str, expected: float) -> None:
    assert choose_threshold(y, prob, method=method) == pytest.approx(expected)


def test_choose_threshold_uses_inclusive_rule() -> None:
    # The returned t must reproduce the optimum under the `prob >= t` rule used by binary_metrics.
    y, prob = [0, 0, 1, 1], [0.1, 0.6, 0.7, 0.9]
    t = choose_threshold(y, prob)
    result = binary_metrics(y, prob, t)
    assert result["sensitivity"] == 1.0 and result["specificity"] == 1.0


def test_choose_threshold_above_one_when_flagging_nothing_with_prob_one() -> None:
    t = choose_threshold([0, 0, 0, 1], [1.0, 1.0, 1.0, 0.2], method="accuracy")
    assert t > 1.0
    assert binary_metrics([0, 0, 0, 1], [1.0, 1.0, 1.0, 0.2], t)["accuracy"] == 3 / 4


def test_choose_threshold_errors() -> None:
    with pytest.raises(ValueError):
        choose_threshold([0, 0], [0.1, 0.2], method="youden")  # J undefined with one class
    with pytest.raises(ValueError):
        choose_threshold([0, 1], [0.1, 0.2], method="f1")
    assert choose_threshold([0, 0], [0.1, 0.7], method="accuracy") == pytest.approx(0.85)


def _patients(seed: int = 0, n_patients: int = 12) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Synthetic cells from patients of different sizes with a patient-level shift in scores."""
    rng = np.random.default_rng(seed)
    sizes = rng.integers(5, 40, n_patients)
    groups = np.repeat([f"C{i}" for i in range(n_patients)], sizes)
    shift = np.repeat(rng.normal(0, 0.15, n_patients), sizes)
    y = rng.integers(0, 2, groups.size)
    prob = np.clip(0.25 + 0.5 * y + shift + rng.normal(0, 0.15, groups.size), 0, 1)
    return y, prob, groups


def test_bootstrap_ci_contains_point_estimate() -> None:
    y, prob, groups = _patients()
    ci = bootstrap_ci(y, prob, groups, 0.5, n_boot=300, seed=0)
    point = binary_metrics(y, prob, 0.5)
    for name in METRIC_NAMES:
        assert ci[name]["value"] == point[name]
        assert ci[name]["low"] <= point[name] <= ci[name]["high"], name
        assert ci[name]["low"] < ci[name]["high"], name
    for name in COUNT_NAMES:
        assert ci[name] == {"value": point[name]}


def test_bootstrap_resamples_whole_patients() -> None:
    # 5 patients x 4 cells; patients A, B, C are all correct, D and E all wrong. If whole patients are drawn,
    # every resample has 20 cells and accuracy = (correct patients drawn) / 5, a multiple of 4/20 = 0.2.
    # Resampling single cells would give multiples of 1/20 instead.
    groups = np.repeat(["A", "B", "C", "D", "E"], 4)
    y = np.array([1, 0, 1, 0] * 5)
    prob = np.where(np.isin(groups, ["A", "B", "C"]), y * 0.8 + 0.1, 0.9 - y * 0.8)
    samples = bootstrap_samples(y, prob, groups, 0.5, n_boot=500, seed=1)
    assert np.all(samples["n"] == 20)
    fifths = samples["accuracy"] * 5
    assert np.allclose(fifths, np.round(fifths))
    assert len(np.unique(np.round(fifths))) > 3  # resamples really vary


def test_bootstrap_unequal_patients_keep_their_cells() -> None:
    # Patient sizes 1, 10, 100: every resample size is a sum of 3 draws of those sizes.
    groups = np.repeat(["P1", "P2", "P3"], [1, 10, 100])
    y = np.arange(111) % 2
    samples = bootstrap_samples(y, np.full(111, 0.5), groups, 0.5, n_boot=200, seed=0)
    possible = {a + b + c for a in (1, 10, 100) for b in (1, 10, 100) for c in (1, 10, 100)}
    assert set(samples["n"].astype(int)) <= possible


def test_bootstrap_matches_explicit_resampling() -> None:
    # Reference implementation: concatenate the drawn patients' cells and call binary_metrics. Draws follow the
    # documented scheme (rng.integers over patients in order of first appearance).
    y, prob, groups = _patients(seed=4, n_patients=6)
    samples = bootstrap_samples(y, prob, groups, 0.4, n_boot=25, seed=7)
    ids = list(dict.fromkeys(groups.tolist()))
    draws = np.random.default_rng(7).integers(0, len(ids), size=(25, len(ids)))
    for r, row in enumerate(draws):
        idx = np.concatenate([np.flatnonzero(groups == ids[g]) for g in row])
        expected = binary_metrics(y[idx], prob[idx], 0.4)
        for name in (*METRIC_NAMES, *COUNT_NAMES):
            assert samples[name][r] == pytest.approx(expected[name], nan_ok=True), (r, name)


def test_paired_difference_hand_case() -> None:
    # Patient P1: A right on both cells, B wrong on both; patient P2: both right. Accuracy A 1.0, B 0.5.
    # Resamples draw (P1, P1) -> difference 1, (P2, P2) -> 0, or one of each -> A 1.0 vs B 0.5 = 0.5.
    y = np.array([1, 0, 1, 0])
    prob_a = np.array([0.9, 0.1, 0.8, 0.2])
    prob_b = np.array([0.1, 0.9, 0.8, 0.2])
    groups = ["P1", "P1", "P2", "P2"]
    diff = paired_difference_ci(y, prob_a, prob_b, groups, n_boot=400, seed=0)
    assert diff["accuracy"]["value"] == pytest.approx(0.5)
    assert diff["accuracy"]["low"] == pytest.approx(0.0) and diff["accuracy"]["high"] == pytest.approx(1.0)
    same = paired_difference_ci(y, prob_a, prob_a, groups, n_boot=50)
    assert all(same[m]["value"] == 0 and same[m]["low"] == 0 == same[m]["high"] for m in ("accuracy", "mcc"))


def test_paired_difference_matches_explicit_resampling_and_is_narrower() -> None:
    # B is A with one extra error per patient: the patients differ a lot, the models by a steady margin. Paired
    # resampling sees the margin in every replicate; the separate intervals overlap.
    y, prob_a, groups = _patients(seed=3, n_patients=12)
    prob_b = prob_a.copy()
    for g in np.unique(groups):
        i = np.flatnonzero(groups == g)[0]
        prob_b[i] = 1.0 - float(y[i])  # certainly wrong
        prob_a[i] = float(y[i])  # certainly right
    diff = paired_difference_ci(y, prob_a, prob_b, groups, n_boot=300, seed=2)
    ids = list(dict.fromkeys(groups.tolist()))
    draws = np.random.default_rng(2).integers(0, len(ids), size=(300, len(ids)))
    explicit = []
    for row in draws:
        idx = np.concatenate([np.flatnonzero(groups == ids[g]) for g in row])
        explicit.append(
            binary_metrics(y[idx], prob_a[idx])["accuracy"] - binary_metrics(y[idx], prob_b[idx])["accuracy"]
        )
    assert diff["accuracy"]["low"] == pytest.approx(np.percentile(explicit, 2.5))
    assert diff["accuracy"]["high"] == pytest.approx(np.percentile(explicit, 97.5))
    assert diff["accuracy"]["low"] > 0  # the steady margin is detected ...
    a, b = bootstrap_ci(y, prob_a, groups, n_boot=300, seed=2), bootstrap_ci(y, prob_b, groups, n_boot=300, seed=2)
    assert a["accuracy"]["low"] < b["accuracy"]["high"]  # ... although the separate intervals overlap


def test_bootstrap_deterministic_by_seed() -> None:
    y, prob, groups = _patients()
    first = bootstrap_ci(y, prob, groups, 0.5, n_boot=200, seed=5)
    assert bootstrap_ci(y, prob, groups, 0.5, n_boot=200, seed=5) == first
    assert bootstrap_ci(y, prob, groups, 0.5, n_boot=200, seed=6) != first


def test_bootstrap_single_patient_collapses_to_point() -> None:
    y, prob, _ = _patients()
    ci = bootstrap_ci(y, prob, ["only"] * len(y), 0.5, n_boot=50)
    for name in METRIC_NAMES:
        assert ci[name]["low"] == pytest.approx(ci[name]["value"]) == pytest.approx(ci[name]["high"])


def test_bootstrap_undefined_metrics_are_nan_not_errors() -> None:
    y = np.zeros(12, dtype=int)
    prob = np.linspace(0.05, 0.6, 12)
    ci = bootstrap_ci(y, prob, np.repeat(["a", "b", "c"], 4), 0.5, n_boot=50)
    assert math.isnan(ci["sensitivity"]["low"]) and math.isnan(ci["roc_auc"]["high"])
    assert not math.isnan(ci["specificity"]["low"])


def test_bootstrap_ignores_nan_resamples() -> None:
    # Patient "pos" holds the only Parasitized cells; resamples that miss it have NaN sensitivity and must be
    # skipped rather than poison the percentile.
    groups = np.repeat(["pos", "n1", "n2", "n3"], 3)
    y = np.array([1, 1, 1] + [0] * 9)
    prob = np.array([0.9, 0.8, 0.3] + [0.2] * 9)
    samples = bootstrap_samples(y, prob, groups, 0.5, n_boot=200, seed=0)
    assert np.isnan(samples["sensitivity"]).any()
    ci = bootstrap_ci(y, prob, groups, 0.5, n_boot=200, seed=0)
    assert ci["sensitivity"]["low"] == pytest.approx(2 / 3) and ci["sensitivity"]["high"] == pytest.approx(2 / 3)


def test_per_patient_table() -> None:
    groups = ["C10", "C2", "C2", "C10", "C1", "C2"]
    y = [1, 0, 1, 1, 0, 0]
    prob = [0.9, 0.6, 0.4, 0.7, 0.1, 0.2]
    rows = per_patient_table(y, prob, groups, 0.5)
    assert [row["patient"] for row in rows] == ["C1", "C2", "C10"]  # natural order
    c2 = rows[1]
    # C2 cells: (y0, p.6 -> flagged, wrong), (y1, p.4 -> missed, wrong), (y0, p.2 -> correct)
    assert c2["cells"] == 3
    assert c2["true_infected_frac"] == pytest.approx(1 / 3)
    assert c2["pred_infected_frac"] == pytest.approx(1 / 3)
    assert c2["mean_prob"] == pytest.approx((0.6 + 0.4 + 0.2) / 3)
    assert c2["errors"] == 2
    assert rows[2] == {
        "patient": "C10",
        "cells": 2,
        "true_infected_frac": 1.0,
        "pred_infected_frac": 1.0,
        "mean_prob": pytest.approx(0.8),
        "errors": 0,
    }


def test_metrics_module_does_not_import_torch() -> None:
    import ast
    from pathlib import Path

    import malaria_cells.metrics as module

    tree = ast.parse(Path(module.__file__).read_text())
    imported = {
        alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names
    }
    imported |= {
        node.module.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module
    }
    assert "torch" not in imported


def test_clustered_proportion_single_field_is_the_exact_binomial_interval():
    from malaria_cells.metrics import clustered_proportion

    p = clustered_proportion([5], [100])
    # Clopper-Pearson for 5/100 (tabulated: 0.01643, 0.11283); one field has no between-field variation.
    assert (p.count, p.total, p.clusters) == (5, 100, 1)
    assert p.estimate == 0.05 and p.design_effect == 1.0
    assert abs(p.low - 0.016432) < 1e-5 and abs(p.high - 0.112835) < 1e-5


def test_clustered_proportion_widens_with_between_field_variation():
    from malaria_cells.metrics import clustered_proportion

    even = clustered_proportion([1, 1, 1, 1], [100, 100, 100, 100])
    clumped = clustered_proportion([4, 0, 0, 0], [100, 100, 100, 100])
    assert even.estimate == clumped.estimate == 0.01
    assert even.design_effect == 1.0  # fields vary less than binomial: never narrower than binomial
    # By hand: p = 0.01; cluster variance 4/3 * ((4-1)^2 + 3 * 1^2) / 400^2 = 1e-4; binomial 0.01*0.99/400.
    assert abs(clumped.design_effect - 1e-4 / (0.01 * 0.99 / 400)) < 1e-9
    assert clumped.high - clumped.low > 2 * (even.high - even.low)


def test_clustered_proportion_at_zero_and_empty():
    from malaria_cells.metrics import clustered_proportion

    z = clustered_proportion([0, 0], [100, 100])
    assert z.estimate == 0 and z.low == 0
    assert abs(z.high - (1 - 0.025 ** (1 / 200))) < 1e-9  # exact upper bound at 0 of 200
    e = clustered_proportion([], [])
    assert e.total == 0 and np.isnan(e.estimate)
    with pytest.raises(ValueError):
        clustered_proportion([3], [2])


def test_predictive_values_at_stated_prevalence_by_hand():
    from malaria_cells.metrics import predictive_values

    # 1,000 cells at 1 %: 10 infected (9 found at sensitivity 0.9), 990 uninfected (9.9 false alarms at 0.99)
    v = predictive_values(0.9, 0.99, 0.01)
    assert abs(v["ppv"] - 9 / (9 + 9.9)) < 1e-12
    assert abs(v["npv"] - 980.1 / (980.1 + 1)) < 1e-12
    assert predictive_values(0.9, 0.99, 0.5)["ppv"] > 0.98
    assert np.isnan(predictive_values(0.0, 1.0, 0.01)["ppv"])  # nothing called: undefined


def test_roc_read_offs_by_hand() -> None:
    # positives 0.9 0.8 0.6 0.3; negatives 0.1 0.2 0.4 0.7 0.85
    y = [1, 1, 1, 1, 0, 0, 0, 0, 0]
    p = [0.9, 0.8, 0.6, 0.3, 0.1, 0.2, 0.4, 0.7, 0.85]
    assert specificity_at_sensitivity(y, p, 1.0) == 0.4  # t = 0.3: 0.1, 0.2 below
    assert specificity_at_sensitivity(y, p, 0.75) == 0.6  # t = 0.6
    assert specificity_at_sensitivity(y, p, 0.5) == 0.8  # t = 0.8
    assert sensitivity_at_specificity(y, p, 1.0) == 0.25  # above 0.85: only 0.9
    assert sensitivity_at_specificity(y, p, 0.8) == 0.5  # above 0.7
    assert sensitivity_at_specificity(y, p, 0.6) == 0.75  # above 0.4
    assert sensitivity_at_specificity(y, p, 0.1) == 1.0  # above 0.1
    with pytest.raises(ValueError):
        specificity_at_sensitivity([1, 1], [0.2, 0.3], 0.9)
    for bad in (0.0, 1.1, -0.5):
        with pytest.raises(ValueError, match="must be in"):
            specificity_at_sensitivity(y, p, bad)
        with pytest.raises(ValueError, match="must be in"):
            sensitivity_at_specificity(y, p, bad)
    # ties: a negative scored like the threshold positive is called Parasitized (p >= t), so it costs specificity
    yt = [1, 1, 0, 0, 0, 0]
    pt = [0.9, 0.5, 0.5, 0.5, 0.2, 0.1]
    assert specificity_at_sensitivity(yt, pt, 1.0) == 0.5  # t = 0.5: the two 0.5 negatives are above
    assert sensitivity_at_specificity(yt, pt, 0.75) == 0.5  # 3 of 4 below: t just above 0.5 keeps only 0.9
    assert sensitivity_at_specificity(yt, pt, 0.5) == 1.0  # 2 of 4 below: t just above 0.2


def test_thresholds_for_a_rate_land_on_exact_counts() -> None:
    from malaria_cells.metrics import threshold_for_sensitivity, threshold_for_specificity

    pos = np.arange(50) / 50.0
    # sensitivity 0.9 of 50 = 45 kept: the 6th lowest (in floats, (1 - 0.9) * 50 is 4.999..., not 5)
    t = threshold_for_sensitivity(pos, 0.9)
    assert t == pos[5] and (pos >= t).sum() == 45
    neg = np.arange(10) / 10.0
    t = threshold_for_specificity(neg, 0.9)  # 9 of 10 below: just above the 9th lowest
    assert (neg < t).sum() == 9 and t > neg[8] and t <= neg[9]
    assert threshold_for_specificity(np.array([0.2, 1.0]), 1.0) > 1.0  # a negative at 1.0 stays below it
    with pytest.raises(ValueError, match="must be in"):
        threshold_for_sensitivity(pos, 0.0)
