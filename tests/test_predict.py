"""Tests for malaria_cells.predict, the predict and explain commands, and Grad-CAM (malaria_cells.explain)."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from deploy_helpers import run_python, synthetic_cell, tiny_onnx, tiny_run
from malaria_cells import predict as P
from malaria_cells.cli import app
from malaria_cells.predict import Classifier, ModelError


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.getbasetemp() / "deploy"


@pytest.fixture(scope="module")
def onnx_clf(base: Path) -> Classifier:
    return Classifier.load(tiny_onnx(base), threads=2)


@pytest.fixture(scope="module")
def torch_clf(base: Path) -> Classifier:
    return Classifier.load(tiny_run(base)[0], threads=2)


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Three good cells (one in a subfolder), a corrupt PNG and a text file named .png."""
    root = tmp_path_factory.mktemp("inputs")
    rng = np.random.default_rng(1)
    (root / "sub").mkdir()
    synthetic_cell(rng, infected=True).save(root / "a.png")
    synthetic_cell(rng, infected=False).save(root / "b.png")
    synthetic_cell(rng, infected=True).save(root / "sub" / "c.png")
    good = (root / "a.png").read_bytes()
    (root / "corrupt.png").write_bytes(good[: len(good) // 3])
    (root / "notes.png").write_text("not an image")
    (root / "readme.txt").write_text("ignored in folders: not an image suffix")
    return root


def test_onnx_path_imports_neither_torch_nor_timm(base: Path) -> None:
    model = tiny_onnx(base)
    code = (
        "import sys, numpy as np\n"
        "from PIL import Image\n"
        "from malaria_cells.predict import Classifier\n"
        "clf = Classifier.load()\n"  # None: $MALARIA_CELLS_MODEL
        "img = Image.new('RGB', (50, 50), (200, 120, 130))\n"
        "preds = clf.predict([img, np.zeros((40, 40, 3), np.uint8), b'junk'])\n"
        "assert [p.ok for p in preds] == [True, True, False], preds\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'timm', 'torchvision'))\n"
        "print('IMPORTED', bad)\n"
    )
    out = run_python(code, env={P.MODEL_ENV: str(model)})
    assert out.returncode == 0, out.stderr
    assert "IMPORTED []" in out.stdout, out.stdout


def test_inputs_of_every_kind_agree(onnx_clf: Classifier, folder: Path) -> None:
    path = folder / "a.png"
    img = Image.open(path).convert("RGB")
    arr = np.asarray(img)
    rgba = np.dstack([arr, np.full(arr.shape[:2], 255, np.uint8)])
    preds = onnx_clf.predict([path, str(path), path.read_bytes(), img, arr, rgba])
    probs = [p.probability for p in preds]
    assert all(p.ok for p in preds)
    assert max(probs) - min(probs) < 1e-6
    assert preds[0].source == str(path) and preds[3].source == "<image 3>"
    batch = onnx_clf.predict(np.stack([arr, arr]))
    assert len(batch) == 2 and batch[1].probability == pytest.approx(probs[0], abs=1e-6)
    gray = onnx_clf.predict([np.asarray(img.convert("L")), np.asarray(img.convert("L"))[:, :, None]])
    assert all(p.ok for p in gray) and abs(gray[0].probability - gray[1].probability) < 1e-6


def test_single_image_and_names(onnx_clf: Classifier, folder: Path) -> None:
    (pred,) = onnx_clf.predict(folder / "b.png")
    assert pred.ok and pred.label in onnx_clf.class_names
    named = onnx_clf.predict([folder / "a.png"], names=["upload.png"])
    assert named[0].source == "upload.png"
    with pytest.raises(ValueError, match="names"):
        onnx_clf.predict([folder / "a.png"], names=["x", "y"])


def test_bad_images_get_errors_and_the_rest_go_on(onnx_clf: Classifier, folder: Path) -> None:
    items = [
        folder / "corrupt.png",
        folder / "a.png",
        folder / "notes.png",
        folder / "missing.png",
        np.zeros((40, 40, 3), np.float32),
        np.zeros((4, 4, 3), np.uint8),
        np.zeros((40, 40, 2), np.uint8),
        b"",
    ]
    preds = onnx_clf.predict(items, batch_size=3)
    assert [p.ok for p in preds] == [False, True, False, False, False, False, False, False]
    errors = [p.error for p in preds if not p.ok]
    for needle in ("truncated", "not an image", "cannot read", "dtype", "too small", "shape", "empty"):
        assert any(needle in e for e in errors), (needle, errors)
    assert all(p.probability is None and p.label is None for p in preds if not p.ok)


def test_label_follows_threshold(onnx_clf: Classifier, folder: Path) -> None:
    preds = onnx_clf.predict(P.collect_inputs([folder]))
    for p in preds:
        if p.ok:
            assert p.threshold == onnx_clf.threshold
            assert (p.label == "Parasitized") == (p.probability >= p.threshold)
    assert onnx_clf.label_of(onnx_clf.threshold) == "Parasitized"
    assert onnx_clf.label_of(np.nextafter(onnx_clf.threshold, 0)) == "Uninfected"


def test_onnx_and_torch_backends_agree(onnx_clf: Classifier, torch_clf: Classifier, folder: Path) -> None:
    files = [folder / "a.png", folder / "b.png", folder / "sub" / "c.png"]
    a = np.array([p.probability for p in onnx_clf.predict(files)])
    b = np.array([p.probability for p in torch_clf.predict(files)])
    assert np.max(np.abs(a - b)) <= 1e-4
    assert onnx_clf.threshold == pytest.approx(torch_clf.threshold)
    assert onnx_clf.card["backend"] == "onnx" and torch_clf.card["backend"] == "torch"
    assert not onnx_clf.explainable and torch_clf.explainable
    for key in ("model", "class_names", "threshold", "preprocessing", "data_manifest_sha256", "created"):
        assert onnx_clf.card[key] is not None and torch_clf.card[key] is not None


def test_model_resolution(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, base: Path) -> None:
    monkeypatch.delenv(P.MODEL_ENV, raising=False)
    monkeypatch.setattr(P, "SHIPPED_MODEL", tmp_path / "models_shipped" / "default.onnx")
    with pytest.raises(ModelError, match="malaria-cells export"):
        Classifier.load()
    monkeypatch.setenv(P.MODEL_ENV, str(tmp_path / "nope.onnx"))
    with pytest.raises(ModelError, match="MALARIA_CELLS_MODEL"):
        Classifier.load()
    monkeypatch.setenv(P.MODEL_ENV, str(tiny_onnx(base)))
    assert Classifier.load().backend == "onnx"
    assert P.SHIPPED_MODEL.parent.name == "models_shipped"


def test_unusable_models_raise_model_error(tmp_path: Path) -> None:
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(ModelError, match="metadata.json"):
        Classifier.load(tmp_path / "empty_dir")
    (tmp_path / "junk.onnx").write_bytes(b"not onnx")
    with pytest.raises(ModelError, match="not a loadable ONNX"):
        Classifier.load(tmp_path / "junk.onnx")
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])],
    )
    onnx.save(helper.make_model(graph), str(tmp_path / "plain.onnx"))
    with pytest.raises(ModelError, match="without malaria-cells metadata"):
        Classifier.load(tmp_path / "plain.onnx")


