"""Writing files so that nothing a user owns is ever half-written: the one implementation of atomic writes.

Every file faststyle writes (checkpoints, ``model.pth``, stylized images, exports, reports) goes to a temporary file
in the destination folder, is flushed to disk, given the permissions any new file of the user gets (``0666 &
~umask``; ``mkstemp`` alone would leave ``0600``) and renamed onto the target (``os.replace`` is atomic on POSIX and
Windows). A crash or a ``kill -9`` mid-write therefore leaves the previous file intact plus, at worst, a hidden
temporary file; its name carries the writer's process id (``.<name>.<pid>.<random>.tmp``), so a later run can tell
a stale one (its writer is dead) from one being written right now, and :func:`remove_stale_temp_files` deletes it.

A full disk (``ENOSPC``/``EDQUOT``, or ``EFBIG``: a file larger than the file system or ``ulimit -f`` allows) raises
``DiskFullError`` (a FaststyleError) with one line naming the file and the space needed, instead of a chained
traceback. Writers get a file object that hides its descriptor, so that libraries (Pillow's encoders) write
through Python's buffered writer, which either writes every byte or raises: Pillow's direct writes to a
descriptor ignore short writes, which on a nearly full disk left a truncated image without any error.

Reading is the mirror image: :func:`safe_torch_load` is the one ``torch.load`` of the project, and it never runs code
from a file. torch is imported inside the functions that need it, so the entry points can use this module (stale
temporary files, one-line errors) before paying for the torch import.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import io
import logging
import os
import pickle
import pickletools
import re
import stat
import tempfile
import time
import warnings
import zipfile
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, BinaryIO

from core.errors import FaststyleError

log = logging.getLogger(__name__)

TEMP_SUFFIX = ".tmp"
_TEMP_NAME = re.compile(r"^\.(?P<name>.+)\.(?P<pid>\d+)\.[A-Za-z0-9_]+\.tmp$")
# Temporary files of faststyle versions whose names did not carry the pid: only their age tells they are stale.
_OLD_TEMP_NAME = re.compile(r"^\.(?P<name>.+)\.[A-Za-z0-9_]{8}\.tmp$")
_OLD_TEMP_MIN_AGE_S = 3600.0
_DISK_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


class DiskFullError(FaststyleError):
    """A write ran out of space (or hit the file size limit); ``folder`` is where, ``errno`` which limit. A run
    that writes many files stops at the first one: the next would fail the same way."""

    def __init__(self, message: str, folder: Path, code: int) -> None:
        super().__init__(message)
        self.folder, self.errno = folder, code

    @property
    def kind(self) -> str:
        """What ran out, in a few words."""
        return {errno.EDQUOT: "quota exceeded", errno.EFBIG: "file too large"}.get(self.errno, "disk full")


def _read_umask() -> int:
    """The process umask, read without changing it where Linux allows (``os.umask`` alone must set it to read it,
    which races with threads creating files)."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def new_file_mode() -> int:
    """Permission bits a newly created file of this process gets (``0666 & ~umask``)."""
    return 0o666 & ~_read_umask()


def new_dir_mode() -> int:
    """Permission bits a newly created folder of this process gets (``0777 & ~umask``)."""
    return 0o777 & ~_read_umask()


def _mib(nbytes: float) -> str:
    return f"{nbytes / 2**20:.1f} MiB"


def free_bytes(folder: str | os.PathLike) -> int | None:
    """Bytes an unprivileged user may still write on the file system holding ``folder`` (None if unknown)."""
    try:
        stats = os.statvfs(folder)
    except (OSError, AttributeError):
        return None
    return stats.f_bavail * stats.f_frsize


