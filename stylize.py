"""Stylize images with a trained faststyle model: one file, a folder (optionally recursive) or a glob.

    python stylize.py model=outputs/train/<date>/<run>/model.pth input=photo.jpg
    python stylize.py model=run/model.pth input=photos/ recursive=true output=stylized/
    python stylize.py model=run/model.pth 'input=photos/*.png' preserve_color=true strength=0.7 format=webp
    python stylize.py model=run/model.pth input=huge.tif.png max_memory_mb=1500    # any size, exact tiling

Options and defaults: configs/stylize.yaml. Outputs are named ``<input stem>_<style>.<ext>`` and go to
``<model dir>/stylized/`` unless ``output`` says otherwise; they never replace an input. Images whose untiled
forward pass would exceed ``max_memory_mb`` run through models/tiled.py, which reproduces the untiled result
exactly (global instance-norm statistics) with bounded memory.

Exit status: 0 when every image was written or skipped, 1 when some failed (each is reported), 2 on a usage
error (``error: ...`` on stderr).
"""

from __future__ import annotations

import glob
import logging
import os
import sys
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import hydra
import torch
from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf
from PIL import Image
from tqdm import tqdm

from data.io import (
    ALPHA_FORMATS,
    WRITE_FORMATS,
    is_image_file,
    load_image,
    pil_to_tensor,
    resize_max_side,
    resize_to,
    save_image,
    tensor_to_pil,
)
from errors import FaststyleError, exit_with_error
from models.device import reuse_freed_memory

logger = logging.getLogger(__name__)

OUTPUT_FORMATS = {"jpg": ".jpg", "jpeg": ".jpg", "png": ".png", "webp": ".webp"}
PRECISIONS = ("auto", "fp32", "fp16")


# ----------------------------------------------------------------------------------------------------------------
# Colour: luminance-only transfer and strength.
# ----------------------------------------------------------------------------------------------------------------
# Full-range YCbCr of ITU-R BT.601 (the JPEG/JFIF definition). Gatys et al. 2016 ("Preserving Color in Neural
# Artistic Style Transfer", arXiv:1606.05897) use YIQ; any luma/chroma split works the same way: take the stylized
# luminance, keep the photo's chroma.
_RGB_TO_YCBCR = torch.tensor(
    [[0.299, 0.587, 0.114], [-0.168736, -0.331264, 0.5], [0.5, -0.418688, -0.081312]], dtype=torch.float32
)
_YCBCR_TO_RGB = torch.linalg.inv(_RGB_TO_YCBCR)


def rgb_to_ycbcr(x: torch.Tensor) -> torch.Tensor:
    """(..., 3, H, W) RGB in [0, 1] -> (..., 3, H, W) Y in [0, 1], Cb and Cr in [-0.5, 0.5]."""
    return torch.einsum("ij,...jhw->...ihw", _RGB_TO_YCBCR.to(x), x)


def ycbcr_to_rgb(x: torch.Tensor) -> torch.Tensor:
    """Inverse of rgb_to_ycbcr (not clamped)."""
    return torch.einsum("ij,...jhw->...ihw", _YCBCR_TO_RGB.to(x), x)


def preserve_colors(stylized: torch.Tensor, content: torch.Tensor) -> torch.Tensor:
    """Stylized luminance with the content's chroma: (..., 3, H, W) in [0, 1] each -> same shape, clamped."""
    y = rgb_to_ycbcr(stylized)[..., :1, :, :]
    chroma = rgb_to_ycbcr(content)[..., 1:, :, :]
    return ycbcr_to_rgb(torch.cat([y, chroma], dim=-3)).clamp(0.0, 1.0)


def finish_colors(stylized: torch.Tensor, content: torch.Tensor, preserve_color: bool, strength: float) -> torch.Tensor:
    """Apply colour preservation, then blend with the content: ``strength * s + (1 - strength) * content``."""
    if preserve_color:
        stylized = preserve_colors(stylized, content)
    if strength >= 1.0:
        return stylized
    if strength <= 0.0:
        return content.clone()
    return torch.lerp(content, stylized, strength)


# ----------------------------------------------------------------------------------------------------------------
# Inputs and outputs.
# ----------------------------------------------------------------------------------------------------------------
@dataclass
class Job:
    """One input image and where its result goes."""

    source: Path
    target: Path


def _absolute(path: str | os.PathLike) -> Path:
    """User paths are relative to the directory the command was started from (Hydra does not chdir)."""
    return Path(os.path.abspath(os.path.expanduser(str(path))))


