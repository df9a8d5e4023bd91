"""How much a style network flickers on video: the warping error of Lai et al. 2018 on test clips with known motion.

    python -m scripts.video_stability outputs/train/<date>/<time>-<style>/model.pth
    python -m scripts.video_stability plain/model.pth temporal/model.pth --names plain temporal --strip
    python -m scripts.video_stability multi/model.pth --style hokusai_great_wave --size 256x256 --frames 30

A per-frame network turns the small changes between video frames into changes of its texture: flicker. This report
stylizes three clips made at run time from the held-out photos (scripts/video_clips.py: a pan with sub-pixel steps,
a zoom, objects moving over a background and occluding it) with each model and prints, per clip and model, the
warping error of Lai et al. 2018 ("Learning Blind Video Temporal Consistency", ECCV 2018):

    E_warp = mean over t of  sum_p M_t(p) * D_t(p) / sum_p M_t(p),
    D_t(p) = mean over RGB of (O_t(p) - O_{t-1}(p + b_t(p)))^2,   O in [0, 1]

where b_t is the optical flow of the *input* frames from t to t - 1 (backward warping, bilinear) and M_t the
non-occlusion mask of Ruder et al. 2016 ("Artistic style transfer for videos", GCPR 2016): forward-backward flow
consistency and motion boundaries, plus the pixels whose flow leaves the frame. Printed x 1000. Lower is steadier;
a stylization that moved exactly with the video would score about the input clip's own error ("input" column: the
floor that the warp's bilinear interpolation and the flow's errors leave; it depends on the image's detail), not 0.

The flow is estimated once per clip on the input frames (8-bit grayscale) with OpenCV (``--flow``: DIS, or
Farneback) and reused for every model. The clips' true motion is known, so each clip also gets a row with the
exact flow: where the two rows agree, the estimated flow is not what the numbers measure. The last row is the mean
over clips (estimated flow); with several models, B/A (and C/A, ...) is each model's error over the first's.

Models: faststyle ``model.pth`` files or pytorch/examples state dicts (``interop.legacy.load_any_model``); a
multi-style model runs the one-style network of ``--style`` (``TransformerNet.for_style``, as stylize does). Frames
go through the network directly, ``--batch`` at a time, in ``--precision`` (default fp32) on ``--device`` (default
cpu), and are rounded to 8 bits as every image faststyle writes.

``--strip [PATH]`` (default outputs/reports/video_stability/strip.jpg): a picture for the README: a few
consecutive frames of one clip (``--strip-clip``), one row for the input and one per model, each row ending with its
warping-error map of the last frame shown (sqrt(D_t), x4; blue where the mask leaves pixels out).
``--save-clips [DIR]`` (default outputs/reports/video_stability/clips): every clip's input and stylized frames as
PNG sequences (DIR/<clip>/input/000.png, DIR/<clip>/A/000.png, ...).

``--clip VIDEO`` (repeatable) adds a real clip: its first ``--frames`` frames, decoded by data/video.py (PyAV) and
scaled so the long side is at most ``--size``'s; it has no exact-flow row (its motion is unknown). ``--clips``
with no name leaves the synthetic clips out.

OpenCV is needed for the flow only and is not a dependency of faststyle: ``pip install opencv-python-headless``.
"""

from __future__ import annotations

import argparse
import math
import re
import string
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import numpy as np
    import torch
    from PIL import Image

    from core.precision import PrecisionPolicy
    from scripts.video_clips import Clip, WarpingError

