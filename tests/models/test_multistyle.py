"""Multi-style networks: conditional instance norm (Dumoulin et al. 2017), style mixes, adding a style, model files."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from core.errors import FaststyleError
from models.modelfile import load_model, save_model
from models.norm import ConditionalInstanceNorm, InstanceNorm, make_norm
from models.styles import all_styles, parse_style, style_names
from models.transformer import TransformerNet
from tests.support import MULTI_MODEL_STYLES, REPO, compose_train, randomise_style_tables, save_hydra_files, tiny_net

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


# --- stylize.py with multi-style models ------------------------------------------------------------------------------

NAMES = MULTI_MODEL_STYLES  # conftest's multi_model: the network of _net()


def _stylize(model: Path, inputs: Path, **options):
    from inference.pipeline import stylize
    from stylize import compose_config

    overrides = [f"model={model}", f"input={inputs}"] + [f"{k}={v}" for k, v in options.items()]
    return stylize(compose_config(overrides))


def _photos(folder: Path) -> Path:
    from PIL import Image

    folder.mkdir()
    gen = torch.Generator().manual_seed(1)
    for name, size in (("a.png", (40, 28)), ("b.png", (33, 47))):
        pixels = (torch.rand(size[1], size[0], 3, generator=gen) * 255).to(torch.uint8).numpy()
        Image.fromarray(pixels).save(folder / name)
    return folder


def _read(path: Path) -> torch.Tensor:
    from data.io import load_image, pil_to_tensor

    return pil_to_tensor(load_image(path))


def test_stylize_writes_every_style_and_picks_or_mixes_one(multi_model: Path, tmp_path: Path) -> None:
    from data.io import load_image, pil_to_tensor

    inputs = _photos(tmp_path / "in")
    summary = _stylize(multi_model, inputs, output=tmp_path / "all", precision="fp32")  # exact on every CPU
    assert sorted(p.name for p in summary.written) == sorted(f"{s}_{n}.png" for s in "ab" for n in NAMES)
    net = load_model(multi_model)[0]
    x = pil_to_tensor(load_image(inputs / "a.png"))[None]
    for index, name in enumerate(NAMES):  # each output is its style's network, rounded to 8 bits
        expected = net.for_style(index)(x)[0]
        assert (_read(tmp_path / "all" / f"a_{name}.png") - expected).abs().max() <= 1 / 255 + 1e-6
    # by name, by index and a mix (an image differing from both styles)
    _stylize(multi_model, inputs, output=tmp_path / "one", style="street")
    assert sorted(p.name for p in (tmp_path / "one").iterdir()) == ["a_street.png", "b_street.png"]
    _stylize(multi_model, inputs / "a.png", output=tmp_path / "suffix", suffix="v2")  # suffix, then the style
    assert sorted(p.name for p in (tmp_path / "suffix").iterdir()) == [f"a_v2_{n}.png" for n in sorted(NAMES)]
    _stylize(multi_model, inputs / "a.png", output=tmp_path / "suffix1", suffix="v2", style="street")
    assert [p.name for p in (tmp_path / "suffix1").iterdir()] == ["a_v2.png"]  # one style: the suffix alone
    _stylize(multi_model, inputs / "a.png", output=tmp_path / "idx.png", style=2, precision="fp32")
    assert torch.equal(_read(tmp_path / "idx.png"), _read(tmp_path / "all" / "a_composition.png"))
    _stylize(multi_model, inputs / "a.png", output=tmp_path / "mix", style="'wave:1,composition:3'", precision="fp32")
    mixed = _read(tmp_path / "mix" / "a_wave-25_composition-75.png")
    expected = net.for_style(torch.tensor([0.25, 0.0, 0.75]))(x)[0]
    assert (mixed - expected).abs().max() <= 1 / 255 + 1e-6


def test_stylize_multi_style_with_tiling_bf16_and_color_options(multi_model: Path, tmp_path: Path) -> None:
    inputs = _photos(tmp_path / "in")
    plain = tmp_path / "plain"
    _stylize(multi_model, inputs / "b.png", output=plain, style="street", preserve_color=True, strength=0.6)
    tiled = tmp_path / "tiled"
    _stylize(multi_model, inputs / "b.png", output=tiled, style="street", preserve_color=True, strength=0.6,
             max_memory_mb=0.05)  # fmt: skip
    assert (_read(plain / "b_street.png") - _read(tiled / "b_street.png")).abs().max() <= 1 / 255 + 1e-6
    half = tmp_path / "bf16"
    _stylize(multi_model, inputs / "b.png", output=half, style="street", precision="bf16", device="cpu")
    _stylize(multi_model, inputs / "b.png", output=tmp_path / "fp32", style="street", precision="fp32")
    assert (_read(half / "b_street.png") - _read(tmp_path / "fp32" / "b_street.png")).abs().mean() < 0.02


@pytest.mark.parametrize(
    "options, message",
    [({"style": "monet"}, "wave, street, composition"), ({"output": "one.png"}, "pick one with style=")],
)
def test_stylize_multi_style_errors(multi_model: Path, tmp_path: Path, options: dict, message: str) -> None:
    inputs = _photos(tmp_path / "in")
    options = {k: (tmp_path / v if k == "output" else v) for k, v in options.items()}
    with pytest.raises(FaststyleError, match=message):
        _stylize(multi_model, inputs / "a.png", **options)


def test_stylize_one_style_model_refuses_a_style(tmp_path: Path) -> None:
    path = tmp_path / "model.pth"
    save_model(path, TransformerNet(base_width=4, residual_blocks=1), {"style_stem": "wave"})
    with pytest.raises(FaststyleError, match="holds one style"):
        _stylize(path, _photos(tmp_path / "in"), style="wave")


def test_stylize_cli_takes_a_mix_as_users_type_it(multi_model: Path, tmp_path: Path) -> None:
    import subprocess
    import sys

    from stylize import quote_style_mix

    assert quote_style_mix("style=a:1,b:2") == 'style="a:1,b:2"'
    for unchanged in ("style=a", "input=a,b.jpg", "style='a:1,b:2'", 'style="a:1,b:2"'):
        assert quote_style_mix(unchanged) == unchanged
    inputs = _photos(tmp_path / "in")
    args = [f"model={multi_model}", f"input={inputs / 'a.png'}", f"output={tmp_path / 'out'}", "style=wave:1,street:1"]
    proc = subprocess.run([sys.executable, "stylize.py", *args], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["a_wave-50_street-50.png"]


def test_other_tools_take_one_style_of_a_multi_style_model(multi_model: Path, tmp_path: Path, capsys) -> None:
    from evaluation.reports import precision_check
    from interop.pytorch_examples import examples_config, to_examples_state_dict

    # pytorch/examples' format holds one style: refused with one line
    with pytest.raises(FaststyleError, match="pick one style"):
        to_examples_state_dict(TransformerNet(**examples_config(8, 1), num_styles=2))
    # precision_check folds the style it is given (the first by default), as stylize runs it
    args = [str(multi_model), "--width", "40", "--height", "32", "--tiled-budget-mb", "4", "--out", str(tmp_path)]
    assert precision_check.main([*args, "--style", "street"]) == 0
    out = capsys.readouterr().out
    assert "checking style street" in out and "dB (8-bit)" in out


def test_compare_runs_points_multi_style_runs_to_compare_styles(multi_model: Path, tmp_path: Path) -> None:
    from evaluation.runs import load_runs

    run = tmp_path / "multi"
    run.mkdir()
    (run / "model.pth").write_bytes(multi_model.read_bytes())
    save_hydra_files(run, compose_train(["experiment=multistyle_demo"]), REPO)
    with pytest.raises(FaststyleError, match="compare_styles"):
        load_runs([run], tmp_path, torch.device("cpu"))
