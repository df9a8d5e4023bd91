"""Training-step benchmark: the plain configuration (eager, fp32, NCHW) side by side with the best one for the device.

    python -m benchmarks train                              # examples vs plain vs best ("auto" of train.*)
    python -m benchmarks train --network vgg16 --steps 3    # the loss network pytorch/examples uses
    python -m benchmarks train --variants all               # every combination worth trying on the device
    python -m benchmarks train --variants plain,cl,compile,cl+compile --batch-size 4 --image-size 256
    python -m benchmarks train --count-ops --variants best,plain --unoptimized-copies  # copy_/add_/fill_ per step
    flock /tmp/faststyle-cpu.lock python -m benchmarks train  # serialised with other benchmarks

One step = ``training.loop.Trainer.step``, the step ``fit`` runs (TransformerNet forward, PerceptualLoss with the
frozen VGG-19 and Johnson et al.'s layers, backward, Adam step), set up by the same ``Trainer`` as in ``fit``, on a
fixed random batch (data loading is measured by ``python -m benchmarks data``). A variant is a string of ``+``-joined
options: ``plain``, ``cl`` (train.channels_last), ``compile`` (train.compile), ``bf16``/``fp16`` (train.precision),
``malloc`` (core.device.reuse_freed_memory: glibc keeps freed blocks, so the large VGG activations of each step do
not page-fault afresh), ``tnorm`` (torch's nn.InstanceNorm2d in the TransformerNet instead of ours), ``layers``
(our TransformerNet layer by layer, without the fused CPU path of models/fused.py), ``temporal``
(the stability term on, loss.temporal_weight=1: the network runs on twice the images; its GFLOP/s column still
divides the step's FLOPs without the term); ``examples`` = ``tnorm`` alone: the plain configuration the way
pytorch/examples trains (torch's InstanceNorm2d, eager, fp32, NCHW, no malloc reuse), the speed-up base when measured
(else ``plain``); ``best`` = ``train.malloc_reuse=true`` with what ``train.precision/channels_last/compile=auto``
resolve to on the device (core.precision), so it follows the policy wherever it changes.

VGG-16 (``--network vgg16``) loads torchvision's weights from ``--weights-path`` or the torch hub cache and never
downloads: without them it runs VGG-16's shapes with random weights (speed does not depend on the weights) and
says so in its output.

Each variant runs in a fresh subprocess so its peak memory (RSS on CPU, allocator peak on CUDA) is its own and
compiled code or allocator caches of one variant cannot help another. Compilation time is measured separately
(the first calls) and amortised over a 40k-step run in the summary. GFLOP/s uses the step's FLOPs counted once by
torch.utils.flop_counter and is compared with the fp32 and the bf16 (fp16 on CUDA) matmul peaks measured in the
same run (benchmarks/common.py). Figures are printed, never asserted.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

from benchmarks import common
from core.cli import tool_parser

OPTIONS = ("plain", "examples", "tnorm", "layers", "cl", "compile", "bf16", "fp16", "malloc", "temporal")
RUN_STEPS = 40_000
# Johnson et al.'s layers (content relu2_2), as in configs/loss/vgg19.yaml; the same names exist in VGG-16 and -19.
STYLE_LAYERS = {"relu1_2": 1.0, "relu2_2": 1.0, "relu3_3": 1.0, "relu4_3": 1.0}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Command-line options (also used by tests)."""
    parser.add_argument(
        "--variants",
        default="examples,plain,best",
        help="comma-separated variants (examples, plain, best, cl, compile, cl+compile, bf16+cl, tnorm+malloc, "
        "...) or 'all'",
    )
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | mps")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--base-width", type=int, default=32)
    parser.add_argument("--network", default="vgg19", help="loss network: vgg19 | vgg16 | random")
    parser.add_argument(
        "--weights-path",
        default=None,
        help="loss network weights (loss.weights_path); vgg16 without them and without the torch hub cache runs "
        "random weights of VGG-16's shapes",
    )
    parser.add_argument("--steps", type=int, default=3, help="timed steps per variant (median is reported)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps after compilation")
    parser.add_argument("--threads", type=int, default=0, help="torch.set_num_threads in workers (0 = default)")
    parser.add_argument(
        "--count-ops",
        type=int,
        nargs="?",
        const=25,
        default=0,
        metavar="TOP",
        help="instead of timing: count the copy_/add_/fill_ calls and bytes of one step per variant and list the "
        "TOP causes by bytes (default 25)",
    )
    parser.add_argument(
        "--unoptimized-copies",
        action="store_true",
        help="with --count-ops: each variant also with the step's copy optimizations off, side by side",
    )
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)  # internal: run one variant, print JSON


