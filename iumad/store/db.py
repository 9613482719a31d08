"""Open the task store: where it lives, the engine, schema migration on open, sessions, the writer lock.

Location: `root` argument, else `IUMAD_STORE`, else `./store`. The tables live in `<root>/iumad.sqlite`
unless `url` / `IUMAD_DB_URL` points them elsewhere; checkpoints, the feature cache and the exemplar
manifest always live under the root.

Schema on open (`Store.open`): an empty database is migrated to head; an older SQLite store is first
copied (sqlite3 backup API: a consistent snapshot even in WAL mode) to `iumad.sqlite.bak-<rev>-<time>`,
then migrated; an older store on any other database raises StoreNeedsMigration (exit 3) asking for
`iumad db upgrade`; a store written by a newer iumad is refused. Migrations run under the writer lock.

Writers: `with store.writer_lock(wait):` — taking it also deletes temporary files that killed writers
left behind (see `clean_temporaries`); on PostgreSQL it is also an advisory lock in the database.
Readers just open the store and use `store.session()`.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sqlite3
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path, PurePosixPath
from typing import Any, Iterator

from sqlalchemy import create_engine, event, select
from sqlalchemy.engine import URL, Engine, make_url
from sqlalchemy.orm import Session, sessionmaker

from iumad.errors import IumadError, UsageError
from iumad.store import migrate
from iumad.store.atomic import TMP_PREFIX, remove_temporaries, writer_gone
from iumad.store.manifest import class_blobs, read_manifest
from iumad.store.lock import lock_for_dialect
from iumad.store.models import ModelVersion, Step

ENV_STORE = "IUMAD_STORE"
ENV_DB_URL = "IUMAD_DB_URL"
DEFAULT_ROOT = Path("store")
DB_FILE = "iumad.sqlite"
SUBDIRS = ("checkpoints", "features", "exemplars")
BUSY_TIMEOUT_MS = 10_000
MIGRATION_LOCK_WAIT = 30.0  # seconds an opening process waits for a writer before migrating
FEATURE_TMP_GRACE_S = 3600.0  # readers write feature-cache entries too: only old temporaries are dead


def resolve_root(root: Path | str | None = None) -> Path:
    """The store folder: argument, else $IUMAD_STORE, else ./store (absolute)."""
    chosen = root if root not in (None, "") else (os.environ.get(ENV_STORE) or DEFAULT_ROOT)
    return Path(chosen).expanduser().resolve()


def resolve_url(root: Path, url: str | None = None) -> str:
    """The database URL: argument, else $IUMAD_DB_URL, else the SQLite file inside the store."""
    chosen = url or os.environ.get(ENV_DB_URL)
    if chosen:
        try:
            make_url(chosen)
        except Exception as exc:  # sqlalchemy.exc.ArgumentError and friends
            raise UsageError(f"{ENV_DB_URL}/--db-url: not a database URL ({exc.__class__.__name__}); "
                             "expected e.g. postgresql+psycopg://user@host/db",
                             fix=f"set {ENV_DB_URL} to e.g. postgresql+psycopg://user@host/db") from None
        return chosen
    return URL.create("sqlite", database=str(root / DB_FILE)).render_as_string(hide_password=False)


def display_url(url: str) -> str:
    """The URL without its password, for messages and reports."""
    return make_url(url).render_as_string(hide_password=True)


def sqlite_file(url: str) -> Path | None:
    """The database file of a file-based SQLite URL, else None."""
    u = make_url(url)
    if u.get_backend_name() != "sqlite" or u.database in (None, "", ":memory:"):
        return None
    return Path(u.database).expanduser().resolve()


def make_engine(url: str) -> Engine:
    """An engine; SQLite gets WAL, foreign keys, a busy timeout and real (DDL-including) transactions."""
    engine = create_engine(url)
    if engine.dialect.name == "sqlite":
        @event.listens_for(engine, "connect")
        def _on_connect(dbapi_conn: Any, _record: Any) -> None:
            dbapi_conn.isolation_level = None  # we emit BEGIN ourselves (below): DDL becomes transactional
            cur = dbapi_conn.cursor()
            cur.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
            cur.execute("PRAGMA foreign_keys = ON")
            cur.execute("PRAGMA journal_mode = WAL")
            cur.close()

        @event.listens_for(engine, "begin")
        def _on_begin(conn: Any) -> None:
            conn.exec_driver_sql("BEGIN")
    return engine


def backup_sqlite(path: Path, revision: str | None) -> Path:
    """Consistent copy of a SQLite store before migrating it: `<file>.bak-<rev>-<UTC time>`."""
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    target = path.with_name(f"{path.name}.bak-{revision or 'none'}-{stamp}")
    n = 1
    while target.exists():
        n += 1
        target = path.with_name(f"{path.name}.bak-{revision or 'none'}-{stamp}-{n}")
    tmp = path.with_name(f"{TMP_PREFIX}{target.name}")
    src = sqlite3.connect(path)
    try:
        dst = sqlite3.connect(tmp)
        try:
            src.backup(dst)
        finally:
            dst.close()
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    finally:
        src.close()
    return target


def clean_temporaries(root: Path, feature_grace_s: float = FEATURE_TMP_GRACE_S) -> int:
    """Delete temporaries of killed writers: all in checkpoints/, exemplars/ and the root; in features/
    (written by readers too, without the lock) only those older than `feature_grace_s` or whose writing
    process is gone (the pid is in the name). Call it only
    while holding the writer lock."""
    count = sum(remove_temporaries(root / sub) for sub in ("checkpoints", "exemplars", "blobs"))
    for p in root.glob(f"{TMP_PREFIX}*"):
        if p.is_file():
            p.unlink(missing_ok=True)
            count += 1
    cutoff = time.time() - feature_grace_s
    if (root / "features").is_dir():
        for p in (root / "features").rglob(f"{TMP_PREFIX}*"):
            with contextlib.suppress(OSError):
                if p.is_file() and (p.stat().st_mtime < cutoff or writer_gone(p)):
                    p.unlink()
                    count += 1
    return count


@dataclass
class Store:
    """An open task store. Build it with `Store.open(...)`; close it (or use `with`) to release the engine."""

    root: Path
    url: str
    engine: Engine
    _sessions: sessionmaker[Session] = field(repr=False)
    backup: Path | None = None  # the copy made when opening migrated an older SQLite store

    # ------------------------------------------------------------------ open / close

    @classmethod
    def open(cls, root: Path | str | None = None, url: str | None = None, *, create: bool = True,
             upgrade_sqlite: bool = True, lock_wait: float = MIGRATION_LOCK_WAIT) -> Store:
        """Open (and with `create`, make) the store; migrate it as the module docstring says.

        create=False: a missing SQLite file is a UsageError and an empty database a StoreNeedsMigration,
        so readers (`db check`, `status`) never create stores by accident.
        """
        root = resolve_root(root)
        url = resolve_url(root, url)
        db_file = sqlite_file(url)
        if not create:
            if db_file is not None and not db_file.is_file():
                raise UsageError(f"{db_file}: no iumad store here; pass --store DIR or set {ENV_STORE}",
                                 file=db_file, fix=f"pass --store DIR or set {ENV_STORE}")
        else:
            root.mkdir(parents=True, exist_ok=True)
            if db_file is not None:
                db_file.parent.mkdir(parents=True, exist_ok=True)
        engine = make_engine(url)
        store = cls(root, url, engine, sessionmaker(engine, expire_on_commit=False))
        try:
            store._migrate_on_open(create, upgrade_sqlite, lock_wait)
            if create:
                for sub in SUBDIRS:
                    (root / sub).mkdir(exist_ok=True)
        except BaseException:
            engine.dispose()
            raise
        return store

    def _migrate_on_open(self, create: bool, upgrade_sqlite: bool, lock_wait: float) -> None:
        action = self._decide(create, upgrade_sqlite)
        if action is migrate.Action.NONE:
            return
        with self.writer_lock(lock_wait):
            action = self._decide(create, upgrade_sqlite)  # someone may have migrated while we waited
            if action is migrate.Action.UPGRADE:
                self.backup = self._backup()
            if action is not migrate.Action.NONE:
                migrate.upgrade_engine(self.engine)

    def _decide(self, create: bool, upgrade_sqlite: bool) -> migrate.Action:
        with self.engine.connect() as conn:
            revision = migrate.database_revision(conn)
            has_tables = bool(migrate.user_tables(conn))
        return migrate.decide(self.dialect, revision, migrate.head_revision(), migrate.known_revisions(),
                              has_tables, create=create, upgrade_sqlite=upgrade_sqlite, where=self.where)

    def _backup(self) -> Path | None:
        path = sqlite_file(self.url)
        if path is None:
            return None
        with self.engine.connect() as conn:
            revision = migrate.database_revision(conn)
        return backup_sqlite(path, revision)

    def close(self) -> None:
        self.engine.dispose()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ facts

    @property
    def dialect(self) -> str:
        return self.engine.dialect.name

    @property
    def where(self) -> str:
        """How messages name this store: the SQLite file, or the folder and the URL without password."""
        db_file = sqlite_file(self.url)
        return str(db_file) if db_file is not None else f"{self.root} ({display_url(self.url)})"

    @property
    def sqlite_path(self) -> Path | None:
        return sqlite_file(self.url)

    @property
    def checkpoints_dir(self) -> Path:
        return self.root / "checkpoints"

    @property
    def features_dir(self) -> Path:
        return self.root / "features"

    @property
    def exemplars_dir(self) -> Path:
        return self.root / "exemplars"

    @property
    def blobs_dir(self) -> Path:
        """Content-addressed class tensors, shared by the versions that hold the class (store.checkpoints)."""
        return self.root / "blobs"

    def path(self, relative: str) -> Path:
        """Absolute path of a store-relative path (as recorded in the tables); refuses escapes."""
        rel = PurePosixPath(relative)
        if rel.is_absolute() or ".." in rel.parts or not rel.parts:
            raise IumadError(f"{relative!r}: not a path inside the store {self.root}")
        return self.root.joinpath(*rel.parts)

    @staticmethod
    def checkpoint_dir_for(step_index: int) -> str:
        """The store-relative folder a step writes its model version to (step indices are never reused)."""
        return f"checkpoints/step-{step_index:04d}"

    # ------------------------------------------------------------------ sessions and the lock

    @contextlib.contextmanager
    def session(self) -> Iterator[Session]:
        """A session in one transaction: committed when the block ends, rolled back when it raises."""
        with self._sessions() as session:
            with session.begin():
                yield session

    @contextlib.contextmanager
    def writer_lock(self, wait: float = 0.0) -> Iterator[int]:
        """Hold the one-writer lock (LockedError, exit 5, if busy after `wait` s); yields the number of
        leftover temporaries it deleted on entry. PostgreSQL: the folder's file lock plus an advisory
        lock in the database, so hosts sharing the database exclude each other (see store.lock)."""
        with lock_for_dialect(self.dialect)(self.root, wait, self.url):
            yield clean_temporaries(self.root)
            self.truncate_wal()

    def truncate_wal(self) -> None:
        """SQLite: fold the write-ahead log into the database and empty it once a writer is done, so the
        store's size on disk is its data (the log otherwise keeps up to SQLite's 4 MB auto-checkpoint).
        Best effort: a reader still in the log only makes the checkpoint partial."""
        if self.dialect != "sqlite":
            return
        raw = self.engine.raw_connection()
        try:
            raw.cursor().execute("PRAGMA wal_checkpoint(TRUNCATE)")
        finally:
            raw.close()

    def remove_unfinished_checkpoints(self) -> list[str]:
        """Delete the checkpoint folders of steps that ended without a model version (failed, or killed
        and since marked failed). Only folders this database's steps own are touched, so a folder
        pointed at another database loses nothing; then the folders of versions gc removed (a gc killed
        half-way), then the class blobs no kept version references. Call under the writer lock, after
        `fail_stale_steps`."""
        with self.session() as s:
            known = set(s.scalars(select(ModelVersion.checkpoint_dir).where(ModelVersion.removed_at.is_(None))))
            collected = list(s.scalars(select(ModelVersion.checkpoint_dir).where(ModelVersion.removed_at.isnot(None))))
            failed = [self.checkpoint_dir_for(i) for i in s.scalars(select(Step.step_index)
                                                                     .where(Step.status == "failed"))]
        removed = []
        for rel in failed + collected:
            if rel not in known and self.path(rel).is_dir():
                shutil.rmtree(self.path(rel), ignore_errors=True)
                removed.append(rel)
        return removed + self.remove_unreferenced_blobs()

    def referenced_blobs(self, exclude: set[int] = frozenset()) -> set[Path] | None:
        """The blob files the manifests of the versions gc kept (less `exclude`) reference; None when a
        manifest cannot be read (then nothing may be called unreferenced)."""
        with self.session() as s:
            folders = list(s.scalars(select(ModelVersion.checkpoint_dir).where(
                ModelVersion.removed_at.is_(None), ModelVersion.id.notin_(list(exclude)))))
        found: set[Path] = set()
        for rel in folders:
            folder = self.path(rel)
            try:
                meta = read_manifest(folder)
            except IumadError:
                return None
            found |= {p.resolve() for p in class_blobs(folder, meta).values()}
        return found

    def unreferenced_blobs(self, exclude: set[int] = frozenset()) -> list[Path]:
        """Blob files that no kept version (less `exclude`) references; none when a manifest cannot be read."""
        keep = self.referenced_blobs(exclude)
        if keep is None:
            return []
        return [p for p in self.blobs_dir.glob("*/*.pt") if p.resolve() not in keep]

    def remove_unreferenced_blobs(self) -> list[str]:
        """Delete class blobs no model version references (written by a step that failed or was killed
        before its version was recorded). Call under the writer lock."""
        removed = []
        for p in self.unreferenced_blobs():
            p.unlink(missing_ok=True)
            removed.append(str(p.relative_to(self.root)))
        return removed


# ---------------------------------------------------------------------- `iumad db` operations


def _open_raw(target: Store | Path | str | None, url: str | None) -> tuple[Path, str, Engine, bool]:
    """(root, url, engine, owned) without migrating anything."""
    if isinstance(target, Store):
        return target.root, target.url, target.engine, False
    root = resolve_root(target)
    url = resolve_url(root, url)
    return root, url, make_engine(url), True


def current(target: Store | Path | str | None = None, url: str | None = None) -> dict[str, Any]:
    """`iumad db current`: {"revision", "head", "up_to_date", "store", "url"}; creates nothing."""
    root, url, engine, owned = _open_raw(target, url)
    try:
        head = migrate.head_revision()
        db_file = sqlite_file(url)
        revision = None
        if db_file is None or db_file.is_file():
            with engine.connect() as conn:
                revision = migrate.database_revision(conn)
        return {"revision": revision, "head": head, "up_to_date": revision == head,
                "store": str(root), "url": display_url(url)}
    finally:
        if owned:
            engine.dispose()


def upgrade(target: Store | Path | str | None = None, url: str | None = None, *,
            wait: float = 0.0) -> dict[str, Any]:
    """`iumad db upgrade`: migrate to head under the writer lock (SQLite: back the file up first).

    Returns {"from", "to", "backup", "store", "url"}; creates the store when it does not exist.
    """
    root, url, engine, owned = _open_raw(target, url)
    try:
        root.mkdir(parents=True, exist_ok=True)
        db_file = sqlite_file(url)
        if db_file is not None:
            db_file.parent.mkdir(parents=True, exist_ok=True)
        head = migrate.head_revision()
        backup: Path | None = None
        with lock_for_dialect(engine.dialect.name)(root, wait, url):
            with engine.connect() as conn:
                revision = migrate.database_revision(conn)
                has_tables = bool(migrate.user_tables(conn))
            where = str(db_file) if db_file is not None else display_url(url)
            action = migrate.decide(engine.dialect.name, revision, head, migrate.known_revisions(),
                                    has_tables, explicit=True, where=where)
            if action is migrate.Action.UPGRADE and db_file is not None:
                backup = backup_sqlite(db_file, revision)
            if action is not migrate.Action.NONE:
                migrate.upgrade_engine(engine)
        for sub in SUBDIRS:
            (root / sub).mkdir(exist_ok=True)
        return {"from": revision, "to": head, "backup": str(backup) if backup else None,
                "store": str(root), "url": display_url(url)}
    finally:
        if owned:
            engine.dispose()