FLOW_METHODS = ("dis-fine", "dis-medium", "farneback")
CLIP_NAMES = ("pan", "zoom", "objects")
OPENCV_HINT = "pip install opencv-python-headless"
MIN_SIDE = 32  # DIS needs a few pyramid levels of 8-pixel patches
MAX_FRAMES = 500
SCALE = 1000.0  # errors are printed x 1000
ERROR_MAP_GAIN = 4.0  # the strip's error maps show sqrt(D_t) x 4
OCCLUDED_COLOUR = (0.2, 0.35, 0.9)  # the strip's error maps: pixels the mask leaves out
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
    from scripts.video_clips import DEFAULT_FRAMES, DEFAULT_SIZE

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
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
        "--flow",
        choices=FLOW_METHODS,
        default=FLOW_METHODS[0],
        help="optical flow: OpenCV DIS (fine: the MEDIUM preset at full resolution; medium: the preset) or "
        "Farneback (default dis-fine)",
    )
    parser.add_argument("--device", default="cpu", help="where the networks run: cpu (default), cuda, mps, auto")
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
    if args.names is not None and len(args.names) != len(args.models):
        parser.error(f"--names: {len(args.names)} names for {len(args.models)} models")
    if args.strip is not None and not 1 <= args.strip_frames < args.frames:
        parser.error(f"--strip-frames must be between 1 and --frames - 1 ({args.frames - 1}), got {args.strip_frames}")
    args.clips = [name for name in CLIP_NAMES if name in args.clips]  # report order, no repeats
    if not args.clips and not args.clip:
        parser.error("nothing to measure: name some --clips or give a --clip file")
    names = [*args.clips, *(path.name for path in args.clip)]
    if args.strip_clip is None:
        args.strip_clip = "objects" if "objects" in names else names[0]
    elif args.strip_clip not in names:
        parser.error(f"--strip-clip {args.strip_clip} is none of the clips measured: {', '.join(names)}")
    return args


# --------------------------------------------------------------------------------------------------------------------
# Optical flow (OpenCV)


def import_cv2():
    """OpenCV, or a FaststyleError saying how to install it (it is an optional dependency of this report only)."""
    from core.errors import FaststyleError

    try:
        import cv2
    except ImportError:
        raise FaststyleError(f"the video stability report needs OpenCV for the optical flow: {OPENCV_HINT}") from None
    return cv2


def flow_function(method: str) -> Callable[[np.ndarray, np.ndarray], np.ndarray]:
    """``calc(first, second)`` -> (H, W, 2) float32 flow mapping each pixel of ``first`` into ``second`` (8-bit
    grayscale frames). "dis-fine" is DIS's MEDIUM preset run down to the full-resolution pyramid level (OpenCV's
    presets stop at MEDIUM, whose finest level is half resolution); it follows the objects' edges much better."""
    cv2 = import_cv2()
    if method == "farneback":
        return lambda first, second: cv2.calcOpticalFlowFarneback(first, second, None, 0.5, 4, 15, 3, 5, 1.2, 0)
    dis = cv2.DISOpticalFlow_create(cv2.DISOPTICAL_FLOW_PRESET_MEDIUM)
    if method == "dis-fine":
        dis.setFinestScale(0)
    elif method != "dis-medium":
        raise ValueError(f"unknown flow method {method!r}")
    return lambda first, second: dis.calc(first, second, None)


def grayscale(frame: torch.Tensor) -> np.ndarray:
    """A (3, H, W) frame in [0, 1] as the (H, W) uint8 luma OpenCV's flow takes."""
    cv2 = import_cv2()
    from data.io import to_uint8

    rgb = to_uint8(frame).permute(1, 2, 0).contiguous().numpy()
    return cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)


def estimate_flows(frames: torch.Tensor, method: str = FLOW_METHODS[0]) -> tuple[torch.Tensor, torch.Tensor]:
    """(backward, forward) flows (T - 1, 2, H, W) of ``frames`` (T, 3, H, W): entry t - 1 holds frame t's flow to
    t - 1 and frame t - 1's flow to t (scripts/video_clips.py, "Flow convention")."""
    import torch

    calc = flow_function(method)
    gray = [grayscale(frame) for frame in frames]

    def flow(first: int, second: int) -> torch.Tensor:
        return torch.from_numpy(calc(gray[first], gray[second])).permute(2, 0, 1).float()

    backward = torch.stack([flow(t, t - 1) for t in range(1, len(gray))])
    forward = torch.stack([flow(t - 1, t) for t in range(1, len(gray))])
    return backward, forward


# --------------------------------------------------------------------------------------------------------------------
# Models


@dataclass
class Stylizer:
    """One model to measure: its network (one style, on the device, in the policy's precision) and names."""

    letter: str
    name: str
    path: Path
    note: str
    net: torch.nn.Module
    frames: dict[str, torch.Tensor] = field(default_factory=dict)  # stylized clips, by clip name


def model_name(path: Path) -> str:
    """A short name: the run folder for ``.../<run>/model.pth``, else the file's stem."""
    return path.parent.name if path.stem == "model" and path.parent.name else path.stem


