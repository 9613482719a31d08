"""Files written so that a crash leaves either the old file or the new one, never half of one, and
files' content hashes. The ground floor: the model's feature cache and the store both build on it."""

from __future__ import annotations

import errno
import hashlib
import os
import tempfile
from pathlib import Path

from iumad import faults
from iumad.errors import StoreWriteError

TMP_PREFIX = ".tmp-"
WRITE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM)


def atomic_write_bytes(path: Path, data: bytes) -> str:
    """Write `data` to `path` via a temporary file in the same folder, fsync, rename; return its sha256."""
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f"{TMP_PREFIX}{os.getpid()}-", dir=path.parent)
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        faults.reach("write")
        os.replace(tmp, path)
    except BaseException as exc:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        if isinstance(exc, OSError) and exc.errno in WRITE_ERRNOS:
            raise StoreWriteError(f"{path}: cannot write ({os.strerror(exc.errno)}); free disk space or make "
                                  "the folder writable, then run the command again (nothing was changed)", file=path,
                                  fix="free disk space or make the folder writable, then run the command again"
                                  ) from exc
        raise
    _fsync_dir(path.parent)
    return hashlib.sha256(data).hexdigest()


def file_sha256(path: Path) -> str:
    """sha256 of a file's bytes, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
