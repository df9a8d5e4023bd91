"""Every command of the README's ```bash blocks, checked so that the README cannot drift from the code.

In the suite (a few seconds): each command's options are checked the way the program itself checks them, in this
process, without doing the work:

- ``python train.py`` / ``python stylize.py``: ``core.cli.preflight``, the parse, compose and range checks their
  command line runs before any work (multirun ``-m``: the override syntax, as the program itself does);
- ``python -m scripts.NAME ...`` / ``python -m evaluation NAME ...`` / ``python -m benchmarks NAME ...``: that
  tool's, report's or benchmark's own argparse parser (every module and every flag must exist);
- ``torchrun ...``: torchrun's own parser, then the training script's options as above;
- ``make TARGET``: ``make -n TARGET``; ``bash scripts/X.sh``: run with ``--dry-run``; any other program
  (``tensorboard``): an executable beside this Python.

Inline ``python -m scripts.NAME --flag``, ``python -m evaluation NAME --flag`` and ``python -m benchmarks NAME
--flag`` spans in the prose and tables are checked for the module and its flags.

``make readme-check`` (``FASTSTYLE_README_RUN=1``) also *runs* every command, in README order, in a temporary folder
that links the repository's ``data/`` and holds small fixtures under the README's own names (``photo.jpg``,
``photos/``, ``clip.mp4``, ``m.pth``, ``run/`` and ``multi/`` trained by train.py, ...). Training gets tiny budgets
(:data:`TINY_TRAIN`, appended, so they win), placeholders are mapped by :data:`SUBSTITUTIONS` and
:func:`concrete`, and the commands matched by :data:`OPTIONS_ONLY` (COCO, a GPU, several machines, minutes of
benchmark, the suite itself) keep the options check only, each with its reason.

``python tests/test_readme.py`` prints every README command and how it is checked.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import re
import runpy
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from unittest import mock

import pytest

REPO = Path(__file__).resolve().parents[1]  # not tests.support: this file also runs alone (python tests/test_readme.py)
README = REPO / "README.md"
BIN = Path(sys.executable).parent
RUN = os.environ.get("FASTSTYLE_README_RUN") == "1"

TINY_TRAIN = ["train.steps=2", "data.image_size=32", "model.base_width=8", "data.num_workers=0"]
"""Appended to every train.py command that ``make readme-check`` runs: seconds instead of minutes."""

OPTIONS_ONLY = {
    r"^make test\b": "the whole test suite (make readme-check is run apart from it)",
    r"\bdata=coco\b": "needs COCO (13.5 GB, scripts/download_coco.sh)",
    r"\bdevice=cuda\b|--device cuda": "needs a CUDA GPU",
    r"^python -m benchmarks\b": "a benchmark: minutes of CPU time at its full sizes",
    r"^bash scripts/download_coco\.sh": "downloads 13.5 GB (checked with --dry-run, which downloads nothing)",
    r"^make web-deps\b": "installs system and npm packages (apt-get, npm ci)",
    r"--format web\b": "needs make web-deps (tests/interop/test_web_export.py and test_web_page.py run it)",
    r"^python -m http\.server\b": "a server: runs until stopped",
}
"""Commands ``make readme-check`` does not run (a regex searched in the command as written -> the reason)."""

SUBSTITUTIONS = [
    ("outputs/train/<date>/<run>/", "run/"),  # a one-style run trained for the check
    ("<run>/", "multi/"),  # the README's multi-style run: experiment=multistyle_demo, trained for the check
    ("data.root=...", "data.root=data/samples/content"),
]
"""Plain text replacements, in order, before :func:`concrete` maps ``model=...`` and other ``<placeholders>``."""


@dataclass
class Command:
    line: int  # README line where the command starts
    text: str  # as written (continuation lines joined)
    argv: list[str]  # as the shell passes it ($VAR and a leading ~/ expanded, quotes removed)

    def options_only(self) -> str | None:
        """Why ``make readme-check`` does not run this command, or None."""
        return next((why for pattern, why in OPTIONS_ONLY.items() if re.search(pattern, self.text)), None)


def expand(word: str, env: dict[str, str]) -> str:
    """The shell's expansions the README relies on: ``$VAR`` / ``${VAR}`` and a leading ``~/``."""
    word = re.sub(r"\$(?:\{(\w+)\}|(\w+))", lambda m: env.get(m.group(1) or m.group(2), ""), word)
    return env.get("HOME", "~") + word[1:] if word.startswith("~/") else word


