"""Tests for models/norm.py: InstanceNorm against torch's instance norm, and make_norm."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from models.norm import NORM_KINDS, InstanceNorm, make_norm


def _affine_pair(c: int, seed: int = 0) -> tuple[InstanceNorm, nn.InstanceNorm2d]:
    gen = torch.Generator().manual_seed(seed)
    ours = InstanceNorm(c, affine=True)
    with torch.no_grad():
        ours.weight.copy_(torch.rand(c, generator=gen) + 0.5)
        ours.bias.copy_(torch.randn(c, generator=gen))
    ref = nn.InstanceNorm2d(c, affine=True)
    ref.load_state_dict(ours.state_dict())
    return ours, ref


@pytest.mark.parametrize("shape", [(2, 4, 5, 7), (3, 4, 11), (2, 4, 3, 4, 5), (1, 4, 2)])
@pytest.mark.parametrize("channels_last", [False, True])
def test_forward_backward_match_functional(shape: tuple[int, ...], channels_last: bool) -> None:
    torch.manual_seed(0)
    ours, ref = _affine_pair(4)
    x = torch.randn(shape)
    if channels_last and x.dim() == 4:
        x = x.contiguous(memory_format=torch.channels_last)
    if channels_last and x.dim() == 5:
        x = x.contiguous(memory_format=torch.channels_last_3d)
    grad = torch.randn(shape)
    x1 = x.clone().requires_grad_(True)
    x2 = x.clone().requires_grad_(True)
    y1 = ours(x1)
    y2 = F.instance_norm(x2, weight=ref.weight, bias=ref.bias, eps=1e-5)
    y1.backward(grad)
    y2.backward(grad)
    torch.testing.assert_close(y1, y2, atol=1e-5, rtol=0)
    torch.testing.assert_close(x1.grad, x2.grad, atol=1e-5, rtol=0)
    torch.testing.assert_close(ours.weight.grad, ref.weight.grad, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ours.bias.grad, ref.bias.grad, atol=1e-5, rtol=1e-5)
    assert y1.shape == x.shape and y1.stride() == x.stride()


def test_channels_last_stays_channels_last_with_same_numbers() -> None:
    torch.manual_seed(1)
    ours, _ = _affine_pair(6)
    x = torch.randn(2, 6, 9, 10)
    x_cl = x.contiguous(memory_format=torch.channels_last)
    y_cl = ours(x_cl)
    assert y_cl.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(y_cl, ours(x), atol=1e-6, rtol=0)
    # a gradient in the other layout (as a downstream op may give) still gives the right input gradient
    xa = x_cl.clone().requires_grad_(True)
    xb = x.clone().requires_grad_(True)
    g = torch.randn(2, 6, 9, 10)
    ours(xa).backward(g)
    ours(xb).backward(g.contiguous(memory_format=torch.channels_last))
    assert xa.grad.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(xa.grad, xb.grad, atol=1e-6, rtol=0)


def test_gradcheck_float64() -> None:
    torch.manual_seed(2)
    m = InstanceNorm(3, affine=True).double()
    with torch.no_grad():
        m.weight.uniform_(0.5, 1.5)
        m.bias.normal_()
    x = torch.randn(2, 3, 4, 5, dtype=torch.float64, requires_grad=True)
    w = m.weight
    b = m.bias
    assert torch.autograd.gradcheck(lambda x, w, b: _call_with(m, x, w, b), (x, w, b))
    x_cl = torch.randn(2, 3, 4, 5, dtype=torch.float64).contiguous(memory_format=torch.channels_last)
    x_cl.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda x: m(x), (x_cl,))


def _call_with(m: InstanceNorm, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.func.functional_call(m, {"weight": w, "bias": b}, (x,))


def test_no_affine_and_unit_statistics() -> None:
    m = InstanceNorm(3)
    assert m.weight is None and m.bias is None
    y = m(torch.randn(2, 3, 8, 8) * 5 + 3)
    torch.testing.assert_close(y.mean(dim=(2, 3)), torch.zeros(2, 3), atol=1e-5, rtol=0)
    torch.testing.assert_close(y.var(dim=(2, 3), correction=0), torch.ones(2, 3), atol=1e-3, rtol=0)


def test_affine_init_is_identity_scale_and_zero_shift() -> None:
    m = InstanceNorm(5, affine=True)
    assert torch.equal(m.weight, torch.ones(5)) and torch.equal(m.bias, torch.zeros(5))
    assert m.eps == 1e-5 and m.momentum == 0.1 and m.track_running_stats is False


def test_numerically_stable_at_large_offset() -> None:
    torch.manual_seed(3)
    x = torch.randn(2, 4, 32, 32) + 1e4
    reference = F.instance_norm(x.double())
    ours_err = (InstanceNorm(4)(x).double() - reference).abs().max().item()
    torch_err = (F.instance_norm(x).double() - reference).abs().max().item()
    assert ours_err <= max(torch_err, 1e-3)
    # the E[x^2] - E[x]^2 shortcut this test must catch: it is far off (or NaN) on the same input
    mean = x.mean(dim=(2, 3), keepdim=True)
    var = (x * x).mean(dim=(2, 3), keepdim=True) - mean * mean
    shortcut = (x - mean) / torch.sqrt(var + 1e-5)
    shortcut_err = (shortcut.double() - reference).abs().max().item()
    assert not shortcut_err <= max(torch_err, 1e-3)  # NaN compares False


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_input_float32_statistics(dtype: torch.dtype) -> None:
    torch.manual_seed(4)
    m = InstanceNorm(4, affine=True)
    # fp16 would overflow a sum of squares of 300^2 * 4096 if the statistics were not in float32
    x = (torch.randn(2, 4, 64, 64) * 300).to(dtype)
    y = m(x)
    assert y.dtype == dtype
    expected = F.instance_norm(x.float())
    tol = 1e-2 if dtype == torch.float16 else 5e-2
    torch.testing.assert_close(y.float(), expected, atol=tol, rtol=0)
    x.requires_grad_(True)
    m(x).sum().backward()
    assert x.grad.dtype == dtype


def test_unbatched_input_matches_batched() -> None:
    torch.manual_seed(5)
    ours, ref = _affine_pair(3)
    x = torch.randn(3, 6, 7)
    torch.testing.assert_close(ours(x), ref(x), atol=1e-5, rtol=0)
    torch.testing.assert_close(ours(x), ours(x.unsqueeze(0)).squeeze(0))
    x1 = torch.randn(3, 9)  # (C, L): one spatial dim
    torch.testing.assert_close(ours(x1), nn.InstanceNorm1d(3)(x1) * ours.weight[:, None] + ours.bias[:, None])


@pytest.mark.parametrize("shape", [(2, 5, 8, 8), (5, 8, 8), (7,), (2, 4)])
def test_wrong_channel_count_names_expected_and_received(shape: tuple[int, ...]) -> None:
    m = InstanceNorm(3, affine=True)
    with pytest.raises(ValueError) as err:
        m(torch.randn(shape))
    assert "(N, 3, *spatial)" in str(err.value) and str(tuple(shape)) in str(err.value)


def test_single_spatial_element_rejected_like_torch() -> None:
    with pytest.raises(ValueError, match="more than 1 spatial element"):
        InstanceNorm(3)(torch.randn(2, 3, 1, 1))


@pytest.mark.parametrize("momentum", [0.1, 0.5])
def test_running_stats_match_torch_train_and_eval(momentum: float) -> None:
    torch.manual_seed(6)
    ours = InstanceNorm(4, affine=True, track_running_stats=True, momentum=momentum)
    ref = nn.InstanceNorm2d(4, affine=True, track_running_stats=True, momentum=momentum)
    ref.load_state_dict(ours.state_dict())
    for _ in range(3):
        x = torch.randn(3, 4, 6, 5) * 2 + 1
        torch.testing.assert_close(ours(x), ref(x), atol=1e-5, rtol=0)
    torch.testing.assert_close(ours.running_mean, ref.running_mean)
    torch.testing.assert_close(ours.running_var, ref.running_var)
    assert int(ours.num_batches_tracked) == int(ref.num_batches_tracked)
    ours.eval()
    ref.eval()
    x = torch.randn(2, 4, 6, 5, requires_grad=True)
    torch.testing.assert_close(ours(x), ref(x), atol=1e-5, rtol=0)  # eval: uses the running statistics
    ours(x).sum().backward()
    assert x.grad is not None
    # eval without tracked statistics still normalises with the input's own statistics
    plain = InstanceNorm(4).eval()
    x = torch.randn(2, 4, 6, 5)
    torch.testing.assert_close(plain(x), nn.InstanceNorm2d(4).eval()(x), atol=1e-5, rtol=0)


def test_momentum_none_is_cumulative_average() -> None:
    torch.manual_seed(7)
    m = InstanceNorm(2, track_running_stats=True, momentum=None)
    batches = [torch.randn(2, 2, 5, 5) * (i + 1) + i for i in range(3)]
    for x in batches:
        m(x)
    means = torch.stack([x.mean(dim=(2, 3)).mean(0) for x in batches])
    variances = torch.stack([x.var(dim=(2, 3), correction=1).mean(0) for x in batches])
    torch.testing.assert_close(m.running_mean, means.mean(0))
    torch.testing.assert_close(m.running_var, variances.mean(0))
    assert int(m.num_batches_tracked) == 3


@pytest.mark.parametrize("tracked", [False, True])
def test_state_dict_round_trips_with_torch(tracked: bool) -> None:
    ours = InstanceNorm(4, affine=True, track_running_stats=tracked)
    ref = nn.InstanceNorm2d(4, affine=True, track_running_stats=tracked)
    assert list(ours.state_dict()) == list(ref.state_dict())
    with torch.no_grad():
        ref.weight.fill_(2.0)
        ref.bias.fill_(-1.0)
    ours.load_state_dict(ref.state_dict())
    assert torch.equal(ours.weight, ref.weight)
    ref2 = nn.InstanceNorm2d(4, affine=True, track_running_stats=tracked)
    ref2.load_state_dict(ours.state_dict())
    assert torch.equal(ref2.bias, ours.bias)
    x = torch.randn(1, 4, 5, 5)
    torch.testing.assert_close(ours.to_torch()(x), ours(x), atol=1e-5, rtol=0)
    ours.double()  # to_torch follows the layer's dtype
    torch.testing.assert_close(ours.to_torch()(x.double()), ours(x.double()), atol=1e-12, rtol=0)


def test_trace_and_compile_path_matches() -> None:
    torch.manual_seed(8)
    ours, ref = _affine_pair(3)
    x = torch.randn(2, 3, 8, 8)
    traced = torch.jit.trace(ours, (x,))
    torch.testing.assert_close(traced(x), ref(x), atol=1e-5, rtol=0)
    assert "InstanceNormFunction" not in str(traced.graph)


def test_make_norm_kinds_and_errors() -> None:
    assert NORM_KINDS == ("instance", "batch", "none")
    inst = make_norm("instance", 8)
    assert isinstance(inst, InstanceNorm) and inst.affine and not inst.track_running_stats
    assert isinstance(make_norm("batch", 8), nn.BatchNorm2d) and make_norm("batch", 8).num_features == 8
    assert isinstance(make_norm("none", 8), nn.Identity)
    with pytest.raises(ValueError, match="instance, batch, none"):
        make_norm("layer", 8)


# ------------------------------------------------------------ the fused C++ kernel (models/kernels/instance_norm.cpp)
_HAS_COMPILER = shutil.which("c++") is not None or shutil.which("g++") is not None


def _run_function(fn: type, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor, g: torch.Tensor) -> list[torch.Tensor]:
    x = x.clone().requires_grad_(True)
    w = w.clone().requires_grad_(True)
    b = b.clone().requires_grad_(True)
    y, mean, var = fn.apply(x, w, b, 1e-5)
    y.backward(g)
    assert y.stride() == x.stride()
    return [y, mean, var, x.grad, w.grad, b.grad]


@pytest.mark.skipif(not _HAS_COMPILER, reason="no C++ compiler: the eager fallback is tested below")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(
    ("shape", "channels_last"),
    # M above the kernel's 2048-value chunk (several chunks per row); channels-last with more positions than one
    # parallel block (32768 / C = 8192 at C = 4) and with C not a multiple of the vector width; a 1-D and a 3-D case;
    # a 4 MiB float32 tensor with odd rows (unaligned row starts, many chunks).
    [
        ((2, 4, 361, 367), False),
        ((2, 3, 70, 70), False),
        ((1, 4, 100, 100), True),
        ((2, 5, 9, 11), True),
        ((3, 4, 11), False),
        ((2, 3, 4, 5, 6), True),
    ],
)
def test_fused_kernel_matches_eager_path(shape: tuple[int, ...], channels_last: bool, dtype: torch.dtype) -> None:
    from models import norm

    gen = torch.Generator().manual_seed(11)
    x = (torch.randn(shape, generator=gen) * 3 + 2).to(dtype)
    g = torch.randn(shape, generator=gen).to(dtype)
    w = (torch.rand(shape[1], generator=gen) + 0.5).to(dtype)
    b = torch.randn(shape[1], generator=gen).to(dtype)
    if channels_last:
        fmt = torch.channels_last if x.dim() == 4 else torch.channels_last_3d
        x, g = x.contiguous(memory_format=fmt), g.contiguous(memory_format=fmt)
    assert norm._use_fused_kernel(x), "the C++ kernel did not build (see the warning logged above)"
    fused = _run_function(norm._FusedInstanceNormFunction, x, w, b, g)
    eager = _run_function(norm._InstanceNormFunction, x, w, b, g)
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    for got, want in zip(fused, eager, strict=True):
        # the fused path hands its mean/var statistics back in float64 (the running stats convert them)
        torch.testing.assert_close(got.to(want.dtype), want, atol=tol, rtol=tol)
        assert got.dtype in (want.dtype, torch.float64)
    if channels_last:
        assert fused[0].is_contiguous(memory_format=fmt) and fused[3].is_contiguous(memory_format=fmt)


@pytest.mark.skipif(not _HAS_COMPILER, reason="no C++ compiler")
@pytest.mark.parametrize("channels_last", [False, True])
def test_fused_kernel_stable_at_large_offset_and_gradcheck(channels_last: bool) -> None:
    from models import norm

    torch.manual_seed(12)
    x = torch.randn(2, 4, 64, 64) + 1e4
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    assert norm._use_fused_kernel(x)
    reference = F.instance_norm(x.double())
    ours_err = (InstanceNorm(4)(x).double() - reference).abs().max().item()
    torch_err = (F.instance_norm(x).double() - reference).abs().max().item()
    assert ours_err <= max(torch_err, 1e-3)
    # float64 gradcheck through the kernel at an offset (the gradient's (x - mean) terms must not cancel badly)
    xd = torch.randn(2, 3, 5, 6, dtype=torch.float64) + 100.0
    if channels_last:
        xd = xd.contiguous(memory_format=torch.channels_last)
    w = torch.rand(3, dtype=torch.float64) + 0.5
    b = torch.randn(3, dtype=torch.float64)
    inputs = (xd.requires_grad_(True), w.requires_grad_(True), b.requires_grad_(True))
    assert torch.autograd.gradcheck(lambda x, w, b: norm._FusedInstanceNormFunction.apply(x, w, b, 1e-5)[0], inputs)


def test_kernel_build_failure_warns_once_and_falls_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    import dataclasses

    from models import norm
    from models.kernels import build

    broken = tmp_path / "faststyle_broken_norm.cpp"
    broken.write_text('#error "forced failure for the fallback test"\n')
    kernel = dataclasses.replace(norm.INSTANCE_NORM, name=broken.stem, source_dir=tmp_path)
    monkeypatch.setattr(norm, "INSTANCE_NORM", kernel)
    monkeypatch.setattr(build, "_loaded", {})
    # the build directory of the broken source goes to tmp_path, not to the user's extension cache
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "ext"))
    torch.manual_seed(13)
    ours, ref = _affine_pair(4)
    x = torch.randn(2, 4, 6, 7)
    with caplog.at_level(logging.WARNING, logger="models.norm"):
        y1 = ours(x)
        y2 = ours(x)
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING and r.name == "models.norm"]
    assert len(warnings) == 1, [r.getMessage() for r in warnings]
    message = warnings[0].getMessage()
    assert "could not build the fused CPU kernel" in message and "eager path" in message
    # the cause is named: the compiler's error line, or the missing tool
    assert "forced failure" in message or "compiler" in message or "ninja" in message
    assert build._loaded[kernel.name] is False
    torch.testing.assert_close(y1, ref(x), atol=1e-5, rtol=0)
    torch.testing.assert_close(y2, y1, atol=0, rtol=0)


# ----------------------------------------------- 16-bit inputs in the fused kernel (bf16 / fp16 storage, fp32 maths)
# Half an ulp, relative, of each 16-bit type (bf16: 8 significant bits, fp16: 11): the kernel computes in float32,
# whose error is ~1e-7 relative, and rounds once to the 16-bit output, so each output value is off from the float64
# result of the same (16-bit) input by at most this fraction of itself, plus float32 rounding of the terms.
_HALF_ULP = {torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}


def _memory_format(x: torch.Tensor, channels_last: bool) -> torch.Tensor:
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


@pytest.mark.skipif(not _HAS_COMPILER, reason="no C++ compiler")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("affine", [False, True])
# 48 * 50 = 2400 positions: two statistics chunks and a tail that is no multiple of the vector lanes; C = 2100 is more
# channels than one chunk holds (channels-last); 260 * 260 = 67600 positions: a row longer than the kernel keeps whole
# in float between its two sweeps (64K values), so it is widened again chunk by chunk (NCHW).
@pytest.mark.parametrize("shape", [(2, 5, 48, 50), (1, 2100, 3, 3), (1, 2, 260, 260)])
def test_fused_kernel_half_matches_float64_of_same_input(
    shape: tuple[int, ...], affine: bool, channels_last: bool, dtype: torch.dtype
) -> None:
    from models import norm

    gen = torch.Generator().manual_seed(14)
    c = shape[1]
    x = _memory_format((torch.randn(shape, generator=gen) * 3 + 2).to(dtype), channels_last)
    g = _memory_format(torch.randn(shape, generator=gen).to(dtype), channels_last)
    assert norm._use_fused_kernel(x)
    m = InstanceNorm(c, affine=affine)
    if affine:
        with torch.no_grad():
            m.weight.copy_(torch.rand(c, generator=gen) + 0.5)
            m.bias.copy_(torch.randn(c, generator=gen))
    xr = x.clone().requires_grad_(True)
    y = m(xr)
    y.backward(g)
    # float64 reference on the very same 16-bit values, in contiguous memory: torch's own CPU instance_norm backward on
    # channels-last input disagrees with its contiguous one here (at C = 64 already), and the contiguous one is right
    # (it matches the float32 tests above and gradcheck)
    x64 = x.double().contiguous().requires_grad_(True)
    w64 = m.weight.detach().double().requires_grad_(True) if affine else None
    b64 = m.bias.detach().double().requires_grad_(True) if affine else None
    y64 = F.instance_norm(x64, weight=w64, bias=b64, eps=m.eps)
    y64.backward(g.double().contiguous())
    assert y.dtype == dtype and xr.grad.dtype == dtype
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    assert y.is_contiguous(memory_format=fmt) and xr.grad.is_contiguous(memory_format=fmt)
    ulp = _HALF_ULP[dtype]
    for got, want in ((y, y64), (xr.grad, x64.grad)):
        scale = want.abs().max().item()
        torch.testing.assert_close(got.double(), want.detach(), rtol=ulp, atol=1e-4 * scale)
    if affine:
        # weight/bias gradients stay float32 (sums over N * HW values: no 16-bit rounding at all)
        assert m.weight.grad.dtype == torch.float32 and m.bias.grad.dtype == torch.float32
        for got, want in ((m.weight.grad, w64.grad), (m.bias.grad, b64.grad)):
            torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-4 * want.abs().max().item())


@pytest.mark.skipif(not _HAS_COMPILER, reason="no C++ compiler")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("channels_last", [False, True])
def test_fused_kernel_half_stable_at_large_offset(dtype: torch.dtype, channels_last: bool) -> None:
    from models import norm

    torch.manual_seed(15)
    # bf16 holds 1e4 on a grid of 64 (fp16: 8): a spread of 64 keeps a representable variance around the offset
    x = _memory_format((torch.randn(2, 4, 64, 64) * 64 + 1e4).to(dtype), channels_last)
    assert norm._use_fused_kernel(x)
    y, mean, var = norm._FusedInstanceNormFunction.apply(x, None, None, 1e-5)
    x64 = x.double()
    var64 = x64.var(dim=(2, 3), correction=0)
    assert torch.isfinite(var).all() and (var > 0).all()
    torch.testing.assert_close(var, var64, rtol=1e-5, atol=0)
    torch.testing.assert_close(mean, x64.mean(dim=(2, 3)), rtol=1e-7, atol=0)
    assert y.dtype == dtype and torch.isfinite(y).all()
    torch.testing.assert_close(y.double(), F.instance_norm(x64), rtol=_HALF_ULP[dtype], atol=1e-4)
    torch.testing.assert_close(
        y.double().std(dim=(2, 3), correction=0), torch.ones(2, 4, dtype=torch.float64), rtol=0, atol=1e-2
    )


@pytest.mark.skipif(not _HAS_COMPILER, reason="no C++ compiler")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("channels_last", [False, True])
def test_fused_kernel_takes_16bit_parameters_as_float32_copies(channels_last: bool, dtype: torch.dtype) -> None:
    from models import norm

    # A network cast to bf16 hands the kernel 16-bit weight/bias, which it reads in float32 itself: the same output as
    # float32 copies of them, and their gradients are the float32 ones rounded to the parameters' dtype.
    gen = torch.Generator().manual_seed(19)
    x = _memory_format((torch.randn(2, 6, 20, 21, generator=gen) * 3 + 2).to(dtype), channels_last)
    g = _memory_format(torch.randn(2, 6, 20, 21, generator=gen).to(dtype), channels_last)
    assert norm._use_fused_kernel(x)
    m16, _ = _affine_pair(6, seed=19)
    m16 = m16.to(dtype)
    m32 = InstanceNorm(6, affine=True)
    m32.load_state_dict({k: v.float() for k, v in m16.state_dict().items()})
    outs = []
    for m in (m16, m32):
        xr = x.clone().requires_grad_(True)
        y = m(xr)
        y.backward(g)
        outs.append((y, xr.grad, m.weight.grad, m.bias.grad))
    (y16, dx16, gw16, gb16), (y32, dx32, gw32, gb32) = outs
    assert gw16.dtype == dtype and gb16.dtype == dtype
    assert torch.equal(y16, y32) and torch.equal(dx16, dx32)
    assert torch.equal(gw16, gw32.to(dtype)) and torch.equal(gb16, gb32.to(dtype))


@pytest.mark.skipif(not _HAS_COMPILER, reason="no C++ compiler")
@pytest.mark.parametrize("channels_last", [False, True])
def test_fused_kernel_bf16_subnormal_outputs_not_flushed(channels_last: bool) -> None:
    from models import norm

    # A weight of 1e-38 makes outputs below float32's smallest normal (1.2e-38): bf16 has subnormals there too, and
    # the kernel must round to them (hardware bf16 conversion flushes such inputs to zero). Gradients likewise.
    gen = torch.Generator().manual_seed(18)
    shape = (2, 3, 40, 41)
    x = _memory_format(torch.randn(shape, generator=gen).bfloat16(), channels_last)
    g = _memory_format(torch.randn(shape, generator=gen).bfloat16(), channels_last)
    assert norm._use_fused_kernel(x)
    w = torch.full((3,), 1e-38)
    b = torch.zeros(3)
    xr = x.clone().requires_grad_(True)
    y, _, _ = norm._FusedInstanceNormFunction.apply(xr, w, b, 1e-5)
    y.backward(g)
    x64 = x.double().contiguous().requires_grad_(True)
    y64 = F.instance_norm(x64, weight=w.double(), bias=b.double(), eps=1e-5)
    y64.backward(g.double().contiguous())
    tiny = 2.0**-133  # bf16's smallest subnormal: its spacing below 2^-126
    for got, want in ((y, y64.detach()), (xr.grad, x64.grad)):
        assert (want.abs() < 2.0**-126).any()
        torch.testing.assert_close(got.double(), want, rtol=_HALF_ULP[torch.bfloat16], atol=tiny)
        assert ((got != 0) | (want.abs() < tiny)).all()


@pytest.mark.skipif(not _HAS_COMPILER, reason="no C++ compiler")
@pytest.mark.parametrize("channels_last", [False, True])
def test_bf16_autocast_gradients_reach_float32_parameters(channels_last: bool) -> None:
    from models import norm

    torch.manual_seed(16)
    conv = nn.Conv2d(3, 8, 3, padding=1)
    ours = InstanceNorm(8, affine=True)
    with torch.no_grad():
        ours.weight.uniform_(0.5, 1.5)
        ours.bias.normal_()
    x = _memory_format(torch.randn(2, 3, 20, 24), channels_last)
    with torch.autocast("cpu", torch.bfloat16):
        h = conv(x)
        assert h.dtype == torch.bfloat16 and norm._use_fused_kernel(h)
        y = ours(h)
    assert y.dtype == torch.bfloat16
    h.retain_grad()
    r = torch.randn(y.shape)
    (y.float() * r).sum().backward()  # y's gradient is r rounded to bf16
    assert ours.weight.grad.dtype == torch.float32 and ours.bias.grad.dtype == torch.float32
    assert conv.weight.grad is not None and torch.isfinite(conv.weight.grad).all()
    # the same backward in float64 from the same bf16 activations and gradient (contiguous: see above)
    ref = InstanceNorm(8, affine=True).double()
    ref.load_state_dict(ours.state_dict())
    h64 = h.detach().double().contiguous().requires_grad_(True)
    ref(h64).backward(r.bfloat16().double())
    for got, want in ((ours.weight.grad, ref.weight.grad), (ours.bias.grad, ref.bias.grad)):
        torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-4 * want.abs().max().item())
    # h's gradient is rounded to bf16 once
    scale = h64.grad.abs().max().item()
    torch.testing.assert_close(h.grad.double(), h64.grad, rtol=_HALF_ULP[torch.bfloat16], atol=1e-4 * scale)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_input_eager_fallback_upcasts(dtype: torch.dtype, monkeypatch: pytest.MonkeyPatch) -> None:
    from models import norm
    from models.kernels import build

    monkeypatch.setitem(build._loaded, norm.INSTANCE_NORM.name, False)  # as if the kernel could not be built
    torch.manual_seed(17)
    ours, _ = _affine_pair(4)
    x = _memory_format((torch.randn(2, 4, 9, 10) * 3 + 2).to(dtype), True).requires_grad_(True)
    y = ours(x)
    assert y.dtype == dtype and y.is_contiguous(memory_format=torch.channels_last)
    want = F.instance_norm(x.detach().double(), weight=ours.weight.double(), bias=ours.bias.double())
    torch.testing.assert_close(y.double(), want.detach(), rtol=_HALF_ULP[dtype], atol=1e-4 * want.abs().max().item())
    y.sum().backward()
    assert x.grad.dtype == dtype and ours.weight.grad.dtype == torch.float32
