"""Images in, batches out: a dataset over a directory tree of images and an infinite, resumable training loader.

Contract (used by ``train.py``):

- ``ImageFolderDataset(root, image_size, train=True)`` scans ``root`` recursively for ``IMAGE_EXTENSIONS`` files in
  any letter case (sorted by relative path, so the order is the same on every machine), and ``dataset[i]`` returns
  a (3, image_size, image_size) float32 RGB tensor in [0, 1]: the file is decoded (JPEG draft mode when it is much
  larger than needed), converted to RGB by ``data.io.to_rgb`` (grayscale, palette, CMYK, RGBA, 16-bit), EXIF-rotated,
  resized so that its short side is ``image_size`` (only the crop's pixels are resampled), then randomly cropped
  (``train=True``) or centre-cropped (``train=False``) to a square. A missing, non-directory or image-less ``root``
  raises ``FaststyleError`` in the constructor, so ``train.py`` fails before it builds any model.
- A corrupt or unreadable file never stops a run: the dataset substitutes the next readable file (so batches keep
  their size, which DDP and ``torch.compile`` like) and reports the bad path. ``TrainLoader`` collects these reports
  from its worker processes, logs one warning per bad file in the main process and exposes the count as
  ``loader.skipped`` (``dataset.skipped`` counts what was seen in the current process only).
- ``make_train_loader(dataset, batch_size, num_workers, seed, pin_memory, rank, world_size, start_step)`` returns a
  ``TrainLoader``: ``next(loader)`` gives the (batch_size, 3, S, S) batch of the next training step, forever.
  Training is measured in steps: the data is an endless stream of passes, each pass a fresh permutation drawn from
  ``(seed, pass number)``; global step ``s`` takes stream positions ``[s*B*W, (s+1)*B*W)`` (B = per-rank batch,
  W = world size) and rank ``r`` takes the ``r``-th slice of ``B``. Hence ranks see disjoint samples, the ranks'
  batches concatenated in rank order equal the batch of a single process with batch ``B*W`` (same images, same
  crops), and ``start_step=k`` resumes exactly where an uninterrupted run would be at step ``k``. Random crops are
  drawn from a seed derived from ``(seed, stream position)``, not from worker RNG state, for the same reason.
- Worker processes ignore SIGINT and SIGTERM: stopping is the training process's decision (training/interrupt.py),
  and it shuts its workers down itself.
"""

from __future__ import annotations

import logging
import os
import random
import signal
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Sampler, get_worker_info

from core.errors import FaststyleError
from data.io import (
    DOWNSCALE_FILTER,
    IMAGE_EXTENSIONS,
    MAX_DECODE_PIXELS,
    UPSCALE_FILTER,
    load_image,
    pil_to_tensor,
    walk_images,
)

log = logging.getLogger(__name__)

# Errors that mean "this file is not a readable image" (Pillow raises UnidentifiedImageError (an OSError) for unknown
# content, OSError for truncated data, SyntaxError/ValueError/EOFError from some format parsers, and
# DecompressionBombError for absurd pixel counts). Anything else is a bug and keeps its traceback.
DECODE_ERRORS: tuple[type[BaseException], ...] = (
    OSError,
    ValueError,
    SyntaxError,
    EOFError,
    Image.DecompressionBombError,
    FaststyleError,
)

MAX_CONSECUTIVE_BAD_FILES = 16
"""After this many unreadable files in a row the data is not a folder of images: raise instead of substituting."""

_MASK64 = (1 << 64) - 1


def _mix64(*values: int) -> int:
    """Deterministic 64-bit hash of integers (SplitMix64 finaliser, Steele et al. 2014), the same in every process.

    Python's ``hash`` is salted per process for strings and ``random.Random`` takes no tuple seed, so the seeds of
    passes and crops are derived from several integers with this small mixer instead.
    """
    state = 0x9E3779B97F4A7C15
    for value in values:
        state = (state + (value & _MASK64) + 0x9E3779B97F4A7C15) & _MASK64
        z = state
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
        state = z ^ (z >> 31)
    return state


