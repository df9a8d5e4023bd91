"""scripts/prepare_dataset.py: its command line, idempotent runs that guard their settings, training crops of the
prepared copy close to the original's, and one-line errors."""

from __future__ import annotations

import importlib
import json
import os
import sys
from pathlib import Path
from types import ModuleType

import pytest
from PIL import Image

from core.errors import FaststyleError
from data.dataset import ImageFolderDataset
from tests.support import photo_file, run_command

PREPARE = ["-m", "scripts.prepare_dataset"]


def _dataset(root: Path) -> None:
    photo_file(root / "a.jpg", 120, 80, seed=1)
    photo_file(root / "sub" / "b.PNG", 60, 90, seed=2, fmt="PNG")
    photo_file(root / "sub" / "deeper" / "small.jpeg", 20, 30, seed=3)
    (root / "sub" / "broken.jpg").write_bytes(b"not a jpeg at all")
    (root / "notes.txt").write_text("ignored")


def _load_script(name: str) -> ModuleType:
    """Import scripts/<name>.py in-process (starting Python + torch per call costs seconds on this machine)."""
    return importlib.import_module(f"scripts.{name}")


def test_prepare_cli_writes_resized_copies_and_skips_corrupt_files(tmp_path: Path) -> None:
    src, dst = tmp_path / "src", tmp_path / "out"
    _dataset(src)
    result = run_command(
        [sys.executable, *PREPARE, str(src), str(dst), "--short-side", "40", "--workers", "2", "--quiet"]
    )
    assert result.returncode == 0, result.stderr
    assert "4 images: 3 written, 0 already up to date, 1 unreadable skipped" in result.stdout
    assert "broken.jpg" in result.stderr  # the warning names the file
    sizes = {p.relative_to(dst).as_posix(): Image.open(p).size for p in dst.rglob("*.jp*g")}
    assert sizes == {"a.jpg": (60, 40), "sub/b.PNG.jpg": (40, 60), "sub/deeper/small.jpeg": (20, 30)}
    assert all(Image.open(dst / name).format == "JPEG" for name in sizes)
    assert json.loads((dst / ".faststyle_prepare.json").read_text())["short_side"] == 40
    assert len(ImageFolderDataset(dst, 32)) == 3  # the settings file is not taken for an image


def test_prepare_is_idempotent_and_guards_its_settings(tmp_path: Path) -> None:
    prepare_dataset = _load_script("prepare_dataset")
    src, dst = tmp_path / "src", tmp_path / "out"
    _dataset(src)
    assert prepare_dataset.prepare(src, dst, short_side=40, workers=1) == {
        "written": 3,
        "current": 0,
        "skipped": 1,
        "total": 4,
    }
    mtimes = {p: p.stat().st_mtime_ns for p in dst.rglob("*.jp*g")}
    again = prepare_dataset.prepare(src, dst, short_side=40, workers=1)
    assert again == {"written": 0, "current": 3, "skipped": 1, "total": 4}
    assert {p: p.stat().st_mtime_ns for p in dst.rglob("*.jp*g")} == mtimes
    os.utime(src / "a.jpg")  # a newer source is redone
    assert prepare_dataset.prepare(src, dst, short_side=40, workers=1)["written"] == 1
    with pytest.raises(FaststyleError, match="--force"):
        prepare_dataset.prepare(src, dst, short_side=50, workers=1)
    assert prepare_dataset.prepare(src, dst, short_side=50, workers=1, force=True)["written"] == 3
    assert Image.open(dst / "a.jpg").size == (75, 50)
    assert not [p for p in dst.rglob("*") if p.name.endswith(".tmp")]  # no temporary files left


def test_prepared_copy_gives_nearly_the_same_training_crops(tmp_path: Path) -> None:
    prepare_dataset = _load_script("prepare_dataset")
    src, dst = tmp_path / "src", tmp_path / "out"
    photo_file(src / "a.jpg", 160, 120, seed=5)
    prepare_dataset.prepare(src, dst, short_side=48, workers=1)
    original, prepared = ImageFolderDataset(src, 48), ImageFolderDataset(dst, 48)
    for seed in (1, 2, 3):
        difference = (original[(0, seed)] - prepared[(0, seed)]).abs().mean()
        assert difference < 0.02  # the same crop; only the extra JPEG encode differs
    assert (original[(0, 1)] - original[(0, 2)]).abs().mean() > 0.02  # (crops do differ between seeds)


@pytest.mark.parametrize(
    "args, message",
    [
        (["{src}", "{src}/inside"], "must not contain each other"),
        (["{src}/missing", "{tmp}/out"], "dataset folder not found"),
        (["{src}", "{tmp}/out", "--short-side", "0"], "--short-side must be a positive"),
        (["{src}", "{tmp}/out", "--quality", "101"], "--quality must be between 1 and 100"),
    ],
)
def test_prepare_bad_input_is_a_one_line_error(
    tmp_path: Path, args: list[str], message: str, capsys: pytest.CaptureFixture
) -> None:
    prepare_dataset = _load_script("prepare_dataset")
    src = tmp_path / "src"
    _dataset(src)
    with pytest.raises(SystemExit) as info:
        prepare_dataset.main([a.format(src=src, tmp=tmp_path) for a in args] + ["--quiet"])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1