def best_variant(device: torch.device) -> str:
    """``best`` as options: train.malloc_reuse=true with what train.precision/channels_last/compile=auto resolve to
    (core.precision), so it follows the policy wherever that changes."""
    from core.precision import resolve_precision

    auto = resolve_precision(device, "auto", "auto", "auto", training=True)
    parts = [p for p, on in (("cl", auto.channels_last), ("compile", auto.compile)) if on]
    parts.append("malloc")  # train.malloc_reuse defaults to true
    if auto.name != "fp32":
        parts.insert(0, auto.name)
    return "+".join(parts)


def _expand(variants: str, device: torch.device) -> list[str]:
    from core.precision import cpu_has_native_bf16

    if variants == "all":
        names = ["examples", "plain", "malloc", "cl+malloc", "compile", "cl+compile"]
        if device.type == "cpu" and cpu_has_native_bf16():  # emulated bf16 is many times slower: not worth trying
            names += ["bf16+malloc", "bf16+cl+malloc"]
        if device.type == "cuda":
            names += ["bf16", "bf16+cl", "bf16+cl+compile", "fp16+cl+compile"]
        return names
    out = []
    for name in variants.split(","):
        if name == "best":
            name = best_variant(device)
        for part in name.split("+"):
            if part not in OPTIONS:
                raise SystemExit(f"error: unknown variant option {part!r}: use {', '.join(OPTIONS)}")
        if name not in out:
            out.append(name)
    return out


def _loss_fn(args: argparse.Namespace, temporal: bool = False) -> torch.nn.Module:
    """The PerceptualLoss every variant trains against (Johnson et al.'s layers on ``--network``), with the
    stability term at weight 1 for ``temporal`` variants."""
    from models.loss import PerceptualLoss

    return PerceptualLoss(
        args.network,
        ["relu2_2"],
        STYLE_LAYERS,
        1.0,
        1.0,
        1.0,
        weights_path=args.weights_path,
        temporal_weight=1.0 if temporal else 0.0,
    )


def vgg16_weights_offline() -> str | None:
    """Where torchvision's VGG-16 weights are without a download (the torch hub cache models/vgg.py reads), or
    None: a benchmark must not start a 528 MB download, nor hang on a machine without network."""
    from models.vgg import VGG16_FILE

    cached = os.path.join(torch.hub.get_dir(), "checkpoints", VGG16_FILE)
    return cached if os.path.isfile(cached) else None


def write_random_vgg16(path: Path) -> Path:
    """A torchvision-format VGG-16 state dict (``features.{i}.weight/bias``) with Kaiming-random weights of the
    real shapes, for timing where the trained weights are not on the machine: convolution speed does not depend on
    the weight values, and Kaiming scaling keeps activations in a normal range (no overflow or denormals)."""
    from models.vgg import IMAGENET_MEAN, IMAGENET_STD, VGG16_BLOCKS, LossNetwork, init_random, layer_names

    names = layer_names(VGG16_BLOCKS)
    net = LossNetwork("vgg16", VGG16_BLOCKS, [names[-1]], IMAGENET_MEAN, IMAGENET_STD)
    init_random(net)
    state = {}
    for name, module in net.layers.named_children():
        if isinstance(module, torch.nn.Conv2d):
            state[f"features.{names.index(name)}.weight"] = module.weight.detach().clone()
            state[f"features.{names.index(name)}.bias"] = module.bias.detach().clone()
    torch.save(state, path)
    return path


# ---- --count-ops: the memory-moving calls of one step -------------------------------------------------------------
# A step's ``aten::copy_`` (dtype casts, memory-format conversions, clones), ``aten::add_`` (gradient accumulation,
# optimizer updates) and ``aten::fill_`` (zeroing) calls are counted with torch.profiler, nested calls included (an
# ``aten::to`` that casts runs ``aten::_to_copy`` and then ``aten::copy_``), as the profile the speed issue quotes
# counts them. Counts and bytes are deterministic for a configuration (unlike times), so tests assert them. Bytes are
# those of the written tensor (the op's first argument), from the profiler's recorded shapes and dtypes. Each call
# gets a cause: its phase (``forward``, ``backward <autograd node>``, ``optimizer``), the outermost aten op it runs
# inside (``via``: e.g. ``aten::to`` for a cast) and, in the forward pass, the innermost project function.

COUNTED_OPS = ("aten::copy_", "aten::add_", "aten::fill_")
"""The memory-moving ops the speed issue named; ``aten::zero_`` runs ``aten::fill_`` and is counted through it."""

