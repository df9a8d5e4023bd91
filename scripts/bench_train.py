"""Training-step benchmark: s/step, images/s, peak memory and GFLOP/s against a matmul peak measured in the same run.

    python scripts/bench.py train                          # batch 4 at 256 px, vgg19 loss (Johnson's setting)
    python scripts/bench.py train --batch-size 2 --image-size 128 --steps 5
    python scripts/bench.py train --device cuda --precision bf16 --channels-last --compile
    python scripts/bench_train.py --help                   # also runnable on its own

A step is exactly what train.py runs (models.training.train_step: network forward, perceptual loss, backward,
Adam), on random photos in [0, 1] (pixel values do not change the speed) with a random style target. FLOPs are
counted once with torch.utils.flop_counter over a whole step (forward and backward of both networks), so
GFLOP/s is the achieved rate. Figures are printed, never asserted. Wrap CPU runs in
``flock /tmp/faststyle-cpu.lock`` on shared machines.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import torch  # noqa: E402
from benchutil import environment_line, matmul_peak_gflops, peak_rss_mb, synchronize  # noqa: E402


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--base-width", type=int, default=32)
    parser.add_argument("--loss-network", default="vgg19", choices=["vgg19", "vgg16", "random"])
    parser.add_argument("--steps", type=int, default=5, help="timed steps (after --warmup untimed ones)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--precision", default="auto", choices=["auto", "fp32", "fp16", "bf16"])
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")


def run(args: argparse.Namespace) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    from models.device import resolve_device
    from models.loss import PerceptualLoss
    from models.training import autocast_context, resolve_precision, train_step
    from models.transformer import TransformerNet

    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    print(environment_line(device))
    peak = matmul_peak_gflops(device)
    print(f"matmul peak (fp32, measured): {peak:.1f} GFLOP/s")

    torch.manual_seed(0)
    memory_format = torch.channels_last if args.channels_last else torch.contiguous_format
    model = TransformerNet(base_width=args.base_width).to(device, memory_format=memory_format).train()
    # Johnson's layer set on VGG-19 block ends; the weights of each term do not change the speed.
    style_layers = {"relu1_2": 1.0, "relu2_2": 1.0, "relu3_4": 1.0, "relu4_4": 1.0}
    loss_fn = PerceptualLoss(args.loss_network, ["relu2_2"], style_layers, 1.0, 1.0, 0.0).to(device)
    loss_fn.set_style(torch.rand(1, 3, args.image_size, args.image_size, device=device))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    dtype = resolve_precision(args.precision, device)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    autocast = autocast_context(device, dtype)
    step_model = torch.compile(model) if args.compile else model
    batch = torch.rand(args.batch_size, 3, args.image_size, args.image_size, device=device)
    batch = batch.contiguous(memory_format=memory_format)

    def step() -> None:
        train_step(step_model, loss_fn, optimizer, scaler, batch, autocast)

    with FlopCounterMode(display=False) as counter:
        step()  # counted on the eager graph: the work the step must do whatever the kernels
    flops = counter.get_total_flops()
    for _ in range(args.warmup):
        step()
    synchronize(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    for _ in range(args.steps):
        step()
    synchronize(device)
    seconds = (time.perf_counter() - start) / args.steps

    print(f"setting: batch {args.batch_size} x {args.image_size}^2 px, TransformerNet base_width {args.base_width}, "
          f"loss {args.loss_network}, precision {str(dtype).removeprefix('torch.')}, "
          f"channels_last {args.channels_last}, compile {args.compile}, {args.steps} timed steps")
    print(f"s/step: {seconds:.3f}")
    print(f"images/s: {args.batch_size / seconds:.2f}")
    print(f"GFLOP/step (counted): {flops / 1e9:.1f}")
    achieved = flops / seconds / 1e9
    print(f"achieved: {achieved:.1f} GFLOP/s = {100 * achieved / peak:.0f}% of the fp32 matmul peak")
    print(f"peak RSS: {peak_rss_mb():.0f} MiB")
    if device.type == "cuda":
        print(f"peak CUDA memory: {torch.cuda.max_memory_allocated(device) / 2**20:.0f} MiB")
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    raise SystemExit(run(parser.parse_args()))
