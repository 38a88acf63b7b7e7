"""Tests for the web service (malaria_cells.serve): every route, every kind of bad input, and the service under
pressure (a big request beside a small one, admission limits, slow clients) on real uvicorn servers on loopback."""

from __future__ import annotations

import base64
import io
import re
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import numpy as np
import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from PIL import Image, ImageDraw

from deploy_helpers import bad_and_odd_images, live_server, png_bytes, run_python, tiny_onnx, tiny_run
from malaria_cells import serve as serve_module
from malaria_cells.errors import EXIT_UNAVAILABLE, EXIT_USAGE, ConfigError
from malaria_cells.heatmaps import occlusion_map, overlay
from malaria_cells.predict import Classifier
from malaria_cells.preprocess import MAX_PIXELS
from malaria_cells.serve import STATIC, ServeConfig, create_app, service_state
from malaria_cells.serve_guard import host_allowed

LOCAL = "http://127.0.0.1"  # TestClient's default Host (testserver) is not a served host name
EXPECTED = {  # upload -> (status, error code or the label's presence)
    "empty": (422, "empty_file"),
    "text": (415, "not_an_image"),
    "truncated": (422, "unreadable_image"),
    "one_pixel": (422, "image_too_small"),
    "bomb": (413, "too_many_pixels"),
    "gray": (200, "grayscale"),  # classified, but flagged: stain colour is the model's signal
    "rgba": (200, None),
    "gray16": (200, "grayscale"),
}


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.getbasetemp() / "deploy"


@pytest.fixture(scope="module")
def cell(share: Path) -> Image.Image:
    path = sorted((share / "Parasitized").glob("*.webp"))[0]
    return Image.open(path).convert("RGB")


@pytest.fixture(scope="module")
def huge_png() -> bytes:
    """6300 x 6300 px (39.7 MP, just under the per-image limit) in ~120 KB."""
    assert 6300 * 6300 <= MAX_PIXELS
    return _flat_png(6300)


@pytest.fixture(scope="module")
def onnx_client(base: Path):
    with TestClient(create_app(model=tiny_onnx(base), max_upload_mb=1), base_url=LOCAL) as client:
        yield client


@pytest.fixture(scope="module")
def torch_client(base: Path):
    with TestClient(create_app(classifier=Classifier.load(tiny_run(base)[0])), base_url=LOCAL) as client:
        yield client


def _post(client: TestClient, *files: tuple[str, bytes], query: str = "") -> tuple[int, dict]:
    r = client.post(f"/api/v1/predict{query}", files=[("files", (n, d, "application/octet-stream")) for n, d in files])
    return r.status_code, r.json()