def disk_full_error(path: Path, needed_bytes: int | None, err: OSError) -> DiskFullError:
    """The one-line error for a write that ran out of space (the previous file at ``path`` is unchanged)."""
    need = f"needs {_mib(needed_bytes)}" if needed_bytes is not None else "needs more space"
    # The write went to a temporary file: a file already at ``path`` is untouched, and where there was none, none is.
    kept = f"the previous {path.name} is unchanged" if path.exists() else f"no {path.name} was written"
    if err.errno == errno.EFBIG:
        message = (
            f"file too large: cannot write {path} ({need}): the file system or the file size limit (ulimit -f) "
            f"allows no larger file in {path.parent} ({kept})"
        )
    else:
        free = free_bytes(path.parent)
        have = f"{_mib(free)} free" if free is not None else "free space unknown"
        kind = "quota exceeded" if err.errno == errno.EDQUOT else "disk full"
        message = (
            f"{kind}: cannot write {path} ({need}, {have} in {path.parent}); free some space and run again ({kept})"
        )
    return DiskFullError(message, path.parent, err.errno)


class _BufferedOnly:
    """A binary file whose ``fileno()`` raises io.UnsupportedOperation; everything else is the wrapped file's.

    Libraries that find a descriptor write to it themselves: Pillow's encoders call write(2) and ignore short
    writes, so a nearly full disk gave a truncated image and no error. Without a descriptor they write through
    Python's buffered writer, which loops until every byte is written or raises the OSError (ENOSPC)."""

    def __init__(self, handle: BinaryIO) -> None:
        self._handle = handle

    def fileno(self) -> int:
        raise io.UnsupportedOperation("fileno: write through this object")

    def __getattr__(self, name: str) -> Any:
        return getattr(self._handle, name)


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike, size_hint: int | None = None) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; when the block ends without error, the temporary file is synced to
    disk, given the user's normal permissions and renamed onto ``path``. On any error it is removed.

    ``size_hint`` (bytes) makes a disk-full error say how much space the file needs.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.{os.getpid()}.", suffix=TEMP_SUFFIX, dir=path.parent)
    except OSError as err:
        if err.errno in _DISK_FULL:
            raise disk_full_error(path, size_hint, err) from err
        raise
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        flags = os.O_RDONLY | getattr(os, "O_BINARY", 0)
        sync_fd = os.open(tmp, flags)
        try:
            os.fsync(sync_fd)
        finally:
            os.close(sync_fd)
        os.chmod(tmp, new_file_mode())
        os.replace(tmp, path)
    except BaseException as err:
        tmp.unlink(missing_ok=True)
        if isinstance(err, OSError) and err.errno in _DISK_FULL:
            raise disk_full_error(path, size_hint, err) from err
        raise


def atomic_write(path: str | os.PathLike, write: Callable[[BinaryIO], None], size_hint: int | None = None) -> None:
    """Atomically write ``path`` with ``write(handle)`` (a binary file opened on the temporary file, without a
    descriptor: see _BufferedOnly)."""
    with atomic_output(path, size_hint) as tmp, open(tmp, "wb") as handle:
        write(_BufferedOnly(handle))


def atomic_write_bytes(path: str | os.PathLike, data: bytes | bytearray | memoryview) -> None:
    """Atomically write ``data`` to ``path``."""
    atomic_write(path, lambda handle: handle.write(data), size_hint=len(data))


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Atomically write ``text`` (UTF-8) to ``path``."""
    atomic_write_bytes(path, text.encode("utf-8"))


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # a live process of another user
        return True
    except OSError:
        return True
    return True


def remove_stale_temp_files(folder: str | os.PathLike) -> list[Path]:
    """Delete the temporary files our atomic writes left in ``folder`` when their writer died (``kill -9``, power
    loss); returns what was removed. Files of a writer that is still alive are left alone."""
    folder = Path(folder)
    removed: list[Path] = []
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return removed
    now = time.time()
    for entry in entries:
        if not entry.name.startswith(".") or not entry.name.endswith(TEMP_SUFFIX):
            continue
        match = _TEMP_NAME.match(entry.name)
        try:
            if not entry.is_file(follow_symlinks=False):
                continue
            if match is not None:
                stale = not _pid_alive(int(match["pid"]))
            else:
                stale = _OLD_TEMP_NAME.match(entry.name) is not None and (
                    now - entry.stat(follow_symlinks=False).st_mtime > _OLD_TEMP_MIN_AGE_S
                )
            if stale:
                os.unlink(entry.path)
                removed.append(Path(entry.path))
        except OSError:
            continue
    if removed:
        log.info("removed %d stale temporary file(s) of an interrupted run in %s", len(removed), folder)
    return removed


# ------------------------------------------------------------------------------------------------------------------
# torch files and checksums
# ------------------------------------------------------------------------------------------------------------------
def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save`` ``obj`` onto ``path`` atomically (:func:`atomic_write_bytes`).

    Serialised in memory first (checkpoints are a few MB to a few tens of MB), so a full disk is reported with
    the exact size the file needs.
    """
    import torch

    buffer = io.BytesIO()
    torch.save(obj, buffer)
    atomic_write_bytes(path, buffer.getbuffer())


