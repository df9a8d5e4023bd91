"""stylize.py: inputs (mixed folders, EXIF, alpha, modes), outputs, skip/overwrite, color controls, tiling, CLI."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from core.errors import FaststyleError
from core.metrics import psnr
from inference.color import rgb_to_ycbcr, ycbcr_to_rgb
from inference.network import inference_policy
from inference.pipeline import stylize
from models.transformer import TransformerNet
from stylize import compose_config
from tests.support import REPO, start_stylize_until, tiny_model_file


def make_model(path: Path, norm: str = "instance", seed: int = 0) -> Path:
    """A tiny model file whose output is far from flat (weights pushed off their initialisation)."""
    return tiny_model_file(path, norm=norm, base_width=4, scale=0.3, seed=seed)


@pytest.fixture(scope="module")
def model_file(tmp_path_factory) -> Path:
    return make_model(tmp_path_factory.mktemp("run") / "model.pth")


def photo(width: int = 48, height: int = 32, seed: int = 0) -> Image.Image:
    """A smooth colorful RGB test image (gradients + a blob), deterministic."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    r = x / max(width - 1, 1)
    g = y / max(height - 1, 1)
    b = np.exp(-((x - width * rng.uniform(0.3, 0.7)) ** 2 + (y - height / 2) ** 2) / (0.1 * width * height))
    arr = (np.stack([r, g, b], -1) * 255).round().astype(np.uint8)
    return Image.fromarray(arr, "RGB")


def run(model: Path, inputs: Path | str, **options) -> tuple:
    overrides = [f"model={model}", f"input={inputs}"] + [f"{k}={v}" for k, v in options.items()]
    return stylize(compose_config(overrides))


def test_mixed_folder(model_file: Path, tmp_path: Path) -> None:
    src = tmp_path / "in"
    src.mkdir()
    photo().save(src / "good.jpg")
    (src / "corrupt.jpg").write_bytes(b"this is not a jpeg")
    rgba = photo(30, 20).convert("RGBA")
    alpha = Image.fromarray(np.tile(np.linspace(0, 255, 30, dtype=np.uint8), (20, 1)), "L")
    rgba.putalpha(alpha)
    rgba.save(src / "alpha.png")
    photo(25, 19).convert("L").save(src / "gray.png")
    photo(26, 18).convert("P").save(src / "palette.png")
    Image.fromarray((np.arange(21 * 17).reshape(17, 21) * 100).astype(np.uint16)).save(src / "deep16.png")
    exif = Image.Exif()
    exif[0x0112] = 6  # EXIF Orientation: rotate 90 degrees clockwise to display
    photo(40, 24).save(src / "rotated.jpg", exif=exif)
    (src / "notes.txt").write_text("not an image: ignored by extension")
    out = tmp_path / "out"

    summary = run(model_file, src, output=out)

    assert len(summary.written) == 6
    assert [p.name for p, _ in summary.failed] == ["corrupt.jpg"]
    assert "corrupt.jpg" in summary.failed[0][1]
    names = sorted(p.name for p in out.iterdir())
    assert names == sorted(
        ["good_wave.jpg", "alpha_wave.png", "gray_wave.png", "palette_wave.png", "deep16_wave.png", "rotated_wave.jpg"]
    )
    with Image.open(out / "alpha_wave.png") as img:
        assert img.mode == "RGBA" and img.size == (30, 20)
        assert np.array_equal(np.asarray(img.getchannel("A")), np.asarray(alpha))  # alpha re-attached as it was
    with Image.open(out / "rotated_wave.jpg") as img:
        assert img.size == (24, 40)  # EXIF orientation applied: displayed (upright) size
    with Image.open(out / "gray_wave.png") as img:
        assert img.mode == "RGB" and img.size == (25, 19)
    assert "stylized 6, skipped 0" in summary.line() and "failed 1" in summary.line()


def test_skip_existing_and_overwrite(model_file: Path, tmp_path: Path) -> None:
    src = tmp_path / "in"
    src.mkdir()
    for i in range(3):
        photo(seed=i).save(src / f"p{i}.png")
    out = tmp_path / "out"
    first = run(model_file, src, output=out)
    assert len(first.written) == 3
    stamp = (out / "p0_wave.png").stat().st_mtime_ns
    second = run(model_file, src, output=out)
    assert len(second.written) == 0 and len(second.skipped) == 3
    assert (out / "p0_wave.png").stat().st_mtime_ns == stamp
    third = run(model_file, src, output=out, overwrite="true")
    assert len(third.written) == 3 and len(third.skipped) == 0


