"""Tests for ``POST /api/v1/smear`` (malaria_cells.serve): a real field photo from the IML-Malaria share through the
shipped classifier and detector, every kind of bad upload, the schema, and the limits on a real uvicorn server."""

from __future__ import annotations

import base64
import io
import socket
import time
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from deploy_helpers import field_photo, live_server, png_bytes, png_header_only
from malaria_cells import serve as serve_module
from malaria_cells.detect import SHIPPED_DETECTOR
from malaria_cells.errors import ModelError
from malaria_cells.serve import create_app, service_state

LOCAL = "http://127.0.0.1"  # TestClient's default Host (testserver) is not a served host name
COUNTED = ("Parasitized", "Uninfected")


@pytest.fixture(scope="module")
def photo() -> Path:
    return field_photo()


@pytest.fixture(scope="module")
def client():
    """The service with the shipped classifier and detector, as ``malaria-cells serve`` starts it."""
    with TestClient(create_app(), base_url=LOCAL) as c:
        yield c


@pytest.fixture(scope="module")
def answer(client: TestClient, photo: Path) -> dict:
    """The answer for the real photo, with its overlay (made once: each analysis is ~0.2 s of CPU)."""
    r = client.post("/api/v1/smear?overlay=true", files={"file": (photo.name, photo.read_bytes(), "image/jpeg")})
    assert r.status_code == 200, r.text
    return r.json()


def _smear(client: TestClient, name: str, data: bytes, query: str = "") -> tuple[int, dict]:
    r = client.post(f"/api/v1/smear{query}", files={"file": (name, data, "application/octet-stream")})
    return r.status_code, r.json()


def _decode_data_url(url: str, mime: str) -> Image.Image:
    head, _, data = url.partition(",")
    assert head == f"data:{mime};base64", head
    return Image.open(io.BytesIO(base64.b64decode(data)))


def _encoded(path: Path, fmt: str) -> bytes:
    buf = io.BytesIO()
    Image.open(path).save(buf, format=fmt)
    return buf.getvalue()


# --------------------------------------------------------------------------------------------- a real photo


def test_a_real_field_photo_gives_cells_counts_and_an_overlay(answer: dict, photo: Path) -> None:
    assert answer["filename"] == photo.name and (answer["width"], answer["height"]) == (1280, 960)
    cells = answer["cells"]
    assert len(cells) > 50  # ~115 annotated red cells in this photo
    assert [c["cell"] for c in cells] == list(range(len(cells)))
    for c in cells:
        assert set(c) == {"cell", "x", "y", "w", "h", "area", "on_border", "prob_parasitized", "label"}  # no crop
        assert 0 <= c["x"] and c["x"] + c["w"] <= 1280 and 0 <= c["y"] and c["y"] + c["h"] <= 960
        assert 20 < c["w"] < 300 and 20 < c["h"] < 300, c  # cells are ~80 px across here
        if c["label"] in COUNTED:
            assert 0 <= c["prob_parasitized"] <= 1
            threshold = answer["model"]["threshold"]
            assert (c["label"] == "Parasitized") == (c["prob_parasitized"] >= threshold), c
        else:
            assert c["label"] in ("Unknown", "Other") and c["prob_parasitized"] is None
    s = answer["summary"]
    counted = [c for c in cells if not c["on_border"] and c["label"] in COUNTED]
    assert s["cells"] == len(counted) > 50
    assert s["infected"] == sum(c["label"] == "Parasitized" for c in counted)
    assert s["border_cells"] == sum(c["on_border"] for c in cells) > 0  # a full field has cells cut by its edge
    assert s["unknown_cells"] == sum(c["label"] == "Unknown" for c in cells)
    assert s["other_objects"] == sum(c["label"] == "Other" for c in cells)
    assert s["parasitemia_pct"] == pytest.approx(100 * s["infected"] / s["cells"], abs=1e-3)
    low, high = s["ci95_pct"]
    assert 0 <= low <= s["parasitemia_pct"] <= high <= 100 and s["warning"] is None
    assert answer["model"]["detector"] == "detector.onnx" and 0 < answer["model"]["detector_threshold"] < 1
    assert answer["model"]["name"] and answer["model"]["backend"] == "onnx"
    assert "not for diagnosis" in answer["disclaimer"]
    overlay = _decode_data_url(answer["overlay"], "image/png")
    assert overlay.format == "PNG" and overlay.size == (1280, 960)