_TORCH_MAGIC = (b"PK\x03\x04", b"\x80")  # torch.save: a zip archive, or (legacy format) a pickle stream
_OTHER_KINDS = (
    (b"\xff\xd8\xff", "a JPEG image"),
    (b"\x89PNG", "a PNG image"),
    (b"GIF8", "a GIF image"),
    (b"RIFF", "a WebP image or other RIFF file"),
    (b"BM", "a BMP image"),
    (b"\x08", "an ONNX model or other protobuf file"),
)
_DAMAGED = "corrupt (cut short?) or another kind of file that torch.load cannot read"
# What a torch file's pickle may import without being code: torch's own tensor rebuilders and the containers
# torch.save writes. Anything else named in a well-formed pickle is a class or function it would call on load.
_PLAIN_GLOBALS = frozenset({"collections.OrderedDict", "_codecs.encode", "builtins.set", "builtins.frozenset"})
_PICKLE_SCAN_LIMIT = 64 << 20  # bytes of pickle read to tell code from damage (data.pkl is small even in big models)
_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_.]*")


def regular_file_problem(path: str | os.PathLike) -> str | None:
    """Why ``path`` cannot be read as a file, in a few words ("not found", "a folder", "a named pipe (FIFO)", ...),
    or None when it is a regular file (symbolic links followed).

    Only ``stat`` is used: opening a FIFO to look at it would block until something writes to it.
    """
    path = Path(path)
    try:
        mode = os.stat(path).st_mode
    except OSError as err:
        if err.errno == errno.ELOOP:
            return "a broken symbolic link (a loop)"
        if err.errno in (errno.ENOENT, errno.ENOTDIR):
            if os.path.islink(path):
                return f"a broken symbolic link (to {os.readlink(path)}, which does not exist)"
            return "not found"
        return f"not reachable ({err.strerror or err})"
    if stat.S_ISREG(mode):
        return None
    kinds = (
        (stat.S_ISDIR, "a folder"),
        (stat.S_ISFIFO, "a named pipe (FIFO)"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISSOCK, "a socket"),
    )
    kind = next((word for test, word in kinds if test(mode)), "not a regular file")
    if os.path.islink(path) and not stat.S_ISDIR(mode):  # a link to a folder is used as that folder
        kind += f" (a symbolic link to {os.path.realpath(path)})"
    return kind


def file_kind(path: str | os.PathLike) -> str:
    """What ``path`` is, in words, for messages (:func:`regular_file_problem`'s words, "a regular file" for one,
    "missing" when nothing is there)."""
    problem = regular_file_problem(path)
    if problem is None:
        return "a regular file"
    return "missing" if problem == "not found" else problem


