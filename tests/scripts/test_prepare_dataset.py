"""CLI tests for scripts/download_coco.sh (arguments, dry run, the real path on a tiny local archive),
scripts/prepare_dataset.py and the data benchmark (python -m benchmarks data)."""

from __future__ import annotations

import hashlib
import importlib
import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
from PIL import Image

from core.errors import FaststyleError
from data.dataset import ImageFolderDataset
from tests.support import REPO, run_command

DOWNLOAD = REPO / "scripts" / "download_coco.sh"
PREPARE = ["-m", "scripts.prepare_dataset"]
BENCH = ["-m", "benchmarks", "data"]

needs_bash = pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")


def _bash(*args: str, cwd: Path = REPO, env: dict | None = None) -> subprocess.CompletedProcess:
    return run_command(["bash", str(DOWNLOAD), *args], cwd=cwd, env=env)


def _photo(path: Path, width: int, height: int, seed: int = 0, fmt: str | None = None) -> Path:
    rng = np.random.default_rng(seed)
    small = Image.fromarray(rng.integers(0, 256, (4, 5, 3), dtype=np.uint8), "RGB")
    path.parent.mkdir(parents=True, exist_ok=True)
    small.resize((width, height), Image.Resampling.BICUBIC).save(path, format=fmt)
    return path


# ---------------------------------------------------------------- download_coco.sh


@needs_bash
def test_download_help_exits_zero_and_lists_options() -> None:
    result = _bash("--help")
    assert result.returncode == 0
    for option in ("--year", "--dest", "--dry-run", "--keep-zip", "--skip-md5", "--mirror"):
        assert option in result.stdout


@needs_bash
@pytest.mark.parametrize(
    "args, message",
    [
        (["--year", "2015"], "--year must be 2014 or 2017"),
        (["--year"], "--year needs a value"),
        (["--dest"], "--dest needs a folder"),
        (["--dest="], "--dest needs a folder"),
        (["--frobnicate"], "unknown argument '--frobnicate'"),
        (["extra"], "unknown argument 'extra'"),
    ],
)
def test_download_rejects_bad_arguments_with_one_line_and_status_2(args: list[str], message: str) -> None:
    result = _bash(*args, "--dry-run")
    assert result.returncode == 2
    assert result.stderr.startswith("error: ") and message in result.stderr
    assert result.stderr.count("\n") == 1 and result.stdout == ""


@needs_bash
@pytest.mark.parametrize(
    "year, size, md5, images",
    [
        ("2014", "13510573713", "0da8c0bd3d6becc4dcb32757491aca88", "82783"),
        ("2017", "19336861798", "cced6f7f71b7629ddf16f17bbcfab6b2", "118287"),
    ],
)
def test_download_dry_run_prints_the_plan_and_writes_nothing(
    tmp_path: Path, year: str, size: str, md5: str, images: str
) -> None:
    dest = tmp_path / "coco"
    result = _bash("--year", year, "--dest", str(dest), "--dry-run", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert f"http://images.cocodataset.org/zips/train{year}.zip" in out
    assert size in out and md5 in out and images in out
    assert f"data.root={dest}/train{year}" in out and "python train.py style=" in out
    assert not dest.exists() and list(tmp_path.iterdir()) == []


def _tiny_coco(tmp_path: Path, images: int = 3) -> tuple[Path, str]:
    """A local 'mirror' holding train2014.zip with a few JPEGs; returns (mirror folder, facts string)."""
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    archive = mirror / "train2014.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for i in range(images):
            jpg = _photo(tmp_path / "src" / f"COCO_train2014_{i:012d}.jpg", 32, 24, seed=i)
            zf.write(jpg, f"train2014/{jpg.name}")
    data = archive.read_bytes()
    return mirror, f"{len(data)} {hashlib.md5(data).hexdigest()} {images}"


@needs_bash
@pytest.mark.skipif(shutil.which("curl") is None and shutil.which("wget") is None, reason="needs curl or wget")
@pytest.mark.skipif(shutil.which("unzip") is None, reason="needs unzip")
def test_download_resumes_checks_and_unpacks_a_tiny_archive(tmp_path: Path) -> None:
    mirror, facts = _tiny_coco(tmp_path)
    dest = tmp_path / "coco"
    dest.mkdir()
    # An interrupted earlier download: the first 100 bytes are already there.
    (dest / "train2014.zip.part").write_bytes((mirror / "train2014.zip").read_bytes()[:100])
    env = {**os.environ, "FASTSTYLE_COCO_TEST_FACTS": facts}
    # curl accepts file:// URLs (and resumes them), so the real download path runs without a network.
    args = ["--mirror", f"file://{mirror}", "--dest", str(dest)]
    result = _bash(*args, env=env)
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in (dest / "train2014").iterdir()) == [f"COCO_train2014_{i:012d}.jpg" for i in range(3)]
    assert not (dest / "train2014.zip").exists() and not (dest / "train2014.zip.part").exists()
    assert [p.name for p in dest.iterdir()] == ["train2014"]  # no temporary folder left behind
    assert f"data.root={dest}/train2014" in result.stdout
    assert len(ImageFolderDataset(dest / "train2014", 16)) == 3
    again = _bash(*args, env=env)  # idempotent
    assert again.returncode == 0 and "nothing to do" in again.stdout


