"""Writing files so that nothing a user owns is ever half-written: the one implementation of atomic writes.

Every file faststyle writes (checkpoints, ``model.pth``, stylized images, exports, reports) goes to a temporary file
in the destination folder, is flushed to disk, given the permissions any new file of the user gets (``0666 &
~umask``; ``mkstemp`` alone would leave ``0600``) and renamed onto the target (``os.replace`` is atomic on POSIX and
Windows). A crash or a ``kill -9`` mid-write therefore leaves the previous file intact plus, at worst, a hidden
temporary file; its name carries the writer's process id (``.<name>.<pid>.<random>.tmp``), so a later run can tell
a stale one (its writer is dead) from one being written right now, and :func:`remove_stale_temp_files` deletes it.

A full disk (``ENOSPC``/``EDQUOT``) raises ``FaststyleError`` with one line naming the file and the space needed,
instead of a chained traceback.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import re
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO

from core.errors import FaststyleError

log = logging.getLogger(__name__)

TEMP_SUFFIX = ".tmp"
_TEMP_NAME = re.compile(r"^\.(?P<name>.+)\.(?P<pid>\d+)\.[A-Za-z0-9_]+\.tmp$")
# Temporary files of faststyle versions whose names did not carry the pid: only their age tells they are stale.
_OLD_TEMP_NAME = re.compile(r"^\.(?P<name>.+)\.[A-Za-z0-9_]{8}\.tmp$")
_OLD_TEMP_MIN_AGE_S = 3600.0
_DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


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


def _mib(nbytes: float) -> str:
    return f"{nbytes / 2**20:.1f} MiB"


def free_bytes(folder: str | os.PathLike) -> int | None:
    """Bytes an unprivileged user may still write on the file system holding ``folder`` (None if unknown)."""
    try:
        stats = os.statvfs(folder)
    except (OSError, AttributeError):
        return None
    return stats.f_bavail * stats.f_frsize


def disk_full_error(path: Path, needed_bytes: int | None, err: OSError) -> FaststyleError:
    """The one-line error for a write that ran out of space (the previous file at ``path`` is unchanged)."""
    free = free_bytes(path.parent)
    need = f"needs {_mib(needed_bytes)}" if needed_bytes is not None else "needs more space"
    have = f"{_mib(free)} free" if free is not None else "free space unknown"
    kind = "quota exceeded" if err.errno == errno.EDQUOT else "disk full"
    return FaststyleError(f"{kind}: cannot write {path} ({need}, {have} in {path.parent}); free some space and "
                          f"run again (any previous {path.name} is unchanged)")


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike, size_hint: int | None = None) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; when the block ends without error, the temporary file is synced to
    disk, given the user's normal permissions and renamed onto ``path``. On any error it is removed.

    ``size_hint`` (bytes) makes a disk-full error say how much space the file needs.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.{os.getpid()}.", suffix=TEMP_SUFFIX, dir=path.parent)
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
    """Atomically write ``path`` with ``write(handle)`` (a binary file opened on the temporary file)."""
    with atomic_output(path, size_hint) as tmp, open(tmp, "wb") as handle:
        write(handle)


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
