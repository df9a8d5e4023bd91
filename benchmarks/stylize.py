"""Stylize benchmark: folder images/s, 1920x1080 latency / peak memory / GFLOP/s vs the fp32 and bf16 matmul peaks
measured in the same run, exact tiled inference (PSNR vs untiled at 1920x1080, peak RSS at 3840x2160, 7680x4320
completion).

    python -m benchmarks stylize                       # everything (~5-10 min on a 2-core CPU)
    python -m benchmarks stylize --only speed          # folder + 1080p variants only
    python -m benchmarks stylize --only tiled --sizes 3840x2160   # and 4K tiled vs four 1080p frames
    python -m benchmarks stylize --only speed --variants plain,best --base-width 16

1920x1080 variants are names of ``_``-joined options (order free): ``plain`` = the plain configuration the way
pytorch/examples runs it (torch's nn.InstanceNorm2d swapped in for ours, eager, fp32, NCHW, no malloc reuse);
``tnorm`` (torch's InstanceNorm2d), ``cl`` / ``channels_last`` (NHWC), ``executor`` (inference/tiled.py, one
strip per layer), ``layers`` (our network layer by layer, without the fused CPU path of models/fused.py),
``compile``, ``malloc`` (core.device.reuse_freed_memory), ``eager`` (no option: fp32 NCHW);
``bf16`` / ``fp16`` cast the network and the input the way stylize runs a 16-bit precision (core.precision's
``prepare_module`` / ``batch_to``), ``bf16ac`` / ``fp16ac`` keep the fp32 network under torch.autocast instead.
``best`` = what stylize.py precision=auto channels_last=auto does on this device (malloc_reuse is on by default;
1920x1080 fits the default max_memory_mb, so it runs untiled). The summary gives every variant's speed-up over
``plain`` and over the fastest fp32 variant of our own network measured in the same run.

Every memory figure comes from a fresh subprocess (peak RSS = that process's own VmHWM, common.peak_rss_mb, which
includes the ~0.3 GB of torch itself), so one measurement's allocations never inflate the next one's. Weights do not
change speed, so a randomly initialised TransformerNet is used unless --model gives a trained model.pth; for the
PSNR check the random weights are perturbed so the output is far from flat. Figures are printed, never asserted.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf
from torch import nn

from benchmarks.common import (
    REPO_ROOT,
    matmul_peak_gflops,
    peak_rss_mb,
    precision_line,
    reduced_dtype,
    run_worker,
    save_random_model,
    synchronize,
    time_call,
    torch_instance_norms,
)
from core.cli import tool_parser
from core.device import environment_line
from core.precision import PRECISION_DTYPES, precision_name

CONTENT = REPO_ROOT / "data" / "samples" / "content" / "astronaut.jpg"
# The set the README's speed targets are read from: the plain configuration, our fastest fp32 ones, the bf16 ways to run
# stylize, and what precision=auto does.
DEFAULT_VARIANTS = (
    "plain,channels_last_malloc,executor_malloc,bf16_cl_malloc,bf16_malloc,bf16_executor_malloc,bf16ac_cl_malloc,best"
)
VARIANT_OPTIONS = (
    "eager",
    "plain",
    "tnorm",
    "layers",
    "cl",
    "malloc",
    "executor",
    "compile",
    "bf16",
    "fp16",
    "bf16ac",
    "fp16ac",
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--only", choices=["all", "speed", "tiled", "psnr"], default="all")
    parser.add_argument("--model", default=None, help="a trained model.pth (default: random TransformerNet)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument(
        "--folder-images", type=int, default=32, help="number of images in the folder run (0: no folder run)"
    )
    parser.add_argument(
        "--folder-size",
        default="256x256",
        help="WxH of the folder run's images (e.g. 1920x1080: with --folder-images N > 1 a 1-image folder runs too, "
        "and the cost of each further photo, I/O included, is printed)",
    )
    parser.add_argument("--batch-size", type=int, default=4, help="stylize batch_size for the folder run")
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats at 1920x1080 (median)")
    parser.add_argument(
        "--variants",
        default=DEFAULT_VARIANTS,
        help=f"1920x1080 variants, comma separated (see above; default {DEFAULT_VARIANTS})",
    )
    parser.add_argument("--base-width", type=int, default=32, help="TransformerNet base_width (random weights only)")
    parser.add_argument(
        "--device",
        choices=["cpu", "cuda"],
        default="cpu",
        help="device of the folder run and the 1920x1080 variants (the tiled and PSNR runs stay on the CPU)",
    )
    parser.add_argument("--malloc-reuse", action="store_true", help="reuse_freed_memory() in the tiled runs")
    parser.add_argument("--sizes", default="3840x2160,7680x4320", help="tiled sizes WxH, comma separated")
    parser.add_argument("--budget-mb", type=float, default=1536, help="tiled executor memory budget (MiB)")
    parser.add_argument(
        "--stylize-budget-mb",
        type=float,
        default=float(OmegaConf.load(REPO_ROOT / "configs" / "stylize.yaml").max_memory_mb),
        help="budget of the tiled-vs-frames comparison (default: stylize's max_memory_mb default)",
    )
    parser.add_argument("--image", default=str(CONTENT), help="photo for the PSNR check (resized to 1920x1080)")
    parser.add_argument("--out", default="outputs/reports/bench_stylize", help="where the PSNR check writes its PNGs")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)


# ----------------------------------------------------------------------------------------------------------------
def _net(model: str | None, perturb: bool = False, norm: str = "instance", base_width: int = 32) -> nn.Module:
    from models.transformer import TransformerNet

    if model:
        from interop.read import read_model_file

        return read_model_file(model)[0].eval()
    torch.manual_seed(0)
    net = TransformerNet(norm=norm, base_width=base_width).eval()
    if perturb:
        with torch.no_grad():
            for p in net.parameters():
                p.add_(torch.randn_like(p) * 0.05)
            for m in net.modules():
                if isinstance(m, nn.BatchNorm2d):
                    m.running_mean.normal_(0, 0.2)
                    m.running_var.uniform_(0.5, 2.0)
    return net


def parse_variant(name: str, device: torch.device) -> dict:
    """A 1920x1080 variant name (module docstring) as the settings the measuring process applies.

    Returns {"tnorm", "channels_last", "compile", "executor", "malloc", "autocast": bool, "precision": str}.
    Raises ValueError for an unknown option or a combination stylize never runs. ``best`` is resolved here by
    core.precision, so it follows whatever ``auto`` means on this device.
    """
    if name == "best":
        from core.precision import resolve_precision

        policy = resolve_precision(device, "auto", "auto", False, training=False)
        return {
            "tnorm": False,
            "channels_last": policy.channels_last,
            "compile": False,
            "executor": False,
            "layers": False,
            "malloc": True,  # stylize's malloc_reuse defaults to true (configs/stylize.yaml)
            "autocast": False,
            "precision": policy.name,
        }
    parts = name.replace("channels_last", "cl").split("_")
    unknown = [p for p in parts if p not in VARIANT_OPTIONS]
    if unknown:
        raise ValueError(f"variant {name!r}: unknown option(s) {', '.join(unknown)}: use best or {VARIANT_OPTIONS}")
    precisions = [p for p in parts if p in ("bf16", "fp16", "bf16ac", "fp16ac")]
    if len(precisions) > 1:
        raise ValueError(f"variant {name!r}: more than one precision ({', '.join(precisions)})")
    precision = precisions[0] if precisions else "fp32"
    settings = {
        "tnorm": "plain" in parts or "tnorm" in parts,
        "channels_last": "cl" in parts,
        "compile": "compile" in parts,
        "executor": "executor" in parts,
        "layers": "layers" in parts,
        "malloc": "malloc" in parts,
        "autocast": precision.endswith("ac"),
        "precision": precision.removesuffix("ac"),
    }
    # The executor runs our own layers strip by strip, in the network's dtype: it has no compiled, autocast or
    # nn.InstanceNorm2d form.
    if settings["executor"] and (settings["compile"] or settings["autocast"] or settings["tnorm"]):
        raise ValueError(f"variant {name!r}: the executor runs neither compiled, under autocast nor with tnorm")
    if settings["precision"] == "fp16" and device.type != "cuda":
        raise ValueError(f"variant {name!r}: fp16 needs --device cuda")
    return settings


def network_gflop(net: nn.Module, height: int, width: int) -> float:
    """Multiply-adds x 2 of every conv / transposed conv for one (height, width) image (norms, ReLUs excluded)."""
    flops = 0.0

    def hook(module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        nonlocal flops
        k = module.kernel_size[0] * module.kernel_size[1]
        if isinstance(module, nn.ConvTranspose2d):
            flops += 2.0 * inputs[0].numel() / inputs[0].shape[0] * module.out_channels * k
        else:
            flops += 2.0 * output[0].numel() * module.in_channels * k

    handles = [m.register_forward_hook(hook) for m in net.modules() if isinstance(m, nn.Conv2d | nn.ConvTranspose2d)]
    # Conv cost is linear in pixels: count on a 1/8-scale image with the same padding behaviour, scale up. The hooks
    # see the layers' convolutions (the fused CPU path calls them as functions, its last one with extra zeros).
    from models import fused

    with torch.inference_mode(), fused.layer_by_layer():
        net(torch.rand(1, 3, height // 8, width // 8))
    for h in handles:
        h.remove()
    return flops * 64 / 1e9


def largest_conv_gflops(net: nn.Module, x: torch.Tensor, height: int, width: int) -> float | None:
    """GFLOP/s of the network's largest convolution (a residual block's, 4w -> 4w channels 3x3 at a quarter of the
    image's sides) alone, in the network's own dtype and layout: the rate a forward pass would reach if every pass over
    memory were free (None without residual blocks)."""
    if not len(net.residuals):
        return None
    conv = net.residuals[0].conv1.conv
    fmt = torch.channels_last if x.is_contiguous(memory_format=torch.channels_last) else torch.contiguous_format
    h, w = -(-height // 4), -(-width // 4)
    activation = torch.rand(1, conv.in_channels, h + 2, w + 2).to(x.device, conv.weight.dtype)
    activation = activation.contiguous(memory_format=fmt)
    with torch.inference_mode():
        seconds = time_call(lambda: conv(activation), x.device, warmup=1, repeats=5)
    return 2.0 * conv.in_channels * conv.out_channels * 9 * h * w / seconds / 1e9


def _child(spec: dict) -> dict:
    """One measurement in this (fresh) process; returns figures as a dict.

    Long: one branch per kind of measurement (forward, tiled, folder), each of which must run in the fresh process.
    """
    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    kind = spec["kind"]
    base_rss = peak_rss_mb()
    settings = spec.get("settings") or {}
    if spec.get("malloc_reuse") or settings.get("malloc"):
        from core.device import reuse_freed_memory

        reuse_freed_memory()
        base_rss = peak_rss_mb()
    if kind == "forward":
        import contextlib

        from core.precision import resolve_precision

        height, width = spec["height"], spec["width"]
        device = torch.device(spec.get("device", "cpu"))
        # The layout, cast and compilation stylize's Runner would apply (core.precision), per variant; an autocast
        # variant keeps the fp32 network and converts per op instead.
        precision = "fp32" if settings["autocast"] else settings["precision"]
        policy = resolve_precision(device, precision, settings["channels_last"], settings["compile"], training=False)
        net = _net(spec["model"], base_width=spec.get("base_width", 32))
        if settings["tnorm"]:
            torch_instance_norms(net)
        if settings.get("layers"):
            from models import fused

            fused.FUSED_CPU_PATH = False
        net = policy.prepare_module(net, device)
        x = policy.batch_to(torch.rand(1, 3, height, width), device)
        fn = policy.maybe_compile(net)
        if settings["executor"]:  # inference/tiled.py with one strip per layer (what stylize runs when it fits)
            from inference.tiled import TiledExecutor

            fn = TiledExecutor(net, budget_mb=spec.get("budget_mb") or 1e6)
        autocast_dtype = PRECISION_DTYPES[settings["precision"]]  # used only by the autocast variants (16-bit)

        def call() -> None:
            context = torch.autocast(device.type, autocast_dtype) if settings["autocast"] else contextlib.nullcontext()
            with torch.inference_mode(), context:
                fn(x)
            synchronize(device)

        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        compile_s = 0.0
        if policy.compile:
            start = time.perf_counter()
            call()
            compile_s = time.perf_counter() - start
        base_rss = peak_rss_mb()
        times = []
        if not policy.compile:
            call()  # warm-up (oneDNN primitive creation)
        for _ in range(spec["repeats"]):
            start = time.perf_counter()
            call()
            times.append(time.perf_counter() - start)
        cuda = device.type == "cuda"
        peak_mb = torch.cuda.max_memory_allocated(device) / 2**20 if cuda else peak_rss_mb()
        return {
            "seconds": sorted(times)[len(times) // 2],
            "compile_s": compile_s,
            "peak_rss_mb": peak_mb,
            "largest_conv_gflops": largest_conv_gflops(net, x, height, width),
            "base_rss_mb": base_rss,
            "gflop": network_gflop(_net(spec["model"], base_width=spec.get("base_width", 32)), height, width),
            "policy": policy.describe(),
        }
    if kind == "tiled":
        from inference.tiled import TiledExecutor

        net = _net(spec["model"], base_width=spec.get("base_width", 32))
        executor = TiledExecutor(net, budget_mb=spec["budget_mb"])
        x = torch.rand(1, 3, spec["height"], spec["width"])
        base_rss = peak_rss_mb()
        start = time.perf_counter()
        y = executor(x)
        seconds = time.perf_counter() - start
        return {
            "seconds": seconds,
            "peak_rss_mb": peak_rss_mb(),
            "base_rss_mb": base_rss,
            "disk_stores": executor.disk_stores_used,
            "finite": bool(torch.isfinite(y).all()),
            "gflop": network_gflop(net, spec["height"], spec["width"]),
        }
    if kind == "tiled_vs_frames":
        # stylize's policy (precision=auto channels_last=auto malloc_reuse on), untiled frames and one tiled image
        from core.precision import resolve_precision
        from inference.tiled import TiledExecutor
        from models import fused

        fused.FUSED_CPU_PATH = not spec["layers"]
        device = torch.device("cpu")
        policy = resolve_precision(device, "auto", "auto", False, training=False)
        net = policy.prepare_module(_net(spec["model"], base_width=spec.get("base_width", 32)), device).eval()
        frame = policy.batch_to(torch.rand(1, 3, 1080, 1920), device)
        with torch.inference_mode():
            frame_s = time_call(lambda: net(frame), device)
        del frame
        executor = TiledExecutor(net, budget_mb=spec["budget_mb"])
        image = (torch.rand(spec["height"], spec["width"], 3) * 255).to(torch.uint8)  # stylize's 8-bit rows

        def tiled() -> None:
            executor.stream(lambda lo, hi: image[lo:hi], spec["height"], spec["width"], lambda row, strip: None)

        return {
            "frame_s": frame_s,
            "tiled_s": time_call(tiled, device, repeats=2),
            "fused": executor.fused,
            "store_dtype": str(executor.store_dtype).removeprefix("torch."),
            "disk_stores": executor.disk_stores_used,
            "policy": policy.describe(),
        }
    if kind == "folder":
        from configs.schema import compose_stylize_config
        from inference.pipeline import stylize

        summary = stylize(compose_stylize_config(spec["overrides"]))
        return {
            "written": len(summary.written),
            "seconds": summary.seconds,
            "peak_rss_mb": peak_rss_mb(),
            "failed": len(summary.failed),
        }
    raise ValueError(kind)


def _spawn(spec: dict) -> dict:
    """One measurement in a fresh process (common.run_worker); its figures, or {"error": its last stderr line}."""
    result, stderr = run_worker("stylize", ["--child", json.dumps(spec)])
    return result if result is not None else {"error": (stderr.strip().splitlines() or ["?"])[-1]}


# ----------------------------------------------------------------------------------------------------------------
def bench_folder(args: argparse.Namespace, tmp: Path) -> None:
    """stylize.py's pipeline on a folder of random JPEGs (decode, network, encode) in a fresh process per run."""
    from PIL import Image

    width, height = (int(v) for v in args.folder_size.lower().split("x"))
    size = f"{width}x{height}"
    model = Path(args.model) if args.model else save_random_model(tmp / "model.pth", args.base_width)
    generator = torch.Generator().manual_seed(0)
    pixels = [(torch.rand(height, width, 3, generator=generator) * 255).to(torch.uint8).numpy()]

    def folder(name: str, count: int) -> Path:
        src = tmp / name
        src.mkdir()
        for i in range(count):
            Image.fromarray(pixels[0]).save(src / f"img{i:03d}.jpg", quality=90)
        return src

    def run(src: Path, batch_size: int) -> dict:
        out = tmp / f"out_{src.name}_{batch_size}"
        overrides = [f"model={model}", f"input={src}", f"output={out}", f"batch_size={batch_size}"]
        return _spawn({"kind": "folder", "threads": args.threads, "overrides": [*overrides, f"device={args.device}"]})

    if args.folder_images < 1:
        return
    src = folder("folder", args.folder_images)
    per_image: dict[int, float] = {}
    for batch_size in sorted({1, args.batch_size}):
        res = run(src, batch_size)
        if "error" in res:
            print(f"folder {size} batch_size={batch_size}: error {res['error']}")
            continue
        per_image[batch_size] = res["seconds"]
        print(
            f"folder {res['written']} x {size} jpg, batch_size={batch_size}: "
            f"{res['written'] / res['seconds']:.2f} images/s end to end (decode+net+encode), "
            f"peak RSS {res['peak_rss_mb']:.0f} MiB"
        )
    if width * height >= 1_000_000 and args.folder_images > 1 and 1 in per_image:
        one = run(folder("one", 1), 1)
        if "error" not in one:
            further = (per_image[1] - one["seconds"]) / (args.folder_images - 1)
            print(
                f"folder {size}, batch_size=1: {further:.3f} s per further photo (I/O included), "
                f"one photo alone {one['seconds']:.3f} s"
            )


