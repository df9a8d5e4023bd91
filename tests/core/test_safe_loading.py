"""Model and checkpoint files are read with torch.load(weights_only=True): a pickle carrying code is refused with
a clear FaststyleError and the code never runs (training/checkpoint.py, interop/read.py, interop/pytorch_examples.py,
scripts/convert.py)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from core.errors import FaststyleError
from interop.pytorch_examples import read_examples_file
from interop.read import read_torch_model_file
from models.modelfile import load_model
from training.checkpoint import load_checkpoint


class _CreatesMarker:
    """Unpickling this object calls os.system("touch <marker>"): the classic code-carrying pickle."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.fixture
def evil_file(tmp_path: Path) -> tuple[Path, Path]:
    """A torch file that looks like each of our formats but carries the marker-creating object."""
    marker = tmp_path / "MARKER_code_ran"
    payload = {
        "format": "faststyle-model",
        "format_version": 1,
        "conv1.conv2d.weight": torch.zeros(8, 3, 9, 9),
        "deconv3.conv2d.weight": torch.zeros(3, 8, 9, 9),
        "meta": _CreatesMarker(marker),
    }
    path = tmp_path / "evil.pth"
    torch.save(payload, path)
    # Sanity check of the test itself: an unsafe load really would run the code.
    torch.load(path, weights_only=False)
    assert marker.exists()
    marker.unlink()
    return path, marker


LOADERS = [load_model, load_checkpoint, read_torch_model_file, read_examples_file]


@pytest.mark.parametrize("loader", LOADERS, ids=lambda f: f.__name__)
def test_code_carrying_pickle_is_refused(loader, evil_file: tuple[Path, Path]) -> None:
    path, marker = evil_file
    with pytest.raises(FaststyleError) as info:
        loader(path)
    message = str(info.value)
    assert "refusing to load" in message and "\n" not in message
    assert "weights_only=False" not in message  # never advise the unsafe way out
    assert not marker.exists()


def test_convert_script_refuses_it(evil_file: tuple[Path, Path], tmp_path: Path) -> None:
    path, marker = evil_file
    out = tmp_path / "converted.pth"
    result = subprocess.run(
        [sys.executable, "-m", "scripts.convert", str(path), "-o", str(out)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )
    assert result.returncode == 2
    assert result.stderr.startswith("error: refusing to load")
    assert "Traceback" not in result.stderr
    assert not marker.exists() and not out.exists()