def test_glob_and_recursive_inputs(model_file: Path, tmp_path: Path) -> None:
    (tmp_path / "in" / "sub").mkdir(parents=True)
    photo().save(tmp_path / "in" / "a.png")
    photo().save(tmp_path / "in" / "b.jpg")
    photo().save(tmp_path / "in" / "sub" / "c.png")
    globbed = run(model_file, tmp_path / "in" / "*.png", output=tmp_path / "g")
    assert [p.name for p in globbed.written] == ["a_wave.png"]
    out = tmp_path / "in" / "stylized"  # inside the input tree: earlier results must not be picked up again
    first = run(model_file, tmp_path / "in", output=out, recursive="true")
    assert sorted(p.relative_to(out).as_posix() for p in first.written) == [
        "a_wave.png",
        "b_wave.jpg",
        "sub/c_wave.png",
    ]
    again = run(model_file, tmp_path / "in", output=out, recursive="true")
    assert len(again.skipped) == 3 and not again.written


def test_default_output_next_to_the_model(model_file: Path, tmp_path: Path) -> None:
    photo().save(tmp_path / "one.webp")
    summary = run(model_file, tmp_path / "one.webp")
    assert summary.written == [model_file.parent / "stylized" / "one_wave.webp"]
    assert not (tmp_path / "one_wave.webp").exists()


def chroma(img: Image.Image) -> torch.Tensor:
    t = torch.from_numpy(np.asarray(img.convert("RGB"), dtype=np.float32) / 255).permute(2, 0, 1)
    return rgb_to_ycbcr(t)[1:]


def test_preserve_color_keeps_chroma(model_file: Path, tmp_path: Path) -> None:
    content = photo(64, 48)
    content.save(tmp_path / "c.png")
    kept = run(model_file, tmp_path / "c.png", output=tmp_path / "kept.png", preserve_color="true")
    styled = run(model_file, tmp_path / "c.png", output=tmp_path / "styled.png")
    assert kept.written and styled.written
    with Image.open(tmp_path / "kept.png") as k, Image.open(tmp_path / "styled.png") as s:
        kept_t = torch.from_numpy(np.asarray(k, dtype=np.float32) / 255).permute(2, 0, 1)
        styled_t = torch.from_numpy(np.asarray(s, dtype=np.float32) / 255).permute(2, 0, 1)
    content_chroma = chroma(content)
    # Where stylized luminance + original chroma is a valid RGB color, the chroma must be the content's (up to
    # 8-bit rounding, ~0.004). Elsewhere (e.g. a white stylized pixel cannot carry a strong color) the clamp to
    # [0, 1] desaturates; those pixels are excluded from the chroma measure but must be a minority.
    unclamped = ycbcr_to_rgb(torch.cat([rgb_to_ycbcr(kept_t)[:1], content_chroma]))
    in_gamut = ((unclamped > 0.02) & (unclamped < 0.98)).all(0)
    assert in_gamut.float().mean() > 0.3
    err_kept = (rgb_to_ycbcr(kept_t)[1:] - content_chroma).abs()[:, in_gamut].mean().item()
    err_styled = (rgb_to_ycbcr(styled_t)[1:] - content_chroma).abs()[:, in_gamut].mean().item()
    assert err_kept < 0.01, err_kept
    assert err_styled > 5 * err_kept  # the measure does tell the two apart
    # and the luminance does come from the stylized image
    assert (rgb_to_ycbcr(kept_t)[0] - rgb_to_ycbcr(styled_t)[0]).abs()[in_gamut].mean().item() < 0.01


def test_strength_zero_returns_the_content(model_file: Path, tmp_path: Path) -> None:
    content = photo(37, 23)
    content.save(tmp_path / "c.png")
    run(model_file, tmp_path / "c.png", output=tmp_path / "o.png", strength=0.0)
    with Image.open(tmp_path / "o.png") as out:
        assert np.array_equal(np.asarray(out), np.asarray(content))


