"""The USCS painting page in a real headless Chromium, driven by Playwright.

The server (gansem.uscs.server) runs on 127.0.0.1 on a free port in a thread, with the fake
synthesiser of tests/uscs_fake.py (K = 4, R = 32), so every image the page shows can be
compared with the one the fake draws for the mask read back from the page's canvas; the last
test serves a real SPADE run directory (numpy-initialised generator) the way launch/paint.py
does. One browser for the module; each test reloads the page.

Needs Debian's Chromium (``/usr/bin/chromium``, or ``GANSEM_CHROMIUM=path``) and the
``playwright`` package (``bash scripts/setup.sh --test`` installs both; Playwright's own
browser download is never used). Without them the tests fail with what to install;
``GANSEM_SKIP_BROWSER=1`` skips them explicitly. Screenshots and downloads are kept in
``test-artifacts/uscs-page/`` (``GANSEM_TEST_ARTIFACTS`` overrides ``test-artifacts``).
"""

import base64
import io
import json
import os
import threading
from collections import deque

import numpy as np
import pytest
from PIL import Image

from gansem.uscs import server
from gansem.uscs.models import build_models, spade_config
from gansem.uscs.synth import load_synthesizer
from uscs_fake import FakeSynthesizer
from uscs_runs import write_untrained_run

try:
    from playwright.sync_api import sync_playwright
