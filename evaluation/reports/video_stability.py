"""How much a style network flickers on video: the warping error of Lai et al. 2018 on test clips with known motion.

    python -m evaluation video_stability outputs/train/<date>/<time>-<style>/model.pth
    python -m evaluation video_stability plain/model.pth temporal/model.pth --names plain temporal --strip
    python -m evaluation video_stability multi/model.pth --style hokusai_great_wave --size 256x256 --frames 30

A per-frame network turns the small changes between video frames into changes of its texture: flicker. This report
stylizes three clips made at run time from the held-out photos (evaluation/clips.py: a pan with sub-pixel steps,
a zoom, objects moving over a background and occluding it) with each model and prints, per clip and model, the
warping error of Lai et al. 2018 ("Learning Blind Video Temporal Consistency", ECCV 2018):

    E_warp = mean over t of  sum_p M_t(p) * D_t(p) / sum_p M_t(p),
    D_t(p) = mean over RGB of (O_t(p) - O_{t-1}(p + b_t(p)))^2,   O in [0, 1]

where b_t is the optical flow of the *input* frames from t to t - 1 (backward warping, bilinear) and M_t the
non-occlusion mask of Ruder et al. 2016 ("Artistic style transfer for videos", GCPR 2016): forward-backward flow
consistency and motion boundaries, plus the pixels whose flow leaves the frame; a pair whose mask keeps under 30 %
of the frame, or whose input error is over 20 times the clip's median, is a cut between two shots and is left out
(evaluation/warping.py, ``shot_cuts``). Printed x 1000. Lower is steadier;
a stylization that moved exactly with the video would score about the input clip's own error ("input" column: the
floor that the warp's bilinear interpolation and the flow's errors leave; it depends on the image's detail), not 0.

The flow is estimated once per clip on the input frames (8-bit grayscale) with OpenCV (``--flow``: DIS, or
Farneback) and reused for every model. The clips' true motion is known, so each clip also gets a row with the
exact flow: where the two rows agree, the estimated flow is not what the numbers measure. The last row is the mean
over clips (estimated flow); with several models, B/A (and C/A, ...) is each model's error over the first's.

Models: any model file stylize reads, made ready by inference.network (the call stylize uses); a multi-style
model runs the one-style network of ``--style`` (``TransformerNet.for_style``, as stylize does), a one-style model
ignores it. Frames go through the network directly, ``--batch`` at a time, in ``--precision`` (default fp32) on
``--device`` (default auto), and are rounded to 8 bits as every image faststyle writes. The measure itself is
evaluation/warping.py.

``--strip [PATH]`` (default outputs/reports/video_stability/strip.jpg): a picture for the README: a few
consecutive frames of one clip (``--strip-clip``), one row for the input and one per model, each row ending with its
warping-error map of the last frame shown (sqrt(D_t), x4; blue where the mask leaves pixels out).
``--save-clips [DIR]`` (default outputs/reports/video_stability/clips): every clip's input and stylized frames as
PNG sequences (DIR/<clip>/input/000.png, DIR/<clip>/A/000.png, ...).

``--clip VIDEO`` (repeatable) adds a real clip: its first ``--frames`` frames, decoded by data/video.py (PyAV) and
scaled so the long side is at most ``--size``'s; it has no exact-flow row (its motion is unknown). ``--real`` adds
the four real clips shipped in data/samples/clips (evaluation/real_clips.py: a static camera over walkers, foliage
in the wind, an animated character, a street scene with a cut; 40 frames each). With both kinds, the table ends with
one mean over the synthetic clips and one over the real ones. ``--clips`` with no name leaves the synthetic clips
out.

``--style-loss`` adds a second table: the style loss of each column's frames (the Gram term of the training loss of
A's run, with its style image, on every STYLE_EVERY-th frame of each clip) as a ratio to A's. Steadier is not free:
a blend averages textures that the network did not place consistently from frame to frame, and an average of two
textures is a weaker, blurrier texture (video_blend keeps each band's contrast, which takes back part of that); the
held-out style loss cannot show it, since a blend changes no weight: this table does.

OpenCV is needed for the flow only and is not a dependency of faststyle: ``pip install opencv-python-headless``.
"""

