"""Exact tiled inference (inference/tiled*.py): strips equal the untiled network, for every norm kind; stylize.py's
8-bit strip path equals the float path; peak memory stays within the documented bound."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from core.metrics import psnr
from inference.tiled import TiledExecutor
from inference.tiled_plan import build_plan
from inference.tiled_stats import ChannelStats
from inference.tiled_stores import DiskStore, RamStore, SourceStore
from models import fused
from models.modelfile import save_model
from models.transformer import SIZE_MULTIPLE, TransformerNet, pad_to_multiple
from tests.support import REPO, perturb_weights, tiny_model_file, tiny_net


@pytest.mark.parametrize("norm", ["instance", "batch", "none"])
@pytest.mark.parametrize("upsample", ["nearest", "transpose"])
def test_tiled_matches_untiled_with_tiny_budget(norm: str, upsample: str) -> None:
    net = tiny_net(norm, residual_blocks=2, upsample=upsample, scale=0.2)
    x = torch.rand(1, 3, 67, 93, generator=torch.Generator().manual_seed(1))  # odd sizes: padded canvas path
    # 0.05 MiB: every activation store goes to disk and strips are a few rows high.
    executor = TiledExecutor(net, budget_mb=0.05)
    got = executor(x)
    assert executor.disk_stores_used > 0
    with torch.inference_mode():
        want = net(x)
    assert got.shape == want.shape == (1, 3, 67, 93)
    assert want.std() > 0.05  # the comparison means something only if the output is not flat
    assert psnr(got, want) > 60.0


def test_strip_boundaries_do_not_matter() -> None:
    """Different strip heights (1 row, 5 rows, whole image) give the same image: no seams at strip borders."""
    net = tiny_net("instance", residual_blocks=2, scale=0.2)
    x = torch.rand(1, 3, 40, 52, generator=torch.Generator().manual_seed(2))
    outs = [TiledExecutor(net, budget_mb=1024, strip_rows=r, verify=False)(x) for r in (1, 5, 1000)]
    assert psnr(outs[0], outs[2]) > 80.0 and psnr(outs[1], outs[2]) > 80.0


@pytest.mark.parametrize("norm", ["instance", "batch"])
def test_fused_and_layer_strips_both_equal_the_network(norm: str) -> None:
    """The two ways strips are computed (inference/tiled.py: the kernel's window op, or torch's passes when the fused
    path is off) each reproduce the network in float32, on disk stores with strips of a few rows."""
    net = tiny_net(norm, residual_blocks=2, scale=0.2)
    x = torch.rand(1, 3, 44, 61, generator=torch.Generator().manual_seed(5))
    with torch.inference_mode(), fused.layer_by_layer():
        want = net(x)
        layers = TiledExecutor(net, budget_mb=0.05)
    fast = TiledExecutor(net, budget_mb=0.05)
    assert fast.fused and not layers.fused
    for executor in (fast, layers):
        got = executor(x)
        assert executor.disk_stores_used > 0
        if norm == "instance":
            torch.testing.assert_close(got, want, rtol=0, atol=2e-5)
        else:  # eval batch norm on perturbed running statistics: activations near 1e4, where float32 rounds coarser
            assert psnr(got, want) > 60.0


def test_bf16_network_keeps_bf16_stores_and_stays_close() -> None:
    """A bfloat16 network (stylize's precision=bf16) keeps its stores in bfloat16 on the fused path; the result stays
    within bfloat16 rounding of the untiled bfloat16 network (both round every activation to 8 bits)."""
    net = tiny_net("instance", residual_blocks=2, scale=0.2).to(torch.bfloat16)
    x = torch.rand(1, 3, 44, 61, generator=torch.Generator().manual_seed(6))
    executor = TiledExecutor(net, budget_mb=1024, strip_rows=5)
    assert executor.fused and executor.store_dtype == torch.bfloat16
    got = executor(x)
    with torch.inference_mode():
        want = net(x.to(torch.bfloat16)).float()
    assert want.std() > 0.05
    assert psnr(got, want) > 40.0


def test_budget_bounds_ram_stores() -> None:
    """With a budget smaller than the activations, RAM stores stay within it and the rest goes to disk."""
    net = tiny_net("instance", residual_blocks=2, scale=0.2)
    executor = TiledExecutor(net, budget_mb=1.0)
    executor(torch.rand(1, 3, 96, 128))  # 8 x 96 x 128 x 4 B = 0.375 MiB per full-resolution activation
    assert 0 < executor.peak_store_bytes <= 1.0 * 2**20
    assert executor.disk_stores_used > 0


def test_ram_budget_keeps_stores_in_ram() -> None:
    net = tiny_net("instance", residual_blocks=2, scale=0.2)
    executor = TiledExecutor(net, budget_mb=512)
    executor(torch.rand(1, 3, 32, 32))
    assert executor.disk_stores_used == 0


def test_channel_stats_merge_is_stable() -> None:
    """Chan's merge over strips equals the one-shot statistics, even with a large offset (where E[x^2]-E[x]^2
    in float32 fails)."""
    x = torch.randn(30, 17, 4, dtype=torch.float64) + 1e4  # (H, W, C)
    stats = ChannelStats(4)
    for r0 in range(0, 30, 7):
        stats.add(x[r0 : r0 + 7].float())
    var, mean = torch.var_mean(x, dim=(0, 1), correction=0)
    assert torch.allclose(stats.mean, mean, rtol=0, atol=1e-3)
    assert torch.allclose(stats.var, var, rtol=1e-2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kind", ["ram", "disk"])
def test_store_round_trip(kind: str, dtype: torch.dtype, tmp_path) -> None:
    store = RamStore(3, 10, 7, dtype) if kind == "ram" else DiskStore(3, 10, 7, str(tmp_path), dtype)
    data = torch.randn(10, 7, 3).to(dtype)  # (H, W, C): stores are channels-last
    store.write(0, data[:4])
    store.write(4, data[4:])
    assert torch.equal(store.read(2, 9), data[2:9])
    store.close()
    assert list(tmp_path.iterdir()) == []


def test_unknown_structure_is_refused() -> None:
    net = TransformerNet(norm="instance", base_width=4, residual_blocks=1).eval()
    net.encoder.append(nn.Sigmoid())  # a layer the streaming plan does not know
    with pytest.raises(NotImplementedError):
        build_plan(net)


def test_wrong_forward_is_caught_by_verification() -> None:
    """If forward() does something the documented structure does not say, verification refuses to run."""

    class Shifted(TransformerNet):
        def map_output(self, z: torch.Tensor) -> torch.Tensor:
            return torch.sigmoid(z)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return super().forward(x).flip(-1)  # not expressible in the plan

    net = perturb_weights(Shifted(norm="instance", base_width=4, residual_blocks=1).eval(), 0.2)
    with pytest.raises(NotImplementedError, match="does not reproduce"):
        TiledExecutor(net, budget_mb=1)


# ----------------------------------------------------------------------------------------------------------------
# Strip-wise input and output (TiledExecutor.stream) and stylize.py's 8-bit tiled path.
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("size", [(1, 1), (5, 130), (67, 93), (64, 96)])
def test_source_store_reads_the_padded_canvas_exactly(size: tuple[int, int]) -> None:
    """Strips of the canvas gathered from image rows equal rows of pad_to_multiple(image) bit for bit, from uint8
    (converted like data.io.pil_to_tensor) and from float rows, at every strip boundary."""
    height, width = size
    pixels = torch.randint(0, 256, (height, width, 4), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    image = pixels[..., :3].permute(2, 0, 1).float().div(255.0)[None]
    want = pad_to_multiple(image, SIZE_MULTIPLE)[0].permute(1, 2, 0)  # (H_canvas, W_canvas, 3)
    for source in (
        SourceStore(lambda lo, hi: pixels[lo:hi], height, width),
        SourceStore(lambda lo, hi: image[0].permute(1, 2, 0)[lo:hi], height, width),
    ):
        assert source.shape == (3, *want.shape[:2])
        for rows in (1, 3, want.shape[0]):
            got = torch.cat([source.read(lo, min(lo + rows, want.shape[0])) for lo in range(0, want.shape[0], rows)])
            assert torch.equal(got, want)


def test_stream_from_uint8_rows_equals_the_float_call() -> None:
    """stream() fed uint8 RGBA rows delivers, strip by strip and in order, exactly what __call__ returns for the
    same image as a float tensor (same executor, same strips)."""
    net = tiny_net("instance", residual_blocks=2, scale=0.2)
    executor = TiledExecutor(net, budget_mb=0.05)
    pixels = torch.randint(0, 256, (41, 58, 4), dtype=torch.uint8, generator=torch.Generator().manual_seed(4))
    want = executor(pixels[..., :3].permute(2, 0, 1).float().div(255.0))
    strips: list[tuple[int, torch.Tensor]] = []
    executor.stream(lambda lo, hi: pixels[lo:hi], 41, 58, lambda row, strip: strips.append((row, strip.clone())))
    assert [row for row, _ in strips] == sorted({row for row, _ in strips}) and strips[0][0] == 0
    assert torch.equal(torch.cat([strip for _, strip in strips], dim=1)[None], want)
    assert executor.disk_stores_used > 0 and executor.peak_work_bytes > 0


def _stylize(model: Path, source: Path, target: Path, *options: str):
    from inference.pipeline import stylize
    from stylize import compose_config

    return stylize(compose_config([f"model={model}", f"input={source}", f"output={target}", *options]))


@pytest.mark.parametrize("norm", ["instance", "batch"])
@pytest.mark.parametrize(
    ("mode", "options"),
    [("RGB", ("precision=fp32",)), ("RGBA", ("preserve_color=true", "strength=0.6", "precision=bf16"))],
)
def test_stylize_8bit_strips_equal_the_float_path(tmp_path: Path, norm: str, mode: str, options: tuple) -> None:
    """stylize.py's tiled path (uint8 strips in, finish_colors and 8-bit rounding per output strip, alpha kept) writes
    exactly the image of the float path: the executor's whole float output, finish_colors on the whole image,
    data.io.tensor_to_pil, alpha re-attached. Bit-exact, because the same strips give the same network values and
    every later step is pointwise; in bf16 too (the network cast to bf16, as stylize's precision policy casts it)."""
    from data.io import pil_to_tensor, tensor_to_pil
    from inference.color import finish_colors
    from models.modelfile import load_model

    model = tiny_model_file(tmp_path / f"{norm}.pth", norm=norm, base_width=4, scale=0.3, seed=3)
    rng = np.random.default_rng(5)
    pixels = rng.integers(0, 256, (70, 91, len(mode)), dtype=np.uint8)  # odd sizes: the canvas is padded
    Image.fromarray(pixels, mode).save(tmp_path / "c.png")
    summary = _stylize(model, tmp_path / "c.png", tmp_path / "out.png", "max_memory_mb=0.02", *options)
    assert len(summary.written) == 1 and not summary.failed
    got = np.asarray(Image.open(tmp_path / "out.png"))

    net = load_model(model, device="cpu")[0].eval()
    if "precision=bf16" in options:
        net = net.to(torch.bfloat16)
    content = pil_to_tensor(Image.fromarray(pixels[..., :3], "RGB"))
    stylized = TiledExecutor(net, budget_mb=0.02)(content)[0]
    color = ("preserve_color=true" in options, 0.6 if "strength=0.6" in options else 1.0)
    want = tensor_to_pil(finish_colors(stylized, content, *color))
    if mode == "RGBA":
        want.putalpha(Image.fromarray(pixels[..., 3], "L"))
    assert got.shape == (70, 91, len(mode)) and got.std() > 10
    assert np.array_equal(got, np.asarray(want))


def test_untileable_image_is_one_failed_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Too wide for the budget, or no folder for the disk stores: that file fails with a one-line reason; the run
    goes on."""
    import inference.tiled

    model = tiny_model_file(tmp_path / "m.pth", base_width=4, scale=0.3, seed=3)
    Image.fromarray(np.full((20, 300, 3), 120, np.uint8)).save(tmp_path / "wide.png")
    not_a_folder = tmp_path / "file"
    not_a_folder.write_text("")
    summary = _stylize(
        model, tmp_path / "wide.png", tmp_path / "o.png", "max_memory_mb=0.01", f"tmp_dir={not_a_folder}"
    )
    assert not summary.written and len(summary.failed) == 1
    assert "Not a directory" in summary.failed[0][1] and "\n" not in summary.failed[0][1]
    monkeypatch.setattr(inference.tiled, "MIN_STRIP_MB", 0)
    summary = _stylize(model, tmp_path / "wide.png", tmp_path / "o.png", "max_memory_mb=0.01")
    assert not summary.written and len(summary.failed) == 1
    assert "too wide" in summary.failed[0][1] and "max_memory_mb" in summary.failed[0][1]


def test_an_error_mid_image_removes_the_disk_stores(tmp_path: Path) -> None:
    executor = TiledExecutor(tiny_net("instance", residual_blocks=2, scale=0.2), budget_mb=0.05, tmp_dir=str(tmp_path))
    pixels = torch.randint(0, 256, (40, 52, 3), dtype=torch.uint8)

    def failing_sink(row: int, strip: torch.Tensor) -> None:
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        executor.stream(lambda lo, hi: pixels[lo:hi], 40, 52, failing_sink)
    assert executor.disk_stores_used > 0 and not list(tmp_path.iterdir())


# VmHWM (the high-water mark of the address space exec created), not ru_maxrss: a child's ru_maxrss starts at the
# peak RSS of the process that spawned it (vfork + exec), here pytest's, which may be larger than the child's own.
_PEAK_RSS_CHILD = """
import sys
from inference.pipeline import stylize
from stylize import compose_config
summary = stylize(compose_config(sys.argv[1:]))
assert len(summary.written) == 1, summary.failed
print(next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith("VmHWM:")))
"""


@pytest.mark.slow
def test_peak_memory_is_budget_plus_8bit_images_plus_fixed_overhead(tmp_path: Path) -> None:
    """A 3000 x 2000 photo with max_memory_mb=64 (activations on disk and in RAM) peaks below the documented bound:
    budget + the 8-bit input and output images (Pillow: 4 bytes per pixel) + the fixed overhead of the same
    command on a tiny image through the same tiled path. Each run is its own process, so peak RSS is its own."""
    torch.manual_seed(0)
    model = tmp_path / "w8.pth"
    save_model(model, TransformerNet(base_width=8), {"style_stem": "wave"})
    with Image.open(REPO / "data" / "samples" / "content" / "chelsea.jpg") as img:
        photo = img.convert("RGB")
    big = np.asarray(photo.resize((3000, 2000), Image.Resampling.BICUBIC)).astype(np.int16)
    big += np.random.default_rng(0).integers(-12, 13, big.shape, dtype=np.int16)  # real content, not flat
    Image.fromarray(big.clip(0, 255).astype(np.uint8)).save(tmp_path / "big.jpg", quality=90)
    photo.resize((64, 48)).save(tmp_path / "tiny.jpg", quality=90)

    def peak_rss(name: str, budget_mb: float) -> int:
        args = [
            f"model={model}",
            f"input={tmp_path / name}",
            f"output={tmp_path / 'out' / name}",
            f"max_memory_mb={budget_mb}",
            "preserve_color=true",
            "strength=0.6",
        ]
        proc = subprocess.run(
            [sys.executable, "-c", _PEAK_RSS_CHILD, *args], cwd=REPO, capture_output=True, text=True, timeout=300
        )
        assert proc.returncode == 0, proc.stderr[-2000:]
        return int(proc.stdout.split()[-1])

    overhead = peak_rss("tiny.jpg", 0.01)  # tiled too (tiny budget): same code, same libraries, same threads
    budget_mb = 64
    image_bytes = 3000 * 2000 * 4
    bound = overhead + budget_mb * 2**20 + 2 * image_bytes
    peak = peak_rss("big.jpg", budget_mb)
    assert peak <= bound, f"peak RSS {peak / 2**20:.0f} MiB > bound {bound / 2**20:.0f} MiB"
