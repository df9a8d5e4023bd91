"""core/precision.py: precision resolution per device, the auto switches, and that the fp32 path gives the same
results in channels_last as in NCHW (losses and gradients of a real TransformerNet + PerceptualLoss step)."""

from __future__ import annotations

import logging

import pytest
import torch

from core import precision as P
from core.errors import FaststyleError
from models.loss import PerceptualLoss, gram_matrix
from models.transformer import TransformerNet

CPU = torch.device("cpu")
CUDA = torch.device("cuda")
has_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def test_cpu_resolution(caplog: pytest.LogCaptureFixture) -> None:
    auto = P.resolve_precision("auto", CPU)
    assert (auto.name, auto.dtype, auto.use_grad_scaler, auto.device_type) == ("fp32", None, False, "cpu")
    assert P.resolve_precision("fp32", CPU).dtype is None
    with pytest.raises(FaststyleError, match="fp16 needs a CUDA"):
        P.resolve_precision("fp16", CPU)
    with caplog.at_level(logging.WARNING, logger="core.precision"):
        bf16 = P.resolve_precision("bf16", CPU)  # allowed when asked for, but it warns: it is slow on CPUs
    assert bf16.dtype is torch.bfloat16 and not bf16.use_grad_scaler
    assert "slower" in caplog.text
    with pytest.raises(FaststyleError, match="use one of auto, fp32, fp16, bf16"):
        P.resolve_precision("half", CPU)


def test_mps_resolution() -> None:
    assert P.resolve_precision("auto", torch.device("mps")).name == "fp32"
    for name in ("fp16", "bf16"):
        with pytest.raises(FaststyleError):
            P.resolve_precision(name, torch.device("mps"))


@pytest.mark.parametrize("ampere", [True, False])
def test_cuda_resolution_logic(monkeypatch: pytest.MonkeyPatch, ampere: bool) -> None:
    """The CUDA branch without a GPU: the capability probe is replaced, so this checks the decision table only."""
    monkeypatch.setattr(P, "_cuda_supports_bf16", lambda device: ampere)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Fake GPU")
    auto = P.resolve_precision("auto", CUDA)
    assert auto.name == ("bf16" if ampere else "fp16")
    assert auto.use_grad_scaler is (not ampere)  # fp16 needs loss scaling, bf16 does not
    fp16 = P.resolve_precision("fp16", CUDA)
    assert fp16.dtype is torch.float16 and fp16.use_grad_scaler
    if ampere:
        assert P.resolve_precision("bf16", CUDA).dtype is torch.bfloat16
    else:
        with pytest.raises(FaststyleError, match="Fake GPU"):
            P.resolve_precision("bf16", CUDA)


def test_switches() -> None:
    assert P.resolve_switch(True, "compile", CPU) is True
    assert P.resolve_switch("false", "channels_last", CPU) is False
    for device in (CPU, CUDA, torch.device("mps")):
        for setting in ("channels_last", "compile"):
            assert P.resolve_switch("auto", setting, device) is P.AUTO_DEFAULTS[device.type][setting]
    with pytest.raises(FaststyleError, match="train.compile"):
        P.resolve_switch("sometimes", "compile", CPU)


def test_fp32_policy_is_a_pass_through() -> None:
    policy = P.resolve_precision("fp32", CPU)
    scaler = policy.grad_scaler()
    assert not scaler.is_enabled()
    loss = torch.tensor(3.0, requires_grad=True)
    assert scaler.scale(loss) is loss  # a disabled scaler changes nothing
    with policy.autocast():
        assert not torch.is_autocast_enabled("cpu")


def test_gram_stays_fp32_under_bf16_autocast() -> None:
    """Gram matrices overflow in fp16 and lose digits in bf16: the loss module keeps them in fp32."""
    features = torch.rand(2, 8, 16, 16) * 100
    with P.resolve_precision("bf16", CPU).autocast():
        gram = gram_matrix(features.bfloat16())
    assert gram.dtype is torch.float32
    torch.testing.assert_close(gram, gram_matrix(features.bfloat16().float()))


