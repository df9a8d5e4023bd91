"""How close a 16-bit stylize is to fp32: PSNR of bf16 (or fp16 on CUDA) against fp32, at 1920x1080, per model.

    python -m evaluation precision_check outputs/demo/<run>/model.pth
    python -m evaluation precision_check a.pth b.pth --as-examples --image photo.jpg --out outputs/reports/check

Each model is made ready by inference.network.load_network, the call stylize uses (the network and the photo cast
to the 16-bit type, channels_last as ``auto`` picks), once in fp32 and once in the 16-bit precision, and run on the
same photo resized to 1920x1080 (--device, default auto). Printed per model: PSNR of the float outputs and of the
8-bit images stylize writes (peak 1.0 / 255), the largest difference, and the same for stylize's Runner through the
exact tiled executor in the 16-bit precision (forced by a small memory budget) against the untiled fp32 result. The
issue's quality gate is PSNR >= 45 dB.

``--as-examples`` first writes each model in pytorch/examples' file format
(interop.pytorch_examples.to_examples_state_dict; needs their architecture: nearest upsampling, linear output)
and reads it back through the importer, as a user's downloaded pytorch/examples file would be read. The PNGs
(fp32, 16-bit, |difference| x 20) go to ``--out``.
Figures are printed, never asserted.
"""

from __future__ import annotations

import argparse
import copy
import tempfile
from pathlib import Path

import torch

from core.cli import add_device_option, run_tool, tool_parser
from core.metrics import psnr
from evaluation.held_out import DEFAULT_HELD_OUT
from evaluation.runs import load_model_network

# A held-out photo (never a training image of the demo), resized to 1920x1080.
CONTENT = DEFAULT_HELD_OUT / "china.jpg"


def _tiled(network, loaded, device: torch.device, precision: str, max_memory_mb: float) -> torch.Tensor:
    """The 8-bit (3, H, W) image stylize's Runner writes for one decoded image when ``max_memory_mb`` forces the
    exact tiled executor."""
    from omegaconf import OmegaConf

    from data.io import pil_to_tensor
    from inference.runner import Runner

    cfg = OmegaConf.create(
        {
            "precision": precision,
            "channels_last": "auto",
            "max_memory_mb": max_memory_mb,
            "tmp_dir": None,
            "preserve_color": False,
            "strength": 1.0,
        }
    )
    (out,) = Runner.from_module(copy.deepcopy(network.net), device, cfg)([loaded])
    if isinstance(out, torch.Tensor):  # untiled after all (a tiny image): rounded as save_result would
        from data.io import to_uint8

        return to_uint8(out)
    return (pil_to_tensor(out) * 255).round().to(torch.uint8)


def _as_examples(path: Path, tmp: Path, style: str | None) -> Path:
    """``path`` written in pytorch/examples' format (a bare state dict) into ``tmp``; refuses other architectures."""
    from interop.pytorch_examples import to_examples_state_dict

    network = load_model_network(path, style=style, device="cpu")
    if network.choice is not None:
        print(f"multi-style model: checking style {network.choice.label}", flush=True)
    target = tmp / f"{path.parent.name}_{path.stem}_examples.pth"
    torch.save(to_examples_state_dict(network.net), target)
    return target


def check(path: Path, args: argparse.Namespace, device: torch.device, tmp: Path) -> None:
    """Print one model's line (module docstring) and write its PNGs."""
    from core.precision import configure_backends
    from data.io import load_image, pil_to_tensor, resize_to, save_image, to_uint8
    from inference.jobs import Job
    from inference.runner import Loaded

    source = _as_examples(path, tmp, args.style) if args.as_examples else path
    networks = {
        name: load_model_network(source, style=args.style, device=device, precision=name, channels_last="auto")
        for name in ("fp32", args.precision)
    }
    configure_backends(networks[args.precision].policy)
    if networks["fp32"].choice is not None:
        print(f"multi-style model: checking style {networks['fp32'].choice.label}", flush=True)
    width = networks["fp32"].net.config()["base_width"]
    img = resize_to(load_image(args.image), args.width, args.height)
    x = pil_to_tensor(img).unsqueeze(0)
    ref, low = (networks[name](x)[0] for name in ("fp32", args.precision))
    ref8, low8 = to_uint8(ref), to_uint8(low)
    loaded = Loaded(Job(source=Path(args.image), target=tmp / "unused.png"), img.copy(), size=(img.height, img.width))
    tiled8 = _tiled(networks[args.precision], loaded, device, args.precision, args.tiled_budget_mb)
    label = f"{path.parent.name}/{path.name}" + (" (as pytorch/examples file)" if args.as_examples else "")
    print(
        f"{label}, width {width}, {args.width}x{args.height}: {args.precision} vs fp32: "
        f"PSNR {psnr(low, ref):.1f} dB (float), {psnr(low8.float(), ref8.float(), 255.0):.1f} dB (8-bit), "
        f"max |diff| {(low - ref).abs().max().item():.4f}, 8-bit levels changed on "
        f"{100 * (low8 != ref8).float().mean().item():.1f}% of values; "
        f"tiled {args.precision} (budget {args.tiled_budget_mb:g} MiB) vs untiled fp32: "
        f"{psnr(tiled8.float(), ref8.float(), 255.0):.1f} dB (8-bit)",
        flush=True,
    )
    out = Path(args.out)
    stem = f"{path.parent.name}_{path.stem}"
    save_image(ref, out / f"{stem}_fp32.png")
    save_image(low, out / f"{stem}_{args.precision}.png")
    save_image(((low - ref).abs() * 20).clamp(0, 1), out / f"{stem}_diff_x20.png")


def main(argv: list[str] | None = None) -> int:
    parser = tool_parser("python -m evaluation precision_check", __doc__)
    parser.add_argument("models", nargs="+", type=Path, help="model files (faststyle model.pth or pytorch/examples)")
    parser.add_argument("--precision", default="bf16", choices=("bf16", "fp16"), help="the 16-bit precision")
    add_device_option(parser)
    parser.add_argument("--image", default=str(CONTENT), help="the photo (resized to --width x --height)")
    parser.add_argument("--width", type=int, default=1920)
    parser.add_argument("--height", type=int, default=1080)
    parser.add_argument("--tiled-budget-mb", type=float, default=256, help="memory budget that forces tiling")
    parser.add_argument("--as-examples", action="store_true", help="round-trip through pytorch/examples' format")
    parser.add_argument("--style", default=None, help="multi-style models: the style or mix to check (default: first)")
    parser.add_argument("--out", default="outputs/reports/precision_check", help="where the PNGs go (%(default)s)")
    args = parser.parse_args(argv)

    def work() -> None:
        from core.device import environment_line, resolve_device

        device = resolve_device(args.device)
        print(environment_line(device))
        with tempfile.TemporaryDirectory() as tmp:
            for path in args.models:
                check(path, args, device, Path(tmp))

    return run_tool(work)


if __name__ == "__main__":
    raise SystemExit(main())
