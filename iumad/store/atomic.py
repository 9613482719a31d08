"""The store's side of atomic files: which temporaries a killed writer left, and removing them.
Writing and hashing live on the ground floor (`iumad.files`), where the feature cache reaches them too."""

from __future__ import annotations

import os
from pathlib import Path

from iumad.files import TMP_PREFIX, atomic_write_bytes, file_sha256  # noqa: F401 (re-exported for the store)

CHECKPOINT_FILE = "model.pt"  # a model version's tensors inside its checkpoint folder (sha256 recorded)
MANIFEST_FILE = "detector.json"  # a version's manifest: config, classes, sha256 of model.pt and the class blobs


def pid_alive(pid: int) -> bool:
    """Whether a process with this pid exists on this host (EPERM: it exists, owned by someone else)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def writer_gone(path: Path) -> bool:
    """True when a temporary file's name says which process wrote it (`.tmp-<pid>-...`) and that
    process no longer exists on this host, so the file can never be completed."""
    pid = Path(path).name[len(TMP_PREFIX):].split("-", 1)[0]
    return pid.isdigit() and not pid_alive(int(pid))


def remove_temporaries(root: Path) -> int:
    """Delete temporary files a killed writer left under `root`; returns how many were removed."""
    count = 0
    if Path(root).is_dir():
        for p in Path(root).rglob(f"{TMP_PREFIX}*"):
            if p.is_file():
                p.unlink(missing_ok=True)
                count += 1
    return count
