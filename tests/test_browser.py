"""End to end in a real browser: the real server (uvicorn in a subprocess) and Debian's chromium driven headless by
Playwright. Needs /usr/bin/chromium (``apt-get install chromium``), the NIH share and the IML-Malaria field photos:
any missing = a failure."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from deploy_helpers import field_photo, tiny_run

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
PHONE = {"width": 390, "height": 844}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _serve(tmp_path_factory: pytest.TempPathFactory, *args: str) -> Iterator[str]:
    """``malaria-cells serve ARGS`` on a free port until the generator is closed; yields its URL."""
    port = _free_port()
    log = tmp_path_factory.mktemp("server") / "server.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "malaria_cells.cli", "serve", *args, "--port", str(port)],
            stdout=out,
            stderr=subprocess.STDOUT,
            env={**os.environ, "MALARIA_CELLS_QUIET": "1"},
        )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            if proc.poll() is not None:
                pytest.fail(f"server exited with {proc.returncode}:\n{log.read_text()}")
            try:
                if httpx.get(f"{url}/api/v1/health", timeout=2).json().get("model_loaded"):
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"server not up after 120 s:\n{log.read_text()}")
            time.sleep(0.3)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """``malaria-cells serve`` with the tiny torch run (so heatmaps are Grad-CAM); yields its URL."""
    run, _, _ = tiny_run(tmp_path_factory.getbasetemp() / "deploy")
    yield from _serve(tmp_path_factory, "--model", str(run))


@pytest.fixture(scope="module")
def shipped_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """``malaria-cells serve`` as a user starts it: the shipped ONNX model (heatmaps by occlusion); yields its URL."""
    yield from _serve(tmp_path_factory)


@pytest.fixture(scope="module")
def browser():
    assert CHROMIUM.exists(), f"{CHROMIUM} is missing: install Debian's chromium (apt-get install -y chromium)"
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield b
        b.close()


def _page(browser, url: str, viewport: dict | None = None):
    context = browser.new_context(viewport=viewport or {"width": 1200, "height": 900})
    page = context.new_page()
    requests: list[str] = []
    page.on("request", lambda r: requests.append(r.url))
    page.goto(url)
    return page, requests


def _only_local(requests: list[str], url: str) -> None:
    outside = [r for r in requests if not r.startswith((url, "data:", "blob:"))]
    assert not outside, f"the page loaded something from elsewhere: {outside}"


def test_upload_a_real_cell_and_read_the_result(server: str, browser, share: Path, tmp_path: Path) -> None:
    cell = sorted((share / "Parasitized").glob("*.webp"))[0]
    api = httpx.post(f"{server}/api/v1/predict", files={"files": (cell.name, cell.read_bytes())}, timeout=60).json()
    expected = api["results"][0]
    page, requests = _page(browser, server)
    page.locator("#model", has_text="Model:").wait_for()
    assert "custom-cnn" in page.inner_text("#model")
    page.set_input_files("#files", str(cell))
    card = page.locator("[data-testid=result][data-state=done]")
    card.wait_for(timeout=60_000)
    assert card.get_attribute("data-label") == expected["label"]
    assert float(card.get_attribute("data-probability")) == pytest.approx(expected["prob_parasitized"], abs=1e-6)
    assert card.locator("[data-testid=label]").inner_text() == expected["label"]
    shown = card.locator("[data-testid=probability]").inner_text()
    assert shown == f"P(Parasitized) = {expected['prob_parasitized']:.3f}"
    heat = card.locator("[data-testid=heatmap]")
    heat.wait_for()
    assert heat.evaluate("img => img.complete && img.naturalWidth > 0")
    assert card.locator("figcaption").all_inner_texts() == ["Grad-CAM"]  # the preview has no redundant caption
    _threshold_tick_is_labelled(card, expected["threshold"])
    assert "1 classified" in page.inner_text("#status")
    # A desktop can drop files: the zone says so (and says click, not tap).
    drop = page.inner_text("#drop")
    assert "Drop cell images here" in drop and "click to choose" in drop and "Choose cell images" not in drop
    page.screenshot(path=str(tmp_path / "desktop.png"), full_page=True)
    _only_local(requests, server)


def _threshold_tick_is_labelled(card, threshold: float) -> None:
    """The bar's threshold tick carries its value, under the tick and inside the card."""
    label = card.locator("[data-testid=threshold]")
    assert label.inner_text() == f"threshold {threshold:.3f}"
    tick, box, outer = card.locator(".thr").bounding_box(), label.bounding_box(), card.bounding_box()
    assert tick and box and outer
    assert box["x"] >= outer["x"] and box["x"] + box["width"] <= outer["x"] + outer["width"], (box, outer)
    assert box["y"] >= tick["y"] + tick["height"] - 1  # below the bar, not over it
    if 0.25 <= threshold <= 0.75:  # centred under the tick (near an end it is aligned to that end)
        assert abs(box["x"] + box["width"] / 2 - (tick["x"] + tick["width"] / 2)) <= 2, (box, tick)