def bench_1080p(args: argparse.Namespace, peaks: dict[str, float]) -> None:
    """Each variant in a fresh process, then a summary of speed-ups over ``plain`` and over our fastest fp32.

    ``peaks``: measured matmul GFLOP/s by dtype label ("fp32" and the 16-bit one), printed as percentages.
    """
    device = torch.device(args.device)
    results: dict[str, dict] = {}
    for variant in args.variants.split(","):
        try:
            settings = parse_variant(variant, device)
        except ValueError as err:
            print(f"1920x1080 {variant:22s}: error {err}")
            continue
        res = _spawn(
            {
                "kind": "forward",
                "variant": variant,
                "settings": settings,
                "device": args.device,
                "model": args.model,
                "base_width": args.base_width,
                "height": 1080,
                "width": 1920,
                "repeats": args.repeats,
                "threads": args.threads,
            }
        )
        if "error" in res:
            print(f"1920x1080 {variant:22s}: error {res['error']}")
            continue
        res["settings"] = settings
        results[variant] = res
        gflops = res["gflop"] / res["seconds"]
        of_peaks = ", ".join(f"{100 * gflops / peak:.0f}% of {label} peak" for label, peak in peaks.items())
        if res["largest_conv_gflops"]:
            conv = res["largest_conv_gflops"]
            of_peaks += f", {100 * gflops / conv:.0f}% of its largest conv's {conv:.0f} GFLOP/s"
        extra = f", compile {res['compile_s']:.1f} s (first call)" if res["compile_s"] else ""
        memory = "peak alloc" if device.type == "cuda" else "peak RSS"
        described = f" [{res['policy']}{', autocast' if settings['autocast'] else ''}]" if variant == "best" else ""
        print(
            f"1920x1080 {variant:22s}: {res['seconds']:.3f} s/image, {gflops:.1f} GFLOP/s = {of_peaks} "
            f"({res['gflop']:.0f} GFLOP/image), {memory} {res['peak_rss_mb']:.0f} MiB "
            f"(before forward {res['base_rss_mb']:.0f}){extra}{described}"
        )
    _summary(results)