def check_regular_file(path: str | os.PathLike, what: str, fix: str) -> None:
    """Raise one FaststyleError line unless ``path`` is a regular file (or a link to one): "<what> not found",
    "... is a folder", "... is a named pipe (FIFO), not a regular file", each followed by ``fix``."""
    problem = regular_file_problem(path)
    if problem is None:
        return
    if problem == "not found":
        raise FaststyleError(f"{what} not found: {path} ({fix})")
    if problem.startswith(("a folder", "a broken", "a symbolic", "not reachable")):
        raise FaststyleError(f"{what} {path} is {problem}: {fix}")
    raise FaststyleError(f"{what} {path} is {problem}, not a regular file: {fix}")


def _not_torch_file(path: Path) -> str | None:
    """What ``path`` is when its first bytes show it was not written by ``torch.save`` (None when it may be)."""
    # O_NONBLOCK: should the path have been replaced by a FIFO since it was checked, the read fails instead of
    # waiting for a writer forever.
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_BINARY", 0))
    with os.fdopen(fd, "rb") as handle:
        head = handle.read(512) or b""
    if not head:
        return "an empty file"
    if head.startswith(_TORCH_MAGIC):
        return None
    for magic, kind in _OTHER_KINDS:
        if head.startswith(magic):
            return kind
    try:
        head.decode("utf-8")
    except UnicodeDecodeError:
        return "not a file written by torch.save"
    return "a text file"


def _pickle_imports(stream: BinaryIO, pickles: int) -> list[str] | None:
    """The ``module.name`` of every global the first ``pickles`` pickles of ``stream`` import, read with
    ``pickletools`` (which parses the opcodes and runs nothing); None when the first one is not a well-formed
    pickle. Later ones may be missing (a legacy torch file has raw tensor bytes after its last pickle)."""
    found: list[str] = []
    for index in range(pickles):
        strings: list[str] = []  # the text values pushed so far (STACK_GLOBAL takes module and name from them)
        memo: dict[int, object] = {}
        names: list[str] = []
        try:
            for opcode, arg, _ in pickletools.genops(stream):
                if isinstance(arg, str) and opcode.name.endswith("UNICODE"):
                    strings.append(arg)
                elif opcode.name in ("MEMOIZE", "PUT", "BINPUT", "LONG_BINPUT"):
                    memo[len(memo) if arg is None else int(arg)] = strings[-1] if strings else None
                elif opcode.name in ("GET", "BINGET", "LONG_BINGET") and isinstance(memo.get(int(arg)), str):
                    strings.append(memo[int(arg)])
                elif opcode.name in ("GLOBAL", "INST"):
                    names.append(".".join(str(arg).split(" ", 1)))
                elif opcode.name == "STACK_GLOBAL":
                    names.append(".".join(strings[-2:]) if len(strings) >= 2 else "an object")
        except Exception:  # noqa: BLE001 - any parse failure (bad opcode, cut short, bad argument) means damage
            return None if index == 0 else found
        found += names
    return found


def _code_in_torch_file(path: Path) -> str | None:
    """The first class or function a well-formed torch file's pickle would import beyond tensors and plain values
    (what ``weights_only`` refused), or None when the pickle is damaged or imports nothing else."""
    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as archive:
                member = next((n for n in archive.namelist() if n.endswith("data.pkl")), None)
                if member is None:
                    return None
                with archive.open(member) as handle:
                    imports = _pickle_imports(io.BytesIO(handle.read(_PICKLE_SCAN_LIMIT)), pickles=1)
        else:
            with open(path, "rb") as handle:
                # Legacy format: magic number, protocol, system info, then the object: four pickles.
                imports = _pickle_imports(io.BytesIO(handle.read(_PICKLE_SCAN_LIMIT)), pickles=4)
    except (OSError, zipfile.BadZipFile, RuntimeError, ValueError, EOFError):
        return None
    for name in imports or []:
        if _IDENTIFIER.fullmatch(name) and not name.startswith("torch.") and name not in _PLAIN_GLOBALS:
            return name
    return None


