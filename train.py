"""Train a fast style-transfer network (Johnson et al. 2016) for one style image, or one network for several
(Dumoulin et al. 2017).

Examples (run from the repository root)::

    # the embedded demo (4 photos in data/samples, ~5 minutes on a laptop CPU): what `make demo` runs
    python train.py experiment=demo

    # COCO (scripts/download_coco.sh), your painting: all a user needs to type
    python train.py style=path/to/painting.jpg data.root=data/coco/train2014

    # a light model, a shorter run, more style, cosine learning-rate decay
    python train.py style=my.jpg data.root=photos/ model.base_width=16 train.steps=10000 \\
        loss.style_weight=2e-5 train.lr_schedule=cosine

    # continue a run from its newest checkpoint (a run dir or a checkpoint file): its style, data, model and loss
    # come from the checkpoint; train.steps=... extends it
    python train.py train.resume=outputs/train/2026-01-01/10-00-00-my train.steps=60000

    # one network for several paintings (conditional instance norm), then add one more to it
    python train.py experiment=multistyle_demo
    python train.py 'style=[a.jpg,b.jpg,c.jpg]' data.root=data/coco/train2014
    python train.py experiment=multistyle_demo style=data/samples/styles/leonardo_mona_lisa.jpg \
        train.extend=outputs/train/<date>/<time>-4styles/model.pth train.steps=150 train.lr=3e-2

    # print the composed config instead of training; sweep two styles (Hydra multirun)
    python train.py --cfg job
    python train.py -m experiment=demo \\
        style=data/samples/styles/hokusai_great_wave.jpg,data/samples/styles/van_gogh_village_street_auvers.jpg

Outputs: ``outputs/train/<date>/<time>-<style>/`` holds ``model.pth`` (for stylize.py), ``checkpoints/``, ``tb/``
(``tensorboard --logdir outputs/train``), Hydra's ``.hydra/`` config snapshot and ``train.log``.

``main(cfg)`` is the Hydra entry point: it hands the config and Hydra's run dir to ``training.run.train``, which
tests call directly with a config from ``hydra.compose``; the loop itself is ``training.loop.fit`` (plain arguments,
no Hydra).
"""

from __future__ import annotations

import logging
import os
import re
import sys
import traceback
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig, OmegaConf

from configs.schema import check_train_config
from core.cli import (
    EXIT_INTERNAL,
    claim_fresh_dir,
    hold_run_dir,
    holds_run,
    hydra_value,
    remove_unused_run_dir,
    resolve_user_path,
    run_leftovers,
)
from core.errors import FaststyleError, exit_with_error
from training.run import style_stem

CONFIG_DIR = Path(__file__).resolve().parent / "configs"
log = logging.getLogger(__name__)


# Used by configs/train.yaml's hydra.run.dir; registering a resolver is a cheap declaration, not work.
OmegaConf.register_new_resolver("style_stem", style_stem, replace=True)


def resume_command(run_dir: str | Path) -> str:
    """The shell command that continues this run from ``run_dir``: the same program and overrides (Hydra's task
    overrides, as typed), with ``train.resume=<run_dir>`` in place of any earlier ``train.resume``. Hydra's own
    settings (``hydra.run.dir``, ...) are left out, so the resumed run gets a run dir of its own."""
    import shlex

    hydra_cfg = hydra.core.hydra_config.HydraConfig.get()
    overrides = [
        text for text in hydra_cfg.overrides.task if text.lstrip("~+").split("=", 1)[0].strip() != "train.resume"
    ]
    value = str(run_dir)
    if not re.fullmatch(r"[\w./~:@%+-]+", value):  # quoted for Hydra's override grammar too (spaces, commas, ...)
        value = f'"{value}"' if '"' not in value else f"'{value}'"
    words = [*overrides, f"train.resume={value}"]
    if hydra_cfg.job.config_name not in (None, "train"):
        words = ["--config-name", str(hydra_cfg.job.config_name), *words]
    command = " ".join(shlex.quote(word) for word in [sys.argv[0], *words])
    if "TORCHELASTIC_RUN_ID" not in os.environ:
        return f"python {command}"
    if os.environ.get("GROUP_WORLD_SIZE", "1") == "1":  # one node: torchrun needs only the process count
        return f"torchrun --nproc_per_node={os.environ.get('LOCAL_WORLD_SIZE', '1')} {command}"
    return f"torchrun <the same torchrun options> {command}"