# Itemsize of the dtype names the profiler records (record_shapes); anything else counts 4 bytes per element.
_ITEMSIZE = {"float": 4, "double": 8, "c10::BFloat16": 2, "c10::Half": 2, "long int": 8, "int": 4, "bool": 1}
_PROJECT = str(common.REPO_ROOT) + os.sep
_VENV = os.sep + ".venv" + os.sep


@dataclass
class StepOps:
    """Counts and bytes per counted op, and per (op, cause)."""

    calls: Counter = field(default_factory=Counter)
    bytes: Counter = field(default_factory=Counter)
    cause_calls: Counter = field(default_factory=Counter)
    cause_bytes: Counter = field(default_factory=Counter)
    all_aten_calls: int = 0

    @property
    def total_calls(self) -> int:
        return sum(self.calls[op] for op in COUNTED_OPS)

    @property
    def total_bytes(self) -> int:
        return sum(self.bytes[op] for op in COUNTED_OPS)

    def summary(self) -> dict[str, int]:
        """{"copy_": calls, "copy_ bytes": bytes, ..., "total": calls, "total bytes": bytes} (plain names)."""
        out: dict[str, int] = {}
        for op in COUNTED_OPS:
            short = op.removeprefix("aten::")
            out[short], out[f"{short} bytes"] = self.calls[op], self.bytes[op]
        out["total"], out["total bytes"] = self.total_calls, self.total_bytes
        return out


def _written_bytes(event) -> int:
    shapes, types = event.input_shapes, event.input_dtypes
    if not shapes or not shapes[0]:
        return 0
    numel = 1
    for size in shapes[0]:
        numel *= int(size)
    return numel * _ITEMSIZE.get(types[0] if types else "float", 4)


def _project_frame(name: str) -> str | None:
    """``models/vgg.py(153): forward`` for a profiler Python-frame event of project code, else None."""
    if ".py(" not in name or _VENV in name:
        return None
    path = name.split("(", 1)[0]
    if path.startswith(_PROJECT):
        return name.removeprefix(_PROJECT)
    return name if not os.path.isabs(path) and (common.REPO_ROOT / path).is_file() else None


def _cause(event) -> str:
    """``phase | via | where`` of a counted event, from its profiler ancestors (Python frames are events too)."""
    phase, via, where, node = "forward", event.name, "", event.cpu_parent
    while node is not None:
        name = node.name
        if name.startswith("autograd::engine::evaluate_function: "):
            phase = "backward " + name.split(": ", 1)[1]
            break
        if name.startswith("Optimizer."):
            phase = "optimizer " + name.split("#", 1)[-1]
            break
        if name.startswith("aten::") and not where:
            via = name
        where = where or _project_frame(name) or ""
        node = node.cpu_parent
    return f"{phase} | via {via}" + (f" | {where}" if where and phase == "forward" else "")


def count_step_ops(step: Callable[[], object], with_causes: bool = True) -> StepOps:
    """Run ``step`` once under the profiler (CPU activities) and count its :data:`COUNTED_OPS`."""
    from torch.profiler import ProfilerActivity, profile

    ops = StepOps()
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True, with_stack=with_causes) as prof:
        step()
    for event in prof.events():
        if not event.name.startswith("aten::"):
            continue
        ops.all_aten_calls += 1
        if event.name not in COUNTED_OPS:
            continue
        size = _written_bytes(event)
        ops.calls[event.name] += 1
        ops.bytes[event.name] += size
        if with_causes:
            key = (event.name.removeprefix("aten::"), _cause(event))
            ops.cause_calls[key] += 1
            ops.cause_bytes[key] += size
    return ops


def format_ops(label: str, ops: StepOps, top: int = 25) -> str:
    """Totals, then the ``top`` causes by bytes."""
    s = ops.summary()
    lines = [
        f"{label}: "
        + ", ".join(f"{op} {s[op]} calls {s[op + ' bytes'] / 2**20:.1f} MiB" for op in ("copy_", "add_", "fill_"))
        + f"; total {s['total']} calls {s['total bytes'] / 2**20:.1f} MiB; all aten ops {ops.all_aten_calls}"
    ]
    for key, size in sorted(ops.cause_bytes.items(), key=lambda kv: (-kv[1], kv[0]))[:top]:
        lines.append(f"  {key[0]:<6}{ops.cause_calls[key]:>6} calls {size / 2**20:>9.2f} MiB  {key[1]}")
    return "\n".join(lines)