except ImportError as e:  # reported by the fixture: a failure unless GANSEM_SKIP_BROWSER=1
    sync_playwright, PLAYWRIGHT_MISSING = None, e

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CHROMIUM = os.environ.get("GANSEM_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
ARTIFACTS = os.path.join(os.environ.get("GANSEM_TEST_ARTIFACTS", os.path.join(ROOT, "test-artifacts")), "uscs-page")
K, R = 4, 32
NAMES = ["sky", "sand", "rock", "grass"]
# One browser for the module: under `pytest -n 2 --dist loadgroup` (the CI command) its tests share a worker.
pytestmark = pytest.mark.xdist_group("browser")
SETUP_HINT = "install it with `bash scripts/setup.sh --test`, or set GANSEM_SKIP_BROWSER=1 to skip the browser tests"


@pytest.fixture(scope="module")
def synth():
    return FakeSynthesizer(num_classes=K, resolution=R, num_examples=3, class_names=NAMES)


@pytest.fixture(scope="module")
def base_url(synth):
    srv = server.make_server(synth, port=0, log_requests=False)
    thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{srv.port}"
    srv.shutdown()
    srv.server_close()
    thread.join(5)


@pytest.fixture(scope="module")
def browser():
    if os.environ.get("GANSEM_SKIP_BROWSER") == "1":
        pytest.skip("GANSEM_SKIP_BROWSER=1: the painting page's browser tests are skipped")
    if sync_playwright is None:
        pytest.fail(f"the painting page's browser tests need the playwright package ({PLAYWRIGHT_MISSING}); "
                    f"{SETUP_HINT}", pytrace=False)
    if not os.access(CHROMIUM, os.X_OK):
        pytest.fail(f"the painting page's browser tests need Chromium at {CHROMIUM} (Debian: apt-get install "
                    f"chromium chromium-driver; or GANSEM_CHROMIUM=/path/to/chromium); {SETUP_HINT}", pytrace=False)
    os.makedirs(ARTIFACTS, exist_ok=True)
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield b
        b.close()
    print(f"\nscreenshots and downloads of the painting page: {ARTIFACTS}")


@pytest.fixture(scope="module")
def session(browser, base_url):
    """One page for the module; records page errors and any request that leaves the server."""
    context = browser.new_context(viewport={"width": 1280, "height": 860}, device_scale_factor=1,
                                  accept_downloads=True)
    page = context.new_page()
    page.set_default_timeout(10_000)
    errors, outside = [], []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.on("request", lambda r: None if r.url.startswith((base_url + "/", "data:", "blob:")) else outside.append(r.url))
    yield page, errors, outside
    context.close()


@pytest.fixture
def page(session, base_url):
    """The page freshly loaded (class names back to the run's), checked for errors after the test."""
    page, errors, outside = session
    if page.url.startswith(base_url):
        page.evaluate("localStorage.clear()")
        page.reload()
    else:
        page.goto(base_url + "/")
    page.wait_for_selector("body[data-ready=true]")
    yield page
    assert not errors, f"errors in the page's script: {errors}"
    assert not outside, f"the page asked for something other than its server: {outside}"


def _screenshot(page, name):
    path = os.path.join(ARTIFACTS, name)
    page.screenshot(path=path)
    return path


def _cell(page, x, y):
    """The page coordinates of the centre of mask pixel (x, y)."""
    box = page.locator("#mask").bounding_box()
    return box["x"] + (x + 0.5) * box["width"] / R, box["y"] + (y + 0.5) * box["height"] / R


def _stroke(page, points, steps=4):
    page.mouse.move(*_cell(page, *points[0]))
    page.mouse.down()
    for p in points[1:]:
        page.mouse.move(*_cell(page, *p), steps=steps)
    page.mouse.up()


def _mask(page, synth) -> np.ndarray:
    """The mask on the page's canvas, read back from its pixels: int [R, R] class ids."""
    rgba = np.asarray(page.evaluate(
        "() => { const c = document.getElementById('mask');"
        " return Array.from(c.getContext('2d').getImageData(0, 0, c.width, c.height).data); }"), np.int64)
    rgb = rgba.reshape(R, R, 4)[..., :3]
    match = np.all(rgb[:, :, None, :] == synth.palette[None, None].astype(np.int64), axis=-1)  # [R, R, K]
    assert match.sum(-1).min() == 1, "the canvas has a pixel outside the palette"
    return match.argmax(-1)


def _png(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def _shown_image(page, selector="#result") -> np.ndarray:
    src = page.get_attribute(selector, "src")
    assert src.startswith("data:image/png;base64,")
    return _png(base64.b64decode(src.split(",", 1)[1]))


def _generate(page) -> np.ndarray:
    """Press Generate, wait for the new image; its pixels."""
    before = page.get_attribute("#result", "data-generation") or "0"
    page.click("#generate")
    page.wait_for_selector(f"#result[data-generation='{int(before) + 1}']")
    assert page.is_visible("#result") and page.is_hidden("#result-placeholder")
    size = page.evaluate("() => { const i = document.getElementById('result'); return [i.naturalWidth, i.naturalHeight]; }")
    assert size == [R, R]
    return _shown_image(page)


def _flood(mask, x, y, to):
    out = mask.copy()
    start = out[y, x]
    todo = deque([(x, y)])
    out[y, x] = to
    while todo:
        u, v = todo.popleft()
        for a, b in ((u - 1, v), (u + 1, v), (u, v - 1), (u, v + 1)):
            if 0 <= a < R and 0 <= b < R and out[b, a] == start:
                out[b, a] = to
                todo.append((a, b))
    return out


def test_page_shows_the_runs_classes(page, synth):
    assert page.locator("#palette input[type=radio]").count() == K
    assert [page.input_value(f"#class-{i}-name") for i in range(K)] == NAMES
    assert page.evaluate("() => [document.getElementById('mask').width, document.getElementById('mask').height]") == [R, R]
    assert "4 classes" in page.inner_text("#run-facts") and "fake-uscs" in page.inner_text("#run-name")
    assert (_mask(page, synth) == 0).all()
    assert page.is_disabled("#undo") and page.is_disabled("#download-image") and page.is_hidden("#error")
    _screenshot(page, "01-loaded.png")


def test_strokes_with_two_classes_generate_the_image_of_the_mask(page, synth):
    page.keyboard.press("2")  # class 1 (sand) by its key
    _stroke(page, [(3, 24), (28, 26)])
    page.click("#class-row-2 label")  # class 2 (rock) by its palette entry
    _stroke(page, [(16, 3), (16, 15)])
    mask = _mask(page, synth)
    assert set(np.unique(mask)) == {0, 1, 2}
    assert mask[24, 3] == 1 and mask[26, 28] == 1 and mask[3, 16] == 2 and mask[15, 16] == 2 and mask[8, 4] == 0

    first = _generate(page)
    np.testing.assert_array_equal(first, synth.generate(mask, seed=0))
    _screenshot(page, "02-two-classes-generated.png")

    page.keyboard.press("4")  # class 3 (grass): more paint, a new image
    _stroke(page, [(2, 2), (10, 9)])
    mask2 = _mask(page, synth)
    assert (mask2 == 3).sum() > 10 and (mask2 != mask).any()
    second = _generate(page)
    assert not np.array_equal(second, first)
    np.testing.assert_array_equal(second, synth.generate(mask2, seed=0))

    page.fill("#seed", "5")  # the same mask with another seed
    third = _generate(page)
    np.testing.assert_array_equal(third, synth.generate(mask2, seed=5))
    assert not np.array_equal(third, second)
    assert "seed 5" in page.inner_text("#result-caption")
    _screenshot(page, "03-more-paint-new-seed.png")

    page.check("#auto-generate")  # "after every stroke": the stroke alone brings the next image
    page.keyboard.press("1")
    _stroke(page, [(20, 5), (28, 5)])
    page.wait_for_selector("#result[data-generation='4']")
    np.testing.assert_array_equal(_shown_image(page), synth.generate(_mask(page, synth), seed=5))


def test_undo_redo_clear_and_fill(page, synth):
    page.keyboard.press("2")
    _stroke(page, [(0, 16), (31, 16)])  # a band of class 1 splits the canvas
    band = _mask(page, synth)
    assert (band[16] == 1).all() and (band[0] == 0).all()
    page.click("#undo")
    assert (_mask(page, synth) == 0).all()
    page.keyboard.press("Control+y")
    np.testing.assert_array_equal(_mask(page, synth), band)

    page.keyboard.press("3")
    page.keyboard.press("f")  # fill the upper part with class 2: the band holds it back
    page.mouse.click(*_cell(page, 5, 3))
    filled = _mask(page, synth)
    np.testing.assert_array_equal(filled, _flood(band, 5, 3, 2))
    assert (filled[0] == 2).all() and (filled[31] == 0).all()
    _screenshot(page, "04-fill.png")

    page.keyboard.press("4")
    page.click("#clear")
    assert (_mask(page, synth) == 3).all()
    page.keyboard.press("Control+z")
    np.testing.assert_array_equal(_mask(page, synth), filled)
    page.keyboard.press("Control+z")
    np.testing.assert_array_equal(_mask(page, synth), band)


def test_start_from_a_sample(page, synth):
    page.keyboard.press("2")
    _stroke(page, [(4, 4), (8, 8)])
    before = _mask(page, synth)
    page.fill("#sample-index", "2")
    page.click("#load-sample")
    page.wait_for_selector("#sample-view:not([hidden])")
    image, mask = synth.example(2)
    np.testing.assert_array_equal(_mask(page, synth), mask)
    np.testing.assert_array_equal(_shown_image(page, "#sample-image"), image)
    np.testing.assert_array_equal(_generate(page), synth.generate(mask, seed=0))
    _screenshot(page, "05-sample.png")
    page.click("#undo")
    np.testing.assert_array_equal(_mask(page, synth), before)
    page.fill("#sample-index", "3")  # out of range: a message, no request
    page.click("#load-sample")
    assert page.is_visible("#error") and "0..2" in page.inner_text("#error-text")


def test_keyboard_painting_and_names(page, synth):
    page.focus("#mask")
    page.keyboard.press("3")  # class 2
    page.keyboard.press("[")
    page.keyboard.press("[")  # brush 1 px
    assert page.inner_text("#brush-size-value") == "1"
    page.keyboard.press("ArrowLeft")  # the cursor starts at the centre (16, 16)
    page.keyboard.press("Space")
    page.keyboard.down("Shift")
    for _ in range(3):
        page.keyboard.press("ArrowDown")
    page.keyboard.up("Shift")
    mask = _mask(page, synth)
    assert [tuple(p) for p in np.argwhere(mask == 2)] == [(16, 15), (17, 15), (18, 15), (19, 15)]
    page.keyboard.press("Control+z")  # the Shift+arrows stroke is one edit
    assert (_mask(page, synth) == 2).sum() == 1

    page.fill("#class-1-name", "beach")
    page.reload()
    page.wait_for_selector("body[data-ready=true]")
    assert page.input_value("#class-1-name") == "beach"  # kept in localStorage


def test_downloads(page, synth):
    page.keyboard.press("2")
    _stroke(page, [(5, 20), (25, 12)])
    mask = _mask(page, synth)
    image = _generate(page)
    saved = {}
    for button in ("download-mask", "download-ids", "download-json", "download-image"):
        with page.expect_download() as d:
            page.click(f"#{button}")
        saved[button] = os.path.join(ARTIFACTS, d.value.suggested_filename)
        d.value.save_as(saved[button])
    colours = _png(open(saved["download-mask"], "rb").read())
    np.testing.assert_array_equal(colours, synth.palette[mask])
    ids = np.asarray(Image.open(saved["download-ids"]))
    np.testing.assert_array_equal(ids[..., 0], mask)
    body = json.load(open(saved["download-json"]))
    assert body == {"mask": mask.tolist(), "seed": 0}  # a POST /generate body as it stands
    np.testing.assert_array_equal(_png(open(saved["download-image"], "rb").read()), image)
    assert os.path.basename(saved["download-image"]) == "fake-uscs-seed0.png"


def test_bad_requests_from_the_page_get_4xx_with_messages(page):
    results = page.evaluate("""async () => {
        const info = await (await fetch('/api/info')).json();
        const r = info.resolution;
        const rows = (v) => Array.from({length: r}, () => new Array(r).fill(v));
        const post = async (body, type = 'application/json') => {
            const resp = await fetch('/generate', {method: 'POST', headers: {'Content-Type': type}, body});
            return [resp.status, (await resp.json()).error];
        };
        return {
            oversized: await post(JSON.stringify({mask: rows(0)}) + ' '.repeat(info.max_payload_bytes)),
            unknown_class: await post(JSON.stringify({mask: rows(info.num_classes)})),
            malformed: await post('{"mask": [[0, 1'),
            wrong_shape: await post(JSON.stringify({mask: rows(0).slice(1)})),
            bad_seed: await post(JSON.stringify({mask: rows(0), seed: -1})),
            not_json: await post('mask=0', 'application/x-www-form-urlencoded'),
        };
    }""")
    expected = {"oversized": (413, "limit"), "unknown_class": (400, "unknown class id 4"),
                "malformed": (400, "not valid JSON"), "wrong_shape": (400, "list of 32 rows"),
                "bad_seed": (400, '"seed"'), "not_json": (415, "application/json")}
    for name, (status, needle) in expected.items():
        got_status, message = results[name]
        assert got_status == status and needle in message and "Traceback" not in message, (name, results[name])


def test_server_errors_are_shown_on_the_page(page):
    def bad_class(route):  # the page's request, with a class id the model does not have
        body = json.loads(route.request.post_data)
        body["mask"][3][5] = 9
        route.continue_(post_data=json.dumps(body))

    page.route("**/generate", bad_class)
    try:
        page.click("#generate")
        page.wait_for_selector("#error:not([hidden])")
    finally:
        page.unroute("**/generate", bad_class)
    text = page.inner_text("#error-text")
    assert "unknown class id 9" in text and "row 3, column 5" in text and "HTTP 400" in text
    assert page.is_hidden("#result")
    _screenshot(page, "06-server-error.png")
    _generate(page)  # a good request clears the message
    assert page.is_hidden("#error")


# -- the page on a real SPADE run ------------------------------------------------------------------


@pytest.fixture(scope="module")
def spade_run(tmp_path_factory):
    """A USCS run directory (K = 3, R = 32) with a numpy-initialised SPADE generator, as launch/paint.py loads it."""
    run = str(tmp_path_factory.mktemp("spade") / "run")
    model = spade_config("cpu", ngf=2, mults=(2, 1), spade_hidden=4, ndf=4, d_layers=2)
    write_untrained_run(run, build_models(model, 3, R), step=2)
    meta_path = os.path.join(run, "model.json")
    with open(meta_path) as f:
        meta = json.load(f)
    meta["palette"] = [[70, 130, 180], [230, 190, 60], [200, 60, 80]]  # distinct colours to read the canvas back
    with open(meta_path, "w") as f:
        json.dump(meta, f)
    return load_synthesizer(run)


def test_the_page_serves_a_real_spade_run(browser, spade_run):
    """Two classes painted, Generate: the SPADE generator's image of exactly that mask, R × R; it follows the mask."""
    srv = server.make_server(spade_run, port=0, log_requests=False)
    thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    context = browser.new_context(viewport={"width": 1280, "height": 860})
    try:
        page = context.new_page()
        page.set_default_timeout(60_000)  # the first request compiles the generator
        page.goto(f"http://127.0.0.1:{srv.port}/")
        page.wait_for_selector("body[data-ready=true]")
        page.keyboard.press("2")
        _stroke(page, [(3, 24), (28, 26)])
        page.keyboard.press("3")
        _stroke(page, [(16, 3), (16, 15)])
        mask = _mask(page, spade_run)
        assert set(np.unique(mask)) == {0, 1, 2}
        first = _generate(page)
        np.testing.assert_array_equal(first, spade_run.generate(mask))
        page.keyboard.press("2")
        _stroke(page, [(2, 2), (12, 10)])
        mask2 = _mask(page, spade_run)
        second = _generate(page)
        assert not np.array_equal(second, first)
        np.testing.assert_array_equal(second, spade_run.generate(mask2))
        _screenshot(page, "07-real-spade-run.png")
    finally:
        context.close()
        srv.shutdown()
        srv.server_close()
        thread.join(5)
