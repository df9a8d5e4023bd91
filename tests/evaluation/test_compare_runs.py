"""The compare_runs report (evaluation/reports/compare_runs.py) and the library under it: the contrast-invariance
measure, the per-image batch-norm mode, the held-out check, labels from config differences, the matplotlib curves
and image grid, a fast end-to-end comparison of two made-up runs of a style-weight sweep, (slow) an end-to-end run
on two tiny real training runs of the norm sweep, and a multi-style run sent to compare_styles."""

from __future__ import annotations

import csv
import io
import math
import re
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image
from torch import nn

from core.errors import FaststyleError
from evaluation.figures import PANEL_PX, make_curves, make_figure, new_figure, plot_panel, render
from evaluation.held_out import check_held_out, collect_images
from evaluation.measures import (
    DEFAULT_VARIANTS,
    contrast_invariance,
    contrast_variants,
    eval_stylizer,
    input_change,
    per_image_bn_stylizer,
)
from evaluation.reports import compare_runs as report
from evaluation.runs import config_labels, find_run_dirs, flatten, read_scalars
from models.transformer import TransformerNet
from tests.support import REPO, compose_train, save_hydra_files

HELD_OUT = REPO / "data" / "samples" / "held_out"

pytestmark = pytest.mark.usefixtures("one_thread")


class PerImageStandardise(nn.Module):
    """Ignores any a * x + b with a > 0 exactly: subtracts each image's mean and divides by its std."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mean = x.mean(dim=(1, 2, 3), keepdim=True)
        std = x.std(dim=(1, 2, 3), keepdim=True)
        return (x - mean) / std


def mid_range_images(n: int = 2, size: int = 24) -> list[torch.Tensor]:
    """Images in [0.3, 0.7]: the variants below never clip them."""
    gen = torch.Generator().manual_seed(0)
    return [0.3 + 0.4 * torch.rand(1, 3, size, size, generator=gen) for _ in range(n)]


UNCLIPPED = ((0.5, 0.25), (0.8, 0.1), (1.2, -0.1), (1.0, 0.2))  # maps [0.3, 0.7] inside [0, 1]


# --------------------------------------------------------------------------------------------------------------------
# Measures and stylizers


def test_constant_network_is_perfectly_invariant() -> None:
    constant = lambda x: torch.full_like(x, 0.5)
    mean, per_variant = contrast_invariance(constant, mid_range_images(), DEFAULT_VARIANTS)
    assert mean == 0.0 and per_variant == [0.0] * len(DEFAULT_VARIANTS)


def test_identity_is_not_invariant_and_its_measure_is_the_input_change() -> None:
    images = mid_range_images()
    mean, per_variant = contrast_invariance(lambda x: x, images, UNCLIPPED)
    assert mean > 0.05
    assert mean == pytest.approx(input_change(images, UNCLIPPED), rel=1e-6)
    # First variant by hand: (a, b) = (0.5, 0.25) moves pixel p by |0.25 - 0.5 p|.
    by_hand = sum(float((0.25 - 0.5 * im).abs().mean()) for im in images) / len(images)
    assert per_variant[0] == pytest.approx(by_hand, rel=1e-5)


def test_per_image_normaliser_is_invariant_until_clipping() -> None:
    """Without clipping a*x+b changes nothing after per-image standardisation; clipping destroys information, so
    the same network must then score > 0 (this checks that the variants really are clipped)."""
    net = PerImageStandardise()
    unclipped, _ = contrast_invariance(net, mid_range_images(), UNCLIPPED)
    assert unclipped < 1e-5
    gen = torch.Generator().manual_seed(1)
    full_range = [torch.rand(1, 3, 24, 24, generator=gen)]
    clipped, _ = contrast_invariance(net, full_range, ((1.5, -0.25),))
    assert clipped > 1e-2
    variant = contrast_variants(full_range[0], ((1.5, -0.25),))[0]
    assert variant.min() == 0.0 and variant.max() == 1.0


def _trained_bn_net() -> TransformerNet:
    """A tiny BN network whose running statistics are not the initial (0, 1) (one train-mode forward), with the
    output conv scaled up so that the output spans (0, 1) instead of staying near the sigmoid's 0.5."""
    torch.manual_seed(0)
    net = TransformerNet(norm="batch", base_width=4, residual_blocks=1)
    net.train()
    with torch.no_grad():
        net(torch.rand(4, 3, 32, 32))
        net.decoder[-1].conv.weight.mul_(20)
    return net.eval()


