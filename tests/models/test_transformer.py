"""TransformerNet: shapes for any input size, output range, config round trip, structure contract, training."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from models.norm import InstanceNorm
from models.transformer import (
    ConvLayer,
    ResidualBlock,
    TransformerNet,
    UpsampleConvLayer,
)

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("upsample", ["nearest", "transpose"])
@pytest.mark.parametrize("size", [(1, 1), (3, 2), (5, 7), (17, 33), (32, 32), (30, 31)])
def test_output_has_input_size_and_range(upsample: str, size: tuple[int, int]) -> None:
    torch.manual_seed(0)
    net = TransformerNet(base_width=8, residual_blocks=1, upsample=upsample)
    x = torch.rand(2, 3, *size)
    y = net(x)
    assert y.shape == x.shape
    assert y.dtype == torch.float32
    assert torch.isfinite(y).all()
    assert y.min() >= 0.0 and y.max() <= 1.0


@pytest.mark.parametrize("norm", ["instance", "batch", "none"])
def test_norm_kinds_build_and_run(norm: str) -> None:
    net = TransformerNet(norm=norm, base_width=8, residual_blocks=2)
    norms = [m for m in net.modules() if isinstance(m, (InstanceNorm, nn.BatchNorm2d))]
    # 3 encoder + 2 per residual block + 2 decoder; none -> Identity only.
    assert len(norms) == (0 if norm == "none" else 3 + 2 * 2 + 2)
    if norm == "instance":
        assert all(isinstance(m, InstanceNorm) and m.affine for m in norms)
    assert net(torch.rand(2, 3, 12, 12)).shape == (2, 3, 12, 12)


def test_paper_size_parameter_count() -> None:
    # Johnson et al. 2016: 1.68 M parameters at base width 32 with 5 residual blocks.
    net = TransformerNet()
    assert sum(p.numel() for p in net.parameters()) == 1_679_235


def test_config_round_trip_rebuilds_identical_network() -> None:
    net = TransformerNet(norm="batch", base_width=8, residual_blocks=3, upsample="transpose", output="linear")
    config = net.config()
    assert config == {
        "norm": "batch",
        "base_width": 8,
        "residual_blocks": 3,
        "upsample": "transpose",
        "output": "linear",
    }
    assert all(isinstance(v, (str, int)) for v in config.values())
    config["norm"] = "none"  # config() returns a copy
    assert net.config()["norm"] == "batch"
    clone = TransformerNet(**net.config())
    clone.load_state_dict(net.state_dict())
    net.eval()
    clone.eval()
    x = torch.rand(1, 3, 20, 24)
    torch.testing.assert_close(clone(x), net(x))


def test_structure_contract() -> None:
    net = TransformerNet(base_width=8, residual_blocks=4)
    assert isinstance(net.encoder, nn.Sequential) and isinstance(net.decoder, nn.Sequential)
    assert isinstance(net.residuals, nn.Sequential) and len(net.residuals) == 4
    for block in net.residuals:
        assert isinstance(block, ResidualBlock)
        assert isinstance(block.conv1, ConvLayer) and isinstance(block.conv2, ConvLayer)
        assert isinstance(block.norm1, InstanceNorm) and isinstance(block.norm2, InstanceNorm)
    # Every nn.Conv2d is the `.conv` of a ConvLayer or an UpsampleConvLayer, behind a reflection pad.
    wrappers = [m for m in net.modules() if isinstance(m, (ConvLayer, UpsampleConvLayer))]
    convs = [m for m in net.modules() if isinstance(m, nn.Conv2d)]
    assert {id(w.conv) for w in wrappers} == {id(c) for c in convs}
    assert all(isinstance(w.pad, nn.ReflectionPad2d) for w in wrappers)
    assert [type(m) for m in net.decoder][:2] == [UpsampleConvLayer, InstanceNorm]
    assert isinstance(net.decoder[-1], ConvLayer) and net.decoder[-1].conv.out_channels == 3
    channels = [m.conv.out_channels for m in net.encoder if isinstance(m, ConvLayer)]
    assert channels == [8, 16, 32]
    transpose = TransformerNet(base_width=8, residual_blocks=1, upsample="transpose")
    assert sum(isinstance(m, nn.ConvTranspose2d) for m in transpose.decoder) == 2


def test_linear_output_is_raw_in_training_and_clamped_in_eval() -> None:
    torch.manual_seed(0)
    net = TransformerNet(base_width=8, residual_blocks=1, output="linear")
    with torch.no_grad():
        net.decoder[-1].conv.bias.fill_(3.0)  # push every pixel above 1
    x = torch.rand(1, 3, 16, 16)
    assert net.train()(x).min() > 1.0
    assert torch.equal(net.eval()(x), torch.ones_like(x))


def test_channels_last_input_gives_same_result() -> None:
    torch.manual_seed(0)
    net = TransformerNet(base_width=8, residual_blocks=1).eval()
    x = torch.rand(2, 3, 20, 28)
    torch.testing.assert_close(net(x.contiguous(memory_format=torch.channels_last)), net(x), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize(
    "kwargs",
    [{"norm": "layer"}, {"upsample": "bilinear"}, {"output": "tanh"}, {"base_width": 0}, {"residual_blocks": -1}],
)
def test_bad_arguments_raise_value_error(kwargs: dict) -> None:
    with pytest.raises(ValueError):
        TransformerNet(**kwargs)


def test_bad_input_shape_raises() -> None:
    with pytest.raises(ValueError, match="N, 3, H, W"):
        TransformerNet(base_width=8, residual_blocks=0)(torch.rand(1, 4, 8, 8))


def test_every_parameter_gets_a_gradient() -> None:
    net = TransformerNet(norm="instance", base_width=8, residual_blocks=2)
    net(torch.rand(2, 3, 16, 16)).mean().backward()
    missing = [name for name, p in net.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not missing


@pytest.mark.slow
def test_can_reach_black_and_white_at_a_high_learning_rate() -> None:
    """The output mapping must reach both ends of [0, 1] without collapsing to black at a high learning rate
    (models/transformer.py, "Output mapping")."""
    torch.manual_seed(0)
    net = TransformerNet(base_width=8, residual_blocks=0)
    x = torch.rand(1, 3, 16, 16)
    target = torch.zeros_like(x)
    target[..., :, 8:] = 1.0  # left half black, right half white
    optimizer = torch.optim.Adam(net.parameters(), lr=5e-3)
    for _ in range(40):
        optimizer.zero_grad()
        loss = (net(x) - target).pow(2).mean()
        loss.backward()
        optimizer.step()
    y = net(x).detach()
    assert y[..., :, :8].mean() < 0.1, "could not reach black"
    assert y[..., :, 8:].mean() > 0.9, "could not reach white"


def test_few_channel_conv_runs_channels_last_on_cpu_with_the_same_numbers() -> None:
    from models.transformer import ConvLayer, _prefer_channels_last

    torch.manual_seed(3)
    layer = ConvLayer(8, 3, 9)
    x = torch.randn(2, 8, 21, 19, requires_grad=True)
    padded = layer.pad(x)
    assert _prefer_channels_last(padded, layer.conv)
    assert not _prefer_channels_last(padded.contiguous(memory_format=torch.channels_last), layer.conv)
    assert not _prefer_channels_last(padded, ConvLayer(8, 16, 3).conv)  # wide convs keep the caller's layout

    y = layer(x)
    assert y.shape == (2, 3, 21, 19) and y.is_contiguous()  # handed back in the caller's (NCHW) layout
    ref = torch.nn.functional.conv2d(padded, layer.conv.weight, layer.conv.bias)
    torch.testing.assert_close(y, ref, atol=1e-5, rtol=1e-5)
    g = torch.randn_like(y)
    got = torch.autograd.grad(y, (x, layer.conv.weight, layer.conv.bias), g)
    want = torch.autograd.grad(ref, (x, layer.conv.weight, layer.conv.bias), g)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_network_output_keeps_the_input_layout() -> None:
    net = TransformerNet(base_width=8, residual_blocks=1).eval()
    x = torch.rand(1, 3, 24, 20)
    with torch.no_grad():
        assert net(x).is_contiguous()
        cl = net.to(memory_format=torch.channels_last)(x.contiguous(memory_format=torch.channels_last))
    assert cl.is_contiguous(memory_format=torch.channels_last)
