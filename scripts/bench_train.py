"""Training-step benchmark: the plain configuration (eager, fp32, NCHW) side by side with the best one for the device.

    python -m scripts.bench train                              # plain vs best ("auto" settings of train.*)
    python -m scripts.bench train --variants all               # every combination worth trying on the device
    python -m scripts.bench train --variants plain,cl,compile,cl+compile --batch-size 4 --image-size 256
    flock /tmp/faststyle-cpu.lock python -m scripts.bench_train  # standalone, serialised with other benchmarks

One step = ``training.loop.Trainer.step``, the step ``fit`` runs (TransformerNet forward, PerceptualLoss with the
frozen VGG-19 and Johnson et al.'s layers, backward, Adam step), set up by the same ``Trainer`` as in ``fit``, on a
fixed random batch (data loading is measured by ``bench.py data``). A variant is a string of ``+``-joined
options: ``plain``, ``cl`` (train.channels_last), ``compile`` (train.compile), ``bf16``/``fp16``
(train.precision), ``malloc`` (core.device.reuse_freed_memory: glibc keeps freed blocks, so the large VGG
activations of each step do not page-fault afresh); ``best`` = ``train.malloc_reuse=true`` with what
``train.precision/channels_last/compile=auto`` resolve to on the device (core.precision).

Each variant runs in a fresh subprocess so its peak memory (RSS on CPU, allocator peak on CUDA) is its own and
compiled code or allocator caches of one variant cannot help another. Compilation time is measured separately
(the first calls) and amortised over a 40k-step run in the summary. GFLOP/s uses the step's FLOPs counted once by
torch.utils.flop_counter and is compared with the fp32 matmul peak measured in the same run
(scripts/benchutil.py). Figures are printed, never asserted.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

from scripts import benchutil

OPTIONS = ("plain", "cl", "compile", "bf16", "fp16", "malloc")
RUN_STEPS = 40_000
# Johnson et al.'s layers (content relu2_2), as in configs/loss/vgg19.yaml; the same names exist in VGG-16 and -19.
STYLE_LAYERS = {"relu1_2": 1.0, "relu2_2": 1.0, "relu3_3": 1.0, "relu4_3": 1.0}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Command-line options (shared by ``bench.py train`` and standalone use)."""
    parser.add_argument(
        "--variants",
        default="plain,best",
        help="comma-separated variants (plain, best, cl, compile, cl+compile, bf16+cl, ...) or 'all'",
    )
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | mps")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--base-width", type=int, default=32)
    parser.add_argument("--network", default="vgg19", help="loss network: vgg19 | vgg16 | random")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per variant (median is reported)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps after compilation")
    parser.add_argument("--threads", type=int, default=0, help="torch.set_num_threads in workers (0 = default)")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)  # internal: run one variant, print JSON


def _expand(variants: str, device: torch.device) -> list[str]:
    from core.precision import resolve_precision

    if variants == "all":
        names = ["plain", "malloc", "cl+malloc", "compile", "cl+compile"]
        if device.type == "cuda":
            names += ["bf16", "bf16+cl", "bf16+cl+compile", "fp16+cl+compile"]
        return names
    out = []
    for name in variants.split(","):
        if name == "best":
            auto = resolve_precision(device, "auto", "auto", "auto", training=True)
            parts = [p for p, on in (("cl", auto.channels_last), ("compile", auto.compile)) if on]
            parts.append("malloc")  # train.malloc_reuse defaults to true
            if auto.name != "fp32":
                parts.insert(0, auto.name)
            name = "+".join(parts) or "plain"
        for part in name.split("+"):
            if part not in OPTIONS:
                raise SystemExit(f"error: unknown variant option {part!r}: use {', '.join(OPTIONS)}")
        if name not in out:
            out.append(name)
    return out


