"""`iumad db check`: is the store consistent? Read-only; takes no lock, so it can run beside a writer.

Checks: schema at head, foreign keys (SQLite `PRAGMA foreign_key_check`; elsewhere one orphan query per
foreign key), every model version's `model.pt` present with the recorded sha256 and size and every class
blob its manifest references present with the sha256 it is named by, exactly one
`production` version once any version exists and at most one `candidate`, no `running` step whose process
is gone, no leftover temporary files or checkpoint folders of failed steps. Each problem is {"code",
"severity", "message"}; `ok` is False when any problem has severity "error". What a killed writer leaves
(a `running` step of a dead process, temporaries, the checkpoint folder of a failed step) is a warning:
production is intact, and the next writer marks the step failed and removes the files.
"""

from __future__ import annotations

import socket
import time
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.engine import Connection

from iumad.store import migrate
from iumad.errors import IumadError
from iumad.store.atomic import CHECKPOINT_FILE, TMP_PREFIX, file_sha256, pid_alive, writer_gone
from iumad.store.manifest import class_blobs, read_manifest
from iumad.store.db import Store, current, display_url, upgrade
from iumad.store.models import Base, ModelVersion, Step, utcnow

__all__ = ["check_store", "current", "upgrade", "pid_alive", "orphan_counts"]

STALE_AFTER = timedelta(hours=24)  # a `running` step of another host older than this is reported
TMP_GRACE_S = 300.0  # younger temporaries may belong to a live writer or reader
NEXT_WRITER = "; the next writer (add-class, nightly, rollback) cleans it up"


def orphan_counts(conn: Connection) -> dict[str, int]:
    """Portable foreign-key check: rows whose non-null key matches no parent, per `table.column`."""
    found: dict[str, int] = {}
    for table in Base.metadata.sorted_tables:
        for fk in table.foreign_keys:
            child, parent = fk.parent, fk.column
            n = conn.scalar(select(func.count()).select_from(table)
                            .where(child.isnot(None), ~select(parent).where(parent == child).exists()))
            if n:
                found[f"{table.name}.{child.name}"] = int(n)
    return found


def _foreign_key_problems(conn: Connection) -> list[dict[str, str]]:
    if conn.dialect.name == "sqlite":
        counts: dict[str, int] = {}
        for table, _rowid, parent, _fkid in conn.exec_driver_sql("PRAGMA foreign_key_check").fetchall():
            key = f"{table} -> {parent}"
            counts[key] = counts.get(key, 0) + 1
    else:
        counts = orphan_counts(conn)
    return [_problem("foreign-key", f"{key}: {n} row(s) reference a missing parent row")
            for key, n in sorted(counts.items())]


def _problem(code: str, message: str, severity: str = "error") -> dict[str, str]:
    return {"code": code, "severity": severity, "message": message}


def _checkpoint_problems(store: Store, versions: list[ModelVersion], verify_hashes: bool) -> list[dict[str, str]]:
    problems = []
    for v in versions:
        label = f"model version {v.id} ({v.checkpoint_dir})"
        if v.removed_at is not None:  # gc removed its files; a folder still there is a killed gc's leftover
            if store.path(v.checkpoint_dir).exists():
                problems.append(_problem("gc-leftover", f"{label}: removed by gc but its folder is still there; "
                                                        "the next gc or writer deletes it", "warning"))
            continue
        try:
            ckpt = store.path(v.checkpoint_dir) / CHECKPOINT_FILE
        except Exception as exc:  # a recorded path that escapes the store
            problems.append(_problem("checkpoint-path", f"{label}: {exc}"))
            continue
        if not ckpt.is_file():
            problems.append(_problem("checkpoint-missing", f"{label}: {ckpt} is missing"))
            continue
        size = ckpt.stat().st_size
        if size != v.size_bytes:
            problems.append(_problem("checkpoint-size", f"{label}: {ckpt} has {size} bytes, "
                                                        f"recorded {v.size_bytes}"))
        if verify_hashes:
            digest = file_sha256(ckpt)
            if digest != v.sha256:
                problems.append(_problem("checkpoint-sha256", f"{label}: {ckpt} sha256 {digest[:12]}… "
                                                              f"differs from the recorded {v.sha256[:12]}…"))
        problems += _blob_problems(store.path(v.checkpoint_dir), label, verify_hashes)
    return problems


