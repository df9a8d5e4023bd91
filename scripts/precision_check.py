"""How close a 16-bit stylize is to fp32: PSNR of bf16 (or fp16 on CUDA) against fp32, at 1920x1080, per model.

    python -m scripts.precision_check outputs/demo/<run>/model.pth
    python -m scripts.precision_check a.pth b.pth --as-examples --image photo.jpg --out outputs/reports/precision_check

Each model runs through stylize's own Runner (inference/runner.py: the network and the photo cast to the 16-bit
type, channels_last as ``auto`` picks), once in fp32 and once in the 16-bit precision, on the same photo resized to
1920x1080. Printed per model: PSNR of the float outputs and of the 8-bit images stylize writes (peak 1.0 / 255),
the largest difference, and the same for the exact tiled executor in the 16-bit precision (forced by a small memory
budget) against the untiled fp32 result. The issue's quality gate is PSNR >= 45 dB.

``--as-examples`` first writes each model in pytorch/examples' file format (interop.legacy.to_legacy_state_dict;
needs their architecture: nearest upsampling, linear output) and reads it back through the importer, as a user's
downloaded pytorch/examples file would be read. The PNGs (fp32, 16-bit, |difference| x 20) go to ``--out``.
Figures are printed, never asserted.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
from omegaconf import OmegaConf

from core.metrics import psnr
from scripts.benchutil import REPO_ROOT, environment_line

# A held-out photo (never a training image of the demo), resized to 1920x1080.
CONTENT = REPO_ROOT / "data" / "samples" / "held_out" / "china.jpg"


def _cfg(precision: str, max_memory_mb: float) -> OmegaConf:
    return OmegaConf.create(
        {
            "precision": precision,
            "channels_last": "auto",
            "max_memory_mb": max_memory_mb,
            "tmp_dir": None,
            "preserve_color": False,
            "strength": 1.0,
        }
    )


def _stylized(net: torch.nn.Module, loaded, device: torch.device, precision: str, max_memory_mb: float):
    """The Runner's result for one decoded image, as (3, H, W) float32 in [0, 1] and as the 8-bit image."""
    import copy

    from data.io import pil_to_tensor, to_uint8
    from inference.runner import Runner

    runner = Runner.from_module(copy.deepcopy(net), device, _cfg(precision, max_memory_mb))
    (out,) = runner([loaded])
    if isinstance(out, torch.Tensor):  # untiled: the float result, finished as save_result would
        return out, to_uint8(out)
    # tiled: the finished 8-bit image; its float values are not kept by the tiled path
    as_uint8 = (pil_to_tensor(out) * 255).round().to(torch.uint8)
    return None, as_uint8


def _one_style(net: torch.nn.Module, meta: dict, style: str | None) -> torch.nn.Module:
    """A multi-style network folded into one style (--style; the first by default), as stylize runs it."""
    if net.num_styles == 1:
        return net
    from models.styles import parse_style, style_names

    choice = parse_style(style if style is not None else 0, style_names(meta, net.num_styles))
    print(f"multi-style model: checking style {choice.label}", flush=True)
    return net.for_style(choice.weights)


def _as_examples(path: Path, tmp: Path, style: str | None) -> Path:
    """``path`` written in pytorch/examples' format (a bare state dict) into ``tmp``; refuses other architectures."""
    from interop.pytorch_examples import to_examples_state_dict as to_legacy_state_dict
    from interop.read import read_torch_model_file as load_any_model

    net, meta = load_any_model(path, device="cpu")
    net = _one_style(net, meta, style)
    target = tmp / f"{path.parent.name}_{path.stem}_examples.pth"
    torch.save(to_legacy_state_dict(net), target)
    return target


def check(path: Path, args: argparse.Namespace, device: torch.device, tmp: Path) -> None:
    from data.io import load_image, resize_to, save_image
    from inference.jobs import Job
    from inference.runner import Loaded
    from interop.read import read_torch_model_file as load_any_model

    source = _as_examples(path, tmp, args.style) if args.as_examples else path
    net, meta = load_any_model(source, device="cpu")
    net = _one_style(net, meta, args.style)
    width = net.config()["base_width"]  # load_any_model always gives a TransformerNet
    img = resize_to(load_image(args.image), args.width, args.height)
    job = Job(source=Path(args.image), target=tmp / "unused.png")

    def loaded() -> Loaded:
        return Loaded(job, img.copy(), size=(img.height, img.width))

    ref, ref8 = _stylized(net, loaded(), device, "fp32", 1e6)
    low, low8 = _stylized(net, loaded(), device, args.precision, 1e6)
    _, tiled8 = _stylized(net, loaded(), device, args.precision, args.tiled_budget_mb)
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
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("models", nargs="+", type=Path, help="model files (faststyle model.pth or pytorch/examples)")
    parser.add_argument("--precision", default="bf16", choices=("bf16", "fp16"), help="the 16-bit precision")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--image", default=str(CONTENT), help="the photo (resized to --width x --height)")
    parser.add_argument("--width", type=int, default=1920)
    parser.add_argument("--height", type=int, default=1080)
    parser.add_argument("--tiled-budget-mb", type=float, default=256, help="memory budget that forces tiling")
    parser.add_argument("--as-examples", action="store_true", help="round-trip through pytorch/examples' format")
    parser.add_argument("--style", default=None, help="multi-style models: the style or mix to check (default: first)")
    parser.add_argument("--out", default="outputs/reports/precision_check", help="where the PNGs go (%(default)s)")
    args = parser.parse_args(argv)
    from core.device import resolve_device

    device = resolve_device(args.device)
    print(environment_line(device))
    with tempfile.TemporaryDirectory() as tmp:
        for path in args.models:
            check(path, args, device, Path(tmp))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