def test_collect_inputs(folder: Path) -> None:
    found = P.collect_inputs([folder])
    names = [Path(f).name for f in found]
    assert names == ["a.png", "b.png", "corrupt.png", "notes.png", "c.png"]
    assert P.collect_inputs([str(folder / "**" / "c.png")]) == [str(folder / "sub" / "c.png")]
    assert P.collect_inputs([folder / "a.png", folder / "a.png"]) == [str(folder / "a.png")]
    assert P.collect_inputs([folder / "nothing-*.png"]) == [str(folder / "nothing-*.png")]
    assert P.collect_inputs([folder / "readme.txt"]) == [str(folder / "readme.txt")]


def _invoke(args: list[str]):
    return CliRunner().invoke(app, args, catch_exceptions=False)


def test_cli_predict_folder_with_corrupt_file(base: Path, folder: Path) -> None:
    model = str(tiny_onnx(base))
    res = _invoke(["predict", str(folder), "--model", model, "--format", "csv"])
    assert res.exit_code == 1
    rows = list(csv.DictReader(io.StringIO(res.stdout)))
    assert len(rows) == 5
    by_name = {Path(r["source"]).name: r for r in rows}
    assert "truncated" in by_name["corrupt.png"]["error"] and by_name["corrupt.png"]["label"] == ""
    assert "not an image" in by_name["notes.png"]["error"]
    for name in ("a.png", "b.png", "c.png"):
        assert by_name[name]["error"] == "" and 0 <= float(by_name[name]["prob_parasitized"]) <= 1
        assert by_name[name]["label"] in ("Parasitized", "Uninfected")


