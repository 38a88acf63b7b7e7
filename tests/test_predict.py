"""Tests for malaria_cells.predict, the predict and explain commands, and Grad-CAM (malaria_cells.explain)."""

from __future__ import annotations

import csv
import io
import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from deploy_helpers import run_python, synthetic_cell, tiny_onnx, tiny_run
from malaria_cells import backends as B
from malaria_cells import inputs
from malaria_cells import predict as P
from malaria_cells.cli import app
from malaria_cells.predict import Classifier, ModelError


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.getbasetemp() / "deploy"


@pytest.fixture(scope="module")
def onnx_clf(base: Path) -> Classifier:
    # The synthetic cells are noisier than stained cells (flagged "unusual texture"): these mechanics tests read the
    # model's own labels; the flag has tests of its own.
    return Classifier.load(tiny_onnx(base), threads=2, unknown_when_flagged=False)


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
    preds = onnx_clf.predict(inputs.collect_inputs([folder]))
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
    monkeypatch.setattr(B, "SHIPPED_MODEL", tmp_path / "models_shipped" / "default.onnx")
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
    found = inputs.collect_inputs([folder])
    names = [Path(f).name for f in found]
    assert names == ["a.png", "b.png", "corrupt.png", "notes.png", "c.png"]
    assert inputs.collect_inputs([str(folder / "**" / "c.png")]) == [str(folder / "sub" / "c.png")]
    assert inputs.collect_inputs([folder / "a.png", folder / "a.png"]) == [str(folder / "a.png")]
    assert inputs.collect_inputs([folder / "nothing-*.png"]) == [str(folder / "nothing-*.png")]
    assert inputs.collect_inputs([folder / "readme.txt"]) == [str(folder / "readme.txt")]


def _invoke(args: list[str]):
    return CliRunner().invoke(app, args, catch_exceptions=False)


def test_cli_predict_folder_with_corrupt_file(base: Path, folder: Path) -> None:
    model = str(tiny_onnx(base))
    res = _invoke(["predict", str(folder), "--model", model, "--format", "csv", "--raw-labels"])
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
    assert [inputs.shard_bounds(n, index=i, count=count) for i in range(count)] == expected


@pytest.mark.parametrize(("index", "count"), [(-1, 2), (2, 2), (0, 0)])
def test_shard_bounds_reject_bad_shards(index: int, count: int) -> None:
    with pytest.raises(ValueError):
        inputs.shard_bounds(5, index=index, count=count)


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
        assert [json.loads(line)["source"] for line in whole.read_text().splitlines()] == inputs.collect_inputs(
            [folder]
        )


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
    # An ONNX model has no gradients: it gets an occlusion map instead, made without torch or matplotlib.
    res = _invoke(["explain", str(folder / "a.png"), "--model", str(tiny_onnx(base)), "--out", str(out)])
    assert res.exit_code == 0, res.output
    occ = np.asarray(Image.open(out / "a_occlusion.png").convert("RGB"))
    assert occ.shape[0] > 200 and occ.std() > 10


# -- one Backend interface (malaria_cells.backends) ----------------------------------------------------------------


def test_backends_share_one_interface(base: Path) -> None:
    run, _, _ = tiny_run(base)
    onnx_backend, torch_backend = B.load_backend(tiny_onnx(base)), B.load_backend(run, device="cpu")
    assert isinstance(onnx_backend, B.OnnxBackend) and isinstance(torch_backend, B.TorchBackend)
    cells = np.stack(
        [np.asarray(synthetic_cell(np.random.default_rng(i), infected=i % 2 == 0).resize((64, 64))) for i in range(5)]
    )
    results = []
    for backend in (onnx_backend, torch_backend):
        assert isinstance(backend, B.Backend) and backend.name in ("onnx", "torch")
        assert backend.prep.input_size == 64 and backend.meta["model"] == "custom-cnn"
        prob = backend(cells)
        assert prob.dtype == np.float32 and prob.shape == (5,) and np.all((prob >= 0) & (prob <= 1))
        assert np.allclose(B.probabilities(backend, cells, batch_size=2), prob, atol=1e-6)  # batches of 2, 2, 1
        results.append(prob)
    assert np.max(np.abs(results[0] - results[1])) <= 1e-4
    # An in-memory model (what the benchmarks time) wraps into a Classifier like a loaded one.
    wrapped = B.TorchBackend.from_model(torch_backend.model, torch_backend.meta)
    clf = Classifier(wrapped, source="memory", threads=1)
    assert clf.predict(cells[0])[0].probability == pytest.approx(float(results[1][0]), abs=1e-6)


