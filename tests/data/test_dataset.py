"""Tests for data/dataset.py: scanning, decoding to RGB, crops, corrupt files, the step-based loader."""

from __future__ import annotations

import itertools
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from core.errors import FaststyleError
from data.dataset import (
    ImageFolderDataset,
    StepBatchSampler,
    _crop_box,
    make_train_loader,
    resized_square_crop,
    scan_image_files,
)
from data.io import load_image, pil_to_tensor, resize_short_side


def _photo(width: int, height: int, seed: int = 0) -> Image.Image:
    """A smooth, photo-like RGB image (low-frequency color field plus a little noise)."""
    rng = np.random.default_rng(seed)
    small = Image.fromarray(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8), "RGB")
    field = np.asarray(small.resize((width, height), Image.Resampling.BICUBIC), dtype=np.int16)
    noise = rng.integers(-8, 9, field.shape, dtype=np.int16)
    return Image.fromarray(np.clip(field + noise, 0, 255).astype(np.uint8), "RGB")


def _write(path: Path, img: Image.Image, **options) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, **options)
    return path


@pytest.fixture()
def folder(tmp_path: Path) -> Path:
    """Five distinct 48x40 JPEGs in a flat folder."""
    for i in range(5):
        _write(tmp_path / f"img{i}.jpg", _photo(48, 40, seed=i), quality=95)
    return tmp_path


def test_scan_is_recursive_sorted_and_accepts_any_letter_case(tmp_path: Path) -> None:
    names = ["b/deep/x.JPG", "a.jpeg", "b/c.PNG", "d.WebP", "e.bmp", "z/y.Jpg"]
    for name in names:
        fmt = {".png": "PNG", ".webp": "WEBP", ".bmp": "BMP"}.get(Path(name).suffix.lower(), "JPEG")
        _write(tmp_path / name, _photo(16, 16), format=fmt)
    (tmp_path / "notes.txt").write_text("not an image")
    _write(tmp_path / ".hidden" / "h.jpg", _photo(16, 16))
    _write(tmp_path / "._resource_fork.jpg", _photo(16, 16))
    files = [p.relative_to(tmp_path).as_posix() for p in scan_image_files(tmp_path)]
    assert files == sorted(names)
    assert len(ImageFolderDataset(tmp_path, 8)) == len(names)


@pytest.mark.parametrize("how", ["missing", "file", "empty", "only_other_files"])
def test_missing_or_empty_folder_is_a_one_line_error(tmp_path: Path, how: str) -> None:
    root = tmp_path / "data"
    if how == "file":
        root.write_text("x")
    elif how == "empty":
        root.mkdir()
    elif how == "only_other_files":
        (root / "sub").mkdir(parents=True)
        (root / "sub" / "readme.txt").write_text("x")
    with pytest.raises(FaststyleError) as info:
        ImageFolderDataset(root, 64)
    message = str(info.value)
    assert "\n" not in message and str(root) in message and "data.root" in message


def _mode_images() -> dict[str, tuple[Image.Image, dict]]:
    base = _photo(40, 30)
    rgba = base.convert("RGBA")
    rgba.putalpha(128)
    sixteen = Image.fromarray(np.full((30, 40), 32768, dtype=np.uint16))  # mid-grey at 16 bits
    return {
        "gray.png": (base.convert("L"), {}),
        "palette.png": (base.convert("P", palette=Image.Palette.ADAPTIVE), {}),
        "cmyk.jpg": (base.convert("CMYK"), {"quality": 95}),
        "rgba.png": (rgba, {}),
        "la.png": (base.convert("LA"), {}),
        "bilevel.bmp": (base.convert("1"), {}),
        "sixteen.png": (sixteen, {}),
        "rgb.webp": (base, {"lossless": True}),
    }


def test_every_color_mode_becomes_rgb_in_unit_range(tmp_path: Path) -> None:
    for name, (img, options) in _mode_images().items():
        _write(tmp_path / name, img, **options)
    assert Image.open(tmp_path / "sixteen.png").mode.startswith("I")  # really a 16-bit file
    dataset = ImageFolderDataset(tmp_path, 24, train=False)
    for index, path in enumerate(dataset.files):
        image = dataset[index]
        assert image.shape == (3, 24, 24) and image.dtype == torch.float32, path.name
        assert image.min() >= 0.0 and image.max() <= 1.0, path.name
        if path.name == "sixteen.png":
            # 32768/65535 is mid-grey; Pillow's own convert() would clip it to white.
            assert torch.allclose(image, torch.full_like(image, 128 / 255), atol=1 / 255)
        if path.name == "gray.png":
            assert torch.equal(image[0], image[1]) and torch.equal(image[1], image[2])
    assert dataset.skipped == 0