def _loss_and_grads(
    channels_last: bool, dtype: torch.dtype = torch.float32
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Losses and parameter gradients of one step of a tiny TransformerNet against the random loss network."""
    torch.manual_seed(0)
    net = P.to_memory_format(TransformerNet(base_width=8, residual_blocks=2).to(dtype), channels_last)
    loss_fn = P.to_memory_format(
        PerceptualLoss("random", ["relu2_2"], {"relu1_2": 1.0, "relu2_2": 1.0}, 1.0, 10.0, 1.0).to(dtype),
        channels_last,
    )
    gen = torch.Generator().manual_seed(3)
    loss_fn.set_style(P.batch_to(torch.rand(1, 3, 64, 64, generator=gen).to(dtype), CPU, channels_last))
    batch = P.batch_to(torch.rand(2, 3, 64, 64, generator=gen).to(dtype), CPU, channels_last)
    assert batch.is_contiguous(memory_format=torch.channels_last) is channels_last
    losses = loss_fn(net(batch), batch)
    losses["total"].backward()
    return (
        {k: v.detach().double() for k, v in losses.items()},
        {n: p.grad.double() for n, p in net.named_parameters()},
    )


def test_channels_last_fp32_matches_nchw() -> None:
    """channels_last changes only the order of float32 sums, so its results must be as accurate as NCHW's.

    The reference is the same step in float64: fp32 gradients of this deep, high-gain (random VGG) loss are
    themselves only good to ~2e-3 of each tensor's scale, and the conv biases in front of an instance norm have a
    true gradient of exactly zero (the norm removes the mean), so a plain NCHW-vs-NHWC comparison would test noise.
    """
    losses_64, grads_64 = _loss_and_grads(channels_last=False, dtype=torch.float64)
    losses_a, grads_a = _loss_and_grads(channels_last=False)
    losses_b, grads_b = _loss_and_grads(channels_last=True)
    assert losses_a.keys() == losses_b.keys() == losses_64.keys()
    for key in losses_a:
        torch.testing.assert_close(losses_b[key], losses_a[key], rtol=1e-4, atol=1e-6)
    global_scale = max(g.abs().max().item() for g in grads_64.values())
    for name, ref in grads_64.items():
        err_nchw = (grads_a[name] - ref).abs().max().item()
        err_cl = (grads_b[name] - ref).abs().max().item()
        bound = max(3 * err_nchw, 5e-3 * ref.abs().max().item()) + 1e-6 * global_scale
        assert err_cl <= bound, (name, err_cl, err_nchw)


@has_cuda
@pytest.mark.gpu
@pytest.mark.parametrize("name", ["fp16", "bf16"])
def test_cuda_mixed_precision_step_close_to_fp32(name: str) -> None:
    """On a GPU: one training step's losses under AMP (+ channels_last) stay within a few percent of fp32."""
    if name == "bf16" and not P._cuda_supports_bf16(CUDA):
        pytest.skip("GPU without native bf16")
    results = {}
    for precision, channels_last in (("fp32", False), (name, True)):
        policy = P.resolve_precision(precision, CUDA)
        torch.manual_seed(0)
        net = P.to_memory_format(TransformerNet(base_width=16, residual_blocks=2).to(CUDA), channels_last)
        loss_fn = PerceptualLoss("random", ["relu2_2"], {"relu1_2": 1.0, "relu2_2": 1.0}, 1.0, 10.0, 1.0).to(CUDA)
        gen = torch.Generator().manual_seed(3)
        loss_fn.set_style(torch.rand(1, 3, 128, 128, generator=gen).to(CUDA))
        batch = P.batch_to(torch.rand(4, 3, 128, 128, generator=gen), CUDA, channels_last)
        scaler = policy.grad_scaler()
        with policy.autocast():
            losses = loss_fn(net(batch), batch)
        assert losses["total"].dtype is torch.float32
        scaler.scale(losses["total"]).backward()
        assert all(torch.isfinite(p.grad).all() for p in net.parameters())
        results[precision] = {k: v.item() for k, v in losses.items()}
    for key, value in results["fp32"].items():
        assert results[name][key] == pytest.approx(value, rel=0.05, abs=1e-6), key