def scan_image_files(root: str | os.PathLike) -> list[Path]:
    """All image files under ``root`` (recursive, any letter case of ``IMAGE_EXTENSIONS``), sorted by relative path.

    Hidden files and folders (names starting with ".", e.g. macOS ``._x.jpg`` resource forks) are left out.
    Symbolic links to folders are followed once (a link loop is not walked twice). Raises FaststyleError when
    ``root`` is missing, is not a folder, or holds no image.
    """
    root = Path(root).expanduser()
    hint = "set data.root to a folder of images; for COCO run scripts/download_coco.sh"
    if not root.exists():
        raise FaststyleError(f"dataset folder not found: {root} ({hint})")
    if not root.is_dir():
        raise FaststyleError(f"dataset path is not a folder: {root} ({hint})")
    found, skipped = walk_images(root, recursive=True)
    for path, reason in skipped:
        log.warning("skipping %s: %s", path, reason)
    if not found:
        raise FaststyleError(
            f"no images in dataset folder {root}: expected files ending in {', '.join(IMAGE_EXTENSIONS)} "
            f"(any letter case) in it or its subfolders ({hint})"
        )
    return found


def _crop_box(width: int, height: int, size: int, crop_seed: int | None) -> tuple[int, int, int, int]:
    """(left, top, right, bottom) of a size x size crop: centred when ``crop_seed`` is None, else seeded-random."""
    if crop_seed is None:
        left, top = (width - size) // 2, (height - size) // 2
    else:
        rng = random.Random(crop_seed)
        left, top = rng.randint(0, width - size), rng.randint(0, height - size)
    return left, top, left + size, top + size


def resized_square_crop(img: Image.Image, size: int, crop_seed: int | None) -> Image.Image:
    """The size x size crop of ``img`` resized so that its short side is ``size`` (``data.io.resize_short_side``).

    Same result as ``resize_short_side(img, size).crop(box)``, but PIL's ``resize(box=...)`` resamples only the
    pixels of the crop (its filter still reads the source pixels just outside the box), which saves the work of
    resizing the parts that are thrown away: about 25% of a 4:3 photo, more for panoramas. The output size and the
    filters are ``data.io``'s (Lanczos down, bicubic up).
    """
    width, height = img.size
    scale = size / min(width, height)
    # The same rounded output size as data.io.resize_short_side, so crop positions match that path exactly.
    out_w, out_h = max(size, round(width * scale)), max(size, round(height * scale))
    left, top, right, bottom = _crop_box(out_w, out_h, size, crop_seed)
    if (out_w, out_h) == (width, height):
        return img.crop((left, top, right, bottom))
    sx, sy = width / out_w, height / out_h
    resample = DOWNSCALE_FILTER if out_w * out_h < width * height else UPSCALE_FILTER
    return img.resize((size, size), resample, box=(left * sx, top * sy, right * sx, bottom * sy))