def load_stylizer(
    path: Path, letter: str, name: str | None, style: str | None, device: torch.device, policy: PrecisionPolicy
) -> Stylizer:
    """The network of ``path`` ready to run: a multi-style one folded to ``style`` (FaststyleError without one)."""
    import torch

    from core.errors import FaststyleError
    from interop.read import read_torch_model_file as load_any_model
    from models.styles import parse_style, style_names

    net, meta = load_any_model(path, device="cpu")
    if net.num_styles > 1:
        names = style_names(meta, net.num_styles)
        if style is None:
            raise FaststyleError(f"{path} holds {net.num_styles} styles: pick one with --style ({', '.join(names)})")
        choice = parse_style(style, names)
        net = net.for_style(torch.tensor(choice.weights, dtype=torch.float32))
        what = f"style {choice.label}"
    else:
        what = str(meta.get("style_stem") or meta.get("style") or "one style")
    steps = meta.get("steps")
    note = f"{path} ({what}{f', {steps} steps' if steps is not None else ''})"
    net = policy.prepare_module(net.eval(), device)
    return Stylizer(letter, name or model_name(path), path, note, net)


def stylize(net: torch.nn.Module, frames: torch.Tensor, policy: PrecisionPolicy, device: torch.device, batch: int):
    """``frames`` (T, 3, H, W) through ``net``, ``batch`` frames a call; float32 on the CPU, rounded to 8 bits like
    every image faststyle writes (``data.io.to_uint8``)."""
    import torch

    from data.io import to_uint8

    out = []
    with torch.inference_mode():
        for lo in range(0, frames.shape[0], batch):
            y = net(policy.batch_to(frames[lo : lo + batch], device))
            out.append(to_uint8(y).cpu().float().div_(255.0))
    return torch.cat(out)


# --------------------------------------------------------------------------------------------------------------------
# The report


@dataclass
class ClipResult:
    """One clip's flows and masks, and the errors of the input and of each model (by letter) with each flow."""

    clip: Clip
    flows: dict[str, tuple[torch.Tensor, torch.Tensor]]  # "estimated" / "exact" -> (backward, mask)
    errors: dict[str, dict[str, WarpingError]] = field(default_factory=dict)  # flow kind -> column -> error


def measure_clip(clip: Clip, method: str) -> ClipResult:
    """Estimate ``clip``'s flow and masks once (and take its exact ones where known), and its input's own error."""
    from scripts.video_clips import non_occlusion_mask, warping_error

    backward, forward = estimate_flows(clip.frames, method)
    flows = {"estimated": (backward, non_occlusion_mask(backward, forward))}
    if clip.backward is not None and clip.forward is not None:
        flows["exact"] = (clip.backward, non_occlusion_mask(clip.backward, clip.forward))
    result = ClipResult(clip, flows)
    for kind, (flow, mask) in flows.items():
        result.errors[kind] = {"input": warping_error(clip.frames, flow, mask)}
    return result


def add_model(result: ClipResult, letter: str, frames: torch.Tensor) -> None:
    """The warping error of one model's stylized ``frames`` of ``result.clip``, with every flow of the clip."""
    from scripts.video_clips import warping_error

    for kind, (flow, mask) in result.flows.items():
        result.errors[kind][letter] = warping_error(frames, flow, mask)


def _number(value: float) -> str:
    return f"{SCALE * value:.3g}" if math.isfinite(value) else "n/a"


def _value(error: WarpingError) -> str:
    return _number(error.value)


def _ratio(a: float, b: float) -> str:
    return f"{b / a:.3f}" if a > 0 and math.isfinite(a) and math.isfinite(b) else "n/a"