def test_the_service_answers_what_the_library_finds(client: TestClient, answer: dict, photo: Path) -> None:
    direct = service_state(client.app).analyzer.analyze(photo, name=photo.name)
    assert [(c.x, c.y, c.w, c.h, c.label) for c in direct.cells] == [
        (c["x"], c["y"], c["w"], c["h"], c["label"]) for c in answer["cells"]
    ]
    assert (answer["summary"]["cells"], answer["summary"]["infected"]) == (direct.n_cells, direct.n_infected)


def test_stain_normalization_per_request(client: TestClient, answer: dict, photo: Path) -> None:
    from malaria_cells.smear import analyze_smear

    assert answer["model"]["stain_normalized"] is False  # off unless asked
    status, body = _smear(client, photo.name, photo.read_bytes(), "?stain_normalize=true")
    assert status == 200 and body["model"]["stain_normalized"] is True
    # The same cells, other probabilities: exactly what the library gives with the same switch.
    assert [(c["x"], c["y"]) for c in body["cells"]] == [(c["x"], c["y"]) for c in answer["cells"]]
    lib = analyze_smear(photo, stain_normalize=True)
    got = [c["prob_parasitized"] for c in body["cells"] if c["prob_parasitized"] is not None]
    want = [round(c.prob_parasitized, 6) for c in lib.cells if c.prob_parasitized == c.prob_parasitized]
    assert got == pytest.approx(want, abs=1e-6) and got != [
        c["prob_parasitized"] for c in answer["cells"] if c["prob_parasitized"] is not None
    ]
    # The next request without it is not normalized (a per-request choice, not a switch on the shared analyzer).
    status, body = _smear(client, photo.name, photo.read_bytes())
    assert status == 200 and body["model"]["stain_normalized"] is False


def test_overlay_and_crops_only_on_request(client: TestClient, photo: Path) -> None:
    status, body = _smear(client, photo.name, photo.read_bytes(), "?crops=true&overlay=true&overlay_format=jpeg")
    assert status == 200
    overlay = _decode_data_url(body["overlay"], "image/jpeg")
    assert overlay.format == "JPEG" and overlay.size == (1280, 960)
    size = service_state(client.app).classifier.prep.input_size
    for c in body["cells"]:
        if c["prob_parasitized"] is None:
            assert c["crop"] is None
        else:
            crop = _decode_data_url(c["crop"], "image/png")
            assert crop.size == (size, size) and crop.mode == "RGB"
    status, body = _smear(client, photo.name, photo.read_bytes())
    assert status == 200 and "overlay" not in body and all("crop" not in c for c in body["cells"])


def test_png_and_tiff_uploads_give_the_same_cells_as_the_jpeg(client: TestClient, answer: dict, photo: Path) -> None:
    want = [(c["x"], c["y"], c["label"]) for c in answer["cells"]]
    for fmt in ("PNG", "TIFF"):  # lossless copies of the decoded JPEG: the very same pixels
        status, body = _smear(client, f"field.{fmt.lower()}", _encoded(photo, fmt))
        assert status == 200 and [(c["x"], c["y"], c["label"]) for c in body["cells"]] == want, fmt
    status, body = _smear(client, "field.webp", _encoded(photo, "WEBP"))  # lossy: close, not equal
    assert status == 200 and abs(body["summary"]["cells"] - answer["summary"]["cells"]) <= 10


