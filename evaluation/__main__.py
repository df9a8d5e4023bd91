"""faststyle's reports: each measures trained networks on held-out photos or clips and prints (and writes) a table.

    python -m evaluation compare_runs <multirun dir or run dirs>    # held-out losses, contrast invariance, figures
    python -m evaluation compare_styles <multi run> <one-style runs>  # a multi-style network vs one-style networks
    python -m evaluation video_stability <model.pth> [<model.pth> ...]  # flicker: the warping error on clips
    python -m evaluation precision_check <model.pth> [...]          # PSNR of a 16-bit stylize against fp32
    python -m evaluation <name> --help

Each report lives in evaluation/reports/<name>.py with ``main(argv)``; this file only dispatches, importing the
chosen report alone (each pulls in different parts of the project).
"""

from __future__ import annotations

import argparse
import importlib
import sys

REPORTS = ("compare_runs", "compare_styles", "video_stability", "precision_check")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in REPORTS:
        parser = argparse.ArgumentParser(
            prog="python -m evaluation", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
        )
        parser.add_argument("report", choices=REPORTS, help="which report to run")
        parser.parse_args(argv[:1])  # prints usage / --help and exits
    module = importlib.import_module(f"evaluation.reports.{argv[0]}")
    return int(module.main(argv[1:]) or 0)


if __name__ == "__main__":
    raise SystemExit(main())