def _worker(args: argparse.Namespace) -> dict:
    """Run one variant in this process and return its figures."""
    from core.device import resolve_device, reuse_freed_memory
    from models.loss import PerceptualLoss
    from models.transformer import TransformerNet
    from training.loop import Trainer, TrainOptions

    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    parts = set(args.worker.split("+"))
    if "malloc" in parts:
        reuse_freed_memory()  # before the first large allocation
    options = TrainOptions(
        steps=RUN_STEPS,
        precision=next((p for p in ("bf16", "fp16") if p in parts), "fp32"),
        channels_last="cl" in parts,
        compile="compile" in parts,
    )
    torch.manual_seed(0)
    net = TransformerNet(base_width=args.base_width)
    loss_fn = PerceptualLoss(args.network, ["relu2_2"], STYLE_LAYERS, 1.0, 1.0, 1.0).to(device)
    gen = torch.Generator().manual_seed(1)
    size = args.image_size
    loss_fn.set_style(torch.rand(1, 3, size, size, generator=gen).to(device))
    trainer = Trainer(net, loss_fn, options, device)
    batch = trainer.to_device(torch.rand(args.batch_size, 3, size, size, generator=gen))

    def step() -> None:
        trainer.step(1, batch)

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    # First calls: compilation (forward and backward graphs) plus first-touch allocation; timed on their own.
    start = time.perf_counter()
    step()
    benchutil.synchronize(device)
    first_s = time.perf_counter() - start
    step_s = benchutil.time_call(step, device, warmup=args.warmup, repeats=args.steps)
    cuda = device.type == "cuda"
    peak_mb = torch.cuda.max_memory_allocated(device) / 2**20 if cuda else benchutil.peak_rss_mb()
    return {"variant": args.worker, "first_s": first_s, "step_s": step_s, "peak_mb": peak_mb}


def _step_flops(args: argparse.Namespace, device: torch.device) -> float:
    """FLOPs of one fp32 training step (forward + backward of network and loss), counted by the flop counter."""
    from torch.utils.flop_counter import FlopCounterMode

    from models.loss import PerceptualLoss
    from models.transformer import TransformerNet

    net = TransformerNet(base_width=args.base_width).to(device)
    loss_fn = PerceptualLoss(args.network, ["relu2_2"], STYLE_LAYERS, 1.0, 1.0, 1.0).to(device)
    loss_fn.set_style(torch.rand(1, 3, args.image_size, args.image_size, device=device))
    batch = torch.rand(args.batch_size, 3, args.image_size, args.image_size, device=device)
    with FlopCounterMode(display=False) as counter:
        loss_fn(net(batch), batch)["total"].backward()
    return float(counter.get_total_flops())


def run(args: argparse.Namespace) -> int:
    """Run the variants (each in a subprocess) and print a table; returns the exit status."""
    if args.worker:
        print(json.dumps(_worker(args)))
        return 0
    from core.device import resolve_device

    device = resolve_device(args.device)
    variants = _expand(args.variants, device)
    print(benchutil.environment_line(device))
    print(
        f"# batch {args.batch_size} x {args.image_size}px, base_width {args.base_width}, loss {args.network}, "
        f"median of {args.steps} steps after {args.warmup} warm-up; each variant in a fresh process"
    )
    peak = benchutil.matmul_peak_gflops(device)
    flops = _step_flops(args, device)
    print(f"# fp32 matmul peak (measured now): {peak:.1f} GFLOP/s; one step = {flops / 1e9:.1f} GFLOP (fp32 count)")
    results = []
    for variant in variants:
        cmd = [
            sys.executable,
            str(Path(__file__).resolve()),
            "--worker",
            variant,
            "--device",
            args.device,
            "--batch-size",
            str(args.batch_size),
            "--image-size",
            str(args.image_size),
            "--base-width",
            str(args.base_width),
            "--network",
            args.network,
            "--steps",
            str(args.steps),
            "--warmup",
            str(args.warmup),
            "--threads",
            str(args.threads),
        ]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            print(f"{variant}: FAILED\n{proc.stderr[-2000:]}", file=sys.stderr)
            continue
        results.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    if not results:
        return 1
    base = next((r for r in results if r["variant"] == "plain"), results[0])
    mem = "peak alloc MiB" if device.type == "cuda" else "peak RSS MiB"
    print(
        f"{'variant':<18}{'s/step':>9}{'images/s':>10}{'GFLOP/s':>9}{'% peak':>8}{mem:>16}{'first step s':>14}"
        f"{'speed-up':>10}{'amortised':>11}"
    )
    for r in results:
        # Amortised: the extra cost of the first (compiling) step spread over a 40k-step run.
        amortised = r["step_s"] + max(r["first_s"] - r["step_s"], 0.0) / RUN_STEPS
        gflops = flops / r["step_s"] / 1e9
        print(
            f"{r['variant']:<18}{r['step_s']:>9.3f}{args.batch_size / r['step_s']:>10.2f}{gflops:>9.1f}"
            f"{100 * gflops / peak:>7.0f}%{r['peak_mb']:>16.0f}{r['first_s']:>14.1f}"
            f"{base['step_s'] / r['step_s']:>9.2f}x{base['step_s'] / amortised:>10.2f}x"
        )
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    return run(parser.parse_args())


if __name__ == "__main__":
    raise SystemExit(main())