def interrupted_message(err: BaseException, run_dir: str | Path) -> str:
    """The one line printed for a run stopped by a signal (``err``: training.interrupt.TrainingInterrupted)."""
    from training.interrupt import signal_label

    how = signal_label(err.signum)
    if err.step is None or err.checkpoint is None:
        return f"interrupted before the first training step ({how}); nothing to save"
    return (
        f"interrupted at step {err.step} ({how}): checkpoint saved to {err.checkpoint}; "
        f"resume with: {resume_command(run_dir)}"
    )


def _release_unused_run_dir(run_dir: Path) -> None:
    """A run that stops before writing anything leaves no folder behind, if this process created it (the exit
    statuses promise "nothing written"); a folder the user made, or one holding anything else, stays."""
    created = PREFLIGHT["created"]
    if created is not None and os.path.realpath(run_dir) == os.path.realpath(created):
        remove_unused_run_dir(created, f"{hydra.core.hydra_config.HydraConfig.get().job.name}.log")


def _log_to_file(message: str) -> None:
    """Write ``message`` into the run's log file only: the terminal already got it on stderr (Hydra's console
    handler would print it a second time)."""
    record = log.makeRecord(log.name, logging.INFO, __file__, 0, message, None, None)
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.FileHandler):
            handler.handle(record)


@hydra.main(version_base="1.3", config_path="configs", config_name="train")
def main(cfg: DictConfig) -> None:
    """Hydra entry point: train, then print where the model and the logs are.

    Ctrl-C or SIGTERM (handlers installed for the whole run, training/interrupt.py): the current step is finished and
    saved, one line gives the resume command, and the exit status is 130 / 143; a second Ctrl-C exits at once.
    """
    from training.interrupt import TrainingInterrupted, stop_signals
    from training.run import train

    run_dir = Path(hydra.core.hydra_config.HydraConfig.get().runtime.output_dir)
    if PREFLIGHT["note"]:
        log.warning("%s", PREFLIGHT["note"])
    with stop_signals():
        try:
            keys = PREFLIGHT["set_keys"]
            model_path = train(cfg, run_dir, set(keys) if keys is not None else None)
        except FaststyleError as err:
            _release_unused_run_dir(run_dir)
            exit_with_error(err)
            return
        except TrainingInterrupted as err:
            if int(os.environ.get("RANK", "0")) == 0:  # torchrun workers: rank 0 speaks for the run
                message = interrupted_message(err, run_dir)
                print(message, file=sys.stderr)
                _log_to_file(message)
                if err.step is None:
                    _release_unused_run_dir(run_dir)
            # Files are saved and closed by now. Leaving at once, still under our handlers, means a late signal (the
            # launcher's follow-up, another Ctrl-C) cannot meet Python's default handler during the interpreter's
            # shutdown and print a traceback after all.
            logging.shutdown()
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(err.exit_code)
        except Exception:
            traceback.print_exc()
            print("internal error (a bug in faststyle): please report the traceback above", file=sys.stderr)
            raise SystemExit(EXIT_INTERNAL) from None
        if int(os.environ.get("RANK", "0")) != 0:
            return  # torchrun workers: rank 0 prints the summary
        print(f"model: {model_path}")
        # The tensorboard beside this interpreter: runnable as printed whether or not the venv is activated.
        tensorboard = Path(sys.executable).with_name("tensorboard")
        print(f"{tensorboard if tensorboard.is_file() else 'tensorboard'} --logdir {model_path.parent / 'tb'}")


def compose_with_hydra(overrides: list[str]) -> DictConfig:
    """The config ``python train.py <overrides>`` runs with, including the ``hydra`` node (for cli.preflight)."""
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3", job_name="train"):
        return compose("train", overrides=overrides, return_hydra_config=True)


REPO_ROOT = Path(__file__).resolve().parent


def plan_run(cfg: DictConfig, parsed_overrides: list, multirun: bool) -> list[str]:
    """cli.preflight's last step: for a resumed run, note which options the command line sets (the rest come from
    the checkpoint); then pin the run folder (:func:`choose_run_dir`)."""
    if not multirun and cfg.train.resume:
        from configs.schema import plain_config
        from training.resume import set_keys

        typed = [override.key_or_group for override in parsed_overrides]
        defaults = plain_config(compose_with_hydra([]))
        PREFLIGHT["set_keys"] = sorted(set_keys(typed, plain_config(cfg), defaults))
    return choose_run_dir(cfg, parsed_overrides, multirun)


PREFLIGHT: dict[str, Any] = {"created": None, "note": None, "set_keys": None}
"""What the command-line check decided for :func:`main` (same process): ``created``, the run folder this process
made (removed again if the run stops with an ``error:`` line before writing anything into it); ``note``, what a
reused folder already held (logged once the run's log is open); ``set_keys``, for a resumed run, the options the
command line sets (training/resume.py)."""