from __future__ import annotations

import argparse
import math
import re
import string
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from core.cli import add_device_option, run_tool, tool_parser
from evaluation.clips import DEFAULT_FRAMES, DEFAULT_SIZE
from evaluation.real_clips import REAL_CLIPS
from evaluation.warping import FLOW_METHODS

if TYPE_CHECKING:
    import torch

    from core.precision import PrecisionPolicy
    from evaluation.clips import Clip
    from evaluation.warping import WarpingError
    from inference.network import StyleNetwork

CLIP_NAMES = ("pan", "zoom", "objects")
MIN_SIDE = 32  # DIS needs a few pyramid levels of 8-pixel patches
MAX_FRAMES = 500
SCALE = 1000.0  # errors are printed x 1000
STYLE_EVERY = 4  # --style-loss: one frame in 4 (consecutive frames hold nearly the same texture)
# Under outputs/ (git-ignored) rather than the current folder, which is usually the repository root.
DEFAULT_STRIP = Path("outputs/reports/video_stability/strip.jpg")
DEFAULT_CLIPS_DIR = Path("outputs/reports/video_stability/clips")


def parse_size(text: str) -> tuple[int, int]:
    """``WxH`` -> (width, height), each at least MIN_SIDE."""
    match = re.fullmatch(r"\s*(\d+)\s*[xX]\s*(\d+)\s*", text)
    if not match:
        raise argparse.ArgumentTypeError(f"expected WIDTHxHEIGHT, e.g. 320x180, got {text!r}")
    width, height = int(match[1]), int(match[2])
    if min(width, height) < MIN_SIDE:
        raise argparse.ArgumentTypeError(f"clips need at least {MIN_SIDE} pixels a side, got {text}")
    return width, height


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The report's options, then the checks between them that argparse cannot express (long: one call per option,
    kept together so the command line reads in one place)."""
    parser = tool_parser("python -m evaluation video_stability", __doc__)
    parser.add_argument("models", type=Path, nargs="+", metavar="MODEL", help="model.pth files (A, B, ...)")
    parser.add_argument("--names", nargs="+", help="a short name per model for the table and the strip")
    parser.add_argument("--style", help="multi-style models: the style (name, index or mix) to measure")
    parser.add_argument(
        "--size",
        type=parse_size,
        default=DEFAULT_SIZE,
        metavar="WxH",
        help=f"clip size (default {DEFAULT_SIZE[0]}x{DEFAULT_SIZE[1]})",
    )
    parser.add_argument(
        "--frames", type=int, default=DEFAULT_FRAMES, help=f"frames per clip (default {DEFAULT_FRAMES})"
    )
    parser.add_argument(
        "--clips",
        nargs="*",
        choices=CLIP_NAMES,
        default=list(CLIP_NAMES),
        help="which synthetic clips (default all; none with --clips and no name, e.g. to measure only --clip files)",
    )
    parser.add_argument(
        "--clip",
        type=Path,
        action="append",
        default=[],
        metavar="VIDEO",
        help="also measure a video file (its first --frames frames, long side scaled to --size's; repeatable)",
    )
    parser.add_argument(
        "--real",
        action="store_true",
        help="also measure the real clips shipped in data/samples/clips (walkers, tree, bunny, bikes: "
        "evaluation/real_clips.py); use --frames 40 for all of their frames",
    )
    parser.add_argument(
        "--flow",
        choices=FLOW_METHODS,
        default=FLOW_METHODS[0],
        help="optical flow: OpenCV DIS (fine: the MEDIUM preset at full resolution; medium: the preset) or "
        "Farneback (default dis-fine)",
    )
    parser.add_argument(
        "--blend",
        type=float,
        metavar="ALPHA",
        help="also measure each model with stylize's video_blend=ALPHA (inference/steady.py): a column 'Ab' per "
        "model, and the blend's time per frame",
    )
    parser.add_argument(
        "--style-loss",
        action="store_true",
        help="also the style loss of every column's frames, as ratios to A's: the training loss of A's run folder "
        "(.hydra/config.yaml beside A's model.pth) on every 4th frame of each clip; what a blend costs in texture",
    )
    add_device_option(parser, "where the networks run")
    parser.add_argument(
        "--precision", default="fp32", choices=("fp32", "bf16", "fp16", "auto"), help="network precision (fp32)"
    )
    parser.add_argument("--batch", type=int, default=8, help="frames per network call (default 8)")
    parser.add_argument(
        "--strip",
        type=Path,
        nargs="?",
        const=DEFAULT_STRIP,
        metavar="PATH",
        help=f"write a frame strip (.jpg, .png, ...; --strip alone: {DEFAULT_STRIP})",
    )
    parser.add_argument(
        "--strip-clip", metavar="CLIP", help="the strip's clip: pan, zoom, objects or a --clip file's name (objects)"
    )
    parser.add_argument("--strip-frames", type=int, default=4, help="consecutive frames in the strip (default 4)")
    parser.add_argument(
        "--save-clips",
        type=Path,
        nargs="?",
        const=DEFAULT_CLIPS_DIR,
        metavar="DIR",
        help=f"write every clip's frames as PNG sequences (--save-clips alone: {DEFAULT_CLIPS_DIR})",
    )
    args = parser.parse_args(argv)
    if not 2 <= args.frames <= MAX_FRAMES:
        parser.error(f"--frames must be between 2 and {MAX_FRAMES}, got {args.frames}")
    if args.batch < 1:
        parser.error(f"--batch must be at least 1, got {args.batch}")
    if args.blend is not None and not 0.0 < args.blend < 1.0:
        parser.error(f"--blend must be between 0 and 1 (exclusive), got {args.blend}")
    if args.names is not None and len(args.names) != len(args.models):
        parser.error(f"--names: {len(args.names)} names for {len(args.models)} models")
    if args.strip is not None and not 1 <= args.strip_frames < args.frames:
        parser.error(f"--strip-frames must be between 1 and --frames - 1 ({args.frames - 1}), got {args.strip_frames}")
    args.clips = [name for name in CLIP_NAMES if name in args.clips]  # report order, no repeats
    if not args.clips and not args.clip and not args.real:
        parser.error("nothing to measure: name some --clips, give a --clip file or --real")
    real = [clip.path.name for clip in REAL_CLIPS] if args.real else []
    names = [*args.clips, *real, *(path.name for path in args.clip)]
    if args.strip_clip is None:
        args.strip_clip = "objects" if "objects" in names else names[0]
    elif args.strip_clip not in names:
        parser.error(f"--strip-clip {args.strip_clip} is none of the clips measured: {', '.join(names)}")
    return args


# --------------------------------------------------------------------------------------------------------------------
# Models


@dataclass
class Model:
    """One model to measure: its network (one style, ready to run: inference.network) and names."""

    letter: str
    name: str
    path: Path
    note: str
    network: StyleNetwork
    frames: dict[str, torch.Tensor] = field(default_factory=dict)  # stylized clips, by clip name


def model_name(path: Path) -> str:
    """A short name: the run folder for ``.../<run>/model.pth``, else the file's stem."""
    return path.parent.name if path.stem == "model" and path.parent.name else path.stem


