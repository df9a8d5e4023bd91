"""scripts/compare_norms.py (issue 5): the contrast-invariance measure, the per-image batch-norm mode, the
held-out check, the TensorBoard curves, and an end-to-end run on two tiny real training runs."""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image
from torch import nn

from core.errors import FaststyleError
from models.transformer import TransformerNet
from scripts import compare_runs as cn

REPO_ROOT = Path(__file__).resolve().parents[1]


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


def test_constant_network_is_perfectly_invariant() -> None:
    constant = lambda x: torch.full_like(x, 0.5)
    mean, per_variant = cn.contrast_invariance(constant, mid_range_images(), cn.DEFAULT_VARIANTS)
    assert mean == 0.0 and per_variant == [0.0] * len(cn.DEFAULT_VARIANTS)


def test_identity_is_not_invariant_and_its_measure_is_the_input_change() -> None:
    images = mid_range_images()
    mean, per_variant = cn.contrast_invariance(lambda x: x, images, UNCLIPPED)
    assert mean > 0.05
    assert mean == pytest.approx(cn.input_change(images, UNCLIPPED), rel=1e-6)
    # First variant by hand: (a, b) = (0.5, 0.25) moves pixel p by |0.25 - 0.5 p|.
    by_hand = sum(float((0.25 - 0.5 * im).abs().mean()) for im in images) / len(images)
    assert per_variant[0] == pytest.approx(by_hand, rel=1e-5)


def test_per_image_normaliser_is_invariant_until_clipping() -> None:
    """Without clipping a*x+b changes nothing after per-image standardisation; clipping destroys information, so
    the same network must then score > 0 (this checks that the variants really are clipped)."""
    net = PerImageStandardise()
    unclipped, _ = cn.contrast_invariance(net, mid_range_images(), UNCLIPPED)
    assert unclipped < 1e-5
    gen = torch.Generator().manual_seed(1)
    full_range = [torch.rand(1, 3, 24, 24, generator=gen)]
    clipped, _ = cn.contrast_invariance(net, full_range, ((1.5, -0.25),))
    assert clipped > 1e-2
    variant = cn.contrast_variants(full_range[0], ((1.5, -0.25),))[0]
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
    per_image = cn.per_image_bn_stylizer(net)
    x = torch.rand(2, 3, 24, 24)
    y = per_image(x)
    assert y.shape == x.shape
    for key, value in net.state_dict().items():
        assert torch.equal(value, before[key]), key
    assert not net.training
    assert not torch.allclose(y, cn.eval_stylizer(net)(x), atol=1e-4)
    # Per image: stylizing the batch equals stylizing each image alone.
    assert torch.allclose(y[1:], per_image(x[1:]), atol=1e-5)


def test_instance_statistics_remove_contrast_and_running_statistics_do_not() -> None:
    """The structural core of Ulyanov et al.: a norm with per-image statistics right after the first (linear) conv
    cancels a > 0 and b (reflection padding keeps a constant shift constant), so instance norm and per-image BN
    are invariant to unclipped a*x+b; BN with running statistics is not."""
    images = mid_range_images(n=1, size=24)
    bn = _trained_bn_net()
    bn_eval, _ = cn.contrast_invariance(cn.eval_stylizer(bn), images, UNCLIPPED)
    bn_per_image, _ = cn.contrast_invariance(cn.per_image_bn_stylizer(bn), images, UNCLIPPED)
    torch.manual_seed(0)
    instance = TransformerNet(norm="instance", base_width=4, residual_blocks=1).eval()
    with torch.no_grad():
        instance.decoder[-1].conv.weight.mul_(20)
    in_eval, _ = cn.contrast_invariance(cn.eval_stylizer(instance), images, UNCLIPPED)
    assert bn_eval > 5e-4
    # Not exactly 0: the eps added to the variance weighs more for a low-contrast variant (a < 1).
    assert bn_per_image < bn_eval / 20
    assert in_eval < bn_eval / 20


def test_find_run_dirs_and_errors(tmp_path: Path) -> None:
    for name in ("0-instance", "1-batch"):
        (tmp_path / name / ".hydra").mkdir(parents=True)
        (tmp_path / name / ".hydra" / "config.yaml").write_text("seed: 0\n")
        (tmp_path / name / "model.pth").write_bytes(b"")
    assert cn.find_run_dirs([tmp_path]) == [tmp_path / "0-instance", tmp_path / "1-batch"]
    assert cn.find_run_dirs([tmp_path / "1-batch"]) == [tmp_path / "1-batch"]
    with pytest.raises(FaststyleError, match="does not exist"):
        cn.find_run_dirs([tmp_path / "nope"])
    (tmp_path / "2-unfinished" / ".hydra").mkdir(parents=True)
    (tmp_path / "2-unfinished" / ".hydra" / "config.yaml").write_text("seed: 0\n")
    with pytest.raises(FaststyleError, match="no model.pth"):
        cn.find_run_dirs([tmp_path])
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FaststyleError, match="no training run"):
        cn.find_run_dirs([empty])