@needs_bash
@pytest.mark.skipif(shutil.which("unzip") is None, reason="needs unzip")
def test_download_refuses_an_archive_with_the_wrong_md5(tmp_path: Path) -> None:
    mirror, facts = _tiny_coco(tmp_path)
    size, _, images = facts.split()
    dest = tmp_path / "coco"
    dest.mkdir()
    shutil.copy(mirror / "train2014.zip", dest / "train2014.zip")  # already downloaded
    env = {**os.environ, "FASTSTYLE_COCO_TEST_FACTS": f"{size} {'0' * 32} {images}"}
    result = _bash("--dest", str(dest), env=env)
    assert result.returncode == 2 and "md5" in result.stderr and "expected 000" in result.stderr
    assert not (dest / "train2014").exists()
    skipped = _bash("--dest", str(dest), "--skip-md5", "--keep-zip", env=env)
    assert skipped.returncode == 0, skipped.stderr
    assert (dest / "train2014.zip").exists() and len(list((dest / "train2014").iterdir())) == 3


# ---------------------------------------------------------------- prepare_dataset.py


def _dataset(root: Path) -> None:
    _photo(root / "a.jpg", 120, 80, seed=1)
    _photo(root / "sub" / "b.PNG", 60, 90, seed=2, fmt="PNG")
    _photo(root / "sub" / "deeper" / "small.jpeg", 20, 30, seed=3)
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
    _photo(src / "a.jpg", 160, 120, seed=5)
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


# ---------------------------------------------------------------- benchmarks/data.py


def test_bench_data_help_runs_in_process_and_through_the_dispatcher(capsys: pytest.CaptureFixture) -> None:
    from benchmarks import data as bench_data

    with pytest.raises(SystemExit) as info:
        bench_data.main(["--help"])
    assert info.value.code == 0 and "--workers" in capsys.readouterr().out
    dispatched = run_command([sys.executable, *BENCH, "--help"])
    assert dispatched.returncode == 0 and "--train-images-per-s" in dispatched.stdout


@pytest.mark.slow
def test_bench_data_tiny_run_prints_the_table(tmp_path: Path) -> None:
    result = run_command(
        [
            sys.executable,
            *BENCH,
            "--images",
            "8",
            "--width",
            "96",
            "--height",
            "64",
            "--image-size",
            "32",
            "--workers",
            "0,1",
            "--train-images-per-s",
            "1.0",
        ]  # fmt: skip
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    rows = [line for line in lines if line.startswith(("original", "prepared")) and "worker gives" not in line]
    assert len(rows) == 6  # 3 sources x 2 worker counts
    assert "needs at least" in result.stdout and "target with 2 workers >= 5x" in result.stdout
