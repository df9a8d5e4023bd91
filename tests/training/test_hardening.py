"""train.py hardening (issue 22): the run folder, resume, option ranges, memory bounds and torchrun messages.

Command-line cases run train.py as a subprocess with tiny budgets (the demo experiment at 32 px, width 8, 2 steps)
and check the exit status, exactly one ``error:`` line, no traceback, and that earlier runs and inputs are
unchanged; the mechanisms behind them (checkpoint choice, config restoration, the memory estimate) are also tested
as functions, which is cheaper.
"""

from __future__ import annotations

import hashlib
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from core.errors import FaststyleError
from core.fileio import disk_full_error
from tests.support import REPO, compose_train
from training import rundir
from training.checkpoint import open_checkpoint, save_checkpoint
from training.memory import MemoryNeed, check_fits, estimate
from training.resume import resumed_config, set_keys
from training.run import load_style_image

STYLES = REPO / "data" / "samples" / "styles"
PHOTOS = REPO / "data" / "samples" / "content"
TINY = ["experiment=demo", "train.steps=2", "data.image_size=32", "model.base_width=8", "data.val_images=1"]


def _env() -> dict[str, str]:
    # The eager InstanceNorm: a fused kernel build (seconds) is no part of what these tests check.
    return {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "FASTSTYLE_NORM_KERNEL": "0"}


def _train(args: list[str], cwd: Path = REPO, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(REPO / "train.py"), *args],
        cwd=cwd,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _verdict(proc: subprocess.CompletedProcess, code: int, expect: str | None = None) -> str:
    """Exit status ``code``, no traceback, and for an error exactly one ``error:`` line containing ``expect``."""
    where = f"\n--- stdout\n{proc.stdout[-3000:]}\n--- stderr\n{proc.stderr[-3000:]}"
    assert "Traceback" not in proc.stdout + proc.stderr, where
    assert proc.returncode == code, where
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == (1 if code == 2 else 0), where
    if expect is not None:
        assert expect in lines[0], where
    return lines[0] if lines else ""