def load_model(path: Path, letter: str, name: str | None, args: argparse.Namespace) -> Model:
    """The network of ``path`` ready to run in ``--precision`` on ``--device``: a multi-style one folded to
    ``--style`` (FaststyleError without one)."""
    from evaluation.runs import load_model_network

    network = load_model_network(
        path,
        style=args.style,
        device=args.device,
        precision=args.precision,
        channels_last="auto",
        style_option="--style",
    )
    meta = network.meta
    if network.choice is not None:
        what = f"style {network.choice.label}"
    else:
        what = str(meta.get("style_stem") or meta.get("style") or "one style")
    steps = meta.get("steps")
    note = f"{path} ({what}{f', {steps} steps' if steps is not None else ''})"
    return Model(letter, name or model_name(path), path, note, network)


def stylize_frames(network: StyleNetwork, frames: torch.Tensor, batch: int) -> torch.Tensor:
    """``frames`` (T, 3, H, W) through ``network``, ``batch`` frames a call; float32 on the CPU, rounded to 8 bits
    like every image faststyle writes (``data.io.to_uint8``)."""
    import torch

    from data.io import to_uint8

    return torch.cat(
        [to_uint8(network(frames[lo : lo + batch])).float().div_(255.0) for lo in range(0, len(frames), batch)]
    )


