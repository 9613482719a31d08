"""One writer at a time: an exclusive `flock` on `<store>/.writer.lock`; readers never take it.

Why flock: the kernel drops it when the holder dies (even on SIGKILL), so a crashed writer never leaves
the store locked. The file's content (`pid host`) is only a hint for the error message; it is emptied on
release and the file itself is never deleted (deleting a lock file races with the next `open`).

Locks are per open file, not per process: two `writer_lock` calls in the same process (two threads, or
nested calls) exclude each other too, so never nest them.

`lock_for_dialect(dialect)` gives the lock factory `(root, wait, url)` for a database:

- SQLite (and any other dialect): the file lock on the store root.
- PostgreSQL: the file lock on the store root, then a session-level advisory lock in the database
  (`pg_try_advisory_lock(ADVISORY_KEY)` on a dedicated autocommit connection kept open while held). The
  advisory lock is what makes hosts sharing the database exclude each other even when their store folders
  differ; the file lock still guards the local folder (checkpoints, temporaries) against a second database
  pointed at the same folder. Always in this order (local, then shared), so two writers never hold one
  each while waiting for the other's. The server drops the advisory lock when the holder's session ends
  (process killed, connection lost), like the kernel drops a flock. The holder is named from
  `pg_locks` + `pg_stat_activity`: the lock connection's `application_name` carries `pid host`.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import socket
import time
from pathlib import Path
from typing import Any, Callable, ContextManager, Iterator

from sqlalchemy import text
from sqlalchemy.engine import make_url

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
                                      "try again later or pass --wait SECONDS", file=root,
                                      fix="try again later or pass --wait SECONDS") from None
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


LockFactory = Callable[[Path, float, str], ContextManager[None]]

# The advisory lock's key: a fixed signed 64-bit number derived from "iumad-writer". Advisory locks are
# per database, so stores in different databases of one server never contend.
ADVISORY_KEY = int.from_bytes(hashlib.sha256(b"iumad-writer").digest()[:8], "big", signed=True)
APPLICATION_NAME = "iumad-writer"


def _pg_holder(conn: Any) -> str:
    """Who holds the advisory lock in this database: `pid P on HOST` from the holder's application_name
    (readable by every role), else the server process id of its session."""
    key = ADVISORY_KEY & 0xFFFF_FFFF_FFFF_FFFF
    row = conn.execute(text(
        "SELECT a.pid, a.application_name FROM pg_locks l LEFT JOIN pg_stat_activity a ON a.pid = l.pid "
        "WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 1 "
        "AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database()) "
        "AND l.classid::bigint = :hi AND l.objid::bigint = :lo LIMIT 1"),
        {"hi": key >> 32, "lo": key & 0xFFFF_FFFF}).first()
    if row is None:
        return "another process"
    backend, app = row
    parts = (app or "").split()
    if len(parts) >= 2 and parts[0] == APPLICATION_NAME and parts[1].isdigit():
        host = parts[2] if len(parts) > 2 else ""
        where = f" on {host}" if host and host != socket.gethostname() else ""
        return f"pid {parts[1]}{where} (server pid {backend})"
    return f"another session (server pid {backend})"


@contextlib.contextmanager
def advisory_lock(url: str, wait: float = 0.0, *, deadline: float | None = None) -> Iterator[None]:
    """Hold the PostgreSQL advisory writer lock of the database at `url`; poll up to `wait` seconds (or
    until the `time.monotonic()` deadline when given), else LockedError (exit 5) naming the database
    (without password) and the holder."""
    from sqlalchemy import create_engine
    from sqlalchemy.pool import NullPool

    where = make_url(url).render_as_string(hide_password=True)
    name = f"{APPLICATION_NAME} {os.getpid()} {socket.gethostname()}"[:63]
    engine = create_engine(url, poolclass=NullPool, isolation_level="AUTOCOMMIT",
                           connect_args={"application_name": name})
    try:
        with engine.connect() as conn:
            if deadline is None:
                deadline = time.monotonic() + max(0.0, wait)
            while not conn.execute(text("SELECT pg_try_advisory_lock(:k)"), {"k": ADVISORY_KEY}).scalar():
                if time.monotonic() >= deadline:
                    hint = f" after waiting {wait:g} s" if wait > 0 else ""
                    raise LockedError(f"{where}: the store's database is being written by {_pg_holder(conn)}"
                                      f"{hint}; try again later or pass --wait SECONDS",
                                      fix="try again later or pass --wait SECONDS")
                time.sleep(min(POLL_SECONDS, max(0.0, deadline - time.monotonic())))
            try:
                yield
            finally:
                with contextlib.suppress(Exception):  # a lost connection has dropped the lock already
                    conn.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": ADVISORY_KEY})
    finally:
        engine.dispose()


def _file_lock_factory(root: Path, wait: float, url: str) -> ContextManager[None]:
    return file_lock(root, wait)


@contextlib.contextmanager
def _postgresql_lock(root: Path, wait: float, url: str) -> Iterator[None]:
    """The file lock on the folder, then the advisory lock in the database; `wait` bounds both together."""
    deadline = time.monotonic() + max(0.0, wait)
    with file_lock(root, wait), advisory_lock(url, wait, deadline=deadline):
        yield


def lock_for_dialect(dialect: str) -> LockFactory:
    """The writer-lock factory `(root, wait, url)` for a database dialect (see the module docstring)."""
    if dialect == "postgresql":
        return _postgresql_lock
    return _file_lock_factory
