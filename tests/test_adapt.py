"""Adapting a model to a lab: operating points by hand, block splits, and the adapt command end to end on a small
synthetic lab (a run trained on synthetic cells, field photos of drawn cells with boxes)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from malaria_cells.adapt import AdaptConfig, adapt, block_split, operating_points
from malaria_cells.config import resolve_config
from malaria_cells.errors import ConfigError
from malaria_cells.run import Run
from malaria_cells.train import train


def test_operating_points_by_hand():
    y = np.array([0] * 10 + [1] * 4)
    p = np.array([0.01, 0.02, 0.03, 0.04, 0.05, 0.06, 0.07, 0.08, 0.09, 0.5, 0.3, 0.6, 0.7, 0.9])
    pts = operating_points(y, p, specificity=0.9, sensitivity=0.75)
    balanced = pts["balanced"]
    assert 0.09 < balanced <= 0.3  # Youden: every negative but the 0.5 one below, every positive above
    # specificity 0.9 = 9 of 10 negatives below the threshold: just above 0.09, but never laxer than balanced
    assert pts["high_specificity"] == max(balanced, float(np.nextafter(0.09, 1.0)))
    # sensitivity 0.75 = 3 of 4 positives at or above 0.6, but never stricter than balanced
    assert pts["high_sensitivity"] == min(balanced, 0.6)
    strict = operating_points(y, p, specificity=1.0, sensitivity=0.75)
    assert strict["high_specificity"] > 0.5 and (p[y == 0] < strict["high_specificity"]).all()


def test_block_split_keeps_consecutive_photos_together():
    groups = np.array([f"P{i:03d}.jpg" for i in range(20) for _ in range(3)])
    s = block_split(groups, val_fraction=0.2, test_fraction=0.2)
    order = [s[f"P{i:03d}.jpg"] for i in range(20)]
    assert order == ["train"] * 12 + ["val"] * 4 + ["test"] * 4


def test_bad_settings_are_refused():
    with pytest.raises(ConfigError):
        AdaptConfig(val_fraction=0.5)
    with pytest.raises(ConfigError):
        AdaptConfig(epochs=0)


def _lab(tmp_path, n_photos: int = 10) -> tuple:
    """Drawn field photos (pink disks; every 4th cell with a purple dot = infected) and their boxes (IML layout)."""
    folder = tmp_path / "lab"
    folder.mkdir()
    entries = []
    for k in range(n_photos):
        img = np.empty((320, 480, 3), np.uint8)
        img[:] = (222, 228, 218)
        yy, xx = np.mgrid[:320, :480]
        objs = []
        for j, (cy, cx) in enumerate((y, x) for y in range(50, 300, 70) for x in range(50, 460, 70)):
            r = 26
            disk = (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
            img[disk] = (190, 140, 165)
            infected = (j + k) % 4 == 0
            if infected:
                img[(yy - cy - 5) ** 2 + (xx - cx + 4) ** 2 <= 36] = (80, 20, 110)
            objs.append({"type": "ring" if infected else "red blood cell",
                         "bbox": {"x": str(cx - r), "y": str(cy - r), "w": str(2 * r), "h": str(2 * r)}})  # fmt: skip
        name = f"F{k:03d}.png"
        Image.fromarray(img).save(folder / name)
        entries.append({"image_name": name, "objects": objs})
    ann = tmp_path / "boxes.json"
    ann.write_text(json.dumps(entries))
    return folder, ann


@pytest.fixture()
def small_run(tmp_path, synthetic_data):
    cfg = resolve_config(overrides=dict(model="custom-cnn", input_size=32, batch_size=16, epochs=2, threads=1))
    return train(config=cfg, data_dir=synthetic_data, run_dir=tmp_path / "base")


def test_adapt_writes_a_run_with_operating_points_and_a_report(tmp_path, small_run):
    photos, ann = _lab(tmp_path)
    out = tmp_path / "adapted"
    cfg = AdaptConfig(epochs=2, batch_size=16, val_fraction=0.3, test_fraction=0.2, threads=1)
    result = adapt(run=small_run, data=photos, annotations=ann, out=out, config=cfg, n_boot=50)
    run = Run.open(out)
    pts = run.meta.to_dict()["operating_points"]
    assert set(pts) == {"balanced", "high_specificity", "high_sensitivity"}
    assert run.meta.threshold == pts["high_specificity"] == result.threshold
    assert run.meta.to_dict()["adapted"]["from_run"] == str(small_run)
    assert result.onnx.is_file()
    split = (out / "lab_split.csv").read_text().splitlines()[1:]
    assert [line.split(",")[1] for line in split] == ["train"] * 5 + ["val"] * 3 + ["test"] * 2
    test = result.report["test"]
    assert "after, high-specificity point chosen on lab val" in test
    for m in test.values():
        assert m["photos"] == 2 and 0 <= m["roc_auc"]["value"] <= 1
    read_off = result.report["test_roc_read_off"]
    assert set(read_off) == {"before", "after"}
    for r in read_off.values():
        assert set(r) == {"specificity_at_sensitivity_0.9", "sensitivity_at_specificity_0.995"}
        assert all(0 <= v <= 1 for v in r.values())
    # the adapted model loads like any other: predict and smear take it
    from malaria_cells.predict import Classifier

    clf = Classifier.load(result.onnx)
    assert clf.threshold == pytest.approx(result.threshold)
    assert clf.operating_points == pytest.approx(pts)  # the named thresholds travel inside the ONNX file
    assert Classifier.load(result.onnx, operating_point="balanced").threshold == pytest.approx(pts["balanced"])
    assert Classifier.load(result.onnx, operating_point="balanced", threshold=0.25).threshold == 0.25
    from malaria_cells.errors import ModelError

    with pytest.raises(ModelError, match="no operating point 'screening'") as err:
        Classifier.load(result.onnx, operating_point="screening")
    assert err.value.code == "operating_point_unknown"
    with pytest.raises(FileExistsError):
        adapt(run=small_run, data=photos, annotations=ann, out=out, config=cfg)


def test_adapt_scores_a_calibrated_base_with_its_temperature_and_stores_none(tmp_path, small_run):
    from malaria_cells.adapt import lab_cells
    from malaria_cells.backends import OnnxBackend, TorchBackend, probabilities

    base = Run.open(small_run)
    meta = base.meta.to_dict()
    meta.update(temperature=4.0, temperature_fitted_on="a test's choice")
    base.save_meta(meta)
    photos, ann = _lab(tmp_path)
    cfg = AdaptConfig(epochs=1, batch_size=16, val_fraction=0.3, test_fraction=0.2, threads=1)
    result = adapt(run=small_run, data=photos, annotations=ann, out=tmp_path / "adapted", config=cfg, n_boot=20)
    # the base as its users see it: probabilities at T = 4 against its threshold (on that scale)
    cells = lab_cells(data=photos, annotations=ann, size=base.meta.prep.input_size)
    assign = block_split(cells.groups, val_fraction=0.3, test_fraction=0.2)
    test = np.array([assign[g] == "test" for g in cells.groups])
    p = probabilities(TorchBackend(small_run, device="cpu"), cells.images[test])
    before = result.report["test"]["before, its own threshold"]
    assert before["parasitemia_called_pct"] == pytest.approx(100 * float((p >= base.meta.threshold).mean()))
    # the adapted model's thresholds are on its raw probabilities: it stores no temperature
    adapted = Run.open(result.out).meta
    assert adapted.temperature is None and "temperature_fitted_on" not in adapted.to_dict()
    assert OnnxBackend(result.onnx).temperature == 1.0


def test_adapt_command_starts_from_the_shipped_model_by_default(tmp_path, share):
    from typer.testing import CliRunner

    from malaria_cells.backends import SHIPPED_RUN
    from malaria_cells.cli import app

    cells = tmp_path / "lab"
    for label in ("Parasitized", "Uninfected"):
        (cells / label).mkdir(parents=True)
        for p in sorted((share / label).glob("*.webp"))[:30]:
            (cells / label / p.name).write_bytes(p.read_bytes())
    out = tmp_path / "adapted"
    res = CliRunner().invoke(app, ["adapt", "--data", str(cells), "--out", str(out), "--epochs", "1"])
    assert res.exit_code == 0, res.output
    assert Run.open(out).meta.to_dict()["adapted"]["from_run"] == str(SHIPPED_RUN)
    assert (out / "model.onnx").is_file()


def test_adapt_on_normalized_cells_makes_smear_normalize_too(tmp_path, small_run, caplog):
    from malaria_cells.adapt import lab_cells
    from malaria_cells.errors import ConfigError
    from malaria_cells.predict import Classifier
    from malaria_cells.smear import SmearAnalyzer
    from malaria_cells.stain import load_reference, rgb_to_lab, stained

    photos, ann = _lab(tmp_path, n_photos=6)
    cells = lab_cells(data=photos, annotations=ann, size=32, stain_normalize=True)
    first = cells.images[cells.groups == "F000.png"]
    lab = rgb_to_lab(first[stained(first)])
    assert np.allclose(lab.mean(0), load_reference().mean, atol=1.5)  # the photo's cells, moved to NIH's stain
    with pytest.raises(ConfigError, match="needs field photos"):
        lab_cells(data=photos, annotations=None, size=32, stain_normalize=True)
    cfg = AdaptConfig(epochs=1, batch_size=16, val_fraction=0.3, test_fraction=0.2, threads=1, stain_normalize=True)
    # A final-fit base (the shipped model is one): its NIH CV estimate and TTA thresholds must not pass to the lab's.
    base = Run.open(small_run)
    nih_only = dict(final_fit=True, cv_estimate={"n": 1}, tta_threshold=0.5, tta_operating_points={"balanced": 0.5})
    base.save_meta({**base.meta.to_dict(), **nih_only})
    result = adapt(run=small_run, data=photos, annotations=ann, out=tmp_path / "adapted", config=cfg, n_boot=20)
    adapted = Run.open(result.out).meta.to_dict()
    assert adapted["stain_normalize"] is True
    assert not {"final_fit", "cv_estimate", "tta_threshold", "tta_operating_points"} & set(adapted)
    clf = Classifier.load(result.onnx)
    assert clf.card["stain_normalize"] is True  # it travels in the ONNX file
    assert not clf.card["final_fit"] and clf.card.get("tta_threshold") is None
    assert SmearAnalyzer(classifier=clf).stain_normalize  # and smear follows it unless told otherwise
    assert not SmearAnalyzer(classifier=clf, stain_normalize=False).stain_normalize
    assert not SmearAnalyzer(classifier=Classifier.load()).stain_normalize  # the shipped model: off
    with caplog.at_level("WARNING", logger="malaria_cells.predict"):
        clf.predict(first[0])  # a single cell cannot be normalized: predict says the model is meant for smear
    assert "meant for smear" in caplog.text
    assert Classifier.load().single_cell_warning is None  # the shipped model: no such warning
    # REST says it too, in the answer (the shipped model's answers carry no "warning")
    import io

    from fastapi.testclient import TestClient

    from malaria_cells.serve import create_app

    png = io.BytesIO()
    Image.fromarray(first[0]).save(png, format="PNG")
    with TestClient(create_app(model=result.onnx), base_url="http://127.0.0.1") as client:
        r = client.post("/api/v1/predict", files=[("files", ("cell.png", png.getvalue(), "image/png"))])
    assert r.status_code == 200 and "meant for smear" in r.json()["warning"]


def test_a_test_block_of_one_class_still_writes_the_report(tmp_path, small_run):
    # The lab's last photos (the test block) hold no infected cell: no ROC curve to read there, but no crash either.
    photos, ann = _lab(tmp_path)
    entries = json.loads(ann.read_text())
    for e in entries[-2:]:
        for o in e["objects"]:
            o["type"] = "red blood cell"
    ann.write_text(json.dumps(entries))
    cfg = AdaptConfig(epochs=1, batch_size=16, val_fraction=0.3, test_fraction=0.2, threads=1)
    result = adapt(run=small_run, data=photos, annotations=ann, out=tmp_path / "adapted", config=cfg, n_boot=20)
    assert result.report["test"]["after, high-specificity point chosen on lab val"]["infected"] == 0
    assert result.report["test_roc_read_off"] == {"before": None, "after": None}
