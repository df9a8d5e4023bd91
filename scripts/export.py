"""Export a faststyle model to ONNX, TorchScript or a web page.

    python -m scripts.export run/model.pth --format onnx -o mosaic.onnx                  # dynamic N, H, W
    python -m scripts.export run/model.pth --format onnx --height 720 --width 1280 -o mosaic_720p.onnx
    python -m scripts.export run/model.pth --format torchscript -o mosaic.ts
    python -m scripts.export styles/model.pth --format onnx --verify -o styles.onnx     # multi-style: 2 inputs
    python stylize.py model=mosaic.onnx input=photo.jpg                                   # runs via onnxruntime
    python -m scripts.export styles/model.pth --format web --out styles_web             # a static page folder
    python -m http.server -d styles_web --bind 127.0.0.1                                 # open http://127.0.0.1:8000

Input: anything ``interop.read.read_torch_model_file`` reads (our model.pth, or a pytorch/examples state dict).
Both formats take ``image`` (N, 3, H, W) float32 RGB in [0, 1], H, W >= 8, and return the stylized (N, 3, H, W)
in [0, 1]. A multi-style model (num_styles S > 1) takes a second input ``style_weights``: (S,) float32 weights
>= 0, not all 0, in the order of meta["styles"], normalised to sum 1 inside the graph (so raw slider values work;
one-hot picks one style), applied to the whole batch. ONNX: opset 18 by default, torch.export-based exporter
(needs onnx + onnxscript), one InstanceNormalization node per instance norm; the model config and meta (and the
style names, key "styles") are stored in the ONNX metadata (key "faststyle"). ``--verify`` runs the export
(onnxruntime / torch.jit.load) against PyTorch on a few sizes, for a multi-style model with each style alone and
one mix, and fails if any output differs by more than 1e-4. An existing output file is replaced only with
``--overwrite`` (the model file itself never). Details: interop/export.py.

``--format web`` writes a folder (interop/web_export.py): the page, the model as ONNX (weights stored in float16
unless ``--web-weights fp32``, computed in float32), model.json and the
onnxruntime-web files it loads, copied from web/node_modules (``make web-deps``); it runs offline from any static
host. An existing non-empty folder is written into only with ``--overwrite``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from core.cli import add_overwrite_option, check_output_file, run_tool, tool_parser
from core.errors import FaststyleError
from interop.onnx_export import DEFAULT_OPSET, ONNX_STYLE_INPUT_NAME, export_onnx
from interop.read import read_torch_model_file
from interop.torchscript_export import export_torchscript
from interop.web_export import MODEL_FILE as WEB_MODEL_FILE
from interop.web_export import WEIGHTS as WEB_WEIGHTS
from interop.web_export import check_output_dir, export_web, fp16_weight_twin, runtime_files
from models.styles import style_names

SUFFIXES = {"onnx": ".onnx", "torchscript": ".ts", "web": "_web"}
VERIFY_TOLERANCE = 1e-4
VERIFY_SIZES = ((64, 64), (37, 53), (90, 31))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = tool_parser("python -m scripts.export", __doc__, summary_only=True)
    parser.add_argument("model", type=Path, help="model.pth (or a pytorch/examples state dict)")
    parser.add_argument("--format", choices=sorted(SUFFIXES), required=True)
    parser.add_argument(
        "-o",
        "--output",
        "--out",
        type=Path,
        default=None,
        help="output file, or folder for --format web (default: the model path with .onnx / .ts / _web)",
    )
    add_overwrite_option(parser)
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--dynamic", action="store_true", help="dynamic batch, height and width (the default)")
    size.add_argument("--height", type=int, default=None, help="fixed input height (with --width)")
    parser.add_argument("--width", type=int, default=None, help="fixed input width (with --height)")
    parser.add_argument("--opset", type=int, default=DEFAULT_OPSET, help=f"ONNX opset (default {DEFAULT_OPSET})")
    parser.add_argument("--verify", action="store_true", help="compare the export with PyTorch (tolerance 1e-4)")
    parser.add_argument(
        "--web-weights",
        choices=WEB_WEIGHTS,
        default="fp16",
        help="--format web: how model.onnx stores the weights (fp16: half the download, computed in float32)",
    )
    return parser.parse_args(argv)


def verify_mixes(num_styles: int) -> list[torch.Tensor | None]:
    """The style inputs --verify checks: None for a one-style model; else each style alone (one-hot) and one
    uneven, un-normalised mix of all of them (the graph must normalise it as TransformerNet does)."""
    if num_styles == 1:
        return [None]
    return [*torch.eye(num_styles), torch.arange(1, num_styles + 1, dtype=torch.float32)]


def verify(net: torch.nn.Module, path: Path, fmt: str, sizes: list[tuple[int, int]]) -> float:
    """Max |export - PyTorch| over random (2, 3, H, W) batches of the given sizes (and, for a multi-style model,
    over verify_mixes); raises FaststyleError above VERIFY_TOLERANCE."""
    if fmt == "onnx":
        from interop.onnx_model import OnnxStyleModel

        onnx_model = OnnxStyleModel(path)

        def exported(x: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor:
            return onnx_model(x) if weights is None else onnx_model.for_style(weights)(x)
    else:
        script = torch.jit.load(str(path))

        def exported(x: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor:
            return script(x) if weights is None else script(x, weights)

    worst = 0.0
    generator = torch.Generator().manual_seed(0)
    for height, width in sizes:
        x = torch.rand(2, 3, height, width, generator=generator)
        for weights in verify_mixes(getattr(net, "num_styles", 1)):
            with torch.no_grad():
                expected = net(x) if weights is None else net(x, weights)
                worst = max(worst, float((exported(x, weights) - expected).abs().max()))
    if worst > VERIFY_TOLERANCE:
        raise FaststyleError(f"exported {fmt} differs from PyTorch by {worst:.2e} (> {VERIFY_TOLERANCE}): report a bug")
    return worst


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    output = args.output
    if output is None:  # model.pth -> model.onnx, model.ts, or the folder model_web
        suffix = SUFFIXES[args.format]
        output = (
            args.model.with_name(args.model.stem + suffix) if args.format == "web" else args.model.with_suffix(suffix)
        )

    def work() -> None:
        if (args.height is None) != (args.width is None):
            raise FaststyleError("give both --height and --width for a fixed-size export, or --dynamic")
        if args.format == "web":
            if args.height is not None:
                raise FaststyleError("--format web exports a network for any size: leave out --height and --width")
            runtime_files()  # the missing runtime is one line before anything slow
            check_output_dir(output, args.overwrite)
        else:
            check_output_file(output, {"model": args.model}, args.overwrite)
        net, meta = read_torch_model_file(args.model, device="cpu")
        if args.format == "web":
            export_web(net, output, meta=meta, overwrite=args.overwrite, opset=args.opset, weights=args.web_weights)
        elif args.format == "onnx":
            export_onnx(net, output, height=args.height, width=args.width, opset=args.opset, meta=meta)
        else:
            export_torchscript(net, output, height=args.height, width=args.width, meta=meta)
        summary = f"wrote {output} ({args.format})"
        if net.num_styles > 1:
            names = style_names(meta, net.num_styles)
            summary += f", second input {ONNX_STYLE_INPUT_NAME} ({net.num_styles},): {', '.join(names)}"
        if args.verify:
            fixed = args.height is not None
            sizes = [(args.height, args.width)] if fixed else list(VERIFY_SIZES)
            checked = output / WEB_MODEL_FILE if args.format == "web" else output
            kind = "onnx" if args.format == "web" else args.format
            # fp16 weights: the same graph on rounded weights, so PyTorch computes with the same rounded weights
            reference = fp16_weight_twin(net) if args.format == "web" and args.web_weights == "fp16" else net
            summary += f", max |diff| vs PyTorch {verify(reference, checked, kind, sizes):.2e}"
        if args.format == "web":
            summary += f"; serve it with: python -m http.server -d {output} --bind 127.0.0.1"
        print(summary)

    return run_tool(work)


if __name__ == "__main__":
    raise SystemExit(main())
