"""One writer at a time: an exclusive `flock` on `<store>/.writer.lock`; readers never take it.

Why flock: the kernel drops it when the holder dies (even on SIGKILL), so a crashed writer never leaves
the store locked. The file's content (`pid host`) is only a hint for the error message; it is emptied on
release and the file itself is never deleted (deleting a lock file races with the next `open`).

Locks are per open file, not per process: two `writer_lock` calls in the same process (two threads, or
nested calls) exclude each other too, so never nest them.

`lock_for_dialect` is the seam for databases shared between hosts: PostgreSQL will take an advisory lock
there; until then every dialect uses the file lock on the store root.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import socket
import time
from pathlib import Path
from typing import Callable, ContextManager, Iterator

from iumad.errors import LockedError

LOCK_FILE = ".writer.lock"
POLL_SECONDS = 0.1


def _holder(fd: int) -> str:
    try:
        text = os.pread(fd, 256, 0).decode("utf-8", "replace").strip()
    except OSError:
        text = ""
    if not text:
        return "another process"
    pid, _, host = text.partition(" ")
    return f"pid {pid}" + (f" on {host}" if host and host != socket.gethostname() else "")


@contextlib.contextmanager
def file_lock(root: Path, wait: float = 0.0) -> Iterator[None]:
    """Hold the store's writer lock; poll up to `wait` seconds, else LockedError (exit 5) naming the holder."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    path = root / LOCK_FILE
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        deadline = time.monotonic() + max(0.0, wait)
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    hint = f" after waiting {wait:g} s" if wait > 0 else ""
                    raise LockedError(f"{root}: the store is being written by {_holder(fd)}{hint}; "
                                      "try again later or pass --wait SECONDS") from None
                time.sleep(min(POLL_SECONDS, max(0.0, deadline - time.monotonic())))
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()} {socket.gethostname()}\n".encode(), 0)
        try:
            yield
        finally:
            os.ftruncate(fd, 0)
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


LockFactory = Callable[[Path, float], ContextManager[None]]


def lock_for_dialect(dialect: str) -> LockFactory:
    """The writer-lock implementation for a database dialect (the file lock for all of them, for now)."""
    # postgresql: pg_advisory_lock on a dedicated connection, so that hosts sharing the database exclude
    # each other even when their store folders differ. Not implemented yet.
    return file_lock