def test_shipped_onnx_model_shows_occlusion_heatmaps(shipped_server: str, browser, share: Path, tmp_path: Path) -> None:
    cell = sorted((share / "Parasitized").glob("*.webp"))[0]
    api = httpx.post(
        f"{shipped_server}/api/v1/predict?heatmap=true", files={"files": (cell.name, cell.read_bytes())}, timeout=60
    ).json()
    expected = api["results"][0]
    assert api["model"]["backend"] == "onnx" and expected["heatmap"].startswith("data:image/png;base64,")
    page, requests = _page(browser, shipped_server)
    page.locator("#model", has_text="Model:").wait_for()
    assert "heatmaps: occlusion map" in page.inner_text("#model")
    page.set_input_files("#files", str(cell))
    card = page.locator("[data-testid=result][data-state=done]")
    card.wait_for(timeout=60_000)
    heat = card.locator("[data-testid=heatmap]")
    heat.wait_for()
    assert heat.get_attribute("src") == expected["heatmap"]  # the page shows the API's heatmap, nothing else
    assert heat.evaluate("img => img.complete && img.naturalWidth > 0")
    assert card.locator("figcaption").all_inner_texts() == ["occlusion map"]
    _threshold_tick_is_labelled(card, expected["threshold"])
    _only_local(requests, shipped_server)


def test_bad_file_shows_its_error_and_good_ones_still_classify(
    server: str, browser, share: Path, tmp_path: Path
) -> None:
    good = sorted((share / "Uninfected").glob("*.webp"))[0]
    bad = tmp_path / "notes.png"
    bad.write_text("not an image")
    page, requests = _page(browser, server)
    page.set_input_files("#files", [str(good), str(bad)])
    page.locator("[data-testid=result][data-state=error]").wait_for(timeout=60_000)
    page.locator("[data-testid=result][data-state=done]").wait_for(timeout=60_000)
    assert "not an image" in page.locator("[data-testid=error]").inner_text()
    assert "1 could not be read" in page.inner_text("#status")
    _only_local(requests, server)


def test_phone_width_layout_and_screenshot(server: str, browser, share: Path, tmp_path: Path) -> None:
    cells = sorted((share / "Parasitized").glob("*.webp"))[:2] + sorted((share / "Uninfected").glob("*.webp"))[:1]
    page, requests = _page(browser, server, viewport=PHONE)
    page.set_input_files("#files", [str(c) for c in cells])
    # Locator waits, not wait_for_function: the page's CSP (script-src 'self') forbids the eval that polling uses.
    page.locator("[data-testid=result][data-state=done]").nth(2).wait_for(timeout=60_000)
    assert page.locator("[data-testid=result][data-state=done]").count() == 3
    overflow = page.evaluate("document.documentElement.scrollWidth - window.innerWidth")
    assert overflow <= 0, f"page is {overflow}px wider than a phone screen"
    box = page.locator("#drop").bounding_box()
    assert box and box["width"] <= PHONE["width"] and box["x"] >= 0
    # Nothing can be dropped on a phone: the zone says choose instead.
    drop = page.inner_text("#drop")
    assert "Choose cell images" in drop and "Drop" not in drop and "click" not in drop, drop
    first = page.locator("[data-testid=result][data-state=done]").first
    assert first.locator("figcaption").all_inner_texts() == ["Grad-CAM"]
    _threshold_tick_is_labelled(first, httpx.get(f"{server}/api/v1/model", timeout=10).json()["threshold_in_use"])
    shot = tmp_path / "phone.png"
    page.screenshot(path=str(shot), full_page=True)
    assert shot.stat().st_size > 10_000
    print(f"phone screenshot: {shot}")
    _only_local(requests, server)