@contextlib.contextmanager
def unoptimized_copies(on: bool = True) -> Iterator[None]:
    """With ``on``: the step as it was before its copies were removed (the network layer by layer, with autocast's
    float32 reflection padding, Adam's per-parameter loop, autograd's two-product Gram backward), for side-by-side
    counts and for tests comparing the two. Restores every switch on exit."""
    from models import fused, loss, transformer
    from training import loop

    switches = (
        (fused, "FUSED_CPU_PATH"),
        (transformer, "PAD_IN_ACTIVATION_DTYPE"),
        (loop, "FUSED_ADAM"),
        (loss, "GRAM_BACKWARD_ONE_BMM"),
    )
    saved = [getattr(module, name) for module, name in switches]
    if on:
        for module, name in switches:
            setattr(module, name, False)
    try:
        yield
    finally:
        for (module, name), value in zip(switches, saved, strict=True):
            setattr(module, name, value)


def _make_step(args: argparse.Namespace, variant: str, device: torch.device) -> Callable[[], None]:
    """Variant ``variant``'s training step on its fixed batch, set up as ``fit`` sets it up."""
    from core.device import reuse_freed_memory
    from models import fused
    from models.transformer import TransformerNet
    from training.loop import Trainer, TrainOptions

    parts = set(variant.split("+"))
    if "layers" in parts:  # (count_ops restores it after each variant)
        fused.FUSED_CPU_PATH = False
    if "examples" in parts:
        parts.add("tnorm")
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
    if "tnorm" in parts:
        common.torch_instance_norms(net)
    loss_fn = _loss_fn(args, temporal="temporal" in parts).to(device)
    gen = torch.Generator().manual_seed(1)
    size = args.image_size
    loss_fn.set_style(torch.rand(1, 3, size, size, generator=gen).to(device))
    trainer = Trainer(net, loss_fn, options, device)
    batch = trainer.to_device(torch.rand(args.batch_size, 3, size, size, generator=gen))

    def step() -> None:
        trainer.step(1, batch)

    return step