@pytest.mark.parametrize("size", [(48, 40), (40, 48), (20, 12), (32, 32)])
def test_crops_are_square_at_image_size_for_any_aspect(tmp_path: Path, size: tuple[int, int]) -> None:
    _write(tmp_path / "a.png", _photo(*size))
    for train in (True, False):
        image = ImageFolderDataset(tmp_path, 24, train=train)[0]
        assert image.shape == (3, 24, 24)


def test_centre_crop_is_the_middle_and_random_crop_follows_its_seed(tmp_path: Path) -> None:
    # A horizontal ramp 64 wide, 32 high: with image_size 32 there is no resize, only the crop's left edge varies.
    ramp = np.tile(np.arange(64, dtype=np.uint8)[None, :, None] * 4, (32, 1, 3))
    _write(tmp_path / "ramp.png", Image.fromarray(ramp, "RGB"))
    val = ImageFolderDataset(tmp_path, 32, train=False)[0]
    assert round(val[0, 0, 0].item() * 255) == 16 * 4  # left edge (64 - 32) // 2 = 16
    train = ImageFolderDataset(tmp_path, 32, train=True)
    lefts = {round(train[(0, seed)][0, 0, 0].item() * 255) // 4 for seed in range(40)}
    assert len(lefts) > 10 and min(lefts) >= 0 and max(lefts) <= 32
    assert torch.equal(train[(0, 7)], train[(0, 7)])


def test_draft_mode_decodes_large_jpegs_smaller_with_nearly_the_same_result(tmp_path: Path) -> None:
    path = _write(tmp_path / "big.jpg", _photo(800, 600), quality=95)
    full = load_image(path)
    drafted = load_image(path, min_short_side=128)
    assert full.size == (800, 600)
    assert drafted.size == (200, 150)  # 1/4 scale: the largest reduction keeping the short side >= 128
    assert load_image(path, min_short_side=400).size == (800, 600)  # less than 2x too large: full decode
    with_draft = ImageFolderDataset(tmp_path, 128, train=False)[0]
    without = ImageFolderDataset(tmp_path, 128, train=False, draft=False)[0]
    assert (with_draft - without).abs().mean() < 0.02


def test_exif_orientation_is_applied(tmp_path: Path) -> None:
    img = _photo(40, 20)
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display": a 40x20 stored image is shown 20x40
    _write(tmp_path / "rot.jpg", img, exif=exif)
    assert load_image(tmp_path / "rot.jpg").size == (20, 40)


def _corrupt_folder(folder: Path) -> list[Path]:
    (folder / "img1.jpg").write_bytes(b"\x00garbage, not a jpeg" * 10)
    data = (folder / "img3.jpg").read_bytes()
    (folder / "img3.jpg").write_bytes(data[: len(data) // 2])  # truncated JPEG
    (folder / "empty.png").write_bytes(b"")
    return [folder / "empty.png", folder / "img1.jpg", folder / "img3.jpg"]


def test_corrupt_files_are_substituted_warned_and_counted(folder: Path, caplog: pytest.LogCaptureFixture) -> None:
    bad = _corrupt_folder(folder)
    dataset = ImageFolderDataset(folder, 16)
    with caplog.at_level(logging.WARNING, logger="data.dataset"):
        images = [dataset[i] for i in range(len(dataset))]
    assert all(image.shape == (3, 16, 16) for image in images)
    assert dataset.skipped == 3 and sorted(dataset.skipped_files) == [str(p) for p in bad]
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warned) == 3 and all("skipping unreadable image" in m for m in warned)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_loader_keeps_batch_size_and_counts_bad_files_across_workers(
    folder: Path, num_workers: int, caplog: pytest.LogCaptureFixture
) -> None:
    bad = _corrupt_folder(folder)
    dataset = ImageFolderDataset(folder, 16)
    loader = make_train_loader(dataset, batch_size=3, num_workers=num_workers, seed=0)
    with caplog.at_level(logging.WARNING, logger="data.dataset"):
        batches = [next(loader) for _ in range(6)]  # 18 samples: every file of the 8 is met at least once
    loader.close()
    assert all(batch.shape == (3, 3, 16, 16) for batch in batches)
    assert loader.skipped == 3 and sorted(loader.skipped_files) == [str(p) for p in bad]
    assert loader.step == 6
    logged = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(logged) == 3  # once per bad file, however often it was met, from the main process
    assert all(any(str(p) in m and "skipping unreadable image" in m for m in logged) for p in bad)


def test_only_corrupt_files_is_an_error_not_an_endless_loop(tmp_path: Path) -> None:
    for i in range(3):
        (tmp_path / f"{i}.jpg").write_bytes(b"nope")
    dataset = ImageFolderDataset(tmp_path, 16)
    with pytest.raises(FaststyleError, match="unreadable images in a row"):
        dataset[0]


def test_each_pass_is_a_new_seeded_permutation() -> None:
    sampler = StepBatchSampler(10, batch_size=5, seed=3)
    steps = [[index for index, _ in batch] for batch in itertools.islice(iter(sampler), 6)]
    passes = [steps[0] + steps[1], steps[2] + steps[3], steps[4] + steps[5]]
    assert all(sorted(p) == list(range(10)) for p in passes)  # every image once per pass
    assert passes[0] != passes[1] != passes[2]  # reshuffled each pass
    again = StepBatchSampler(10, batch_size=5, seed=3)
    assert [b for b in itertools.islice(iter(again), 6)] == list(itertools.islice(iter(sampler), 6))
    other = StepBatchSampler(10, batch_size=5, seed=4)
    assert list(itertools.islice(iter(other), 2)) != list(itertools.islice(iter(sampler), 2))


def test_resume_at_step_k_gives_the_same_batches(folder: Path) -> None:
    dataset = ImageFolderDataset(folder, 16)
    full = make_train_loader(dataset, batch_size=2, num_workers=0, seed=11)
    uninterrupted = [next(full) for _ in range(7)]  # 14 samples of 5 images: crosses two pass boundaries
    resumed = make_train_loader(dataset, batch_size=2, num_workers=0, seed=11, start_step=4)
    assert resumed.step == 4
    for expected in uninterrupted[4:]:
        assert torch.equal(next(resumed), expected)
    different_seed = make_train_loader(dataset, batch_size=2, num_workers=0, seed=12)
    assert not all(torch.equal(next(different_seed), b) for b in uninterrupted)


def test_workers_produce_exactly_the_in_process_batches(folder: Path) -> None:
    dataset = ImageFolderDataset(folder, 16)
    in_process = make_train_loader(dataset, batch_size=2, num_workers=0, seed=5)
    workers = make_train_loader(dataset, batch_size=2, num_workers=2, seed=5)
    for _ in range(5):
        assert torch.equal(next(in_process), next(workers))
    workers.close()


def test_ranks_are_disjoint_and_together_equal_one_process_with_the_global_batch() -> None:
    # 24 images, 2 ranks x 3 per step: one pass is 4 steps; the ranks split each pass without overlap.
    ranks = [StepBatchSampler(24, batch_size=3, seed=9, rank=r, world_size=2) for r in range(2)]
    per_rank = [[i for batch in itertools.islice(iter(s), 4) for i, _ in batch] for s in ranks]
    assert not set(per_rank[0]) & set(per_rank[1])
    assert sorted(per_rank[0] + per_rank[1]) == list(range(24))
    # With 23 images steps straddle passes; still, rank 0's batch + rank 1's batch is the single-process batch.
    single = StepBatchSampler(23, batch_size=6, seed=9)
    streams = [iter(StepBatchSampler(23, batch_size=3, seed=9, rank=r, world_size=2)) for r in range(2)]
    for global_batch in itertools.islice(iter(single), 12):
        assert next(streams[0]) + next(streams[1]) == global_batch  # same images and crop seeds, rank order


def test_resumed_rank_matches_uninterrupted_rank() -> None:
    whole = list(itertools.islice(iter(StepBatchSampler(7, 2, seed=1, rank=1, world_size=3)), 9))
    resumed = list(itertools.islice(iter(StepBatchSampler(7, 2, seed=1, rank=1, world_size=3, start_step=5)), 4))
    assert resumed == whole[5:]


def test_fixed_batch_is_centre_cropped_and_repeatable(folder: Path) -> None:
    dataset = ImageFolderDataset(folder, 16, train=True)
    first = dataset.fixed_batch(3)
    assert first.shape == (3, 3, 16, 16)
    assert torch.equal(first, dataset.fixed_batch(3))
    assert dataset.fixed_batch(99).shape[0] == 5


@pytest.mark.parametrize("size", [(97, 61), (61, 97), (40, 30), (20, 14), (64, 32)])
def test_crop_of_the_box_resize_equals_resize_then_crop(size: tuple[int, int]) -> None:
    img = _photo(*size, seed=3)
    resized = resize_short_side(img, 32)
    for seed in (None, 1, 2, 3):
        box = _crop_box(resized.width, resized.height, 32, seed)
        expected = pil_to_tensor(resized.crop(box))
        got = pil_to_tensor(resized_square_crop(img, 32, seed))
        assert got.shape == expected.shape == (3, 32, 32)
        assert (got - expected).abs().max() <= 2 / 255  # only rounding differs


def test_the_loader_leaves_the_global_torch_rng_alone(folder: Path) -> None:
    # train.py restores the global RNG on resume: creating and iterating the loader must not consume from it.
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    loader = make_train_loader(ImageFolderDataset(folder, 16), batch_size=2, num_workers=1, seed=0)
    next(loader)
    loader.close()
    assert torch.equal(torch.rand(3), expected)


def test_scan_follows_linked_folders_once_and_survives_link_loops(tmp_path: Path) -> None:
    outside = tmp_path / "elsewhere"
    _write(outside / "linked.jpg", _photo(16, 16))
    root = tmp_path / "root"
    _write(root / "a.jpg", _photo(16, 16))
    (root / "link").symlink_to(outside, target_is_directory=True)
    (root / "loop").symlink_to(root, target_is_directory=True)  # would recurse forever if followed blindly
    files = [p.relative_to(root).as_posix() for p in scan_image_files(root)]
    assert files == ["a.jpg", "link/linked.jpg"]


def test_rank_loaders_together_give_the_single_process_batches(folder: Path) -> None:
    dataset = ImageFolderDataset(folder, 16)
    single = make_train_loader(dataset, batch_size=4, num_workers=0, seed=2, start_step=1)
    ranks = [
        make_train_loader(dataset, batch_size=2, num_workers=0, seed=2, rank=r, world_size=2, start_step=1)
        for r in range(2)
    ]
    for _ in range(3):
        assert torch.equal(torch.cat([next(ranks[0]), next(ranks[1])]), next(single))


@pytest.mark.parametrize(
    "width, height, size, expected",
    [(1500, 1000, 125, (188, 125)), (1000, 1500, 125, (125, 188)), (3000, 1500, 187, (375, 188)),
     (640, 480, 240, (320, 240)), (640, 480, 241, (640, 480)), (4000, 3000, 256, (500, 375))],
)  # fmt: skip
def test_draft_reduces_by_the_largest_factor_that_keeps_the_short_side(
    tmp_path: Path, width: int, height: int, size: int, expected: tuple[int, int]
) -> None:
    path = _write(tmp_path / "x.jpg", _photo(width, height), quality=80)
    decoded = load_image(path, min_short_side=size)
    assert decoded.size == expected and min(decoded.size) >= size


def test_a_bad_file_met_by_validation_and_by_workers_is_logged_and_counted_once(
    folder: Path, caplog: pytest.LogCaptureFixture
) -> None:
    (folder / "img0.jpg").write_bytes(b"broken")
    dataset = ImageFolderDataset(folder, 16)
    with caplog.at_level(logging.WARNING, logger="data.dataset"):
        dataset.fixed_batch(2)  # in this process: meets img0.jpg
        loader = make_train_loader(dataset, batch_size=5, num_workers=1, seed=0)
        next(loader)  # a whole pass in a worker: meets it again
        loader.close()
    assert loader.skipped == 1
    assert len([r for r in caplog.records if r.levelno == logging.WARNING]) == 1