def readme_commands(text: str, env: dict[str, str] | None = None) -> list[Command]:
    """The commands of every ```bash block of ``text``, in order; ``model=...`` gets the model of the command
    before it in the same block (the README's shorthand for "the same model")."""
    env = dict(os.environ if env is None else env)
    commands: list[Command] = []
    lines = text.splitlines()
    inside, pending, start, previous_model = False, "", 0, None
    for number, line in enumerate(lines, start=1):
        if line.startswith("```"):
            inside, previous_model = line.strip() == "```bash", None
            continue
        if not inside:
            continue
        if not pending:
            start = number
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        written = " ".join((pending + line).split())
        words = shlex.split(written, comments=True)
        pending = ""
        if not words:
            continue
        argv = [expand(word, env) for word in words]
        for i, word in enumerate(argv):
            if word == "model=..." and previous_model:
                argv[i] = previous_model
        previous_model = next((w for w in argv if w.startswith("model=")), previous_model)
        commands.append(Command(start, written, argv))
    return commands


def concrete(argv: list[str], workdir: Path | None = None) -> list[str]:
    """``argv`` with the README's placeholders filled: :data:`SUBSTITUTIONS`, then each other ``<name>`` as a glob
    in ``workdir`` (the newest match: a run the README made earlier), or as the bare name without a workdir."""
    out = []
    for word in argv:
        for old, new in SUBSTITUTIONS:
            word = word.replace(old, new)
        if "<" in word:
            key, sep, value = word.rpartition("=") if "=" in word.split("<")[0] else ("", "", word)
            if workdir is not None:
                matches = sorted(workdir.glob(re.sub(r"<[^>]+>", "*", value)), key=lambda p: p.stat().st_mtime)
                value = str(matches[-1].relative_to(workdir)) if matches else value
            value = re.sub(r"<([^>]+)>", r"\1", value)
            word = f"{key}{sep}{value}"
        out.append(word)
    return out


# ---- the options check (in process) ------------------------------------------------------------------------------


class _Parsed(Exception):
    def __init__(self, parser: argparse.ArgumentParser) -> None:
        super().__init__()
        self.parser = parser


@contextlib.contextmanager
def _quiet() -> io.StringIO:
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        yield err


def _run_script_until_parsed(module: str, args: list[str], parse: bool) -> argparse.ArgumentParser | str:
    """Run ``python -m module args`` until its parse_args: the parser (parse=False: before parsing), or the error."""
    original = argparse.ArgumentParser.parse_args

    def stop(self, args=None, namespace=None):
        if parse:
            original(self, args, namespace)
        raise _Parsed(self)

    # runpy warns when the module was imported before (by another test, or the fixtures): run a fresh copy, and put
    # the imported one back afterwards.
    imported = sys.modules.pop(module, None)
    try:
        with (
            _quiet() as err,
            mock.patch.object(argparse.ArgumentParser, "parse_args", stop),
            mock.patch.object(sys, "argv", [module, *args]),
        ):
            runpy.run_module(module, run_name="__main__", alter_sys=True)
    except _Parsed as parsed:
        return parsed.parser
    except SystemExit as exit:
        return " ".join(err.getvalue().split()) or f"exit status {exit.code}"
    except ImportError as error:
        return f"{module}: {error}"
    finally:
        if imported is not None:
            sys.modules[module] = imported
    return f"{module} never parsed its arguments"


