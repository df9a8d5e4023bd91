"""The web export in a real browser: ``python -m scripts.export MODEL --format web`` folders for a one-style and a
two-style tiny model, served from 127.0.0.1 by a thread of this test, opened in headless Debian Chromium driven by
playwright. The page's output canvas must match stylize's pipeline on the same photo at the same size (>= 40 dB
PSNR, 8-bit), for one style and for a two-style mix, with the colour and strength options; moving a slider must
change the output, strength 0 must give the photo back, and a fake camera must produce frames and a frame rate.

Needs what ``make web-deps`` installs (onnxruntime-web in web/node_modules, chromium, playwright); without it the
module skips with one line naming what is missing.
"""

from __future__ import annotations

import base64
import importlib.util
import io
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from configs.schema import compose_stylize_config
from core.metrics import psnr
from inference.pipeline import stylize
from interop.web_export import default_runtime_dir, runtime_files, serve_folder
from scripts.export import main as export_main
from tests.support import CONTENT, tiny_model_file


def _missing() -> str | None:
    """One line saying what the browser tests lack and how to install it, or None."""
    try:
        runtime_files()
    except Exception:
        return f"onnxruntime-web is not in {default_runtime_dir()}: run make web-deps"
    if importlib.util.find_spec("playwright") is None:
        return "the playwright Python package is missing: run make web-deps"
    if _chromium() is None:
        return "chromium is missing: run make web-deps as root (apt-get install -y chromium)"
    return None


def _chromium() -> str | None:
    return os.environ.get("FASTSTYLE_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")


pytestmark = [pytest.mark.slow, pytest.mark.skipif(_missing() is not None, reason=str(_missing()))]

MIN_PSNR_DB = 40.0
PHOTO_SIDE = 96  # below the page's default working size, so the page does not resize the photo
TWO_STYLES = ["s0", "s1"]
TIMEOUT_MS = 60_000


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    """Both exports under one folder served on 127.0.0.1: (base URL, folder)."""
    root = tmp_path_factory.mktemp("web")
    models = {
        "one": tiny_model_file(root / "one.pth", scale=0.5),
        "two": tiny_model_file(root / "two.pth", num_styles=2, scale=0.5, meta={"styles": TWO_STYLES}),
    }
    for name, model in models.items():
        assert export_main([str(model), "--format", "web", "--out", str(root / name)]) == 0
    with serve_folder(root) as url:
        yield url, root


@pytest.fixture(scope="module")
def playwright() -> Iterator[object]:
    """One playwright driver per module (its sync API allows one at a time)."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        yield pw


@pytest.fixture(scope="module")
def browser(playwright: object) -> Iterator[object]:
    chromium = playwright.chromium.launch(
        executable_path=_chromium(),
        headless=True,
        args=["--use-fake-device-for-media-stream", "--use-fake-ui-for-media-stream"],
    )
    try:
        yield chromium
    finally:
        chromium.close()


@pytest.fixture(scope="module")
def photo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real photo (a sample), made small, as a PNG: the same bytes for the page and for stylize."""
    img = Image.open(CONTENT / "chelsea.jpg").convert("RGB")
    img.thumbnail((PHOTO_SIDE, PHOTO_SIDE), Image.Resampling.LANCZOS)
    path = tmp_path_factory.mktemp("photo") / "chelsea.png"
    img.save(path)
    return path


def open_page(browser: object, url: str, query: str = "") -> object:
    page = browser.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda err: errors.append(str(err)))
    page.goto(f"{url}/index.html?backend=wasm{query}")
    try:
        page.wait_for_function("['ready', 'failed'].includes(document.body.dataset.state)", timeout=TIMEOUT_MS)
    except Exception:
        raise AssertionError(f"page never got ready: {page.text_content('#status')!r} {errors}") from None
    assert page.get_attribute("body", "data-state") == "ready", page.text_content("#status")
    return page


def renders(page: object) -> int:
    return int(page.get_attribute("body", "data-renders") or 0)


def wait_render(page: object, before: int) -> None:
    """Wait until the page has drawn a new result after ``before`` renders and is idle."""
    page.wait_for_function(
        f"Number(document.body.dataset.renders || 0) > {before} && document.body.dataset.state !== 'busy'",
        timeout=TIMEOUT_MS,
    )


def set_control(page: object, selector: str, value: float | bool) -> None:
    """Set a range (value) or checkbox (checked) and fire the event a user's change fires."""
    if isinstance(value, bool):
        page.eval_on_selector(
            selector, f"e => {{ e.checked = {str(value).lower()}; e.dispatchEvent(new Event('change')); }}"
        )
    else:
        page.eval_on_selector(selector, f"e => {{ e.value = '{value}'; e.dispatchEvent(new Event('input')); }}")


def canvas_pixels(page: object) -> np.ndarray:
    """The output canvas as (H, W, 3) uint8, read from a lossless PNG of it."""
    data_url = page.eval_on_selector("#output", "c => c.toDataURL('image/png')")
    png = base64.b64decode(data_url.split(",", 1)[1])
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))


def reference(model: Path, photo: Path, out: Path, **options: object) -> np.ndarray:
    """stylize's pipeline (what stylize.py runs) on the photo in fp32 on the CPU, as (H, W, 3) uint8."""
    overrides = [f"model={model}", f"input={photo}", f"output={out}", "device=cpu", "precision=fp32", "overwrite=true"]
    overrides += [f"{key}={value}" for key, value in options.items()]
    stylize(compose_stylize_config(overrides))
    return np.asarray(Image.open(out).convert("RGB"))


def psnr_db(a: np.ndarray, b: np.ndarray) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return psnr(a, b, peak=255.0)


