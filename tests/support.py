"""What several test files build the same way, as plain functions and constants: the repository's paths, the tiny
test networks and model files, a small training config and its TensorBoard scalars, Hydra's run files, a video clip,
a background stylize.py, a seeded image file, a free port, seeded random bytes and a captured command.

Test files import these (``from tests.support import tiny_net``); fixtures live in ``tests/conftest.py``, which
pytest finds by itself and which no test imports. No test file imports another test file."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import nn

from models.modelfile import save_model
from models.norm import ConditionalInstanceNorm
from models.transformer import TransformerNet

REPO = Path(__file__).resolve().parents[1]
CONTENT = REPO / "data" / "samples" / "content"
STYLE = REPO / "data" / "samples" / "styles" / "hokusai_great_wave.jpg"
MULTI_MODEL_STYLES = ["wave", "street", "composition"]
"""The styles of conftest's ``multi_model``."""


# --------------------------------------------------------------------------------------------------------------------
# Test networks and model files
# --------------------------------------------------------------------------------------------------------------------
def randomise_style_tables(net: nn.Module, seed: int = 0) -> None:
    """Distinct (gamma, beta) rows per style (freshly built tables are all ones and zeros, which hides mistakes)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in net.modules():
            if isinstance(module, ConditionalInstanceNorm):
                module.weight.copy_(0.5 + torch.rand(module.weight.shape, generator=gen))
                module.bias.copy_(torch.rand(module.bias.shape, generator=gen) - 0.5)


def perturb_weights(net: nn.Module, scale: float) -> nn.Module:
    """Push every parameter off its initialisation by ``scale`` x N(0, 1) noise (torch's global generator) and give
    batch norms non-trivial running statistics, so that the output is far from flat and every weight matters."""
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn_like(p) * scale)
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.5)
                m.running_var.uniform_(0.5, 2.0)
    return net


def tiny_net(
    norm: str = "instance",
    *,
    base_width: int = 8,
    residual_blocks: int = 1,
    num_styles: int = 1,
    scale: float = 0.0,
    seed: int = 0,
    style_seed: int | None = None,
    **config: str,
) -> TransformerNet:
    """The one builder of small eval-mode test networks, the same for a given ``seed`` (torch's global generator is
    seeded with it). ``scale`` > 0: every weight pushed off its initialisation (:func:`perturb_weights`), for an
    output far from flat; ``num_styles`` > 1: distinct style tables (:func:`randomise_style_tables`, seeded with
    ``style_seed``, by default ``seed``). ``config``: the other TransformerNet options (upsample, output)."""
    torch.manual_seed(seed)
    net = TransformerNet(
        norm=norm, base_width=base_width, residual_blocks=residual_blocks, num_styles=num_styles, **config
    )
    if scale:
        perturb_weights(net, scale)
    if num_styles > 1:
        randomise_style_tables(net, seed if style_seed is None else style_seed)
    return net.eval()


def tiny_model_file(path: Path, meta: dict | None = None, **net_options: object) -> Path:
    """:func:`tiny_net` (``net_options``) saved as a model file at ``path``. ``meta`` defaults to a style stem
    ``wave`` for one style, and to the style names ``s0``, ``s1``, ... for several."""
    net = tiny_net(**net_options)
    if meta is None:
        meta = {"styles": [f"s{i}" for i in range(net.num_styles)]} if net.num_styles > 1 else {"style_stem": "wave"}
    save_model(path, net, meta)
    return path


# --------------------------------------------------------------------------------------------------------------------
# Training configs, Hydra's run files, TensorBoard events
# --------------------------------------------------------------------------------------------------------------------
SMALL = [
    f"style={STYLE}",
    f"data.root={CONTENT}",
    "style_size=64",
    "device=cpu",
    "loss.network=random",
    "model.base_width=8",
    "model.residual_blocks=1",
    "data.image_size=64",
    "data.num_workers=0",
    "data.val_images=2",
    "train.batch_size=2",
    "train.steps=4",
    "train.log_interval_steps=1",
    "train.image_interval_steps=2",
    "train.checkpoint_interval_steps=2",
]
"""A training run small enough for the suite: 64 px, base width 8, one residual block, the random loss network,
4 steps with a checkpoint every 2."""


def compose_train(overrides: list[str], return_hydra_config: bool = False):
    """train.py's config for ``overrides``, composed as Hydra composes it (without running anything)."""
    with initialize_config_dir(config_dir=str(REPO / "configs"), version_base="1.3"):
        return compose("train", overrides=overrides, return_hydra_config=return_hydra_config)


def save_hydra_files(run_dir: Path, cfg, launch_dir: Path) -> None:
    """What Hydra writes for a run: the job config and, in hydra.yaml, the directory the command was started in."""
    (run_dir / ".hydra").mkdir(parents=True, exist_ok=True)
    OmegaConf.save(cfg, run_dir / ".hydra" / "config.yaml")
    OmegaConf.save({"hydra": {"runtime": {"cwd": str(launch_dir)}}}, run_dir / ".hydra" / "hydra.yaml")


def read_events(run_dir: Path) -> EventAccumulator:
    """Every TensorBoard event of a run (its tb/ folder), none left out."""
    events = EventAccumulator(str(run_dir / "tb"), size_guidance={"scalars": 0, "images": 0, "tensors": 0})
    events.Reload()
    return events


def scalar_values(events: EventAccumulator, tag: str) -> dict[int, float]:
    """step -> value of one scalar tag."""
    return {event.step: event.value for event in events.Scalars(tag)}


# --------------------------------------------------------------------------------------------------------------------
# Videos and a stylize.py in the background
# --------------------------------------------------------------------------------------------------------------------
def make_clip(
    path: Path,
    frames: int = 24,
    size: tuple[int, int] = (64, 48),
    fps: int = 20,
    audio: bool = True,
    rotation: int = 0,
    video: bool = True,
    faststart: bool = False,
    steps: list[int] | None = None,
) -> Path:
    """A clip of ``frames`` frames of ``size`` (width, height): a window sliding over the photo, 2 px per frame;
    with a 440 Hz tone (AAC, or Opus in .webm) lasting as long as the video; ``rotation``: a display matrix
    (counter-clockwise degrees, as players apply it); ``steps``: frame durations in 1/fps units, cycled (a variable
    frame rate; default 1)."""
    width, height = size
    container = {".mkv": "matroska", ".webm": "webm", ".avi": "avi", ".mov": "mov"}.get(path.suffix, "mp4")
    photo = Image.open(CONTENT / "chelsea.jpg").convert("RGB")
    photo = photo.resize((width + 2 * frames, round(photo.height * (width + 2 * frames) / photo.width)))
    photo = np.asarray(photo)
    top = max(0, (photo.shape[0] - height) // 2)
    options = {"movflags": "+faststart"} if faststart else {}
    with av.open(str(path), "w", format=container, options=options) as out:
        stream = None
        if video:
            codec = "libvpx-vp9" if container == "webm" else "libx264"
            stream = out.add_stream(codec, rate=fps)
            stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
            fast = {"preset": "ultrafast"} if codec == "libx264" else {"deadline": "realtime", "cpu-used": "8"}
            stream.options = fast
            if rotation:
                stream.set_display_rotation(rotation)
        sound = None
        if audio:
            sound = out.add_stream("libopus" if container == "webm" else "aac", rate=48000)
            sound.layout = "mono"
        pts = 0
        for i in range(frames if video else 0):
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(photo[top : top + height, 2 * i : 2 * i + width]))
            frame.pts = pts
            frame.time_base = Fraction(1, fps)
            pts += steps[i % len(steps)] if steps else 1
            for packet in stream.encode(frame):
                out.mux(packet)
        if stream is not None:
            for packet in stream.encode(None):
                out.mux(packet)
        if sound is not None:
            rate, total, done = 48000, round((pts if video else frames) / fps * 48000), 0
            while done < total:
                n = min(960, total - done)
                tone = 0.3 * np.sin(2 * np.pi * 440 * np.arange(done, done + n) / rate)
                chunk = av.AudioFrame.from_ndarray(tone.astype(np.float32)[None], format="flt", layout="mono")
                chunk.sample_rate, chunk.pts = rate, done
                for packet in sound.encode(chunk):
                    out.mux(packet)
                done += n
            for packet in sound.encode(None):
                out.mux(packet)
    return path


def start_stylize_until(args: list[str], ready: Callable[[], bool]) -> subprocess.Popen:
    """``python stylize.py *args`` started in the background (Ctrl-C left at Python's default, as in a terminal),
    returned once ``ready()`` holds (or after 120 s), for a test to send it a signal."""
    proc = subprocess.Popen(
        [sys.executable, "stylize.py", *args],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    deadline = time.monotonic() + 120
    while not ready() and time.monotonic() < deadline:
        time.sleep(0.05)
    return proc


# --------------------------------------------------------------------------------------------------------------------
# Image files, ports, bytes, commands
# --------------------------------------------------------------------------------------------------------------------
def photo_file(path: Path, width: int, height: int, seed: int = 0, fmt: str | None = None) -> Path:
    """A smooth seeded RGB image file of ``width`` x ``height`` (a bicubic blow-up of 4 x 5 random pixels) at
    ``path`` (folders made), in ``fmt`` or the format its suffix says."""
    rng = np.random.default_rng(seed)
    small = Image.fromarray(rng.integers(0, 256, (4, 5, 3), dtype=np.uint8), "RGB")
    path.parent.mkdir(parents=True, exist_ok=True)
    small.resize((width, height), Image.Resampling.BICUBIC).save(path, format=fmt)
    return path


def free_port() -> int:
    """A TCP port on 127.0.0.1 free at the time of the call (for torch.distributed's rendezvous)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def noise_bytes(size: int, seed: int) -> bytes:
    """``size`` random bytes, the same on every run (a test must not pass or fail by the luck of its input)."""
    return np.random.default_rng(seed).integers(0, 256, size, dtype=np.uint8).tobytes()


def run_command(
    args: list[str], cwd: Path = REPO, env: dict | None = None, timeout: float = 120
) -> subprocess.CompletedProcess:
    """``args`` run as a program (its output captured as text, at most ``timeout`` s), from the repository by
    default."""
    return subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env)
