"""`iumad gc` and `iumad pin`: which model versions keep their files.

gc keeps the newest `keep` versions, every pinned one and the production and candidate versions; the
others lose their checkpoint folder (the row stays: history and the steps that name it still read), and
class blobs that no kept version references go with them. One writer (the store lock). The versions are
marked removed in one transaction first, and files are deleted after it: a kill in between leaves files
of removed versions, which `db check` reports as a warning and the next gc or writer deletes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sqlalchemy import select

from iumad import faults
from iumad.errors import UsageError
from iumad.store.db import Store
from iumad.store.models import ModelVersion, utcnow


def _bytes(paths: list[Path]) -> int:
    total = 0
    for p in paths:
        files = [p] if p.is_file() else p.rglob("*") if p.is_dir() else []
        total += sum(f.stat().st_size for f in files if f.is_file())
    return total


def gc(store: Store, keep: int = 5, dry_run: bool = False, wait: float = 0.0) -> dict[str, Any]:
    """Remove the files of versions older than the newest `keep` that nobody pinned or aliased."""
    if keep < 1:
        raise UsageError(f"--keep {keep}: keep at least the newest version", fix="use --keep 1 or more")
    with store.writer_lock(wait):
        with store.session() as s:
            live = list(s.scalars(select(ModelVersion).where(ModelVersion.removed_at.is_(None))
                                  .order_by(ModelVersion.id)))
            newest = {v.id for v in live[-keep:]}
            doomed = [v for v in live if v.id not in newest and not v.pinned and v.alias is None]
            doomed_ids = {v.id for v in doomed}
            kept = [v.id for v in live if v.id not in doomed_ids]
            folders = [store.path(v.checkpoint_dir) for v in doomed]
            if not dry_run:
                for v in doomed:
                    v.removed_at = utcnow()
        blobs = store.unreferenced_blobs(exclude=doomed_ids)
        freed = _bytes(folders + blobs)
        if not dry_run:
            faults.reach("gc")
            store.remove_unfinished_checkpoints()  # removed versions' folders, then unreferenced blobs
    return {"dry_run": dry_run, "kept_versions": kept, "removed_versions": sorted(doomed_ids),
            "removed_blobs": len(blobs), "freed_bytes": freed}


def pin(store: Store, version: int, pinned: bool = True, wait: float = 0.0) -> dict[str, Any]:
    """Mark a version as one gc keeps (a rollback target), or unmark it."""
    with store.writer_lock(wait), store.session() as s:
        row = s.get(ModelVersion, version)
        if row is None:
            raise UsageError(f"model version {version} does not exist; see `iumad history`")
        if row.removed_at is not None and pinned:
            raise UsageError(f"model version {version}'s files were removed by gc on {row.removed_at:%Y-%m-%d}; "
                             "it can no longer be pinned")
        row.pinned = pinned
    return {"version": version, "pinned": pinned}