def safe_torch_load(
    path: str | os.PathLike,
    what: str,
    origin: str = "faststyle",
    fix: str = "pass a model.pth or checkpoint written by train.py",
) -> dict:
    """The one safe ``torch.load``: ``weights_only=True`` onto the CPU, each failure a one-line FaststyleError.

    ``weights_only`` is the point: torch's restricted unpickler rebuilds only tensors, primitives and containers, so
    a file carrying code (a ``__reduce__`` that runs a command) is refused before anything runs. ``what`` names the
    file kind in messages ("model file", "checkpoint"), ``origin`` who writes such files, ``fix`` what the user
    should do instead. Returns the loaded dict (anything else is refused).

    Whatever the bytes, the answer is one line: "<path> is not a <origin> <what>: it is ..." for anything that is
    not such a file (text, an image, random or damaged bytes, also those that start like a pickle), and "refusing to
    load <path>" only for a well-formed pickle that would import code. torch's own warnings (pickle protocol,
    deprecated storages) are kept off stderr: the file is either read or refused with that line.
    """
    import torch

    path = Path(path)
    check_regular_file(path, what, fix)
    try:
        kind = _not_torch_file(path)
    except OSError as err:
        raise FaststyleError(f"cannot read {what} {path}: {err.strerror or err}") from err
    if kind is not None:
        raise FaststyleError(f"{path} is not a {origin} {what}: it is {kind} ({fix})")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except MemoryError as err:
        raise FaststyleError(f"cannot read {what} {path}: not enough memory to hold it") from err
    except Exception as err:  # noqa: BLE001 - torch's readers raise a dozen types on hostile bytes; none is our bug
        log.debug("torch.load(%s) failed: %s: %s", path, type(err).__name__, " ".join(str(err).split())[:500])
        code = _code_in_torch_file(path) if isinstance(err, pickle.UnpicklingError) else None
        if code is not None:
            raise FaststyleError(
                f"refusing to load {path}: it would import {code} (code, not weights) when read, so it was not "
                f"read; a {what} holds only tensors and plain values: use files written by {origin} only"
            ) from None
        raise FaststyleError(f"{path} is not a {origin} {what}: it is {_DAMAGED} ({fix})") from None
    if not isinstance(obj, dict):
        raise FaststyleError(f"{path} is not a {origin} {what} (expected a dict, found {type(obj).__name__}): {fix}")
    return obj


class SameFiles:
    """Recognise the files in ``paths`` whatever path names them: by real path (symbolic links, ``..``) and by
    identity (``st_dev``, ``st_ino``: hard links). The one test behind "an output is never an input"; a path that
    does not exist yet (the usual output) matches only by real path."""

    def __init__(self, paths: Iterable[str | os.PathLike]) -> None:
        self._real: dict[str, Any] = {}
        self._identities: dict[tuple[int, int], Any] = {}
        for path in paths:
            self._real[os.path.realpath(path)] = path
            with contextlib.suppress(OSError):  # a missing file can only be matched by its real path
                found = os.stat(path)
                self._identities[(found.st_dev, found.st_ino)] = path

    def find(self, path: str | os.PathLike) -> Any:
        """The path given for the file that ``path`` is (as given to the constructor), or None."""
        match = self._real.get(os.path.realpath(path))
        if match is None:
            with contextlib.suppress(OSError):
                found = os.stat(path)
                match = self._identities.get((found.st_dev, found.st_ino))
        return match


def same_file(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    """True when ``a`` and ``b`` name one file (see :class:`SameFiles`)."""
    return SameFiles([b]).find(a) is not None


def refuse_output_among_inputs(output: str | os.PathLike, inputs: dict[str, Path], option: str) -> None:
    """Raise one FaststyleError line when ``output`` is one of ``inputs`` (``{what: path}``), also through a symbolic
    or hard link: "output <output> is the <what> <path>: choose another <option>"."""
    for what, path in inputs.items():
        if same_file(output, path):
            raise FaststyleError(f"output {output} is the {what} {path}: choose another {option}")


def file_sha256(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
