"""Compare a multi-style network with one-style networks of the same styles, and an added style with one trained
alone: the figures of Dumoulin et al. 2017's claims on our own runs.

    python train.py experiment=multistyle_demo hydra.run.dir=runs/multi
    python train.py experiment=multistyle_demo style=data/samples/styles/hokusai_great_wave.jpg train.steps=200 \\
        hydra.run.dir=runs/hokusai_great_wave                                  # ... one run per style
    python -m scripts.compare_styles runs/multi runs/hokusai_great_wave runs/van_gogh_village_street_auvers ...
    python -m scripts.compare_styles runs/multi runs/... --added runs/extended --alone runs/mona_lisa

Prints (and with --out writes) a Markdown table: per style, the held-out content, style and total loss of the
multi-style network in that style against the one-style network of that style, each measured with the same loss (the
multi-style run's loss settings, that style's image: ``training.run`` builds it as training did) on the held-out
photos (--content, default data/samples/held_out), and the parameter counts of the one network against the N
networks.

``--speed``: seconds per image of stylize's Runner (default stylize options: precision auto, untiled) on a
1920x1080 photo, the multi-style network in the first single's style (folded by ``for_style``, as stylize runs
it) against that single, alternated over --reps runs each after a warm-up, with the ratio of the medians.

``--added RUN --alone RUN``: ``RUN`` of ``train.extend`` (a style added to a trained network, only its (gamma, beta)
trained) against a one-style run of the same style with the same batches: the first logged step at which the added
style's training style loss (``loss/style``, the mean over each log window), and then its total loss, reach the final
ones of the run trained alone, read back from both runs' TensorBoard events. (Give the ``train.extend`` run as the
multi-style run and the alone run as its single to compare their held-out losses.)
"""

from __future__ import annotations

import argparse
import copy
import logging
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

from core.errors import FaststyleError, exit_with_error
from scripts.compare_runs import (
    Run,
    eval_stylizer,
    held_out_images,
    held_out_losses,
    load_run,
    read_scalars,
    training_loss,
)

REPO_ROOT = Path(__file__).resolve().parents[1]
log = logging.getLogger(__name__)


def parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def style_loss_for(multi: Run, style_file: Path, device: torch.device) -> nn.Module:
    """The multi-style run's loss settings with ``style_file`` as the one style target."""
    run = copy.copy(multi)
    run.cfg = copy.deepcopy(multi.cfg)
    run.cfg.style = str(style_file)
    return training_loss(run, device)


def compare_styles(multi: Run, singles: list[Run], images: list[torch.Tensor], device: torch.device) -> list[dict]:
    """Per style of the singles: held-out losses of the multi-style network in that style and of the single."""
    names = list(multi.meta.get("styles") or [])
    if multi.model.num_styles < 2 or len(names) != multi.model.num_styles:
        raise FaststyleError(f"{multi.path} is not a multi-style run (its model.pth lists no styles)")
    rows = []
    for single in singles:
        name = str(single.meta.get("style_stem") or "")
        if single.model.num_styles != 1 or name not in names:
            raise FaststyleError(f"{single.path} is not a one-style run of one of {multi.path.name}'s styles")
        index = names.index(name)
        loss = style_loss_for(multi, Path(str(single.cfg.style)), device)
        rows.append(
            {
                "style": name,
                "multi": held_out_losses(eval_stylizer(multi.model.for_style(index)), loss, images),
                "single": held_out_losses(eval_stylizer(single.model), loss, images),
                "single_steps": int(single.meta.get("steps", 0)),
            }
        )
    return rows


def steps_to_reach(added: Path, alone: Path, tag: str) -> tuple[int | None, float, list[tuple[int, float]]]:
    """(first step of ``added`` whose logged ``tag`` is <= ``alone``'s final one, that target, added's curve)."""
    target_curve = read_scalars(alone / "tb").get(tag)
    curve = read_scalars(added / "tb").get(tag)
    if not target_curve or not curve:
        raise FaststyleError(f"no {tag} curve in {alone / 'tb'} or {added / 'tb'}")
    target = target_curve[-1][1]
    reached = next((step for step, value in curve if value <= target), None)
    return reached, target, curve


def added_style_text(added: Path, alone: Path) -> str:
    """When the added style's training losses reach those of the style trained alone (module docstring)."""
    lines = []
    for tag in ("loss/style", "loss/total"):
        reached, target, curve = steps_to_reach(added, alone, tag)
        where = f"step {reached}" if reached is not None else f"not within its {curve[-1][0]} steps"
        lines.append(
            f"Added style `{added.name}`: its training {tag} reaches the final one of `{alone.name}` trained alone "
            f"({target:.4g}) at {where} (logged windows: "
            f"{', '.join(f'{step}: {value:.4g}' for step, value in curve[:: max(1, len(curve) // 8)])})."
        )
    return "\n" + "\n".join(lines) + "\n"