class ImageFolderDataset(Dataset):
    """Square training (random crop) or validation (centre crop) images from a directory tree; see the module doc.

    ``dataset[i]`` -> (3, image_size, image_size) float32 RGB in [0, 1]. ``dataset[(i, crop_seed)]`` does the same
    with the random crop drawn from ``crop_seed`` (what ``TrainLoader`` uses, for reproducible crops); a plain
    ``dataset[i]`` in train mode draws its crop from Python's global ``random``.
    """

    def __init__(self, root: str | os.PathLike, image_size: int, train: bool = True, draft: bool = True) -> None:
        """Scan ``root`` now (FaststyleError when it is missing or empty). ``draft=False`` disables JPEG draft mode."""
        if int(image_size) < 1:
            raise FaststyleError(f"data.image_size must be a positive number of pixels, got {image_size}")
        self.root = Path(root).expanduser()
        self.image_size = int(image_size)
        self.train = bool(train)
        self.draft = bool(draft)
        files = scan_image_files(self.root)
        # One numpy string array instead of a list of str objects: DataLoader workers forked from this process read
        # it without touching per-object reference counts, so pages are not copied into every worker
        # (pytorch/pytorch#13246: "copy-on-access" memory growth with large Python lists in datasets).
        self._paths = np.array([str(p) for p in files])
        self.skipped_files: set[str] = set()
        """Unreadable files met in this process (DataLoader workers keep their own; see ``TrainLoader.skipped``)."""

    def __len__(self) -> int:
        return len(self._paths)

    @property
    def files(self) -> list[Path]:
        """The scanned image files in dataset order."""
        return [Path(p) for p in self._paths.tolist()]

    @property
    def skipped(self) -> int:
        """Number of distinct unreadable files met in this process."""
        return len(self.skipped_files)

    def load(
        self, index: int, crop_seed: int | None = None, train: bool | None = None
    ) -> tuple[torch.Tensor, list[tuple[str, str]]]:
        """Image ``index`` as (3, S, S) float32 in [0, 1], plus ``(path, reason)`` of unreadable files skipped for it.

        When file ``index`` cannot be decoded, file ``index + 1`` (wrapping) is tried, and so on: the substitute is
        deterministic, so resumed and distributed runs stay identical. Random crops use ``crop_seed`` (train mode)
        or Python's ``random`` when it is None; validation images are centre-cropped (``train`` overrides the
        dataset's own mode for this call). Raises FaststyleError after
        ``MAX_CONSECUTIVE_BAD_FILES`` unreadable files in a row. Warnings are logged here only outside DataLoader
        workers (a worker's log records may never reach the run's log, e.g. under the "spawn" start method):
        ``TrainLoader`` logs what its workers report, in the main process.
        """
        train = self.train if train is None else train
        count = len(self._paths)
        bad: list[tuple[str, str]] = []
        for attempt in range(min(count, MAX_CONSECUTIVE_BAD_FILES)):
            path = str(self._paths[(index + attempt) % count])
            try:
                # JPEG draft decoding when large; a file declaring absurd pixel counts is refused undecoded
                min_short_side = self.image_size if self.draft else None
                img = load_image(path, min_short_side=min_short_side, max_pixels=MAX_DECODE_PIXELS)
            except DECODE_ERRORS as err:
                if path not in self.skipped_files:
                    self.skipped_files.add(path)
                    if get_worker_info() is None:
                        log.warning("skipping unreadable image %s: %s", path, err)
                bad.append((path, str(err)))
                continue
            if train and crop_seed is None:
                crop_seed = random.getrandbits(64)
            crop = resized_square_crop(img, self.image_size, crop_seed if train else None)
            return pil_to_tensor(crop), bad
        raise FaststyleError(
            f"{len(bad)} unreadable images in a row in {self.root} (last: {bad[-1][0]}): "
            "check that data.root points at a folder of valid images"
        )

    def __getitem__(self, key: int | tuple[int, int]) -> torch.Tensor:
        if isinstance(key, tuple):
            index, crop_seed = key
            return self.load(int(index), int(crop_seed))[0]
        return self.load(int(key))[0]

    def fixed_batch(self, count: int) -> torch.Tensor:
        """The first ``count`` images (or all, if fewer) as a (N, 3, S, S) batch, centre-cropped: for validation.
        ``count=0`` gives an empty (0, 3, S, S) batch."""
        images = [self.load(i, train=False)[0] for i in range(min(count, len(self)))]
        return torch.stack(images) if images else torch.empty(0, 3, self.image_size, self.image_size)


class StepBatchSampler(Sampler[list[tuple[int, int]]]):
    """Endless per-rank batches of ``(dataset index, crop seed)`` pairs for steps ``start_step, start_step+1, ...``.

    The stream of samples is pass 0's permutation, then pass 1's, ...; pass ``p`` is ``torch.randperm`` from a
    generator seeded with a hash of ``(seed, p)``. Step ``s`` owns stream positions ``[s*B*W, (s+1)*B*W)`` and rank
    ``r`` its slice ``[s*B*W + r*B, s*B*W + (r+1)*B)``. Crop seed of a sample = hash of ``(seed, position)``.
    """

    def __init__(
        self, dataset_len: int, batch_size: int, seed: int, rank: int = 0, world_size: int = 1, start_step: int = 0
    ) -> None:
        if dataset_len < 1:
            raise ValueError("dataset_len must be positive")
        if batch_size < 1:
            raise FaststyleError(f"train.batch_size must be at least 1, got {batch_size}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"invalid rank {rank} for world size {world_size}")
        if start_step < 0:
            raise ValueError(f"start_step must be >= 0, got {start_step}")
        self.dataset_len = dataset_len
        self.batch_size = batch_size
        self.seed = int(seed)
        self.rank = rank
        self.world_size = world_size
        self.start_step = start_step

    def permutation(self, pass_index: int) -> list[int]:
        """Dataset order of pass ``pass_index`` (the same in every process for the same seed)."""
        generator = torch.Generator().manual_seed(_mix64(self.seed, pass_index) & ((1 << 63) - 1))
        return torch.randperm(self.dataset_len, generator=generator).tolist()

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        global_batch = self.batch_size * self.world_size
        step = self.start_step
        cached_pass, order = -1, []
        while True:
            first = step * global_batch + self.rank * self.batch_size
            batch = []
            for position in range(first, first + self.batch_size):
                pass_index, offset = divmod(position, self.dataset_len)
                if pass_index != cached_pass:
                    cached_pass, order = pass_index, self.permutation(pass_index)
                batch.append((order[offset], _mix64(self.seed, 0xC409, position)))
            yield batch
            step += 1


@dataclass
class _Item:
    image: torch.Tensor
    bad_files: list[tuple[str, str]]


class _ReportingView(Dataset):
    """What DataLoader workers index: returns the image together with the unreadable paths substituted for it."""

    def __init__(self, dataset: ImageFolderDataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]) -> _Item:
        image, bad = self.dataset.load(int(key[0]), int(key[1]))
        return _Item(image, bad)


