"""Exact tiled inference (models/tiled.py): streamed strips equal the untiled network, for every norm kind."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from models.tiled import ChannelStats, DiskStore, RamStore, TiledExecutor, build_plan
from models.transformer import TransformerNet


def perturbed_net(norm: str, upsample: str = "nearest", seed: int = 0) -> TransformerNet:
    """A small eval-mode network whose output is far from flat (random weights pushed off initialisation;
    batch-norm running statistics set to non-trivial values so they matter)."""
    torch.manual_seed(seed)
    net = TransformerNet(norm=norm, base_width=8, residual_blocks=2, upsample=upsample).eval()
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn_like(p) * 0.2)
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.5)
                m.running_var.uniform_(0.5, 2.0)
    return net


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    mse = (a - b).pow(2).mean().item()
    return float("inf") if mse == 0 else 10 * torch.log10(torch.tensor(1.0 / mse)).item()


@pytest.mark.parametrize("norm", ["instance", "batch", "none"])
@pytest.mark.parametrize("upsample", ["nearest", "transpose"])
def test_tiled_matches_untiled_with_tiny_budget(norm: str, upsample: str) -> None:
    net = perturbed_net(norm, upsample)
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
    net = perturbed_net("instance")
    x = torch.rand(1, 3, 40, 52, generator=torch.Generator().manual_seed(2))
    outs = [TiledExecutor(net, budget_mb=1024, strip_rows=r, verify=False)(x) for r in (1, 5, 1000)]
    assert psnr(outs[0], outs[2]) > 80.0 and psnr(outs[1], outs[2]) > 80.0


def test_budget_bounds_ram_stores() -> None:
    """With a budget smaller than the activations, RAM stores stay within it and the rest goes to disk."""
    net = perturbed_net("instance")
    executor = TiledExecutor(net, budget_mb=1.0)
    executor(torch.rand(1, 3, 96, 128))  # 8 x 96 x 128 x 4 B = 0.375 MiB per full-resolution activation
    assert 0 < executor.peak_store_bytes <= 1.0 * 2**20
    assert executor.disk_stores_used > 0


def test_ram_budget_keeps_stores_in_ram() -> None:
    net = perturbed_net("instance")
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


@pytest.mark.parametrize("kind", ["ram", "disk"])
def test_store_round_trip(kind: str, tmp_path) -> None:
    store = RamStore(3, 10, 7) if kind == "ram" else DiskStore(3, 10, 7, str(tmp_path))
    data = torch.randn(10, 7, 3)  # (H, W, C): stores are channels-last
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

    net = Shifted(norm="instance", base_width=4, residual_blocks=1).eval()
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    with pytest.raises(NotImplementedError, match="does not reproduce"):
        TiledExecutor(net, budget_mb=1)
