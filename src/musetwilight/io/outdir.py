"""The output directory of a run: made and checked before any work, and held by one run at a time.

:func:`claim` makes the directory if needed and takes an exclusive lock on it (an
``flock`` on ``.musetwilight.lock``, which the kernel releases when the process dies,
so a killed run leaves no stale lock).  A second run into the same directory fails at
once with :class:`~musetwilight.errors.BusyError` naming the holder.  While holding the
lock a run removes what killed runs left behind (their temporary product files).
Problems are sentences naming the directory (:class:`~musetwilight.errors.OutputError`).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
from datetime import UTC, datetime
from pathlib import Path

from ..errors import BusyError, OutputError, os_error_reason

LOCK_NAME = ".musetwilight.lock"
TEMPORARY_SUFFIX = ".tmp"  # temporary files of a run: "." + final name + "." + random + ".tmp"


class OutputLock:
    """One run's exclusive hold on an output directory; released by :meth:`release` (or on exit)."""

    def __init__(self, directory: Path, fd: int):
        self.directory = directory
        self._fd: int | None = fd

    @property
    def held(self) -> bool:
        return self._fd is not None

    def release(self) -> None:
        """Remove the lock file and release the lock (the file goes first: see :func:`claim`)."""
        if self._fd is None:
            return
        with contextlib.suppress(OSError):
            os.unlink(self.directory / LOCK_NAME)
        os.close(self._fd)
        self._fd = None

    def __enter__(self) -> OutputLock:
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def make_directory(directory: str | os.PathLike, what: str = "output directory") -> Path:
    """Make ``directory`` (and its parents) if needed; OutputError with a sentence if it cannot be."""
    path = Path(directory)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise OutputError(f"{path}: cannot be the {what}: a file of that name exists") from None
    except OSError as err:
        raise OutputError(f"{path}: cannot create the {what}: {os_error_reason(err)}") from None
    if not path.is_dir():
        raise OutputError(f"{path}: cannot be the {what}: not a directory")
    return path


def claim(directory: str | os.PathLike) -> OutputLock:
    """Make the output directory, check that it is writable and take its lock.

    Raises :class:`BusyError` at once when another run holds it, :class:`OutputError`
    when the directory cannot be made or written.  After a lock is taken the lock file
    must still be the one in the directory (a releasing run may have removed it in
    between); otherwise the claim starts again.
    """
    path = make_directory(directory)
    lock_path = path / LOCK_NAME
    while True:
        try:
            fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o666)
        except OSError as err:
            raise OutputError(f"{path}: cannot write into the output directory: {os_error_reason(err)}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder(fd)
            os.close(fd)
            raise BusyError(f"{path}: another musetwilight run ({holder}) is writing into this output "
                            "directory; wait for it to finish or choose another output directory") from None
        try:
            same = os.fstat(fd).st_ino == os.stat(lock_path).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    os.ftruncate(fd, 0)
    os.write(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                             "since": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S UTC")}).encode())
    lock = OutputLock(path, fd)
    remove_leftovers(path)
    return lock


def _holder(fd: int) -> str:
    """Who holds a lock, from what it wrote into the lock file."""
    try:
        info = json.loads(os.pread(fd, 4096, 0) or b"{}")
        return f"process {info['pid']} on {info['host']}, since {info['since']}"
    except (OSError, ValueError, KeyError, TypeError):
        return "a process that has just started"


def temporary_name(final: Path) -> str:
    """The prefix of a temporary file for ``final`` (a random part and TEMPORARY_SUFFIX follow)."""
    return f".{final.name}."


def remove_leftovers(directory: Path) -> list[Path]:
    """Remove the temporary files killed runs left in ``directory`` (products ``.*.fits.*.tmp``
    and records ``.musetwilight*.tmp``); call it with the directory's lock held."""
    removed = []
    for path in directory.glob(f".*{TEMPORARY_SUFFIX}"):
        if ".fits." not in path.name and not path.name.startswith(".musetwilight"):
            continue
        with contextlib.suppress(OSError):
            path.unlink()
            removed.append(path)
    return removed
