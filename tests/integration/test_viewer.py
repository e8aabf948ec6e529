"""The viewer in a real headless Chromium (Debian's), driven by Playwright, against a real uvicorn."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import httpx
import pytest

from tests.helpers_video import make_test_video

pytestmark = [pytest.mark.integration, pytest.mark.browser, pytest.mark.timeout(90)]

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
ARTIFACTS = Path(__file__).resolve().parents[1] / "artifacts"
ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
    "--disable-quic",
    "--disable-sync",
]
CAMERA_ARGS = ["--use-fake-device-for-media-stream", "--use-fake-ui-for-media-stream"]


@pytest.fixture
def browser_page():
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed")
    if not Path(CHROMIUM).exists():
        pytest.skip(f"Chromium not found at {CHROMIUM} (apt-get install chromium)")
    pages = []

    def open_page(extra_args: tuple[str, ...] = ()):
        pw = sync_api.sync_playwright().start()
        browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=ARGS + list(extra_args))
        page = browser.new_page(viewport={"width": 1400, "height": 900})
        page.set_default_timeout(15_000)
        errors: list[str] = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        pages.append((pw, browser, page, errors))
        return page, errors

    yield open_page
    for pw, browser, _, _ in pages:
        browser.close()
        pw.stop()


def canvas_snapshot(page, stream_id: str) -> str:
    return page.eval_on_selector(f'.tile[data-stream="{stream_id}"] canvas', "c => c.toDataURL('image/png')")


def wait_for_fps(page, stream_id: str) -> float:
    sel = f'.tile[data-stream="{stream_id}"] .r-fps'
    page.wait_for_function(f"() => Number(document.querySelector('{sel}')?.dataset.fps || 0) > 0")
    return float(page.get_attribute(sel, "data-fps"))


def wait_canvas_changes(page, stream_id: str, timeout: float = 10.0) -> None:
    first = canvas_snapshot(page, stream_id)
    deadline = time.monotonic() + timeout
    while canvas_snapshot(page, stream_id) == first:
        assert time.monotonic() < deadline, "the canvas did not change"
        page.wait_for_timeout(100)


def viewer_on_media(live_server, null_config, browser_page, media_dir: Path):
    """A server whose file sources live in ``media_dir``, and the viewer loaded on it."""
    server = null_config.server.model_copy(update={"media_dir": str(media_dir)})
    srv = live_server(null_config.model_copy(update={"server": server}))
    page, errors = browser_page()
    page.goto(srv.url + "/")
    page.wait_for_selector("#add-model option[value='null']", state="attached")
    return srv, page, errors


def test_viewer_adds_a_stream_through_the_form_and_plays_it(live_server, null_config, browser_page, tmp_path):
    make_test_video(tmp_path / "clip.mp4", frames=90, width=320, height=240)
    srv, page, errors = viewer_on_media(live_server, null_config, browser_page, tmp_path)
    # Models whose weights are not on the server say so before they are picked.
    weights = {m["name"]: m["weights"] for m in httpx.get(f"{srv.url}/api/models", timeout=5).json()}
    label = {name: page.inner_text(f"#add-model option[value='{name}']") for name in weights}
    assert label["null"] == "null (default)"  # nothing to load
    assert page.is_hidden("#model-hint")
    page.select_option("#add-model", "resnet18_fpn")
    assert "Untrained" in page.inner_text("#model-hint")
    for name, w in weights.items():
        if w["source"] == "url":
            assert label[name].endswith("*") == (not w["present"]), (name, label[name])
            page.select_option("#add-model", name)
            assert page.is_visible("#model-hint") == (not w["present"])
    page.select_option("#add-model", "null")
    assert page.is_hidden("#model-hint")
    page.fill("#add-source", "clip.mp4?loop=1")
    page.fill("#add-id", "clip")
    page.click("#add-submit")
    page.wait_for_selector('.tile[data-stream="clip"] canvas')
    assert wait_for_fps(page, "clip") > 0
    wait_canvas_changes(page, "clip")
    page.wait_for_selector('.stream-item[data-stream="clip"] .badge.streaming')
    assert page.inner_text('.tile[data-stream="clip"] .legend') == "person"
    # The tile links to the stream's pictures over plain HTTP, and they answer pictures.
    snapshot = page.get_attribute('.tile[data-stream="clip"] a.snapshot', "href")
    mjpeg = page.get_attribute('.tile[data-stream="clip"] a.mjpeg', "href")
    assert snapshot == f"{srv.url}/api/streams/clip/snapshot"
    assert mjpeg == f"{srv.url}/api/streams/clip/mjpeg"
    shown = page.evaluate(
        """url => new Promise((ok, fail) => {
             const img = new Image();
             img.onload = () => ok([img.naturalWidth, img.naturalHeight]);
             img.onerror = () => fail(new Error("not a picture"));
             img.src = url;
           })""",
        snapshot,
    )
    assert shown == [320, 240]
    # Bad input shows the server's message in the form.
    page.fill("#add-source", "gopher://nowhere")
    page.fill("#add-id", "")
    page.click("#add-submit")
    page.wait_for_selector("#add-error:not([hidden])")
    assert "unsupported source scheme" in page.inner_text("#add-error")
    # View toggles (opacity applies to the overlay only) and a second stream side by side.
    slider = '.tile[data-stream="clip"] .opacity input'
    page.click('.tile[data-stream="clip"] button[data-mode="mask"]')
    assert page.is_disabled(slider)
    page.click('.tile[data-stream="clip"] button[data-mode="overlay"]')
    assert page.is_enabled(slider)
    page.click('.tile[data-stream="clip"] button[data-mode="original"]')
    assert page.is_disabled(slider)
    httpx.post(f"{srv.url}/api/streams", json={"source": "demo", "id": "demo"}, timeout=10)
    page.wait_for_selector('.tile[data-stream="demo"] canvas')
    assert wait_for_fps(page, "demo") > 0
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "viewer.png"))
    # Removing a stream asks first: it stops for everyone. Declined, nothing happens.
    asked: list[str] = []

    def answer(accept: bool):
        def on_dialog(dialog) -> None:
            asked.append(dialog.message)
            dialog.accept() if accept else dialog.dismiss()
        return on_dialog

    page.once("dialog", answer(False))
    page.click('.stream-item[data-stream="clip"] .remove')
    page.wait_for_timeout(300)
    assert asked and "clip" in asked[0]
    assert httpx.get(f"{srv.url}/api/streams/clip", timeout=5).status_code == 200
    assert page.locator('.tile[data-stream="clip"]').count() == 1
    # Accepted, the stream and its tile go.
    page.once("dialog", answer(True))
    page.click('.stream-item[data-stream="clip"] .remove')
    page.wait_for_selector('.tile[data-stream="clip"]', state="detached")
    assert len(asked) == 2
    assert httpx.get(f"{srv.url}/api/streams/clip", timeout=5).status_code == 404
    assert not errors, errors


def test_viewer_asks_for_the_token(live_server, null_config, browser_page):
    server = null_config.server.model_copy(update={"token": "letmein"})
    srv = live_server(null_config.model_copy(update={"server": server}))
    httpx.post(
        f"{srv.url}/api/streams",
        json={"source": "demo", "id": "demo"},
        headers={"Authorization": "Bearer letmein"},
        timeout=10,
    )
    page, errors = browser_page()
    page.goto(srv.url + "/")
    page.wait_for_selector("#token-dialog[open]")
    page.fill("#token-input", "letmein")
    page.click("#token-form button[type=submit]")
    page.wait_for_selector('.tile[data-stream="demo"] canvas')
    assert wait_for_fps(page, "demo") > 0
    # The picture links carry the token: a link or an <img> sends no Authorization header.
    mjpeg = page.get_attribute('.tile[data-stream="demo"] a.mjpeg', "href")
    assert mjpeg == f"{srv.url}/api/streams/demo/mjpeg?token=letmein"
    drawn = page.evaluate(
        """url => new Promise((ok, fail) => {
             const img = new Image();
             img.onload = () => ok(img.naturalWidth > 0);
             img.onerror = () => fail(new Error("not a picture"));
             img.src = url;
           })""",
        mjpeg,
    )
    assert drawn is True
    assert not errors, errors


def test_a_wrong_token_is_said_to_be_wrong_and_the_right_one_loads_everything(
    live_server, null_config, browser_page
):
    server = null_config.server.model_copy(update={"token": "letmein"})
    srv = live_server(null_config.model_copy(update={"server": server}))
    page, errors = browser_page()
    page.goto(srv.url + "/")
    page.wait_for_selector("#token-dialog[open]")
    assert page.is_hidden("#token-wrong")  # nothing was refused yet
    page.fill("#token-input", "guess")
    page.click("#token-form button[type=submit]")
    page.wait_for_selector("#token-dialog[open] #token-wrong:not([hidden])")
    page.fill("#token-input", "letmein")
    page.click("#token-form button[type=submit]")
    page.wait_for_selector("#add-model option[value='null']", state="attached")  # models load after all
    assert not errors, errors


def test_a_stream_that_ends_keeps_its_end_state_and_tiles_show_only_their_readouts(
    live_server, null_config, browser_page, tmp_path
):
    make_test_video(tmp_path / "short.mp4", frames=45, width=160, height=120)
    srv, page, errors = viewer_on_media(live_server, null_config, browser_page, tmp_path)
    httpx.post(f"{srv.url}/api/streams", json={"source": "short.mp4", "id": "short"}, timeout=10)
    tile = '.tile[data-stream="short"]'
    page.wait_for_selector(f"{tile} canvas")
    assert page.is_hidden(f"{tile} .rtt")  # round trip is for camera tiles only
    deadline = time.monotonic() + 20
    while httpx.get(f"{srv.url}/api/streams/short", timeout=5).json()["state"] != "stopped":
        assert time.monotonic() < deadline, "the clip did not end"
        time.sleep(0.2)
    page.wait_for_timeout(1500)  # results still on their way arrive after the final status
    assert page.inner_text(f"{tile} .badge.state") == "stopped"
    assert not errors, errors


def test_browser_camera_becomes_a_stream_and_comes_back_segmented(live_server, null_config, browser_page):
    srv = live_server(null_config)
    page, errors = browser_page(tuple(CAMERA_ARGS))
    page.goto(srv.url + "/")
    page.wait_for_selector("#add-model option[value='null']", state="attached")
    page.click("#camera-btn")
    page.wait_for_selector(".tile[data-stream^='cam-'] canvas")
    stream_id = page.get_attribute(".tile[data-stream^='cam-']", "data-stream")
    assert wait_for_fps(page, stream_id) > 0
    wait_canvas_changes(page, stream_id)
    info = httpx.get(f"{srv.url}/api/streams/{stream_id}", timeout=5).json()
    assert info["kind"] == "push" and info["state"] == "streaming"
    rtt = f'.tile[data-stream="{stream_id}"] .r-rtt'
    page.wait_for_function("sel => /\\d+ ms/.test(document.querySelector(sel).textContent)", arg=rtt)
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "viewer-camera.png"))
    page.click("#camera-btn")  # stop: the stream leaves with the browser's camera
    deadline = time.monotonic() + 5
    while httpx.get(f"{srv.url}/api/streams/{stream_id}", timeout=5).status_code != 404:
        assert time.monotonic() < deadline, "camera stream still listed after stopping"
        time.sleep(0.05)
    assert not errors, errors
