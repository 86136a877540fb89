"""One run of a study at a time: an exclusive lock on its folder, held for the whole flow run. A second
`dpcompress run` of the same study (or a deployment run of it) stops at once with one line, before it touches the
tracking store or any stage folder. Within a run, concurrent lines that need the same shared folder take turns
(`folder_lock`)."""
from __future__ import annotations

import contextlib
import fcntl
import os
import socket
from collections.abc import Iterator
from pathlib import Path

LOCK_FILE = ".dpcompress.lock"


class StudyLockedError(RuntimeError):
    """Another process runs this study."""


def holder(study_dir: str | Path) -> str | None:
    """Who holds the lock of `study_dir` now (None: nobody); creates nothing. A probe for pre-flight: the lock the
    run takes is still what keeps two runs apart."""
    path = Path(study_dir) / LOCK_FILE
    if not path.is_file():
        return None
    with open(path, "r+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return handle.read().strip() or "another process"
        fcntl.flock(handle, fcntl.LOCK_UN)
    return None


@contextlib.contextmanager
def study_lock(study_dir: str | Path) -> Iterator[Path]:
    """Hold the lock of `study_dir` (created if missing); StudyLockedError naming the holder if another process has
    it. The lock dies with its process (flock), so a killed run never leaves the study locked."""
    folder = Path(study_dir)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / LOCK_FILE
    handle = open(path, "a+")  # noqa: SIM115  (held open for the lock's lifetime)
    try:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            raise StudyLockedError(f"study folder {folder} is in use by {holder}: one run of a study at a time "
                                   f"(wait for it, or stop it)") from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
        handle.flush()
        yield path
    finally:
        handle.close()


@contextlib.contextmanager
def folder_lock(folder: str | Path) -> Iterator[Path]:
    """Wait for, then hold, an exclusive lock on `folder` (created if missing): lines running concurrently (on Dask
    workers) that need the same shared result compute it once; the others wait, then find it finished. The lock dies
    with its process (flock)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / ".compute.lock", "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield folder
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