@pytest.mark.parametrize("size", [(37, 23), (1, 1), (5, 130)])
def test_output_size_equals_input_size(model_file: Path, tmp_path: Path, size: tuple[int, int]) -> None:
    photo(*size).save(tmp_path / "odd.png")
    run(model_file, tmp_path / "odd.png", output=tmp_path / "o.png")
    with Image.open(tmp_path / "o.png") as out:
        assert out.size == size


def test_resize_controls(model_file: Path, tmp_path: Path) -> None:
    photo(80, 40).save(tmp_path / "c.png")
    run(model_file, tmp_path / "c.png", output=tmp_path / "m.png", max_side_px=20)
    run(model_file, tmp_path / "c.png", output=tmp_path / "s.png", scale=0.5)
    with Image.open(tmp_path / "m.png") as m, Image.open(tmp_path / "s.png") as s:
        assert m.size == (20, 10) and s.size == (40, 20)


def psnr_files(a: Path, b: Path) -> float:
    return psnr(np.asarray(Image.open(a)), np.asarray(Image.open(b)), peak=255.0)


@pytest.mark.parametrize("norm", ["instance", "batch"])
def test_tiny_budget_tiles_and_matches_untiled(tmp_path: Path, norm: str) -> None:
    model = make_model(tmp_path / f"{norm}.pth", norm=norm, seed=3)
    photo(90, 70).save(tmp_path / "c.png")
    untiled = run(model, tmp_path / "c.png", output=tmp_path / "untiled.png")
    tiled = run(model, tmp_path / "c.png", output=tmp_path / "tiled.png", max_memory_mb=0.02)
    assert untiled.written and tiled.written
    assert np.asarray(Image.open(tmp_path / "tiled.png")).std() > 10  # not a flat image
    assert psnr_files(tmp_path / "tiled.png", tmp_path / "untiled.png") >= 40.0


def test_alpha_with_jpg_request_writes_png(model_file: Path, tmp_path: Path) -> None:
    img = photo().convert("RGBA")
    img.save(tmp_path / "a.png")
    summary = run(model_file, tmp_path / "a.png", output=tmp_path / "out", format="jpg")
    assert summary.written == [tmp_path / "out" / "a_wave.png"]
    again = run(model_file, tmp_path / "a.png", output=tmp_path / "out", format="jpg")
    assert again.skipped and not again.written  # the PNG written instead counts as the existing output


def test_usage_errors(model_file: Path, tmp_path: Path) -> None:
    photo().save(tmp_path / "c.png")
    with pytest.raises(FaststyleError, match="is an input image"):
        run(model_file, tmp_path / "c.png", output=tmp_path / "c.png")
    with pytest.raises(FaststyleError, match="among the input images"):
        run(model_file, tmp_path, output=tmp_path)
    with pytest.raises(FaststyleError, match="matches no image"):
        run(model_file, tmp_path / "*.jpg")
    with pytest.raises(FaststyleError, match="strength"):
        run(model_file, tmp_path / "c.png", strength=1.5)
    with pytest.raises(FaststyleError, match="model file not found"):
        run(tmp_path / "missing.pth", tmp_path / "c.png")


@pytest.mark.slow
def test_cli_errors_exit_2(model_file: Path, tmp_path: Path) -> None:
    photo().save(tmp_path / "c.png")
    cases = [
        [f"model={tmp_path / 'missing.pth'}", f"input={tmp_path / 'c.png'}"],
        [f"model={model_file}", f"input={tmp_path / 'nothing.png'}"],
    ]
    for args in cases:
        proc = subprocess.run([sys.executable, "stylize.py", *args], cwd=REPO, capture_output=True, text=True)
        assert proc.returncode == 2, proc.stderr
        assert proc.stderr.startswith("error: ") and "Traceback" not in proc.stderr