def _summary(results: dict[str, dict]) -> None:
    """Speed-up of every variant over ``plain`` and over the fastest fp32 variant of our own network."""
    if not results:
        return
    ours_fp32 = {
        name: r for name, r in results.items() if r["settings"]["precision"] == "fp32" and not r["settings"]["tnorm"]
    }
    fp32_best = min(ours_fp32, key=lambda name: ours_fp32[name]["seconds"]) if ours_fp32 else None
    plain = results.get("plain")
    print(
        "summary 1920x1080: speed-up = reference s/image / variant s/image; "
        f"vs plain{'' if plain else ' (not measured)'}, vs our fp32 best = {fp32_best or '(none measured)'}"
    )
    for name, r in results.items():
        vs_plain = f"{plain['seconds'] / r['seconds']:6.2f}x" if plain else "      -"
        vs_fp32 = f"{results[fp32_best]['seconds'] / r['seconds']:6.2f}x" if fp32_best else "      -"
        print(f"  {name:22s} {r['seconds']:8.3f} s/image  vs plain {vs_plain}  vs fp32 best {vs_fp32}")


def bench_tiled(args: argparse.Namespace) -> None:
    for size in args.sizes.split(","):
        width, height = (int(v) for v in size.lower().split("x"))
        res = _spawn(
            {
                "kind": "tiled",
                "model": args.model,
                "height": height,
                "width": width,
                "budget_mb": args.budget_mb,
                "threads": args.threads,
                "malloc_reuse": args.malloc_reuse,
                "base_width": args.base_width,
            }
        )
        if "error" in res:
            print(f"tiled {width}x{height}: error {res['error']}")
            continue
        print(
            f"tiled {width}x{height} budget {args.budget_mb:.0f} MiB malloc_reuse={args.malloc_reuse}: "
            f"completed={res['finite']} in "
            f"{res['seconds']:.1f} s ({res['gflop'] / res['seconds']:.1f} GFLOP/s), peak RSS "
            f"{res['peak_rss_mb']:.0f} MiB (incl. input+output images, before run {res['base_rss_mb']:.0f}), "
            f"{res['disk_stores']} activations on disk"
        )