def table(results: list[ClipResult], stylizers: list[Stylizer], method: str) -> str:
    """The Markdown table: a row per clip and flow, the mean over clips; columns input, models, ratios to A."""
    letters = [s.letter for s in stylizers]
    ratios = [f"{letter}/{letters[0]}" for letter in letters[1:]]
    header = ["clip", "flow", "mask", "input (floor)", *letters, *ratios]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    flow_label = {"estimated": method, "exact": "exact"}
    for result in results:
        for i, (kind, errors) in enumerate(result.errors.items()):
            first = result.clip.description if i == 0 else ""
            cells = [first, flow_label[kind], f"{100 * errors['input'].coverage:.1f} %", _value(errors["input"])]
            cells += [_value(errors[letter]) for letter in letters]
            cells += [_ratio(errors[letters[0]].value, errors[letter].value) for letter in letters[1:]]
            lines.append("| " + " | ".join(cells) + " |")
    means = {
        column: sum(r.errors["estimated"][column].value for r in results) / len(results)
        for column in ["input", *letters]
    }
    cells = ["**mean over clips**", flow_label["estimated"], "", _number(means["input"])]
    cells += [f"**{_number(means[letter])}**" for letter in letters]
    cells += [f"**{_ratio(means[letters[0]], means[letter])}**" for letter in letters[1:]]
    lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def header_text(stylizers: list[Stylizer], policy: PrecisionPolicy, method: str, args: argparse.Namespace) -> str:
    width, height = args.size
    models = "\n".join(f"- {s.letter} = {s.name}: {s.note}" for s in stylizers)
    clips = f"the synthetic clips are {args.frames} frames of {width}x{height}; " if args.clips else ""
    return (
        f"Warping error E_warp (Lai et al. 2018) x {SCALE:g}, lower is steadier: RGB in [0, 1], squared difference "
        "averaged over the 3 channels and over the pixels of the non-occlusion mask (Ruder et al. 2016; 'mask' = "
        f"share of pixels kept), then over a clip's frame pairs ({clips}flow of the input frames: {method}, and "
        "the generator's exact one where known). 'input': the unstylized clip's own error, about the floor a "
        f"perfectly steady stylization would reach.\nStylized with {policy.describe()}.\n{models}\n\n"
    )


# --------------------------------------------------------------------------------------------------------------------
# Pictures and frames


