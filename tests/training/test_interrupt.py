"""Ctrl-C and SIGTERM during training (training/interrupt.py, training.loop.fit, train.py's main): the current step
is finished and saved to checkpoints/last.pt, one line gives the resume command, the exit status is 130 / 143, a
second Ctrl-C exits at once, and torchrun ranks all stop after the same step.

The CLI tests run train.py for real on a very small problem (32 px, base width 8, the random loss network cut after
relu1_2: many steps per second) and signal it once its progress bar shows a few steps.
"""

from __future__ import annotations

import itertools
import os
import re
import shlex
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from models.loss import PerceptualLoss
from models.transformer import TransformerNet
from tests.support import CONTENT, REPO, STYLE, compose_train, free_port
from training import interrupt, rundir
from training.checkpoint import load_checkpoint
from training.loop import RunOutputs, RunRecord, TrainingInterrupted, TrainOptions, fit

pytestmark = pytest.mark.usefixtures("one_thread")

TOTAL_STEPS = 100000

FAST = [
    f"style={STYLE}",
    f"data.root={CONTENT}",
    "style_size=64",
    "device=cpu",
    "loss.network=random",
    # Only relu1_2: the loss network is cut after it, so a step is cheap (and the braces test the resume quoting).
    "~loss.style_layers",
    "+loss.style_layers={relu1_2:1.0}",
    "loss.content_layers=[relu1_2]",
    "model.base_width=8",
    "model.residual_blocks=1",
    "data.image_size=32",
    "data.num_workers=0",
    "data.val_images=2",
    "train.batch_size=2",
    f"train.steps={TOTAL_STEPS}",
    "train.log_interval_steps=1",
    f"train.image_interval_steps={TOTAL_STEPS}",
    f"train.checkpoint_interval_steps={TOTAL_STEPS}",
]
RESUME_LINE = re.compile(
    r"^interrupted at step (?P<step>\d+) \((?P<how>[^)]+)\): checkpoint saved to (?P<checkpoint>\S+); "
    r"resume with: (?P<command>.+)$"
)


def _env() -> dict[str, str]:
    # One intra-op thread: thread start-up costs more than these tiny tensors' work, and two runs share the CPU.
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "TORCHELASTIC_RUN_ID"):
        env.pop(key, None)
    return env


class TrainProcess:
    """train.py (or a ``python -c`` wrapper around it) in a subprocess, its stderr collected by a thread."""

    def __init__(self, argv: list[str]) -> None:
        # A process group of its own, like a job in a terminal: signal_group reaches its DataLoader workers too.
        self.proc = subprocess.Popen(
            [sys.executable, *argv],
            cwd=REPO,
            env=_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            start_new_session=True,
        )
        self._err = bytearray()
        self._out = bytearray()
        self._readers = [
            threading.Thread(target=self._drain, args=(self.proc.stderr, self._err), daemon=True),
            threading.Thread(target=self._drain, args=(self.proc.stdout, self._out), daemon=True),
        ]
        for reader in self._readers:
            reader.start()

    @staticmethod
    def _drain(stream, sink: bytearray) -> None:
        while chunk := stream.read1(65536):
            sink.extend(chunk)

    def signal_group(self, signum: int) -> None:
        """What a terminal's Ctrl-C does (and torchrun, Slurm or systemd with SIGTERM): signal every process of the
        group, the DataLoader workers included."""
        os.killpg(self.proc.pid, signum)

    def step(self) -> int:
        """The last step the progress bar showed (tqdm writes ``<n>/<total>`` to stderr)."""
        found = re.findall(rf"(\d+)/{TOTAL_STEPS}\b", self._err.decode(errors="replace"))
        return int(found[-1]) if found else 0

    def wait_for(self, ready, timeout_s: float = 60.0) -> None:
        deadline = time.monotonic() + timeout_s
        while not ready():
            if self.proc.poll() is not None:
                raise AssertionError(f"train.py ended early with {self.proc.returncode}:\n{self.stderr[-3000:]}")
            if time.monotonic() > deadline:
                self.proc.kill()
                raise AssertionError(f"timed out; stderr:\n{self.stderr[-3000:]}")
            time.sleep(0.05)

    def finish(self, timeout_s: float = 60.0) -> int:
        try:
            code = self.proc.wait(timeout=timeout_s)
        finally:
            self.proc.kill()
        for reader in self._readers:
            reader.join(timeout=10)
        return code

    @property
    def stderr(self) -> str:
        return self._err.decode(errors="replace")

    @property
    def stdout(self) -> str:
        return self._out.decode(errors="replace")

    def lines(self) -> list[str]:
        """stderr split into lines, the progress bar's carriage-return updates included."""
        return [line for line in re.split(r"[\r\n]+", self.stderr) if line.strip()]