def bench_tiled_vs_frames(args: argparse.Namespace) -> None:
    """The first size of --sizes, tiled under stylize's own policy and default budget, against 1920x1080 frames
    untiled in the same process, with the fused CPU path and without it (the issue's target: 4K tiled within 1.3x of
    four 1080p frames)."""
    width, height = (int(v) for v in args.sizes.split(",")[0].lower().split("x"))
    frames = width * height / (1920 * 1080)
    budget = args.stylize_budget_mb
    for layers in (False, True):
        res = _spawn(
            {
                "kind": "tiled_vs_frames",
                "model": args.model,
                "height": height,
                "width": width,
                "budget_mb": budget,
                "layers": layers,
                "threads": args.threads,
                "malloc_reuse": True,
                "base_width": args.base_width,
            }
        )
        if "error" in res:
            print(f"tiled {width}x{height} vs frames: error {res['error']}")
            continue
        path = "fused strips" if res["fused"] else "layer-by-layer strips"
        ratio = res["tiled_s"] / (frames * res["frame_s"])
        print(
            f"tiled {width}x{height} ({path}, {res['store_dtype']} stores, budget {budget:.0f} MiB, "
            f"{res['disk_stores']} on disk): {res['tiled_s']:.2f} s = {ratio:.2f}x "
            f"the time of {frames:g} 1920x1080 frames untiled ({res['frame_s']:.3f} s each); {res['policy']}"
        )