def test_decode_plan_gives_half_the_cores_to_decoding_from_four_batches() -> None:
    assert P.decode_plan(256, batch_size=64, cores=4) == (2, 2)
    assert P.decode_plan(255, batch_size=64, cores=4) == (None, 0)  # too few files to pay for starting processes
    assert P.decode_plan(10_000, batch_size=64, cores=1) == (None, 0)  # one core: nothing to share
    assert P.decode_plan(10_000, batch_size=64, cores=8, threads=3) == (3, 4)
    assert P.decode_plan(10_000, batch_size=64, cores=8, decode_processes=0) == (None, 0)


# -- machine-readable errors on predictions ------------------------------------------------------------------------


def test_predictions_carry_error_code_and_status(base: Path, onnx_clf: Classifier, folder: Path) -> None:
    items = [
        folder / "corrupt.png",
        folder / "notes.png",
        folder / "missing.png",
        np.zeros((40, 40, 3), np.float32),
        np.zeros((4, 4, 3), np.uint8),
        b"",
        folder / "a.png",
    ]
    expected = [
        ("unreadable_image", 422),
        ("not_an_image", 415),
        ("file_unreadable", 422),
        ("unusable_image", 422),
        ("image_too_small", 422),
        ("empty_file", 422),
        (None, None),
    ]
    assert [(p.error_code, p.error_status) for p in onnx_clf.predict(items)] == expected
    # The same codes come back from the decoding processes.
    procs = Classifier.load(tiny_onnx(base), threads=1, decode_processes=1)
    try:
        files = [folder / "corrupt.png", folder / "notes.png", folder / "missing.png", folder / "a.png"]
        got = list(procs.iter_predict(files, batch_size=2))
    finally:
        procs.close()
    assert [(p.error_code, p.error_status) for p in got] == [expected[0], expected[1], expected[2], (None, None)]
    assert got[1].to_dict()["error_code"] == "not_an_image" and got[1].to_dict()["error_status"] == 415


def test_cli_jsonl_has_error_codes_and_csv_keeps_its_columns(base: Path, folder: Path) -> None:
    model = str(tiny_onnx(base))
    res = _invoke(["predict", str(folder / "notes.png"), str(folder / "a.png"), "--model", model, "-f", "jsonl"])
    rows = [json.loads(line) for line in res.stdout.splitlines()]
    assert res.exit_code == 1 and rows[0]["error_code"] == "not_an_image" and rows[0]["error_status"] == 415
    assert rows[1]["error_code"] is None and rows[1]["prob_parasitized"] is not None
    res = _invoke(["predict", str(folder / "a.png"), "--model", model, "-f", "csv"])
    assert res.stdout.splitlines()[0] == "source,label,prob_parasitized,threshold,flag,error"


def test_to_image_uses_the_decoders_size_checks() -> None:
    # Arrays and PIL images are refused with the same codes as decoded files (one place for the size checks).
    with pytest.raises(P.ImageError) as small:
        P.to_image(np.zeros((5, 100, 3), np.uint8))
    assert small.value.code == "image_too_small"
    with pytest.raises(P.ImageError) as big:
        P.to_image(Image.new("RGB", (200, 200)), max_pixels=100 * 100)
    assert big.value.code == "too_many_pixels" and big.value.status == 413
    with pytest.raises(P.ImageError) as arr:
        P.to_image(np.zeros((200, 200), np.uint8), max_pixels=100 * 100)
    assert arr.value.code == "too_many_pixels"


# -- folder walking: symbolic links and unreadable folders --------------------------------------------------------


@pytest.fixture()
def linked_folder(tmp_path: Path) -> Path:
    """Two good cells plus every kind of link trouble a folder can hold."""
    root = tmp_path / "linked"
    (root / "sub").mkdir(parents=True)
    rng = np.random.default_rng(3)
    synthetic_cell(rng, infected=True).save(root / "a.png")
    synthetic_cell(rng, infected=False).save(root / "sub" / "b.png")
    (root / "loop").symlink_to(".")  # a folder link to its own folder: walked forever before
    (root / "sub" / "up").symlink_to("..")  # back to an ancestor
    (root / "sub_alias").symlink_to("sub")  # a second way into a folder already walked
    (root / "self.png").symlink_to("self.png")  # ELOOP
    (root / "gone.png").symlink_to("missing.png")  # dangling, image-named
    (root / "gone_dir").symlink_to("nowhere")  # dangling, may have been a folder
    (root / "gone.txt").symlink_to("nothing.txt")  # dangling but not an image name: ignored like other .txt files
    return root


