"""The web page's time per frame in headless Chromium (onnxruntime-web, WebAssembly), beside the same network in
PyTorch on this machine, as stylize.py runs it.

    flock /tmp/faststyle-cpu.lock .venv/bin/python -m benchmarks web                  # widths 16, 32; 512 px, 1080p
    python -m benchmarks web --widths 16 --sizes 512x288 --threads 1,2 --repeats 3

For each base width a randomly initialised TransformerNet (weights do not change the cost) is exported with
``python -m scripts.export --format web`` (interop/web_export.py) and served from 127.0.0.1 with the headers that
let WebAssembly use threads; Debian's Chromium (driven by playwright) opens the page with ``?backend=wasm&threads=N``,
is given a photo of each size at its own working size, and the page's own figure (the network's run, without
decoding and drawing) is read after one warm-up run: the median of ``--repeats``. Beside it, the network's forward
pass in this process, as stylize's Runner runs it: ``precision=auto`` and fp32 (core.precision), median of the same
repeats. Needs what ``make web-deps`` installs; figures are printed, never asserted.
"""

from __future__ import annotations

import argparse
import re
import shutil
import tempfile
from pathlib import Path

import torch
from PIL import Image

from benchmarks.common import save_random_model, time_call
from core.cli import tool_parser
from core.device import environment_line
from core.precision import resolve_precision
from interop.read import read_torch_model_file
from interop.web_export import export_web, runtime_files, serve_folder

CPU = torch.device("cpu")
PHOTO = Path(__file__).resolve().parents[1] / "data" / "samples" / "held_out" / "china.jpg"
TIMEOUT_MS = 600_000


def _sizes(text: str) -> list[tuple[int, int]]:
    return [tuple(int(v) for v in size.lower().split("x")) for size in text.split(",")]  # type: ignore[misc]


def _page_ms(browser: object, url: str, threads: int, photos: list[Path], repeats: int) -> list[float]:
    """The page's ms per frame for each photo (median of ``repeats`` after a warm-up run)."""
    page = browser.new_page()
    page.goto(f"{url}/index.html?backend=wasm&threads={threads}")
    page.wait_for_function("['ready', 'failed'].includes(document.body.dataset.state)", timeout=TIMEOUT_MS)
    if page.get_attribute("body", "data-state") != "ready":
        raise SystemExit(f"error: the page did not load: {page.text_content('#status')}")
    page.select_option("#size", "0")  # the photo's own size
    figures = []
    for photo in photos:
        times = []
        for _ in range(repeats + 1):
            before = int(page.get_attribute("body", "data-renders") or 0)
            page.set_input_files("#file", str(photo))
            page.wait_for_function(
                f"Number(document.body.dataset.renders || 0) > {before} && document.body.dataset.state !== 'busy'",
                timeout=TIMEOUT_MS,
            )
            found = re.search(r"([0-9.]+) ms per frame", page.text_content("#timing") or "")
            if found is None:
                raise SystemExit(f"error: no timing on the page: {page.text_content('#status')}")
            times.append(float(found.group(1)))
        runs = sorted(times[1:])
        figures.append(runs[len(runs) // 2])
    page.close()
    return figures


def _torch_seconds(model: Path, precision: str, size: tuple[int, int], repeats: int) -> float:
    """The forward pass as stylize's Runner runs it under ``precision`` (and channels_last auto)."""
    policy = resolve_precision(CPU, precision, "auto", False, training=False)
    net, _ = read_torch_model_file(model)
    net = policy.prepare_module(net, CPU).eval()
    x = policy.batch_to(torch.rand(1, 3, size[1], size[0]), CPU)
    with torch.inference_mode():
        return time_call(lambda: net(x), CPU, warmup=1, repeats=repeats)


def run(args: argparse.Namespace) -> int:
    try:
        runtime_files()
        from playwright.sync_api import sync_playwright
    except Exception as err:  # noqa: BLE001  (one line whatever is missing)
        print(f"error: {err}: run make web-deps")
        return 2
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        print("error: chromium is missing: run make web-deps as root (apt-get install -y chromium)")
        return 2
    sizes = _sizes(args.sizes)
    threads = [int(t) for t in args.threads.split(",")]
    print(environment_line(CPU))
    policy = resolve_precision(CPU, training=False).describe()
    print(f"# torch threads {torch.get_num_threads()}; stylize's auto here: {policy}")
    with tempfile.TemporaryDirectory(prefix="faststyle-web-bench-") as tmp:
        root = Path(tmp)
        photos = []
        for width, height in sizes:
            photo = root / f"photo_{width}x{height}.png"
            Image.open(PHOTO).convert("RGB").resize((width, height), Image.Resampling.LANCZOS).save(photo)
            photos.append(photo)
        models = {}
        for width in args.widths:
            models[width] = save_random_model(root / f"w{width}.pth", base_width=width)
            net, meta = read_torch_model_file(models[width])
            export_web(net, root / f"w{width}", meta)
        with serve_folder(root, isolated=True) as url, sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=chromium, headless=True)
            try:
                for width in args.widths:
                    for n in threads:
                        page = _page_ms(browser, f"{url}/w{width}", n, photos, args.repeats)
                        for (w, h), ms in zip(sizes, page, strict=True):
                            auto = _torch_seconds(models[width], "auto", (w, h), args.repeats)
                            fp32 = _torch_seconds(models[width], "fp32", (w, h), args.repeats)
                            print(
                                f"width {width:2d} {w}x{h}: page (WebAssembly, {n} thread(s)) {ms / 1000:7.3f} s; "
                                f"PyTorch as stylize runs it: auto {auto:6.3f} s ({ms / 1000 / auto:5.1f}x), "
                                f"fp32 {fp32:6.3f} s ({ms / 1000 / fp32:5.1f}x)"
                            )
            finally:
                browser.close()
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = tool_parser("python -m benchmarks web", __doc__)
    parser.add_argument("--widths", type=int, nargs="+", default=[16, 32], help="TransformerNet base widths")
    parser.add_argument("--sizes", default="512x288,1920x1080", help="photo sizes WxH, comma separated")
    parser.add_argument("--threads", default="1,2", help="WebAssembly threads, comma separated")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per size (median), after one warm-up")
    return run(parser.parse_args(argv))
