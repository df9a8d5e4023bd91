"""stylize.py with multi-style models (conftest's multi_model): every style written, one picked or mixed, with
tiling, bf16 and the color options; the errors; a one-style model refusing a style; a mix typed on the command line."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from core.errors import FaststyleError
from models.modelfile import load_model, save_model
from models.transformer import TransformerNet
from tests.support import MULTI_MODEL_STYLES, REPO

NAMES = MULTI_MODEL_STYLES  # the styles of conftest's multi_model


def _stylize(model: Path, inputs: Path, **options):
    from inference.pipeline import stylize
    from stylize import compose_config

    overrides = [f"model={model}", f"input={inputs}"] + [f"{k}={v}" for k, v in options.items()]
    return stylize(compose_config(overrides))


def _photos(folder: Path) -> Path:
    from PIL import Image

    folder.mkdir()
    gen = torch.Generator().manual_seed(1)
    for name, size in (("a.png", (40, 28)), ("b.png", (33, 47))):
        pixels = (torch.rand(size[1], size[0], 3, generator=gen) * 255).to(torch.uint8).numpy()
        Image.fromarray(pixels).save(folder / name)
    return folder


def _read(path: Path) -> torch.Tensor:
    from data.io import load_image, pil_to_tensor

    return pil_to_tensor(load_image(path))


def test_stylize_writes_every_style_and_picks_or_mixes_one(multi_model: Path, tmp_path: Path) -> None:
    from data.io import load_image, pil_to_tensor

    inputs = _photos(tmp_path / "in")
    summary = _stylize(multi_model, inputs, output=tmp_path / "all", precision="fp32")  # exact on every CPU
    assert sorted(p.name for p in summary.written) == sorted(f"{s}_{n}.png" for s in "ab" for n in NAMES)
    net = load_model(multi_model)[0]
    x = pil_to_tensor(load_image(inputs / "a.png"))[None]
    for index, name in enumerate(NAMES):  # each output is its style's network, rounded to 8 bits
        expected = net.for_style(index)(x)[0]
        assert (_read(tmp_path / "all" / f"a_{name}.png") - expected).abs().max() <= 1 / 255 + 1e-6
    # by name, by index and a mix (an image differing from both styles)
    _stylize(multi_model, inputs, output=tmp_path / "one", style="street")
    assert sorted(p.name for p in (tmp_path / "one").iterdir()) == ["a_street.png", "b_street.png"]
    _stylize(multi_model, inputs / "a.png", output=tmp_path / "suffix", suffix="v2")  # suffix, then the style
    assert sorted(p.name for p in (tmp_path / "suffix").iterdir()) == [f"a_v2_{n}.png" for n in sorted(NAMES)]
    _stylize(multi_model, inputs / "a.png", output=tmp_path / "suffix1", suffix="v2", style="street")
    assert [p.name for p in (tmp_path / "suffix1").iterdir()] == ["a_v2.png"]  # one style: the suffix alone
    _stylize(multi_model, inputs / "a.png", output=tmp_path / "idx.png", style=2, precision="fp32")
    assert torch.equal(_read(tmp_path / "idx.png"), _read(tmp_path / "all" / "a_composition.png"))
    _stylize(multi_model, inputs / "a.png", output=tmp_path / "mix", style="'wave:1,composition:3'", precision="fp32")
    mixed = _read(tmp_path / "mix" / "a_wave-25_composition-75.png")
    expected = net.for_style(torch.tensor([0.25, 0.0, 0.75]))(x)[0]
    assert (mixed - expected).abs().max() <= 1 / 255 + 1e-6


def test_stylize_multi_style_with_tiling_bf16_and_color_options(multi_model: Path, tmp_path: Path) -> None:
    inputs = _photos(tmp_path / "in")
    plain = tmp_path / "plain"
    _stylize(multi_model, inputs / "b.png", output=plain, style="street", preserve_color=True, strength=0.6)
    tiled = tmp_path / "tiled"
    _stylize(multi_model, inputs / "b.png", output=tiled, style="street", preserve_color=True, strength=0.6,
             max_memory_mb=0.05)  # fmt: skip
    assert (_read(plain / "b_street.png") - _read(tiled / "b_street.png")).abs().max() <= 1 / 255 + 1e-6
    half = tmp_path / "bf16"
    _stylize(multi_model, inputs / "b.png", output=half, style="street", precision="bf16", device="cpu")
    _stylize(multi_model, inputs / "b.png", output=tmp_path / "fp32", style="street", precision="fp32")
    assert (_read(half / "b_street.png") - _read(tmp_path / "fp32" / "b_street.png")).abs().mean() < 0.02


@pytest.mark.parametrize(
    "options, message",
    [({"style": "monet"}, "wave, street, composition"), ({"output": "one.png"}, "pick one with style=")],
)
def test_stylize_multi_style_errors(multi_model: Path, tmp_path: Path, options: dict, message: str) -> None:
    inputs = _photos(tmp_path / "in")
    options = {k: (tmp_path / v if k == "output" else v) for k, v in options.items()}
    with pytest.raises(FaststyleError, match=message):
        _stylize(multi_model, inputs / "a.png", **options)


def test_stylize_one_style_model_refuses_a_style(tmp_path: Path) -> None:
    path = tmp_path / "model.pth"
    save_model(path, TransformerNet(base_width=4, residual_blocks=1), {"style_stem": "wave"})
    with pytest.raises(FaststyleError, match="holds one style"):
        _stylize(path, _photos(tmp_path / "in"), style="wave")


def test_stylize_cli_takes_a_mix_as_users_type_it(multi_model: Path, tmp_path: Path) -> None:
    import subprocess
    import sys

    from stylize import quote_style_mix

    assert quote_style_mix("style=a:1,b:2") == 'style="a:1,b:2"'
    for unchanged in ("style=a", "input=a,b.jpg", "style='a:1,b:2'", 'style="a:1,b:2"'):
        assert quote_style_mix(unchanged) == unchanged
    inputs = _photos(tmp_path / "in")
    args = [f"model={multi_model}", f"input={inputs / 'a.png'}", f"output={tmp_path / 'out'}", "style=wave:1,street:1"]
    proc = subprocess.run([sys.executable, "stylize.py", *args], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["a_wave-50_street-50.png"]
