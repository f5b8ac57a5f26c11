"""The page in real headless Chromium (Debian's, driven by Playwright): upload a scan, see the
probability and the heatmap; the screenshot is kept in test-artifacts/."""

import os
from pathlib import Path

import numpy as np
import pytest
from conftest import chromium_executable, serving

from bonetumor.data.writers import write_nifti
from bonetumor.serve.app import create_app

ARTIFACTS = Path(os.environ.get("BONETUMOR_ARTIFACTS", Path(__file__).resolve().parents[2] / "test-artifacts"))


@pytest.fixture(scope="module")
def server(tiny_run):
    with serving(create_app(tiny_run / "best.pt", device="cpu")) as port:
        yield f"http://127.0.0.1:{port}"


@pytest.fixture(scope="module")
def browser():
    exe = chromium_executable()
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=exe, headless=True, args=["--no-sandbox", "--disable-gpu"])
        yield b
        b.close()


def _loaded(page, selector: str) -> bool:
    return page.eval_on_selector(selector, "el => el.complete && el.naturalWidth > 0")


@pytest.mark.parametrize("width,height", [(1280, 900), (768, 1024)])  # a laptop screen and a tablet
def test_upload_an_image_and_see_probability_and_heatmap(server, browser, tiny_data, width, height):
    page = browser.new_page(viewport={"width": width, "height": height})
    requests, console = [], []
    page.on("request", lambda r: requests.append(r.url))
    page.on("console", lambda m: console.append(m.text))  # a Content-Security-Policy refusal is logged here
    page.goto(server + "/")
    page.wait_for_selector("text=Model: resnet50")
    f = sorted(tiny_data.rglob("*.png"))[0]
    page.set_input_files("#file", str(f))
    page.wait_for_selector("#result:not([hidden])", timeout=60_000)
    prob = float(page.inner_text("#probability"))
    assert 0 <= prob <= 1
    # A 2-epoch model on 8 validation images may call a held-out image unlike its training data;
    # the label then carries the flag, and the warning shows exactly when it does.
    label, flagged = page.inner_text("#label"), page.is_visible("#ood-warning")
    suffix = " (unlike the training data)" if flagged else ""
    assert label in (f"cancer{suffix}", f"normal{suffix}")
    assert float(page.inner_text("#threshold")) >= 0
    page.wait_for_function("document.getElementById('heatmap').complete")
    assert _loaded(page, "#image") and _loaded(page, "#heatmap")
    assert _loaded(page, "#original")  # the anatomy beside the overlay, not only under it
    assert page.eval_on_selector("#original", "el => el.src") == page.eval_on_selector("#image", "el => el.src")
    assert page.eval_on_selector("#heatmap", "el => el.style.opacity") == "0.35"
    page.fill("#opacity", "25")
    assert page.eval_on_selector("#heatmap", "el => el.style.opacity") == "0.25"
    width_before = page.eval_on_selector("#original", "el => el.getBoundingClientRect().width")
    page.fill("#zoom", "200")
    assert page.eval_on_selector("#original", "el => el.getBoundingClientRect().width") == pytest.approx(2 * width_before, rel=0.02)
    assert page.eval_on_selector("#stack", "el => el.getBoundingClientRect().width") == pytest.approx(2 * width_before, rel=0.02)
    assert "too coarse to localise" in page.inner_text("#heatmap-warning")
    assert "not a diagnostic device" in page.inner_text("header")
    for control in ("#file", "#opacity", "#zoom"):  # every control has an accessible name
        assert page.eval_on_selector(control, "el => el.labels.length > 0 || !!el.getAttribute('aria-label')")
    assert page.evaluate("document.documentElement.scrollWidth <= window.innerWidth")  # no sideways scrolling
    assert all(u.startswith(server) or u.startswith("data:") for u in requests), "the page fetched something elsewhere"
    assert not [m for m in console if "Content Security Policy" in m], console  # the page works under its CSP
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / f"serve_page_{width}x{height}.png"), full_page=True)
    page.close()


def test_an_image_unlike_the_training_data_is_flagged_on_the_page(server, browser, tmp_path):
    from PIL import Image

    f = tmp_path / "noise.png"  # colour noise, as the API test sends (test_serve_app.py)
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (48, 48, 3), dtype=np.uint8)).save(f)
    page = browser.new_page()
    page.goto(server + "/")
    page.set_input_files("#file", str(f))
    page.wait_for_selector("#ood-warning:not([hidden])", timeout=60_000)
    assert "unlike the training data" in page.inner_text("#ood-warning")
    assert "cannot be trusted" in page.inner_text("#ood-warning")
    assert page.inner_text("#label").endswith("(unlike the training data)")
    page.close()


def test_a_volume_gets_a_slice_browser_sorted_by_score(server, browser, tmp_path):
    rng = np.random.default_rng(4)
    vol = write_nifti(tmp_path / "v.nii.gz", [rng.random((32, 32)) for _ in range(4)])
    page = browser.new_page()
    page.goto(server + "/")
    page.set_input_files("#file", str(vol))
    page.wait_for_selector("#slices-box:not([hidden])", timeout=60_000)
    scores = [float(t) for t in page.eval_on_selector_all("#slices tbody tr td:nth-child(2)", "els => els.map(e => e.textContent)")]
    assert len(scores) == 4 and scores == sorted(scores, reverse=True)
    page.click("#slices tbody tr:last-child button")
    assert "slice" in page.inner_text("#caption")
    page.close()


def test_an_unreadable_file_shows_its_message(server, browser, tmp_path):
    bad = tmp_path / "notes.png"
    bad.write_text("not an image at all")
    page = browser.new_page()
    page.goto(server + "/")
    page.set_input_files("#file", str(bad))
    page.wait_for_selector("#status.error")
    assert "notes.png: not a PNG, JPEG, TIFF, DICOM" in page.inner_text("#status")
    page.close()


def test_the_api_docs_render_under_their_policy(server, browser):
    page = browser.new_page()
    console = []
    page.on("console", lambda m: console.append(m.text))
    page.goto(server + "/docs")
    page.wait_for_selector(".opblock-summary-path", timeout=30_000)  # Swagger UI built the operation list
    assert page.locator(".opblock-summary-path").count() == 3  # health, model, predict
    assert not [m for m in console if "Content Security Policy" in m], console
    page.close()