def _entry_point_options(script: str, args: list[str]) -> str | None:
    """train.py / stylize.py: the preflight their command line runs before any work (None: accepted)."""
    from core.cli import preflight

    if script == "train.py":
        import train
        from configs.schema import check_train_config

        compose, check = train.compose_with_hydra, check_train_config
    elif script == "stylize.py":
        import stylize
        from configs.schema import check_stylize_config

        args = [stylize.quote_style_mix(arg) for arg in args]
        compose, check = stylize.compose_with_hydra, check_stylize_config
    else:
        return f"{script}: not an entry point of this repository"
    with _quiet() as err:
        try:
            preflight(args, compose, check)
        except SystemExit:
            return err.getvalue().strip() or "refused"
    return None


def check_options(argv: list[str], workdir: Path) -> str | None:
    """None when ``argv`` (a README command, placeholders filled) would be accepted; else the reason."""
    program, args = argv[0], argv[1:]
    if program == "python" and args[:1] == ["-m"]:
        found = _run_script_until_parsed(args[1], args[2:], parse=True)
        return None if isinstance(found, argparse.ArgumentParser) else found
    if program == "python":
        return _entry_point_options(args[0], args[1:])
    if program == "torchrun":
        from torch.distributed.run import get_args_parser

        with _quiet() as err:
            try:
                parsed = get_args_parser().parse_args(args)
            except SystemExit:
                return " ".join(err.getvalue().split())
        return _entry_point_options(parsed.training_script, parsed.training_script_args)
    if program == "make":
        done = subprocess.run(["make", "-n", "-C", str(REPO), *args], capture_output=True, text=True)
        return None if done.returncode == 0 else done.stderr.strip()
    if program == "bash":
        done = subprocess.run(
            ["bash", str(REPO / args[0]), *args[1:], "--dry-run"], capture_output=True, text=True, cwd=workdir
        )
        return None if done.returncode == 0 else done.stderr.strip()
    if (BIN / program).is_file():
        return None
    return f"{program}: no such program beside {sys.executable}, and no check for it here"


README_TEXT = README.read_text(encoding="utf-8")
FAKE_HOME = "/nonexistent-home"
COMMANDS = readme_commands(README_TEXT, {**os.environ, "HOME": FAKE_HOME})


@pytest.mark.parametrize("command", COMMANDS, ids=[f"L{c.line}:{c.argv[0]}" for c in COMMANDS])
def test_readme_command_options(command: Command, tmp_path: Path) -> None:
    reason = check_options(concrete(command.argv), tmp_path)
    assert reason is None, f"README line {command.line}: {command.text}\n  -> {reason}"


def test_the_check_refuses_what_a_shell_would_fail(tmp_path: Path) -> None:
    """The check can fail: commands the README once had, refused as they were when typed."""
    broken = textwrap_block(
        "python train.py style=path/to/painting.jpg data.root=~/photos",  # Hydra's lexer refuses '~'
        "python -m scripts.prepare_dataset SRC DST --size 288",  # the flag is --short-side
        "python -m scripts.no_such_script --help",
        "python -m benchmarks norm --size 4,8,8,8",  # the flag is --shape
        "python -m evaluation compare_runs runs/ --no-such-flag",
        "python stylize.py model=m.pth input=photo.jpg strenght=0.7",
        "torchrun --standalone --nproc_per_node=2 train.py train.steps=abc",
        "make no-such-target",
    )
    commands = readme_commands(broken, {"HOME": FAKE_HOME})
    assert len(commands) == 8
    for command in commands:
        assert check_options(concrete(command.argv), tmp_path) is not None, command.text
    assert "~/photos" in check_options(commands[0].argv, tmp_path)
    assert "--size" in check_options(commands[1].argv, tmp_path)
    assert "--size" in check_options(commands[3].argv, tmp_path)


def textwrap_block(*lines: str) -> str:
    return "```bash\n" + "\n".join(lines) + "\n```\n"


