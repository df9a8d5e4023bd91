"""Multi-style networks: conditional instance norm (Dumoulin et al. 2017), style mixes, adding a style, model files
(stylize with them: tests/inference/test_multistyle.py)."""

from __future__ import annotations

import pytest
import torch

from core.errors import FaststyleError
from models.modelfile import load_model, save_model
from models.norm import ConditionalInstanceNorm, InstanceNorm, make_norm
from models.styles import all_styles, parse_style, style_names
from models.transformer import TransformerNet
from tests.support import randomise_style_tables, tiny_net

STYLES = 3


def _net(styles: int = STYLES, seed: int = 0) -> TransformerNet:
    return tiny_net(residual_blocks=2, num_styles=styles, seed=seed)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("channels_last", [False, True])
def test_conditional_norm_matches_instance_norm_of_each_style(dtype: torch.dtype, channels_last: bool) -> None:
    norm = ConditionalInstanceNorm(6, STYLES)
    randomise_style_tables(norm)
    x = torch.randn(STYLES, 6, 9, 11) * 3 + 2
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    x = x.to(dtype)
    y = norm(x, torch.eye(STYLES))  # sample n in style n
    assert y.dtype == dtype and y.is_contiguous(memory_format=torch.channels_last) == channels_last
    for style in range(STYLES):
        plain = InstanceNorm(6, affine=True)
        with torch.no_grad():
            plain.weight.copy_(norm.weight[style])
            plain.bias.copy_(norm.bias[style])
        expected = plain(x[style : style + 1])
        tol = 1e-5 if dtype == torch.float32 else 2e-2
        torch.testing.assert_close(y[style : style + 1].float(), expected.float(), atol=tol, rtol=tol)


def test_conditional_norm_gradients_reach_only_the_rows_used() -> None:
    norm = ConditionalInstanceNorm(4, STYLES)
    x = torch.randn(2, 4, 5, 5)
    norm(x, torch.nn.functional.one_hot(torch.tensor([0, 2]), STYLES).float()).pow(2).sum().backward()
    used = norm.weight.grad.abs().sum(dim=1)
    assert used[0] > 0 and used[2] > 0 and used[1] == 0


def test_one_hot_mix_equals_the_style_and_its_one_style_network() -> None:
    net = _net()
    x = torch.rand(2, 3, 30, 26)
    for style in range(STYLES):
        by_index = net(x, style)
        one_hot = torch.zeros(STYLES)
        one_hot[style] = 1
        assert torch.equal(net(x, one_hot), by_index)
        torch.testing.assert_close(net.for_style(style)(x), by_index, atol=2e-6, rtol=0)
    # different styles give different images (the tables are distinct)
    assert (net(x, 0) - net(x, 1)).abs().max() > 1e-2


def test_mixing_is_linear_in_gamma_beta_and_matches_the_mixed_network() -> None:
    net = _net()
    weights = torch.tensor([0.5, 0.0, 1.5])  # normalised to 0.25, 0, 0.75
    mixed = net.for_style(weights)
    conditional = [m for m in net.modules() if isinstance(m, ConditionalInstanceNorm)]
    plain = [m for m in mixed.modules() if isinstance(m, InstanceNorm) and m.affine]
    assert len(conditional) == len(plain) > 0
    for cond, norm in zip(conditional, plain, strict=True):
        torch.testing.assert_close(norm.weight, 0.25 * cond.weight[0] + 0.75 * cond.weight[2])
        torch.testing.assert_close(norm.bias, 0.25 * cond.bias[0] + 0.75 * cond.bias[2])
    x = torch.rand(1, 3, 24, 24)
    torch.testing.assert_close(mixed(x), net(x, weights), atol=2e-6, rtol=0)


def test_per_sample_styles_in_one_batch() -> None:
    net = _net()
    x = torch.rand(3, 3, 16, 20)
    y = net(x, torch.tensor([2, 0, 1]))
    for n, style in enumerate([2, 0, 1]):
        torch.testing.assert_close(y[n : n + 1], net(x[n : n + 1], style), atol=1e-6, rtol=0)


