"""The emfet comparison benchmark's pipeline pieces: label mapping, patient-grouped fit, feature cache (seconds)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("emfet", reason="emfet (the peer package the benchmark compares with) is not installed")

from malaria_cells import metrics as M  # noqa: E402
from malaria_cells.data import scan  # noqa: E402

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "emfet_compare.py"


@pytest.fixture(scope="module")
def bench():
    # The script imports its sibling benchinfo.py, as it does when run as `python benchmarks/emfet_compare.py`.
    sys.path.insert(0, str(SCRIPT.parent))
    spec = importlib.util.spec_from_file_location("emfet_compare", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_labels_follow_emfet_convention(bench):
    # emfet counts Parasitized as 0; ours is 1. A mix-up would silently turn AUC a into 1 - a.
    assert bench.to_emfet_labels(np.array([1, 0, 1])).tolist() == [0, 1, 0]


def test_fit_is_patient_grouped_and_scores_parasitized(bench):
    rng = np.random.default_rng(0)
    n = 120
    y = np.tile([0, 1], n // 2)  # ours: Parasitized = 1
    groups = np.repeat([f"C{i}" for i in range(12)], n // 12)
    X = rng.normal(size=(n, 5))
    X[:, 0] += 3 * y  # "number of spots" higher in parasitized cells
    pipeline, info = bench.fit_emfet(
        X, y, groups, model="RandomForest", n_inner_splits=3, n_bayes_iter=2, n_points=2, random_state=42,
        scoring="accuracy", n_jobs=1, seed=0,
    )  # fmt: skip
    prob = bench.emfet_prob_parasitized(pipeline, X)
    assert M.binary_metrics(y, prob)["roc_auc"] > 0.95  # P(Parasitized), oriented as our metrics expect
    assert set(info["best_params"]) == {
        "classifier__n_estimators",
        "classifier__max_depth",
        "classifier__min_samples_split",
    }
    assert "StratifiedGroupKFold(n_splits=3" in info["inner_cv"]
    assert info["classifier_random_state"] == 0


def test_recommended_pipeline_is_emfets_shipped_model(bench):
    rec = bench.emfet_recommended()
    assert rec["model"] in bench.MODEL_SPECS
    assert (rec["n_inner_splits"], rec["n_bayes_iter"], rec["scoring"]) == (3, 15, "accuracy")


def test_features_match_emfet_and_are_cached(bench, share, tmp_path):
    from emfet.features import extract_features

    images = scan(share).images[::1000][:20]  # both classes, many patients
    feats, errors, info = bench.extract_emfet_features(images, root=str(share), cache_dir=tmp_path, n_workers=1)
    assert not errors and info["computed"] == len(images)
    np.testing.assert_array_equal(feats[0], extract_features(images[0].path))  # emfet's own path-based extractor
    again, _, info2 = bench.extract_emfet_features(images, root=str(share), cache_dir=tmp_path, n_workers=1)
    assert info2["reused"] == len(images)
    np.testing.assert_array_equal(again, feats)