def test_per_image_bn_leaves_the_network_untouched_and_differs_from_eval() -> None:
    net = _trained_bn_net()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    per_image = per_image_bn_stylizer(net)
    x = torch.rand(2, 3, 24, 24)
    y = per_image(x)
    assert y.shape == x.shape
    for key, value in net.state_dict().items():
        assert torch.equal(value, before[key]), key
    assert not net.training
    assert not torch.allclose(y, eval_stylizer(net)(x), atol=1e-4)
    # Per image: stylizing the batch equals stylizing each image alone.
    assert torch.allclose(y[1:], per_image(x[1:]), atol=1e-5)


def test_instance_statistics_remove_contrast_and_running_statistics_do_not() -> None:
    """The structural core of Ulyanov et al.: a norm with per-image statistics right after the first (linear) conv
    cancels a > 0 and b (reflection padding keeps a constant shift constant), so instance norm and per-image BN
    are invariant to unclipped a*x+b; BN with running statistics is not."""
    images = mid_range_images(n=1, size=24)
    bn = _trained_bn_net()
    bn_eval, _ = contrast_invariance(eval_stylizer(bn), images, UNCLIPPED)
    bn_per_image, _ = contrast_invariance(per_image_bn_stylizer(bn), images, UNCLIPPED)
    torch.manual_seed(0)
    instance = TransformerNet(norm="instance", base_width=4, residual_blocks=1).eval()
    with torch.no_grad():
        instance.decoder[-1].conv.weight.mul_(20)
    in_eval, _ = contrast_invariance(eval_stylizer(instance), images, UNCLIPPED)
    assert bn_eval > 5e-4
    # Not exactly 0: the eps added to the variance weighs more for a low-contrast variant (a < 1).
    assert bn_per_image < bn_eval / 20
    assert in_eval < bn_eval / 20


# --------------------------------------------------------------------------------------------------------------------
# Runs, labels, held-out images


def test_find_run_dirs_in_sweep_order_and_errors(tmp_path: Path) -> None:
    for name in ("0-instance", "1-batch", "10-batch", "2-batch"):
        (tmp_path / name / ".hydra").mkdir(parents=True)
        (tmp_path / name / ".hydra" / "config.yaml").write_text("seed: 0\n")
        (tmp_path / name / "model.pth").write_bytes(b"")
    names = ["0-instance", "1-batch", "2-batch", "10-batch"]  # job numbers compared as numbers
    assert find_run_dirs([tmp_path]) == [tmp_path / n for n in names]
    assert find_run_dirs([tmp_path / "1-batch", tmp_path / "1-batch"]) == [tmp_path / "1-batch"]
    with pytest.raises(FaststyleError, match="does not exist"):
        find_run_dirs([tmp_path / "nope"])
    (tmp_path / "3-unfinished" / ".hydra").mkdir(parents=True)
    (tmp_path / "3-unfinished" / ".hydra" / "config.yaml").write_text("seed: 0\n")
    with pytest.raises(FaststyleError, match="no model.pth"):
        find_run_dirs([tmp_path])
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FaststyleError, match="no training run"):
        find_run_dirs([empty])


def _flat(**groups: dict) -> dict[str, object]:
    base = {
        "style": "s.jpg",
        "seed": 0,
        "model": {"norm": "instance", "base_width": 16},
        "loss": {"style_weight": 0.5, "style_layers": {"relu1_2": 1.0}},
        "train": {"betas": [0.9, 0.999]},
    }
    for group, values in groups.items():
        base[group] = {**base.get(group, {}), **values} if isinstance(values, dict) else values
    return flatten(base)


