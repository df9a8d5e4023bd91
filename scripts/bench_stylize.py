"""Stylize benchmark: folder images/s, 1920x1080 latency / peak memory / GFLOP/s vs a measured matmul peak,
exact tiled inference (PSNR vs untiled at 1920x1080, peak RSS at 3840x2160, 7680x4320 completion).

    python -m scripts.bench stylize                       # everything (~5-10 min on a 2-core CPU)
    python -m scripts.bench stylize --only speed          # folder + 1080p variants only
    python -m scripts.bench stylize --only tiled --sizes 3840x2160
    python -m scripts.bench_stylize --help                # also runnable on its own

Every memory figure comes from a fresh subprocess (peak RSS = ru_maxrss of that process, which includes the
~0.3 GB of torch itself), so one measurement's allocations never inflate the next one's. Weights do not change
speed, so a randomly initialised TransformerNet is used unless --model gives a trained model.pth; for the PSNR
check the random weights are perturbed so the output is far from flat. Figures are printed, never asserted.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

from scripts.benchutil import REPO_ROOT, environment_line, matmul_peak_gflops, peak_rss_mb

CONTENT = Path("/work/shared/content/astronaut.jpg")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--only", choices=["all", "speed", "tiled", "psnr"], default="all")
    parser.add_argument("--model", default=None, help="a trained model.pth (default: random TransformerNet)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--folder-images", type=int, default=32, help="number of 256x256 images in the folder run")
    parser.add_argument("--batch-size", type=int, default=4, help="stylize batch_size for the folder run")
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats at 1920x1080 (median)")
    parser.add_argument(
        "--variants",
        default="eager,channels_last,channels_last_malloc,executor_malloc,compile_cl_malloc",
        help="1080p variants: eager, channels_last, executor (inference/tiled.py, one strip per "
        "layer), compile, compile_cl; a _malloc suffix turns on "
        "stylize.reuse_freed_memory (glibc keeps freed blocks: no page faults on reuse)",
    )
    parser.add_argument("--malloc-reuse", action="store_true", help="reuse_freed_memory() in the tiled runs")
    parser.add_argument("--sizes", default="3840x2160,7680x4320", help="tiled sizes WxH, comma separated")
    parser.add_argument("--budget-mb", type=float, default=1536, help="tiled executor memory budget (MiB)")
    parser.add_argument("--image", default=str(CONTENT), help="photo for the PSNR check (resized to 1920x1080)")
    parser.add_argument("--out", default="bench_out/stylize", help="where the PSNR check writes its PNGs")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)


# ----------------------------------------------------------------------------------------------------------------
def _net(model: str | None, perturb: bool = False, norm: str = "instance") -> nn.Module:
    from models.transformer import TransformerNet

    if model:
        from models.modelfile import load_model

        return load_model(model)[0].eval()
    torch.manual_seed(0)
    net = TransformerNet(norm=norm).eval()
    if perturb:
        with torch.no_grad():
            for p in net.parameters():
                p.add_(torch.randn_like(p) * 0.05)
            for m in net.modules():
                if isinstance(m, nn.BatchNorm2d):
                    m.running_mean.normal_(0, 0.2)
                    m.running_var.uniform_(0.5, 2.0)
    return net


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
    # Conv cost is linear in pixels: count on a 1/8-scale image with the same padding behaviour, scale up.
    with torch.inference_mode():
        net(torch.rand(1, 3, height // 8, width // 8))
    for h in handles:
        h.remove()
    return flops * 64 / 1e9


def _child(spec: dict) -> dict:
    """One measurement in this (fresh) process; returns figures as a dict."""
    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    kind = spec["kind"]
    base_rss = peak_rss_mb()
    if spec.get("malloc_reuse") or spec.get("variant", "").endswith("_malloc"):
        from core.device import reuse_freed_memory

        reuse_freed_memory()
        base_rss = peak_rss_mb()
    if kind == "forward":
        from core.precision import resolve_precision

        height, width = spec["height"], spec["width"]
        variant = spec["variant"].removesuffix("_malloc")
        # The layout, cast and compilation stylize's Runner would apply (core.precision), per variant.
        cpu = torch.device("cpu")
        policy = resolve_precision(
            cpu, "fp32", variant in ("channels_last", "compile_cl"), variant.startswith("compile"), training=False
        )
        net = policy.prepare_module(_net(spec["model"]), cpu)
        x = policy.batch_to(torch.rand(1, 3, height, width), cpu)
        fn = policy.maybe_compile(net)
        if variant == "executor":  # inference/tiled.py with one strip per layer (what stylize runs when it fits)
            from inference.tiled import TiledExecutor

            fn = TiledExecutor(net, budget_mb=spec.get("budget_mb") or 1e6)
        compile_s = 0.0
        if policy.compile:
            start = time.perf_counter()
            with torch.inference_mode():
                fn(x)
            compile_s = time.perf_counter() - start
        base_rss = peak_rss_mb()
        times = []
        with torch.inference_mode():
            if not policy.compile:
                fn(x)  # warm-up (oneDNN primitive creation)
            for _ in range(spec["repeats"]):
                start = time.perf_counter()
                fn(x)
                times.append(time.perf_counter() - start)
        return {
            "seconds": sorted(times)[len(times) // 2],
            "compile_s": compile_s,
            "peak_rss_mb": peak_rss_mb(),
            "base_rss_mb": base_rss,
            "gflop": network_gflop(_net(spec["model"]), height, width),
        }
    if kind == "tiled":
        from inference.tiled import TiledExecutor

        net = _net(spec["model"])
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
    if kind == "folder":
        from inference.pipeline import stylize
        from stylize import compose_config

        summary = stylize(compose_config(spec["overrides"]))
        return {
            "written": len(summary.written),
            "seconds": summary.seconds,
            "peak_rss_mb": peak_rss_mb(),
            "failed": len(summary.failed),
        }
    raise ValueError(kind)


def _spawn(spec: dict) -> dict:
    proc = subprocess.run(
        [sys.executable, "-m", "scripts.bench_stylize", "--child", json.dumps(spec)],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
    )
    if proc.returncode != 0:
        return {"error": (proc.stderr.strip().splitlines() or ["?"])[-1]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------------------------------------------
def bench_folder(args: argparse.Namespace, tmp: Path) -> None:
    from PIL import Image

    from models.modelfile import save_model

    model = Path(args.model) if args.model else tmp / "model.pth"
    if not args.model:
        save_model(model, _net(None), {"style_stem": "random"})
    src = tmp / "folder"
    src.mkdir()
    generator = torch.Generator().manual_seed(0)
    for i in range(args.folder_images):
        arr = (torch.rand(256, 256, 3, generator=generator) * 255).to(torch.uint8).numpy()
        Image.fromarray(arr).save(src / f"img{i:03d}.jpg", quality=90)
    for batch_size in sorted({1, args.batch_size}):
        res = _spawn(
            {
                "kind": "folder",
                "threads": args.threads,
                "overrides": [
                    f"model={model}",
                    f"input={src}",
                    f"output={tmp / f'out{batch_size}'}",
                    f"batch_size={batch_size}",
                    "device=cpu",
                ],
            }
        )
        if "error" in res:
            print(f"folder 256x256 batch_size={batch_size}: error {res['error']}")
            continue
        print(
            f"folder {res['written']} x 256x256 jpg, batch_size={batch_size}: "
            f"{res['written'] / res['seconds']:.2f} images/s end to end (decode+net+encode), "
            f"peak RSS {res['peak_rss_mb']:.0f} MiB"
        )


def bench_1080p(args: argparse.Namespace, peak: float) -> None:
    for variant in args.variants.split(","):
        res = _spawn(
            {
                "kind": "forward",
                "variant": variant,
                "model": args.model,
                "height": 1080,
                "width": 1920,
                "repeats": args.repeats,
                "threads": args.threads,
            }
        )
        if "error" in res:
            print(f"1920x1080 {variant:14s}: error {res['error']}")
            continue
        gflops = res["gflop"] / res["seconds"]
        extra = f", compile {res['compile_s']:.1f} s (first call)" if res["compile_s"] else ""
        print(
            f"1920x1080 {variant:14s}: {res['seconds']:.2f} s/image, {gflops:.1f} GFLOP/s "
            f"= {100 * gflops / peak:.0f}% of matmul peak ({res['gflop']:.0f} GFLOP/image), "
            f"peak RSS {res['peak_rss_mb']:.0f} MiB (before forward {res['base_rss_mb']:.0f}){extra}"
        )


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


def bench_psnr(args: argparse.Namespace) -> None:
    """Tiled (forced by a small budget) vs untiled at 1920x1080 on a real photo, instance and batch norm."""
    from data.io import load_image, pil_to_tensor, resize_to, save_image
    from inference.tiled import TiledExecutor

    x = pil_to_tensor(resize_to(load_image(args.image), 1920, 1080))[None]
    out = Path(args.out)
    for norm in ("instance", "batch"):
        net = _net(args.model if norm == "instance" else None, perturb=not args.model, norm=norm)
        with torch.inference_mode():
            want = net(x)
        executor = TiledExecutor(net, budget_mb=256)
        start = time.perf_counter()
        got = executor(x)
        seconds = time.perf_counter() - start
        mse = (got - want).pow(2).mean().item()
        psnr = float("inf") if mse == 0 else 10 * torch.log10(torch.tensor(1 / mse)).item()
        save_image(got[0], out / f"tiled_{norm}.png")
        save_image(want[0], out / f"untiled_{norm}.png")
        diff = ((got - want).abs() * 50).clamp(0, 1)  # x50 so any seam would be visible
        save_image(diff[0], out / f"diff_x50_{norm}.png")
        print(
            f"tiled vs untiled 1920x1080 norm={norm}: PSNR {psnr:.1f} dB, max |diff| "
            f"{(got - want).abs().max().item():.2e}, output std {want.std().item():.3f}, tiled in {seconds:.1f} s "
            f"with budget 256 MiB ({executor.disk_stores_used} activations on disk); images in {out}/"
        )


def run(args: argparse.Namespace) -> int:
    if args.child is not None:
        print(json.dumps(_child(json.loads(args.child))))
        return 0
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cpu")
    print(environment_line(device))
    print(f"# load average {os.getloadavg()[0]:.2f} (other processes share this CPU: figures are noisy above ~0.5)")
    if args.only in ("all", "speed"):
        peak = matmul_peak_gflops(device)
        print(f"fp32 matmul peak (2048^2, best of ~2 s): {peak:.1f} GFLOP/s")
        with tempfile.TemporaryDirectory() as tmp:
            bench_folder(args, Path(tmp))
        bench_1080p(args, peak)
    if args.only in ("all", "psnr"):
        bench_psnr(args)
    if args.only in ("all", "tiled"):
        bench_tiled(args)
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    return run(parser.parse_args())


if __name__ == "__main__":
    raise SystemExit(main())