def _collate(items: Sequence[_Item]) -> tuple[torch.Tensor, list[tuple[str, str]]]:
    return torch.stack([item.image for item in items]), [path for item in items for path in item.bad_files]


class TrainLoader:
    """Infinite iterator of training batches (B, 3, S, S) float32 in [0, 1]; built by ``make_train_loader``.

    ``loader.step`` is the step whose batch ``next(loader)`` returns next; ``loader.skipped`` the number of distinct
    unreadable files met so far (all workers), each logged once as a warning. ``close()`` stops the workers.
    """

    def __init__(self, dataset: ImageFolderDataset, sampler: StepBatchSampler, dataloader: DataLoader) -> None:
        self.dataset = dataset
        self.sampler = sampler
        self.dataloader = dataloader
        self.step = sampler.start_step
        self.skipped_files: set[str] = set()
        self._iterator: Iterator | None = None

    @property
    def skipped(self) -> int:
        """Distinct unreadable files skipped so far, over all worker processes and this process's own loads
        (``dataset.fixed_batch`` for validation images, for example)."""
        return len(self.skipped_files | self.dataset.skipped_files)

    def __iter__(self) -> TrainLoader:
        return self

    def __next__(self) -> torch.Tensor:
        if self._iterator is None:
            self._iterator = iter(self.dataloader)
        images, bad = next(self._iterator)
        for path, reason in bad:
            if path not in self.skipped_files:
                self.skipped_files.add(path)
                # In-process loads (num_workers=0, validation images) already logged theirs.
                if self.dataloader.num_workers > 0 and path not in self.dataset.skipped_files:
                    log.warning("skipping unreadable image %s: %s", path, reason)
        self.step += 1
        return images

    def close(self) -> None:
        """Shut down the worker processes (dropping the only iterator stops them; so does garbage collection)."""
        self._iterator = None


def _ignore_stop_signals(worker_id: int) -> None:
    """DataLoader ``worker_init_fn``: a Ctrl-C reaches every process of the terminal's process group, and torchrun,
    Slurm or systemd send SIGTERM to a whole group or cgroup. A worker that died of it would make the training
    process fail ("DataLoader worker ... is killed by signal") while it saves its stop checkpoint; ignored, the
    worker keeps serving batches until the training process shuts it down (and exits by itself if its parent dies)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def make_train_loader(
    dataset: ImageFolderDataset,
    batch_size: int,
    num_workers: int,
    seed: int,
    pin_memory: bool = False,
    rank: int = 0,
    world_size: int = 1,
    start_step: int = 0,
    prefetch_factor: int = 2,
) -> TrainLoader:
    """An endless, seeded, rank-sharded, resumable loader of (batch_size, 3, S, S) batches (see the module doc).

    ``batch_size`` is per rank (the global batch is ``batch_size * world_size``); ``num_workers`` decoding
    processes (0 = in the calling process), alive for the whole run (one endless iterator); ``pin_memory=True``
    (use it on CUDA) returns page-locked batches so ``.to(device, non_blocking=True)`` overlaps the copy;
    ``start_step`` is the first step to produce (the step to resume at).
    """
    if num_workers < 0:
        raise FaststyleError(f"data.num_workers must be >= 0, got {num_workers}")
    sampler = StepBatchSampler(len(dataset), batch_size, seed, rank, world_size, start_step)
    # One endless iterator is made per run, so its workers live for the whole run without persistent_workers (which
    # only matters when a DataLoader is iterated again, once per epoch).
    options: dict = {"prefetch_factor": prefetch_factor} if num_workers > 0 else {}
    dataloader = DataLoader(
        _ReportingView(dataset),
        batch_sampler=sampler,
        num_workers=num_workers,
        collate_fn=_collate,
        pin_memory=pin_memory,
        worker_init_fn=_ignore_stop_signals,
        # An own generator: otherwise creating the iterator draws the workers' base seed from the global torch RNG,
        # which would make a resumed run's global RNG stream differ from an uninterrupted one's.
        generator=torch.Generator().manual_seed(int(seed) & ((1 << 63) - 1)),
        **options,
    )
    return TrainLoader(dataset, sampler, dataloader)
