"""Video benchmark: frames/s and the real-time factor of stylizing a clip, per frame size and precision.

    python -m benchmarks video                                      # 640x360 and 1280x720; fp32 and auto's choice
    python -m benchmarks video --sizes 1920x1080 --frames 30 --precisions fp32,bf16
    python -m benchmarks video --device cuda                        # a GPU (network rows only without PyAV)
    python -m benchmarks video --long 1500                          # also peak RSS: 1500 frames vs --frames
    python -m benchmarks video --blend 0.7                          # also stylize's video_blend: its cost per frame
    flock /tmp/faststyle-cpu.lock python -m benchmarks video        # serialised with other benchmarks

For each size, a 30 fps test clip is made once: a camera pan over an embedded photo, encoded as H.264 (CRF 18) by
data/video.py. Then, per precision (``fp32``, ``bf16``, ``fp16``, ``auto``: what stylize's precision=auto picks on
the device, core.precision):

- ``network``: the stylize network alone on frames already decoded in memory (``Runner.stylize_pixels``, batches
  of ``--batch-size``: 8-bit pixels in, network, colors, 8-bit pixels out): the cost a frame pays for the style.
- ``end to end``: ``inference.pipeline.stylize`` on the clip file, as ``python stylize.py input=clip.mp4`` runs it
  once the model is loaded: decode, network, colors, H.264 encode and mux, in a fresh process (its peak RSS is
  its own). frames/s and the real-time factor (clip seconds per wall-clock second; >= 1 keeps up with playback).
- ``I/O alone`` (once per size): decode and re-encode with no network: the ceiling the end-to-end figure can reach.

``--blend ALPHA`` adds, per size, ``video_blend`` alone (inference/steady.py on the decoded frames: the optical flow
both ways, the occlusion mask, the warps and the band-wise blend; the network's time excluded) and, per precision, an
end-to-end run with ``video_blend=ALPHA``: what the steadier video costs next to the plain end-to-end row.

``--long N`` adds an end-to-end run on an N-frame clip of the first size: its peak RSS next to the short clip's
shows that memory does not grow with the clip's length (frames are streamed).

Weights do not change speed, so a randomly initialised TransformerNet is used unless ``--model`` gives a model.pth.
Figures are printed, never asserted.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from fractions import Fraction
from pathlib import Path

import torch

from benchmarks.common import (
    REPO_ROOT,
    peak_rss_mb,
    precision_line,
    run_worker,
    save_random_model,
    time_call,
)
from core.cli import add_device_option, tool_parser
from core.device import environment_line

PHOTO = REPO_ROOT / "data" / "samples" / "content" / "chelsea.jpg"
FPS = 30
PAN_PX_PER_FRAME = 3


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--sizes", default="640x360,1280x720", help="comma-separated WxH frame sizes")
    parser.add_argument("--frames", type=int, default=60, help="frames of each test clip (2 s at 30 fps)")
    parser.add_argument("--precisions", default="fp32,auto", help="comma-separated: fp32, bf16, fp16, auto")
    add_device_option(parser)
    parser.add_argument("--base-width", type=int, default=32, help="TransformerNet width (32: Johnson et al.)")
    parser.add_argument("--model", default=None, help="a model.pth to time instead of a random network")
    parser.add_argument("--batch-size", type=int, default=4, help="frames per network call (stylize batch_size)")
    parser.add_argument("--long", type=int, default=0, help="also run an N-frame clip end to end (peak RSS)")
    parser.add_argument("--blend", type=float, default=0.0, help="also time stylize's video_blend=ALPHA (0: not)")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)  # internal: one end-to-end run (JSON)


def _sizes(text: str) -> list[tuple[int, int]]:
    sizes = []
    for item in text.split(","):
        width, _, height = item.strip().lower().partition("x")
        if not (width.isdigit() and height.isdigit()) or int(width) % 2 or int(height) % 2:
            raise SystemExit(f"error: --sizes: {item!r} is not an even WxH size, e.g. 1280x720")
        sizes.append((int(width), int(height)))
    return sizes


def _has_pyav() -> bool:
    try:
        import av  # noqa: F401
    except ImportError:
        return False
    return True


def _model_file(args: argparse.Namespace, folder: Path) -> Path:
    """``--model``, else a random TransformerNet saved in our format (what stylize loads)."""
    if args.model:
        return Path(args.model).resolve()
    return save_random_model(folder / "model.pth", args.base_width)


def _pan_frames(width: int, height: int, count: int):
    """``count`` (H, W, 3) uint8 frames of a window moving PAN_PX_PER_FRAME pixels right per frame over PHOTO."""
    import numpy as np

    from data.io import load_image, resize_to

    photo = load_image(PHOTO)
    travel = PAN_PX_PER_FRAME * count
    scale = max((width + travel) / photo.width, height / photo.height)
    canvas = np.asarray(resize_to(photo, round(photo.width * scale) + 1, round(photo.height * scale) + 1))
    top = (canvas.shape[0] - height) // 2
    for t in range(count):
        left = (PAN_PX_PER_FRAME * t) % max(1, canvas.shape[1] - width)
        yield np.ascontiguousarray(canvas[top : top + height, left : left + width])


def make_clip(path: Path, width: int, height: int, count: int) -> Path:
    """Encode the pan clip (H.264 CRF 18, FPS frames per second) to ``path`` with data/video.py's writer."""
    from data.video import VideoSettings, open_video_writer

    settings = VideoSettings(width=width, height=height, frame_rate=Fraction(FPS), time_base=Fraction(1, FPS), crf=18)
    with open_video_writer(path, settings) as writer:
        for t, frame in enumerate(_pan_frames(width, height, count)):
            writer.write(frame, t)
    return path


