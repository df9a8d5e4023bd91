"""CLI tests for scripts/download_coco.sh: arguments, the dry run, and the real path on a tiny local archive."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import zipfile
from pathlib import Path

import pytest

from data.dataset import ImageFolderDataset
from tests.support import REPO, photo_file, run_command

DOWNLOAD = REPO / "scripts" / "download_coco.sh"


needs_bash = pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")


def _bash(*args: str, cwd: Path = REPO, env: dict | None = None) -> subprocess.CompletedProcess:
    return run_command(["bash", str(DOWNLOAD), *args], cwd=cwd, env=env)


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
            jpg = photo_file(tmp_path / "src" / f"COCO_train2014_{i:012d}.jpg", 32, 24, seed=i)
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