def error_map(frames: torch.Tensor, t: int, backward: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(3, H, W) picture of sqrt(D_t) x ERROR_MAP_GAIN in grey, pixels out of the mask in OCCLUDED_COLOUR."""
    import torch

    from scripts.video_clips import backward_warp

    warped = backward_warp(frames[t - 1 : t], backward[t - 1 : t])[0]
    grey = (frames[t] - warped).pow(2).mean(dim=0).sqrt().mul(ERROR_MAP_GAIN).clamp(0, 1).expand(3, -1, -1)
    colour = torch.tensor(OCCLUDED_COLOUR).view(3, 1, 1).expand_as(grey)
    return torch.where(mask[t - 1].bool(), grey, colour)


def strip_picture(result: ClipResult, stylizers: list[Stylizer], count: int) -> Image.Image:
    """The frame strip: ``count`` consecutive frames from the middle of the clip, a row for the input and one per
    model, each row ending with its error map of its last frame (estimated flow)."""
    from data.io import tensor_to_pil
    from scripts.style_grid import draw_grid

    clip = result.clip
    first = max(1, (clip.frames.shape[0] - count) // 2)
    shown = range(first, min(first + count, clip.frames.shape[0]))
    backward, mask = result.flows["estimated"]
    rows = []
    for label, frames in [("input", clip.frames), *((f"{s.letter}: {s.name}", s.frames[clip.name]) for s in stylizers)]:
        row = [(tensor_to_pil(frames[t]), f"{label}, frame {t}" if t == first else f"frame {t}") for t in shown]
        row.append(
            (tensor_to_pil(error_map(frames, shown[-1], backward, mask)), f"error x{ERROR_MAP_GAIN:g}, blue: left out")
        )
        rows.append(row)
    picture, _ = draw_grid(rows)
    return picture


def save_clips(folder: Path, results: list[ClipResult], stylizers: list[Stylizer]) -> None:
    """Every clip's frames as PNG sequences: folder/<clip>/input/000.png, folder/<clip>/<letter>/000.png, ..."""
    from data.io import save_image

    for result in results:
        clip = result.clip
        for label, frames in [("input", clip.frames), *((s.letter, s.frames[clip.name]) for s in stylizers)]:
            target = folder / clip.name / label
            target.mkdir(parents=True, exist_ok=True)
            for t, frame in enumerate(frames):
                save_image(frame, target / f"{t:03d}.png")


def check_output(path: Path, inputs: list[Path]) -> None:
    """FaststyleError unless ``path`` is a picture file faststyle can write that is none of the models."""
    from core.errors import FaststyleError
    from core.fileio import refuse_output_among_inputs
    from data.io import WRITE_FORMATS

    if path.is_dir():
        raise FaststyleError(f"--strip {path} is a folder: give a file name, e.g. {path / 'video_strip.jpg'}")
    if path.suffix.lower() not in WRITE_FORMATS:
        raise FaststyleError(f"cannot write {path.name}: use one of the extensions {', '.join(WRITE_FORMATS)}")
    refuse_output_among_inputs(path, {f"model {i + 1}": model for i, model in enumerate(inputs)}, "--strip")


# --------------------------------------------------------------------------------------------------------------------
# Running it


def make_clips(names: list[str], size: tuple[int, int], frames: int) -> list[Clip]:
    from scripts.video_clips import default_clips

    return [clip for clip in default_clips(size, frames) if clip.name in names] if names else []


def file_clip(path: Path, size: tuple[int, int], frames: int) -> Clip:
    """The first ``frames`` frames of a video file, decoded by data/video.py (upright, scaled so the long side is at
    most ``size``'s, as stylize scales it); its motion is unknown, so it has no exact flow."""
    import contextlib

    import torch

    from core.errors import FaststyleError
    from scripts.video_clips import Clip

    try:
        from data.video import read_frames
    except ImportError as err:
        raise FaststyleError(f"--clip needs PyAV to decode video: pip install av ({err})") from None
    decoded = []
    with contextlib.closing(read_frames(path, max_side_px=max(size))) as stream:
        for frame in stream:
            decoded.append(frame.tensor())
            if len(decoded) == frames:
                break
    if len(decoded) < 2:
        raise FaststyleError(f"{path} gave {len(decoded)} frame(s): the warping error needs at least 2")
    width, height = decoded[0].shape[-1], decoded[0].shape[-2]
    text = f"{path.name}, frames 0-{len(decoded) - 1} at {width}x{height}"
    return Clip(path.name, text, torch.stack(decoded))


def run(args: argparse.Namespace) -> str:
    """Measure (module docstring) and return the report's text; writes the strip and the frames when asked."""
    import_cv2()  # before any work: without OpenCV there is nothing to measure
    from core.cli import absolute_user_path
    from core.device import resolve_device
    from core.errors import FaststyleError
    from core.precision import configure_backends, resolve_precision

    models = [absolute_user_path(path) for path in args.models]
    for path in models:
        if not path.is_file():
            raise FaststyleError(f"model not found: {path}")
    strip = absolute_user_path(args.strip) if args.strip is not None else None
    if strip is not None:
        check_output(strip, models)
    device = resolve_device(args.device)
    policy = resolve_precision(device, args.precision, "auto", False, training=False)
    configure_backends(policy)
    letters = string.ascii_uppercase
    if len(models) > len(letters):
        raise FaststyleError(f"at most {len(letters)} models at a time, got {len(models)}")
    names = args.names or [None] * len(models)
    stylizers = [load_stylizer(path, letters[i], names[i], args.style, device, policy) for i, path in enumerate(models)]

    results = []
    clips = make_clips(args.clips, args.size, args.frames)
    clips += [file_clip(absolute_user_path(path), args.size, args.frames) for path in args.clip]
    for clip in clips:
        result = measure_clip(clip, args.flow)
        for stylizer in stylizers:
            stylizer.frames[clip.name] = stylize(stylizer.net, clip.frames, policy, device, args.batch)
            add_model(result, stylizer.letter, stylizer.frames[clip.name])
        results.append(result)

    text = header_text(stylizers, policy, args.flow, args) + table(results, stylizers, args.flow)
    if strip is not None:
        from data.io import save_image

        chosen = next(r for r in results if r.clip.name == args.strip_clip)
        save_image(strip_picture(chosen, stylizers, args.strip_frames), strip)
        text += f"\nwrote {strip} ({args.strip_clip}, {args.strip_frames} frames per row)\n"
    if args.save_clips is not None:
        folder = absolute_user_path(args.save_clips)
        save_clips(folder, results, stylizers)
        text += f"wrote the frames to {folder}/<clip>/<input|A|B...>/NNN.png\n"
    return text


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from core.errors import FaststyleError, exit_with_error

    try:
        text = run(args)
    except FaststyleError as err:
        exit_with_error(err)
    print(text, end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