def find_inputs(input_spec: str, recursive: bool) -> tuple[list[Path], Path]:
    """The files named by ``input_spec`` (file, folder, or glob) and the base folder output names mirror.

    Folder and glob inputs keep only files with an image extension (data.io.IMAGE_EXTENSIONS); such a file that
    turns out to be corrupt is reported later, when it is decoded. A single file is taken whatever its name.
    """
    path = _absolute(input_spec)
    if path.is_file():
        return [path], path.parent
    if path.is_dir():
        pattern = "**/*" if recursive else "*"
        files = sorted(p for p in path.glob(pattern) if p.is_file() and is_image_file(p))
        if not files:
            hint = "" if recursive else " (add recursive=true to look in sub-folders)"
            raise FaststyleError(f"no image files in folder {path}{hint}")
        return files, path
    if glob.has_magic(str(input_spec)):
        files = sorted(
            _absolute(p) for p in glob.glob(str(path), recursive=recursive) if os.path.isfile(p) and is_image_file(p)
        )
        if not files:
            raise FaststyleError(f"the pattern {input_spec!r} matches no image files: check it (and quote it)")
        return files, Path(os.path.commonpath([str(f.parent) for f in files]))
    raise FaststyleError(f"input not found: {path} (give an image file, a folder or a glob pattern)")


def style_name(model_path: Path, meta: dict) -> str:
    """The name added to output files: the style the model was trained on, else the model file's name."""
    stem = meta.get("style_stem") or (Path(str(meta["style"])).stem if meta.get("style") else "")
    if not stem:
        stem = model_path.parent.name if model_path.stem == "model" else model_path.stem
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in str(stem)) or "stylized"


def plan_jobs(cfg: DictConfig, model_path: Path, meta: dict) -> list[Job]:
    """Match every input to its output path; refuse outputs that would replace or sit among the inputs."""
    files, base = find_inputs(str(cfg.input), bool(cfg.recursive))
    suffix = str(cfg.suffix) if cfg.suffix else style_name(model_path, meta)
    forced_ext = None
    if cfg.format:
        forced_ext = OUTPUT_FORMATS.get(str(cfg.format).lower().lstrip("."))
        if forced_ext is None:
            raise FaststyleError(f"format={cfg.format} is not supported: use one of jpg, png, webp")

    def ext_for(source: Path) -> str:
        if forced_ext:
            return forced_ext
        ext = source.suffix.lower()
        return ".jpg" if ext == ".jpeg" else ext if ext in (".jpg", ".png", ".webp") else ".png"

    output = _absolute(cfg.output) if cfg.output else model_path.parent / "stylized"
    # Earlier results inside an input tree must not be stylized again (recursive folders, broad globs).
    files = [f for f in files if output == base or output not in f.parents]
    if not files:
        raise FaststyleError(f"every input image is inside the output folder {output}: choose another output")
    single_file_output = bool(cfg.output) and output.suffix.lower() in WRITE_FORMATS and not output.is_dir()
    if single_file_output:
        if len(files) != 1:
            raise FaststyleError(f"output={cfg.output} is a file but {len(files)} images were found: give a folder")
        if output.suffix.lower() not in (".jpg", ".jpeg", ".png", ".webp"):
            raise FaststyleError(f"cannot write {output.name}: use a .jpg, .png or .webp output")
        jobs = [Job(files[0], output)]
    else:
        jobs = [
            Job(f, output / f.relative_to(base).parent / f"{f.stem}_{suffix}{ext_for(f)}") for f in files
        ]
        inputs_dirs = {f.parent for f in files}
        if any(job.target.parent in inputs_dirs for job in jobs):
            raise FaststyleError(
                f"output folder {output} would put results among the input images: choose another output folder"
            )
    for job in jobs:
        if WRITE_FORMATS[job.target.suffix.lower()] not in ALPHA_FORMATS and _has_alpha(job.source):
            # JPEG cannot hold transparency: keep it (the user's data) in a PNG rather than flatten it, and say so.
            new_target = job.target.with_suffix(".png")
            logger.warning("%s has transparency, which JPEG cannot hold: writing %s instead", job.source,
                           new_target.name)
            job.target = new_target
    inputs = set(files)
    for job in jobs:
        if job.target in inputs:
            raise FaststyleError(f"output {job.target} is one of the inputs: choose another output path")
    targets = [job.target for job in jobs]
    if len(set(targets)) != len(targets):
        raise FaststyleError("two inputs map to the same output name (same stem, different extension): set format")
    return jobs