def test_held_out_images_must_not_be_training_images(tmp_path: Path) -> None:
    held_out = cn.collect_images([REPO_ROOT / "data" / "samples" / "held_out"])
    assert len(held_out) >= 3
    # The shipped held-out photos are not among the demo training photos.
    cn.check_held_out(held_out, [REPO_ROOT / "data" / "samples" / "content"])
    # A renamed copy inside a training root is caught by content, not by name.
    root = tmp_path / "train" / "sub"
    root.mkdir(parents=True)
    shutil.copy(held_out[0], root / "renamed.jpg")
    with pytest.raises(FaststyleError, match="is the training image"):
        cn.check_held_out(held_out, [tmp_path / "train"])
    (tmp_path / "no_images").mkdir()
    with pytest.raises(FaststyleError, match="no held-out images"):
        cn.collect_images([tmp_path / "no_images"])


def test_curves_from_tensorboard_events(tmp_path: Path) -> None:
    from torch.utils.tensorboard import SummaryWriter

    runs = []
    for name, scale in (("0-instance", 1.0), ("1-batch", 2.0)):
        writer = SummaryWriter(str(tmp_path / name / "tb"))
        for step in range(0, 100, 10):
            writer.add_scalar("loss/total", scale * 1000 / (step + 1), step)
            writer.add_scalar("loss/content", scale * 5.0 + step * 0.01, step)
            writer.add_scalar("lr", 1e-3, step)
        writer.close()
        series = cn.read_scalars(tmp_path / name / "tb")
        assert [s for s, _ in series["loss/total"]] == list(range(0, 100, 10))
        runs.append((name, series))
    image = cn.make_curves(runs)
    assert image.size == (2 * 460, 320)  # two loss/ panels; "lr" is not a loss panel
    # Both colours are drawn.
    colours = set(image.get_flattened_data())
    assert cn.COLOURS[0] in colours and cn.COLOURS[1] in colours
    with pytest.raises(FaststyleError, match="no TensorBoard events"):
        cn.read_scalars(tmp_path / "missing")


def test_axis_labels_are_distinct() -> None:
    # linear ticks 6e4 .. 1.2e5 at 1e4 steps: one-digit labels would print "1e+05" for 1e5, 1.1e5 and 1.2e5
    ticks = [6e4 + 1e4 * i for i in range(7)]
    labels = cn._format_ticks(ticks)
    assert len(set(labels)) == len(labels)
    assert labels[0] == "6.0e+04" and labels[-1] == "1.2e+05"
    assert cn._format_ticks([0, 50, 100, 150]) == ["0", "50", "100", "150"]
    assert cn._format_ticks([1e4, 1e5, 1e6]) == ["1e+04", "1e+05", "1e+06"]


def test_cli_help_and_bad_input(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    with pytest.raises(SystemExit) as info:
        cn.main(["--help"])
    assert info.value.code == 0
    assert "instance norm" in capsys.readouterr().out
    with pytest.raises(SystemExit) as info:
        cn.main([str(tmp_path / "missing")])
    assert info.value.code == 2
    assert capsys.readouterr().err.startswith("error: ")


def _assert_png(path: Path) -> Image.Image:
    assert path.is_file()
    with Image.open(path) as img:
        assert img.format == "PNG"
        img.load()
        return img.copy()


CONFIGS = REPO_ROOT / "configs"
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
    """One real run through train.train with the in_vs_bn experiment, laid out like a Hydra multirun job."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from training.run import train as run_training

    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        cfg = compose("train", overrides=[*TINY, f"model.norm={norm}"])
    run_training(cfg, run_dir=run_dir)
    (run_dir / ".hydra").mkdir(parents=True, exist_ok=True)
    OmegaConf.save(cfg, run_dir / ".hydra" / "config.yaml")  # what Hydra writes for a real run


@pytest.mark.slow
@pytest.mark.skipif(
    not (CONFIGS / "model" / "johnson.yaml").is_file() or not (CONFIGS / "loss" / "vgg19.yaml").is_file(),
    reason="configs/model/johnson.yaml and configs/loss/vgg19.yaml are not in the tree yet (training engineer)",
)
def test_end_to_end_on_two_tiny_real_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(REPO_ROOT)  # the configs' relative paths (style, data.root) are relative to the launch dir
    multirun = tmp_path / "multirun"
    _train_tiny(multirun / "0-instance", "instance")
    _train_tiny(multirun / "1-batch", "batch")

    paths = cn.compare([multirun], [REPO_ROOT / "data" / "samples" / "held_out"], max_side_px=48, max_images=2)
    assert {p.parent for p in paths.values()} == {multirun}

    figure = _assert_png(paths["figure"])
    # 2 rows x 5 columns (content, style, BN eval, BN per-image, IN) of 192 px cells.
    assert figure.width > 5 * 192 and figure.height > 2 * 192
    curves = _assert_png(paths["curves"])
    assert curves.width >= 2 * 460

    with open(paths["table_csv"], newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [r["model"] for r in rows] == ["batch norm, eval (running stats)", "batch norm, per-image stats",
                                          "instance norm"]
    assert [r["run"] for r in rows] == ["1-batch", "1-batch", "0-instance"]
    for row in rows:
        assert float(row["total_loss"]) > 0 and float(row["invariance_mad"]) >= 0
    markdown = paths["table_md"].read_text()
    assert "| instance norm | 0-instance |" in markdown