def test_folder_walk_reports_links_instead_of_crashing_or_dropping(linked_folder: Path) -> None:
    found = inputs.collect_inputs([linked_folder])
    files = [f for f in found if isinstance(f, str)]
    problems = {Path(f.path).name: f for f in found if isinstance(f, inputs.UnreadableInput)}
    assert [Path(f).relative_to(linked_folder).as_posix() for f in files] == ["a.png", "sub/b.png"]  # each once
    assert set(problems) == {"loop", "up", "sub_alias", "self.png", "gone.png", "gone_dir"}
    assert problems["loop"].code == "symlink_loop" and "loop" in problems["loop"].reason
    assert problems["up"].code == "symlink_loop" and "already walked" in problems["up"].reason
    assert "second link" in problems["sub_alias"].reason
    assert problems["self.png"].code == "symlink_loop"
    assert "dangling" in problems["gone.png"].reason and "dangling" in problems["gone_dir"].reason
    assert all(p.message.startswith(f"{p.path}: ") for p in problems.values())


def test_cli_predict_gives_link_problems_error_rows(base: Path, linked_folder: Path) -> None:
    res = CliRunner().invoke(app, ["predict", str(linked_folder), "--model", str(tiny_onnx(base)), "-f", "jsonl"])
    assert res.exit_code == 1, res.output
    assert "Traceback" not in res.output and isinstance(res.exception, (SystemExit, type(None)))
    rows = {Path(r["source"]).name: r for r in map(json.loads, res.stdout.splitlines())}
    assert set(rows) == {"a.png", "b.png", "loop", "up", "sub_alias", "self.png", "gone.png", "gone_dir"}
    assert rows["a.png"]["error"] is None and rows["b.png"]["error"] is None
    for name in ("loop", "up", "sub_alias", "self.png", "gone.png", "gone_dir"):
        assert rows[name]["label"] is None and rows[name]["error"].startswith(rows[name]["source"] + ": "), name
    assert rows["loop"]["error_code"] == "symlink_loop" and rows["gone.png"]["error_code"] == "file_unreadable"


def test_unreadable_subfolder_gets_an_error_row(tmp_path: Path) -> None:
    root = tmp_path / "locked"
    (root / "closed").mkdir(parents=True)
    synthetic_cell(np.random.default_rng(0), infected=True).save(root / "closed" / "c.png")
    synthetic_cell(np.random.default_rng(1), infected=True).save(root / "open.png")
    (root / "closed").chmod(0)
    try:
        try:
            os.listdir(root / "closed")
        except PermissionError:
            pass
        else:  # root (the test machines run as root) reads a folder whatever its permission bits say
            pytest.skip("permission bits do not stop this user (root) from reading a folder")
        found = inputs.collect_inputs([root])
    finally:
        (root / "closed").chmod(0o755)
    assert isinstance(found[0], inputs.UnreadableInput) and found[0].path == str(root / "closed")
    assert found[0].reason == "cannot read folder (Permission denied)"
    assert found[1:] == [str(root / "open.png")]