def _has_alpha(path: Path) -> bool:
    """Whether the image file has an alpha channel, from its header only (False if it cannot be read)."""
    try:
        with Image.open(path) as img:
            return img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (img.mode == "P" and "transparency" in img.info)
    except (OSError, ValueError, Image.DecompressionBombError):
        return False


@dataclass
class Loaded:
    """A decoded input: the RGB tensor fed to the network and the alpha channel to re-attach (if any)."""

    job: Job
    image: torch.Tensor | None = None  # (3, H, W) float32 in [0, 1]
    alpha: Image.Image | None = None  # mode "L", same size
    error: str | None = None
    size: tuple[int, int] = field(default=(0, 0))  # (H, W)


def load_job(job: Job, max_side_px: int | None, scale: float | None) -> Loaded:
    """Decode (EXIF orientation, any colour mode, 16-bit) and resize one input; errors are returned, not raised,
    so one bad file in a folder does not stop the others."""
    try:
        img = load_image(job.source, mode="RGBA")
        if scale is not None and scale != 1:
            img = resize_to(img, max(1, round(img.width * scale)), max(1, round(img.height * scale)))
        if max_side_px:
            img = resize_max_side(img, int(max_side_px))
        alpha = None
        if img.mode == "RGBA":
            alpha = img.getchannel("A")
            img = img.convert("RGB")
        tensor = pil_to_tensor(img)
        return Loaded(job, tensor, alpha, size=(tensor.shape[1], tensor.shape[2]))
    except FaststyleError as err:
        return Loaded(job, error=str(err))
    except (OSError, ValueError, Image.DecompressionBombError) as err:
        return Loaded(job, error=f"cannot read image {job.source}: {err}")


def save_result(loaded: Loaded, stylized: torch.Tensor, cfg: DictConfig) -> Path:
    """Colour handling, alpha re-attachment and an atomic write; returns the path written."""
    out = finish_colors(stylized, loaded.image, bool(cfg.preserve_color), float(cfg.strength))
    img = tensor_to_pil(out)
    target = loaded.job.target
    if loaded.alpha is not None:
        img.putalpha(loaded.alpha)
        if WRITE_FORMATS[target.suffix.lower()] not in ALPHA_FORMATS:
            # Normally decided in plan_jobs from the header; this catches files whose header did not say.
            target = target.with_suffix(".png")
            logger.warning("%s has transparency, which JPEG cannot hold: wrote %s instead", loaded.job.source,
                           target.name)
    save_image(img, target, quality=int(cfg.jpeg_quality))
    return target