def _tap_target(body: dict) -> dict:
    """A counted cell to tap: infected if any, with no other box centre near its own (the tap is unambiguous)."""
    counted = [c for c in body["cells"] if not c["on_border"] and c["label"] in ("Parasitized", "Uninfected")]
    centre = {c["cell"]: (c["x"] + c["w"] / 2, c["y"] + c["h"] / 2) for c in body["cells"]}

    def alone(c: dict) -> bool:
        x, y = centre[c["cell"]]
        return all((x - u) ** 2 + (y - v) ** 2 > 30**2 for i, (u, v) in centre.items() if i != c["cell"])

    ranked = sorted(counted, key=lambda c: (c["label"] != "Parasitized", -c["prob_parasitized"]))
    return next(c for c in ranked if alone(c))


def test_field_photo_mode_on_a_phone(server: str, browser, tmp_path: Path) -> None:
    photo = field_photo()
    api = httpx.post(f"{server}/api/v1/smear", files={"file": (photo.name, photo.read_bytes())}, timeout=60).json()
    summary = api["summary"]
    page, requests = _page(browser, server, viewport=PHONE)
    page.click("#tab-field")
    assert page.locator("#mode-field").is_visible() and not page.locator("#mode-cells").is_visible()
    field_drop = page.inner_text("#field-drop")
    assert "Choose or take a field photo" in field_drop and "Drop" not in field_drop, field_drop
    assert page.locator(".notice", has_text="not for diagnosis").is_visible()  # the disclaimer stays in view
    page.set_input_files("#photo", str(photo))
    page.locator("#field-result[data-state=done]").wait_for(timeout=60_000)
    overlay = page.locator("[data-testid=overlay]")
    assert overlay.evaluate("img => img.complete && img.naturalWidth === 1280 && img.naturalHeight === 960")
    text = page.inner_text("[data-testid=parasitemia]")
    assert f"{summary['parasitemia_pct']:.2f} %" in text and f"{summary['ci95_pct'][1]:.2f} %" in text, text
    counts = page.inner_text("[data-testid=counts]")
    assert f"{summary['infected']} infected of {summary['cells']} counted" in counts, counts
    assert not page.locator("[data-testid=warning]").is_visible()  # a good field: no warning
    # Tap the middle of a cell's box on the overlay as drawn (scaled to the phone's width).
    cell = _tap_target(api)
    box = overlay.bounding_box()
    assert box and box["x"] >= 0 and box["x"] + box["width"] <= PHONE["width"], box  # the photo fits the width
    k = box["width"] / api["width"]
    # A position inside the element: Playwright scrolls it into view first (the photo is below a phone's fold).
    overlay.click(position={"x": (cell["x"] + cell["w"] / 2) * k, "y": (cell["y"] + cell["h"] / 2) * k})
    detail = page.locator("[data-testid=cell-detail]")
    page.locator("[data-testid=cell-probability]").wait_for()
    assert detail.get_attribute("data-cell") == str(cell["cell"])
    assert float(detail.get_attribute("data-probability")) == pytest.approx(cell["prob_parasitized"], abs=1e-6)
    shown = page.inner_text("[data-testid=cell-probability]")
    assert shown == f"P(Parasitized) = {cell['prob_parasitized']:.3f}"
    assert page.inner_text("[data-testid=cell-label]") == cell["label"]
    assert page.locator("#crop").is_visible()
    overflow = page.evaluate("document.documentElement.scrollWidth - window.innerWidth")
    assert overflow <= 0, f"page is {overflow}px wider than a phone screen"
    shot = tmp_path / "field-phone.png"
    page.screenshot(path=str(shot), full_page=True)
    assert shot.stat().st_size > 50_000
    print(f"field photo phone screenshot: {shot}")
    # A bad upload shows the server's own message.
    bad = tmp_path / "field.jpg"
    bad.write_text("not a photo")
    page.set_input_files("#photo", str(bad))
    page.locator("[data-testid=field-error]").wait_for(timeout=60_000)
    assert "field.jpg: not an image" in page.inner_text("[data-testid=field-error]")
    assert not page.locator("#field-result").is_visible()
    _only_local(requests, server)