def test_labels_come_from_what_differs_between_the_configs() -> None:
    names = ["0-a", "1-b"]
    assert config_labels([_flat(model={"norm": "instance"}), _flat(model={"norm": "batch"})], names) == [
        ["model.norm=instance"],
        ["model.norm=batch"],
    ]
    assert config_labels([_flat(loss={"style_weight": 0.5}), _flat(loss={"style_weight": 2.0})], names) == [
        ["loss.style_weight=0.5"],
        ["loss.style_weight=2.0"],
    ]
    # Several keys, in config order; nested keys and lists in Hydra's override syntax.
    two = config_labels(
        [
            _flat(seed=0, loss={"style_layers": {"relu1_2": 1.0}}, train={"betas": [0.9, 0.999]}),
            _flat(seed=1, loss={"style_layers": {"relu1_2": 2.0}}, train={"betas": [0.5, 0.9]}),
        ],
        names,
    )
    assert two == [
        ["seed=0", "loss.style_layers.relu1_2=1.0", "train.betas=[0.9, 0.999]"],
        ["seed=1", "loss.style_layers.relu1_2=2.0", "train.betas=[0.5, 0.9]"],
    ]
    # More keys than shown: counted; a key only one config has is <unset> in the other.
    many = config_labels(
        [_flat(seed=0, model={"base_width": 8, "norm": "batch"}, extra=1), _flat(seed=1)], names, max_keys=2
    )
    assert many == [["seed=0", "model.norm=batch", "+2 more"], ["seed=1", "model.norm=instance", "+2 more"]]
    assert config_labels([_flat(extra=None), _flat()], names) == [["extra=null"], ["extra=<unset>"]]
    # Identical configs: the runs' names.
    assert config_labels([_flat(), _flat()], names) == [["0-a"], ["1-b"]]


def test_held_out_images_must_not_be_training_images(tmp_path: Path) -> None:
    held_out = collect_images([HELD_OUT])
    assert len(held_out) >= 3
    # The shipped held-out photos are not among the demo training photos.
    check_held_out(held_out, [REPO / "data" / "samples" / "content"])
    # A renamed copy inside a training root is caught by content, not by name.
    root = tmp_path / "train" / "sub"
    root.mkdir(parents=True)
    shutil.copy(held_out[0], root / "renamed.jpg")
    with pytest.raises(FaststyleError, match="is the training image"):
        check_held_out(held_out, [tmp_path / "train"])
    (tmp_path / "no_images").mkdir()
    with pytest.raises(FaststyleError, match="no held-out images"):
        collect_images([tmp_path / "no_images"])


# --------------------------------------------------------------------------------------------------------------------
# Figures


def _decode(data: bytes | Path, fmt: str = "PNG") -> Image.Image:
    with Image.open(io.BytesIO(data) if isinstance(data, bytes) else data) as img:
        assert img.format == fmt
        img.load()
        return img.copy()


def _write_events(tb_dir: Path, scale: float) -> None:
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(str(tb_dir))
    for step in range(0, 100, 10):
        writer.add_scalar("loss/total", scale * 1000 / (step + 1), step)
        writer.add_scalar("loss/content", scale * 5.0 + step * 0.01, step)
        writer.add_scalar("loss/tv", 0.0, step)  # a term with weight 0: no panel
        writer.add_scalar("lr", 1e-3, step)  # not a loss: no panel
    writer.close()


def test_curves_from_tensorboard_events(tmp_path: Path) -> None:
    runs = []
    for label, scale in (("model.norm=instance", 1.0), ("model.norm=batch", 2.0)):
        _write_events(tmp_path / label / "tb", scale)
        series = read_scalars(tmp_path / label / "tb")
        assert [s for s, _ in series["loss/total"]] == list(range(0, 100, 10))
        runs.append((label, series))
    figure = make_curves(runs)
    panels = [ax for ax in figure.axes if ax.get_visible()]
    assert [ax.get_title() for ax in panels] == ["loss/total", "loss/content"]
    for ax in panels:
        assert [t.get_text() for t in ax.get_legend().get_texts()] == ["model.norm=instance", "model.norm=batch"]
        assert len(ax.get_lines()) == 4  # raw + smoothed per run
    assert panels[0].get_yscale() == "log" and panels[1].get_yscale() == "linear"  # 1000 .. 10 spans > 20x
    image = _decode(render(figure))
    assert image.size == (2 * PANEL_PX[0], PANEL_PX[1])
    with pytest.raises(FaststyleError, match="no TensorBoard events"):
        read_scalars(tmp_path / "missing")
    with pytest.raises(FaststyleError, match="share no loss"):
        make_curves([("a", {"lr": [(0, 1.0)]})])


def _tick_labels(ax, axis: str = "y") -> list[tuple[float, str]]:
    """(tick position, label text) of the major ticks inside the drawn view of ``ax``."""
    ax.figure.canvas.draw()
    which = ax.yaxis if axis == "y" else ax.xaxis
    low, high = sorted(ax.get_ylim() if axis == "y" else ax.get_xlim())
    ticks = zip(which.get_majorticklocs(), which.get_majorticklabels(), strict=True)
    return [(loc, label.get_text()) for loc, label in ticks if low <= loc <= high]


