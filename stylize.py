"""Stylize images and videos with a trained faststyle model: one file, a folder (optionally recursive) or a glob.

    python stylize.py model=outputs/train/<date>/<run>/model.pth input=photo.jpg
    python stylize.py model=run/model.pth input=photos/ recursive=true output=stylized/
    python stylize.py model=run/model.pth 'input=photos/*.png' preserve_color=true strength=0.7 format=webp
    python stylize.py model=run/model.pth input=huge.tif.png max_memory_mb=1500    # any size, exact tiling
    python stylize.py model=multi/model.pth input=photo.jpg                        # every style of a multi-style model
    python stylize.py model=multi/model.pth input=photos/ style=hokusai_great_wave:0.3,arcimboldo_spring:0.7  # a mix
    python stylize.py model=run/model.pth input=clip.mp4 output=clip_styled.mp4 video_crf=20   # a video (+ audio)
    python stylize.py model=multi/model.pth input=clip.mp4 style=0 style_end=1   # a video whose style changes
    python stylize.py model=run/model.pth input=clip.mp4 video_blend=0.5   # steadier video (optical flow: OpenCV)

Options and defaults: configs/stylize.yaml. A multi-style model writes every style (``style=`` picks one by name or
index, or mixes several: weights >= 0, normalized). Outputs are named ``<input stem>_<style>.<ext>`` and go to
``<model dir>/stylized/`` unless ``output`` says otherwise; they never replace an input. Images whose untiled
forward pass would exceed ``max_memory_mb`` run through the exact tiled executor (inference/tiled.py), which
reproduces the untiled result (global instance-norm statistics) with bounded memory. A video (.mp4 .m4v .mov .mkv
.webm .avi) is decoded, stylized in batches and encoded as a stream (inference/video_stylize.py): same frames,
timestamps and audio, written upright. The work itself is ``inference.pipeline.stylize(cfg)``; this file is the
command line around it.

Exit status: 0 when every image was written or skipped, 1 when some failed (each is reported; a video that ends
early is written up to there and counts as failed), 2 on a usage error (``error: ...`` on stderr), 3 on an internal
error (a bug), 130 / 143 when stopped by Ctrl-C / SIGTERM (a video being written is removed, not left half-written).
"""

from __future__ import annotations

import signal
import sys
from typing import TYPE_CHECKING

from core.cli import EXIT_USAGE, exit_on_bug, model_file, plain_warnings

# Hydra, OmegaConf and torch are imported where they are needed: a command that is missing its arguments or names
# a missing model answers with its one line in a fraction of a second instead of after the torch import.
if TYPE_CHECKING:
    from omegaconf import DictConfig

    from inference.pipeline import StylizeInterrupted


def register_config() -> None:
    """Register configs/stylize.yaml in Hydra's ConfigStore (configs.schema.register_stylize_config)."""
    from configs.schema import register_stylize_config

    register_stylize_config()


def compose_config(overrides: list[str]) -> DictConfig:
    """Compose the stylize config with ``overrides`` (configs.schema.compose_stylize_config; for tests and
    notebooks)."""
    from configs.schema import compose_stylize_config

    return compose_stylize_config(overrides)


