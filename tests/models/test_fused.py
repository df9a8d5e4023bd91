"""The fused CPU path (models/fused.py and the kernel's store op): the same results as the layer-by-layer network it
replaces, forward and backward, in every layout and precision it serves, and the layer path wherever it does not
apply."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F

from models import fused
from models.kernels import INSTANCE_NORM, load_kernel
from models.norm import InstanceNorm, norm_store
from models.transformer import TransformerNet

pytestmark = pytest.mark.skipif(not load_kernel(INSTANCE_NORM), reason="the fused CPU kernel cannot be built here")


@pytest.fixture
def layer_path(monkeypatch: pytest.MonkeyPatch):
    """Runs a callable once by the fused path and once layer by layer; returns both results."""

    def both(call):
        monkeypatch.setattr(fused, "FUSED_CPU_PATH", True)
        with_fusion = call()
        monkeypatch.setattr(fused, "FUSED_CPU_PATH", False)
        layers = call()
        monkeypatch.setattr(fused, "FUSED_CPU_PATH", True)
        return with_fusion, layers

    return both


def _perturbed(net: TransformerNet, seed: int = 0) -> TransformerNet:
    """Random weights far from the initialisation, so that every layer shapes the output."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.1)
    return net


def _reference_store(norm, x, relu, residual, up, pad, block):
    """What the layers compute: our InstanceNorm, ReLU or the residual add, nearest upsample, reflection pad, cells."""
    y = norm(x)
    if residual is not None:
        y = y + residual
    if relu:
        y = F.relu(y)
    if up > 1:
        y = F.interpolate(y, scale_factor=up, mode="nearest")
    if pad:
        y = F.pad(y, (pad,) * 4, mode="reflect")
    return fused._to_cells(y, block) if block > 1 else y


HEIGHT, WIDTH = 12, 20
CASES = [
    (channels_last, relu, residual, up, pad, block)
    for channels_last, relu, residual, up, pad, block in itertools.product(
        [False, True], [False, True], [False, True], [1, 2], [0, 1, 4], [1, 4]
    )
    # cells are written in channels-last only, and only from padded sides that divide into them
    if block == 1 or (channels_last and (up * HEIGHT + 2 * pad) % block == 0 and (up * WIDTH + 2 * pad) % block == 0)
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("channels_last", "relu", "residual", "up", "pad", "block"), CASES)
def test_store_equals_the_passes_it_replaces(dtype, channels_last, relu, residual, up, pad, block) -> None:
    """norm -> ReLU / residual add -> upsample -> pad (-> cells) in one sweep: in float32 the same numbers as the four
    passes up to the last bits of the affine step (the statistics are the same code); in bfloat16 within one rounding
    of the result, since the layers round the norm's output before adding the residual and the store rounds once."""
    gen = torch.Generator().manual_seed(1)
    height, width = HEIGHT, WIDTH
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = (torch.randn(2, 8, height, width, generator=gen) * 3 + 1).to(dtype).contiguous(memory_format=fmt)
    norm = InstanceNorm(8, affine=True)
    with torch.no_grad():
        norm.weight.copy_(torch.rand(8, generator=gen) + 0.5)
        norm.bias.copy_(torch.randn(8, generator=gen))
    res = None
    if residual:  # the interior of a padded buffer, as a residual block's identity is
        padded = torch.randn(2, 8, height + 2, width + 2, generator=gen).to(dtype).contiguous(memory_format=fmt)
        res = padded[:, :, 1:-1, 1:-1]
    with torch.no_grad():
        out = norm_store(norm, x, relu, res, up, pad, block)
        expected = _reference_store(norm, x, relu, res, up, pad, block)
    assert out.shape == expected.shape and out.dtype == dtype
    assert out.is_contiguous(memory_format=fmt)
    if dtype == torch.float32:
        torch.testing.assert_close(out, expected, rtol=1e-6, atol=1e-6)
    else:
        # one bf16 rounding step (8 bits) of the value, plus one of the residual sum's operands
        assert ((out.float() - expected.float()).abs() <= expected.float().abs() * 2**-7 + 2**-6).all()


