"""What train.py and stylize.py do before Hydra starts a job: read the command line the way Hydra will, and turn
every mistake in it into one ``error:`` line with exit status 2.

Hydra reports its own errors (override syntax, unknown keys, a value of the wrong type) in several lines and exits
with status 1, which stylize.py uses for "some images failed", and it creates the run folder and writes its
``.hydra/`` snapshot into it before our code runs. So :func:`preflight` parses the overrides and composes the
config itself first, checks it against ``configs/schema.py``, and (for training) picks a run folder that no other
run uses. Only then does the entry point hand over to ``@hydra.main``.

Exit statuses of both programs (README, "Exit statuses"): 0 done, 1 stylize.py only: some images failed (each is
listed), 2 a usage or input error (one ``error:`` line), 3 an internal error (a bug: traceback), 130 / 143
interrupted by Ctrl-C / SIGTERM.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable, Collection
from pathlib import Path
from typing import NoReturn

from omegaconf import DictConfig, OmegaConf

from core.errors import FaststyleError, exit_with_error, report_error

EXIT_USAGE = 2
EXIT_INTERNAL = 3
EXIT_INTERRUPTED = 130


def usage_error(message: str) -> NoReturn:
    """Print ``error: <message>`` (one line) and exit with status 2 (under torchrun once, by rank 0:
    core.errors.report_error)."""
    report_error(f"error: {' '.join(str(message).split())}")


def plain_warnings() -> None:
    """Show every Python warning as one line, ``warning: <message>``, instead of Python's two lines that start with
    the warning's source file (a site-packages path, which tells a user nothing)."""
    import warnings

    def show(message: Warning | str, category: type[Warning], *_: object, **__: object) -> None:
        print(f"warning: {' '.join(str(message).split())}", file=sys.stderr)

    warnings.showwarning = show


def first_line(err: BaseException) -> str:
    """The first non-empty line of an exception's message (Hydra and OmegaConf add context lines)."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return lines[0] if lines else type(err).__name__


def hydra_error_line(err: BaseException) -> str:
    """Hydra's multi-line composition error as one line (without its hints about stack traces and full keys)."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    if lines and lines[0].startswith("Could not override '"):
        key = lines[0].split("'")[1]
        return f"unknown option {key}: check its spelling (--cfg job prints every option)"
    if "Config search path:" in lines:
        lines = lines[: lines.index("Config search path:")]
    noise = ("full_key:", "object_type=", "reference_type=", "Set the environment variable", "See https://")
    kept: list[str] = []
    for line in lines:
        if line.startswith(noise):
            continue
        if kept and kept[-1].startswith("Available options"):  # "Available options in 'model':" + one per line
            kept[-1] += ("" if kept[-1].endswith(":") else ",") + " " + line
        else:
            kept.append(line)
    cause = err.__cause__
    if cause is not None and not kept[1:]:
        kept += [line.strip() for line in str(cause).splitlines()[:1] if line.strip()]
    return "; ".join(kept) or type(err).__name__


def quoted_override(text: str) -> str:
    """``key=value`` written so that both the shell and Hydra's override grammar take the value literally."""
    key, _, value = text.partition("=")
    hydra_form = f'{key}="{value}"' if '"' not in value else f"{key}='{value}'"
    return "'" + hydra_form.replace("'", "'\\''") + "'"


def parse_command_line(argv: list[str]) -> argparse.Namespace:
    """Hydra's own command-line parser (flags such as ``-m``, ``--cfg``; the rest are overrides)."""
    from hydra._internal.utils import get_args_parser

    return get_args_parser().parse_args(argv)


def _hydra_only_flags(args: argparse.Namespace) -> bool:
    """Flags that make Hydra print something instead of running the job: leave those to Hydra."""
    return bool(
        args.help
        or args.hydra_help
        or args.shell_completion
        or args.cfg
        or args.info is not None
        or args.experimental_rerun
        or args.config_path
        or args.config_name
        or args.config_dir
    )


def parse_overrides(overrides: list[str]) -> list:
    """Hydra's parsed overrides; a syntax error is one line that says how to quote the value."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import OverrideParseException

    parser = OverridesParser.create()
    parsed = []
    for text in overrides:
        try:
            parsed.extend(parser.parse_overrides([text]))
        except OverrideParseException as err:
            hint = (
                f"quote the value: {quoted_override(text)}"
                if "=" in text
                else "an override is key=value, e.g. style=painting.jpg"
            )
            usage_error(f"cannot read the option {text!r} ({first_line(err)}): {hint}")
    return parsed


def preflight(
    argv: list[str],
    compose: Callable[[list[str]], DictConfig],
    check: Callable[[DictConfig], None],
    choose_outputs: Callable[[DictConfig, list, bool], list[str]] | None = None,
) -> list[str]:
    """Check the command line before Hydra runs it; return extra overrides for Hydra (e.g. the chosen run dir).

    ``compose(overrides)`` composes the config with the hydra node; ``check(cfg)`` raises FaststyleError for a
    bad config; ``choose_outputs(cfg, parsed overrides, multirun)`` returns overrides that pin the output folder.
    Every problem exits with status 2 and one line. Nothing is checked when a flag asks Hydra to print
    something (``--help``, ``--cfg``, ...). In multirun mode (``-m``) the sweep values are composed by Hydra, so only
    the syntax and the output folder are checked here; each job checks its own config when it starts.
    """
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    args = parse_command_line(argv)
    if _hydra_only_flags(args):
        return []
    parsed = parse_overrides(args.overrides)
    if not args.multirun:
        for override, text in zip(parsed, args.overrides, strict=True):
            if override.is_sweep_override():
                usage_error(
                    f"{text!r} lists several values, which only a sweep (-m) runs: for one value with a "
                    f"comma, quote it: {quoted_override(text)}"
                )
    plain = [text for override, text in zip(parsed, args.overrides, strict=True) if not override.is_sweep_override()]
    try:
        cfg = compose(plain)
    except (HydraException, OmegaConfBaseException, ValueError, KeyError) as err:
        usage_error(hydra_error_line(err))
    try:
        if not args.multirun:
            check(cfg)
        return choose_outputs(cfg, parsed, bool(args.multirun)) if choose_outputs is not None else []
    except FaststyleError as err:
        usage_error(str(err))


def absolute_user_path(path: str | os.PathLike) -> Path:
    """A user path made absolute against the directory the command was started from (Hydra never changes the
    working directory here); ``~`` expanded, symbolic links kept, so names derived from it stay the user's."""
    return Path(os.path.abspath(os.path.expanduser(str(path))))