def _worker(args: argparse.Namespace) -> dict:
    """Run one variant in this process and return its figures."""
    from core.device import resolve_device

    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    step = _make_step(args, args.worker, device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    # First calls: compilation (forward and backward graphs) plus first-touch allocation; timed on their own.
    start = time.perf_counter()
    step()
    common.synchronize(device)
    first_s = time.perf_counter() - start
    step_s = common.time_call(step, device, warmup=args.warmup, repeats=args.steps)
    cuda = device.type == "cuda"
    peak_mb = torch.cuda.max_memory_allocated(device) / 2**20 if cuda else common.peak_rss_mb()
    return {"variant": args.worker, "first_s": first_s, "step_s": step_s, "peak_mb": peak_mb}


def _step_flops(args: argparse.Namespace, device: torch.device) -> float:
    """FLOPs of one fp32 training step (forward + backward of network and loss), counted by the flop counter on the
    network's layers (the fused CPU path's last convolution does more multiply-adds, by zeros, for the same work)."""
    from torch.utils.flop_counter import FlopCounterMode

    from models import fused
    from models.transformer import TransformerNet

    net = TransformerNet(base_width=args.base_width).to(device)
    loss_fn = _loss_fn(args).to(device)
    loss_fn.set_style(torch.rand(1, 3, args.image_size, args.image_size, device=device))
    batch = torch.rand(args.batch_size, 3, args.image_size, args.image_size, device=device)
    with FlopCounterMode(display=False) as counter, fused.layer_by_layer():
        loss_fn(net(batch), batch)["total"].backward()
    return float(counter.get_total_flops())


def count_ops(args: argparse.Namespace) -> int:
    """``--count-ops``: the copy_/add_/fill_ calls and bytes of one step (after a warm-up step) of each variant,
    with their causes (count_step_ops); ``--unoptimized-copies`` adds each variant with the copies the
    step used to make (unoptimized_copies), side by side."""
    from core.device import resolve_device
    from models import fused

    device = resolve_device(args.device)
    variants = _expand(args.variants, device)
    print(f"# batch {args.batch_size} x {args.image_size}px, base_width {args.base_width}, loss {args.network}")
    summaries = []
    for variant in variants:
        for optimized in (False, True) if args.unoptimized_copies else (True,):
            saved = fused.FUSED_CPU_PATH
            with unoptimized_copies(not optimized):
                step = _make_step(args, variant, device)
                step()  # warm-up: the optimizer creates its state on the first step
                ops = count_step_ops(step)
            fused.FUSED_CPU_PATH = saved
            label = variant if optimized else f"{variant} (unoptimized copies)"
            print(format_ops(label, ops, top=args.count_ops))
            summaries.append((label, ops.summary()))
    print(f"{'per step':<34}" + "".join(f"{k:>12}" for k in ("copy_", "add_", "fill_", "total")) + "   MiB (total)")
    for label, s in summaries:
        calls = "".join(f"{s[k]:>12}" for k in ("copy_", "add_", "fill_", "total"))
        print(f"{label:<34}{calls}{s['total bytes'] / 2**20:>13.1f}")
    return 0


def run(args: argparse.Namespace) -> int:
    """Run the variants (each in a subprocess) and print a table; returns the exit status."""
    if args.worker:
        print(json.dumps(_worker(args)))
        return 0
    if args.count_ops:
        return count_ops(args)
    with tempfile.TemporaryDirectory(prefix="faststyle-bench-train-") as tmp:
        if args.network == "vgg16" and args.weights_path is None:
            args.weights_path = vgg16_weights_offline()
            if args.weights_path is None:
                args.weights_path = str(write_random_vgg16(Path(tmp) / "vgg16-random.pth"))
                print(
                    "# !!! VGG-16: torchvision's weights are not on this machine (torch hub cache; --weights-path): "
                    "RANDOM weights of VGG-16's shapes. Speed does not depend on the weights; the losses are "
                    "meaningless. !!!"
                )
        return _run_variants(args)


def _run_variants(args: argparse.Namespace) -> int:
    # Long: each worker's command line, then the table, whose header and rows must keep the same columns.
    from core.device import environment_line, resolve_device

    device = resolve_device(args.device)
    variants = _expand(args.variants, device)
    print(environment_line(device))
    print(common.precision_line(device))
    if "best" in args.variants.split(","):
        print(f"# best = {best_variant(device)}")
    weights = f" (weights {args.weights_path})" if args.weights_path else ""
    print(
        f"# batch {args.batch_size} x {args.image_size}px, base_width {args.base_width}, loss {args.network}{weights}, "
        f"median of {args.steps} steps after {args.warmup} warm-up; each variant in a fresh process"
    )
    from core.precision import precision_name

    reduced = common.reduced_dtype(device)
    peaks = {
        "fp32": common.matmul_peak_gflops(device),
        precision_name(reduced): common.matmul_peak_gflops(device, reduced),
    }
    flops = _step_flops(args, device)
    print(
        "# matmul peaks (measured now): "
        + ", ".join(f"{label} {peak:.1f} GFLOP/s" for label, peak in peaks.items())
        + f"; one step = {flops / 1e9:.1f} GFLOP (fp32 count)"
    )
    results = []
    for variant in variants:
        worker_args = [
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
        if args.weights_path:
            worker_args += ["--weights-path", args.weights_path]
        # This process's folder: --weights-path may be relative to it.
        result, stderr = common.run_worker("train", worker_args, cwd=None)
        if result is None:
            print(f"{variant}: FAILED\n{stderr[-2000:]}", file=sys.stderr)
            continue
        results.append(result)
    if not results:
        return 1
    by_name = {r["variant"]: r for r in results}
    # pytorch/examples' configuration is what the issue's speed-ups are measured against; without it, ours.
    base = by_name.get("examples") or by_name.get("plain") or results[0]
    plain = by_name.get("plain") if base["variant"] != "plain" else None
    mem = "peak alloc MiB" if device.type == "cuda" else "peak RSS MiB"
    pct = "".join(f"{'% ' + label:>8}" for label in peaks)
    print(
        f"{'variant':<18}{'s/step':>9}{'images/s':>10}{'GFLOP/s':>9}{pct}{mem:>16}{'first step s':>14}"
        f"{'vs ' + base['variant']:>14}{'amortised':>11}{'vs plain' if plain else '':>10}"
    )
    for r in results:
        # Amortised: the extra cost of the first (compiling) step spread over a 40k-step run.
        amortised = r["step_s"] + max(r["first_s"] - r["step_s"], 0.0) / RUN_STEPS
        gflops = flops / r["step_s"] / 1e9
        of_peaks = "".join(f"{100 * gflops / peak:>7.0f}%" for peak in peaks.values())
        vs_plain = f"{plain['step_s'] / r['step_s']:>9.2f}x" if plain else ""
        print(
            f"{r['variant']:<18}{r['step_s']:>9.3f}{args.batch_size / r['step_s']:>10.2f}{gflops:>9.1f}{of_peaks}"
            f"{r['peak_mb']:>16.0f}{r['first_s']:>14.1f}"
            f"{base['step_s'] / r['step_s']:>13.2f}x{base['step_s'] / amortised:>10.2f}x{vs_plain}"
        )
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = tool_parser("python -m benchmarks train", __doc__)
    add_arguments(parser)
    return run(parser.parse_args(argv))
