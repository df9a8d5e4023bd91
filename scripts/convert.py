"""Convert a pytorch/examples fast_neural_style model file into a faststyle ``model.pth``.

    python -m scripts.convert mosaic.pth -o models/mosaic_faststyle.pth
    python stylize.py model=models/mosaic_faststyle.pth input=photo.jpg

The input is the bare state dict their training script saves (``.pth`` / ``.model``); it is read with
``torch.load(weights_only=True)``, so a file carrying pickled code is refused and never executed. Width and number of
residual blocks are read from the tensor shapes (interop/legacy.py). The output records where it came from:
``meta = {"source": "pytorch/examples", "source_file": <name>, "source_sha256": <hex>, "style": <stem>}``.
(``stylize.py model=<their file>`` also works directly; converting once gives a self-describing file.) An existing
output file is replaced only with ``--overwrite`` (the source never).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from core.cli import add_overwrite_option, check_output_file, run_tool, tool_parser
from interop.pytorch_examples import read_examples_file
from models.modelfile import save_model


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = tool_parser("python -m scripts.convert", __doc__, summary_only=True)
    parser.add_argument("source", type=Path, help="pytorch/examples TransformerNet state dict (.pth / .model)")
    parser.add_argument(
        "-o",
        "--output",
        type=Path,
        default=None,
        help="faststyle model file to write (default: <source stem>_faststyle.pth beside it)",
    )
    parser.add_argument("--style", default=None, help="style name stored in meta (default: the source file's stem)")
    add_overwrite_option(parser)
    return parser.parse_args(argv)


def convert(source: Path, output: Path, style: str | None = None, overwrite: bool = False) -> dict:
    """Import ``source`` and write it to ``output`` with save_model; returns the meta written."""
    check_output_file(output, {"source file": source}, overwrite)
    net, meta = read_examples_file(source)
    if style:
        meta["style"] = style
    meta["converted_by"] = "scripts/convert.py"
    save_model(output, net, meta)
    return meta


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    output = args.output or args.source.with_name(f"{args.source.stem}_faststyle.pth")

    def work() -> None:
        meta = convert(args.source, output, style=args.style, overwrite=args.overwrite)
        print(f"wrote {output} (style {meta['style']!r}, source sha256 {meta['source_sha256'][:12]}...)")

    return run_tool(work)


if __name__ == "__main__":
    raise SystemExit(main())
