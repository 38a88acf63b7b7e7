"""Tests for the web service (malaria_cells.serve) with FastAPI's TestClient: every route, every kind of bad input."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from PIL import Image

from deploy_helpers import bad_and_odd_images, png_bytes, run_python, tiny_onnx, tiny_run
from malaria_cells.predict import Classifier
from malaria_cells.serve import STATIC, create_app, error_code

EXPECTED = {  # upload -> (status, error code or the label's presence)
    "empty": (422, "empty_file"),
    "text": (415, "not_an_image"),
    "truncated": (422, "unreadable_image"),
    "one_pixel": (422, "image_too_small"),
    "bomb": (422, "too_many_pixels"),
    "gray": (200, None),
    "rgba": (200, None),
    "gray16": (200, None),
}


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.getbasetemp() / "deploy"


@pytest.fixture(scope="module")
def cell(share: Path) -> Image.Image:
    path = sorted((share / "Parasitized").glob("*.webp"))[0]
    return Image.open(path).convert("RGB")


@pytest.fixture(scope="module")
def onnx_client(base: Path):
    with TestClient(create_app(model=tiny_onnx(base), max_upload_mb=1)) as client:
        yield client


@pytest.fixture(scope="module")
def torch_client(base: Path):
    with TestClient(create_app(classifier=Classifier.load(tiny_run(base)[0]))) as client:
        yield client


def _post(client: TestClient, *files: tuple[str, bytes], query: str = "") -> tuple[int, dict]:
    r = client.post(f"/api/v1/predict{query}", files=[("files", (n, d, "application/octet-stream")) for n, d in files])
    return r.status_code, r.json()


def test_health_and_model_card(onnx_client: TestClient) -> None:
    assert onnx_client.get("/api/v1/health").json() == {"status": "ok", "model_loaded": True, "version": "0.1.0"}
    card = onnx_client.get("/api/v1/model").json()
    assert card["backend"] == "onnx" and card["model"] == "custom-cnn" and card["explainable"] is False
    assert card["class_names"] == ["Uninfected", "Parasitized"] and 0 < card["threshold"] < 1
    assert card["limits"] == {"max_upload_mb": 1.0, "max_files": 32}
    assert "not for diagnosis" in card["disclaimer"]


def test_predict_one_and_many(onnx_client: TestClient, cell: Image.Image) -> None:
    status, body = _post(onnx_client, ("cell.png", png_bytes(cell)))
    assert status == 200
    (r,) = body["results"]
    assert r["ok"] and r["filename"] == "cell.png" and r["label"] in ("Parasitized", "Uninfected")
    assert 0 <= r["probability"] <= 1 and r["threshold"] == body["model"]["threshold"]
    assert (r["label"] == "Parasitized") == (r["probability"] >= r["threshold"])
    assert r["heatmap"] is None
    expected = Classifier.load(onnx_client.app.state.classifier.source).predict(cell)[0].probability
    assert r["probability"] == pytest.approx(expected, abs=1e-6)
    status, body = _post(onnx_client, *[(f"c{i}.png", png_bytes(cell.rotate(90 * i))) for i in range(3)])
    assert status == 200 and [x["filename"] for x in body["results"]] == ["c0.png", "c1.png", "c2.png"]


@pytest.mark.parametrize("case", list(EXPECTED))
def test_bad_and_unusual_images(onnx_client: TestClient, cell: Image.Image, case: str) -> None:
    status, body = _post(onnx_client, (f"{case}.png", bad_and_odd_images(cell)[case]))
    want_status, want_code = EXPECTED[case]
    assert status == want_status, body
    (r,) = body["results"]
    if want_code is None:
        assert r["ok"] and r["label"] in ("Parasitized", "Uninfected") and 0 <= r["probability"] <= 1
    else:
        assert not r["ok"] and r["status"] == status and r["error"]["code"] == want_code
        assert body["error"]["code"] == want_code and f"{case}.png" in body["error"]["message"]


def test_usable_conversions_match_the_direct_prediction(onnx_client: TestClient, cell: Image.Image) -> None:
    clf = onnx_client.app.state.classifier
    odd = bad_and_odd_images(cell)
    for case, img in (("rgba", cell), ("gray", cell.convert("L")), ("gray16", cell.convert("L"))):
        _, body = _post(onnx_client, (f"{case}.png", odd[case]))
        assert body["results"][0]["probability"] == pytest.approx(clf.predict(img)[0].probability, abs=1e-6), case


def test_upload_limit_is_configurable(onnx_client: TestClient, base: Path, cell: Image.Image) -> None:
    big = png_bytes(cell) + b"\0" * 1_100_000  # a valid PNG followed by padding: 1.1 MB
    status, body = _post(onnx_client, ("big.png", big))
    assert status == 413 and body["results"][0]["error"]["code"] == "file_too_large"
    with TestClient(create_app(model=tiny_onnx(base), max_upload_mb=2)) as roomy:
        status, body = _post(roomy, ("big.png", big))
        assert status == 200 and body["results"][0]["ok"]


def test_mixed_request_lists_every_file_with_the_first_failure_status(
    onnx_client: TestClient, cell: Image.Image
) -> None:
    status, body = _post(onnx_client, ("good.png", png_bytes(cell)), ("bad.txt", b"hello"), ("tiny.png", b""))
    assert status == 415
    assert [r["ok"] for r in body["results"]] == [True, False, False]
    assert body["results"][0]["label"] and body["results"][2]["error"]["code"] == "empty_file"
    assert body["error"]["message"].startswith("2 of 3 file(s)")


def test_request_level_errors_are_json_4xx(onnx_client: TestClient, base: Path, cell: Image.Image) -> None:
    for kwargs in (
        {},
        {"content": b"", "headers": {"content-type": "multipart/form-data; boundary=xyz"}},
        {"data": {"note": "no files here"}},
        {"content": b"just bytes", "headers": {"content-type": "application/octet-stream"}},
        {"files": [("other", ("a.png", png_bytes(cell), "image/png"))]},
    ):
        r = onnx_client.post("/api/v1/predict", **kwargs)
        assert r.status_code == 400, (kwargs, r.text)
        assert r.json()["error"]["code"] == "no_files"
    r = onnx_client.post("/api/v1/predict?heatmap=maybe", files=[("files", ("a.png", png_bytes(cell)))])
    assert r.status_code == 422 and r.json()["error"]["code"] == "invalid_request"
    r = onnx_client.post(
        "/api/v1/predict", content=b"x" * 10, headers={"content-type": "multipart/form-data; boundary=xyz"}
    )
    assert r.status_code == 400 and "error" in r.json()
    r = onnx_client.get("/api/v1/nothing")
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"
    r = onnx_client.get("/api/v1/predict")
    assert r.status_code == 405 and r.json()["error"]["code"] == "method_not_allowed"
    with TestClient(create_app(model=tiny_onnx(base), max_files=2)) as few:
        status, body = _post(few, *[(f"{i}.png", png_bytes(cell)) for i in range(3)])
        assert status == 400 and body["error"]["code"] == "too_many_files"


def test_oversized_request_body_is_refused_before_parsing(base: Path) -> None:
    with TestClient(create_app(model=tiny_onnx(base), max_upload_mb=0.01, max_files=1)) as client:
        r = client.post(
            "/api/v1/predict",
            content=b"x" * 200_000,
            headers={"content-type": "multipart/form-data; boundary=xyz"},
        )
        assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"

        def chunks():  # a well-formed multipart upload without Content-Length: counted while streaming
            yield b'--xyz\r\nContent-Disposition: form-data; name="files"; filename="a.png"\r\n\r\n'
            for _ in range(20):
                yield b"x" * 10_000
            yield b"\r\n--xyz--\r\n"

        r = client.post(
            "/api/v1/predict", content=chunks(), headers={"content-type": "multipart/form-data; boundary=xyz"}
        )
        assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"


def test_torch_model_returns_gradcam_heatmaps(torch_client: TestClient, cell: Image.Image) -> None:
    card = torch_client.get("/api/v1/model").json()
    assert card["backend"] == "torch" and card["explainable"] is True
    status, body = _post(torch_client, ("cell.png", png_bytes(cell)), query="?heatmap=true")
    assert status == 200
    heat = body["results"][0]["heatmap"]
    assert heat.startswith("data:image/png;base64,")
    import base64
    import io

    png = Image.open(io.BytesIO(base64.b64decode(heat.split(",", 1)[1])))
    assert png.format == "PNG" and png.width >= 64
    _, body = _post(torch_client, ("cell.png", png_bytes(cell)))
    assert body["results"][0]["heatmap"] is None  # only on request


def test_pages_and_docs_work_offline(onnx_client: TestClient) -> None:
    page = onnx_client.get("/")
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    assert "default-src 'self'" in page.headers["content-security-policy"]
    docs = onnx_client.get("/docs")
    assert docs.status_code == 200 and "/openapi.json" in docs.text
    spec = onnx_client.get("/openapi.json").json()
    assert {"/api/v1/predict", "/api/v1/health", "/api/v1/model"} <= set(spec["paths"])
    assert "multipart/form-data" in spec["paths"]["/api/v1/predict"]["post"]["requestBody"]["content"]
    for f in STATIC.iterdir():
        text = f.read_text(encoding="utf-8")
        assert not re.search(r"(src|href)=[\"']?(https?:)?//", text), f"{f.name} loads something external"
        assert not re.search(r"fetch\([\"'`]https?:", text), f.name
        served = onnx_client.get(f"/static/{f.name}")
        assert served.status_code == 200 and served.text == text


def test_error_codes_cover_decode_image_messages() -> None:
    assert error_code("x: empty file (0 bytes)") == (422, "empty_file")
    assert error_code("x: not an image (format not recognised)") == (415, "not_an_image")
    assert error_code("x: too many pixels (20000x20000 > 40,000,000)") == (422, "too_many_pixels")
    assert error_code("x: image too small (1x1; at least 8x8 px)") == (422, "image_too_small")
    assert error_code("x: unreadable or truncated image (broken data stream)") == (422, "unreadable_image")
    assert error_code("x: something new") == (422, "unusable_image")


def test_onnx_service_imports_no_torch(base: Path) -> None:
    code = (
        "import sys\n"
        "from fastapi.testclient import TestClient\n"
        "from malaria_cells.serve import create_app\n"
        f"with TestClient(create_app(model={str(tiny_onnx(base))!r})) as c:\n"
        "    r = c.post('/api/v1/predict', files=[('files', ('x.txt', b'hello'))])\n"
        "    assert r.status_code == 415, r.text\n"
        "    assert c.get('/api/v1/model').json()['backend'] == 'onnx'\n"
        "print('IMPORTED', sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'timm')))\n"
    )
    out = run_python(code)
    assert out.returncode == 0, out.stderr
    assert "IMPORTED []" in out.stdout
