"""Training multi-style networks (style=[...]) and adding a style to a trained one (train.extend)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from core.errors import FaststyleError
from models.modelfile import load_model, save_model
from models.transformer import TransformerNet
from tests.support import CONTENT, REPO, SMALL, compose_train, read_events, scalar_values, tiny_net
from training.checkpoint import load_checkpoint
from training.loop import style_counts, style_indices
from training.run import train as run_training
from training.rundir import style_stem

pytestmark = pytest.mark.usefixtures("one_thread")

STYLES = REPO / "data" / "samples" / "styles"
TWO = [STYLES / "hokusai_great_wave.jpg", STYLES / "van_gogh_village_street_auvers.jpg"]
NEW = STYLES / "kandinsky_composition_8.jpg"


def _overrides(styles: list[Path], *extra: str) -> list[str]:
    listed = ",".join(str(path) for path in styles)
    return [o for o in SMALL if not o.startswith("style=")] + [f"style=[{listed}]", *extra]


@pytest.mark.parametrize("styles, batch, world", [(4, 4, 1), (3, 4, 1), (5, 2, 2), (2, 3, 1)])
def test_style_assignment_is_balanced(styles: int, batch: int, world: int) -> None:
    seen = [0] * styles
    for step in range(1, styles + 1):  # any num_styles consecutive steps: every style batch_size times per rank
        per_step = [0] * styles
        for rank in range(world):
            for k in style_indices(step, batch, styles, rank, world):
                per_step[k % styles] += 1
        assert per_step == style_counts(step, batch, styles, world)
        seen = [a + b for a, b in zip(seen, per_step, strict=True)]
    assert seen == [batch * world] * styles


def test_two_style_training_moves_both_styles_losses(tmp_path: Path) -> None:
    cfg = compose_train(_overrides(TWO, "train.steps=12", "train.log_interval_steps=4", "loss.network=vgg19",
                                   "train.checkpoint_interval_steps=12", "train.lr=1e-2"))  # fmt: skip
    model_path = run_training(cfg, run_dir=tmp_path)
    model, meta = load_model(model_path)
    assert model.num_styles == 2 and meta["styles"] == ["hokusai_great_wave", "van_gogh_village_street_auvers"]
    events = read_events(tmp_path)
    tags = events.Tags()
    for name in meta["styles"]:
        curve = scalar_values(events, f"loss/per_style/{name}")
        assert sorted(curve) == [4, 8, 12]
        assert curve[12] < 0.9 * curve[4], (name, curve)  # each style's own loss falls
        assert f"val/{name}" in tags["images"] and f"style/{name}" in tags["images"]
    # the per-style losses are the two halves of the style term: their mean is the logged style loss
    style = scalar_values(events, "loss/style")
    halves = [scalar_values(events, f"loss/per_style/{name}") for name in meta["styles"]]
    assert halves[0][12] + halves[1][12] == pytest.approx(2 * style[12], rel=1e-4)
    # the two styles now give different images
    x = torch.rand(1, 3, 32, 32)
    assert (model(x, 0) - model(x, 1)).abs().mean() > 1e-3
    assert load_checkpoint(tmp_path)["style_path"] == [str(p) for p in TWO]


def test_multi_style_resume_continues_with_the_same_styles_losses_and_weights(tmp_path: Path) -> None:
    three = [*TWO, NEW]  # 3 styles at batch 2: the styles of a step depend on the step
    full_dir, resumed_dir = tmp_path / "full", tmp_path / "resumed"
    run_training(compose_train(_overrides(three)), run_dir=full_dir)
    checkpoint = full_dir / "checkpoints" / "step_0000002.pt"
    run_training(compose_train(_overrides(three, f"train.resume={checkpoint}")), run_dir=resumed_dir)
    full, resumed = read_events(full_dir), read_events(resumed_dir)
    logged = {}
    for name in ("hokusai_great_wave", "van_gogh_village_street_auvers", "kandinsky_composition_8"):
        a, b = (scalar_values(events, f"loss/per_style/{name}") for events in (full, resumed))
        assert sorted(b) == [step for step in sorted(a) if step > 2]  # logged where the style had samples
        assert all(b[step] == pytest.approx(a[step], rel=1e-5) for step in b)
        logged[name] = sorted(b)
    # steps 3 and 4 train samples 4-7: styles 1, 2 then 0, 1 (style k mod 3)
    assert logged == {
        "hokusai_great_wave": [4],
        "van_gogh_village_street_auvers": [3, 4],
        "kandinsky_composition_8": [3],
    }
    a, b = load_model(full_dir / "model.pth")[0], load_model(resumed_dir / "model.pth")[0]
    for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        torch.testing.assert_close(x, y, msg=name)


def test_one_style_in_a_list_trains_the_one_style_network(tmp_path: Path) -> None:
    model_path = run_training(compose_train(_overrides(TWO[:1])), run_dir=tmp_path)
    model, meta = load_model(model_path)
    assert model.num_styles == 1 and "num_styles" not in model.config() and meta["style"] == TWO[0].name
    assert "style" in read_events(tmp_path).Tags()["images"]


def test_run_dir_name_of_several_styles() -> None:
    assert style_stem(["a/x.jpg", "b/y.jpg", "c/z.png"]) == "3styles"
    assert style_stem(["a/x.jpg"]) == "x"


@pytest.mark.parametrize(
    "overrides, message",
    [(["model.norm=batch"], "model.norm=instance"),
     (["style=[a/x.jpg,b/x.png]"], "twice"),
     ([f"train.extend={CONTENT}/x.pth"], "one style")],
)  # fmt: skip
def test_bad_multistyle_configs_are_refused(overrides: list[str], message: str, tmp_path: Path) -> None:
    cfg = compose_train(_overrides(TWO, *overrides))
    with pytest.raises(FaststyleError, match=message):
        run_training(cfg, run_dir=tmp_path)
    assert not (tmp_path / "model.pth").exists()


def _base_model(tmp_path: Path, styles: int) -> Path:
    net = tiny_net(num_styles=styles, seed=3)
    with torch.no_grad():
        for param in net.parameters():
            if param.dim() == 2:  # the (styles, C) tables: distinct styles
                param.copy_(torch.rand_like(param) + 0.5)
    path = tmp_path / "base.pth"
    meta = {"styles": ["hokusai_great_wave", "van_gogh_village_street_auvers"]} if styles > 1 else {"style_stem": "a"}
    save_model(path, net, meta)
    return path


@pytest.mark.parametrize("styles", [2, 1])
def test_extend_trains_only_the_new_style_and_keeps_the_old_ones(tmp_path: Path, styles: int) -> None:
    base_path = _base_model(tmp_path, styles)
    base, _ = load_model(base_path)
    run = tmp_path / "run"
    overrides = [o for o in SMALL if not o.startswith("style=")]
    cfg = compose_train([*overrides, f"style={NEW}", f"train.extend={base_path}", "model.base_width=32"])
    extended, meta = load_model(run_training(cfg, run_dir=run))
    assert extended.num_styles == styles + 1
    assert meta["styles"][-1] == "kandinsky_composition_8" and meta["extended_from"] == str(base_path)
    assert extended.config()["base_width"] == 8  # the base's network, whatever model.* says
    x = torch.rand(2, 3, 24, 40)
    for style in range(styles):
        old = base.for_style(style) if styles > 1 else base
        assert torch.equal(extended.for_style(style)(x), old(x))  # bit-identical
    assert (extended(x, styles) - extended(x, 0)).abs().max() > 0  # the new style is its own
    # only (gamma, beta) trained: the checkpoint's optimizer holds the norms' parameters alone
    state = load_checkpoint(run)
    trained = sum(v["exp_avg"].numel() for v in state["optimizer"]["state"].values())
    total = sum(p.numel() for p in base.for_style(0).parameters())
    assert 0 < trained < 0.02 * total


def test_extend_refuses_a_style_it_holds_and_a_batch_norm_model(tmp_path: Path) -> None:
    base_path = _base_model(tmp_path, 2)
    overrides = [o for o in SMALL if not o.startswith("style=")]
    cfg = compose_train([*overrides, f"style={TWO[0]}", f"train.extend={base_path}"])
    with pytest.raises(FaststyleError, match="already holds a style named hokusai_great_wave"):
        run_training(cfg, run_dir=tmp_path / "a")
    bn = tmp_path / "bn.pth"
    save_model(bn, TransformerNet(norm="batch", base_width=8, residual_blocks=1), {})
    cfg = compose_train([*overrides, f"style={NEW}", f"train.extend={bn}"])
    with pytest.raises(FaststyleError, match="only instance-norm"):
        run_training(cfg, run_dir=tmp_path / "b")


def test_extend_resumes_like_any_run(tmp_path: Path) -> None:
    base_path = _base_model(tmp_path, 2)
    overrides = [*(o for o in SMALL if not o.startswith("style=")), f"style={NEW}", f"train.extend={base_path}"]
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    run_training(compose_train(overrides), run_dir=full)
    checkpoint = full / "checkpoints" / "step_0000002.pt"
    resumed_model, meta = load_model(run_training(compose_train([*overrides, f"train.resume={checkpoint}"]), resumed))
    full_model = load_model(full / "model.pth")[0]
    assert resumed_model.num_styles == 3 and meta["styles"][-1] == "kandinsky_composition_8"
    for (name, a), (_, b) in zip(full_model.state_dict().items(), resumed_model.state_dict().items(), strict=True):
        torch.testing.assert_close(a, b, msg=name)


def test_a_full_network_cannot_take_another_style(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """train.extend on a network that already holds the most styles one network holds (core.limits) is refused
    before training, in one line, with nothing written (the limit lowered to 2 here, so the base stays tiny)."""
    from core import limits

    monkeypatch.setitem(limits.MODEL_RANGES, "num_styles", (1, 2))
    base = _base_model(tmp_path, 2)
    cfg = compose_train([f"style={NEW}", f"train.extend={base}"])
    with pytest.raises(FaststyleError, match="holds 2 styles, the most one network holds"):
        run_training(cfg, run_dir=tmp_path / "run")
    assert not (tmp_path / "run" / "model.pth").exists()
