"""Write a short-side-resized JPEG copy of an image dataset once, so every training pass decodes small files.

    python -m scripts.prepare_dataset data/coco/train2014 data/coco/train2014_256 --short-side 256
    python train.py ... data.root=data/coco/train2014_256 data.image_size=256

Each image under SRC (recursive, the same files ``ImageFolderDataset`` reads) is decoded (JPEG draft mode), turned
into RGB with its EXIF orientation applied, resized so that its short side is ``--short-side`` pixels (never
upscaled: smaller images are only re-encoded) and written as JPEG under DST at the same relative path (``x.jpg``
stays ``x.jpg``; ``x.png`` becomes ``x.png.jpg`` so names cannot collide). With ``--short-side`` equal to the
training ``data.image_size`` the loader's own resize becomes a no-op, so training sees the same crops, from images
that went through one extra JPEG encode (quality 95 by default).

Runs in parallel (``--workers``), skips and counts corrupt files, writes each file atomically, and is idempotent:
a second run only writes outputs that are missing or older than their source. DST remembers the settings it was
made with (``.faststyle_prepare.json``); running again with other settings is an error unless ``--force``.
"""

from __future__ import annotations

import argparse
import time

from core.cli import run_tool, tool_parser
from data.prepare import prepare


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The command-line options (also used by tests)."""
    parser.add_argument("src", help="dataset folder to read (recursively)")
    parser.add_argument("dst", help="output folder (created; must not be inside SRC)")
    parser.add_argument("--short-side", type=int, default=256, help="short side of the copies in px (default 256)")
    parser.add_argument("--quality", type=int, default=95, help="JPEG quality of the copies (default 95)")
    parser.add_argument("--workers", type=int, default=None, help="parallel processes (default: all CPU cores)")
    parser.add_argument("--force", action="store_true", help="rewrite everything, even with other settings")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def main(argv: list[str] | None = None) -> int:
    parser = tool_parser("python -m scripts.prepare_dataset", __doc__)
    add_arguments(parser)
    args = parser.parse_args(argv)

    def work() -> None:
        start = time.perf_counter()
        counts = prepare(
            args.src, args.dst, args.short_side, args.quality, args.workers, args.force, progress=not args.quiet
        )
        seconds = time.perf_counter() - start
        print(
            f"{counts['total']} images: {counts['written']} written, {counts['current']} already up to date, "
            f"{counts['skipped']} unreadable skipped, in {seconds:.1f} s -> {args.dst}"
        )
        print(f"train with: data.root={args.dst} data.image_size<={args.short_side}")

    return run_tool(work)


if __name__ == "__main__":
    raise SystemExit(main())