def blend_frames(frames: torch.Tensor, stylized: torch.Tensor, alpha: float) -> tuple[torch.Tensor, float]:
    """``stylized`` (T, 3, H, W) in [0, 1] as stylize's ``video_blend=alpha`` writes it for the input ``frames``,
    and the blend's seconds (flow, mask and warp; the network's time excluded)."""
    import time

    import torch

    from data.io import to_uint8
    from inference.steady import FlowBlend

    blend = FlowBlend(alpha)
    out, seconds = [], 0.0
    for source, image in zip(frames, stylized, strict=True):
        source8 = to_uint8(source).permute(1, 2, 0).contiguous().numpy()
        image8 = to_uint8(image).permute(1, 2, 0).contiguous().numpy()
        start = time.perf_counter()
        blended = blend(source8, image8)
        seconds += time.perf_counter() - start
        out.append(torch.from_numpy(blended).permute(2, 0, 1).float().div_(255.0))
    return torch.stack(out), seconds


# --------------------------------------------------------------------------------------------------------------------
# The report


@dataclass
class ClipResult:
    """One clip's flows and masks, and the errors of the input and of each model (by letter) with each flow."""

    clip: Clip
    flows: dict[str, tuple[torch.Tensor, torch.Tensor]]  # "estimated" / "exact" -> (backward, mask)
    cuts: dict[str, torch.Tensor] = field(default_factory=dict)  # flow kind -> the pairs left out (shot_cuts)
    errors: dict[str, dict[str, WarpingError]] = field(default_factory=dict)  # flow kind -> column -> error


def measure_clip(clip: Clip, method: str) -> ClipResult:
    """Estimate ``clip``'s flow and masks once (and take its exact ones where known), and its input's own error."""
    from evaluation.warping import estimate_flows, input_error, non_occlusion_mask

    backward, forward = estimate_flows(clip.frames, method)
    flows = {"estimated": (backward, non_occlusion_mask(backward, forward))}
    if clip.backward is not None and clip.forward is not None:
        flows["exact"] = (clip.backward, non_occlusion_mask(clip.backward, clip.forward))
    result = ClipResult(clip, flows)
    for kind, (flow, mask) in flows.items():
        error, result.cuts[kind] = input_error(clip.frames, flow, mask)
        result.errors[kind] = {"input": error}
    return result


def add_model(result: ClipResult, letter: str, frames: torch.Tensor) -> None:
    """The warping error of one model's stylized ``frames`` of ``result.clip``, with every flow of the clip."""
    from evaluation.warping import warping_error

    for kind, (flow, mask) in result.flows.items():
        result.errors[kind][letter] = warping_error(frames, flow, mask, cuts=result.cuts[kind])


def _number(value: float) -> str:
    return f"{SCALE * value:.3g}" if math.isfinite(value) else "n/a"