def _blob_problems(folder: Path, label: str, verify_hashes: bool) -> list[dict[str, str]]:
    """Every class blob the version's manifest references is there (and has its sha256)."""
    try:
        meta = read_manifest(folder)
    except IumadError as exc:
        return [_problem("manifest-unreadable", f"{label}: {exc}")]
    problems = []
    for name, blob in class_blobs(folder, meta).items():
        if not blob.is_file():
            problems.append(_problem("blob-missing", f"{label}: class {name!r}: {blob} is missing"))
        elif verify_hashes and file_sha256(blob) != blob.stem:
            problems.append(_problem("blob-sha256", f"{label}: class {name!r}: {blob} does not hash to its name"))
    return problems


def _alias_problems(versions: list[ModelVersion]) -> list[dict[str, str]]:
    problems = []
    prod = [v.id for v in versions if v.alias == "production"]
    cand = [v.id for v in versions if v.alias == "candidate"]
    if versions and not prod:
        problems.append(_problem("no-production", f"{len(versions)} model version(s) but none is production; "
                                                  "promote or roll back to one"))
    if len(prod) > 1:
        problems.append(_problem("multiple-production", f"model versions {prod} are all production"))
    if len(cand) > 1:
        problems.append(_problem("multiple-candidate", f"model versions {cand} are all candidate"))
    return problems


def _running_problems(steps: list[Step], now: datetime, stale_after: timedelta) -> list[dict[str, str]]:
    problems = []
    here = socket.gethostname()
    for s in steps:
        label = f"step {s.step_index} ({s.kind} {', '.join(s.classes)})"
        if s.host == here and s.pid is not None:
            if not pid_alive(s.pid):
                problems.append(_problem("stale-running-step", f"{label} is running but its process "
                                                               f"{s.pid} is gone{NEXT_WRITER}", "warning"))
        elif now - s.started_at > stale_after:
            problems.append(_problem("stale-running-step", f"{label} has been running on {s.host or '?'} "
                                                           f"since {s.started_at.isoformat()}{NEXT_WRITER}",
                                     "warning"))
    return problems


def _unfinished_checkpoint_problems(store: Store, versions: list[ModelVersion],
                                   failed: list[int]) -> list[dict[str, str]]:
    """Checkpoint folders of failed steps that never became a model version."""
    known = {v.checkpoint_dir for v in versions}
    left = [rel for rel in map(store.checkpoint_dir_for, failed) if rel not in known and store.path(rel).is_dir()]
    if not left:
        return []
    return [_problem("unfinished-checkpoint", f"checkpoint folder(s) {', '.join(left)} of failed steps "
                                              f"hold no model version{NEXT_WRITER}", "warning")]


def _temporary_problems(root: Path, grace_s: float) -> list[dict[str, str]]:
    if not root.is_dir():
        return []
    cutoff = time.time() - grace_s
    old = []
    for p in root.rglob(f"{TMP_PREFIX}*"):
        try:
            if p.is_file() and (p.stat().st_mtime < cutoff or writer_gone(p)):
                old.append(p)
        except OSError:
            continue
    if not old:
        return []
    shown = ", ".join(str(p.relative_to(root)) for p in sorted(old)[:5]) + (" …" if len(old) > 5 else "")
    return [_problem("leftover-temporary", f"{len(old)} temporary file(s) of interrupted writes: {shown}; "
                                           "the next writer removes them", severity="warning")]


def check_store(store: Store, *, verify_hashes: bool = True, stale_after: timedelta = STALE_AFTER,
                tmp_grace_s: float = TMP_GRACE_S) -> dict[str, Any]:
    """The `db check` report: {"ok", "store", "url", "revision", "head", "counts", "problems"}."""
    head = migrate.head_revision()
    problems: list[dict[str, str]] = []
    with store.engine.connect() as conn:
        revision = migrate.database_revision(conn)
        if revision != head:
            problems.append(_problem("schema-revision", f"schema revision {revision!r} is not the head {head!r}; "
                                                        "run `iumad db upgrade`"))
        problems += _foreign_key_problems(conn)
        counts = {t.name: int(conn.scalar(select(func.count()).select_from(t)) or 0)
                  for t in Base.metadata.sorted_tables}
    with store.session() as session:
        versions = list(session.scalars(select(ModelVersion).order_by(ModelVersion.id)))
        running = list(session.scalars(select(Step).where(Step.status == "running").order_by(Step.step_index)))
        failed = list(session.scalars(select(Step.step_index).where(Step.status == "failed")))
    problems += _checkpoint_problems(store, versions, verify_hashes)
    problems += _alias_problems(versions)
    problems += _running_problems(running, utcnow(), stale_after)
    problems += _unfinished_checkpoint_problems(store, versions, failed)
    problems += _temporary_problems(store.root, tmp_grace_s)
    return {
        "ok": not any(p["severity"] == "error" for p in problems),
        "store": str(store.root),
        "url": display_url(store.url),
        "revision": revision,
        "head": head,
        "counts": counts,
        "problems": problems,
    }