def test_a_folder_that_cannot_be_listed_gets_an_error_row(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The same case as above where permission bits cannot make it (root): listing the folder fails as the OS would.
    root = tmp_path / "locked"
    (root / "closed").mkdir(parents=True)
    synthetic_cell(np.random.default_rng(0), infected=True).save(root / "closed" / "c.png")
    synthetic_cell(np.random.default_rng(1), infected=True).save(root / "open.png")
    real_scandir = os.scandir

    def scandir(path):
        if Path(path) == root / "closed":
            raise PermissionError(13, "Permission denied", str(path))
        return real_scandir(path)

    monkeypatch.setattr(inputs.os, "scandir", scandir)
    found = inputs.collect_inputs([root])
    assert isinstance(found[0], inputs.UnreadableInput) and found[0].path == str(root / "closed")
    assert found[0].reason == "cannot read folder (Permission denied)" and found[0].code == "file_unreadable"
    assert found[1:] == [str(root / "open.png")]


# -- broken models: one line naming the file, exit code 2, no traceback -------------------------------------------


def handmade_run(path: Path) -> Path:
    """A finished run folder made without training: an untrained custom CNN's weights and minimal metadata."""
    import torch

    from malaria_cells.models import build_model, default_preprocessing
    from malaria_cells.run import Run

    torch.manual_seed(0)
    path.mkdir(parents=True)
    run = Run(path)
    run.save_weights(build_model("custom-cnn"), "best")
    run.save_meta(
        {"model": "custom-cnn", "preprocessing": default_preprocessing("custom-cnn", 64).to_dict(), "threshold": 0.5}
    )
    return path


def _truncate_weights(run: Path) -> str:
    data = (run / "best.safetensors").read_bytes()
    (run / "best.safetensors").write_bytes(data[: len(data) // 2])
    return "best.safetensors"


def _metadata_list(run: Path) -> str:
    (run / "metadata.json").write_text("[1, 2, 3]")
    return "metadata.json"


def _metadata_without_preprocessing(run: Path) -> str:
    meta = json.loads((run / "metadata.json").read_text())
    del meta["preprocessing"]
    (run / "metadata.json").write_text(json.dumps(meta))
    return "metadata.json"


BREAKAGES = {
    "truncated_weights": _truncate_weights,
    "metadata_list": _metadata_list,
    "metadata_without_preprocessing": _metadata_without_preprocessing,
}


@pytest.fixture(scope="module")
def cells(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from deploy_helpers import make_dataset

    return make_dataset(tmp_path_factory.mktemp("cells") / "data")


def _command(command: str, model: Path, image: Path, cells: Path, out: Path) -> list[str]:
    return {
        "predict": ["predict", str(image), "--model", str(model)],
        "explain": ["explain", str(image), "--model", str(model), "--out", str(out)],
        "evaluate": ["evaluate", str(model), "--data", str(cells), "--split", "all", "--out", str(out)],
        "export": ["export", str(model), "--out", str(out / "m.onnx")],
    }[command]


def _assert_one_line_exit_2(res, name: str) -> None:
    assert res.exit_code == 2, (res.exit_code, res.output, res.exception)
    assert "Traceback" not in res.output and isinstance(res.exception, (SystemExit, type(None))), res.output
    # One error (rich may fold a long message at the console's width when stderr is not a terminal).
    assert res.output.count("error:") == 1 and name in res.output.replace("\n", ""), res.output


def test_handmade_run_is_usable(tmp_path: Path, folder: Path) -> None:
    # The control for the breakages below: intact, the same folder classifies.
    res = CliRunner().invoke(app, ["predict", str(folder / "a.png"), "--model", str(handmade_run(tmp_path / "r"))])
    assert res.exit_code == 0, res.output


@pytest.mark.parametrize("command", ["predict", "explain", "evaluate", "export"])
@pytest.mark.parametrize("breakage", list(BREAKAGES))
def test_broken_run_folder_is_one_line_and_exit_2(
    tmp_path: Path, folder: Path, cells: Path, command: str, breakage: str
) -> None:
    run = handmade_run(tmp_path / "run")
    name = BREAKAGES[breakage](run)
    res = CliRunner().invoke(app, _command(command, run, folder / "a.png", cells, tmp_path / "out"))
    _assert_one_line_exit_2(res, name)
    with pytest.raises(ModelError, match=name):
        B.load_backend(run)


@pytest.mark.parametrize("command", ["predict", "explain", "evaluate"])
def test_garbage_onnx_is_one_line_and_exit_2(tmp_path: Path, folder: Path, cells: Path, command: str) -> None:
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(os.urandom(2048))
    res = CliRunner().invoke(app, _command(command, bad, folder / "a.png", cells, tmp_path / "out"))
    _assert_one_line_exit_2(res, "bad.onnx")
    assert "not a loadable ONNX model" in res.output


def test_evaluate_run_without_split_csv_is_one_line_and_exit_2(tmp_path: Path, cells: Path) -> None:
    run = handmade_run(tmp_path / "run")  # finished, but without split.csv
    res = CliRunner().invoke(app, ["evaluate", str(run), "--data", str(cells), "--out", str(tmp_path / "ev")])
    _assert_one_line_exit_2(res, "split.csv")