def _value(error: WarpingError) -> str:
    return _number(error.value)


def _ratio(a: float, b: float) -> str:
    return f"{b / a:.3f}" if a > 0 and math.isfinite(a) and math.isfinite(b) else "n/a"


def table(results: list[ClipResult], models: list[Model], method: str) -> str:
    """The Markdown table: a row per clip and flow, the mean over clips; columns input, models, ratios to A."""
    letters = [m.letter for m in models]
    ratios = [f"{letter}/{letters[0]}" for letter in letters[1:]]
    header = ["clip", "flow", "mask", "input (floor)", *letters, *ratios]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    flow_label = {"estimated": method, "exact": "exact"}
    for result in results:
        for i, (kind, errors) in enumerate(result.errors.items()):
            first = result.clip.description if i == 0 else ""
            cuts = errors["input"].cuts
            kept = f"{100 * errors['input'].coverage:.1f} %" + (
                f", {cuts} cut{'s' * (cuts > 1)} left out" if cuts else ""
            )
            cells = [first, flow_label[kind], kept, _value(errors["input"])]
            cells += [_value(errors[letter]) for letter in letters]
            cells += [_ratio(errors[letters[0]].value, errors[letter].value) for letter in letters[1:]]
            lines.append("| " + " | ".join(cells) + " |")
    real = [r for r in results if r.clip.backward is None]
    synthetic = [r for r in results if r.clip.backward is not None]
    groups = [("synthetic clips", synthetic), ("real clips", real)] if real and synthetic else [("clips", results)]
    for label, group in groups:
        means = {
            column: sum(r.errors["estimated"][column].value for r in group) / len(group)
            for column in ["input", *letters]
        }
        cells = [f"**mean over {label}**", flow_label["estimated"], "", _number(means["input"])]
        cells += [f"**{_number(means[letter])}**" for letter in letters]
        cells += [f"**{_ratio(means[letters[0]], means[letter])}**" for letter in letters[1:]]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def style_losses(
    loss: torch.nn.Module, clips: list[Clip], models: list[Model], batch: int, device: torch.device
) -> dict[str, dict]:
    """clip name -> column letter -> the mean style loss of that column's frames t = STYLE_EVERY - 1, 2 *
    STYLE_EVERY - 1, ... against the input frames (``loss``: a PerceptualLoss on ``device`` with its style target)."""
    import torch

    losses: dict[str, dict] = {}
    for clip in clips:
        picked = list(range(STYLE_EVERY - 1, len(clip.frames), STYLE_EVERY)) or [len(clip.frames) - 1]
        losses[clip.name] = {}
        for model in models:
            frames, total = model.frames[clip.name], 0.0
            with torch.no_grad():
                for lo in range(0, len(picked), batch):
                    chosen = picked[lo : lo + batch]
                    terms = loss(frames[chosen].to(device), clip.frames[chosen].to(device))
                    total += float(terms["style"]) * len(chosen)  # the loss averages over its batch
            losses[clip.name][model.letter] = total / len(picked)
    return losses


def style_table(losses: dict[str, dict], results: list[ClipResult], models: list[Model], source: str) -> str:
    """The --style-loss table: a row per clip, then the mean over clips, each column's style loss over A's."""
    letters = [m.letter for m in models]
    header = ["clip", f"style loss of {letters[0]}", *(f"{letter}/{letters[0]}" for letter in letters[1:])]
    lines = [
        f"\nStyle loss of each column's frames ({source}; one frame in {STYLE_EVERY}), as a ratio to "
        f"{letters[0]}'s: above 1, the frames hold less of the style's texture.\n",
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
    ]
    for result in results:
        row = losses[result.clip.name]
        cells = [result.clip.description, f"{row[letters[0]]:.4g}"]
        lines.append("| " + " | ".join(cells + [_ratio(row[letters[0]], row[x]) for x in letters[1:]]) + " |")
    means = {x: sum(row[x] for row in losses.values()) / len(losses) for x in letters}
    cells = ["**mean over clips**", f"{means[letters[0]]:.4g}"]
    lines.append("| " + " | ".join(cells + [f"**{_ratio(means[letters[0]], means[x])}**" for x in letters[1:]]) + " |")
    return "\n".join(lines) + "\n"