def main(cfg: DictConfig) -> None:
    """The job Hydra runs for ``python stylize.py model=... input=...`` (run_cli); prints the summary line.

    Exit status: 0 every image written (or skipped because it exists), 1 some images failed (each one listed),
    2 a usage error or a full disk (one ``error:`` line), 3 an internal error (a bug: traceback), 130 / 143
    Ctrl-C / SIGTERM.
    """
    import warnings

    from PIL import Image

    from core.errors import FaststyleError, exit_with_error
    from inference.pipeline import (  # torch: after the command line is checked
        StylizeInterrupted,
        StylizeOutOfSpace,
        Terminate,
        stylize,
    )

    # Pillow warns about images over 89 MP as possible decompression bombs; stylize is meant for large images and
    # bounds its memory itself (max_memory_mb, the tiled executor, load_job's estimate), so the warning only alarms.
    warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)

    def raise_terminate(signum: int, frame: object) -> None:
        raise Terminate()

    previous = signal.signal(signal.SIGTERM, raise_terminate)
    try:
        summary = stylize(cfg)
    except FaststyleError as err:
        exit_with_error(err)
        return
    except StylizeInterrupted as stop:
        print(interrupted_line(stop), file=sys.stderr)
        raise SystemExit(128 + stop.signum) from None
    except StylizeOutOfSpace as full:  # one line for every image left, not one failure line each
        for source, reason in full.summary.failed:
            print(f"failed: {source}: {reason}", file=sys.stderr)
        print(f"error: {full.line()}", file=sys.stderr)
        raise SystemExit(EXIT_USAGE) from None
    except Exception:
        exit_on_bug()
    finally:
        signal.signal(signal.SIGTERM, previous)
    for source, reason in summary.failed:
        print(f"failed: {source}: {reason}", file=sys.stderr)
    print(summary.line())
    if summary.failed:
        raise SystemExit(1)


def interrupted_line(stop: StylizeInterrupted) -> str:
    """The one line printed when Ctrl-C or SIGTERM stopped the run: what was written, what is left, and that the
    same command finishes it."""
    done = stop.summary
    video = (
        f" (the video being written, {done.video_in_progress.name}, was removed: no partial file is kept)"
        if done.video_in_progress is not None
        else ""
    )
    return (
        f"interrupted ({'SIGTERM' if stop.signum == 15 else 'Ctrl-C'}): {len(done.written)} written, "
        f"{stop.remaining} not done{video}; run the same command again to finish them (finished outputs are skipped)"
    )


def quote_style_mix(arg: str) -> str:
    """``style=a:0.3,b:0.7`` (a style mix, as users type it; also ``style_end=``) quoted for Hydra, whose grammar
    would otherwise read the comma as a sweep over two values; every other argument unchanged."""
    key, sep, value = arg.partition("=")
    if key.strip() not in ("style", "style_end") or not sep or "," not in value:
        return arg
    if value[:1] in ("'", '"') or '"' in value:
        return arg
    return f'{key}="{value}"'


def compose_with_hydra(overrides: list[str]) -> DictConfig:
    """The config ``python stylize.py <overrides>`` runs with, including the ``hydra`` node (cli.preflight)."""
    import hydra

    register_config()
    with hydra.initialize(version_base="1.3", config_path=None):
        return hydra.compose(config_name="stylize", overrides=overrides, return_hydra_config=True)


def check_command(cfg: DictConfig) -> None:
    """Everything about the command line that needs neither torch nor the model's contents (cli.preflight): the
    options' values, and that the model file is there."""
    from configs.schema import check_stylize_config

    check_stylize_config(cfg)
    model_file(cfg.model)


def run_cli() -> None:
    """``python stylize.py ...``: check the command line (one ``error:`` line for any mistake), then run main()."""
    plain_warnings()
    if len(sys.argv) == 1:  # before Hydra is imported: the first command a newcomer may try
        from configs.schema import STYLIZE_USAGE

        print(f"error: model= and input= are missing: {STYLIZE_USAGE}", file=sys.stderr)
        raise SystemExit(EXIT_USAGE)
    import hydra

    from core.cli import preflight

    register_config()  # before main(): hydra.main looks the config up by name when it runs
    sys.argv[1:] = [quote_style_mix(arg) for arg in sys.argv[1:]]
    try:
        sys.argv += preflight(sys.argv[1:], compose_with_hydra, check_command)
    except KeyboardInterrupt:
        print("interrupted (Ctrl-C) before any image was stylized", file=sys.stderr)
        raise SystemExit(130) from None
    hydra.main(version_base="1.3", config_path=None, config_name="stylize")(main)()


if __name__ == "__main__":
    run_cli()
