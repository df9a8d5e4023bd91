"""Held-out photos: content images never trained on, checked byte for byte against each run's training data, and
loaded as the tensors the measures take."""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor

from core.errors import FaststyleError
from core.fileio import file_sha256
from data.io import is_image_file, load_image, pil_to_tensor, resize_max_side, walk_images
from evaluation.runs import Run, config_value

log = logging.getLogger(__name__)

DEFAULT_HELD_OUT = Path(__file__).resolve().parents[1] / "data" / "samples" / "held_out"
"""The shipped held-out photos (data/samples/held_out: never a training image of the demo)."""


def collect_images(paths: Sequence[str | os.PathLike]) -> list[Path]:
    """Image files named by ``paths`` (files, or directories scanned recursively), sorted, duplicates removed."""
    files: list[Path] = []
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            files.extend(walk_images(path)[0])
        elif path.is_file():
            if not is_image_file(path):
                raise FaststyleError(f"{path} is not an image file (use .jpg, .png, .webp or .bmp)")
            files.append(path)
        else:
            raise FaststyleError(f"held-out image path {path} does not exist: pass files or folders with --content")
    unique = list(dict.fromkeys(p.resolve() for p in files))
    if not unique:
        named = ", ".join(map(str, paths))
        raise FaststyleError(f"no held-out images in {named}: pass files or folders with --content")
    return unique


def check_held_out(held_out: Sequence[Path], training_roots: Sequence[Path]) -> None:
    """Raise FaststyleError if any held-out file is (byte for byte) one of the training images.

    Compares sizes first and hashes only files of equal size, so a COCO-sized training folder costs one ``stat``
    per file. (A resized or re-encoded copy would not be caught; the held-out folder's README says where the
    photos come from.)
    """
    by_size: dict[int, list[Path]] = {}
    for path in held_out:
        by_size.setdefault(path.stat().st_size, []).append(path)
    hashes: dict[Path, str] = {}
    for root in training_roots:
        if not root.is_dir():
            raise FaststyleError(f"training data root {root} is not a folder: cannot check the held-out images")
        for candidate in walk_images(root)[0]:  # the files training reads
            same_size = by_size.get(candidate.stat().st_size)
            if not same_size:
                continue
            digest = file_sha256(candidate)
            for path in same_size:
                if hashes.setdefault(path, file_sha256(path)) == digest:
                    raise FaststyleError(
                        f"held-out image {path} is the training image {candidate}: pick held-out photos "
                        f"that are not under the training data root {root}"
                    )


def load_content(path: Path, max_side_px: int) -> Tensor:
    """Load a photo as a (1, 3, H, W) tensor in [0, 1], longest side at most ``max_side_px``."""
    return pil_to_tensor(resize_max_side(load_image(path), max_side_px)).unsqueeze(0)


def held_out_images(
    content: Sequence[str | os.PathLike],
    runs: Sequence[Run],
    max_images: int,
    max_side_px: int,
    device: torch.device,
) -> tuple[list[Path], list[Tensor]]:
    """The first ``max_images`` held-out files, checked against every run's training data, and their tensors
    ((1, 3, H, W) in [0, 1] on ``device``)."""
    roots = list(dict.fromkeys(Path(str(config_value(r, "data.root"))).resolve() for r in runs))
    files = collect_images(content)[:max_images]
    check_held_out(files, roots)
    log.info("held-out images: %s", ", ".join(p.name for p in files))
    return files, [load_content(p, max_side_px).to(device) for p in files]