def model_file(value: str | os.PathLike) -> Path:
    """The model file ``model=`` names, made absolute (absolute_user_path); FaststyleError with one line when it is
    missing, a folder, or not a regular file (core.fileio.check_regular_file: a FIFO is never opened). Needs no
    torch, so the command line is checked before the torch import."""
    from core.fileio import check_regular_file

    path = absolute_user_path(value)
    check_regular_file(path, "model file", "pass the model file, e.g. model=<run dir>/model.pth")
    return path


def real_user_path(path: str) -> Path:
    """The real place a user path names: ``~`` expanded, relative to the current folder, symbolic links resolved.
    For deciding where things are (one folder inside another, the same folder twice); names shown to the user and
    derived from theirs come from :func:`absolute_user_path`."""
    return Path(os.path.realpath(os.path.expanduser(path)))


def hydra_value(cfg: DictConfig, key: str) -> str:
    """A resolved ``hydra.*`` value of a composed config as text."""
    return str(OmegaConf.select(cfg, key))


# --------------------------------------------------------------------------------------------------------------------
# The tools' command lines: one shape for the users' tools (python -m scripts.NAME) and the reports
# (python -m evaluation NAME), which may not import each other, so the shape lives here.

TOOL_LOG_FORMAT = "%(levelname)s %(name)s: %(message)s"


def tool_parser(prog: str, doc: str | None, *, summary_only: bool = False) -> argparse.ArgumentParser:
    """The argparse parser a tool starts from: ``prog`` as the user types it, the module docstring as the help,
    kept as written (only its first paragraph with ``summary_only``)."""
    description = (doc or "").split("\n\n")[0] if summary_only else doc
    return argparse.ArgumentParser(
        prog=prog, description=description, formatter_class=argparse.RawDescriptionHelpFormatter
    )


def add_device_option(parser: argparse.ArgumentParser, what: str = "where the network runs") -> None:
    """``--device``, ``auto`` by default in every tool; core.device.resolve_device checks the value."""
    parser.add_argument(
        "--device", default="auto", help=f"{what}: auto (cuda, then mps, then cpu), cuda, cuda:N, mps or cpu (auto)"
    )


def add_overwrite_option(parser: argparse.ArgumentParser) -> None:
    """``--overwrite``: without it an existing output file is refused (:func:`check_output_file`)."""
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output file")


def check_output_file(
    output: str | os.PathLike,
    inputs: dict[str, Path],
    overwrite: bool,
    option: str = "-o",
    example: str | None = None,
    suffixes: Collection[str] | None = None,
) -> None:
    """A tool's rules for its output file, checked before any work (FaststyleError, one line): never one of
    ``inputs`` (``{what: path}``; also through a symbolic or hard link), never a folder (``example``: a file name to
    suggest), one of ``suffixes`` when given (e.g. data.io.WRITE_FORMATS), and an existing file is replaced only
    with ``overwrite`` (a report's own files: always)."""
    from core.fileio import refuse_output_among_inputs

    output = Path(output)
    refuse_output_among_inputs(output, inputs, option)
    if output.is_dir():
        hint = f", e.g. {output / example}" if example else ""
        raise FaststyleError(f"{option} {output} is a folder: give a file name{hint}")
    if suffixes is not None and output.suffix.lower() not in suffixes:
        raise FaststyleError(f"cannot write {output.name}: use one of the extensions {', '.join(suffixes)}")
    if output.exists() and not overwrite:
        raise FaststyleError(f"{output} exists: pass --overwrite or choose another {option}")


def exit_on_bug() -> NoReturn:
    """Leave as every command does on an exception that is not a user's mistake (a bug): the traceback, one line
    asking for a report, exit status 3. Call from an ``except Exception`` block."""
    import traceback

    traceback.print_exc()
    print("internal error (a bug in faststyle): please report the traceback above", file=sys.stderr)
    raise SystemExit(EXIT_INTERNAL) from None


def run_tool(work: Callable[[], int | None]) -> int:
    """Run a tool's ``work()`` in the shared shape: logging set up (one format, on stderr), then the exit statuses
    of train.py and stylize.py: 0 done (or what ``work`` returns), 2 and one ``error: ...`` line for a
    FaststyleError (argparse exits with 2 for a usage mistake itself), 3 and the traceback for anything else (a
    bug), 130 on Ctrl-C."""
    logging.basicConfig(level=logging.INFO, format=TOOL_LOG_FORMAT)
    try:
        return int(work() or 0)
    except FaststyleError as err:
        exit_with_error(err)
    except KeyboardInterrupt:
        print("interrupted (Ctrl-C)", file=sys.stderr)
        raise SystemExit(EXIT_INTERRUPTED) from None
    except Exception:
        exit_on_bug()