def _number(label: str) -> float:
    """A mathtext tick label ("$\\mathdefault{1.005}$", "−2") as a float."""
    text = re.sub(r"\\mathdefault|[${}]", "", label).replace("\u2212", "-")
    return float(text)


@pytest.mark.parametrize("low, high", [(1.00e5, 1.02e5), (6e4, 1.2e5), (0.0, 150.0), (2e-4, 9e-4)])
def test_tick_labels_are_distinct_and_read_as_their_values(low: float, high: float) -> None:
    """A past bug printed "1e+05" for three ticks of a 6e4..1.2e5 axis; every label must name its own value
    (times the axis' shared power of ten, never plus an offset)."""
    figure = new_figure(*PANEL_PX)
    ax = figure.subplots()
    steps = list(range(0, 101, 10))
    values = [low + (high - low) * i / 10 for i in range(11)]
    plot_panel(ax, "loss/total", [("a", list(zip(steps, values, strict=True)))])
    assert ax.get_yscale() == "linear"
    ticks = _tick_labels(ax)
    labels = [text for _, text in ticks]
    assert len(ticks) >= 3 and len(set(labels)) == len(labels), labels
    assert ax.yaxis.get_major_formatter().offset == 0
    # One power of ten shared by the axis (its "x 10^k" above the axis), the same for every tick.
    powers = {round(math.log10(loc / _number(text))) for loc, text in ticks if loc != 0}
    assert len(powers) == 1
    scale = 10.0 ** powers.pop()
    for loc, text in ticks:
        assert _number(text) * scale == pytest.approx(loc, rel=1e-6, abs=1e-12)
    steps_labels = [text for _, text in _tick_labels(ax, "x")]
    assert steps_labels == [str(int(_number(t))) for t in steps_labels]  # whole steps, no "1e2"


def test_log_axis_of_a_short_span_has_several_labels() -> None:
    figure = new_figure(*PANEL_PX)
    ax = figure.subplots()
    plot_panel(ax, "loss/style", [("a", [(s, 5e5 * 0.97**s + 2e4) for s in range(0, 250, 5)])])
    assert ax.get_yscale() == "log"
    labels = [text for _, text in _tick_labels(ax) if text]
    assert len(labels) >= 4 and len(set(labels)) == len(labels), labels


def test_image_grid_layout() -> None:
    contents = [torch.rand(1, 3, 24, 32), torch.rand(1, 3, 32, 24)]
    style = Image.new("RGB", (40, 30), (200, 40, 40))
    columns = [("model.norm=batch\nBN eval", lambda x: 1 - x), ("model.norm=instance", lambda x: x)]
    figure = make_figure(contents, style, columns, cell_px=64, captions=[None, "0.5x+0.25"])
    texts = [t.get_text() for t in figure.texts]
    assert texts == ["content", "style", "model.norm=batch\nBN eval", "model.norm=instance"]
    assert len(figure.axes) == 2 * 4
    assert [t.get_text() for t in figure.axes[4].texts] == ["0.5x+0.25"]  # first tile of the second row
    image = _decode(render(figure))
    pad, header = 6, 6 + 15 * 2
    assert image.size == (pad + 4 * (64 + pad), header + 2 * (64 + pad))
    # The style tile is drawn: its red shows in the second column of the first row.
    r, g, b = image.getpixel((pad + 64 + pad + 32, header + 32))[:3]
    assert r > 150 and g < 100 and b < 100


# --------------------------------------------------------------------------------------------------------------------
# End to end


FAKE = ["loss.network=random", "model.base_width=4", "model.residual_blocks=1", "style_size=64"]