def training_style_loss(path: Path, device: torch.device) -> tuple[torch.nn.Module, str]:
    """The training loss of the run whose model file is ``path`` (its folder holds .hydra/config.yaml), with its
    style target; FaststyleError, saying what to do, for a model outside a run folder or with several styles."""
    from core.errors import FaststyleError
    from evaluation.measures import training_loss
    from evaluation.runs import load_run

    run_dir = path.parent
    if not (run_dir / ".hydra" / "config.yaml").is_file():
        raise FaststyleError(
            f"--style-loss needs A's training run: no .hydra/config.yaml beside {path} (give the model.pth of a "
            "run folder first, or leave --style-loss out)"
        )
    run = load_run(run_dir, run_dir.name, device)
    if run.styles > 1:
        raise FaststyleError(f"--style-loss measures one-style runs; {run_dir} holds {run.styles} styles")
    return training_loss(run, device), f"the training loss of {run_dir.name}, style {Path(str(run.cfg.style)).name}"


def header_text(models: list[Model], policy: PrecisionPolicy, method: str, args: argparse.Namespace) -> str:
    """What the table measures, how the models ran, and which model each letter is."""
    width, height = args.size
    listed = "\n".join(f"- {m.letter} = {m.name}: {m.note}" for m in models)
    clips = f"the synthetic clips are {args.frames} frames of {width}x{height}; " if args.clips else ""
    return (
        f"Warping error E_warp (Lai et al. 2018) x {SCALE:g}, lower is steadier: RGB in [0, 1], squared difference "
        "averaged over the 3 channels and over the pixels of the non-occlusion mask (Ruder et al. 2016; 'mask' = "
        f"share of pixels kept), then over a clip's frame pairs ({clips}flow of the input frames: {method}, and "
        "the generator's exact one where known; a pair whose mask keeps under 30 % of the frame or whose input error "
        "is over 20x the clip's median is a cut between shots and left out). 'input': the unstylized clip's own "
        f"error, about the floor a perfectly steady stylization would reach.\nStylized with {policy.describe()}.\n"
        f"{listed}\n\n"
    )


# --------------------------------------------------------------------------------------------------------------------
# Frames


def save_clips(folder: Path, results: list[ClipResult], models: list[Model]) -> None:
    """Every clip's frames as PNG sequences: folder/<clip>/input/000.png, folder/<clip>/<letter>/000.png, ..."""
    from data.io import save_image

    for result in results:
        clip = result.clip
        for label, frames in [("input", clip.frames), *((m.letter, m.frames[clip.name]) for m in models)]:
            target = folder / clip.name / label
            target.mkdir(parents=True, exist_ok=True)
            for t, frame in enumerate(frames):
                save_image(frame, target / f"{t:03d}.png")


# --------------------------------------------------------------------------------------------------------------------
# Running it


def make_clips(names: list[str], size: tuple[int, int], frames: int) -> list[Clip]:
    from evaluation.clips import default_clips

    return [clip for clip in default_clips(size, frames) if clip.name in names] if names else []


