"""Patient-level cross-validation: folds that partition the patients, pooled out-of-fold metrics, paired differences,
fold-by-fold reuse, and the final fit on every patient that takes its threshold from the CV."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from malaria_cells import cv as CV
from malaria_cells.config import TrainConfig
from malaria_cells.data import CellImage
from malaria_cells.errors import ConfigError
from malaria_cells.run import Run
from malaria_cells.split import cv_folds, make_cv_split

TINY = dict(max_images=150, input_size=32, epochs=2, threads=1, batch_size=16)


def _images(n_patients: int = 23) -> list[CellImage]:
    rng = np.random.default_rng(0)
    images = []
    for p in range(n_patients):
        infected = p % 3 != 0
        for i in range(int(rng.integers(5, 40))):
            label = int(infected and i % 2 == 0)
            images.append(CellImage(path="", rel=f"P{p}/c{i}.png", label=label, patient=f"C{p}P{p}", size_bytes=0))
    return images


def test_folds_partition_patients_stratified_and_balanced() -> None:
    images = _images()
    fold_of = cv_folds(images, folds=5, seed=0)
    assert set(fold_of) == {im.patient for im in images}  # every patient in exactly one fold
    infected = {im.patient for im in images if im.label == 1}
    per_fold_infected = Counter(fold_of[p] for p in infected)
    assert set(per_fold_infected) == set(range(5))  # every fold holds infected patients
    cells = Counter(fold_of[im.patient] for im in images)
    biggest_patient = max(Counter(im.patient for im in images).values())
    assert max(cells.values()) - min(cells.values()) <= biggest_patient
    assert cv_folds(images, folds=5, seed=0) == fold_of and cv_folds(images, folds=5, seed=1) != fold_of

    tests: list[str] = []
    for f in range(5):
        split = make_cv_split(images, folds=5, fold=f, val_fraction=0.15, seed=0)
        test = {im.patient for im in images if split.assignment[im.rel] == "test"}
        val = {im.patient for im in images if split.assignment[im.rel] == "val"}
        assert test == {p for p, k in fold_of.items() if k == f} and val and not (val & test)
        tests += sorted(test)
    assert sorted(tests) == sorted(fold_of)  # the K test folds cover every patient once


def test_config_allows_a_final_fit_and_checks_the_fold() -> None:
    assert TrainConfig(test_fraction=0, val_fraction=0).test_fraction == 0
    with pytest.raises(ValueError, match="cv_fold 5 must be below cv_folds 5"):
        TrainConfig(cv_folds=5, cv_fold=5)
    with pytest.raises(ConfigError, match="unknown CV row"):
        CV.rows_by_key(["nope"])
    assert [r.key for r in CV.rows_by_key(["custom-cnn-48-tta"])] == ["custom-cnn-48", "custom-cnn-48-tta"]


def test_pooled_metrics_use_each_folds_threshold() -> None:
    # Fold 0 threshold 0.8, fold 1 threshold 0.2: p=0.5 is negative in fold 0, positive in fold 1.
    folds = [
        CV.FoldPredictions(0, 0, 0.8, ["a", "b"], ["P1", "P1"], np.array([0, 1]), np.array([0.5, 0.9])),
        CV.FoldPredictions(1, 0, 0.2, ["c", "d"], ["P2", "P2"], np.array([1, 0]), np.array([0.5, 0.1])),
    ]
    oof = CV.pool(folds)
    assert oof.keys == ["a", "b", "c", "d"]
    assert ((oof.decision_prob >= 0.5) == np.array([False, True, True, False])).all()
    m = CV.pooled_metrics(oof, n_boot=20, seed=0)
    # Thresholded at each fold's threshold: all right. AUC on the raw probabilities: the 0.5/0.5 pair ties (3.5/4).
    assert m["accuracy"]["value"] == 1.0 and m["roc_auc"]["value"] == 0.875
    with pytest.raises(ValueError, match="scored in two folds"):
        CV.pool(folds + folds[:1])


@pytest.mark.slow
def test_cross_validation_resumes_and_final_fit_takes_the_cv_threshold(tmp_path: Path, share: Path) -> None:
    rows_cv = CV.rows_by_key(["custom-cnn-48-tta", "custom-cnn-48-distilled"])
    assert [r.key for r in rows_cv] == [
        "custom-cnn-48",
        "custom-cnn-48-tta",
        "custom-cnn-64",
        "custom-cnn-48-distilled",
    ]
    out = CV.cross_validate(data_dir=share, out_dir=tmp_path / "cv", folds=3, rows=rows_cv, n_boot=50, overrides=TINY)
    by = {r["key"]: r for r in out["rows"]}
    base, tta = by["custom-cnn-48"], by["custom-cnn-48-tta"]
    assert base["n_cells"] == tta["n_cells"] == 150  # every subset cell scored once, out of fold
    assert len(base["per_fold"]) == 3 and sum(f["n_cells"] for f in base["per_fold"]) == 150
    for k in ("accuracy", "roc_auc"):
        assert base["pooled"][k]["low"] <= base["pooled"][k]["value"] <= base["pooled"][k]["high"]
    assert out["paired_differences"][0]["a"] == "custom-cnn-48-tta"
    oof = CV.read_oof(Path(base["oof"][0]))
    assert len(set(oof.keys)) == 150 and set(oof.fold.tolist()) == {0, 1, 2}
    assert "Pooled out-of-fold" in (tmp_path / "cv" / "cv.md").read_text() and (tmp_path / "cv" / "cv.png").exists()

    weights = tmp_path / "cv" / "custom-cnn-48" / "seed0" / "fold1" / "best.safetensors"
    stamp = weights.stat().st_mtime_ns
    again = CV.cross_validate(data_dir=share, out_dir=tmp_path / "cv", folds=3, rows=rows_cv, n_boot=50, overrides=TINY)
    assert weights.stat().st_mtime_ns == stamp  # finished folds reused, not retrained
    assert again["rows"][0]["pooled"]["accuracy"] == base["pooled"]["accuracy"]

    run_dir = CV.final_fit(
        cv_dir=tmp_path / "cv",
        data_dir=share,
        run_dir=tmp_path / "final",
        row_key="custom-cnn-48-tta",
        overrides={**TINY, "epochs": 1},
    )
    run = Run.open(run_dir)
    meta = run.meta.to_dict()
    assert meta["final_fit"] is True and meta["cv_estimate"]["note"].startswith("final fit: no test patients")
    assert meta["threshold"] == pytest.approx(base["operating_points"]["balanced"])
    assert meta["tta_threshold"] == pytest.approx(tta["operating_points"]["balanced"])
    assert set(run.split().assignment.values()) == {"train"}  # every patient trains
    assert json.loads((tmp_path / "cv" / "cv.json").read_text())["best"] in by

    # Each fold's student learnt from its own fold's teachers (the same training patients), never from others.
    student = Run.open(tmp_path / "cv" / "custom-cnn-48-distilled" / "seed0" / "fold2").config()
    assert student.distill_from == ",".join(
        str(tmp_path / "cv" / t / "seed0" / "fold2") for t in ("custom-cnn-48", "custom-cnn-64")
    )
    distilled = CV.final_fit(
        cv_dir=tmp_path / "cv",
        data_dir=share,
        run_dir=tmp_path / "final-distilled",
        row_key="custom-cnn-48-distilled",
        overrides={**TINY, "epochs": 1},
    )
    teachers = Run.open(distilled).config().distill_from.split(",")
    assert [Path(t).name for t in teachers] == [
        "final-distilled-teacher-custom-cnn-48",
        "final-distilled-teacher-custom-cnn-64",
    ]
    assert all(Run.open(t).meta.to_dict()["final_fit"] for t in teachers)

    # The audit ranks suspects from the OOF predictions and draws them; training can leave them out.
    from malaria_cells.audit import audit_labels

    res = audit_labels(oof_paths=[Path(p) for p in base["oof"]], data_dir=share, out_dir=tmp_path / "audit")
    rows = (tmp_path / "audit" / "suspects.csv").read_text().splitlines()
    assert len(rows) == res.n_suspects + 1 and 0 <= res.noise_rate < 1
    assert (tmp_path / "audit" / "suspects-labelled-parasitized.png").stat().st_size > 1000
    if res.n_suspects:
        cfg = CV.fold_config(rows_cv[0], folds=3, fold=0, seed=0, split_seed=0, overrides=TINY)
        cfg = cfg.replace(exclude_suspects=str(tmp_path / "audit" / "suspects.csv"), epochs=1)
        from malaria_cells.train import train

        excl = train(config=cfg, data_dir=share, run_dir=tmp_path / "excluded")
        counts = {r["split"]: r["images"] for r in Run.open(excl).meta.split_counts}
        assert counts["test"] == base["per_fold"][0]["n_cells"]  # val/test keep every cell


def test_confident_joint_by_hand() -> None:
    from malaria_cells.audit import confident_joint

    # t0 = mean P(Uninfected | labelled U) = (0.9 + 0.8 + 0.1) / 3 = 0.6; t1 = (0.8 + 0.9 + 0.1) / 3 = 0.6.
    cj = confident_joint(np.array([0, 0, 0, 1, 1, 1]), np.array([0.1, 0.2, 0.9, 0.8, 0.9, 0.1]))
    assert cj["t"] == pytest.approx([0.6, 0.6])
    assert cj["joint"] == [[2, 1], [1, 2]]
    assert cj["suspect"].tolist() == [False, False, True, False, False, True]
    assert cj["noise_rate"] == pytest.approx(2 / 6) and cj["noise_rate_by_label"] == pytest.approx([1 / 3, 1 / 3])
    # An uncertain cell (confident of neither class) is not counted: joint rows then rescale to the label counts.
    cj = confident_joint(np.array([0, 0, 1, 1]), np.array([0.1, 0.45, 0.9, 0.7]))
    assert cj["joint"] == [[1, 0], [0, 1]] and cj["noise_rate"] == 0.0


def test_dihedral_views_are_the_eight_symmetries() -> None:
    from malaria_cells.augment import dihedral_view
    from malaria_cells.predict import dihedral_views

    x = np.arange(2 * 3 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3, 3)
    v = dihedral_views(x)
    assert v.shape == (16, 3, 3, 3)
    # The project's one numbering of the views (augment.DIHEDRAL): view 1 is a quarter turn then a mirror.
    assert (v[:2] == x).all() and (v[2:4] == np.rot90(x, 1, axes=(1, 2))[:, :, ::-1]).all()
    assert all((v[2 * k : 2 * k + 2] == dihedral_view(x, k)).all() for k in range(8))
    assert len({v[i].tobytes() for i in range(0, 16, 2)}) == 8  # all 8 views differ for an asymmetric image


def test_tta_prediction_uses_the_models_tta_threshold(tmp_path: Path) -> None:
    from malaria_cells.errors import ModelError
    from malaria_cells.predict import Classifier

    class Asymmetric:
        """A backend whose output depends on orientation: P = mean of the top-left pixel's red channel / 255."""

        name = "test"
        prep = None
        meta = {"threshold": 0.5, "class_names": ["Uninfected", "Parasitized"], "tta_threshold": 0.3}

        def __call__(self, batch: np.ndarray) -> np.ndarray:
            return batch[:, 0, 0, 0].astype(np.float32) / 255

    img = np.zeros((1, 4, 4, 3), np.uint8)
    img[0, 0, 0, 0] = 255  # the corner stays put under the identity and the transpose: 2 of the 8 views
    plain = Classifier(Asymmetric(), source="test")
    tta = Classifier(Asymmetric(), source="test", tta=True)
    assert plain.predict_prepared(img)[0] == pytest.approx(1.0)
    assert tta.predict_prepared(img)[0] == pytest.approx(2 / 8)  # mean over the 8 views
    assert tta.threshold == 0.3 and plain.threshold == 0.5
    no_tta = type("NoTta", (Asymmetric,), {"meta": {"threshold": 0.5, "class_names": ["U", "P"]}})
    with pytest.raises(ModelError, match="no TTA threshold"):
        Classifier(no_tta(), source="test", tta=True)