def test_style_weight_sweep_end_to_end_without_training(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two made-up runs (untrained networks, the config and events a sweep over loss.style_weight would leave),
    compared from another directory: the relative style and data paths resolve against the launch dir."""
    from models.modelfile import save_model
    from training.run import build_model

    multirun = tmp_path / "multirun"
    for job, weight in enumerate((0.5, 2.0)):
        cfg = compose_train([*FAKE, f"loss.style_weight={weight}"])
        run_dir = multirun / f"{job}-van_gogh"
        save_hydra_files(run_dir, cfg, REPO)
        torch.manual_seed(job)
        save_model(run_dir / "model.pth", build_model(cfg), {})
        _write_events(run_dir / "tb", 1.0 + job)
    monkeypatch.chdir(tmp_path)  # not the launch dir: "data/samples/..." does not exist here

    paths = report.compare([multirun], [HELD_OUT], max_side_px=32, max_images=1, cell_px=48, figure_format="jpg")
    assert paths["figure"] == multirun / "compare_figure.jpg"
    with open(paths["table_csv"], newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [r["model"] for r in rows] == ["loss.style_weight=0.5", "loss.style_weight=2.0"]
    assert [r["run"] for r in rows] == ["0-van_gogh", "1-van_gogh"]
    assert [r["mode"] for r in rows] == ["", ""]
    # Same network outputs, different loss weights: the style term scales with the run's own style_weight.
    styles = [float(r["style_loss"]) for r in rows]
    assert styles[0] > 0 and styles[1] > 0
    assert "| loss.style_weight=2.0 | 1-van_gogh |" in paths["table_md"].read_text()
    figure = _decode(paths["figure"], "JPEG")
    assert figure.width > 4 * 48 and figure.height > 2 * 48  # content, style, 2 runs; 1 photo + 1 variant row
    assert _decode(paths["curves"]).size == (2 * PANEL_PX[0], PANEL_PX[1])
    assert not list(multirun.glob(".*.tmp"))


def test_cli_help_and_bad_input(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    with pytest.raises(SystemExit) as info:
        report.main(["--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert "python -m evaluation compare_runs" in out and "instance norm" in out and "--figure-variant" in out
    with pytest.raises(SystemExit) as info:
        report.main([str(tmp_path / "missing")])
    assert info.value.code == 2
    assert capsys.readouterr().err.startswith("error: ")


TINY = [
    "experiment=in_vs_bn",
    "loss.network=random",  # no VGG weights needed: this checks the plumbing, not the result
    "model.base_width=8",
    "model.residual_blocks=1",
    "data.image_size=64",
    "data.val_images=2",
    "train.batch_size=2",
    "train.steps=4",
    "train.log_interval_steps=1",
    "train.image_interval_steps=4",
    "train.checkpoint_interval_steps=4",
]


def _train_tiny(run_dir: Path, norm: str) -> None:
    """One real run through training.run.train with the in_vs_bn experiment, laid out like a Hydra multirun job."""
    from training.run import train as run_training

    cfg = compose_train([*TINY, f"model.norm={norm}"])
    run_training(cfg, run_dir=run_dir)
    save_hydra_files(run_dir, cfg, REPO)


@pytest.mark.slow
def test_end_to_end_on_two_tiny_real_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(REPO)  # the configs' relative paths (style, data.root) are relative to the launch dir
    multirun = tmp_path / "multirun"
    _train_tiny(multirun / "0-instance", "instance")
    _train_tiny(multirun / "1-batch", "batch")

    paths = report.compare([multirun], [HELD_OUT], max_side_px=48, max_images=2)
    assert {p.parent for p in paths.values()} == {multirun}
    assert {p.name for p in paths.values()} == {
        "compare_figure.png",
        "compare_table.md",
        "compare_table.csv",
        "compare_curves.png",
    }

    figure = _decode(paths["figure"])
    # 3 rows (2 photos + the half-contrast variant) x 5 columns (content, style, IN, BN eval, BN per-image).
    assert figure.width > 5 * 192 and figure.height > 3 * 192
    assert _decode(paths["curves"]).width == 2 * PANEL_PX[0]

    with open(paths["table_csv"], newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [r["model"] for r in rows] == [
        "model.norm=instance",
        "model.norm=batch, BN eval (running stats)",
        "model.norm=batch, BN per-image stats",
    ]
    assert [r["run"] for r in rows] == ["0-instance", "1-batch", "1-batch"]
    for row in rows:
        assert float(row["total_loss"]) > 0 and float(row["invariance_mad"]) >= 0
    markdown = paths["table_md"].read_text()
    assert "| model.norm=instance | 0-instance |" in markdown


def test_compare_runs_points_multi_style_runs_to_compare_styles(multi_model: Path, tmp_path: Path) -> None:
    from evaluation.runs import load_runs

    run = tmp_path / "multi"
    run.mkdir()
    (run / "model.pth").write_bytes(multi_model.read_bytes())
    save_hydra_files(run, compose_train(["experiment=multistyle_demo"]), REPO)
    with pytest.raises(FaststyleError, match="compare_styles"):
        load_runs([run], tmp_path, torch.device("cpu"))
