"""The drawing page in a real headless Chromium (Debian's), driven by Playwright."""

from __future__ import annotations

import shutil

import pytest

pytestmark = pytest.mark.browser

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


@pytest.fixture(scope="module")
def page():
    if CHROMIUM is None:
        pytest.skip("no chromium on this machine (apt-get install chromium)")
    sync_api = pytest.importorskip("playwright.sync_api")
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        try:
            context = browser.new_context(viewport={"width": 1000, "height": 800})
            yield context.new_page()
        finally:
            browser.close()


def draw(page, points: list[tuple[float, float]]) -> None:
    box = page.locator("canvas#pad").bounding_box()
    sx, sy = box["width"] / 280, box["height"] / 280
    page.mouse.move(box["x"] + points[0][0] * sx, box["y"] + points[0][1] * sy)
    page.mouse.down()
    for x, y in points[1:]:
        page.mouse.move(box["x"] + x * sx, box["y"] + y * sy, steps=8)
    page.mouse.up()


def test_draw_a_digit_and_see_the_prediction(shipped_server, page, tmp_path):
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.goto(shipped_server.url + "/")
    page.wait_for_function("document.querySelector('#model').textContent.includes('mnist')")
    # A "1": one vertical stroke down the middle.
    draw(page, [(140, 50), (140, 140), (140, 230)])
    page.wait_for_function("document.body.dataset.state === 'predicted'", timeout=15_000)
    assert page.locator("#digit").inner_text().strip() == "1"
    widths = page.eval_on_selector_all(
        "#bars [data-digit] .fill", "els => els.map(e => parseFloat(e.style.width))"
    )
    assert len(widths) == 10 and widths[1] == max(widths) and widths[1] > 50
    page.screenshot(path=str(tmp_path / "page-1.png"))

    page.click("button#clear")
    page.wait_for_function("document.body.dataset.state === 'idle'")
    # A "7": a top bar and a diagonal down to the left.
    draw(page, [(70, 60), (210, 60), (190, 110), (150, 180), (125, 240)])
    page.wait_for_function("document.body.dataset.state === 'predicted'", timeout=15_000)
    assert page.locator("#digit").inner_text().strip() == "7"
    assert not errors, errors


def test_pick_a_file(shipped_server, page, tmp_path, sample_test):
    from PIL import Image

    index = int(list(sample_test.labels).index(4))
    path = tmp_path / "four.png"
    Image.fromarray(255 - sample_test.images[index]).resize((140, 140)).save(path)  # paper-like
    page.goto(shipped_server.url + "/")
    page.set_input_files("input#file", str(path))
    page.wait_for_function("document.body.dataset.state === 'predicted'", timeout=15_000)
    assert page.locator("#digit").inner_text().strip() == "4"