def bench_network(net: torch.nn.Module, device: torch.device, precision: str, size: tuple[int, int], batch: int):
    """frames/s of the Runner alone on decoded frames (median of 3 timed calls after a warm-up), and the policy."""
    import numpy as np

    from configs.schema import compose_stylize_config
    from inference.runner import Runner

    width, height = size
    # stylize's own defaults; a budget no frame exceeds keeps it untiled (the stylize benchmark times the tiled
    # executor).
    cfg = compose_stylize_config([f"precision={precision}", "max_memory_mb=1000000000"])
    runner = Runner.from_module(net, device, cfg)
    frames = torch.from_numpy(np.stack(list(_pan_frames(width, height, batch))))

    def call() -> None:
        runner.stylize_pixels(frames)  # what a video frame pays: 8-bit in, network, colors, 8-bit out

    return batch / time_call(call, device, warmup=1, repeats=3), runner.policy.describe()


def _worker(args: argparse.Namespace) -> dict:
    """One end-to-end run in this (fresh) process: spec = {"model", "clip", "out", "precision", "io_only"}."""
    spec = json.loads(args.worker)
    from data.video import VideoReader, VideoSettings, open_video_writer

    start = time.perf_counter()
    if spec["io_only"]:  # decode and re-encode, no network
        with VideoReader(spec["clip"]) as reader:
            info = reader.info
            settings = VideoSettings.like(reader, info.width, info.height, crf=18)
            with open_video_writer(spec["out"], settings) as writer:
                count = 0
                for frame in reader.frames((info.width, info.height)):
                    writer.write(frame.pixels, frame.pts)
                    count += 1
        frames, seconds = count, count / float(info.frame_rate)
    else:
        from configs.schema import compose_stylize_config
        from inference.pipeline import stylize

        cfg = compose_stylize_config(
            [
                f"model={spec['model']}",
                f"input={spec['clip']}",
                f"output={spec['out']}",
                f"device={spec['device']}",
                f"precision={spec['precision']}",
                f"batch_size={spec['batch_size']}",
                f"video_blend={spec.get('video_blend', 0.0)}",
            ]
        )
        summary = stylize(cfg)
        if summary.failed:
            raise SystemExit(f"stylize failed: {summary.failed}")
        frames, seconds = summary.video_frames, summary.video_seconds
    wall = time.perf_counter() - start
    return {"frames": frames, "seconds": seconds, "wall_s": wall, "peak_mb": peak_rss_mb()}


def _spawn(spec: dict) -> dict | None:
    """One run in a fresh process (common.run_worker): _worker's figures, or None (the failure is printed)."""
    result, stderr = run_worker("video", ["--worker", json.dumps(spec)])
    if result is None:
        print(f"# end-to-end run failed: {stderr.strip()[-1500:]}")
    return result


def bench_blend(alpha: float, size: tuple[int, int], count: int) -> float:
    """frames/s of inference/steady.py's FlowBlend alone over ``count`` pan frames (the frames stand in for the
    network's output too: the cost does not depend on it), after one warm-up frame pair."""
    from inference.steady import FlowBlend

    frames = list(_pan_frames(*size, count))
    blend = FlowBlend(alpha)
    blend(frames[0], frames[0])
    start = time.perf_counter()
    for frame in frames[1:]:
        blend(frame, frame)
    return (len(frames) - 1) / (time.perf_counter() - start)