def test_skip_cv_needs_a_final_fit(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from malaria_cells.cli import app

    res = CliRunner().invoke(app, ["reproduce", "--cv", "5", "--out", str(tmp_path), "--skip-cv"])
    assert res.exit_code == 2 and "--skip-cv goes with --final-fit" in res.output
    res = CliRunner().invoke(
        app,
        # No data either: the missing CV is the error reported (it was an exit 3 for the data on a machine without it).
        ["reproduce", "--cv", "5", "--data", str(tmp_path / "no-data"), "--out", str(tmp_path), "--skip-cv"]
        + ["--final-fit", str(tmp_path / "f")],
    )
    assert res.exit_code == 2 and "no cross-validation results" in res.output


def test_teachers_of_a_two_seed_distilled_row() -> None:
    row = CV.ROW_BY_KEY["custom-cnn-48-distilled-2seeds"]
    # each teacher row at the student's seed and the next one, row by row
    assert CV.teacher_runs(row, seed=0) == [
        ("custom-cnn-48", 0), ("custom-cnn-48", 1), ("custom-cnn-64", 0), ("custom-cnn-64", 1)
    ]  # fmt: skip
    assert CV.teacher_runs(row, seed=3)[1] == ("custom-cnn-48", 4)
    one = CV.ROW_BY_KEY["custom-cnn-48-distilled"]
    assert CV.teacher_runs(one, seed=0) == [("custom-cnn-48", 0), ("custom-cnn-64", 0)]
    # the dependency order puts both teacher rows before the student
    keys = [r.key for r in CV.rows_by_key(["custom-cnn-48-distilled-2seeds-tta"])]
    assert keys.index("custom-cnn-64") < keys.index("custom-cnn-48-distilled-2seeds") < len(keys) - 1
    paths = [Path(f"t{i}") for i in range(4)]
    cfg = CV.fold_config(row, folds=5, fold=1, seed=0, split_seed=0, teachers=paths)
    assert cfg.distill_from == "t0,t1,t2,t3" and cfg.input_size == 48
    with pytest.raises(ConfigError, match="teacher runs are needed"):
        CV.fold_config(row, folds=5, fold=1, seed=0, split_seed=0)
