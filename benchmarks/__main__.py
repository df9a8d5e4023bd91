"""faststyle benchmarks: each prints figures measured side by side in one run.

    python -m scripts.bench data      # decode + resize + crop images/s with 0/1/2 workers (data pipeline)
    python -m scripts.bench train     # s/step, images/s, peak memory, GFLOP/s vs measured fp32 and bf16 matmul peaks;
                                      # pytorch/examples' configuration vs ours vs precision=auto
    python -m scripts.bench stylize   # images/s, 1080p latency/memory/GFLOP/s (plain, fp32, bf16, auto) with
                                      # speed-ups, tiled 4K/8K peak memory
    python -m scripts.bench huge      # peak RSS of stylize.py on a 12000 x 12000 image against its memory bound
    python -m scripts.bench <name> --help

Each subcommand lives in scripts/bench_<name>.py (with `add_arguments(parser)` and `run(args)`); this file only
dispatches, so the modules stay importable and runnable on their own.
"""

from __future__ import annotations

import argparse
import importlib
import sys

SUBCOMMANDS = {
    "data": "bench_data",
    "train": "bench_train",
    "stylize": "bench_stylize",
    "huge": "bench_huge",
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=sorted(SUBCOMMANDS), help="which benchmark to run")
    if not argv or argv[0] not in SUBCOMMANDS:
        parser.parse_args(argv)  # prints usage / --help and exits
    # Import only the chosen benchmark: each pulls in different parts of the project.
    module = importlib.import_module(f"scripts.{SUBCOMMANDS[argv[0]]}")
    sub_parser = argparse.ArgumentParser(
        prog=f"python -m scripts.bench {argv[0]}",
        description=module.__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    module.add_arguments(sub_parser)
    return int(module.run(sub_parser.parse_args(argv[1:])) or 0)


if __name__ == "__main__":
    raise SystemExit(main())
