"""Convert a pytorch/examples fast_neural_style model file into a faststyle ``model.pth``.

    python -m scripts.convert mosaic.pth -o models/mosaic_faststyle.pth
    python stylize.py model=models/mosaic_faststyle.pth input=photo.jpg

The input is the bare state dict their training script saves (``.pth`` / ``.model``); it is read with
``torch.load(weights_only=True)``, so a file carrying pickled code is refused and never executed. Width and number of
residual blocks are read from the tensor shapes (interop/legacy.py). The output records where it came from:
``meta = {"source": "pytorch/examples", "source_file": <name>, "source_sha256": <hex>, "style": <stem>}``.
(``stylize.py model=<their file>`` also works directly; converting once gives a self-describing file.)
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from core.errors import FaststyleError, exit_with_error
from core.fileio import same_file
from interop.pytorch_examples import read_examples_file as load_legacy_file
from models.modelfile import save_model

REPO_ROOT = Path(__file__).resolve().parents[1]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("source", type=Path, help="pytorch/examples TransformerNet state dict (.pth / .model)")
    parser.add_argument(
        "-o",
        "--output",
        type=Path,
        default=None,
        help="faststyle model file to write (default: <source stem>_faststyle.pth beside it)",
    )
    parser.add_argument("--style", default=None, help="style name stored in meta (default: the source file's stem)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    return parser.parse_args(argv)


def convert(source: Path, output: Path, style: str | None = None, overwrite: bool = False) -> dict:
    """Import ``source`` and write it to ``output`` with save_model; returns the meta written."""
    # Same file first: "pass --overwrite" would be wrong advice for an output that is the source itself.
    if same_file(output, source):
        raise FaststyleError("the output must not replace the source file: choose another -o")
    if output.exists() and not overwrite:
        raise FaststyleError(f"{output} exists: pass --overwrite or choose another -o")
    net, meta = load_legacy_file(source)
    if style:
        meta["style"] = style
    meta["converted_by"] = "scripts/convert.py"
    save_model(output, net, meta)
    return meta


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    output = args.output or args.source.with_name(f"{args.source.stem}_faststyle.pth")
    try:
        meta = convert(args.source, output, style=args.style, overwrite=args.overwrite)
    except FaststyleError as err:
        exit_with_error(err)
    print(f"wrote {output} (style {meta['style']!r}, source sha256 {meta['source_sha256'][:12]}...)")


if __name__ == "__main__":
    main()