def _flat_png(side: int) -> bytes:
    """A ``side`` x ``side`` PNG, black with one pink disc: many pixels, few bytes (a flat image compresses well)."""
    img = Image.new("RGB", (side, side))
    ImageDraw.Draw(img).ellipse((side // 2 - 60, side // 2 - 60, side // 2 + 60, side // 2 + 60), fill=(220, 150, 160))
    buf = io.BytesIO()
    img.save(buf, format="PNG", compress_level=9)
    return buf.getvalue()


def _wait_for(check: Callable[[], bool], what: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            pytest.fail(f"not within {timeout} s: {what}")
        time.sleep(0.02)


def _health(url: str) -> dict:
    return httpx.get(f"{url}/api/v1/health", timeout=10).json()


def _connect(url: str) -> socket.socket:
    host, port = url.removeprefix("http://").rsplit(":", 1)
    sock = socket.create_connection((host, int(port)), timeout=15)
    return sock


def _slow_upload(url: str, content_length: int = 1000) -> socket.socket:
    """A prediction upload that sends its headers and 9 body bytes of ``content_length``, then nothing more."""
    sock = _connect(url)
    sock.sendall(
        b"POST /api/v1/predict HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        b"Content-Type: multipart/form-data; boundary=xyz\r\n"
        b"Content-Length: " + str(content_length).encode() + b"\r\n\r\n--xyz\r\nC"
    )
    return sock


def _read_response(sock: socket.socket) -> tuple[int, dict[str, str], bytes]:
    """Status, headers (lower-case names) and body of one response read from a raw socket (waits for the close)."""
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = dict(line.split(": ", 1) for line in lines[1:])
    return int(lines[0].split()[1]), {k.lower(): v for k, v in headers.items()}, body


# --------------------------------------------------------------------------------------------- routes and inputs


def test_health_and_model_card(onnx_client: TestClient) -> None:
    health = onnx_client.get("/api/v1/health").json()
    assert {k: health[k] for k in ("status", "model_loaded", "version")} == {
        "status": "ok",
        "model_loaded": True,
        "version": "0.1.0",
    }
    assert health["requests_in_flight"] == 0 and health["model_slots"] == 1 and health["model_slots_busy"] == 0
    assert health["max_requests_in_flight"] == serve_module.DEFAULT_MAX_REQUESTS and health["refused_busy"] == 0
    card = onnx_client.get("/api/v1/model").json()
    assert card["backend"] == "onnx" and card["model"] == "custom-cnn" and card["explainable"] is False
    assert card["heatmap_method"] == "occlusion"  # no gradients in ONNX: heatmap=true paints patches over instead
    assert card["class_names"] == ["Uninfected", "Parasitized"] and 0 < card["threshold"] < 1
    assert card["source"] == "tiny.onnx"  # the name only, not the server's directories
    limits = card["limits"]
    assert limits["max_upload_mb"] == 1.0 and limits["max_files"] == 32
    assert limits["max_image_megapixels"] == MAX_PIXELS / 1e6 and limits["max_request_megapixels"] == 64.0
    assert "not for diagnosis" in card["disclaimer"]


def test_predict_one_and_many(onnx_client: TestClient, cell: Image.Image) -> None:
    status, body = _post(onnx_client, ("cell.png", png_bytes(cell)))
    assert status == 200
    (r,) = body["results"]
    assert r["ok"] and r["filename"] == "cell.png" and r["label"] in ("Parasitized", "Uninfected")
    assert 0 <= r["prob_parasitized"] <= 1 and r["threshold"] == body["model"]["threshold"]
    assert (r["label"] == "Parasitized") == (r["prob_parasitized"] >= r["threshold"])
    assert r["heatmap"] is None and "error" not in body and "warning" not in body  # shipped model: no warning
    expected = Classifier.load(service_state(onnx_client.app).classifier.source).predict(cell)[0].probability
    assert r["prob_parasitized"] == pytest.approx(expected, abs=1e-6)
    # More files than one model batch (8): batched model calls give the same answers, in upload order.
    many = [(f"c{i}.png", png_bytes(cell.rotate(90 * i))) for i in range(11)]
    status, body = _post(onnx_client, *many)
    assert status == 200 and [x["filename"] for x in body["results"]] == [n for n, _ in many]
    direct = Classifier.load(service_state(onnx_client.app).classifier.source).predict([d for _, d in many])
    for got, want in zip(body["results"], direct, strict=True):
        assert got["prob_parasitized"] == pytest.approx(want.probability, abs=1e-6)


@pytest.mark.parametrize("case", list(EXPECTED))
def test_bad_and_unusual_images(onnx_client: TestClient, cell: Image.Image, case: str) -> None:
    status, body = _post(onnx_client, (f"{case}.png", bad_and_odd_images(cell)[case]))
    want_status, want_code = EXPECTED[case]
    assert status == want_status, body
    (r,) = body["results"]
    if want_status == 200:
        assert r["ok"] and 0 <= r["prob_parasitized"] <= 1 and r["raw_label"] in ("Parasitized", "Uninfected")
        assert r["flag"] == (want_code or "")
        assert r["label"] == ("Unknown" if want_code else r["raw_label"])  # a flagged input is not given a label
    else:
        assert not r["ok"] and r["status"] == status and r["error"]["code"] == want_code
        assert body["error"]["code"] == want_code and f"{case}.png" in body["error"]["message"]


def test_status_and_code_come_from_the_error_object_not_its_words(onnx_client: TestClient) -> None:
    # The old error_code() searched the message and answered 422 for "too many pixels"; ImageError says 413.
    assert not hasattr(serve_module, "error_code")
    bomb = bad_and_odd_images(Image.new("RGB", (8, 8)))["bomb"]  # a 20000 x 20000 header: 400 MP
    status, body = _post(onnx_client, ("bomb.png", bomb))
    assert status == 413 and body["results"][0]["error"]["code"] == "too_many_pixels"


def test_bomb_error_quotes_our_limit(onnx_client: TestClient, cell: Image.Image) -> None:
    _, body = _post(onnx_client, ("bomb.png", bad_and_odd_images(cell)["bomb"]))
    message = body["results"][0]["error"]["message"]
    assert f"{MAX_PIXELS:,}" in message and "178,956,970" not in message  # ours, not Pillow's own bomb limit


def test_usable_conversions_match_the_direct_prediction(onnx_client: TestClient, cell: Image.Image) -> None:
    clf = service_state(onnx_client.app).classifier
    odd = bad_and_odd_images(cell)
    for case, img in (("rgba", cell), ("gray", cell.convert("L")), ("gray16", cell.convert("L"))):
        _, body = _post(onnx_client, (f"{case}.png", odd[case]))
        assert body["results"][0]["prob_parasitized"] == pytest.approx(clf.predict(img)[0].probability, abs=1e-6), case


def test_upload_limit_is_configurable(onnx_client: TestClient, base: Path, cell: Image.Image) -> None:
    big = png_bytes(cell) + b"\0" * 1_100_000  # a valid PNG followed by padding: 1.1 MB
    status, body = _post(onnx_client, ("big.png", big))
    assert status == 413 and body["results"][0]["error"]["code"] == "file_too_large"
    with TestClient(create_app(model=tiny_onnx(base), max_upload_mb=2), base_url=LOCAL) as roomy:
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
    with TestClient(create_app(model=tiny_onnx(base), max_files=2), base_url=LOCAL) as few:
        status, body = _post(few, *[(f"{i}.png", png_bytes(cell)) for i in range(3)])
        assert status == 400 and body["error"]["code"] == "too_many_files"


def test_405_answers_say_which_methods_are_allowed(onnx_client: TestClient) -> None:
    for method, path, allowed in (
        ("GET", "/api/v1/predict", {"POST"}),
        ("POST", "/api/v1/health", {"GET"}),
        ("DELETE", "/api/v1/model", {"GET"}),
    ):
        r = onnx_client.request(method, path)
        assert r.status_code == 405 and r.json()["error"]["code"] == "method_not_allowed"
        assert allowed <= {m.strip() for m in r.headers["allow"].split(",")}, (method, path, r.headers)


def test_a_part_without_a_filename_gets_a_clear_error(onnx_client: TestClient, cell: Image.Image) -> None:
    headers = {"content-type": "multipart/form-data; boundary=xyz"}
    plain = b'--xyz\r\nContent-Disposition: form-data; name="files"\r\n\r\nabc\r\n--xyz--\r\n'
    r = onnx_client.post("/api/v1/predict", content=plain, headers=headers)
    assert r.status_code == 400 and r.json()["error"]["code"] == "not_a_file", r.text
    message = r.json()["error"]["message"]
    assert "filename" in message and "class" not in message and "UploadFile" not in message
    # An empty filename is still a file: it is classified and named by its position.
    empty_name = (
        b'--xyz\r\nContent-Disposition: form-data; name="files"; filename=""\r\nContent-Type: image/png\r\n\r\n'
        + png_bytes(cell)
        + b"\r\n--xyz--\r\n"
    )
    r = onnx_client.post("/api/v1/predict", content=empty_name, headers=headers)
    assert r.status_code == 200 and r.json()["results"][0]["filename"] == "file 1"


def test_oversized_request_body_is_refused_before_parsing(base: Path) -> None:
    with TestClient(create_app(model=tiny_onnx(base), max_upload_mb=0.01, max_files=1), base_url=LOCAL) as client:
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
    png = Image.open(io.BytesIO(base64.b64decode(heat.split(",", 1)[1])))
    assert png.format == "PNG" and png.width >= 64
    _, body = _post(torch_client, ("cell.png", png_bytes(cell)))
    assert body["results"][0]["heatmap"] is None  # only on request
    assert card["heatmap_method"] == "grad-cam"


def test_onnx_model_returns_occlusion_heatmaps(onnx_client: TestClient, cell: Image.Image) -> None:
    bad = b"not an image"
    status, body = _post(onnx_client, ("cell.png", png_bytes(cell)), ("notes.png", bad), query="?heatmap=true")
    assert status == 415
    good, failed = body["results"]
    assert failed["ok"] is False and "heatmap" not in failed
    heat = good["heatmap"]
    assert heat is not None and heat.startswith("data:image/png;base64,")
    png = Image.open(io.BytesIO(base64.b64decode(heat.split(",", 1)[1])))
    size = onnx_client.get("/api/v1/model").json()["preprocessing"]["input_size"]
    assert png.format == "PNG" and png.size == (3 * size, 3 * size)  # the model input, drawn 3x
    # The overlay is the occlusion map of the very input the model classified.
    clf = service_state(onnx_client.app).classifier
    u8 = clf.prepare(cell)
    expected, prob = occlusion_map(clf, u8)
    assert prob == pytest.approx(good["prob_parasitized"], abs=1e-6)
    assert np.array_equal(np.asarray(png.convert("RGB")), overlay(u8, expected, scale=3))
    _, body = _post(onnx_client, ("cell.png", png_bytes(cell)))
    assert body["results"][0]["heatmap"] is None  # only on request


def test_pages_and_docs_work_offline(onnx_client: TestClient) -> None:
    page = onnx_client.get("/")
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    assert "default-src 'self'" in page.headers["content-security-policy"]
    docs = onnx_client.get("/docs")
    assert docs.status_code == 200 and "/openapi.json" in docs.text
    redoc = onnx_client.get("/redoc")  # FastAPI's other documentation address: the same local page, no CDN
    assert redoc.status_code == 200 and redoc.text == docs.text
    assert "default-src 'self'" in redoc.headers["content-security-policy"]
    spec = onnx_client.get("/openapi.json").json()
    assert {"/api/v1/predict", "/api/v1/health", "/api/v1/model"} <= set(spec["paths"])
    assert "multipart/form-data" in spec["paths"]["/api/v1/predict"]["post"]["requestBody"]["content"]
    for f in STATIC.iterdir():
        text = f.read_text(encoding="utf-8")
        assert not re.search(r"(src|href)=[\"']?(https?:)?//", text), f"{f.name} loads something external"
        assert not re.search(r"fetch\([\"'`]https?:", text), f.name
        served = onnx_client.get(f"/static/{f.name}")
        assert served.status_code == 200 and served.text == text


def test_openapi_shows_the_response_schemas_and_the_limits(onnx_client: TestClient) -> None:
    spec = onnx_client.get("/openapi.json").json()
    schemas = spec["components"]["schemas"]

    def ref(path: str, method: str, status: str) -> str:
        schema = spec["paths"][path][method]["responses"][status]["content"]["application/json"]["schema"]
        return schema["$ref"].rsplit("/", 1)[1]  # a named schema, not {} or a bare object

    assert ref("/api/v1/health", "get", "200") == "HealthResponse"
    assert ref("/api/v1/model", "get", "200") == "ModelInfo"
    assert ref("/api/v1/predict", "post", "200") == "PredictResponse"
    assert ref("/api/v1/predict", "post", "400") == "ErrorResponse"
    assert {"status", "requests_in_flight", "model_queue", "model_slots_busy"} <= set(
        schemas["HealthResponse"]["properties"]
    )
    assert {"results", "model", "error"} <= set(schemas["PredictResponse"]["properties"])
    fields = set(schemas["FileSuccess"]["properties"])
    assert {"filename", "label", "prob_parasitized", "threshold", "heatmap"} <= fields
    assert {"max_files", "max_upload_mb", "max_request_megapixels"} <= set(schemas["ServiceLimits"]["properties"])
    text = spec["paths"]["/api/v1/predict"]["post"]["description"]
    assert "at most 32 files per request" in text and "1 MB per file" in text and "64 megapixels per request" in text


# --------------------------------------------------------------------------------------------- limits and pressure


def test_a_request_may_decode_only_so_many_megapixels(base: Path, cell: Image.Image) -> None:
    flat = png_bytes(Image.new("RGB", (800, 800), (200, 120, 130)))  # 0.64 MP each
    with TestClient(create_app(model=tiny_onnx(base), max_request_megapixels=1), base_url=LOCAL) as client:
        status, body = _post(client, ("a.png", flat), ("b.png", flat), ("c.png", flat), ("cell.png", png_bytes(cell)))
    assert status == 413
    codes = [r["ok"] or r["error"]["code"] for r in body["results"]]
    assert codes == [True, "request_too_many_pixels", "request_too_many_pixels", True]  # the small cell still fits
    assert "1 megapixels" in body["results"][1]["error"]["message"]


def test_a_request_may_decode_only_so_long(base: Path) -> None:
    big = _flat_png(4000)  # 16 MP: far over 10 ms to decode and letterbox
    app = create_app(model=tiny_onnx(base), decode_timeout_s=0.01, decode_threads=2)  # one file at a time
    with TestClient(app, base_url=LOCAL) as client:
        r = client.post("/api/v1/predict", files=[("files", (f"{i}.png", big)) for i in range(3)])
    body = r.json()
    assert body["results"][0]["ok"], body  # started within the budget: finished
    assert [x["error"]["code"] for x in body["results"][1:]] == ["decode_timeout", "decode_timeout"]
    assert r.status_code == 503 and r.headers["retry-after"]


def test_by_default_a_request_decodes_one_huge_image_not_32(onnx_client: TestClient, huge_png: bytes) -> None:
    # 32 x 39.7 MP used to be decoded in one go (~27 s holding the model); now 64 MP per request admit one of them.
    status, body = _post(onnx_client, *[(f"huge{i}.png", huge_png) for i in range(32)])
    assert status == 413 and body["results"][0]["ok"]
    assert {r["error"]["code"] for r in body["results"][1:]} == {"request_too_many_pixels"}


def test_a_big_request_does_not_stall_a_small_one(base: Path, cell: Image.Image, huge_png: bytes) -> None:
    big = huge_png
    # A pixel budget that lets all 8 through, so the big request decodes for seconds.
    app = create_app(model=tiny_onnx(base), max_request_megapixels=400, decode_threads=2)
    finished: list[tuple[str, httpx.Response]] = []
    with live_server(app) as url:

        def post_big() -> None:
            files = [("files", (f"big{i}.png", big, "image/png")) for i in range(8)]
            finished.append(("big", httpx.post(f"{url}/api/v1/predict", files=files, timeout=300)))

        thread = threading.Thread(target=post_big)
        thread.start()
        seen: dict = {}

        def big_is_decoding() -> bool:
            seen.update(_health(url))
            return seen["requests_in_flight"] == 1 and seen["decodes_in_progress"] >= 1

        _wait_for(big_is_decoding, "the big request decoding")
        assert seen["status"] in ("ok", "busy") and seen["model_loaded"]
        small = httpx.post(f"{url}/api/v1/predict", files={"files": ("cell.png", png_bytes(cell))}, timeout=300)
        finished.append(("small", small))
        thread.join(timeout=300)
    assert [name for name, _ in finished] == ["small", "big"]  # the small one did not wait for the big one
    assert small.status_code == 200 and small.json()["results"][0]["ok"]
    big_response = finished[1][1]
    assert big_response.status_code == 200 and all(r["ok"] for r in big_response.json()["results"])


def test_admission_limit_answers_503_with_retry_after(base: Path, cell: Image.Image) -> None:
    app = create_app(model=tiny_onnx(base), max_requests=2)
    with live_server(app) as url:
        held = [_slow_upload(url), _slow_upload(url)]  # two uploads in progress: the limit
        _wait_for(lambda: _health(url)["requests_in_flight"] == 2, "two uploads admitted")
        health = _health(url)
        assert health["status"] == "saturated"
        r = httpx.post(f"{url}/api/v1/predict", files={"files": ("cell.png", png_bytes(cell))}, timeout=30)
        assert r.status_code == 503 and r.json()["error"]["code"] == "server_busy"
        assert int(r.headers["retry-after"]) >= 1
        assert _health(url)["refused_busy"] == 1
        for sock in held:  # clients that give up free their places
            sock.close()
        _wait_for(lambda: _health(url)["requests_in_flight"] == 0, "the abandoned uploads released")
        r = httpx.post(f"{url}/api/v1/predict", files={"files": ("cell.png", png_bytes(cell))}, timeout=30)
        assert r.status_code == 200


def test_upload_bytes_in_flight_are_bounded(base: Path, cell: Image.Image) -> None:
    # Largest request: 2 x (0.1 MB + 64 KiB) = 0.33 MB; at most 0.4 MB of uploads at once.
    app = create_app(model=tiny_onnx(base), max_upload_mb=0.1, max_files=2, max_inflight_mb=0.4)
    with live_server(app) as url:
        held = _slow_upload(url, content_length=300_000)
        _wait_for(lambda: _health(url)["upload_mb_in_flight"] == 0.3, "the slow upload admitted")
        padded = png_bytes(cell) + b"\0" * 90_000  # ~0.1 MB each, 0.18 MB together: over what is left
        r = httpx.post(f"{url}/api/v1/predict", files=[("files", (f"{i}.png", padded)) for i in range(2)], timeout=30)
        assert r.status_code == 503 and r.json()["error"]["code"] == "server_busy" and "retry-after" in r.headers
        r = httpx.post(f"{url}/api/v1/predict", files={"files": ("cell.png", png_bytes(cell))}, timeout=30)
        assert r.status_code == 200  # a small one still fits
        held.close()


def test_a_slow_body_gets_408(base: Path) -> None:
    with live_server(create_app(model=tiny_onnx(base), body_timeout_s=1)) as url:
        sock = _slow_upload(url)
        t0 = time.monotonic()
        status, headers, body = _read_response(sock)  # the server answers and closes; no 15 s socket timeout
        assert status == 408 and b'"request_timeout"' in body
        assert time.monotonic() - t0 < 10 and headers.get("connection") == "close"
        sock.close()


def test_slow_request_headers_get_the_connection_closed(base: Path) -> None:
    with live_server(create_app(model=tiny_onnx(base), header_timeout_s=1)) as url:
        sock = _connect(url)
        sock.sendall(b"GET /api/v1/health HTTP/1.1\r\nHost: 127.0.0.1\r\n")  # and never the blank line
        t0 = time.monotonic()
        assert sock.recv(1024) == b""  # closed by the server, not by the 15 s socket timeout
        assert time.monotonic() - t0 < 10
        sock.close()
        assert _health(url)["model_loaded"]  # complete requests are served as before


def test_host_header_must_name_this_server(base: Path) -> None:
    app = create_app(model=tiny_onnx(base), allowed_hosts=["cells.lab.example"])
    with TestClient(app, base_url=LOCAL) as client:
        for host in ("evil.example", "127.0.0.1.evil.example", "cells.lab.example.evil.example", ""):
            r = client.get("/api/v1/health", headers={"host": host})
            assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_host", host
        for host in ("localhost:8000", "127.0.0.1", "[::1]:8000", "cells.lab.example:8000", "LOCALHOST"):
            assert client.get("/api/v1/health", headers={"host": host}).status_code == 200, host
    assert host_allowed("a.lab.org", ["*.lab.org"]) and not host_allowed("lab.org.x", [])


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "malaria_cells.cli", "serve", *args], capture_output=True, text=True, timeout=120
    )


@pytest.mark.parametrize(
    "args",
    [["--max-files", "0"], ["--max-upload-mb", "-1"], ["--port", "70000"], ["--workers", "0"]],
    ids=lambda a: " ".join(a),
)
def test_serve_refuses_bad_options_in_one_line(args: list[str]) -> None:
    out = _cli(*args)
    assert out.returncode == EXIT_USAGE, out
    lines = [line for line in (out.stdout + out.stderr).splitlines() if line.strip()]
    assert len(lines) == 1 and "error" in lines[0] and args[0] in lines[0], lines
    assert "Traceback" not in out.stderr


def test_library_refuses_bad_limits_and_ports() -> None:
    for bad in ({"max_files": 0}, {"max_upload_mb": -1}, {"max_request_megapixels": 0}, {"body_timeout_s": 0}):
        with pytest.raises(ConfigError):
            create_app(**bad)
    with pytest.raises(ConfigError, match="port"):
        serve_module.serve(port=70000)
    with pytest.raises(ConfigError, match="largest request"):
        ServeConfig(max_inflight_mb=1)  # less than one 32 x 10 MB request


def test_serve_says_when_the_port_is_taken(base: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        out = _cli("--model", str(tiny_onnx(base)), "--port", str(taken.getsockname()[1]))
    assert out.returncode == EXIT_UNAVAILABLE, out
    assert "in use" in out.stdout + out.stderr and "Traceback" not in out.stderr


def test_onnx_service_imports_no_torch(base: Path, share: Path) -> None:
    code = (
        "import sys\n"
        "from fastapi.testclient import TestClient\n"
        "from malaria_cells.serve import create_app\n"
        f"with TestClient(create_app(model={str(tiny_onnx(base))!r}), base_url='http://localhost') as c:\n"
        "    r = c.post('/api/v1/predict', files=[('files', ('x.txt', b'hello'))])\n"
        "    assert r.status_code == 415, r.text\n"
        f"    cell = open({str(sorted((share / 'Parasitized').glob('*.webp'))[0])!r}, 'rb').read()\n"
        "    r = c.post('/api/v1/predict?heatmap=true', files=[('files', ('cell.webp', cell))])\n"
        "    assert r.json()['results'][0]['heatmap'].startswith('data:image/png'), r.text\n"
        "    assert c.get('/api/v1/model').json()['backend'] == 'onnx'\n"
        "print('IMPORTED', sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'timm')))\n"
    )
    out = run_python(code)
    assert out.returncode == 0, out.stderr
    assert "IMPORTED []" in out.stdout


def test_app_state_is_one_typed_object(onnx_client: TestClient) -> None:
    app: FastAPI = onnx_client.app  # type: ignore[assignment]
    state = service_state(app)
    assert isinstance(state, serve_module.ServiceState) and isinstance(state.config, ServeConfig)
    assert not hasattr(app.state, "classifier") and not hasattr(app.state, "model_slots")


def test_tta_serving_uses_the_models_tta_threshold(base: Path, cell: Image.Image, tmp_path: Path) -> None:
    import onnx

    from malaria_cells.errors import ModelError
    from malaria_cells.predict import dihedral_views

    # Without a stored TTA threshold the service refuses to start with --tta rather than guess one.
    with pytest.raises(ModelError, match="no TTA threshold"):
        with TestClient(create_app(model=tiny_onnx(base), tta=True), base_url=LOCAL):
            pass
    # A copy of the model that carries one (as a final fit of `reproduce --cv` exports it).
    m = onnx.load(str(tiny_onnx(base)))
    m.metadata_props.add(key="tta_threshold", value="0.42")
    path = tmp_path / "tta.onnx"
    onnx.save(m, str(path))
    png = io.BytesIO()
    cell.save(png, format="PNG")
    with TestClient(create_app(model=path, tta=True), base_url=LOCAL) as client:
        status, body = _post(client, ("c.png", png.getvalue()))
    assert status == 200 and body["results"][0]["threshold"] == 0.42
    plain = Classifier.load(path)
    u8, _ = plain.prepare_checked(cell)
    expected = float(plain.predict_prepared(dihedral_views(u8[None])).mean())
    assert body["results"][0]["prob_parasitized"] == pytest.approx(expected, abs=1e-5)