def stylize_speed(multi: Run, single: Run, photo: Path, reps: int) -> str:
    """Seconds per 1920x1080 image through stylize's Runner: multi in the single's style vs the single."""
    from data.io import load_image, resize_to
    from inference.jobs import Job
    from inference.runner import Loaded, Runner
    from stylize import compose_config

    name = str(single.meta.get("style_stem"))
    index = list(multi.meta["styles"]).index(name)
    cfg = compose_config([f"model={multi.path / 'model.pth'}", f"input={photo}"])
    start = time.perf_counter()
    folded = multi.model.for_style(index)
    fold_seconds = time.perf_counter() - start
    device = next(single.model.parameters()).device
    runners = {"multi": Runner.from_module(folded, device, cfg), "one": Runner.from_module(single.model, device, cfg)}
    image = resize_to(load_image(photo), 1920, 1080)
    item = Loaded(Job(photo, photo), image, size=(1080, 1920))
    times: dict[str, list[float]] = {key: [] for key in runners}
    for rep in range(reps + 1):
        for key, runner in runners.items():
            start = time.perf_counter()
            runner([item])
            if rep:  # the first round warms up (kernel build, allocator)
                times[key].append(time.perf_counter() - start)
    multi_s, one_s = statistics.median(times["multi"]), statistics.median(times["one"])
    return (
        f"\nStylize speed, 1920x1080, {runners['one'].policy.describe()}, median of {reps}: multi-style in "
        f"{name} {multi_s:.3f} s/image, one-style {one_s:.3f} s/image, ratio {multi_s / one_s:.3f} "
        f"(folding the style into the network once: {1000 * fold_seconds:.1f} ms).\n"
    )


def table(multi: Run, singles: list[Run], rows: list[dict], images: int) -> str:
    total_single = sum(parameters(s.model) for s in singles)
    lines = [
        f"Held-out losses on {images} photos, each style measured with the same loss for both networks; "
        f"multi-style `{multi.path.name}` ({int(multi.meta.get('steps', 0))} steps, {multi.model.num_styles} styles, "
        f"{parameters(multi.model):,} parameters) vs {len(singles)} one-style networks "
        f"({', '.join(str(r['single_steps']) for r in rows)} steps; {total_single:,} parameters together).",
        "",
        "| style | content multi | content one | style multi | style one | total multi | total one | total multi/one |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        m, s = row["multi"], row["single"]
        lines.append(
            f"| {row['style']} | {m['content']:.4g} | {s['content']:.4g} | {m['style']:.4g} | {s['style']:.4g} | "
            f"{m['total']:.4g} | {s['total']:.4g} | {m['total'] / s['total']:.3f} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("multi", type=Path, help="the multi-style run dir")
    parser.add_argument("singles", type=Path, nargs="*", help="one-style run dirs of some of its styles")
    parser.add_argument("--content", default=str(REPO_ROOT / "data" / "samples" / "held_out"), help="held-out photos")
    parser.add_argument("--max-images", type=int, default=8)
    parser.add_argument("--size", type=int, default=256, help="long side of the held-out photos (px)")
    parser.add_argument("--added", type=Path, help="a train.extend run dir (the style added to a trained network)")
    parser.add_argument("--alone", type=Path, help="a one-style run of the added style, same batches")
    parser.add_argument("--speed", action="store_true", help="also time stylize: multi vs the first single")
    parser.add_argument("--reps", type=int, default=5, help="--speed: timed runs of each network")
    parser.add_argument("--photo", type=Path, default=REPO_ROOT / "data" / "samples" / "held_out" / "china.jpg")
    parser.add_argument("--out", type=Path, help="also write the table to this Markdown file")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        if (args.added is None) != (args.alone is None):
            raise FaststyleError("give --added and --alone together")
        device = torch.device(args.device)
        multi = load_run(args.multi, args.multi.name, device)
        singles = [load_run(path, path.name, device) for path in args.singles]
        text = ""
        if singles:
            files, images = held_out_images([args.content], [multi, *singles], args.max_images, args.size, device)
            text += table(multi, singles, compare_styles(multi, singles, images, device), len(files))
        if args.speed:
            if not singles:
                raise FaststyleError("--speed compares the multi-style network with a single: give one")
            text += stylize_speed(multi, singles[0], args.photo, args.reps)
        if args.added is not None:
            text += added_style_text(args.added, args.alone)
        print(text, end="")
        if args.out is not None:
            from core.fileio import atomic_write_text

            atomic_write_text(args.out, text)
    except FaststyleError as err:
        exit_with_error(err)  # one line, exit status 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