def measure(
    clips: list[Clip], models: list[Model], blended: list[Model], args: argparse.Namespace
) -> tuple[list[ClipResult], float]:
    """Every clip's flows, then each model's stylized frames and errors (and each blended model's, whose frames
    are the plain model's blended); returns the results and the blend's milliseconds per frame (0 without)."""
    results, blend_seconds, blend_count = [], 0.0, 0
    for clip in clips:
        result = measure_clip(clip, args.flow)
        for model in models:
            model.frames[clip.name] = stylize_frames(model.network, clip.frames, args.batch)
            add_model(result, model.letter, model.frames[clip.name])
        for model, plain in zip(blended, models[: len(blended)], strict=True):
            model.frames[clip.name], seconds = blend_frames(clip.frames, plain.frames[clip.name], args.blend)
            add_model(result, model.letter, model.frames[clip.name])
            blend_seconds, blend_count = blend_seconds + seconds, blend_count + len(clip.frames)
        results.append(result)
    return results, 1000 * blend_seconds / max(blend_count, 1)


def run(args: argparse.Namespace) -> str:
    """Measure (module docstring) and return the report's text; writes the strip and the frames when asked."""
    from core.cli import absolute_user_path, check_output_file
    from core.errors import FaststyleError
    from core.precision import configure_backends
    from data.io import WRITE_FORMATS, save_image
    from evaluation.clips import file_clip
    from evaluation.figures import frame_strip
    from evaluation.real_clips import shipped_clips
    from evaluation.warping import import_cv2

    import_cv2("the video stability report")  # before any work: without OpenCV there is nothing to measure
    paths = [absolute_user_path(path) for path in args.models]
    for path in paths:
        if not path.is_file():
            raise FaststyleError(f"model not found: {path}")
    strip = absolute_user_path(args.strip) if args.strip is not None else None
    if strip is not None:  # the report's own picture: replaced when it exists
        inputs = {f"model {i + 1}": path for i, path in enumerate(paths)}
        check_output_file(strip, inputs, True, "--strip", "video_strip.jpg", WRITE_FORMATS)
    letters = string.ascii_uppercase
    if len(paths) > len(letters):
        raise FaststyleError(f"at most {len(letters)} models at a time, got {len(paths)}")
    names = args.names or [None] * len(paths)
    models = [load_model(path, letters[i], names[i], args) for i, path in enumerate(paths)]
    policy = models[0].network.policy
    configure_backends(policy)
    device = models[0].network.device
    if args.style_loss:  # before the long part: a model outside a run folder is refused at once
        style_loss, style_source = training_style_loss(paths[0], device)

    blended = []
    if args.blend is not None:
        note = f"{{}} with stylize's video_blend={args.blend:g} (inference/steady.py)"
        blended = [Model(f"{m.letter}b", f"{m.name}+blend", m.path, note.format(m.letter), m.network) for m in models]
    clips = make_clips(args.clips, args.size, args.frames)
    files = [*(shipped_clips() if args.real else []), *(absolute_user_path(path) for path in args.clip)]
    clips += [file_clip(path, args.size, args.frames) for path in files]
    results, blend_ms = measure(clips, models, blended, args)

    models = models + blended
    text = header_text(models, policy, args.flow, args) + table(results, models, args.flow)
    if args.style_loss:
        losses = style_losses(style_loss, clips, models, args.batch, device)
        text += style_table(losses, results, models, style_source)
    if blended:
        text += f"\nvideo_blend: {blend_ms:.1f} ms per frame on these clips (flow, mask and warp; the network's time "
        text += "is not included)\n"
    if strip is not None:
        chosen = next(r for r in results if r.clip.name == args.strip_clip)
        rows = [("input", chosen.clip.frames), *((f"{m.letter}: {m.name}", m.frames[chosen.clip.name]) for m in models)]
        save_image(frame_strip(rows, *chosen.flows["estimated"], args.strip_frames), strip)
        text += f"\nwrote {strip} ({args.strip_clip}, {args.strip_frames} frames per row)\n"
    if args.save_clips is not None:
        folder = absolute_user_path(args.save_clips)
        save_clips(folder, results, models)
        text += f"wrote the frames to {folder}/<clip>/<input|A|B...>/NNN.png\n"
    return text


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)

    def work() -> None:
        print(run(args), end="")

    return run_tool(work)


if __name__ == "__main__":
    raise SystemExit(main())