@pytest.mark.slow
@pytest.mark.parametrize(("signum", "code", "label"), [(2, 130, "Ctrl-C"), (15, 143, "SIGTERM")])
def test_ctrl_c_and_sigterm_stop_after_complete_files(
    model_file: Path, tmp_path: Path, signum: int, code: int, label: str
) -> None:
    """A real stylize.py is stopped once its first output exists: one line, exit 130/143, every output complete,
    no temporary file left, and the same command then finishes the rest."""
    src, out = tmp_path / "in", tmp_path / "out"
    src.mkdir()
    for i in range(6):
        photo(64, 48, seed=i).save(src / f"p{i:02d}.png")
    args = [f"model={model_file}", f"input={src}", f"output={out}", "scale=24", "batch_size=1", "io_threads=1"]
    proc = start_stylize_until(args, lambda: out.is_dir() and any(p.suffix == ".png" for p in out.iterdir()))
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == code, err
    assert "Traceback" not in err and err.strip().splitlines()[-1].startswith(f"interrupted ({label}):"), err
    written = sorted(p.name for p in out.iterdir())
    assert all(not name.startswith(".") for name in written), written  # no temporary file left behind
    assert 1 <= len(written) < 6, written
    for name in written:
        with Image.open(out / name) as img:
            img.load()  # complete files only
    again = subprocess.run([sys.executable, "stylize.py", *args], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and f"skipped {len(written)}" in again.stdout, again.stderr
    assert len(list(out.iterdir())) == 6


def test_a_model_that_outputs_nan_gets_one_message_whole_tiled_or_as_frames() -> None:
    """Untiled images, tiled images and video frames fail with the same line (inference.runner.non_finite_message)."""
    from omegaconf import OmegaConf
    from PIL import Image as PILImage

    from inference.runner import Loaded, Runner, non_finite_error, non_finite_message

    net = TransformerNet(base_width=4, residual_blocks=1).eval()
    with torch.no_grad():
        last_conv = [m for m in net.modules() if isinstance(m, nn.Conv2d)][-1]
        last_conv.bias.fill_(float("nan"))  # load_model would refuse this file: the Runner is given the network
    cfg = {"precision": "fp32", "channels_last": "false", "tmp_dir": None, "preserve_color": False, "strength": 1.0}
    pixels = torch.randint(0, 256, (1, 40, 48, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    expected = non_finite_message(40 * 48 * 3)
    assert expected and "NaN or infinite values" in expected and non_finite_message(0) is None
    whole = Runner.from_module(net, torch.device("cpu"), OmegaConf.create({**cfg, "max_memory_mb": 2048}))
    assert non_finite_error(whole([Loaded(None, PILImage.fromarray(pixels[0].numpy()), size=(40, 48))])[0]) == expected
    with pytest.raises(RuntimeError) as frames:
        whole.stylize_pixels(pixels)
    # The executor's self-check compares tiled with untiled output on a random image: a network whose output is
    # not finite there is left to the output check, which gives the same line as untiled.
    tiled = Runner.from_module(net, torch.device("cpu"), OmegaConf.create({**cfg, "max_memory_mb": 0.01}))
    with pytest.raises(RuntimeError) as tiles:
        tiled([Loaded(None, PILImage.fromarray(pixels[0].numpy()), size=(40, 48))])
    assert str(frames.value) == str(tiles.value) == expected


def test_compile_true_is_the_cuda_opt_in(model_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """compile=true hands the untiled network to torch.compile on CUDA (the Runner calls what it returns for every
    batch); anywhere else, and for an .onnx model, it is refused in one line before anything is read or written."""
    photo().save(tmp_path / "c.png")
    with pytest.raises(FaststyleError, match="compile=true is for CUDA devices \\(device is cpu\\)"):
        run(model_file, tmp_path / "c.png", output=tmp_path / "out", compile=True)
    assert not (tmp_path / "out").exists()
    with pytest.raises(FaststyleError, match="compile=true: .onnx models"):
        inference_policy(object(), torch.device("cuda"), compile=True)  # not an nn.Module: an ONNX session
    # What a CUDA policy with compile on does to the Runner, checked on the CPU with the policy switched on by hand.
    from dataclasses import replace

    from inference.network import StyleModel
    from inference.runner import Runner

    compiled: list[nn.Module] = []

    def fake_compile(module: nn.Module) -> nn.Module:
        compiled.append(module)
        return lambda x: module(x) * 0  # recognisable output: the Runner must call this, not the module

    monkeypatch.setattr(torch, "compile", fake_compile)
    model = StyleModel.from_network(TransformerNet(base_width=4, residual_blocks=1), "cpu", precision="fp32")
    model.policy = replace(model.policy, compile=True)
    cfg = compose_config([f"model={model_file}", f"input={tmp_path / 'c.png'}"])
    runner = Runner(model.network(), cfg)
    assert compiled == [runner.net]
    out = runner.stylize_pixels(torch.full((1, 16, 16, 3), 128, dtype=torch.uint8))
    assert int(out.max()) == 0  # the compiled callable's output
