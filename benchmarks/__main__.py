"""faststyle benchmarks: each prints figures measured side by side in one run (never asserted).

    python -m benchmarks NAME [options]          # run one benchmark
    python -m benchmarks NAME --help             # what it measures and its options
    flock /tmp/faststyle-cpu.lock python -m benchmarks NAME   # one at a time on a shared machine

Each benchmark is a module benchmarks/NAME.py with ``main(argv)``; benchmarks/common.py holds what they share. This
command only dispatches and imports the chosen benchmark alone: each pulls in different parts of the project, and
``huge`` keeps its own process free of torch.
"""

from __future__ import annotations

import argparse
import importlib
import sys

BENCHMARKS = {
    "stylize": "images/s, 1080p latency, memory and GFLOP/s (plain, fp32, bf16, auto) with speed-ups, tiled 4K/8K",
    "train": "s/step, images/s, peak memory, GFLOP/s: pytorch/examples' configuration vs ours vs precision=auto",
    "norm": "our InstanceNorm vs nn.InstanceNorm2d, forward + backward",
    "data": "decode + resize + crop images/s of the training loader with 0, 1, 2 workers",
    "video": "video frames/s and real-time factor per frame size and precision",
    "huge": "stylize.py's peak RSS on a 12000x12000 photo and flat PNG vs its memory bound",
    "export": "onnxruntime vs PyTorch eager for one 1920x1080 image",
    "web": "the exported web page's time per frame in headless Chromium vs PyTorch as stylize runs it",
}
"""Every benchmark (its module is benchmarks/NAME.py) and what it measures, in one line."""


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    listing = "benchmarks:\n" + "\n".join(f"  {name:<9} {what}" for name, what in BENCHMARKS.items())
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description=__doc__,
        epilog=listing,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("name", choices=list(BENCHMARKS), metavar="NAME", help="which benchmark to run (below)")
    if not argv:
        parser.print_help()
        return 2
    if argv[0] not in BENCHMARKS:
        parser.parse_args(argv[:1])  # --help (exit 0) or an unknown name (exit 2, the names listed)
        return 2
    # The benchmark's own parser reads the rest: its parse_args is the first one this command calls.
    module = importlib.import_module(f"benchmarks.{argv[0]}")
    return int(module.main(argv[1:]) or 0)


if __name__ == "__main__":
    raise SystemExit(main())