def test_one_style_page_matches_stylize(site, browser, photo, tmp_path):
    url, root = site
    page = open_page(browser, f"{url}/one")
    assert page.text_content("#backend").startswith("WebAssembly")
    page.set_input_files("#file", str(photo))
    wait_render(page, 0)
    got = canvas_pixels(page)
    expected = reference(root / "one.pth", photo, tmp_path / "one.png")
    db = psnr_db(got, expected)
    print(f"one style: {db:.1f} dB PSNR, page {page.text_content('#timing')}")
    assert db >= MIN_PSNR_DB
    assert "ms per frame" in page.text_content("#timing")

    # keep the photo's colours at half strength: the same formulas as stylize's preserve_color and strength
    before = renders(page)
    set_control(page, "#preserve", True)
    set_control(page, "#strength", 50)
    wait_render(page, before + 1)
    expected = reference(root / "one.pth", photo, tmp_path / "one_half.png", preserve_color="true", strength=0.5)
    db = psnr_db(canvas_pixels(page), expected)
    print(f"one style, preserve_color, strength 0.5: {db:.1f} dB PSNR")
    assert db >= MIN_PSNR_DB

    # strength 0 gives the photo back, byte for byte
    before = renders(page)
    set_control(page, "#strength", 0)
    wait_render(page, before)
    assert np.array_equal(canvas_pixels(page), np.asarray(Image.open(photo).convert("RGB")))
    page.close()


def test_two_style_mix_matches_stylize_and_sliders_change_it(site, browser, photo, tmp_path):
    url, root = site
    page = open_page(browser, f"{url}/two")
    labels = [page.text_content(f"label[for=style-{i}]") for i in range(2)]
    assert labels == TWO_STYLES
    page.set_input_files("#file", str(photo))
    wait_render(page, 0)
    first = canvas_pixels(page)  # style s0 alone (the default)
    db = psnr_db(first, reference(root / "two.pth", photo, tmp_path / "s0.png", style="s0"))
    print(f"two styles, s0 alone: {db:.1f} dB PSNR")
    assert db >= MIN_PSNR_DB

    before = renders(page)
    set_control(page, "#style-0", 30)
    set_control(page, "#style-1", 70)
    page.wait_for_function(f"Number(document.body.dataset.renders) > {before}", timeout=TIMEOUT_MS)
    page.wait_for_function("document.body.dataset.state !== 'busy'", timeout=TIMEOUT_MS)
    mixed = canvas_pixels(page)
    assert not np.array_equal(mixed, first)
    expected = reference(root / "two.pth", photo, tmp_path / "mix.png", style="'s0:0.3,s1:0.7'")
    db = psnr_db(mixed, expected)
    print(f"two styles, mix 0.3/0.7: {db:.1f} dB PSNR")
    assert db >= MIN_PSNR_DB
    assert page.text_content("#style-1 + output") == "70%"

    # every weight 0 is not a mix: one line, and the last result stays
    set_control(page, "#style-0", 0)
    set_control(page, "#style-1", 0)
    page.wait_for_function("document.body.dataset.state !== 'busy'", timeout=TIMEOUT_MS)
    assert "at least one style" in page.text_content("#status")
    page.close()


def test_webgpu_backend_matches_stylize(site, playwright, photo, tmp_path):
    """The WebGPU path on Chromium's software adapter (SwiftShader): slow, but the same arithmetic on the GPU
    backend's shaders."""
    url, root = site
    flags = ["--enable-unsafe-webgpu", "--use-webgpu-adapter=swiftshader", "--enable-features=Vulkan"]
    chromium = playwright.chromium.launch(executable_path=_chromium(), headless=True, args=flags)
    try:
        page = chromium.new_page()
        page.goto(f"{url}/two/index.html?backend=webgpu")
        page.wait_for_function("['ready', 'failed'].includes(document.body.dataset.state)", timeout=TIMEOUT_MS)
        if page.get_attribute("body", "data-backend") != "webgpu":
            pytest.skip(f"no WebGPU adapter in this Chromium: {page.text_content('#backend')}")
        set_control(page, "#style-0", 50)
        set_control(page, "#style-1", 50)
        page.set_input_files("#file", str(photo))
        wait_render(page, 0)
        got = canvas_pixels(page)
        timing = page.text_content("#timing")
    finally:
        chromium.close()
    db = psnr_db(got, reference(root / "two.pth", photo, tmp_path / "gpu.png", style="'s0:0.5,s1:0.5'"))
    print(f"WebGPU (SwiftShader), mix 0.5/0.5: {db:.1f} dB PSNR, {timing}")
    assert db >= MIN_PSNR_DB


def test_too_large_for_the_device_is_one_line(site, browser, photo):
    url, _ = site
    page = open_page(browser, f"{url}/one", "&max_memory_mb=0.5")  # a device with half a megabyte to spare
    page.set_input_files("#file", str(photo))
    page.wait_for_function("document.getElementById('status').textContent.includes('too large')", timeout=TIMEOUT_MS)
    status = page.text_content("#status")
    assert "\n" not in status and "choose a smaller working size" in status, status
    assert renders(page) == 0
    page.close()


def test_camera_frames_and_frame_rate(site, browser):
    url, _ = site
    page = open_page(browser, f"{url}/two")
    page.click("#camera")
    page.wait_for_function("Number(document.body.dataset.cameraFrames || 0) >= 3", timeout=TIMEOUT_MS)
    assert page.text_content("#fps").endswith("frames/s")
    assert page.get_attribute("#camera", "aria-pressed") == "true"
    page.click("#camera")
    assert page.get_attribute("#camera", "aria-pressed") == "false"
    page.close()
