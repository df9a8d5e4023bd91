"""Peak memory of stylize.py on huge images: a 12000x12000 photo-like image and a flat 12000x12000 PNG.

    python -m benchmarks huge                                      # both cases, max_memory_mb=2048 (~12 min on 2 cores)
    python -m benchmarks huge --cases photo --size 6000x4000 --budget-mb 512
    python -m benchmarks huge --help

What it does, in a temporary folder: writes a model file (a randomly initialised TransformerNet: weights change
neither speed nor memory; --model gives a trained one), a real-content image (the four sample photos of
data/samples/content upscaled into a 2x2 grid, plus uniform noise of +-12 levels, saved as JPEG quality 90), a
flat PNG like the hardening issue's (one grey level: ~165 KB of compressed data that decode to 12000 x 12000
pixels) and a 64x48 photo. Then it runs ``python stylize.py model=... input=... max_memory_mb=...`` as a subprocess for
each image and reads that process's peak RSS from ``os.wait4``.

Why the files are made in a separate process: Linux starts a child's ru_maxrss at the *peak* RSS of the process
that spawned it (Python spawns with vfork, and exec records the old address space's high-water mark), so a parent
that once held a 12000 x 12000 image would inflate every figure. This process imports neither torch nor Pillow;
its own peak RSS is printed as the floor below which a figure cannot go.

The printed bound is the one stylize.py documents: max_memory_mb + the 8-bit input image + the 8-bit output image
(Pillow holds RGB and RGBA as 4 bytes per pixel; the tiled path writes its output over the input, so only one of
the two exists) + the fixed overhead, measured here as the peak RSS of the same command on the 64x48 photo through
the tiled path (max_memory_mb=0.01). Figures are printed, never asserted.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import resource
import shutil
import struct
import subprocess
import sys
import tempfile
import threading
import time
import zlib
from pathlib import Path

from core.cli import tool_parser

# Not benchmarks.common: it imports torch, and this process must stay small (see the module docstring).
REPO_ROOT = Path(__file__).resolve().parents[1]
PHOTOS = REPO_ROOT / "data" / "samples" / "content"
MiB = 2**20


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--size", default="12000x12000", help="image size WxH (default 12000x12000, 144 MP)")
    parser.add_argument("--budget-mb", type=float, default=2048, help="stylize max_memory_mb (default: the default)")
    parser.add_argument("--cases", default="photo,flat", help="comma separated: photo (real content), flat (PNG)")
    parser.add_argument("--model", default=None, help="a model.pth (default: random TransformerNet, base width 32)")
    parser.add_argument("--base-width", type=int, default=32, help="base width of the random model")
    parser.add_argument(
        "--workdir",
        default=None,
        help="folder for images, outputs and disk stores "
        "(default: a temporary folder in the system temp, removed afterwards)",
    )
    parser.add_argument("--stylize-arg", action="append", default=[], help="extra stylize.py override (repeatable)")
    parser.add_argument(
        "--make", nargs=4, metavar=("WORKDIR", "SIZE", "CASES", "BASE_WIDTH"), default=None, help=argparse.SUPPRESS
    )  # the child that writes the model and the images


def make_photo(path: Path, width: int, height: int, seed: int = 0) -> None:
    """A photo-like JPEG: the sample photos upscaled into a 2x2 grid, with noise (so no area is flat)."""
    import numpy as np
    from PIL import Image

    canvas = Image.new("RGB", (width, height))
    photos = sorted(PHOTOS.glob("*.jpg"))[:4]
    half_w, half_h = width // 2, height // 2
    for i, source in enumerate(photos):
        with Image.open(source) as img:
            tile = img.convert("RGB").resize(
                (width - half_w if i % 2 else half_w, height - half_h if i // 2 else half_h), Image.Resampling.BICUBIC
            )
        canvas.paste(tile, ((i % 2) * half_w, (i // 2) * half_h))
        del tile
    rng = np.random.default_rng(seed)
    rows = max(1, 16 * 2**20 // (width * 3))
    for top in range(0, height, rows):  # noise strip by strip: this process stays small too
        box = (0, top, width, min(height, top + rows))
        strip = np.asarray(canvas.crop(box), dtype=np.int16)
        strip += rng.integers(-12, 13, strip.shape, dtype=np.int16)
        canvas.paste(Image.fromarray(strip.clip(0, 255).astype(np.uint8)), box)
    canvas.save(path, quality=90)


def make_flat_png(path: Path, width: int, height: int) -> None:
    """A valid greyscale PNG of one grey level, compressed to almost nothing (the issue's 'bomb' file)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    row = b"\x00" + bytes([128]) * width  # filter byte "none" + one grey byte per pixel
    compressor = zlib.compressobj(9)
    data = b"".join(compressor.compress(row) for _ in range(height)) + compressor.flush()
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", data) + chunk(b"IEND", b""))


def _folder_bytes(folder: Path) -> int:
    """Bytes allocated on disk by the files in ``folder`` (recursively; files may vanish while we look)."""
    total = 0
    for dirpath, _, names in os.walk(folder):
        for name in names:
            with contextlib.suppress(OSError):
                total += os.stat(os.path.join(dirpath, name)).st_blocks * 512
    return total


def run_stylize(args: list[str], stores: Path) -> dict:
    """Run stylize.py with ``args``; its peak RSS (os.wait4), wall time, exit status, stderr tail and the peak
    disk space its temporary activation stores took."""
    command = [sys.executable, "stylize.py", *args]
    peak_disk = 0
    done = threading.Event()

    def watch_disk() -> None:
        nonlocal peak_disk
        while not done.wait(1.0):
            peak_disk = max(peak_disk, _folder_bytes(stores))

    watcher = threading.Thread(target=watch_disk, daemon=True)
    start = time.perf_counter()
    with tempfile.TemporaryFile() as err:
        proc = subprocess.Popen(command, cwd=REPO_ROOT, stdout=subprocess.DEVNULL, stderr=err)
        watcher.start()
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        seconds = time.perf_counter() - start
        done.set()
        watcher.join()
        err.seek(0)
        stderr = err.read().decode(errors="replace")
    lines = [line for line in stderr.splitlines() if line.strip()]
    return {
        "rc": proc.returncode,
        "peak_rss": usage.ru_maxrss * 1024,
        "seconds": seconds,
        "peak_disk": peak_disk,
        "tail": lines[-3:],
        "command": " ".join(["python", "stylize.py", *args]),
    }


def make_files(workdir: Path, size: str, cases: list[str], base_width: int) -> None:
    """Write model.pth (unless base_width is 0), tiny.jpg and the images of ``cases`` into ``workdir``."""
    width, height = (int(v) for v in size.lower().split("x"))
    if base_width:
        from benchmarks.common import save_random_model  # in the child that writes the files: torch is fine here

        save_random_model(workdir / "model.pth", base_width)
    make_photo(workdir / "tiny.jpg", 64, 48)
    if "photo" in cases:
        make_photo(workdir / f"photo_{width}x{height}.jpg", width, height)
    if "flat" in cases:
        make_flat_png(workdir / f"flat_{width}x{height}.png", width, height)


def run(args: argparse.Namespace) -> int:
    # Long: one sequence (files from a child, the fixed overhead, each case) that keeps every printed bound beside
    # the measurement it is compared with.
    if args.make:
        workdir, size, cases, base_width = args.make
        make_files(Path(workdir), size, cases.split(","), int(base_width))
        return 0
    width, height = (int(v) for v in args.size.lower().split("x"))
    cases = [c.strip() for c in args.cases.split(",") if c.strip()]
    workdir = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="bench-huge-"))
    workdir.mkdir(parents=True, exist_ok=True)
    try:
        model = Path(args.model) if args.model else workdir / "model.pth"
        start = time.perf_counter()
        subprocess.run(
            [
                sys.executable,
                "-m",
                "benchmarks",
                "huge",
                "--make",
                str(workdir),
                args.size,
                ",".join(cases),
                "0" if args.model else str(args.base_width),
            ],
            check=True,
            cwd=REPO_ROOT,
        )
        images = {
            "tiny": workdir / "tiny.jpg",
            "photo": workdir / f"photo_{width}x{height}.jpg",
            "flat": workdir / f"flat_{width}x{height}.png",
        }
        stores = workdir / "stores"
        stores.mkdir(exist_ok=True)
        own_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        print(
            f"# files written in {time.perf_counter() - start:.0f} s to {workdir}; this process's peak RSS "
            f"{own_peak / MiB:.0f} MiB (the floor of every figure below); load average "
            f"{os.getloadavg()[0]:.2f} (2-core machine: times are noisy above ~0.5)"
        )

        def stylize(name: str, budget_mb: float) -> dict:
            overrides = [
                f"model={model}",
                f"input={images[name]}",
                f"output={workdir / 'out'}",
                f"max_memory_mb={budget_mb:g}",
                f"tmp_dir={stores}",
                "overwrite=true",
                *args.stylize_arg,
            ]
            return run_stylize(overrides, stores)

        tiny = stylize("tiny", 0.01)  # through the tiled path, like the huge images
        if tiny["rc"] != 0:
            print(f"tiny image failed (exit {tiny['rc']}): {' | '.join(tiny['tail'])}")
            return 1
        overhead = tiny["peak_rss"]
        print(f"fixed overhead (64x48 photo, tiled): peak RSS {overhead / MiB:.0f} MiB")
        image_bytes = width * height * 4  # Pillow: RGB and RGBA are 4 bytes per pixel
        budget = args.budget_mb * MiB
        bound = budget + 2 * image_bytes + overhead
        for name in cases:
            res = stylize(name, args.budget_mb)
            size_mb = images[name].stat().st_size / 1e6
            status = "written" if res["rc"] == 0 else f"exit {res['rc']}: {' | '.join(res['tail'])}"
            print(
                f"{name} {width}x{height} ({width * height / 1e6:.0f} MP, file {size_mb:.3g} MB), "
                f"max_memory_mb={args.budget_mb:g}: peak RSS {res['peak_rss'] / MiB:.0f} MiB; bound "
                f"{bound / MiB:.0f} MiB = budget {budget / MiB:.0f} + 8-bit in {image_bytes / MiB:.0f} + 8-bit out "
                f"{image_bytes / MiB:.0f} + overhead {overhead / MiB:.0f}; peak RSS - overhead - 8-bit image = "
                f"{(res['peak_rss'] - overhead - image_bytes) / MiB:.0f} MiB; wall {res['seconds']:.0f} s; "
                f"disk stores peak {res['peak_disk'] / 1e9:.1f} GB; {status}"
            )
            print(f"  command: {res['command']}")
        return 0
    finally:
        if not args.workdir:
            shutil.rmtree(workdir, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    parser = tool_parser("python -m benchmarks huge", __doc__)
    add_arguments(parser)
    return run(parser.parse_args(argv))
