"""data/video.py: the eight orientations a display matrix can give, and the reader's upright, resized frames with
their times."""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image

from data.video import VideoReader, upright_transpose
from tests.support import make_clip

pytestmark = pytest.mark.usefixtures("one_thread")


def test_every_display_matrix_orientation() -> None:
    """The eight orientations a display matrix can give (PyAV writes them as rotation + mirror)."""
    identity = (65536, 0, 0, 0, 65536, 0, 0, 0, 1 << 30)
    assert upright_transpose(None) is None and upright_transpose(identity) is None
    quarter = (0, -65536, 0, 65536, 0, 0, 0, 0, 1 << 30)  # 90 degrees counter-clockwise (PyAV's set_display_rotation)
    assert upright_transpose(quarter) == Image.Transpose.ROTATE_90
    assert upright_transpose((0, 65536, 0, -65536, 0, 0, 0, 0, 1 << 30)) == Image.Transpose.ROTATE_270
    assert upright_transpose((-65536, 0, 0, 0, -65536, 0, 0, 0, 1 << 30)) == Image.Transpose.ROTATE_180
    assert upright_transpose((-65536, 0, 0, 0, 65536, 0, 0, 0, 1 << 30)) == Image.Transpose.FLIP_LEFT_RIGHT


def test_reader_api_gives_upright_resized_frames(tmp_path: Path) -> None:
    """The decode API the benchmarks use: frames in order, upright, resized, with their times."""
    clip = make_clip(tmp_path / "clip.mp4", frames=5, rotation=-90)
    with VideoReader(clip) as reader:
        assert (reader.info.width, reader.info.height) == (48, 64)
        frames = list(reader.frames(size=(24, 32)))
    assert [f.index for f in frames] == list(range(5)) and frames[0].image.size == (24, 32)
    assert [round(f.time, 3) for f in frames] == [0.0, 0.05, 0.1, 0.15, 0.2]
    assert frames[0].tensor().shape == (3, 32, 24) and float(frames[0].tensor().min()) >= 0
    assert reader.stopped is None
