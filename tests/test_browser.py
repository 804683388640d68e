"""End to end in headless Chromium (Playwright, the system's Debian chromium; no browser download).

A user's path: pick an example, upload an image, type a vocabulary, click Segment; the overlay, the view
masks, the GPR chart and the t-SNE plot must render, and a bad input must show its message. A full-page
screenshot is saved to ``test-artifacts/demo_browser.png``.
"""
from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

import pytest

from demo.testing import chromium_path

REPO = Path(__file__).resolve().parent.parent
ARTIFACTS = REPO / "test-artifacts"
EXAMPLES = REPO / "assets" / "examples"
CHROMIUM = chromium_path()

sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install playwright)")
if CHROMIUM is None:
    pytest.skip("no chromium executable (apt-get install -y chromium; .ci/run installs it)", allow_module_level=True)

from demo import build_demo  # noqa: E402
from demo.testing import CHROMIUM_ARGS, serve, small_models  # noqa: E402

TIMEOUT_MS = 90_000


@pytest.fixture(scope="module")
def open_page(tmp_path_factory):
    """Opens a new browser page on the demo (the bundled toy model when it exists: the screenshot then shows
    real segmentations), with a random learned prompt set and a random student."""
    models = small_models(tmp_path_factory.mktemp("browser_models"), toy=True, student=True, short_side=256)
    with serve(build_demo(models)) as url, sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)

        def new_page():
            pg = browser.new_page(viewport={"width": 1400, "height": 1000})
            pg.set_default_timeout(TIMEOUT_MS)
            pg.goto(url)
            pg.wait_for_selector("#segment")
            return pg

        yield new_page
        browser.close()


@pytest.fixture(scope="module")
def page(open_page):
    """One page shared by the tests of a visitor's path (they build on each other's state)."""
    return open_page()


OUTPUTS = ["#overlay", "#compare", "#student-status", "#views", "#gpr", "#tsne", "#timings"]


def error_badges(page) -> list[str]:
    """Output panels that show Gradio's red "Error" status (what a failed request paints on every output)."""
    return page.evaluate("""(ids) => ids.filter(id => { const el = document.querySelector(id);
        return el && (el.querySelector('.error') !== null || /(^|\\n)Error(\\n|$)/.test(el.innerText)); })""",
                         OUTPUTS)


def test_a_first_click_without_image_shows_one_message_and_leaves_the_panels_alone(open_page):
    """Issue #26: Segment before choosing an image (or with an empty vocabulary) says so once, at the input,
    and paints no "Error" badge on the seven output panels."""
    pg = open_page()
    pg.locator("#vocabulary textarea").fill("cat, dog")
    pg.locator("#segment").click()
    pg.locator("#image").get_by_text("No image: upload one (or click an example) first.").wait_for()
    pg.wait_for_timeout(500)  # a failed request would have marked the outputs by now
    assert error_badges(pg) == []
    assert pg.get_by_text("No image: upload one").count() == 1  # one message, not one per panel
    pg.locator("#vocabulary textarea").fill(" , ")
    pg.locator("#segment").click()
    pg.locator("#vocabulary").get_by_text("the vocabulary is empty").wait_for()
    pg.wait_for_timeout(500)
    assert error_badges(pg) == []
    pg.close()


def rendered(page, selector: str, count: int = 1, min_width: int = 1) -> None:
    """Waits until ``count`` images match ``selector`` and have loaded (scrolled into view first: Gradio's
    images load lazily)."""
    page.wait_for_function(f"() => document.querySelectorAll({selector!r}).length >= {count}")
    images = page.locator(selector)
    for i in range(images.count()):
        images.nth(i).scroll_into_view_if_needed()
    page.wait_for_function(f"""() => [...document.querySelectorAll({selector!r})]
                                     .every(i => i.complete && i.naturalWidth >= {min_width})""")


def test_example_upload_segment_and_every_panel_renders(page):
    vocabulary = "background, green cat, yellow cat, green bird, yellow bird, red owl, brick, grass"
    page.get_by_text("background, red cat, blue fox, green fox, water, grass").first.click()  # clicking an example …
    page.wait_for_function("() => document.querySelector('#vocabulary textarea').value.includes('blue fox')")
    page.locator("#image input[type=file]").set_input_files(str(EXAMPLES / "toy_test_294.png"))  # … or upload
    page.locator("#vocabulary textarea").fill(vocabulary)
    page.locator("#segment").click()

    page.locator("#summary").get_by_text("Learned · learned").wait_for()
    rendered(page, "#overlay img", min_width=512)  # toy images (256 px) are enlarged for display
    rendered(page, "#compare img", min_width=1000)  # learned, 85 templates, parts, student: 2×2 panels
    rendered(page, "#views img", min_width=800)  # learned and part-based view grids, stacked
    rendered(page, "#tsne img", min_width=500)
    page.locator("#gpr").get_by_text("GPR class scores · Learned · learned").wait_for()
    assert page.locator("#gpr canvas, #gpr svg").count() >= 1  # the Vega chart itself
    for name in ("background", "green cat", "grass"):
        assert page.locator("#gpr").get_by_text(name).count() >= 1
    assert page.locator("#timings").get_by_text("total").count() >= 1
    with page.expect_download() as download:  # the label map behind the main result, as class ids
        page.locator("#download-labels").click()
    assert download.value.suggested_filename == "labels.png"
    with page.expect_download() as download:
        page.locator("#download-json").click()
    assert '"gpr_scores"' in Path(download.value.path()).read_text()
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "demo_browser.png"), full_page=True)
    assert (ARTIFACTS / "demo_browser.png").stat().st_size > 50_000