def test_cli_predict_formats_and_exit_codes(base: Path, folder: Path, tmp_path: Path) -> None:
    model = str(tiny_onnx(base))
    good = [str(folder / "a.png"), str(folder / "b.png")]
    res = _invoke(["predict", *good, "--model", model])
    assert res.exit_code == 0
    assert "a.png" in res.stdout and "P(Parasitized)" in res.stdout
    out = tmp_path / "preds.json"
    res = _invoke(["predict", str(folder / "*.png"), "--model", model, "--format", "json", "--out", str(out)])
    assert res.exit_code == 1  # corrupt.png and notes.png match the glob
    doc = json.loads(out.read_text())
    assert doc["model"]["model"] == "custom-cnn"
    assert len(doc["predictions"]) == 4 and sum(p["error"] is None for p in doc["predictions"]) == 2
    # more files than a batch: the progress bar path
    res = _invoke(["predict", str(folder), "--model", model, "--format", "json", "--batch-size", "2"])
    assert res.exit_code == 1 and len(json.loads(res.stdout)["predictions"]) == 5


def test_cli_predict_usage_errors(base: Path, folder: Path, tmp_path: Path) -> None:
    res = _invoke(["predict", str(folder / "a.png"), "--model", str(tmp_path / "none.onnx")])
    assert res.exit_code == 2 and "does not exist" in res.output
    res = _invoke(["predict", str(folder / "a.png"), "--model", str(tiny_onnx(base)), "--format", "xml"])
    assert res.exit_code == 2 and "--format" in res.output


@pytest.mark.parametrize(
    ("n", "count", "expected"),
    [
        (10, 1, [(0, 10)]),
        (10, 3, [(0, 3), (3, 6), (6, 10)]),  # sizes differ by at most one
        (2, 3, [(0, 0), (0, 1), (1, 2)]),  # more shards than items: some are empty
        (0, 2, [(0, 0), (0, 0)]),
    ],
)
def test_shard_bounds_cover_every_item_once(n: int, count: int, expected: list[tuple[int, int]]) -> None:
    assert [P.shard_bounds(n, index=i, count=count) for i in range(count)] == expected


@pytest.mark.parametrize(("index", "count"), [(-1, 2), (2, 2), (0, 0)])
def test_shard_bounds_reject_bad_shards(index: int, count: int) -> None:
    with pytest.raises(ValueError):
        P.shard_bounds(5, index=index, count=count)


def test_iter_predict_streams_one_batch_at_a_time(onnx_clf: Classifier, folder: Path) -> None:
    consumed = 0

    def files():
        nonlocal consumed
        for _ in range(100):  # 500 images in all, far more than one batch
            for name in ("a.png", "b.png", "corrupt.png", "notes.png", "sub/c.png"):
                consumed += 1
                yield folder / name

    stream = onnx_clf.iter_predict(files(), batch_size=4)
    first = next(stream)
    assert first.ok and consumed == 4  # the first result comes after one batch, not after reading everything
    rest = list(stream)
    assert consumed == 500 and len(rest) == 499
    assert [p.ok for p in rest[:9]] == [True, False, False, True, True, True, False, False, True]
    assert rest[-1].probability == pytest.approx(onnx_clf.predict(folder / "sub" / "c.png")[0].probability)