def test_placeholders_and_shell_expansions() -> None:
    block = textwrap_block(
        "python train.py data.root=$HOME/photos  # a comment",
        "python stylize.py model=outputs/train/<date>/<run>/model.pth input=photo.jpg",
        "python stylize.py model=... \\",
        "    input=photos/",
    )
    first, second, third = readme_commands(block, {"HOME": "/h"})
    assert first.argv == ["python", "train.py", "data.root=/h/photos"]
    assert concrete(second.argv)[2] == "model=run/model.pth"
    assert third.argv[2:] == ["model=outputs/train/<date>/<run>/model.pth", "input=photos/"] and third.line == 4
    assert concrete(["x", "multirun/in_vs_bn/<date>/<time>-vg"]) == ["x", "multirun/in_vs_bn/date/time-vg"]


def _inline_script_spans(text: str) -> list[tuple[int, str, list[str], list[str]]]:
    """``python -m scripts.NAME [WORD] ... --flag ...`` (or ``python -m evaluation NAME ...``, ``python -m benchmarks
    NAME ...``) in inline code outside the code blocks: (line, module, the first word if it is not an option (a
    subcommand such as ``benchmarks train`` or ``evaluation compare_runs``), flags)."""
    found, inside = [], False
    for number, line in enumerate(text.splitlines(), start=1):
        if line.startswith("```"):
            inside = not inside
            continue
        if inside:
            continue
        for span in re.findall(r"`([^`]*python -m (?:scripts\.|benchmarks\b|evaluation\b)[^`]*)`", line):
            module, first = re.search(r"python -m (scripts\.\w+|benchmarks|evaluation) ?([\w.]*)", span).groups()
            flags = re.findall(r"(?<![\w-])--[a-z][\w-]*", span)
            found.append((number, module, [first] if first else [], flags))
    return found


def _option_strings(parser: argparse.ArgumentParser) -> set[str]:
    options = set()
    for action in parser._actions:
        options.update(action.option_strings)
        for sub in getattr(action, "choices", None) or {}:
            if isinstance(action.choices, dict) and isinstance(action.choices[sub], argparse.ArgumentParser):
                options |= _option_strings(action.choices[sub])
    return options


def test_inline_script_commands_name_real_modules_and_flags() -> None:
    spans = _inline_script_spans(README_TEXT)
    assert spans, "no inline `python -m scripts.NAME` found: the pattern is out of date"
    assert any(module == "benchmarks" for _, module, _, _ in spans), "no inline `python -m benchmarks NAME` found"
    parsers: dict[str, argparse.ArgumentParser | str] = {}
    wrong = []
    for line, module, first, flags in spans:
        key = " ".join([module, *first])
        if key not in parsers:
            parsers[key] = _run_script_until_parsed(module, first, parse=False)
        parser = parsers[key]
        if not isinstance(parser, argparse.ArgumentParser):
            wrong.append(f"line {line}: {module}: {parser}")
            continue
        wrong += [f"line {line}: {module} has no {flag}" for flag in flags if flag not in _option_strings(parser)]
    assert not wrong, "\n".join(wrong)


# ---- make readme-check: run every command ------------------------------------------------------------------------