def _fingerprint(folder: Path) -> dict[str, str]:
    return {
        str(path.relative_to(folder)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(folder.rglob("*"))
        if path.is_file()
    }


@pytest.fixture(scope="module")
def photos(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A data folder of two photos (not the embedded demo set, so a resume that forgot data.root shows)."""
    folder = tmp_path_factory.mktemp("photos")
    for name in ("chelsea.jpg", "coffee.jpg"):
        (folder / name).write_bytes((PHOTOS / name).read_bytes())
    return folder


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory: pytest.TempPathFactory, photos: Path) -> Path:
    """A finished tiny run on ``photos`` with the Hokusai style."""
    run_dir = tmp_path_factory.mktemp("runs") / "base"
    style = STYLES / "hokusai_great_wave.jpg"
    _verdict(_train([*TINY, f"data.root={photos}", f"style={style}", f"hydra.run.dir={run_dir}"]), 0)
    return run_dir


# --- the run folder ------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_two_runs_racing_for_one_explicit_run_dir_one_wins_the_other_gets_one_line(tmp_path: Path) -> None:
    run_dir = tmp_path / "twin"
    procs = [
        subprocess.Popen(
            [sys.executable, str(REPO / "train.py"), *TINY, f"style={STYLES / name}", f"hydra.run.dir={run_dir}"],
            cwd=REPO,
            env=_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for name in ("hokusai_great_wave.jpg", "arcimboldo_spring.jpg")
    ]
    results = [subprocess.CompletedProcess(p.args, 0, *p.communicate(timeout=300)) for p in procs]
    for proc, result in zip(procs, results, strict=True):
        result.returncode = proc.returncode
    assert sorted(r.returncode for r in results) == [0, 2], [r.stderr[-2000:] for r in results]
    loser = next(r for r in results if r.returncode == 2)
    line = _verdict(loser, 2)
    # Usually the two overlap ("using ... right now"); a loser that starts after the winner finished finds its run.
    assert "another training run is using" in line or "already holds a training run" in line, line
    _verdict(next(r for r in results if r.returncode == 0), 0)
    assert (run_dir / "model.pth").is_file()
    assert (run_dir / "train.log").read_text().count("] - training ") == 1  # one run's log, not two


@pytest.mark.parametrize(
    ("case", "args", "expect"),
    [
        ("empty run dir", ["hydra.run.dir="], "hydra.run.dir is empty"),
        ("run dir is a file", ["hydra.run.dir={file}"], "is a file, not a folder"),
        ("run dir under a file", ["hydra.run.dir={file}/run"], "cannot create the folder"),
        ("run dir is the repository", ["hydra.run.dir=."], "the faststyle repository itself"),
        ("seed too large for the RNG", ["seed=1180591620717411303424"], "the maximum is 4294967295"),
        ("steps beyond any plan", ["train.steps=99999999999999999999"], "the maximum is 10000000"),
        ("image size far too large", ["data.image_size=100000"], "the maximum is 4096"),
        ("batch size far too large", ["train.batch_size=100000"], "the maximum is 4096"),
        ("unknown option", ["+train.foo=1"], "unknown option train.foo"),
    ],
)
def test_command_line_mistakes_are_one_line_before_any_folder_is_made(
    tmp_path: Path, case: str, args: list[str], expect: str
) -> None:
    afile = tmp_path / "afile"
    afile.write_text("keep me\n")
    run_dir = tmp_path / "run"
    extra = [] if any(arg.startswith("hydra.run.dir") for arg in args) else [f"hydra.run.dir={run_dir}"]
    proc = _train([*TINY, *[arg.format(file=afile) for arg in args], *extra])
    _verdict(proc, 2, expect)
    assert afile.read_text() == "keep me\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile"]  # no run folder was made
    assert not (REPO / "model.pth").exists() and not (REPO / "tb").exists()


def test_an_unwritable_run_dir_is_refused_in_preflight(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = tmp_path / "readonly"
    folder.mkdir()
    # Through os.access, which is what the check asks: root may write anywhere, so chmod alone proves nothing.
    monkeypatch.setattr(os, "access", lambda path, mode: Path(path) != folder)
    with pytest.raises(FaststyleError, match="is not writable"):
        rundir.make_named_run_folder("hydra.run.dir", str(folder), folder)


def test_an_error_after_the_folder_was_made_leaves_no_empty_run_folder(tmp_path: Path) -> None:
    fresh, mine = tmp_path / "fresh", tmp_path / "mine"
    mine.mkdir()  # a folder the user made: it stays
    for run_dir in (fresh, mine):
        proc = _train([*TINY, f"style={tmp_path / 'missing.jpg'}", f"hydra.run.dir={run_dir}"])
        _verdict(proc, 2, "image not found")
    assert not fresh.exists()
    assert mine.is_dir()


def test_a_folder_a_run_left_before_its_first_checkpoint_can_be_used_again(tmp_path: Path) -> None:
    run_dir = tmp_path / "r"
    (run_dir / "tb").mkdir(parents=True)
    (run_dir / "tb" / "events.out.tfevents.1.host").write_bytes(b"old events")
    resumed = _train([*TINY, f"train.resume={run_dir}", f"hydra.run.dir={tmp_path / 'other'}"])
    _verdict(resumed, 2, "stopped before its first checkpoint")
    assert not (tmp_path / "other").exists()
    fresh = _train([*TINY, f"hydra.run.dir={run_dir}"])
    _verdict(fresh, 0)
    assert (run_dir / "model.pth").is_file()
    assert (run_dir / "tb" / "events.out.tfevents.1.host").read_bytes() == b"old events"  # nothing removed
    assert "held tb but no checkpoint and no model.pth" in (run_dir / "train.log").read_text()


# --- checkpoints ---------------------------------------------------------------------------------------------------


def _state(step: int) -> dict:
    return {"step": step, "model": {"w": torch.full((2,), float(step))}, "optimizer": {}}


def test_resume_takes_the_newest_complete_checkpoint_and_skips_a_truncated_one(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    folder = tmp_path / "checkpoints"
    save_checkpoint(folder / "step_0000002.pt", _state(2))
    # The disk filled after step_4.pt, before last.pt: the step file is newer than last.pt (or last.pt is missing).
    save_checkpoint(folder / "step_0000004.pt", _state(4))
    path, state = open_checkpoint(tmp_path)
    assert (path.name, state["step"]) == ("step_0000004.pt", 4)
    save_checkpoint(folder / "last.pt", _state(2))
    assert open_checkpoint(tmp_path)[1]["step"] == 4
    # A checkpoint cut short (an older version, a crash mid-write) is skipped with a warning.
    whole = (folder / "step_0000004.pt").read_bytes()
    (folder / "step_0000006.pt").write_bytes(whole[: len(whole) // 2])
    with caplog.at_level(logging.WARNING):
        path, state = open_checkpoint(tmp_path)
    assert (path.name, state["step"]) == ("step_0000004.pt", 4)
    assert "skipping checkpoint" in caplog.text and "step_0000006.pt" in caplog.text
    # A file named directly must be whole itself.
    with pytest.raises(FaststyleError, match="corrupt"):
        open_checkpoint(folder / "step_0000006.pt")
    for name in ("step_0000002.pt", "step_0000004.pt", "last.pt"):
        (folder / name).unlink()
    with pytest.raises(FaststyleError, match="no complete checkpoint in .*step_0000006.pt cannot be read"):
        open_checkpoint(tmp_path)


def test_a_disk_full_message_says_only_what_is_true(tmp_path: Path) -> None:
    import errno

    full = OSError(errno.ENOSPC, "No space left on device")
    assert "no last.pt was written" in str(disk_full_error(tmp_path / "last.pt", 100, full))
    (tmp_path / "last.pt").write_bytes(b"x")
    assert "the previous last.pt is unchanged" in str(disk_full_error(tmp_path / "last.pt", 100, full))


# --- resume restores the run ---------------------------------------------------------------------------------------


def _cfg(**changes: object) -> object:
    return compose_train(["experiment=demo", *[f"{k}={v}" for k, v in changes.items()]])


def _checkpoint(cfg: object) -> dict:
    config = OmegaConf.to_container(cfg, resolve=True)
    return {"step": 2, "config": config, "style_path": str(REPO / str(config["style"]))}


def test_a_resumed_run_takes_its_options_from_the_checkpoint_and_refuses_changes() -> None:
    trained = _cfg(**{"model.base_width": 8, "data.root": "/data/photos", "train.lr": 0.01, "train.steps": 50})
    checkpoint = _checkpoint(trained)
    # Only train.resume and the steps typed: the rest is the run's, the machine's options the command line's.
    now = _cfg(**{"train.steps": 80, "device": "cpu"})
    cfg, changed = resumed_config(now, checkpoint, {"train.steps", "device"}, Path("run"))
    assert (cfg.model.base_width, cfg.data.root, cfg.train.lr) == (8, "/data/photos", 0.01)
    assert (cfg.train.steps, cfg.device, changed) == (80, "cpu", [])
    with pytest.raises(FaststyleError, match=r"trained with style=.*given: arcimboldo_spring.jpg.*resume_override"):
        resumed_config(_cfg(style=STYLES / "arcimboldo_spring.jpg"), checkpoint, {"style"}, Path("run"))
    with pytest.raises(FaststyleError, match="keeps its network.*model.base_width=8"):
        resumed_config(_cfg(**{"model.base_width": 16}), checkpoint, {"model.base_width"}, Path("run"))
    allowed = _cfg(style=STYLES / "arcimboldo_spring.jpg", **{"train.resume_override": "true"})
    cfg, changed = resumed_config(allowed, checkpoint, {"style", "train.resume_override"}, Path("run"))
    assert cfg.style.endswith("arcimboldo_spring.jpg") and changed and "style=arcimboldo_spring.jpg" in changed[0]


def test_extend_and_resume_together_only_continue_the_extend_run_itself() -> None:
    plain = _checkpoint(_cfg())
    with pytest.raises(FaststyleError, match="trained from scratch.*use one of the two"):
        resumed_config(_cfg(**{"train.extend": "/m/model.pth"}), plain, {"train.extend"}, Path("run"))
    extend_run = _checkpoint(_cfg(**{"train.extend": "/m/model.pth"}))
    with pytest.raises(FaststyleError, match="adds a style to /m/model.pth"):
        resumed_config(_cfg(**{"train.extend": "/other/model.pth"}), extend_run, {"train.extend"}, Path("run"))
    cfg, _ = resumed_config(_cfg(**{"train.extend": "/m/model.pth"}), extend_run, {"train.extend"}, Path("run"))
    assert cfg.train.extend == "/m/model.pth"
    cfg, _ = resumed_config(_cfg(), extend_run, set(), Path("run"))  # not repeated: the run's own
    assert cfg.train.extend == "/m/model.pth"


def test_set_keys_counts_typed_options_and_what_an_experiment_changes() -> None:
    from configs.schema import plain_config

    defaults = plain_config(_cfg())
    mine = plain_config(_cfg(**{"train.steps": 300}))  # equal to the experiment's: still typed
    keys = set_keys(["train.steps", "train.resume"], mine, defaults)
    assert "train.steps" in keys and "model.base_width" not in keys


def test_resume_without_options_continues_on_the_runs_photos_and_a_changed_style_is_refused(
    tmp_path: Path, finished_run: Path, photos: Path
) -> None:
    before = _fingerprint(finished_run)
    resumed_dir = tmp_path / "resumed"
    # No data.root, no style, no experiment: everything from the checkpoint (not the embedded demo photos).
    _verdict(_train(["train.resume=" + str(finished_run), "train.steps=3", f"hydra.run.dir={resumed_dir}"]), 0)
    state = torch.load(resumed_dir / "checkpoints" / "last.pt", weights_only=True)
    assert state["step"] == 3 and state["config"]["data"]["root"] == str(photos)
    assert state["config"]["model"]["base_width"] == 8 and state["style_path"].endswith("hokusai_great_wave.jpg")
    other = f"style={STYLES / 'arcimboldo_spring.jpg'}"
    for args, expect in (
        ([other], "was trained with style=hokusai_great_wave.jpg (given: arcimboldo_spring.jpg)"),
        # A finished run with another style would write the new name on the old weights.
        ([other, "train.resume_override=true"], "nothing would be trained on the new settings"),
    ):
        _verdict(_train([f"train.resume={finished_run}", *args, f"hydra.run.dir={tmp_path / 'x'}"]), 2, expect)
        assert not (tmp_path / "x").exists()
    assert _fingerprint(finished_run) == before


# --- memory and option ranges --------------------------------------------------------------------------------------


def test_a_step_that_cannot_fit_is_refused_before_allocating(tmp_path: Path) -> None:
    # About 25 TB at any precision: more than any machine running this test has.
    proc = _train([*TINY, "train.batch_size=4096", "data.image_size=4096", f"hydra.run.dir={tmp_path / 'run'}"])
    line = _verdict(proc, 2, "needs about")
    assert "GiB" in line and "available" in line and "lower them" in line
    assert not (tmp_path / "run").exists()


def test_the_estimate_grows_with_the_work_and_names_what_to_change() -> None:
    def need(batch: int, size: int, style: tuple[int, int] = (256, 256)) -> MemoryNeed:
        layers = ["relu1_2", "relu2_2", "relu3_3", "relu4_3"]
        return estimate(batch, size, 32, 5, "nearest", "vgg19", layers, layers, 4, False, [style])

    small, large = need(4, 256), need(8, 256)
    assert large.step == pytest.approx(2 * small.step)
    assert need(4, 512).step == pytest.approx(4 * small.step)
    assert 0.5 * 2**30 < small.step < 4 * 2**30  # Johnson's setting: a few GiB, not MiB or TiB
    check_fits(small, 8 * 2**30, "of RAM available", 4, 256)  # fits: no error
    with pytest.raises(FaststyleError, match=r"train.batch_size=\d+ or less fits"):
        check_fits(need(64, 256), 8 * 2**30, "of RAM available", 64, 256)
    with pytest.raises(FaststyleError, match="lower style_size"):
        check_fits(need(1, 32, (4096, 16384)), 8 * 2**30, "of RAM available", 1, 32)


def test_a_style_strip_too_thin_says_what_to_do(tmp_path: Path) -> None:
    path = tmp_path / "strip.png"
    Image.new("RGB", (7, 5000), (120, 60, 30)).save(path)
    with pytest.raises(FaststyleError) as caught:
        load_style_image(path, 256, 8)
    message = str(caught.value)
    assert "7x5000 px" in message and "714 times its short side" in message and "e.g. 7x28 px" in message
    assert "would be 1 px" not in message


# --- torchrun ------------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_under_torchrun_a_usage_error_is_printed_once(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", str(REPO / "train.py"), *TINY]
        + ["+train.foo=1", f"hydra.run.dir={tmp_path / 'run'}"],
        cwd=REPO,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "unknown option train.foo" in lines[0], proc.stderr[-3000:]
    # What torchrun adds itself: its ChildFailedError report (exit status 1), with rank 0 as the root cause.
    assert proc.returncode == 1
    assert "exitcode  : 2" in proc.stderr