def test_a_blank_photo_is_an_answer_with_a_warning_not_an_error(client: TestClient) -> None:
    status, body = _smear(client, "white.png", png_bytes(Image.new("RGB", (1280, 960), "white")), "?overlay=true")
    assert status == 200, body
    assert body["cells"] == []
    s = body["summary"]
    assert s["cells"] == s["infected"] == 0 and s["parasitemia_pct"] is None and s["ci95_pct"] is None
    assert s["warning"] and "0 cells" in s["warning"]
    assert _decode_data_url(body["overlay"], "image/png").size == (1280, 960)


def test_a_huge_photo_gets_a_smaller_overlay(client: TestClient, photo: Path) -> None:
    big = Image.open(photo).resize((3200, 2400))
    buf = io.BytesIO()
    big.save(buf, format="JPEG", quality=85)
    status, body = _smear(client, "big.jpg", buf.getvalue(), "?overlay=true&overlay_format=jpeg")
    assert status == 200 and (body["width"], body["height"]) == (3200, 2400)
    side = serve_module.OVERLAY_MAX_SIDE
    assert _decode_data_url(body["overlay"], "image/jpeg").size == (side, side * 3 // 4)


# --------------------------------------------------------------------------------------------- bad uploads


@pytest.mark.parametrize(
    ("case", "status", "code"),
    [
        ("text", 415, "not_an_image"),
        ("truncated", 422, "unreadable_image"),
        ("empty", 422, "empty_file"),
        ("one_pixel", 422, "image_too_small"),
        ("bomb", 413, "too_many_pixels"),
    ],
)
def test_bad_uploads_get_the_cell_endpoints_statuses_and_codes(
    client: TestClient, photo: Path, case: str, status: int, code: str
) -> None:
    data = {
        "text": b"this is a text file, not an image\n",
        "truncated": photo.read_bytes()[:60_000],  # a corrupt JPEG: the scan data stops a third of the way in
        "empty": b"",
        "one_pixel": png_bytes(Image.new("RGB", (1, 1))),
        "bomb": png_header_only(20000, 20000),  # 400 MP declared in a few bytes
    }[case]
    got, body = _smear(client, f"{case}.jpg", data)
    assert (got, body["error"]["code"]) == (status, code), body
    assert set(body) == {"error"} and f"{case}.jpg" in body["error"]["message"]


def test_request_level_errors(client: TestClient, photo: Path) -> None:
    data = photo.read_bytes()
    for kwargs, code in (
        ({}, "no_files"),
        ({"data": {"note": "no photo"}}, "no_files"),
        ({"files": [("files", ("a.jpg", data))]}, "no_files"),  # the cell endpoint's part name
        ({"data": {"file": "abc"}}, "not_a_file"),
        ({"files": [("file", ("a.jpg", data)), ("file", ("b.jpg", data))]}, "too_many_files"),
    ):
        r = client.post("/api/v1/smear", **kwargs)
        assert r.status_code == 400 and r.json()["error"]["code"] == code, (kwargs.keys(), r.text)
    r = client.post("/api/v1/smear?overlay_format=gif", files={"file": ("a.jpg", data)})
    assert r.status_code == 422 and r.json()["error"]["code"] == "invalid_request"
    r = client.get("/api/v1/smear")
    assert r.status_code == 405 and "POST" in r.headers["allow"]


def test_too_large_photos_get_413(photo: Path) -> None:
    data = photo.read_bytes()  # ~190 KB, 1.2 MP
    with TestClient(create_app(max_upload_mb=0.1, max_request_megapixels=1), base_url=LOCAL) as small:
        r = small.post("/api/v1/smear", files={"file": (photo.name, data)})
        assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large", r.text
        assert "one photo per request" in r.json()["error"]["message"]
        shrunk = io.BytesIO()
        Image.open(photo).save(shrunk, format="JPEG", quality=30)  # under 0.1 MB, still 1.2 MP > 1 MP
        status, body = _smear(small, "field.jpg", shrunk.getvalue())
        assert status == 413 and body["error"]["code"] == "request_too_many_pixels", body


# --------------------------------------------------------------------------------------------- schema and card


def test_openapi_names_the_smear_response_model(client: TestClient) -> None:
    spec = client.get("/openapi.json").json()
    op = spec["paths"]["/api/v1/smear"]["post"]

    def ref(status: str) -> str:
        return op["responses"][status]["content"]["application/json"]["schema"]["$ref"].rsplit("/", 1)[1]

    assert ref("200") == "SmearResponse"
    assert {ref(s) for s in ("400", "413", "415", "422", "503")} == {"ErrorResponse"}
    schemas = spec["components"]["schemas"]
    assert {"cells", "summary", "model", "overlay", "width", "height"} <= set(schemas["SmearResponse"]["properties"])
    assert {"cells", "infected", "parasitemia_pct", "ci95_pct", "border_cells", "warning"} <= set(
        schemas["SmearSummary"]["properties"]
    )
    assert {"x", "y", "w", "h", "on_border", "prob_parasitized", "label"} <= set(
        schemas["SmearCellResult"]["properties"]
    )
    assert "multipart/form-data" in op["requestBody"]["content"]
    assert {p["name"] for p in op["parameters"]} == {"overlay", "overlay_format", "crops", "stain_normalize"}
    assert "one photo per request" in op["description"] and "40 megapixels" in op["description"]


def test_model_card_names_the_detector(client: TestClient) -> None:
    card = client.get("/api/v1/model").json()
    det = card["detector"]
    assert det["source"] == "detector.onnx" and 0 < det["threshold"] < 1 and det["scale"] > 0


def test_a_missing_detector_is_a_clear_error_before_serving(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="does not exist"):
        serve_module.serve(detector=tmp_path / "nothing.onnx", port=1)  # refused before the port is bound


def test_a_detector_can_be_given_as_a_file(photo: Path) -> None:
    with TestClient(create_app(detector=SHIPPED_DETECTOR, workers=1), base_url=LOCAL) as c:
        status, body = _smear(c, photo.name, photo.read_bytes())
    assert status == 200 and len(body["cells"]) > 50


# --------------------------------------------------------------------------------------------- a real server


def test_field_photos_pass_the_admission_limit_on_a_real_server(photo: Path) -> None:
    app = create_app(max_requests=1)
    with live_server(app) as url:
        r = httpx.post(f"{url}/api/v1/smear", files={"file": (photo.name, photo.read_bytes())}, timeout=60)
        assert r.status_code == 200 and len(r.json()["cells"]) > 50
        host, port = url.removeprefix("http://").rsplit(":", 1)
        held = socket.create_connection((host, int(port)), timeout=15)  # an upload that never finishes
        held.sendall(
            b"POST /api/v1/smear HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            b"Content-Type: multipart/form-data; boundary=xyz\r\nContent-Length: 1000\r\n\r\n--xyz\r\nC"
        )
        deadline = time.monotonic() + 30
        while httpx.get(f"{url}/api/v1/health", timeout=10).json()["requests_in_flight"] != 1:
            assert time.monotonic() < deadline, "the slow upload was not admitted"
            time.sleep(0.02)
        r = httpx.post(f"{url}/api/v1/smear", files={"file": (photo.name, photo.read_bytes())}, timeout=60)
        assert r.status_code == 503 and r.json()["error"]["code"] == "server_busy" and r.headers["retry-after"]
        held.close()
        while httpx.get(f"{url}/api/v1/health", timeout=10).json()["requests_in_flight"] != 0:
            assert time.monotonic() < deadline + 30, "the abandoned upload was not released"
            time.sleep(0.02)
        health = httpx.get(f"{url}/api/v1/health", timeout=10).json()
        assert health["model_slots_busy"] == 0 and health["decodes_in_progress"] == 0