# --- the command line ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("signum", "label"), [(signal.SIGINT, "Ctrl-C"), (signal.SIGTERM, "SIGTERM")])
def test_signal_saves_the_current_step_and_the_printed_command_resumes(tmp_path: Path, signum: int, label: str) -> None:
    run_dir = tmp_path / "run"
    overrides = [*FAST, "data.num_workers=1"]  # a decoding process, which gets the signal too
    run = TrainProcess(["train.py", *overrides, f"hydra.run.dir={run_dir}"])
    run.wait_for(lambda: run.step() >= 3)
    run.signal_group(signum)
    assert run.finish() == 128 + signum
    assert "Traceback" not in run.stderr
    resume_lines = [line for line in run.lines() if "resume with:" in line]
    assert len(resume_lines) == 1, run.stderr[-3000:]
    match = RESUME_LINE.match(resume_lines[0])
    assert match, resume_lines[0]
    step = int(match["step"])
    assert step >= 3 and match["how"] == label
    assert Path(match["checkpoint"]) == run_dir / "checkpoints" / "last.pt"
    assert load_checkpoint(run_dir)["step"] == step
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["last.pt"]  # no periodic checkpoint
    assert resume_lines[0][resume_lines[0].index("interrupted") :] in (run_dir / "train.log").read_text()

    words = shlex.split(match["command"])
    assert words[:2] == ["python", "train.py"]
    assert words[-1] == f"train.resume={run_dir}"
    assert words[2:-1] == overrides  # the user's overrides, exactly as typed
    words = [f"train.steps={step + 2}" if word.startswith("train.steps=") else word for word in words]
    resumed_dir = tmp_path / "resumed"
    resumed = subprocess.run(
        [sys.executable, *words[1:], f"hydra.run.dir={resumed_dir}"],
        cwd=REPO,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed at step {step}" in resumed.stdout
    assert load_checkpoint(resumed_dir)["step"] == step + 2
    assert (resumed_dir / "model.pth").is_file()


# Once the test creates the "armed" file, os.replace (the rename that completes every atomic write) of last.pt is
# held up, so that the second Ctrl-C reliably lands while a checkpoint is being written. The hold (10 minutes) is far
# longer than any exit may take on a loaded machine, so "exits at once" is no race. The "saving" file (the cue for the
# second Ctrl-C) appears only once the first Ctrl-C is handled, because a periodic checkpoint may reach the held rename
# first and a SIGINT sent while the previous one is still pending merges with it (signals do not queue).
SLOW_RENAME = """
import os, pathlib, runpy, sys, time
from training.interrupt import active_stop_signals
real_replace = os.replace
def slow_replace(src, dst, *args, **kwargs):
    if os.path.basename(str(dst)) == "last.pt" and os.path.exists(os.environ["FASTSTYLE_TEST_ARMED"]):
        deadline = time.monotonic() + 600  # bounded, like the hold: a child left behind must still end
        while active_stop_signals().signum is None and time.monotonic() < deadline:
            time.sleep(0.01)
        pathlib.Path(os.environ["FASTSTYLE_TEST_SAVING"]).touch()
        time.sleep(600)
    return real_replace(src, dst, *args, **kwargs)
os.replace = slow_replace
sys.argv = ["train.py", *sys.argv[1:]]
runpy.run_path("train.py", run_name="__main__")
"""


def test_second_ctrl_c_exits_at_once_and_leaves_the_last_checkpoint_intact(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    run_dir, armed, saving = tmp_path / "run", tmp_path / "armed", tmp_path / "saving"
    monkeypatch.setenv("FASTSTYLE_TEST_ARMED", str(armed))
    monkeypatch.setenv("FASTSTYLE_TEST_SAVING", str(saving))
    run = TrainProcess(["-c", SLOW_RENAME, *FAST, "train.checkpoint_interval_steps=2", f"hydra.run.dir={run_dir}"])
    run.wait_for(lambda: run.step() >= 3)  # step 2's checkpoint is written
    armed.touch()
    run.proc.send_signal(signal.SIGINT)
    run.wait_for(saving.exists)  # the first Ctrl-C is handled and a checkpoint is being written
    run.proc.send_signal(signal.SIGINT)
    assert run.finish(timeout_s=120) == 130  # did not wait for the rename held up for 600 s
    assert "Traceback" not in run.stderr
    assert "resume with:" not in run.stderr
    assert any(line.startswith("interrupted again (Ctrl-C): exited at once without saving") for line in run.lines())
    # last.pt is a periodic checkpoint from before the first Ctrl-C, whole; the abandoned write left only its
    # temporary file.
    saved = load_checkpoint(run_dir)["step"]
    assert saved >= 2 and saved % 2 == 0
    leftovers = [p.name for p in (run_dir / "checkpoints").iterdir() if p.name.startswith(".last.pt.")]
    assert leftovers and all(name.endswith(".tmp") for name in leftovers)


# A Ctrl-C while the data folder is scanned, before the loop exists.
CTRL_C_WHILE_LOADING = """
import os, runpy, signal, sys
import data.dataset
real_init = data.dataset.ImageFolderDataset.__init__
def init(self, *args, **kwargs):
    os.kill(os.getpid(), signal.SIGINT)
    real_init(self, *args, **kwargs)
data.dataset.ImageFolderDataset.__init__ = init
sys.argv = ["train.py", *sys.argv[1:]]
runpy.run_path("train.py", run_name="__main__")
"""


def test_ctrl_c_before_the_first_step_prints_one_line(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    run = TrainProcess(["-c", CTRL_C_WHILE_LOADING, *FAST, f"hydra.run.dir={run_dir}"])
    assert run.finish() == 130
    assert "Traceback" not in run.stderr
    assert [line for line in run.lines() if "interrupted" in line] == [
        "interrupted before the first training step (Ctrl-C); nothing to save"
    ]
    assert not (run_dir / "checkpoints").exists()


def test_resume_command_replaces_train_resume_and_quotes_for_shell_and_hydra(monkeypatch: pytest.MonkeyPatch) -> None:
    from hydra.core.hydra_config import HydraConfig

    overrides = ["style=my painting.jpg", "train.resume=outputs/old", "loss.style_layers={relu1_2:1.0}"]
    rundir.register_resolvers()  # hydra.run.dir names the run after its style, as train.py declares
    cfg = compose_train(overrides, return_hydra_config=True)
    monkeypatch.setattr(sys, "argv", ["train.py"])
    monkeypatch.delenv("TORCHELASTIC_RUN_ID", raising=False)
    HydraConfig.instance().set_config(cfg)
    try:
        words = shlex.split(rundir.resume_command("/runs/a b"))
        assert words == [
            "python",
            "train.py",
            "style=my painting.jpg",
            "loss.style_layers={relu1_2:1.0}",
            'train.resume="/runs/a b"',
        ]
        monkeypatch.setenv("TORCHELASTIC_RUN_ID", "x")
        monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
        monkeypatch.setenv("GROUP_WORLD_SIZE", "1")
        assert rundir.resume_command("/runs/r") == (
            "torchrun --nproc_per_node=4 train.py 'style=my painting.jpg' "
            "'loss.style_layers={relu1_2:1.0}' train.resume=/runs/r"
        )
    finally:
        HydraConfig.instance().cfg = None


# --- the handlers --------------------------------------------------------------------------------------------------


class _Exited(Exception):
    pass


def test_handler_semantics(monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture) -> None:
    def fake_exit(code: int) -> None:
        raise _Exited(code)

    monkeypatch.setattr(interrupt.os, "_exit", fake_exit)
    # Outside the loop the first signal raises at once, with what was saved so far.
    stop = interrupt.StopSignals()
    with pytest.raises(TrainingInterrupted) as caught:
        stop.handle(signal.SIGTERM)
    assert (caught.value.step, caught.value.checkpoint, caught.value.exit_code) == (None, None, 143)

    stop = interrupt.StopSignals()
    with stop.deferred():
        stop.handle(signal.SIGINT)  # recorded; the loop decides when to stop
        stop.handle(signal.SIGTERM)  # a launcher's follow-up: ignored, the save goes on
        assert stop.signum == signal.SIGINT
        stop.saved(7, Path("run/checkpoints/last.pt"))
        with pytest.raises(_Exited) as exited:
            stop.handle(signal.SIGINT)  # a repeated Ctrl-C: exit now
        assert exited.value.args == (130,)
        stop.signum = None  # (the loop would have raised TrainingInterrupted; leave the block quietly)
    assert (
        "interrupted again (Ctrl-C): exited at once without saving; last checkpoint: run/checkpoints/last.pt "
        "(step 7)" in capfd.readouterr().err
    )

    # torchrun forwards the Ctrl-C to its workers: a second SIGINT within the grace period is that copy.
    stop = interrupt.StopSignals(announce=False, repeat_grace_s=60.0)
    with pytest.raises(TrainingInterrupted), stop.deferred():
        stop.handle(signal.SIGINT)
        stop.handle(signal.SIGINT)
    # A SIGTERM first: a later SIGINT is the first one, only the one after it exits.
    stop = interrupt.StopSignals(announce=False)
    with stop.deferred():
        stop.handle(signal.SIGTERM)
        stop.handle(signal.SIGINT)
        with pytest.raises(_Exited):
            stop.handle(signal.SIGINT)
        stop.signum = None


def test_stop_signals_restores_the_previous_handlers_and_nests() -> None:
    before = {s: signal.getsignal(s) for s in interrupt.STOP_SIGNALS}
    with interrupt.stop_signals() as outer:
        assert signal.getsignal(signal.SIGINT) == outer.handle
        with interrupt.stop_signals() as inner:
            assert inner is outer and interrupt.active_stop_signals() is outer
        assert signal.getsignal(signal.SIGTERM) == outer.handle  # the inner block restored nothing
    assert {s: signal.getsignal(s) for s in interrupt.STOP_SIGNALS} == before
    assert interrupt.active_stop_signals() is None


# --- the loop, in process ------------------------------------------------------------------------------------------


class _SignalAt(torch.nn.Module):
    """Wraps a loss and sends ``signums`` to this process during its ``at``-th call (i.e. during that step)."""

    def __init__(self, loss: torch.nn.Module, at: int, signums: tuple[int, ...]) -> None:
        super().__init__()
        self.loss, self.at, self.signums, self.calls = loss, at, signums, 0

    def forward(self, output: torch.Tensor, content: torch.Tensor) -> dict[str, torch.Tensor]:
        self.calls += 1
        if self.calls == self.at:
            for signum in self.signums:
                os.kill(os.getpid(), signum)
        return self.loss(output, content)


class _RecordingOutputs(RunOutputs):
    """RunOutputs that records checkpoint writes and can send a signal while it writes a checkpoint, an image or
    model.pth."""

    def __init__(
        self,
        run_dir: Path,
        total_steps: int,
        signal_during: str | None = None,
        signum: int = signal.SIGINT,
        at_step: int = 2,
    ) -> None:
        super().__init__(run_dir, total_steps, 0)
        self.signal_during, self.signum, self.at_step = signal_during, signum, at_step
        self.checkpoints: list[tuple[int, bool]] = []

    def _maybe_signal(self, what: str, step: int) -> None:
        if self.signal_during == what and step == self.at_step:
            os.kill(os.getpid(), self.signum)

    def checkpoint(self, state: dict, step: int, periodic: bool) -> None:
        self.checkpoints.append((step, periodic))
        self._maybe_signal("checkpoint", step)
        super().checkpoint(state, step, periodic)

    def image(self, tag: str, image: torch.Tensor, step: int) -> None:
        if tag.startswith("val/"):
            self._maybe_signal("image", step)
        super().image(tag, image, step)

    def final(self, model, meta, hparams, metrics) -> Path:
        self._maybe_signal("final", int(meta["steps"]))
        return super().final(model, meta, hparams, metrics)


def _fit(options: TrainOptions, outputs: RunOutputs, loss_wrapper=None) -> Path:
    torch.manual_seed(0)
    model = TransformerNet(base_width=8, residual_blocks=1)
    loss = PerceptualLoss("random", ["relu1_2"], {"relu1_2": 1.0}, 1.0, 1.0, 0.0)
    photos = torch.rand(2, 3, 32, 32)
    loss.set_style(photos[:1])
    try:
        return fit(
            model,
            loss_wrapper(loss) if loss_wrapper else loss,
            itertools.repeat(photos),
            options,
            torch.device("cpu"),
            outputs,
            RunRecord(photos[:1], photos),
        )
    finally:
        outputs.close()


def test_fit_finishes_the_step_saves_it_and_restores_the_handlers(tmp_path: Path) -> None:
    before = signal.getsignal(signal.SIGINT)
    options = TrainOptions(steps=50, log_interval_steps=4, image_interval_steps=100, checkpoint_interval_steps=100)
    outputs = _RecordingOutputs(tmp_path, options.steps)
    with pytest.raises(TrainingInterrupted) as caught:
        # torchrun's follow-up SIGTERM arrives right after the Ctrl-C: it must not change or abort anything.
        _fit(options, outputs, lambda loss: _SignalAt(loss, 3, (signal.SIGINT, signal.SIGTERM)))
    stop = caught.value
    assert (stop.step, stop.signum, stop.exit_code) == (3, signal.SIGINT, 130)
    assert stop.checkpoint == tmp_path / "checkpoints" / "last.pt"
    assert outputs.checkpoints == [(3, False)]
    assert load_checkpoint(tmp_path)["step"] == 3
    assert not (tmp_path / "model.pth").exists()
    assert signal.getsignal(signal.SIGINT) is before


@pytest.mark.parametrize(
    ("during", "signum", "checkpoints"),
    [
        # The signal comes while step 2's own checkpoint is written: stop there, without writing it twice.
        ("checkpoint", signal.SIGTERM, [(2, True)]),
        # ... while step 2's images are written (no checkpoint due): stop there and save it.
        ("image", signal.SIGINT, [(2, False)]),
    ],
)
def test_a_signal_while_files_are_written_stops_at_that_step(
    tmp_path: Path, during: str, signum: int, checkpoints: list
) -> None:
    interval = 2 if during == "checkpoint" else 100
    options = TrainOptions(steps=50, log_interval_steps=1, image_interval_steps=2, checkpoint_interval_steps=interval)
    outputs = _RecordingOutputs(tmp_path, options.steps, signal_during=during, signum=signum, at_step=2)
    with pytest.raises(TrainingInterrupted) as caught:
        _fit(options, outputs)
    assert (caught.value.step, caught.value.exit_code) == (2, 128 + signum)
    assert outputs.checkpoints == checkpoints
    assert load_checkpoint(tmp_path)["step"] == 2


def test_a_signal_while_the_model_file_is_written_reports_the_final_checkpoint(tmp_path: Path) -> None:
    options = TrainOptions(steps=3, log_interval_steps=1, image_interval_steps=100, checkpoint_interval_steps=100)
    outputs = _RecordingOutputs(tmp_path, options.steps, signal_during="final", at_step=3)
    with pytest.raises(TrainingInterrupted) as caught:
        _fit(options, outputs)
    assert (caught.value.step, caught.value.checkpoint) == (3, tmp_path / "checkpoints" / "last.pt")
    assert outputs.checkpoints == [(3, False)]


# --- torchrun: every rank stops after the same step ----------------------------------------------------------------


def _rank(rank: int, world_size: int, run_dir: str, port: int) -> None:
    """One gloo rank of a tiny DDP run in which only rank 1 gets the Ctrl-C (during step 3), plus torchrun's
    follow-up SIGTERM. Writes what the rank saw to ``result_<rank>.pt``."""
    from training import distributed as D

    torch.set_num_threads(1)
    os.environ.update(
        RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)
    )
    ctx = D.init_distributed("cpu")
    options = TrainOptions(
        steps=1000, log_interval_steps=1000, image_interval_steps=1000, checkpoint_interval_steps=1000
    )
    outputs = RunOutputs(Path(run_dir), options.steps, 0, enabled=ctx.is_main)
    torch.manual_seed(rank)
    model = TransformerNet(base_width=8, residual_blocks=1)
    loss = PerceptualLoss("random", ["relu1_2"], {"relu1_2": 1.0}, 1.0, 1.0, 0.0)
    photos = torch.rand(2, 3, 32, 32)
    loss.set_style(photos[:1])
    if rank == 1:
        loss = _SignalAt(loss, 3, (signal.SIGINT, signal.SIGTERM))
    result: dict = {}
    try:
        fit(
            model,
            loss,
            itertools.repeat(photos),
            options,
            ctx.device,
            outputs,
            RunRecord(photos[:1], photos),
            dist_ctx=ctx,
        )
    except TrainingInterrupted as stop:
        result = {"step": stop.step, "signum": stop.signum, "checkpoint": str(stop.checkpoint)}
    finally:
        outputs.close()
        D.teardown_distributed()
    torch.save(result, Path(run_dir) / f"result_{rank}.pt")


def test_torchrun_ranks_agree_on_the_step_when_one_rank_gets_the_signal(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RUN_ID"):
        monkeypatch.delenv(key, raising=False)
    mp.spawn(_rank, args=(2, str(tmp_path), free_port()), nprocs=2, join=True)
    rank0, rank1 = (torch.load(tmp_path / f"result_{r}.pt", weights_only=True) for r in (0, 1))
    assert rank1["step"] == 3 and rank1["signum"] == signal.SIGINT
    assert (rank0["step"], rank0["signum"]) == (3, signal.SIGINT)  # rank 0 got no signal: it learnt of it from the
    # all-reduce    assert rank0["checkpoint"] == str(tmp_path / "checkpoints" / "last.pt")
    assert rank1["checkpoint"] == "None"  # ranks > 0 write nothing
    assert load_checkpoint(tmp_path)["step"] == 3
