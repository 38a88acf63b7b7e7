"""POST /api/v1/adapt: a lab's zip of labelled cells becomes an adapted model over REST (a real fine-tuning job on a
tiny run), and bad zips, a service without a run folder and a second job get clear errors."""

from __future__ import annotations

import io
import threading
import time
import zipfile
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from deploy_helpers import tiny_onnx, tiny_run
from malaria_cells.backends import OnnxBackend
from malaria_cells.serve import create_app
from malaria_cells.serve_adapt import AdaptBusyError, AdaptJobs, AdaptUploadError, describe_data, unpack

LOCAL = "http://127.0.0.1"


def _zip(files: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, data in files.items():
            zf.writestr(name, data)
    return buf.getvalue()


def _lab_zip(share: Path, n: int = 40) -> bytes:
    files = {}
    for label in ("Parasitized", "Uninfected"):
        for p in sorted((share / label).glob("*.webp"))[:n]:
            files[f"my-lab/{label}/{p.name}"] = p.read_bytes()
    return _zip(files)


def test_unpack_refuses_unsafe_and_oversized_zips(tmp_path: Path) -> None:
    with pytest.raises(AdaptUploadError, match="not a zip"):
        unpack(b"not a zip", tmp_path / "a")
    with pytest.raises(AdaptUploadError, match="unsafe path"):
        unpack(_zip({"../evil.txt": b"x"}), tmp_path / "b")
    assert not (tmp_path / "evil.txt").exists()
    with pytest.raises(AdaptUploadError, match="holds 3 files; at most 2"):
        unpack(_zip({"a": b"1", "b": b"2", "c": b"3"}), tmp_path / "c", max_entries=2)
    with pytest.raises(AdaptUploadError, match="unpacks to"):
        unpack(_zip({"big": b"0" * 3_000_000}), tmp_path / "d", max_unpacked_mb=1)
    # One wrapping folder is looked through; the cell folders are found inside it.
    root = unpack(_zip({"lab/Parasitized/a.png": b"1", "lab/Uninfected/b.png": b"2"}), tmp_path / "e")
    assert root.name == "lab" and describe_data(root) == (None, "1 Parasitized and 1 Uninfected cells")
    with pytest.raises(AdaptUploadError, match="Parasitized/ and Uninfected/"):
        describe_data(unpack(_zip({"x/readme.txt": b"hi"}), tmp_path / "f"))


def test_one_job_at_a_time(tmp_path: Path, share: Path) -> None:
    jobs = AdaptJobs(base=tmp_path, work_dir=tmp_path / "jobs")
    (tmp_path / "jobs").mkdir()
    release = threading.Event()
    jobs._thread = threading.Thread(target=release.wait, daemon=True)  # a job that is still running
    jobs._thread.start()
    try:
        with pytest.raises(AdaptBusyError):
            jobs.submit(_lab_zip(share, 2), epochs=1)
    finally:
        release.set()


def test_an_onnx_service_says_why_it_cannot_adapt(tmp_path: Path, share: Path) -> None:
    with TestClient(create_app(model=tiny_onnx(tmp_path / "deploy")), base_url=LOCAL) as client:
        r = client.post("/api/v1/adapt", content=_lab_zip(share, 2), headers={"Content-Type": "application/zip"})
    assert r.status_code == 409 and r.json()["error"]["code"] == "adapt_unavailable"
    assert "run folder" in r.json()["error"]["message"]


@pytest.mark.slow
def test_adapt_over_rest_returns_a_model_and_its_report(tmp_path: Path, share: Path) -> None:
    run, _, _ = tiny_run(tmp_path / "deploy")
    with TestClient(create_app(model=run), base_url=LOCAL) as client:
        bad = client.post("/api/v1/adapt", content=_zip({"x/readme.txt": b"hi"}))
        assert bad.status_code == 422 and bad.json()["error"]["code"] == "adapt_upload_invalid"
        r = client.post("/api/v1/adapt?epochs=1", content=_lab_zip(share))
        assert r.status_code == 202, r.text
        job = r.json()
        assert r.headers["Location"] == f"/api/v1/adapt/{job['job']}"
        assert job["data"] == "40 Parasitized and 40 Uninfected cells" and job["base_model"] == str(run)
        deadline = time.monotonic() + 300
        while (info := client.get(r.headers["Location"]).json())["status"] in ("queued", "running"):
            assert time.monotonic() < deadline, "adapt job did not finish"
            time.sleep(0.5)
        assert info["status"] == "done", info
        assert 0 <= info["threshold"] <= 1 and set(info["operating_points"]) >= {"balanced", "high_specificity"}
        test = info["report"]["test"]  # before/after on the lab's held-out cells, with patient-free photo CIs
        assert {"before, its own threshold", "after, high-specificity point chosen on lab val"} <= set(test)
        onnx = client.get(info["model_url"])
        assert onnx.status_code == 200 and len(onnx.content) > 10_000
        path = tmp_path / "adapted.onnx"
        path.write_bytes(onnx.content)
        assert OnnxBackend(path).meta["threshold"] == pytest.approx(info["threshold"])
        assert client.get("/api/v1/adapt/nope").json()["error"]["code"] == "adapt_job_not_found"


def test_the_shipped_run_is_the_shipped_models_weights(share: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import numpy as np

    from malaria_cells.backends import SHIPPED_MODEL, SHIPPED_RUN, TorchBackend
    from malaria_cells.preprocess import letterbox, load_image

    # adapt (CLI default, and REST on a service of the shipped model) starts from these weights: they must be the
    # shipped model's own, or the adapted model would start from something else than what users ran.
    cells = np.stack([letterbox(load_image(p), 48) for p in sorted((share / "Parasitized").glob("*.webp"))[:16]])
    fp32 = OnnxBackend(SHIPPED_MODEL.parent / "default-fp32.onnx")
    torch_probs = TorchBackend(SHIPPED_RUN, precision="fp32")(cells)
    assert np.abs(fp32(cells) - torch_probs).max() < 1e-4
    monkeypatch.delenv("MALARIA_CELLS_MODEL", raising=False)
    with TestClient(create_app(), base_url=LOCAL) as client:
        jobs = client.app.state.adapt_jobs
        assert jobs.base == SHIPPED_RUN
        assert jobs._work_dir is None  # no job, no folder


def test_stain_normalize_reaches_the_job(tmp_path: Path, share: Path) -> None:
    # Normalization is measured per photo: a zip of separate cells is refused by the job, which says why.
    run, _, _ = tiny_run(tmp_path / "deploy")
    with TestClient(create_app(model=run), base_url=LOCAL) as client:
        r = client.post("/api/v1/adapt?epochs=1&stain_normalize=true", content=_lab_zip(share))
        assert r.status_code == 202, r.text
        assert r.json()["stain_normalize"] is True
        deadline = time.monotonic() + 120
        while (info := client.get(r.headers["Location"]).json())["status"] in ("queued", "running"):
            assert time.monotonic() < deadline, "adapt job did not finish"
            time.sleep(0.2)
        assert info["status"] == "failed" and info["error"]["code"] == "config_invalid"
        assert "needs field photos" in info["error"]["message"]
