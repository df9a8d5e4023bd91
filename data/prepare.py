"""A short-side-resized JPEG copy of an image dataset, written once so every training pass decodes small files
(``python -m scripts.prepare_dataset`` is its command line; the data benchmark times training from such a copy).

Each image under the source (recursive, the same files ``ImageFolderDataset`` reads) is decoded (JPEG draft mode),
turned into RGB with its EXIF orientation applied, resized so that its short side is ``short_side`` pixels (never
upscaled: smaller images are only re-encoded) and written as JPEG at the same relative path (``x.jpg`` stays
``x.jpg``; ``x.png`` becomes ``x.png.jpg`` so names cannot collide). Runs in parallel, skips and counts corrupt
files, writes each file atomically, and is idempotent: a second run only writes outputs that are missing or older
than their source. The output folder remembers the settings it was made with (``.faststyle_prepare.json``).
"""

from __future__ import annotations

import json
import logging
import os
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from core.errors import FaststyleError
from core.fileio import atomic_write, atomic_write_text
from data.dataset import DECODE_ERRORS, scan_image_files
from data.io import load_image, resize_short_side

log = logging.getLogger(__name__)

SETTINGS_FILE = ".faststyle_prepare.json"
"""Settings a prepared folder was written with (hidden: the dataset scan skips names starting with a dot)."""


def output_name(relative: Path) -> Path:
    """Where ``relative`` (a path under SRC) goes under DST: JPEGs keep their name, others get ``.jpg`` appended."""
    if relative.suffix.lower() in (".jpg", ".jpeg"):
        return relative
    return relative.with_name(relative.name + ".jpg")


def _prepare_one(job: tuple[str, str, int, int]) -> tuple[str, str]:
    """Resize one file; returns (status, detail) with status "written", "current" or "skipped" (corrupt)."""
    source, target, short_side, quality = job
    src, dst = Path(source), Path(target)
    if dst.exists() and dst.stat().st_mtime >= src.stat().st_mtime:
        return "current", ""
    try:
        img = load_image(src, min_short_side=short_side)  # no pixel limit: shrinking big images is its job
    except DECODE_ERRORS as err:
        return "skipped", f"{src}: {err}"
    if min(img.size) > short_side:
        img = resize_short_side(img, short_side)
    atomic_write(dst, lambda handle: img.save(handle, format="JPEG", quality=quality))
    return "written", ""


def _check_settings(dst: Path, settings: dict, force: bool) -> None:
    """Refuse to mix outputs made with different settings in one folder; record the settings (atomically)."""
    path = dst / SETTINGS_FILE
    if path.exists() and not force:
        try:
            previous = json.loads(path.read_text())
        except (OSError, ValueError):
            previous = None
        if previous != settings:
            raise FaststyleError(
                f"{dst} was prepared with other settings ({previous}); use a new output folder or pass --force"
            )
    atomic_write_text(path, json.dumps(settings, indent=1) + "\n")


def prepare(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    short_side: int = 256,
    quality: int = 95,
    workers: int | None = None,
    force: bool = False,
    progress: bool = False,
) -> dict[str, int]:
    """Write the resized copy of ``src`` into ``dst``; returns counts {"written", "current", "skipped", "total"}."""
    src_path, dst_path = Path(src).resolve(), Path(dst).resolve()
    if short_side < 1:
        raise FaststyleError(f"--short-side must be a positive number of pixels, got {short_side}")
    if not 1 <= quality <= 100:
        raise FaststyleError(f"--quality must be between 1 and 100, got {quality}")
    if dst_path == src_path or src_path in dst_path.parents or dst_path in src_path.parents:
        raise FaststyleError(f"the output folder {dst} and the source {src} must not contain each other: pick another")
    files = scan_image_files(src_path)
    _check_settings(dst_path, {"short_side": short_side, "quality": quality, "source": str(src_path)}, force)
    if force:  # other settings: every output must be rewritten
        for file in files:
            (dst_path / output_name(file.relative_to(src_path))).unlink(missing_ok=True)
    jobs = [(str(file), str(dst_path / output_name(file.relative_to(src_path))), short_side, quality) for file in files]
    counts = {"written": 0, "current": 0, "skipped": 0, "total": len(jobs)}
    workers = workers or os.cpu_count() or 1
    results = map(_prepare_one, jobs)
    pool = None
    if workers > 1 and len(jobs) > 1:
        pool = ProcessPoolExecutor(max_workers=workers)
        results = pool.map(_prepare_one, jobs, chunksize=max(1, min(64, len(jobs) // (4 * workers))))
    try:
        if progress:
            from tqdm import tqdm

            results = tqdm(results, total=len(jobs), unit="img", desc="prepare")
        for status, detail in results:
            counts[status] += 1
            if status == "skipped":
                log.warning("skipping unreadable image %s", detail)
    finally:
        if pool is not None:
            pool.shutdown()
    return counts
