"""fileio: atomic writes keep the previous file on any failure, use the user's umask, report a full disk in one line,
and leave temporary files that a later run can tell apart (stale vs being written)."""

from __future__ import annotations

import errno
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from core import fileio
from core.errors import FaststyleError
from models.modelfile import save_model
from models.transformer import TransformerNet
from training.checkpoint import save_checkpoint


def test_written_files_get_the_users_umask(tmp_path: Path) -> None:
    old = os.umask(0o027)
    try:
        fileio.atomic_write_bytes(tmp_path / "a.bin", b"x")
        save_checkpoint(tmp_path / "last.pt", {"step": 1})
        save_model(tmp_path / "model.pth", TransformerNet(base_width=4, residual_blocks=1), {"style": "s"})
    finally:
        os.umask(old)
    for name in ("a.bin", "last.pt", "model.pth"):
        assert (tmp_path / name).stat().st_mode & 0o777 == 0o640, name
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_a_failed_write_keeps_the_previous_file_and_leaves_no_temp(tmp_path: Path) -> None:
    target = tmp_path / "last.pt"
    fileio.atomic_write_bytes(target, b"previous")

    def explode(handle) -> None:
        handle.write(b"half")
        raise RuntimeError("crash mid-write")

    with pytest.raises(RuntimeError):
        fileio.atomic_write(target, explode)
    assert target.read_bytes() == b"previous"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt"]


def test_disk_full_is_one_line_naming_the_file_and_the_space_needed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = tmp_path / "checkpoints" / "last.pt"
    save_checkpoint(target, {"step": 1, "w": torch.zeros(10)})
    before = target.read_bytes()

    real_open = open

    class FullFile:
        def __init__(self, *args, **kwargs) -> None:
            self.handle = real_open(*args, **kwargs)

        def __enter__(self):
            return self

        def __exit__(self, *exc) -> None:
            self.handle.close()

        def write(self, data) -> int:
            raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(fileio, "open", FullFile, raising=False)
    with pytest.raises(FaststyleError) as info:
        save_checkpoint(target, {"step": 2, "w": torch.zeros(1_000_000)})
    message = str(info.value)
    assert "\n" not in message
    assert str(target) in message and "disk full" in message
    assert "needs 3.8 MiB" in message and "free in" in message
    assert target.read_bytes() == before  # the previous checkpoint is intact
    assert sorted(p.name for p in target.parent.iterdir()) == ["last.pt"]


def test_stale_temp_files_of_dead_writers_are_removed_live_ones_kept(tmp_path: Path) -> None:
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(dead.stdout)
    stale = tmp_path / f".last.pt.{dead_pid}.abc123de.tmp"
    live = tmp_path / f".last.pt.{os.getpid()}.zzz999yy.tmp"
    old_format_recent = tmp_path / ".step_0000100.pt.k2j4h5g6.tmp"
    old_format_old = tmp_path / ".model.pth.q1w2e3r4.tmp"
    not_ours = tmp_path / ".notes.tmp"
    user_file = tmp_path / "last.pt"
    for path in (stale, live, old_format_recent, old_format_old, not_ours, user_file):
        path.write_bytes(b"x")
    hours_ago = time.time() - 2 * 3600
    os.utime(old_format_old, (hours_ago, hours_ago))

    removed = fileio.remove_stale_temp_files(tmp_path)

    assert sorted(p.name for p in removed) == sorted([stale.name, old_format_old.name])
    assert live.exists() and old_format_recent.exists() and not_ours.exists() and user_file.exists()
    assert fileio.remove_stale_temp_files(tmp_path / "missing") == []


def test_same_files_sees_symbolic_and_hard_links_and_dot_dot(tmp_path: Path) -> None:
    source = tmp_path / "source.pth"
    source.write_bytes(b"x")
    other = tmp_path / "other.pth"
    other.write_bytes(b"x")
    os.link(source, tmp_path / "hard.pth")
    (tmp_path / "soft.pth").symlink_to(source)
    inputs = fileio.SameFiles([source, other])
    for name in ("hard.pth", "soft.pth", "missing/../source.pth", "source.pth"):
        assert inputs.find(tmp_path / name) == source, name
    assert inputs.find(tmp_path / "new.pth") is None  # a path not written yet is no input
    assert fileio.same_file(tmp_path / "hard.pth", source) and not fileio.same_file(other, source)