def bench_psnr(args: argparse.Namespace) -> None:
    """Tiled (forced by a small budget) vs untiled at 1920x1080 on a real photo, instance and batch norm."""
    from core.metrics import psnr
    from data.io import load_image, pil_to_tensor, resize_to, save_image
    from inference.tiled import TiledExecutor

    x = pil_to_tensor(resize_to(load_image(args.image), 1920, 1080))[None]
    out = Path(args.out)
    for norm in ("instance", "batch"):
        net = _net(args.model if norm == "instance" else None, not args.model, norm, args.base_width)
        with torch.inference_mode():
            want = net(x)
        executor = TiledExecutor(net, budget_mb=256)
        start = time.perf_counter()
        got = executor(x)
        seconds = time.perf_counter() - start
        save_image(got[0], out / f"tiled_{norm}.png")
        save_image(want[0], out / f"untiled_{norm}.png")
        diff = ((got - want).abs() * 50).clamp(0, 1)  # x50 so any seam would be visible
        save_image(diff[0], out / f"diff_x50_{norm}.png")
        print(
            f"tiled vs untiled 1920x1080 norm={norm}: PSNR {psnr(got, want):.1f} dB, max |diff| "
            f"{(got - want).abs().max().item():.2e}, output std {want.std().item():.3f}, tiled in {seconds:.1f} s "
            f"with budget 256 MiB ({executor.disk_stores_used} activations on disk); images in {out}/"
        )