@pytest.mark.parametrize(
    "style, message",
    [(None, "holds 3 styles"), (3, "out of range"), (torch.tensor([0.0, 0.0, 0.0]), "not all 0"),
     (torch.tensor([1.0, -1.0, 1.0]), ">= 0"), (torch.tensor([1.0, 1.0]), "style weights")],
)  # fmt: skip
def test_bad_style_arguments_raise(style: object, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        _net()(torch.rand(1, 3, 16, 16), style)


def test_one_style_network_is_unchanged_and_refuses_a_style() -> None:
    net = TransformerNet(base_width=8)
    assert "num_styles" not in net.config()
    assert not any(isinstance(m, ConditionalInstanceNorm) for m in net.modules())
    with pytest.raises(ValueError, match="one style"):
        net(torch.rand(1, 3, 16, 16), 0)


def test_batch_norm_cannot_hold_several_styles() -> None:
    with pytest.raises(ValueError, match="instance"):
        TransformerNet(norm="batch", num_styles=2)
    with pytest.raises(ValueError, match="instance"):
        make_norm("none", 8, num_styles=2)


@pytest.mark.parametrize("base_styles", [1, STYLES])
def test_added_style_leaves_the_old_styles_bit_identical(base_styles: int) -> None:
    base = _net(base_styles) if base_styles > 1 else TransformerNet(base_width=8, residual_blocks=2).eval()
    trained = base.for_style(torch.ones(base_styles)) if base_styles > 1 else base.for_style(0)
    with torch.no_grad():  # the new style's own (gamma, beta), as training would leave them
        for module in trained.modules():
            if isinstance(module, InstanceNorm) and module.affine:
                module.weight.mul_(1.7)
                module.bias.add_(0.3)
    extended = base.with_added_style(trained)
    assert extended.num_styles == base_styles + 1
    x = torch.rand(2, 3, 20, 28)
    for style in range(base_styles):
        old = base(x, style) if base_styles > 1 else base(x)
        assert torch.equal(extended.for_style(style)(x), base.for_style(style)(x) if base_styles > 1 else old)
        torch.testing.assert_close(extended(x, style), old, atol=2e-6, rtol=0)
    torch.testing.assert_close(extended(x, base_styles), trained(x), atol=2e-6, rtol=0)


def test_added_style_refuses_changed_shared_weights() -> None:
    base = _net()
    trained = base.for_style(0)
    with torch.no_grad():
        trained.encoder[0].conv.weight.add_(1e-3)
    with pytest.raises(ValueError, match="shared weights"):
        base.with_added_style(trained)


def test_model_file_keeps_the_styles(tmp_path) -> None:
    net = _net()
    path = tmp_path / "multi.pth"
    save_model(path, net, {"styles": ["a", "b", "c"]})
    loaded, meta = load_model(path)
    assert loaded.num_styles == STYLES and meta["styles"] == ["a", "b", "c"]
    x = torch.rand(1, 3, 16, 16)
    assert torch.equal(loaded(x, 1), net(x, 1))


def test_parse_style() -> None:
    names = ["hokusai", "van_gogh", "kandinsky"]
    assert parse_style("van_gogh", names).weights == (0.0, 1.0, 0.0)
    assert parse_style("2", names).label == "kandinsky"
    assert parse_style(0, names).label == "hokusai"
    mix = parse_style("hokusai:1,kandinsky:3", names)
    assert mix.weights == (0.25, 0.0, 0.75) and mix.label == "hokusai-25_kandinsky-75"
    assert parse_style("hokusai:0,van_gogh:2", names).label == "van_gogh"  # a mix of one style is that style
    for bad, message in [("monet", "hokusai, van_gogh, kandinsky"), ("hokusai:x", "not a number"),
                         ("hokusai:-1,van_gogh:1", ">= 0"), ("hokusai:0", "all 0"), ("3", "unknown style"),
                         ("hokusai,van_gogh", "name:weight")]:  # fmt: skip
        with pytest.raises(FaststyleError, match=message):
            parse_style(bad, names)
    assert [c.label for c in all_styles(names)] == names
    assert style_names({"styles": names}, 3) == names and style_names({}, 2) == ["style_0", "style_1"]