# ----------------------------------------------------------------------------------------------------------------
# The network runner: batched untiled forward, or the exact tiled executor for large images.
# ----------------------------------------------------------------------------------------------------------------
class Runner:
    """Runs the model on (N, 3, H, W) float CPU batches in [0, 1] and returns (N, 3, H, W) float32 CPU results."""

    def __init__(self, net: torch.nn.Module, device: torch.device, cfg: DictConfig) -> None:
        from models.tiled import untiled_bytes_estimate

        precision = str(cfg.precision)
        if precision not in PRECISIONS:
            raise FaststyleError(f"precision={precision} is not one of {', '.join(PRECISIONS)}")
        if precision == "fp16" and device.type != "cuda":
            raise FaststyleError("precision=fp16 needs a CUDA device: use precision=fp32 or device=cuda")
        self.dtype = torch.float16 if precision == "fp16" or (precision == "auto" and device.type == "cuda") else (
            torch.float32
        )
        channels_last = cfg.channels_last
        # Measured (scripts/bench_stylize.py, 1920x1080, 2-core CPU): NHWC 8.2 s vs NCHW 10.7 s per image, and
        # 1.6 GB less peak memory; NHWC is also the fast layout for CUDA tensor cores. So "auto" = on everywhere.
        self.channels_last = True if channels_last == "auto" else bool(channels_last)
        self.net = net.to(device=device, dtype=self.dtype).eval()
        if self.channels_last:
            self.net = self.net.to(memory_format=torch.channels_last)
        self.device = device
        self.budget_mb = float(cfg.max_memory_mb)
        if self.budget_mb <= 0:
            raise FaststyleError("max_memory_mb must be positive")
        self.tmp_dir = str(_absolute(cfg.tmp_dir)) if cfg.tmp_dir else None
        self._estimate = untiled_bytes_estimate
        self._tiled = None
        self.tiled_images = 0

    def max_batch(self, height: int, width: int) -> int:
        """How many (height, width) images fit the memory budget untiled (0: must be tiled)."""
        per_image = self._estimate(self.net, height, width) * (0.5 if self.dtype == torch.float16 else 1.0)
        return int(self.budget_mb * 2**20 // max(per_image, 1))

    @torch.inference_mode()
    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        if self.max_batch(*batch.shape[-2:]) >= batch.shape[0]:
            x = batch.to(self.device, self.dtype, non_blocking=True)
            if self.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            return self.net(x).to("cpu", torch.float32)
        if not isinstance(self.net, torch.nn.Module):  # .onnx model: the tiled executor needs the torch layers
            raise FaststyleError(
                f"a {batch.shape[-1]}x{batch.shape[-2]} image exceeds max_memory_mb={self.budget_mb:g} untiled and "
                ".onnx models cannot be tiled: raise max_memory_mb, set max_side_px, or use the .pth model"
            )
        if self._tiled is None:
            from models.tiled import TiledExecutor

            self._tiled = TiledExecutor(self.net, budget_mb=self.budget_mb, tmp_dir=self.tmp_dir)
        self.tiled_images += batch.shape[0]
        logger.info("image of %dx%d exceeds max_memory_mb=%g untiled: exact tiled inference",
                    batch.shape[-1], batch.shape[-2], self.budget_mb)
        return torch.cat([self._tiled(image[None]) for image in batch])


def _batches(loaded: Iterator[Loaded], runner: Runner, batch_size: int) -> Iterator[list[Loaded]]:
    """Group consecutive decoded images of equal size into batches (failed decodes pass through alone)."""
    pending: list[Loaded] = []
    for item in loaded:
        if item.error is not None:
            yield [item]
            continue
        if pending and (item.size != pending[0].size or len(pending) >= batch_size):
            yield pending
            pending = []
        pending.append(item)
        if len(pending) >= max(1, min(batch_size, runner.max_batch(*item.size))):
            yield pending
            pending = []
    if pending:
        yield pending


@dataclass
class Summary:
    """Counts of a stylize run; ``failed`` lists (file, reason)."""

    written: list[Path] = field(default_factory=list)
    skipped: list[Path] = field(default_factory=list)
    failed: list[tuple[Path, str]] = field(default_factory=list)
    seconds: float = 0.0

    def line(self) -> str:
        rate = len(self.written) / self.seconds if self.seconds > 0 else 0.0
        return (
            f"stylized {len(self.written)}, skipped {len(self.skipped)} (exist; overwrite=true redoes them), "
            f"failed {len(self.failed)} in {self.seconds:.1f} s ({rate:.2f} images/s)"
        )


def _validate(cfg: DictConfig) -> None:
    if not 0.0 <= float(cfg.strength) <= 1.0:
        raise FaststyleError(f"strength={cfg.strength} must be in [0, 1]")
    if cfg.max_side_px is not None and int(cfg.max_side_px) < 1:
        raise FaststyleError("max_side_px must be a positive number of pixels (or null)")
    if cfg.scale is not None and float(cfg.scale) <= 0:
        raise FaststyleError("scale must be positive (or null)")
    if not 1 <= int(cfg.jpeg_quality) <= 100:
        raise FaststyleError("jpeg_quality must be in 1..100 (95 is a good default)")
    if int(cfg.batch_size) < 1 or int(cfg.io_threads) < 1:
        raise FaststyleError("batch_size and io_threads must be at least 1")


def stylize(cfg: DictConfig) -> Summary:
    """Stylize every input named by ``cfg`` (configs/stylize.yaml); returns the counts. Usage errors raise
    FaststyleError before any image is processed; per-image failures are collected in the summary."""
    from models.checkpoint import load_model
    from models.device import resolve_device

    _validate(cfg)
    if cfg.malloc_reuse:
        reuse_freed_memory()
    model_path = _absolute(cfg.model)
    if not model_path.is_file():
        raise FaststyleError(f"model file not found: {model_path} (pass model=<run dir>/model.pth)")
    device = resolve_device(str(cfg.device))
    if model_path.suffix.lower() == ".onnx":  # exported models run through onnxruntime, untiled only (issue 7)
        from models.onnx_runner import load_onnx_model

        net, meta = load_onnx_model(model_path, device=device)
    else:
        net, meta = load_model(model_path, device="cpu")
    jobs = plan_jobs(cfg, model_path, meta)
    summary = Summary()
    todo = []
    for job in jobs:
        if job.target.exists() and not cfg.overwrite:
            summary.skipped.append(job.source)
        else:
            todo.append(job)
    if summary.skipped:
        logger.info("%d outputs exist already and are skipped (overwrite=true redoes them)", len(summary.skipped))
    runner = Runner(net, device, cfg)
    start = time.perf_counter()
    max_side = int(cfg.max_side_px) if cfg.max_side_px is not None else None
    scale = float(cfg.scale) if cfg.scale is not None else None
    # Decoding and encoding run in a small thread pool (PIL releases the GIL while it decodes/encodes), so the
    # network is rarely idle waiting for files; at most io_threads + 1 decoded images wait in memory.
    with ThreadPoolExecutor(max_workers=int(cfg.io_threads), thread_name_prefix="stylize-io") as pool:
        ahead = int(cfg.io_threads) + 1

        def decoded() -> Iterator[Loaded]:
            futures: list[Future[Loaded]] = []
            for job in todo:
                futures.append(pool.submit(load_job, job, max_side, scale))
                if len(futures) > ahead:
                    yield futures.pop(0).result()
            for future in futures:
                yield future.result()

        writes: list[tuple[Loaded, Future[Path]]] = []
        progress = tqdm(total=len(todo), unit="img", desc="stylize", disable=None)
        for batch in _batches(decoded(), runner, int(cfg.batch_size)):
            if batch[0].error is not None:
                summary.failed.append((batch[0].job.source, batch[0].error))
                logger.error("skipping: %s", batch[0].error)
                progress.update(1)
                continue
            try:
                outputs = runner(torch.stack([item.image for item in batch]))
            except (RuntimeError, OSError) as err:  # e.g. out of memory on one huge image: report, go on
                for item in batch:
                    summary.failed.append((item.job.source, f"stylizing failed: {err}"))
                logger.error("stylizing %d image(s) failed: %s", len(batch), err)
                progress.update(len(batch))
                continue
            for item, out in zip(batch, outputs, strict=True):
                writes.append((item, pool.submit(save_result, item, out, cfg)))
            progress.update(len(batch))
            writes = _collect(writes, summary, wait=False)
        _collect(writes, summary, wait=True)
        progress.close()
    summary.seconds = time.perf_counter() - start
    return summary


def _collect(writes: list, summary: Summary, wait: bool) -> list:
    """Move finished writes into the summary; returns those still running."""
    still = []
    for item, future in writes:
        if not wait and not future.done():
            still.append((item, future))
            continue
        try:
            summary.written.append(future.result())
        except (FaststyleError, OSError, ValueError) as err:
            summary.failed.append((item.job.source, f"cannot write {item.job.target}: {err}"))
            logger.error("cannot write %s: %s", item.job.target, err)
    return still


CONFIG_FILE = Path(__file__).resolve().parent / "configs" / "stylize.yaml"


def register_config() -> None:
    """Register configs/stylize.yaml under the name "stylize" in Hydra's ConfigStore.

    Why not ``config_path="configs"``: that folder holds train.py's config groups, and ``model`` is one of them,
    so Hydra would read ``model=run/model.pth`` as a choice in the ``model/`` group and refuse it. The stylize
    config is therefore loaded on its own, with no groups beside it.
    """
    ConfigStore.instance().store(name="stylize", node=OmegaConf.load(CONFIG_FILE))


def compose_config(overrides: list[str]) -> DictConfig:
    """Compose the stylize config with ``overrides`` (for tests and notebooks; needs no Hydra app running)."""
    register_config()
    with hydra.initialize(version_base="1.3", config_path=None):
        return hydra.compose(config_name="stylize", overrides=overrides)


@hydra.main(version_base="1.3", config_path=None, config_name="stylize")
def main(cfg: DictConfig) -> None:
    """Entry point: ``python stylize.py model=... input=...``; prints the summary line."""
    try:
        summary = stylize(cfg)
    except FaststyleError as err:
        exit_with_error(err)
        return
    for source, reason in summary.failed:
        print(f"failed: {source}: {reason}", file=sys.stderr)
    print(summary.line())
    if summary.failed:
        raise SystemExit(1)


if __name__ == "__main__":
    register_config()  # before main(): @hydra.main looks the config up by name when it runs
    main()