@pytest.mark.parametrize(("channels_last", "relu", "residual", "up", "pad", "block"), CASES)
def test_store_backward_equals_the_passes_it_replaces(channels_last, relu, residual, up, pad, block) -> None:
    """The gradients of x, the residual, weight and bias through the store equal autograd's through the four passes
    (float64: up to rounding)."""
    gen = torch.Generator().manual_seed(6)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = (torch.randn(2, 8, HEIGHT, WIDTH, generator=gen, dtype=torch.float64) * 3 + 1).contiguous(memory_format=fmt)
    norm = InstanceNorm(8, affine=True).double()
    with torch.no_grad():
        norm.weight.copy_(torch.rand(8, generator=gen) + 0.5)
        norm.bias.copy_(torch.randn(8, generator=gen))
    padded = torch.randn(2, 8, HEIGHT + 2, WIDTH + 2, generator=gen, dtype=torch.float64).contiguous(memory_format=fmt)

    def gradients(store) -> list[torch.Tensor]:
        norm.zero_grad()
        source = x.clone().requires_grad_(True)
        around = padded.clone().requires_grad_(True)
        out = store(norm, source, relu, around[:, :, 1:-1, 1:-1] if residual else None, up, pad, block)
        weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(7), dtype=out.dtype)
        (out * weights).sum().backward()
        grads = [source.grad, norm.weight.grad, norm.bias.grad]
        return grads + ([around.grad] if residual else [])

    for got, want in zip(gradients(norm_store), gradients(_reference_store), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("blocks", [0, 1, 5])
def test_fused_network_equals_the_layers_in_float32(layer_path, channels_last: bool, blocks: int) -> None:
    """The whole network, odd sizes included: only the last convolution sums its 9x9x w terms in another order (the
    space-to-depth form), which moves the unmapped output by a few float32 roundings of sums of ~10^3 products; the
    sigmoid halves that. 1e-5 leaves room for every CPU's convolution algorithms and is far below 8-bit output
    steps (4e-3)."""
    net = _perturbed(TransformerNet(base_width=8, residual_blocks=blocks)).eval()
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    net = net.to(memory_format=fmt)
    for size in [(36, 52), (1, 1), (5, 7), (8, 8)]:
        x = torch.rand(2, 3, *size, generator=torch.Generator().manual_seed(2)).contiguous(memory_format=fmt)
        with torch.no_grad():
            with_fusion, layers = layer_path(lambda image=x: net(image))
        assert with_fusion.shape == (2, 3, *size)
        torch.testing.assert_close(with_fusion, layers, rtol=0, atol=1e-5)


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("blocks", [0, 2])
def test_fused_gradients_equal_the_layers_in_float64(layer_path, channels_last: bool, blocks: int) -> None:
    """Training through the fused path: the input's and every parameter's gradient equal the layer path's in float64
    up to rounding (relative to the largest gradient: the biases of convolutions before an instance norm have an exact
    gradient of 0, which both paths only approximate)."""
    net = _perturbed(TransformerNet(base_width=4, residual_blocks=blocks)).double().train()
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    net = net.to(memory_format=fmt)
    x = torch.rand(2, 3, 16, 20, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    x = x.contiguous(memory_format=fmt)

    def gradients() -> list[torch.Tensor]:
        net.zero_grad()
        image = x.clone().requires_grad_(True)
        out = net(image)
        (out * torch.linspace(0, 1, out.numel(), dtype=out.dtype).view_as(out)).sum().backward()
        return [image.grad.clone()] + [p.grad.clone() for p in net.parameters()]

    with_fusion, layers = layer_path(gradients)
    scale = max(g.abs().max().item() for g in layers)
    for a, b in zip(with_fusion, layers, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-10 * scale)


@pytest.mark.parametrize("channels_last", [False, True])
def test_fused_bf16_training_step_stays_close_to_the_layers(layer_path, channels_last: bool) -> None:
    """Under bf16 autocast (CPU training): the gradients of the two paths differ by bf16 rounding only (1% measured);
    a wrong mask, residual or padding gradient would differ by tens of percent."""
    net = _perturbed(TransformerNet(base_width=8, residual_blocks=2)).train()
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    net = net.to(memory_format=fmt)
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(4)).contiguous(memory_format=fmt)

    def gradients() -> torch.Tensor:
        net.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = net(x)
        out.float().square().mean().backward()
        return torch.cat([p.grad.flatten() for p in net.parameters()])

    with_fusion, layers = layer_path(gradients)
    assert ((with_fusion - layers).norm() / layers.norm()).item() < 0.05


def test_fused_bf16_inference_stays_close_to_float32(layer_path) -> None:
    """A bf16 network on the fused path stays as close to the float32 layers as the bf16 layers do (both round the
    activations to 8 bits)."""
    net = _perturbed(TransformerNet(base_width=8, residual_blocks=2)).eval()
    x = torch.rand(1, 3, 40, 48, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        reference = layer_path(lambda: net(x))[1]
        bf16 = net.to(torch.bfloat16).to(memory_format=torch.channels_last)
        xb = x.to(torch.bfloat16).contiguous(memory_format=torch.channels_last)
        with_fusion, layers = layer_path(lambda: bf16(xb).float())
    fused_error = (with_fusion - reference).abs().max().item()
    layers_error = (layers - reference).abs().max().item()
    assert fused_error <= max(2 * layers_error, 1 / 255)


def test_fused_path_applies_only_where_it_computes_the_same_network(monkeypatch: pytest.MonkeyPatch) -> None:
    """Batch norm, transposed convolutions, several styles, a graph being recorded, or the switch off: the layers."""
    x = torch.rand(1, 3, 16, 16)
    assert fused.applies(TransformerNet(base_width=4, residual_blocks=1), x)
    for kwargs in ({"norm": "batch"}, {"norm": "none"}, {"upsample": "transpose"}, {"num_styles": 2}):
        assert not fused.applies(TransformerNet(base_width=4, residual_blocks=1, **kwargs), x)
    tnorm = TransformerNet(base_width=4, residual_blocks=1)
    tnorm.encoder[1] = torch.nn.InstanceNorm2d(4, affine=True)  # what pytorch/examples' layers look like
    assert not fused.serves(tnorm)
    net = TransformerNet(base_width=4, residual_blocks=1).eval()
    calls = []
    monkeypatch.setattr(fused, "fused_body", lambda *a: calls.append(a) or pytest.fail("fused while tracing"))
    with torch.no_grad():
        torch.jit.trace(net, x, check_trace=False)  # (the check reruns the network eagerly)
    monkeypatch.setattr(fused, "FUSED_CPU_PATH", False)
    assert not fused.applies(net, x)


def test_store_refuses_what_it_cannot_write() -> None:
    """The op's own checks: cells need channels-last, the padding must reflect inside the side."""
    x = torch.rand(1, 4, 8, 8)
    with pytest.raises(RuntimeError, match="block > 1 needs channels-last"):
        torch.ops.faststyle_norm.store(x, None, None, 1e-5, False, True, None, 1, 4, 4)
    with pytest.raises(RuntimeError, match="pad must be in"):
        torch.ops.faststyle_norm.store(x, None, None, 1e-5, False, True, None, 1, 8, 1)


def _reflect(i: int, n: int) -> int:
    i = abs(i)
    return 2 * (n - 1) - i if i >= n else i


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    ("relu", "residual", "up", "pad", "block"),
    [
        (True, False, 1, 1, 1),
        (False, True, 1, 0, 1),
        (True, False, 2, 1, 1),
        (True, False, 1, 4, 4),
        (False, True, 2, 3, 1),
    ],
)
def test_window_writes_every_strip_of_the_whole_store(dtype, relu, residual, up, pad, block) -> None:
    """The tiled executor's window op: for every window of padded rows (every start and height, in whole cells), the
    rows the whole-activation computation writes there, from only the source rows the window reads and a given
    normalisation (x - mf) * sc + sh (the kernel takes mf, sc, sh in float32 for float32 and bfloat16)."""
    gen = torch.Generator().manual_seed(3)
    channels, height, width = 5, 9, 8
    x = torch.randn(1, channels, height, width, generator=gen).to(dtype).contiguous(memory_format=torch.channels_last)
    res = torch.randn(x.shape, generator=gen).to(dtype).contiguous(memory_format=torch.channels_last)
    mf, sh = torch.randn(channels, dtype=torch.float64, generator=gen), torch.randn(channels, dtype=torch.float64)
    sc = torch.rand(channels, dtype=torch.float64, generator=gen) + 0.5
    whole = (x.double() - mf.float().double().view(1, -1, 1, 1)) * sc.view(1, -1, 1, 1) + sh.view(1, -1, 1, 1)
    whole = whole + res.double() if residual else whole
    whole = F.relu(whole) if relu else whole
    whole = F.interpolate(whole, scale_factor=up, mode="nearest") if up > 1 else whole
    whole = F.pad(whole, (pad,) * 4, mode="reflect")
    padded_h = whole.shape[2]
    for q0 in range(0, padded_h, block):
        for q1 in range(q0 + block, padded_h + 1, block):
            sources = [_reflect(q - pad, up * height) // up for q in range(q0, q1)]
            lo, hi = min(sources), max(sources) + 1
            got = torch.ops.faststyle_norm.window(
                x[:, :, lo:hi],
                mf,
                sc,
                sh,
                relu,
                res[:, :, lo:hi] if residual else None,
                up,
                pad,
                block,
                height,
                lo,
                q0,
                q1,
            )
            want = whole[:, :, q0:q1]
            want = fused._to_cells(want, block) if block > 1 else want
            assert got.dtype == dtype and got.is_contiguous(memory_format=torch.channels_last)
            # float32: the same formula up to rounding; bfloat16: one rounding of the result (8 bits)
            tol = want.abs() * (2**-7 if dtype == torch.bfloat16 else 1e-6) + 1e-6
            assert ((got.double() - want).abs() <= tol).all(), (q0, q1)


def test_window_refuses_rows_it_was_not_given() -> None:
    x = torch.rand(1, 4, 3, 8).contiguous(memory_format=torch.channels_last)
    k = torch.zeros(4, dtype=torch.float64)
    with pytest.raises(RuntimeError, match="outside the rows given"):  # padded rows 0..5 read source rows 0..4
        torch.ops.faststyle_norm.window(x, k, k + 1, k, False, None, 1, 1, 1, 10, 0, 0, 6)
    with pytest.raises(RuntimeError, match="divide by block"):
        torch.ops.faststyle_norm.window(x, k, k + 1, k, False, None, 1, 1, 4, 10, 0, 0, 3)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_moments_are_the_channel_statistics(dtype) -> None:
    """Mean and biased variance per (n, c), as the tiled executor merges them, from a mean far from zero."""
    gen = torch.Generator().manual_seed(4)
    x = (torch.randn(2, 6, 17, 23, generator=gen) * 0.5 + 40).to(dtype).contiguous(memory_format=torch.channels_last)
    mean, var = torch.ops.faststyle_norm.moments(x)
    exact = x.double()
    torch.testing.assert_close(mean, exact.mean((2, 3)), rtol=1e-7, atol=0)
    torch.testing.assert_close(var, exact.var((2, 3), unbiased=False), rtol=1e-4, atol=0)