def _make_fixtures(work: Path, env: dict[str, str]) -> None:
    """The files the README's commands name, small, under the README's names; the models trained by train.py."""
    import torch

    from benchmarks.video import make_clip
    from interop.pytorch_examples import examples_config, to_examples_state_dict
    from models.transformer import TransformerNet

    samples = REPO / "data" / "samples"
    (work / "data").symlink_to(REPO / "data")  # commands name data/samples/... and data.root defaults to it
    for name in ("photo.jpg", "photos/x.jpg", "photos/Zoë (2).jpg", "home/photos/a.jpg", "footage/photo.jpg"):
        (work / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(samples / "content" / "chelsea.jpg", work / name)
    shutil.copy(samples / "content" / "rocket.jpg", work / "home" / "photos" / "b.jpg")
    from PIL import Image

    Image.open(samples / "content" / "coffee.jpg").save(work / "photos" / "y.png")
    styles = sorted((samples / "styles").glob("*.jpg"))
    for name, style in zip(
        ("path/to/painting.jpg", "paintings/a=b.jpg", "a.jpg", "b.jpg", "c.jpg"), styles, strict=False
    ):
        (work / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(style, work / name)
    for name in ("clip.mp4", "clip.mov", "footage/clip.mp4"):
        make_clip(work / name, 64, 48, 6)
    torch.manual_seed(0)
    torch.save(to_examples_state_dict(TransformerNet(**examples_config(8, 1))), work / "mosaic.pth")
    for experiment, folder in (("demo", "run"), ("multistyle_demo", "multi")):
        _run(
            [
                sys.executable,
                str(REPO / "train.py"),
                f"experiment={experiment}",
                *TINY_TRAIN,
                f"hydra.run.dir={folder}",
            ],
            work,
            env,
            check=True,
        )
    for name in ("m.pth", "model.pth"):
        shutil.copy(work / "run" / "model.pth", work / name)


def _run(argv: list[str], cwd: Path, env: dict[str, str], check: bool = False) -> str | None:
    """None when the command exited 0 without a traceback; else its status and the end of its output."""
    done = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    output = done.stdout + done.stderr
    if done.returncode == 0 and "Traceback" not in output:
        return None
    reason = f"exit status {done.returncode}: ...{output[-1500:]}"
    if check:
        raise AssertionError(f"{shlex.join(argv)}: {reason}")
    return reason


def runnable(argv: list[str], work: Path) -> list[str]:
    """A README command as this check runs it: this environment's programs, the repository's scripts, tiny budgets."""
    program, args = argv[0], argv[1:]
    if program == "make":
        demo_args = " ".join(TINY_TRAIN)
        return ["make", "-C", str(REPO), *args, f"DEMO_DIR={work / 'outputs' / 'demo'}", f"DEMO_ARGS={demo_args}"]
    if program == "bash":
        return ["bash", str(REPO / args[0]), *args[1:], "--dry-run"]
    if program == "python":
        program = sys.executable
        if args[0] in ("train.py", "stylize.py"):
            args = [str(REPO / args[0]), *args[1:]]
    elif program == "tensorboard":
        return [str(BIN / program), *args, "--inspect"]
    else:
        program = str(BIN / program)
    if "train.py" in args or str(REPO / "train.py") in args:
        args = [str(REPO / "train.py") if a == "train.py" else a for a in args] + TINY_TRAIN
    return [program, *args]


@pytest.mark.skipif(not RUN, reason="runs every README command (minutes): make readme-check")
def test_readme_commands_run(tmp_path: Path) -> None:
    work = tmp_path / "work"
    work.mkdir()
    env = {**os.environ, "HOME": str(work / "home"), "PYTHONPATH": str(REPO)}
    env.pop("FASTSTYLE_README_RUN", None)
    _make_fixtures(work, env)
    failures = []
    for command in readme_commands(README_TEXT, env):
        argv = concrete(command.argv, work)
        why = command.options_only()
        reason = check_options(argv, work) if why else _run(runnable(argv, work), work, env)
        status = (
            ("options checked" if reason is None else "OPTIONS REFUSED")
            if why
            else ("ok" if reason is None else "FAILED")
        )
        print(f"README line {command.line}: {status}{' (not run: ' + why + ')' if why else ''}: {command.text}")
        if reason is not None:
            failures.append(f"README line {command.line}: {command.text}\n  -> {reason}")
    assert not failures, "\n".join(failures)


def how_checked() -> str:
    """Every README command and how it is checked (``python tests/test_readme.py``)."""
    rows = []
    for command in COMMANDS:
        why = command.options_only()
        rows.append(f"L{command.line}: {command.text}\n    {'options only: ' + why if why else 'options; run'}")
    return "\n".join(rows)


if __name__ == "__main__":
    print(how_checked())
