"""scripts/style_grid.py: the picture of a tiny 3-style model on a real photo (rows, tile sizes, distinct styles, the
strip's ends equal to the styles alone, captions; the drawing is data/pictures.py's), its refusals (one-style model,
unknown style, output onto an input, an existing output without --overwrite) and running it by path."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from data.io import load_image, resize_max_side
from data.pictures import MAX_CAPTION_LINES, MIN_FONT_PX, font_size_for, load_font, wrap_caption
from scripts import style_grid as sg
from tests.support import CONTENT, REPO, tiny_model_file

PHOTO = CONTENT / "chelsea.jpg"
STYLES = ["hokusai_great_wave", "van_gogh_village_street_auvers", "kandinsky_composition_8"]
MAX_SIDE = 96  # small tiles keep the test fast; chelsea.jpg (451x300) becomes 96x64


def _save_model(path: Path, styles: int) -> Path:
    meta = {"styles": STYLES[:styles]} if styles > 1 else {"style": "hokusai_great_wave"}
    return tiny_model_file(path, meta, num_styles=styles)


@pytest.fixture(scope="module")
def grid(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """One run of main() with the default output and one of make_grid() (for the layout), on a 3-style model."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: one thread is faster on the shared 2-core machine (tests/conftest.py)
    try:
        folder = tmp_path_factory.mktemp("grid")
        model = _save_model(folder / "model.pth", 3)
        code = sg.main([str(model), str(PHOTO), "--max-side", str(MAX_SIDE), "--device", "cpu"])
        again, layout = sg.make_grid(model, PHOTO, folder / "again.png", max_side=MAX_SIDE, device="cpu")
    finally:
        torch.set_num_threads(threads)
    return {"code": code, "model": model, "out": folder / "chelsea_style_grid.png", "again": again, "layout": layout}


def _tiles(grid: dict) -> list[list[Image.Image]]:
    """The picture's tiles, row by row, cut out where the layout puts them."""
    picture = Image.open(grid["out"]).convert("RGB")
    layout = grid["layout"]
    return [[picture.crop(layout.box(r, c)) for c in range(n)] for r, n in enumerate(layout.row_lengths)]


def _same(a: Image.Image, b: Image.Image) -> bool:
    """Pixel for pixel equal."""
    return a.size == b.size and a.mode == b.mode and a.tobytes() == b.tobytes()


def _mean_abs_diff(a: Image.Image, b: Image.Image) -> float:
    return (_pixels(a) - _pixels(b)).abs().mean().item()


def _pixels(img: Image.Image) -> torch.Tensor:
    return torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8).float()


def test_main_writes_the_grid_beside_the_model(grid: dict) -> None:
    assert grid["code"] == 0
    assert grid["out"].is_file() and grid["out"].parent == grid["model"].parent
    with Image.open(grid["out"]) as picture, Image.open(grid["again"]) as again:
        assert picture.format == "PNG"
        assert picture.size == grid["layout"].size
        assert _same(picture.convert("RGB"), again.convert("RGB"))  # CLI = make_grid
    assert not [p.name for p in grid["out"].parent.iterdir() if p.name.endswith(".tmp")]  # atomic write cleaned up


def test_two_rows_photo_plus_every_style_then_the_strip(grid: dict) -> None:
    layout = grid["layout"]
    photo_tile = resize_max_side(load_image(PHOTO), MAX_SIDE)
    assert photo_tile.size == (96, 64)
    assert layout.row_lengths == (1 + len(STYLES), sg.DEFAULT_STEPS)
    assert (layout.tile_width, layout.tile_height) == photo_tile.size
    width, height = layout.size
    columns = max(layout.row_lengths)
    assert columns * photo_tile.width < width <= columns * photo_tile.width + (columns + 1) * layout.gap
    assert 2 * (photo_tile.height + layout.caption_height) < height
    assert layout.caption_height >= MIN_FONT_PX
    tiles = _tiles(grid)
    # the first tile is the photo itself: the layout's boxes are where the tiles really are
    assert _same(tiles[0][0], photo_tile)


def test_every_style_looks_different(grid: dict) -> None:
    row1 = _tiles(grid)[0]
    for i in range(len(row1)):
        for j in range(i + 1, len(row1)):
            assert _mean_abs_diff(row1[i], row1[j]) > 2.0, (i, j)


