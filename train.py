"""Train a fast style-transfer network (Johnson et al. 2016) for one style image, or one network for several
(Dumoulin et al. 2017).

Examples (run from the repository root)::

    # the embedded demo (4 photos in data/samples, minutes on a CPU: README, "Two commands"): what `make demo` runs
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

``main(cfg)`` is the job Hydra runs: it hands the config and Hydra's run dir to ``training.run.train``, which tests
call directly with a config from ``hydra.compose``; the loop itself is ``training.loop.fit`` (plain arguments, no
Hydra). The run directory (its name, claiming and refusing it, the resume command) is ``training.rundir``; this file
is the command line around them.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from core.cli import exit_on_bug
from training import rundir

# Hydra, OmegaConf and torch are imported where they are needed: a mistake on the command line is answered in a
# fraction of a second instead of after the torch import.
if TYPE_CHECKING:
    from omegaconf import DictConfig

CONFIG_DIR = Path(__file__).resolve().parent / "configs"
log = logging.getLogger(__name__)

# configs/train.yaml's hydra.run.dir names the run after its style: a cheap declaration, not work.
rundir.register_resolvers()

_SET_KEYS: list[str] | None = None
"""For a resumed run, the options the command line sets (training/resume.py), decided by :func:`plan_run`."""


def _log_to_file(message: str) -> None:
    """Write ``message`` into the run's log file only: the terminal already got it on stderr (Hydra's console
    handler would print it a second time)."""
    record = log.makeRecord(log.name, logging.INFO, __file__, 0, message, None, None)
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.FileHandler):
            handler.handle(record)


def main(cfg: DictConfig) -> None:
    """The job Hydra runs for ``python train.py ...`` (run_cli): train, then print where the model and the logs are.

    Ctrl-C or SIGTERM (handlers installed for the whole run, training/interrupt.py): the current step is finished and
    saved, one line gives the resume command, and the exit status is 130 / 143; a second Ctrl-C exits at once.
    """
    from hydra.core.hydra_config import HydraConfig

    from core.errors import FaststyleError, exit_with_error
    from training.interrupt import TrainingInterrupted, stop_signals
    from training.run import train  # torch: after the command line is checked

    run_dir = Path(HydraConfig.get().runtime.output_dir)
    note = rundir.reuse_note()
    if note:
        log.warning("%s", note)
    with stop_signals():
        try:
            model_path = train(cfg, run_dir, set(_SET_KEYS) if _SET_KEYS is not None else None)
        except FaststyleError as err:
            rundir.release_unused_run_dir(run_dir)
            exit_with_error(err)
            return
        except TrainingInterrupted as err:
            if int(os.environ.get("RANK", "0")) == 0:  # torchrun workers: rank 0 speaks for the run
                message = rundir.interrupted_message(err, run_dir)
                print(message, file=sys.stderr)
                _log_to_file(message)
                if err.step is None:
                    rundir.release_unused_run_dir(run_dir)
            # Files are saved and closed by now. Leaving at once, still under our handlers, means a late signal (the
            # launcher's follow-up, another Ctrl-C) cannot meet Python's default handler during the interpreter's
            # shutdown and print a traceback after all.
            logging.shutdown()
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(err.exit_code)
        except Exception:
            exit_on_bug()
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


def plan_run(cfg: DictConfig, parsed_overrides: list, multirun: bool) -> list[str]:
    """cli.preflight's last step: for a resumed run, note which options the command line sets (the rest come from
    the checkpoint); then pin the run folder (training.rundir.choose_run_dir)."""
    global _SET_KEYS
    if not multirun and cfg.train.resume:
        from configs.schema import plain_config
        from training.resume import set_keys

        typed = [override.key_or_group for override in parsed_overrides]
        defaults = plain_config(compose_with_hydra([]))
        _SET_KEYS = sorted(set_keys(typed, plain_config(cfg), defaults))
    return rundir.choose_run_dir(cfg, parsed_overrides, multirun)


def run_cli() -> None:
    """``python train.py ...``: check the command line (one ``error:`` line for any mistake) and claim the run
    folder, before torch is imported; then run main() under Hydra."""
    import hydra

    from configs.schema import check_train_config
    from core.cli import preflight

    sys.argv += preflight(sys.argv[1:], compose_with_hydra, check_train_config, plan_run)
    # torchrun ranks > 0: no run dir, no .hydra/, no log file of their own (only rank 0's run dir is used).
    if "RANK" in os.environ:  # only torchrun workers need it; importing torch would slow `--help` by seconds
        from training.distributed import worker_hydra_overrides

        sys.argv += worker_hydra_overrides()
    hydra.main(version_base="1.3", config_path="configs", config_name="train")(main)()


if __name__ == "__main__":
    run_cli()
