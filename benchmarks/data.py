"""Data pipeline benchmark: decode + resize + crop images/s of the training loader with 0, 1 and 2 workers.

    python -m benchmarks data                      # 640x480 photo-like JPEGs, 256 px crops, batch 4
    python -m benchmarks data --image-size 128     # small crops: JPEG draft mode decodes at 1/2 scale
    python -m benchmarks data --train-images-per-s 1.2   # also print the margin over a training step

It generates COCO-like photos at run time (640x480 JPEGs, quality 90, smooth color fields with edges and sensor-like
noise, about the size of COCO's files) in a temporary folder, then times ``make_train_loader`` over them: with JPEG
draft mode on and off, and from a ``data.prepare`` copy (what ``python -m scripts.prepare_dataset`` writes) whose
short side is the crop size. Each figure includes the loader's start (worker processes), so it slightly under-states
the steady state. Files are read from the page cache (just written): a cold disk adds its own read time.
"""

from __future__ import annotations

import argparse
import math
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from core.cli import tool_parser
from data.dataset import ImageFolderDataset, make_train_loader
from data.io import MAX_DECODE_PIXELS, load_image, pil_to_tensor, resize_short_side


def photo_like(width: int, height: int, rng: np.random.Generator) -> Image.Image:
    """A photo-like RGB image: smooth color fields at three scales, a few hard-edged shapes, mild noise.

    JPEG cost depends on content (entropy decoding dominates), so flat or pure-noise images would mis-state decode
    speed; this mix lands near COCO's typical 100-200 KB per 640x480 file at quality 90.
    """
    field = np.zeros((height, width, 3), dtype=np.float32)
    for cells, amplitude in ((3, 90.0), (12, 40.0), (48, 25.0), (160, 40.0)):
        small = rng.uniform(-1, 1, (cells, max(2, cells * width // height), 3)).astype(np.float32)
        layer = Image.fromarray(((small + 1) * 127.5).astype(np.uint8), "RGB").resize(
            (width, height), Image.Resampling.BICUBIC
        )
        field += (np.asarray(layer, dtype=np.float32) / 127.5 - 1) * amplitude
    field += 128.0
    for _ in range(6):  # hard edges, like object boundaries
        x0, y0 = rng.integers(0, width), rng.integers(0, height)
        w, h = rng.integers(20, width // 2), rng.integers(20, height // 2)
        field[y0 : y0 + h, x0 : x0 + w] += rng.uniform(-60, 60, 3).astype(np.float32)
    field += rng.standard_normal(field.shape, dtype=np.float32) * 8.0
    return Image.fromarray(np.clip(field, 0, 255).astype(np.uint8), "RGB")


def make_photos(folder: Path, count: int, width: int, height: int, seed: int = 0, unique: int = 16) -> float:
    """Write ``count`` photo-like JPEGs into ``folder``; returns their mean size in KB.

    ``unique`` base images are synthesised (the slow part) and each file is a randomly shifted and flipped copy:
    every file is still a distinct JPEG with the same decode cost.
    """
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    bases = [np.asarray(photo_like(width, height, rng)) for _ in range(min(count, unique))]
    total = 0
    for i in range(count):
        pixels = np.roll(bases[i % len(bases)], (int(rng.integers(height)), int(rng.integers(width))), axis=(0, 1))
        if rng.random() < 0.5:
            pixels = pixels[:, ::-1]
        path = folder / f"photo_{i:05d}.jpg"
        Image.fromarray(np.ascontiguousarray(pixels), "RGB").save(path, quality=90)
        total += path.stat().st_size
    return total / count / 1024


def stage_times_ms(folder: Path, image_size: int, draft: bool, limit: int = 32) -> dict[str, float]:
    """Mean ms per image of each stage in this process: decode, resize, crop + tensor."""
    files = sorted(folder.glob("*.jpg"))[:limit]
    totals = {"decode": 0.0, "resize": 0.0, "crop+tensor": 0.0}
    for path in files:
        t0 = time.perf_counter()
        img = load_image(path, min_short_side=image_size if draft else None, max_pixels=MAX_DECODE_PIXELS)
        t1 = time.perf_counter()
        img = resize_short_side(img, image_size)
        t2 = time.perf_counter()
        pil_to_tensor(img.crop((0, 0, image_size, image_size)))
        t3 = time.perf_counter()
        totals["decode"] += t1 - t0
        totals["resize"] += t2 - t1
        totals["crop+tensor"] += t3 - t2
    return {k: 1000 * v / len(files) for k, v in totals.items()}


def loader_rates(
    folder: Path, image_size: int, draft: bool, workers: int, batch_size: int, images: int
) -> tuple[float, float, float]:
    """(seconds to the first batch, steady images/s after it, overall images/s) of ``make_train_loader``.

    The steady rate slightly over-states (batches prefetched while the first one was awaited count as fast), the
    overall rate under-states (it includes starting the workers); the truth for a long run is in between, nearer
    the steady rate.
    """
    dataset = ImageFolderDataset(folder, image_size, train=True, draft=draft)
    batches = max(2, images // batch_size)
    start = time.perf_counter()
    loader = make_train_loader(dataset, batch_size=batch_size, num_workers=workers, seed=0)
    batch = next(loader)
    first = time.perf_counter()
    for _ in range(batches - 1):
        batch = next(loader)
    end = time.perf_counter()
    loader.close()
    assert batch.shape == (batch_size, 3, image_size, image_size)
    return first - start, (batches - 1) * batch_size / (end - first), batches * batch_size / (end - start)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--images", type=int, default=200, help="generated photos, timed once per row (200)")
    parser.add_argument("--width", type=int, default=640, help="photo width (640, like COCO)")
    parser.add_argument("--height", type=int, default=480, help="photo height (480)")
    parser.add_argument("--image-size", type=int, default=256, help="training crop size (256)")
    parser.add_argument("--batch-size", type=int, default=4, help="loader batch size (4)")
    parser.add_argument("--workers", default="0,1,2", help="comma-separated worker counts (0,1,2)")
    parser.add_argument(
        "--train-images-per-s",
        type=float,
        default=None,
        help="images/s one training step consumes on this machine (from `python -m benchmarks train`): prints "
        "the margin",
    )
    parser.add_argument("--gpu-images-per-s", type=float, default=100.0, help="GPU consumption to size workers for")
    parser.add_argument("--threads", type=int, default=1, help="torch threads in the main process (1)")


def run(args: argparse.Namespace) -> int:
    # Long: the report itself, set-up, stage lines, table and verdicts in the order they print.
    workers = [int(w) for w in str(args.workers).split(",") if w.strip()]
    if args.images < args.batch_size or any(w < 0 for w in workers) or not workers:
        raise SystemExit("error: need --images >= --batch-size and worker counts >= 0")
    torch.set_num_threads(args.threads)
    from data.prepare import prepare

    with tempfile.TemporaryDirectory(prefix="faststyle-bench-data-") as tmp:
        photos, prepared = Path(tmp) / "photos", Path(tmp) / "prepared"
        kb = make_photos(photos, args.images, args.width, args.height)
        start = time.perf_counter()
        prepare(photos, prepared, short_side=args.image_size, workers=max(1, max(workers)))
        prepare_s = time.perf_counter() - start
        draft_applies = min(args.width, args.height) >= 2 * args.image_size
        print(f"# torch {torch.__version__}, {torch.get_num_threads()} main-process threads")
        print(
            f"# {args.images} photo-like {args.width}x{args.height} JPEGs (q90, mean {kb:.0f} KB), crops "
            f"{args.image_size} px, batch {args.batch_size}; prepare_dataset copy made in {prepare_s:.1f} s"
        )
        if not draft_applies:
            print(
                f"# draft mode needs a short side >= 2x the crop ({2 * args.image_size} px): on these photos "
                "it decodes at full size, so 'on' and 'off' are the same work"
            )
        for label, folder, draft in (("original", photos, True), ("original", photos, False)):
            stages = stage_times_ms(folder, args.image_size, draft)
            print(
                f"# per-image stages, {label}, draft {'on' if draft else 'off'}: "
                + ", ".join(f"{k} {v:.1f} ms" for k, v in stages.items())
            )
        stages = stage_times_ms(prepared, args.image_size, True)
        print("# per-image stages, prepared copy: " + ", ".join(f"{k} {v:.1f} ms" for k, v in stages.items()))
        rows = []
        for label, folder, draft in (
            (f"original {args.width}x{args.height}", photos, True),
            (f"original {args.width}x{args.height}", photos, False),
            (f"prepared (short side {args.image_size})", prepared, True),
        ):
            for count in workers:
                first_s, steady, overall = loader_rates(
                    folder, args.image_size, draft, count, args.batch_size, args.images
                )
                rows.append((label, "on" if draft else "off", count, steady, first_s, overall))
    print()
    print(
        f"{'source':<30} {'draft':>5} {'workers':>7} {'images/s':>9} {'ms/image':>9} "
        f"{'1st batch s':>11} {'incl. start':>11}"
    )
    for label, draft, count, steady, first_s, overall in rows:
        print(
            f"{label:<30} {draft:>5} {count:>7} {steady:>9.1f} {1000 / steady:>9.2f} {first_s:>11.2f} {overall:>11.1f}"
        )
    print("(images/s: steady state after the first batch; 'incl. start': over the whole run, worker start included)")
    print()
    for label in dict.fromkeys(r[0] for r in rows):
        one = [r[3] for r in rows if r[0] == label and r[2] == 1 and r[1] == "on"]
        if one:
            need = math.ceil(args.gpu_images_per_s / one[0])
            print(
                f"{label}: one worker gives {one[0]:.0f} images/s -> a GPU at {args.gpu_images_per_s:.0f} images/s "
                f"needs at least {need} worker(s), each on its own core of this speed "
                f"({need + 1} leave headroom for larger files and the training process's own CPU work)"
            )
    most = max(workers)
    best = [r[3] for r in rows if r[2] == most and r[1] == "on"]
    if args.train_images_per_s:
        ratio = best[0] / args.train_images_per_s
        verdict = "met" if ratio >= 5 else "NOT met"
        print(
            f"{most} worker(s) ({best[0]:.0f} images/s, original photos, draft on) vs one CPU training step "
            f"({args.train_images_per_s:.2f} images/s): {ratio:.0f}x (target with 2 workers >= 5x: {verdict})"
        )
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = tool_parser("python -m benchmarks data", __doc__)
    add_arguments(parser)
    return run(parser.parse_args(argv))
