"""The norm switch: ``norm="instance"|"batch"`` swaps every normalisation layer of TransformerNet, and
nothing else (same parameter names and shapes, same initial conv weights for one seed), so an IN-vs-BN comparison
differs only in the normalisation."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from models.norm import InstanceNorm
from models.transformer import TransformerNet

INSTANCE_TYPES = (InstanceNorm, nn.InstanceNorm2d)
BATCH_TYPES = (nn.BatchNorm2d,)


def count(model: nn.Module, types: tuple[type, ...]) -> int:
    return sum(isinstance(m, types) for m in model.modules())


def conv_count(model: nn.Module) -> int:
    return count(model, (nn.Conv2d, nn.ConvTranspose2d))


@pytest.mark.parametrize("upsample", ["nearest", "transpose"])
@pytest.mark.parametrize("residual_blocks", [0, 2, 5])
def test_switch_swaps_every_norm(upsample: str, residual_blocks: int) -> None:
    for kind, wanted, other in (("instance", INSTANCE_TYPES, BATCH_TYPES), ("batch", BATCH_TYPES, INSTANCE_TYPES)):
        net = TransformerNet(norm=kind, base_width=8, residual_blocks=residual_blocks, upsample=upsample)
        # Every conv but the last (the RGB output conv) is followed by a norm: 3 encoder + 2 per residual block +
        # 2 decoder upsampling stages.
        expected = conv_count(net) - 1
        assert expected == 5 + 2 * residual_blocks
        assert count(net, wanted) == expected, kind
        assert count(net, other) == 0, kind


def test_none_has_no_norm_at_all() -> None:
    net = TransformerNet(norm="none", base_width=8, residual_blocks=2)
    assert count(net, INSTANCE_TYPES + BATCH_TYPES + (nn.GroupNorm, nn.LayerNorm)) == 0


def test_instance_norm_is_affine_without_running_stats_and_bn_tracks_them() -> None:
    """Ulyanov et al. keep instance statistics at test time: our IN must not switch to running stats in eval."""
    instance = TransformerNet(norm="instance", base_width=8, residual_blocks=1)
    for m in instance.modules():
        if isinstance(m, INSTANCE_TYPES):
            assert m.affine and not m.track_running_stats
    batch = TransformerNet(norm="batch", base_width=8, residual_blocks=1)
    for m in batch.modules():
        if isinstance(m, BATCH_TYPES):
            assert m.affine and m.track_running_stats


def test_same_seed_same_conv_init_and_same_parameter_shapes() -> None:
    """With one seed the two networks start from identical conv weights: the only difference is the norm."""
    torch.manual_seed(0)
    instance = TransformerNet(norm="instance", base_width=8, residual_blocks=2)
    torch.manual_seed(0)
    batch = TransformerNet(norm="batch", base_width=8, residual_blocks=2)
    p_in = dict(instance.named_parameters())
    p_bn = dict(batch.named_parameters())
    assert p_in.keys() == p_bn.keys()
    for name, value in p_in.items():
        assert torch.equal(value, p_bn[name]), name


def test_the_two_kinds_behave_differently_in_eval() -> None:
    """Guard against a switch that only renames: BN in eval uses running stats, IN the image's own."""
    torch.manual_seed(0)
    instance = TransformerNet(norm="instance", base_width=8, residual_blocks=1).eval()
    torch.manual_seed(0)
    batch = TransformerNet(norm="batch", base_width=8, residual_blocks=1).eval()
    x = torch.rand(1, 3, 32, 32)
    assert not torch.allclose(instance(x), batch(x), atol=1e-3)
