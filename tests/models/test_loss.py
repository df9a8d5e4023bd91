"""PerceptualLoss: Gram normalisation and precision, components and weights, gradients, and that training a small
network against the real VGG-19 lowers the loss."""

from __future__ import annotations

import pytest
import torch

from core.errors import FaststyleError
from models.loss import PerceptualLoss, gram_matrix, total_variation
from models.transformer import TransformerNet

STYLE = {"relu1_2": 1.0, "relu2_2": 0.5}


pytestmark = pytest.mark.usefixtures("one_thread")


def _loss(network: str = "random", **kwargs) -> PerceptualLoss:
    options = {
        "content_layers": ["relu2_2"],
        "style_layers": STYLE,
        "content_weight": 2.0,
        "style_weight": 3.0,
        "tv_weight": 5.0,
    }
    options.update(kwargs)
    return PerceptualLoss(network, **options)


def test_gram_matrix_is_normalised_by_chw_and_fp32() -> None:
    f = torch.randn(2, 3, 4, 5)
    expected = torch.einsum("nchw,ndhw->ncd", f, f) / (3 * 4 * 5)
    torch.testing.assert_close(gram_matrix(f), expected)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        g = gram_matrix(f.to(torch.bfloat16))
    assert g.dtype == torch.float32
    torch.testing.assert_close(g, expected, atol=0.05, rtol=0.02)  # bf16 rounding of the inputs only


def test_total_variation() -> None:
    assert total_variation(torch.full((1, 3, 5, 6), 0.3)).item() == 0.0
    stripes = torch.zeros(1, 1, 4, 4)
    stripes[..., :, 1::2] = 1.0  # every horizontal neighbour differs by 1, vertical ones by 0
    assert total_variation(stripes).item() == pytest.approx(1.0)
    assert total_variation(torch.rand(1, 3, 1, 1)).item() == 0.0


def test_components_weights_and_total() -> None:
    torch.manual_seed(0)
    loss = _loss()
    loss.set_style(torch.rand(1, 3, 40, 36))
    output, content = torch.rand(2, 3, 32, 32), torch.rand(2, 3, 32, 32)
    losses = loss(output, content)
    assert set(losses) == {"total", "content", "style", "tv", "style/relu1_2", "style/relu2_2"}
    assert all(v.dim() == 0 and v.dtype == torch.float32 for v in losses.values())
    torch.testing.assert_close(losses["style"], losses["style/relu1_2"] + losses["style/relu2_2"])
    torch.testing.assert_close(losses["total"], losses["content"] + losses["style"] + losses["tv"])
    torch.testing.assert_close(losses["tv"], 5.0 * total_variation(output))
    # Doubling a weight doubles its term only.
    doubled = _loss(content_weight=4.0, style_weight=6.0, tv_weight=10.0)
    doubled.set_style(torch.rand(1, 3, 40, 36, generator=torch.Generator().manual_seed(1)))
    loss.set_style(torch.rand(1, 3, 40, 36, generator=torch.Generator().manual_seed(1)))
    a, b = loss(output, content), doubled(output, content)
    for key in ("content", "style", "tv", "style/relu2_2"):
        torch.testing.assert_close(b[key], 2 * a[key])


def test_zero_when_output_matches_content_and_style() -> None:
    torch.manual_seed(0)
    loss = _loss(tv_weight=0.0)
    image = torch.rand(1, 3, 32, 32)
    loss.set_style(image)
    losses = loss(image, image.clone())
    assert losses["content"].item() == 0.0
    assert losses["style"].item() < 1e-6 * loss(torch.rand(1, 3, 32, 32), image)["style"].item()


def test_gradients_reach_the_output_only() -> None:
    loss = _loss()
    loss.set_style(torch.rand(1, 3, 32, 32))
    output = torch.rand(2, 3, 24, 24, requires_grad=True)
    content = torch.rand(2, 3, 24, 24, requires_grad=True)
    loss(output, content)["total"].backward()
    assert output.grad is not None and output.grad.abs().sum() > 0
    assert content.grad is None  # the content branch runs under no_grad
    assert all(p.grad is None for p in loss.parameters())


def test_style_targets_follow_the_module_and_are_not_saved() -> None:
    loss = _loss()
    loss.set_style(torch.rand(1, 3, 32, 32))
    assert loss.style_target_relu1_2.shape == (1, 64, 64)
    assert not any(k.startswith("style_target") for k in loss.state_dict())
    assert loss.double().style_target_relu2_2.dtype == torch.float64


def test_misuse_is_reported() -> None:
    loss = _loss()
    with pytest.raises(RuntimeError, match="set_style"):
        loss(torch.rand(1, 3, 16, 16), torch.rand(1, 3, 16, 16))
    with pytest.raises(ValueError, match="1, 3, H, W"):
        loss.set_style(torch.rand(2, 3, 16, 16))
    loss.set_style(torch.rand(1, 3, 16, 16))
    with pytest.raises(ValueError, match="shapes differ"):
        loss(torch.rand(1, 3, 16, 16), torch.rand(1, 3, 16, 20))
    with pytest.raises(FaststyleError, match="content_weight"):
        _loss(content_weight=-1.0)
    with pytest.raises(FaststyleError, match="style_layers"):
        _loss(style_layers={"relu1_2": -1.0})
    with pytest.raises(FaststyleError, match="no content_layers and no style_layers"):
        _loss(content_layers=[], style_layers={})


@pytest.mark.slow
def test_training_against_real_vgg19_lowers_the_loss() -> None:
    """30 Adam steps of a width-8 network on a fixed 64-px batch with the real VGG-19 weights and the defaults'
    weights content 1, style 10 (style-heavy so the style term visibly drops in 30 steps)."""
    torch.manual_seed(0)
    loss = PerceptualLoss("vgg19", ["relu2_2"], {"relu1_2": 1.0, "relu2_2": 1.0, "relu3_3": 1.0}, 1.0, 10.0, 0.0)
    style = torch.rand(1, 3, 8, 8).repeat_interleave(8, 2).repeat_interleave(8, 3)  # blocky color texture
    loss.set_style(style)
    net = TransformerNet(base_width=8, residual_blocks=1)
    optimizer = torch.optim.Adam(net.parameters(), lr=5e-3)
    batch = torch.rand(2, 3, 8, 8).repeat_interleave(8, 2).repeat_interleave(8, 3)
    history = []
    for _ in range(30):
        optimizer.zero_grad()
        losses = loss(net(batch), batch)
        losses["total"].backward()
        optimizer.step()
        history.append(losses["total"].item())
    assert all(torch.isfinite(torch.tensor(history)))
    assert sum(history[-5:]) / 5 < 0.7 * sum(history[:5]) / 5, history