def test_strip_goes_from_style_a_to_style_b(grid: dict) -> None:
    row1, strip = _tiles(grid)
    # defaults: A = the first style, B = the second; weight 0 and 1 are those styles alone, pixel for pixel
    assert _same(strip[0], row1[1])
    assert _same(strip[-1], row1[2])
    middle = strip[len(strip) // 2]
    assert _mean_abs_diff(middle, strip[0]) > 0.5 and _mean_abs_diff(middle, strip[-1]) > 0.5
    assert _mean_abs_diff(middle, row1[3]) > 2.0  # the third style takes no part


def test_every_tile_has_a_caption(grid: dict) -> None:
    picture = Image.open(grid["out"]).convert("L")
    layout = grid["layout"]
    for r, n in enumerate(layout.row_lengths):
        for c in range(n):
            left, _, right, bottom = layout.box(r, c)
            band = picture.crop((left, bottom, right, bottom + layout.caption_height))
            assert min(band.tobytes()) < 100, f"no text under tile {r},{c}"


def test_between_names_and_steps(tmp_path: Path, one_thread: None) -> None:
    model = _save_model(tmp_path / "model.pth", 3)
    out, layout = sg.make_grid(
        model, PHOTO, tmp_path / "grid.png", between=[STYLES[2], "0"], steps=3, max_side=64, device="cpu"
    )
    picture = Image.open(out).convert("RGB")
    row1 = [picture.crop(layout.box(0, c)) for c in range(layout.row_lengths[0])]
    strip = [picture.crop(layout.box(1, c)) for c in range(layout.row_lengths[1])]
    assert len(strip) == 3
    assert _same(strip[0], row1[3])
    assert _same(strip[-1], row1[1])


def test_strip_mixes_and_labels() -> None:
    start, end = (1.0, 0.0, 0.0), (0.0, 1.0, 0.0)
    mixes = sg.strip_mixes(start, end, 5)
    assert [mix[1] for mix in mixes] == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert mixes[0] == start and mixes[-1] == end
    labels = sg.strip_labels(mixes, start, end, STYLES)
    assert labels[1] == f"{STYLES[0]}:0.75,{STYLES[1]}:0.25"
    assert labels[0] == f"{STYLES[0]}:1,{STYLES[1]}:0"


def test_captions_fit_their_tile() -> None:
    font = load_font(font_size_for(96))
    for text in [STYLES[1], f"{STYLES[0]}:0.75,{STYLES[1]}:0.25", "x" * 200]:
        lines = wrap_caption(text, font, 94)
        assert 1 <= len(lines) <= MAX_CAPTION_LINES
        assert all(font.getlength(line) <= 94 for line in lines), lines


def test_one_style_model_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    model = _save_model(tmp_path / "one.pth", 1)
    with pytest.raises(SystemExit) as exit_info:
        sg.main([str(model), str(PHOTO), "--device", "cpu"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "holds one style" in err and "stylize.py" in err
    assert not list(tmp_path.glob("*.png"))


def test_unknown_style_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    model = _save_model(tmp_path / "model.pth", 3)
    with pytest.raises(SystemExit) as exit_info:
        sg.main([str(model), str(PHOTO), "--between", "nope", "1", "--device", "cpu"])
    assert exit_info.value.code == 2
    assert "unknown style 'nope'" in capsys.readouterr().err
    assert not list(tmp_path.glob("*.png"))


def test_output_onto_an_input_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    model = _save_model(tmp_path / "model.pth", 3)
    photo = shutil.copy(PHOTO, tmp_path / "photo.jpg")  # a copy: a failure here must not damage the sample
    os.link(photo, tmp_path / "hard_link.jpg")
    before = Path(photo).read_bytes(), model.read_bytes()
    for target in (photo, tmp_path / "hard_link.jpg", model, tmp_path / "sub" / ".." / "photo.jpg"):
        with pytest.raises(SystemExit) as exit_info:
            sg.main([str(model), str(photo), "-o", str(target), "--device", "cpu"])
        assert exit_info.value.code == 2
        assert "choose another -o" in capsys.readouterr().err
    assert (Path(photo).read_bytes(), model.read_bytes()) == before


def test_an_existing_output_needs_overwrite(grid: dict, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """The tools' overwrite rule (core.cli.check_output_file): refused with one line, replaced with --overwrite."""
    out = tmp_path / "grid.png"
    out.write_bytes(b"an earlier file")
    args = [str(grid["model"]), str(PHOTO), "-o", str(out), "--max-side", "48", "--steps", "2", "--device", "cpu"]
    with pytest.raises(SystemExit) as exit_info:
        sg.main(args)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "exists: pass --overwrite" in err
    assert out.read_bytes() == b"an earlier file"
    assert sg.main([*args, "--overwrite"]) == 0
    with Image.open(out) as picture:
        assert picture.format == "PNG"


def test_runs_by_path(tmp_path: Path) -> None:
    # the spelling, from another folder: the packages come from the editable install (make test)
    script = str(REPO / "scripts" / "style_grid.py")

    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, script, *args], cwd=tmp_path, capture_output=True, text=True, timeout=120
        )

    result = run("--help")
    assert result.returncode == 0, result.stderr
    assert "--between" in result.stdout
    model = _save_model(tmp_path / "model.pth", 3)
    result = run("model.pth", str(PHOTO), "-o", "grid.jpg", "--max-side", "48", "--steps", "2", "--device", "cpu")
    assert result.returncode == 0, result.stderr
    with Image.open(tmp_path / "grid.jpg") as picture:
        assert picture.format == "JPEG"
    assert model.is_file()