def test_decode_processes_give_the_same_results_in_order(base: Path, folder: Path) -> None:
    # Files decode in worker processes, ahead of the model; in-memory images in between decode here; errors keep
    # their place. Everything must match decoding in this process, in input order.
    consumed = 0
    names = ["a.png", "corrupt.png", "b.png", "notes.png", "missing.png", "sub/c.png"]

    def items():
        nonlocal consumed
        for i in range(40):
            for name in names:
                consumed += 1
                yield folder / name
            if i == 20:
                consumed += 1
                yield np.asarray(Image.open(folder / "a.png").convert("RGB"))

    here = Classifier.load(tiny_onnx(base), threads=1)
    procs = Classifier.load(tiny_onnx(base), threads=1, decode_processes=2)
    try:
        expected = here.predict(list(items()), batch_size=5)
        consumed = 0
        stream = procs.iter_predict(items(), batch_size=5)
        first = next(stream)
        assert consumed <= 5 * (P.LOOKAHEAD_CHUNKS + 1)  # streams: a bounded number of chunks read ahead
        got = [first, *stream]
    finally:
        procs.close()
    assert [(p.source, p.ok, p.error is None) for p in got] == [(p.source, p.ok, p.error is None) for p in expected]
    assert [p.error for p in got] == [p.error for p in expected]
    assert [p.probability for p in got] == pytest.approx([p.probability for p in expected])


@pytest.mark.parametrize("fmt", ["jsonl", "csv"])
def test_cli_predict_shards_concatenate_to_the_whole(base: Path, folder: Path, tmp_path: Path, fmt: str) -> None:
    model = str(tiny_onnx(base))
    whole = tmp_path / f"whole.{fmt}"
    res = _invoke(["predict", str(folder), "--model", model, "--format", fmt, "--out", str(whole)])
    assert res.exit_code == 1  # the corrupt files
    parts = []
    for i in (1, 2, 3):
        out = tmp_path / f"part{i}.{fmt}"
        args = ["predict", str(folder), "--model", model, "--format", fmt, "--out", str(out), "--shard", f"{i}/3"]
        # One shard decodes in a worker process (what large inputs get by default): the same bytes come out.
        procs = ["--decode-processes", "1"] if i == 2 else []
        res = _invoke(args + procs + (["--no-header"] if fmt == "csv" and i > 1 else []))
        assert res.exit_code in (0, 1) and f"shard {i}/3" in res.output
        parts.append(out.read_text())
    assert "".join(parts) == whole.read_text()
    assert len(whole.read_text().splitlines()) == 5 + (fmt == "csv")
    if fmt == "jsonl":
        assert [json.loads(line)["source"] for line in whole.read_text().splitlines()] == P.collect_inputs([folder])


def test_cli_predict_bad_shard(base: Path, folder: Path) -> None:
    for shard in ("0/3", "4/3", "x", "1/0"):
        res = _invoke(["predict", str(folder), "--model", str(tiny_onnx(base)), "--shard", shard])
        assert res.exit_code == 2 and "--shard" in res.output, shard


def test_grad_cam_heatmap_is_not_constant(torch_clf: Classifier, folder: Path) -> None:
    from malaria_cells.explain import explain, overlay_png

    for name in ("a.png", "b.png"):
        expl = explain(torch_clf, folder / name, name=name)
        size = torch_clf.prep.input_size
        assert expl.heatmap.shape == (size, size) and expl.image.shape == (size, size, 3)
        assert expl.heatmap.min() >= 0 and expl.heatmap.max() <= 1
        assert expl.heatmap.std() > 0.01, "Grad-CAM heatmap is constant"
        assert expl.prediction.label == torch_clf.label_of(expl.prediction.probability)
        png = Image.open(io.BytesIO(overlay_png(expl)))
        assert png.format == "PNG" and png.size == (3 * size, 3 * size)


def test_cli_explain_writes_pngs(base: Path, folder: Path, tmp_path: Path) -> None:
    run, _, _ = tiny_run(base)
    out = tmp_path / "cams"
    res = _invoke(
        ["explain", str(folder / "a.png"), str(folder / "corrupt.png"), "--model", str(run), "--out", str(out)]
    )
    assert res.exit_code == 1  # the corrupt file
    pngs = sorted(out.glob("*.png"))
    assert [p.name for p in pngs] == ["a_gradcam.png"]
    img = np.asarray(Image.open(pngs[0]).convert("RGB"))
    assert img.shape[0] > 200 and img.std() > 10
    res = _invoke(["explain", str(folder / "a.png"), "--model", str(tiny_onnx(base)), "--out", str(out)])
    assert res.exit_code == 2 and "torch model" in res.output
