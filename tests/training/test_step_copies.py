"""The training step without needless copies (issue 24): fewer copy_/add_ calls and bytes, the same training.

Counted by benchmarks/train.py's count_step_ops (the code behind ``python -m benchmarks train --count-ops``) on a
small step: batch 2 x 32 px, base width 8, one residual block, the "random" loss network tapped up to relu2_2. The
step before the change is the same code with benchmarks.train.unoptimized_copies: autocast's float32 reflection
padding, Adam's per-parameter loop, autograd's two-product Gram backward. These tests compare those three changes on
the network's layer path (``layer_path`` below): the fused CPU path, which removes the padding copies altogether and
computes the last convolution in another order, has its own tests (tests/models/test_fused.py).
"""

from __future__ import annotations

import pytest
import torch

from benchmarks.train import count_step_ops, unoptimized_copies
from models.loss import PerceptualLoss, gram_matrix
from models.transformer import TransformerNet
from training.loop import Trainer, TrainOptions

pytestmark = pytest.mark.usefixtures("one_thread", "layer_path")


@pytest.fixture
def layer_path(monkeypatch: pytest.MonkeyPatch) -> None:
    from models import fused

    monkeypatch.setattr(fused, "FUSED_CPU_PATH", False)


PARAMETER_TENSORS = 30
"""A TransformerNet of base width 8 with one residual block holds 30 parameter tensors: Adam's per-parameter loop
issues two add_ and four copy_ calls per tensor, fused Adam one of each (its step counters)."""


def _trainer(precision: str, channels_last: bool) -> tuple[Trainer, torch.Tensor]:
    torch.manual_seed(0)
    net = TransformerNet(base_width=8, residual_blocks=1)
    loss = PerceptualLoss("random", ["relu2_2"], {"relu1_2": 1.0, "relu2_2": 0.5}, 1.0, 1e-2, 1e-3)
    gen = torch.Generator().manual_seed(1)
    loss.set_style(torch.rand(1, 3, 32, 32, generator=gen))
    options = TrainOptions(steps=10, precision=precision, channels_last=channels_last)
    trainer = Trainer(net, loss, options, torch.device("cpu"))
    return trainer, trainer.to_device(torch.rand(2, 3, 32, 32, generator=gen))


def _counts(precision: str, channels_last: bool, old: bool):
    with unoptimized_copies(old):
        trainer, batch = _trainer(precision, channels_last)
        trainer.step(1, batch)  # warm-up: Adam creates its state
        return count_step_ops(lambda: trainer.step(2, batch), with_causes=False)


@pytest.mark.parametrize(("name", "precision", "channels_last"), [("fp32", "fp32", False), ("bf16+cl", "bf16", True)])
def test_step_makes_fewer_copies_and_adds(name: str, precision: str, channels_last: bool) -> None:
    before = _counts(precision, channels_last, old=True)
    after = _counts(precision, channels_last, old=False)
    # Relative to the old step measured in the same process: the absolute counts depend on the torch version and on
    # the kernels a CPU kind gets (a CPU without native bf16 runs other convolution kernels).
    assert before.calls["aten::add_"] - after.calls["aten::add_"] >= PARAMETER_TENSORS
    assert before.calls["aten::copy_"] - after.calls["aten::copy_"] >= 3 * PARAMETER_TENSORS
    assert after.total_calls < before.total_calls
    assert after.total_bytes < before.total_bytes
    # The Gram's features gradient is no longer a sum of two full products.
    assert after.bytes["aten::add_"] < before.bytes["aten::add_"]
    if precision == "bf16":  # no float32 round trip around each reflection pad
        assert after.bytes["aten::copy_"] < before.bytes["aten::copy_"]


def _train(precision: str, channels_last: bool, old: bool, steps: int = 3):
    with unoptimized_copies(old):
        trainer, batch = _trainer(precision, channels_last)
        losses, grads = [], {}
        for step in range(1, steps + 1):
            losses.append({k: v.detach().clone() for k, v in trainer.step(step, batch).items()})
            if step == 1:  # the first step's gradients (the next step's zero_grad drops them)
                grads = {k: p.grad.clone() for k, p in trainer.model.named_parameters()}
        with torch.no_grad():
            output = trainer.model(batch)
    return losses, {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}, output, grads


def _without_gradient(name: str) -> bool:
    """Parameters whose true gradient is zero: a convolution's bias followed by an instance norm (which subtracts
    it again), and a residual block's last norm bias (a per-channel constant through the next convolution and its
    instance norm). Their gradients are rounding noise, which Adam scales up to steps of about ``lr`` either way,
    so rounding-level changes move them by up to ``lr`` per step; they do not change the output."""
    return (name.endswith("conv.bias") and not name.startswith("decoder.6.")) or name.endswith("norm2.bias")


def test_fp32_training_is_unchanged_to_float_rounding() -> None:
    """The forward pass is the same ops: the first step's losses are bit-identical. Fused Adam and the one-product
    Gram backward order the same float32 arithmetic differently, so losses, outputs and weights agree to float32
    rounding (relative 1e-5 after 3 steps), except weights without a true gradient (:func:`_without_gradient`)."""
    lr, steps = TrainOptions(steps=1).lr, 3
    old_losses, old_weights, old_output, _ = _train("fp32", False, old=True, steps=steps)
    new_losses, new_weights, new_output, _ = _train("fp32", False, old=False, steps=steps)
    for name, value in old_losses[0].items():
        assert torch.equal(new_losses[0][name], value), name
    for later_old, later_new in zip(old_losses[1:], new_losses[1:], strict=True):
        torch.testing.assert_close(later_new["total"], later_old["total"], rtol=1e-5, atol=0)
    torch.testing.assert_close(new_output, old_output, rtol=1e-5, atol=1e-6)
    for name, value in old_weights.items():
        if _without_gradient(name):
            assert (new_weights[name] - value).abs().max() <= 2 * lr * steps, name
        else:
            torch.testing.assert_close(new_weights[name], value, rtol=1e-5, atol=1e-6, msg=name)


def test_bf16_padding_keeps_the_forward_pass() -> None:
    """Padding in bf16 instead of autocast's float32 gives the same bf16 values: the first step's losses are equal.
    Its gradients differ by the bf16 rounding of the reflected border sums (and the Gram's float32 rounding). The
    weights are not compared: Adam's first step moves every weight by about ``lr`` times the sign of its gradient,
    so a rounding-level change of a tiny gradient moves that weight by up to ``2 lr``."""
    old_losses, _, _, old_grads = _train("bf16", True, old=True, steps=1)
    new_losses, _, _, new_grads = _train("bf16", True, old=False, steps=1)
    for name, value in old_losses[0].items():
        assert torch.equal(new_losses[0][name], value), name
    for name, grad in old_grads.items():
        if not _without_gradient(name):
            scale = grad.abs().max().item()
            torch.testing.assert_close(new_grads[name], grad, rtol=0, atol=2e-2 * scale, msg=name)


def test_gram_backward_is_the_gram_gradient() -> None:
    features = torch.randn(2, 3, 4, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(gram_matrix, (features,))
    with unoptimized_copies():
        reference = torch.autograd.grad(gram_matrix(features).sin().sum(), features)[0]
    torch.testing.assert_close(torch.autograd.grad(gram_matrix(features).sin().sum(), features)[0], reference)