def test_bad_input_shows_its_message_and_page_keeps_working(page):
    shown = page.evaluate("() => document.querySelector('#overlay img').src")
    page.locator("#vocabulary textarea").fill(" , ")
    page.locator("#segment").click()
    page.get_by_text("the vocabulary is empty").first.wait_for()
    page.wait_for_timeout(500)
    assert error_badges(page) == []  # the last result stays on the page, unmarked
    assert page.evaluate("() => document.querySelector('#overlay img').src") == shown
    page.locator("#vocabulary textarea").fill("water, brick")  # a new vocabulary (its names may be cached)
    page.locator("#segment").click()
    # the page answers the new request: the summary now lists only this vocabulary's classes
    page.wait_for_function("() => { const t = document.querySelector('#summary').innerText;"
                           " return /water|brick/.test(t) && !/background/.test(t); }", timeout=90_000)


def test_learn_tab_from_masks_and_painted_strokes_then_segment_with_the_result(open_page, tmp_path):
    """Issue #25 end to end: in the Learn tab, type the class names, upload an image with its class-id mask,
    paint strokes in two class colours on another image (the canvas driven with the mouse) and add it, click
    Learn; the curves and the two files appear, and the Segment tab ticks the session's prompts and segments
    with them."""
    import numpy as np
    from PIL import Image

    from training.toyworld import CLASS_NAMES, ToyWorld

    names = ["background", "red cat", "brick", "water", "yellow owl"]
    world = ToyWorld("val", length=3, seed=0)
    images, masks = [], []
    for i in range(3):
        rgb, labels = (np.asarray(a) for a in world[i])
        lut = np.full(256, 255, np.uint8)
        for new, name in enumerate(names):
            lut[CLASS_NAMES.index(name)] = new
        images.append(tmp_path / f"scene{i}.png")
        masks.append(tmp_path / f"scene{i}_mask.png")
        Image.fromarray(rgb).save(images[-1])
        Image.fromarray(lut[labels]).save(masks[-1])

    pg = open_page()
    pg.get_by_role("tab", name="Learn").click()
    pg.locator("#learn-names textarea").fill(", ".join(names))
    pg.locator("#learn-images input[type=file]").set_input_files([str(p) for p in images])
    pg.locator("#learn-masks input[type=file]").set_input_files([str(p) for p in masks])
    # paint: background in the first brush colour, then brick in the third, on another scene
    pg.get_by_role("tab", name="Paint").click()
    pg.locator("#learn-legend").get_by_text("brick (id 2)").wait_for()  # the brushes follow the names
    pg.locator("#learn-canvas input[type=file]").first.set_input_files(str(EXAMPLES / "toy_test_294.png"))
    canvas = pg.locator("#learn-canvas canvas").first
    canvas.wait_for()
    pg.wait_for_timeout(1000)
    box = canvas.bounding_box()
    pg.locator("#learn-canvas button[aria-label='Brush']").click()

    def stroke(x0, y0, x1, y1):
        pg.mouse.move(box["x"] + x0, box["y"] + y0)
        pg.mouse.down()
        for t in range(1, 11):
            pg.mouse.move(box["x"] + x0 + (x1 - x0) * t / 10, box["y"] + y0 + (y1 - y0) * t / 10)
        pg.mouse.up()

    cx, cy = box["width"] / 2, box["height"] / 2
    stroke(cx + 30, cy - 60, cx + 30, cy + 20)  # the plain background right of centre
    pg.locator("#learn-canvas button[aria-label='Color']").click()
    pg.locator("#learn-canvas menu button").nth(2).click()  # the third swatch: brick
    stroke(cx - 120, cy - 100, cx - 120, cy - 40)  # the brick wall on the left
    pg.locator("#learn-add").click()
    pg.locator("#learn-painted").get_by_text("1 painted image(s)").wait_for()
    pg.locator("#learn-start").click()
    pg.locator("#learn-status").get_by_text("Learning finished").wait_for(timeout=180_000)
    status = pg.locator("#learn-status").inner_text()  # 3 masks + 1 painted image: one of them held out
    assert "3 training image(s)" in status and "1 held-out image(s)" in status, status
    pg.wait_for_function("() => /learned-prompts[\\s\\S]*safetensors/.test("
                         "document.querySelector('#learn-files').innerText)")  # name and extension: two spans
    assert pg.locator("#learn-curve canvas, #learn-curve svg").count() >= 1
    # the Segment tab now offers (and ticks) the session's prompts
    pg.get_by_role("tab", name="Segment").click()
    box = pg.locator("#prompt-sets label", has_text="in this browser session")
    assert box.locator("input").is_checked()
    pg.locator("#image input[type=file]").set_input_files(str(images[0]))
    pg.locator("#vocabulary textarea").fill(", ".join(names))
    pg.locator("#segment").click()
    pg.locator("#summary").get_by_text("Learned · in this browser session").wait_for(timeout=120_000)
    ARTIFACTS.mkdir(exist_ok=True)
    pg.screenshot(path=str(ARTIFACTS / "demo_learn.png"), full_page=True)
    pg.close()