def test_stain_normalization_box_asks_the_server_for_it(server: str, browser, tmp_path: Path) -> None:
    photo = field_photo()
    files = {"file": (photo.name, photo.read_bytes())}
    api = httpx.post(f"{server}/api/v1/smear?stain_normalize=true", files=files, timeout=60).json()
    assert api["model"]["stain_normalized"] is True
    page, requests = _page(browser, server, viewport=PHONE)
    page.click("#tab-field")
    box = page.locator("[data-testid=stain-normalize]")
    assert box.is_visible() and not box.is_checked()  # the served model's own choice: off
    box.check()
    page.set_input_files("#photo", str(photo))
    page.locator("#field-result[data-state=done]").wait_for(timeout=60_000)
    smear = [r for r in requests if "/api/v1/smear" in r]
    assert len(smear) == 1 and "stain_normalize=true" in smear[0], smear
    counts = page.inner_text("[data-testid=counts]")
    assert f"{api['summary']['infected']} infected of {api['summary']['cells']} counted" in counts, counts
    overflow = page.evaluate("document.documentElement.scrollWidth - window.innerWidth")
    assert overflow <= 0, f"page is {overflow}px wider than a phone screen"
    shot = tmp_path / "field-stain-phone.png"
    page.screenshot(path=str(shot))
    print(f"stain option screenshot: {shot}")


def test_field_mode_is_kept_in_the_address(server: str, browser) -> None:
    page, _ = _page(browser, f"{server}/#field")
    assert page.locator("#mode-field").is_visible()
    assert page.get_attribute("#tab-field", "aria-selected") == "true"
    page.click("#tab-cells")
    assert page.locator("#drop").is_visible() and not page.locator("#mode-field").is_visible()


@pytest.mark.parametrize("path", ["/docs", "/redoc"])
def test_docs_page_renders_offline(server: str, browser, path: str) -> None:
    page, requests = _page(browser, f"{server}{path}")
    page.locator("[data-testid=route]").nth(2).wait_for()
    text = page.inner_text("#api")
    for route in ("POST /api/v1/predict", "POST /api/v1/smear", "GET /api/v1/health", "GET /api/v1/model"):
        assert route in text
    spec = json.loads(httpx.get(f"{server}/openapi.json").text)
    assert spec["info"]["title"] == "malaria-cells"
    _only_local(requests, server)


def test_a_model_not_meant_for_single_cells_says_so(
    tmp_path_factory: pytest.TempPathFactory, browser, share: Path, tmp_path: Path
) -> None:
    # A model adapted on stain-normalized field photos (its metadata says so): the page shows the API's warning.
    import json

    import onnx

    from deploy_helpers import tiny_onnx

    model = onnx.load(str(tiny_onnx(tmp_path_factory.mktemp("deploy"))))
    entry = model.metadata_props.add()
    entry.key, entry.value = "stain_normalize", json.dumps(True)
    path = tmp_path / "normalized.onnx"
    onnx.save(model, str(path))
    served = _serve(tmp_path_factory, "--model", str(path))
    url = next(served)
    try:
        cell = sorted((share / "Parasitized").glob("*.webp"))[0]
        page, requests = _page(browser, url)
        assert page.locator("[data-testid=cells-warning]").is_hidden()
        page.set_input_files("#files", str(cell))
        page.locator("[data-testid=result][data-state=done]").wait_for(timeout=60_000)
        warning = page.locator("[data-testid=cells-warning]")
        assert warning.is_visible() and "meant for smear" in warning.inner_text()
        _only_local(requests, url)
    finally:
        served.close()