def _end_to_end(
    args: argparse.Namespace, model: Path, clip: Path, out: Path, precision: str, blend: float = 0.0
) -> dict | None:
    """stylize ``clip`` into ``out`` in a fresh worker process (figures as _worker returns them, None if it failed)."""
    spec = {
        "model": str(model),
        "clip": str(clip),
        "out": str(out),
        "device": args.device,
        "precision": precision,
        "batch_size": args.batch_size,
        "video_blend": blend,
        "io_only": False,
    }
    return _spawn(spec)


def run(args: argparse.Namespace) -> int:
    # Long: the table's rows in the order they print (per size: I/O alone, then per precision network and end to end).
    if args.worker:
        print(json.dumps(_worker(args)))
        return 0
    from core.device import resolve_device, reuse_freed_memory
    from interop.read import read_model_file

    reuse_freed_memory()  # as stylize does by default (malloc_reuse): the network rows must not page-fault more
    device = resolve_device(args.device)
    sizes = _sizes(args.sizes)
    precisions = [p.strip() for p in args.precisions.split(",") if p.strip()]
    print(environment_line(device))
    print(precision_line(device))
    pyav = _has_pyav()
    if not pyav:
        print("# PyAV (av) is not installed here: network rows only (pip install av for the end-to-end rows)")
    print(
        f"# {args.frames}-frame {FPS} fps clips (a pan over {PHOTO.name}), batch {args.batch_size}, "
        f"{'model ' + args.model if args.model else f'random TransformerNet, base width {args.base_width}'}"
    )
    with tempfile.TemporaryDirectory(prefix="faststyle-bench-video-") as tmp:
        folder = Path(tmp)
        model = _model_file(args, folder)
        net, _ = read_model_file(model, device="cpu")
        print("| size | precision | what | frames/s | real-time factor | peak RSS MiB | policy |")
        print("|---|---|---|---:|---:|---:|---|")
        for width, height in sizes:
            label = f"{width}x{height}"
            clip = make_clip(folder / f"clip_{label}.mp4", width, height, args.frames) if pyav else None
            if clip is not None:
                io = _spawn({"clip": str(clip), "out": str(folder / f"io_{label}.mp4"), "io_only": True})
                if io:
                    fps = io["frames"] / io["wall_s"]
                    print(f"| {label} | - | I/O alone | {fps:.1f} | {fps / FPS:.2f} | {io['peak_mb']:.0f} | |")
            if args.blend:
                fps = bench_blend(args.blend, (width, height), min(args.frames, 20))
                print(f"| {label} | - | video_blend={args.blend:g} alone | {fps:.2f} | {fps / FPS:.3f} | | |")
            for precision in precisions:
                try:
                    fps, policy = bench_network(net, device, precision, (width, height), args.batch_size)
                except Exception as err:  # e.g. fp16 on a CPU: the policy refuses it with one line
                    print(f"| {label} | {precision} | network | - | - | - | {str(err).splitlines()[0]} |")
                    continue
                print(f"| {label} | {precision} | network | {fps:.2f} | {fps / FPS:.3f} | | {policy} |")
                if clip is None:
                    continue
                done = _end_to_end(args, model, clip, folder / f"out_{label}_{precision}.mp4", precision)
                if done:
                    fps = done["frames"] / done["wall_s"]
                    factor = done["seconds"] / done["wall_s"]
                    print(
                        f"| {label} | {precision} | end to end | {fps:.2f} | {factor:.3f} | {done['peak_mb']:.0f} | |"
                    )
                if args.blend:
                    out = folder / f"blend_{label}_{precision}.mp4"
                    done = _end_to_end(args, model, clip, out, precision, args.blend)
                    if done:
                        fps, factor = done["frames"] / done["wall_s"], done["seconds"] / done["wall_s"]
                        what, peak = f"end to end, video_blend={args.blend:g}", done["peak_mb"]
                        print(f"| {label} | {precision} | {what} | {fps:.2f} | {factor:.3f} | {peak:.0f} | |")
        if args.long and pyav:
            width, height = sizes[0]
            label = f"{width}x{height}"
            clip = make_clip(folder / f"long_{label}.mp4", width, height, args.long)
            for count, path in ((args.frames, folder / f"clip_{label}.mp4"), (args.long, clip)):
                done = _end_to_end(args, model, path, folder / f"long_out_{count}.mp4", precisions[0])
                if done:
                    print(
                        f"# memory: {count} frames of {label} ({precisions[0]}) end to end: peak RSS "
                        f"{done['peak_mb']:.0f} MiB, {done['frames'] / done['wall_s']:.2f} frames/s"
                    )
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = tool_parser("python -m benchmarks video", __doc__)
    add_arguments(parser)
    return run(parser.parse_args(argv))