def run(args: argparse.Namespace) -> int:
    if args.child is not None:
        print(json.dumps(_child(json.loads(args.child))))
        return 0
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if args.only in ("all", "psnr") and not Path(args.image).is_file():
        raise SystemExit(f"error: --image {args.image}: no such photo (the PSNR check needs one): pass --image PHOTO")
    print(environment_line(device))
    print(precision_line(device))
    print(f"# load average {os.getloadavg()[0]:.2f} (other processes share this CPU: figures are noisy above ~0.5)")
    print(f"# TransformerNet base_width {args.base_width}" if not args.model else f"# model {args.model}")
    if args.only in ("all", "speed"):
        reduced = reduced_dtype(device)
        peaks = {
            "fp32": matmul_peak_gflops(device),
            precision_name(reduced): matmul_peak_gflops(device, reduced),
        }
        print(
            "matmul peaks (up to 2048^2, best of ~2 s each; smaller where one call is slow): "
            + ", ".join(f"{label} {peak:.1f} GFLOP/s" for label, peak in peaks.items())
        )
        with tempfile.TemporaryDirectory() as tmp:
            bench_folder(args, Path(tmp))
        bench_1080p(args, peaks)
    if args.only in ("all", "psnr"):
        bench_psnr(args)
    if args.only in ("all", "tiled"):
        bench_tiled_vs_frames(args)
        bench_tiled(args)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = tool_parser("python -m benchmarks stylize", __doc__)
    add_arguments(parser)
    return run(parser.parse_args(argv))