def _make_run_folder(key: str, folder: str, path: Path) -> bool:
    """Create the user's run folder ``path`` if needed; True when this call created it. FaststyleError when it
    cannot be a run folder (a file, the repository itself, not creatable or not writable)."""
    if path == REPO_ROOT:
        raise FaststyleError(
            f"{key}={folder} is the faststyle repository itself: name a folder of its own for the run, or leave "
            f"{key} out for a fresh one under outputs/"
        )
    if path.exists() and not path.is_dir():
        raise FaststyleError(f"{key}={folder} is a file, not a folder: name a folder for the run (made if missing)")
    try:
        path.mkdir(parents=True)
        created = True
    except FileExistsError:
        created = False
    except OSError as err:
        raise FaststyleError(
            f"{key}={folder}: cannot create the folder ({err.strerror or err}): choose a folder you can write to"
        ) from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise FaststyleError(f"{key}={folder} is not writable: choose a folder you can write to")
    return created


def choose_run_dir(cfg: DictConfig, parsed_overrides: list, multirun: bool) -> list[str]:
    """Pin and claim the run folder before Hydra creates it: a fresh one, or the user's own if it holds no other run.

    The default name (``outputs/train/<date>/<time>-<style>``) gets ``-2``, ``-3``, ... when another run took it
    (two runs started in the same second); a folder the user names with ``hydra.run.dir`` / ``hydra.sweep.dir`` is
    refused when it already holds a run's model or checkpoint, unless this run resumes that very run. Either folder
    is then held by this process (core.cli.hold_run_dir), so a second run given the same folder at the same moment
    is refused instead of training into it too.
    """
    if os.environ.get("RANK", "0") != "0":
        return []  # torchrun workers use rank 0's run dir (training.distributed.worker_hydra_overrides)
    key = "hydra.sweep.dir" if multirun else "hydra.run.dir"
    folder = hydra_value(cfg, key)
    if any(override.key_or_group == key for override in parsed_overrides):
        if not folder.strip():  # Hydra would train into the current folder
            raise FaststyleError(
                f"{key} is empty: name a folder for the run, e.g. {key}=outputs/train/my-run, or leave {key} out "
                "for a fresh one"
            )
        path = resolve_user_path(folder)
        if multirun:
            if path.exists() and not path.is_dir():
                raise FaststyleError(f"{key}={folder} is a file, not a folder: name a folder for the sweep")
            taken = (
                sorted(child for child in path.iterdir() if child.is_dir() and holds_run(child))
                if path.is_dir()
                else []
            )
        else:
            created = _make_run_folder(key, folder, path)
            if not hold_run_dir(path):
                raise FaststyleError(
                    f"{key}={folder}: another training run is using {path} right now: choose another folder, or "
                    f"leave {key} out for a fresh one"
                )
            resume = cfg.train.resume
            resumes_it = bool(resume) and (
                resolve_user_path(str(resume)) == path or path in resolve_user_path(str(resume)).parents
            )
            taken = [path] if holds_run(path) and not resumes_it else []
            leftovers = [] if taken or resumes_it else run_leftovers(path)
            if leftovers:
                PREFLIGHT["note"] = (
                    f"{path} held {', '.join(leftovers)} but no checkpoint and no model.pth (a run stopped before "
                    "its first checkpoint): training there; its TensorBoard events and log stay beside this run's"
                )
            PREFLIGHT["created"] = path if created else None
        if taken:
            raise FaststyleError(
                f"{key}={folder}: {taken[0]} already holds a training run (model.pth or checkpoints): choose a new "
                f"folder, leave {key} out for a fresh one, or continue that run with train.resume={taken[0]}"
            )
        return []
    path = Path(os.path.abspath(folder))
    try:
        claimed = claim_fresh_dir(path)
    except OSError as err:
        raise FaststyleError(
            f"cannot create the run folder {path} ({err.strerror or err}): start train.py from a folder you can "
            "write to, or set hydra.run.dir=<folder>"
        ) from None
    if not multirun:
        PREFLIGHT["created"] = claimed
    return [f'{key}="{Path(folder).with_name(claimed.name)}"']


if __name__ == "__main__":
    from core.cli import preflight

    # Before torch is imported, so that a mistake on the command line is reported in a fraction of a second.
    sys.argv += preflight(sys.argv[1:], compose_with_hydra, check_train_config, plan_run)
    # torchrun ranks > 0: no run dir, no .hydra/, no log file of their own (only rank 0's run dir is used).
    if "RANK" in os.environ:  # only torchrun workers need it; importing torch would slow `--help` by seconds
        from training.distributed import worker_hydra_overrides

        sys.argv += worker_hydra_overrides()
    main()
