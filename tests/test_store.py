"""The task store: migrations match the models, opening old/new/foreign stores, `db check`, the writer lock,
class-name validation, alias promotion and the matrix R. Every store lives under tmp_path."""

from __future__ import annotations

import hashlib
import os
import shutil
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from hypothesis import given, settings
from hypothesis import strategies as st
from sqlalchemy import inspect, select, text
from sqlalchemy.exc import IntegrityError

from iumad.errors import IumadError, LockedError, StoreNeedsMigration, UsageError
from iumad.store import migrate
from iumad.store import repository as repo
from iumad.store.check import check_store, current, orphan_counts, pid_alive, upgrade
from iumad.store.check import _alias_problems
from iumad.store.db import Store
from iumad.store.models import Base, ModelVersion

HEAD = migrate.head_revision()


@pytest.fixture
def store(tmp_path: Path):
    s = Store.open(tmp_path / "store")
    yield s
    s.close()


def codes(report: dict) -> set[str]:
    return {p["code"] for p in report["problems"]}


def save_checkpoint(store: Store, rel: str, payload: bytes = b"weights") -> tuple[str, int]:
    folder = store.path(rel)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "model.pt").write_bytes(payload)
    (folder / "detector.json").write_text('{"classes": []}')  # a version's manifest (no class blobs)
    return hashlib.sha256(payload).hexdigest(), len(payload)


def add_version(store: Store, rel: str, alias: str | None = None, payload: bytes = b"weights") -> int:
    digest, size = save_checkpoint(store, rel, payload)
    with store.session() as s:
        v = repo.add_model_version(s, rel, digest, size)
        if alias:
            repo.set_alias(s, v.id, alias)
        return v.id


# ---------------------------------------------------------------------- schema and migrations


def test_migration_to_head_matches_models(store: Store) -> None:
    with store.engine.connect() as conn:
        ctx = MigrationContext.configure(conn, opts={"compare_type": True, "compare_server_default": True})
        assert compare_metadata(ctx, Base.metadata) == []
        insp = inspect(conn)
        # autogenerate ignores CHECK constraints: compare their names by hand
        in_db = {(t, c["name"]) for t in insp.get_table_names() for c in insp.get_check_constraints(t)}
    in_models = {(t.name, c.name) for t in Base.metadata.tables.values() for c in t.constraints
                 if c.__class__.__name__ == "CheckConstraint"}
    assert in_db == in_models and len(in_models) == 6


def test_downgrade_to_base_and_back(store: Store) -> None:
    from alembic import command

    v = add_version(store, "checkpoints/v1", "production")
    with store.session() as s:  # rows on both sides of the steps <-> model_versions cycle
        step = repo.begin_step(s, "add-class", ["a"], parent_version_id=v)
        repo.finish_step(s, step, succeeded=True, result_version_id=v)
    with store.engine.begin() as conn:
        command.downgrade(migrate.alembic_config(conn), "base")
    with store.engine.connect() as conn:
        assert migrate.user_tables(conn) == [] and migrate.database_revision(conn) is None
    migrate.upgrade_engine(store.engine)
    assert check_store(store)["ok"]


def test_sqlite_pragmas_and_layout(store: Store) -> None:
    with store.engine.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        assert conn.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
        assert conn.exec_driver_sql("PRAGMA busy_timeout").scalar() > 0
    for sub in ("checkpoints", "features", "exemplars"):
        assert (store.root / sub).is_dir()
    assert store.sqlite_path == store.root / "iumad.sqlite"


def test_current_reports_head_and_creates_nothing(tmp_path: Path) -> None:
    missing = tmp_path / "none"
    report = current(missing)
    assert report["revision"] is None and not report["up_to_date"] and not missing.exists()
    Store.open(tmp_path / "s").close()
    report = current(tmp_path / "s")
    assert (report["revision"], report["head"], report["up_to_date"]) == (HEAD, HEAD, True)
    assert report["store"] == str(tmp_path / "s") and report["url"].endswith("/s/iumad.sqlite")


def test_store_location_from_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("IUMAD_STORE", str(tmp_path / "env-store"))
    monkeypatch.delenv("IUMAD_DB_URL", raising=False)
    with Store.open() as s:
        assert s.root == tmp_path / "env-store"
    other = tmp_path / "elsewhere.sqlite"
    monkeypatch.setenv("IUMAD_DB_URL", f"sqlite:///{other}")
    with Store.open() as s:
        assert s.sqlite_path == other and other.is_file()
        assert s.root == tmp_path / "env-store"


def test_empty_sqlite_file_is_migrated_without_backup(tmp_path: Path) -> None:
    root = tmp_path / "s"
    root.mkdir()
    con = sqlite3.connect(root / "iumad.sqlite")
    con.execute("CREATE TABLE alembic_version (version_num VARCHAR(32) NOT NULL PRIMARY KEY)")
    con.commit()
    con.close()
    with Store.open(root) as s:
        assert s.backup is None
        assert current(s)["up_to_date"]
    assert not list(root.glob("iumad.sqlite.bak-*"))


def test_foreign_database_is_refused(tmp_path: Path) -> None:
    root = tmp_path / "s"
    root.mkdir()
    con = sqlite3.connect(root / "iumad.sqlite")
    con.execute("CREATE TABLE something (x INTEGER)")
    con.commit()
    con.close()
    with pytest.raises(IumadError, match="not an iumad store") as info:
        Store.open(root)
    assert info.value.exit_code == 1


def test_readers_do_not_create_stores(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="no iumad store"):
        Store.open(tmp_path / "nothing", create=False)
    assert not (tmp_path / "nothing").exists()
    root = tmp_path / "empty"
    root.mkdir()
    sqlite3.connect(root / "iumad.sqlite").close()
    with pytest.raises(StoreNeedsMigration, match="iumad db upgrade"):
        Store.open(root, create=False)


@pytest.fixture
def newer_migrations(tmp_path: Path) -> Path:
    """A copy of migrations/ with a test-only revision on top of head (adds a table the models ignore)."""
    folder = tmp_path / "migrations-next"
    shutil.copytree(migrate.migrations_dir(), folder, ignore=shutil.ignore_patterns("__pycache__"))
    (folder / "versions" / "9999_test_only.py").write_text(
        f'revision = "9999"\ndown_revision = "{HEAD}"\nbranch_labels = None\ndepends_on = None\n'
        "import sqlalchemy as sa\nfrom alembic import op\n\n"
        "def upgrade():\n    op.create_table('test_only', sa.Column('id', sa.Integer, primary_key=True))\n\n"
        "def downgrade():\n    op.drop_table('test_only')\n")
    return folder


def test_older_sqlite_store_is_backed_up_then_upgraded(tmp_path: Path, newer_migrations: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    root = tmp_path / "s"
    with Store.open(root) as s, s.session() as session:
        repo.register_class(session, "bagel", modalities=["rgb"], data_root="/data/bagel")
    monkeypatch.setattr(migrate, "migrations_dir", lambda: newer_migrations)
    with pytest.raises(StoreNeedsMigration, match="iumad db upgrade") as info:
        Store.open(root, upgrade_sqlite=False)
    assert info.value.exit_code == 3
    with Store.open(root) as s:
        assert s.backup is not None and s.backup.name.startswith(f"iumad.sqlite.bak-{HEAD}-")
        assert current(s)["revision"] == "9999"
        with s.session() as session:
            assert [c.name for c in repo.list_classes(session)] == ["bagel"]
    bak = sqlite3.connect(s.backup)
    assert bak.execute("SELECT version_num FROM alembic_version").fetchall() == [(HEAD,)]
    assert bak.execute("SELECT name FROM classes").fetchall() == [("bagel",)]
    bak.close()
    assert not list(root.glob(".tmp-*"))
    # the same store, read by the older code, is refused
    monkeypatch.undo()
    with pytest.raises(IumadError, match="newer iumad") as info:
        Store.open(root)
    assert info.value.exit_code == 1


def test_explicit_upgrade_backs_up_and_reports(tmp_path: Path, newer_migrations: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    root = tmp_path / "s"
    assert upgrade(root)["from"] is None  # creates a fresh store
    monkeypatch.setattr(migrate, "migrations_dir", lambda: newer_migrations)
    report = upgrade(root)
    assert report["from"] == HEAD and report["to"] == "9999" and Path(report["backup"]).is_file()
    assert upgrade(root)["backup"] is None  # already at head: nothing to do


def test_non_sqlite_store_needs_explicit_migration() -> None:
    known = {"0001", "0002"}
    with pytest.raises(StoreNeedsMigration, match="run `iumad db upgrade`") as info:
        migrate.decide("postgresql", "0001", "0002", known, True)
    assert info.value.exit_code == 3
    assert migrate.decide("postgresql", "0001", "0002", known, True, explicit=True) is migrate.Action.UPGRADE
    assert migrate.decide("sqlite", "0001", "0002", known, True) is migrate.Action.UPGRADE
    assert migrate.decide("postgresql", None, "0002", known, False) is migrate.Action.CREATE
    assert migrate.decide("postgresql", "0002", "0002", known, True) is migrate.Action.NONE
    with pytest.raises(StoreNeedsMigration):
        migrate.decide("postgresql", None, "0002", known, False, create=False)
    with pytest.raises(IumadError, match="newer iumad"):
        migrate.decide("postgresql", "0003", "0002", known, True, explicit=True)


def test_missing_migrations_folder_is_a_clear_error(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import iumad

    monkeypatch.setattr(iumad, "__file__", str(tmp_path / "pkg" / "iumad" / "__init__.py"))
    with pytest.raises(IumadError, match="migrations not found"):
        migrate.migrations_dir()


# ---------------------------------------------------------------------- sessions and timestamps


def test_session_rolls_back_on_error(store: Store) -> None:
    with pytest.raises(RuntimeError):
        with store.session() as s:
            repo.register_class(s, "bagel", modalities=["rgb"], data_root="/d")
            raise RuntimeError("boom")
    with store.session() as s:
        assert repo.list_classes(s) == []


def test_timestamps_are_timezone_aware_utc(store: Store) -> None:
    with store.session() as s:
        repo.register_class(s, "bagel", modalities=["geometry", "rgb"], data_root="/d",
                            text_embedding=np.arange(4, dtype=np.float32))
    with store.session() as s:
        c = repo.require_class(s, "bagel")
        assert c.added_at.tzinfo is not None and c.added_at.utcoffset() == timedelta(0)
        assert abs(datetime.now(timezone.utc) - c.added_at) < timedelta(minutes=5)
        assert c.modalities == ["rgb", "geometry"]
        np.testing.assert_array_equal(repo.embedding_from_bytes(c.text_embedding), np.arange(4))
        c.added_at = datetime(2024, 1, 1)  # naive: refused at flush
        with pytest.raises(Exception, match="naive datetime"):
            s.flush()
        s.rollback()


# ---------------------------------------------------------------------- db check


def test_check_passes_on_fresh_and_healthy_store(store: Store) -> None:
    report = check_store(store)
    assert report["ok"] and report["problems"] == [] and report["revision"] == HEAD
    add_version(store, "checkpoints/step-0000", "production")
    add_version(store, "checkpoints/step-0001", "candidate", b"other")
    assert check_store(store)["problems"] == []


def test_check_detects_checkpoint_problems(store: Store) -> None:
    add_version(store, "checkpoints/a", "production")
    add_version(store, "checkpoints/b", payload=b"bbb")
    add_version(store, "checkpoints/c", payload=b"ccc")
    (store.root / "checkpoints/b/model.pt").unlink()
    (store.root / "checkpoints/c/model.pt").write_bytes(b"CCC")  # same size, other bytes
    report = check_store(store)
    assert not report["ok"]
    assert codes(report) == {"checkpoint-missing", "checkpoint-sha256"}
    assert "checkpoints/b" in report["problems"][0]["message"]


def test_check_requires_one_production(store: Store) -> None:
    add_version(store, "checkpoints/a", "candidate")
    assert codes(check_store(store)) == {"no-production"}
    versions = [SimpleNamespace(id=i, alias="production") for i in (1, 2)]
    assert {p["code"] for p in _alias_problems(versions)} == {"multiple-production"}
    # and the database itself refuses a second production
    add_version(store, "checkpoints/b", "production")
    with pytest.raises(IntegrityError):
        with store.session() as s:
            s.execute(text("UPDATE model_versions SET alias = 'production'"))


def test_check_detects_dead_running_step(store: Store) -> None:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    with store.session() as s:
        live = repo.begin_step(s, "add-class", ["a"])  # this process: alive
        dead = repo.begin_step(s, "add-class", ["b"])
        dead.pid = proc.pid
        far = repo.begin_step(s, "update", ["c"])
        far.host, far.started_at = "other-host", datetime.now(timezone.utc) - timedelta(days=3)
        near = repo.begin_step(s, "update", ["d"])
        near.host = "other-host"
    assert pid_alive(os.getpid()) and not pid_alive(proc.pid)
    report = check_store(store)
    stale = [p["message"] for p in report["problems"] if p["code"] == "stale-running-step"]
    assert len(stale) == 2 and f"step {dead.step_index} " in stale[0] and "other-host" in stale[1]
    assert report["ok"]  # left by dead writers, cleaned by the next one: warnings, not corruption
    assert {p["severity"] for p in report["problems"] if p["code"] == "stale-running-step"} == {"warning"}
    assert live.host == socket.gethostname()
    with store.writer_lock(), store.session() as s:
        assert repo.fail_stale_steps(s) == [0, 1, 2, 3]
    assert check_store(store)["ok"]


def test_check_detects_orphans_with_foreign_keys_off(store: Store) -> None:
    con = sqlite3.connect(store.sqlite_path)  # foreign keys are off by default in a bare connection
    con.execute("INSERT INTO exemplars (class_id, path, sha256, method, rank) VALUES (999, 'x.png', ?, 'kcenter', 0)",
                ("0" * 64,))
    con.commit()
    con.close()
    report = check_store(store)
    assert codes(report) == {"foreign-key"} and "exemplars" in report["problems"][0]["message"]
    with store.engine.connect() as conn:
        assert orphan_counts(conn) == {"exemplars.class_id": 1}


def test_check_warns_about_old_temporaries_and_writer_removes_them(store: Store) -> None:
    old = time.time() - 7200
    for rel in ("checkpoints/step-0001/.tmp-abc", "features/ab/.tmp-young", "features/cd/.tmp-old"):
        p = store.root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b"partial")
        if "young" not in rel:
            os.utime(p, (old, old))
    report = check_store(store)
    assert report["ok"] and codes(report) == {"leftover-temporary"}
    assert "2 temporary" in report["problems"][0]["message"]
    with store.writer_lock() as removed:
        assert removed == 2
    assert (store.root / "features/ab/.tmp-young").exists()  # a reader may still be writing it
    assert check_store(store)["problems"] == []


# ---------------------------------------------------------------------- the writer lock


def test_second_writer_is_refused_at_once_then_waits(store: Store) -> None:
    entered, release = threading.Event(), threading.Event()

    def hold() -> None:
        with store.writer_lock():
            entered.set()
            release.wait(10)

    t = threading.Thread(target=hold)
    t.start()
    assert entered.wait(10)
    t0 = time.monotonic()
    with pytest.raises(LockedError, match=f"pid {os.getpid()}") as info:
        with store.writer_lock():
            pass
    assert info.value.exit_code == 5 and time.monotonic() - t0 < 1.0
    threading.Timer(0.3, release.set).start()
    t0 = time.monotonic()
    with store.writer_lock(wait=10):
        assert time.monotonic() - t0 >= 0.2
    t.join()


def test_lock_held_by_another_process(store: Store) -> None:
    code = ("import sys, time; from iumad.store.lock import file_lock\n"
            "with file_lock(sys.argv[1]):\n    print('held', flush=True); time.sleep(30)\n")
    proc = subprocess.Popen([sys.executable, "-c", code, str(store.root)], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "held"
        with pytest.raises(LockedError, match=f"pid {proc.pid}"):
            with store.writer_lock(wait=0.2):
                pass
    finally:
        proc.kill()
        proc.wait()
    with store.writer_lock(wait=5):  # the kernel released the dead holder's lock
        pass


def test_a_writer_leaves_no_write_ahead_log_behind(store: Store) -> None:
    wal = store.root / "iumad.sqlite-wal"
    with store.writer_lock():
        with store.session() as s:
            for i in range(200):
                repo.register_class(s, f"part{i}", modalities=["rgb"], data_root="/data")
        assert wal.stat().st_size > 0  # the rows are in the log while the writer works
    assert not wal.exists() or wal.stat().st_size == 0
    with store.session() as s:  # and nothing was lost by folding it in
        assert len(repo.list_classes(s)) == 200


# ---------------------------------------------------------------------- classes


BAD_NAMES = ["", "Bagel", "a/b", "a\\b", "..", "../etc", "a.b", "bagel\n", "ümlaut", "ｂａｇｅｌ", "a b",
             "x'; DROP TABLE classes;--", 'a"b', "a%", "_lead", "-lead", "a" * 65, "a" * 10_000, "a\x00b"]


@pytest.mark.parametrize("name", BAD_NAMES)
def test_bad_class_names_are_usage_errors(store: Store, name: str) -> None:
    with pytest.raises(UsageError, match=r"must match \^\[a-z0-9\]") as info:
        with store.session() as s:
            repo.register_class(s, name, modalities=["rgb"], data_root="/d")
    assert info.value.exit_code == 2 and len(str(info.value)) < 300
    with store.session() as s:
        assert repo.list_classes(s) == []


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=80))
def test_class_name_rule(name: str) -> None:
    import re

    ok = re.fullmatch(r"[a-z0-9][a-z0-9_-]{0,63}", name) is not None
    try:
        assert repo.validate_class_name(name) == name and ok
    except UsageError:
        assert not ok


def test_register_classes_in_arrival_order_and_refuse_duplicates(store: Store) -> None:
    with store.session() as s:
        for name in ("cable_gland", "0-rope", "a" * 64):
            repo.register_class(s, name, modalities=["rgb", "geometry"], data_root=f"/d/{name}")
    with pytest.raises(UsageError, match="already learned; use --update"):
        with store.session() as s:
            repo.register_class(s, "0-rope", modalities=["rgb"], data_root="/d")
    with pytest.raises(UsageError, match="modalities"):
        with store.session() as s:
            repo.register_class(s, "depth", modalities=["depth"], data_root="/d")
    with store.session() as s:
        assert [(c.name, c.arrival_order) for c in repo.list_classes(s)] == [
            ("cable_gland", 0), ("0-rope", 1), ("a" * 64, 2)]
        repo.delete_class(s, "0-rope")
        assert repo.next_arrival_order(s) == 3
    with pytest.raises(UsageError, match="not been learned"):
        with store.session() as s:
            repo.require_class(s, "0-rope")


# ---------------------------------------------------------------------- versions, aliases, records


def test_promotion_leaves_exactly_one_production(store: Store) -> None:
    v1 = add_version(store, "checkpoints/v1", "production")
    v2 = add_version(store, "checkpoints/v2", "candidate", b"v2")
    with store.session() as s:
        repo.promote(s, v2)
    with store.session() as s:
        aliases = dict(s.execute(select(ModelVersion.id, ModelVersion.alias)).all())
        assert aliases == {v1: None, v2: "production"} and repo.get_production(s).id == v2
    with pytest.raises(RuntimeError):  # a failure after promoting leaves the old production in place
        with store.session() as s:
            repo.promote(s, v1)
            raise RuntimeError("evaluation failed")
    with store.session() as s:
        assert repo.get_production(s).id == v2 and repo.get_alias(s, "candidate") is None
    with pytest.raises(IumadError, match="relative"):
        with store.session() as s:
            repo.add_model_version(s, "/abs/ckpt", "0" * 64, 1)


def test_steps_lifecycle(store: Store) -> None:
    with store.session() as s:
        step = repo.begin_step(s, "add-class", ["bagel"], config_hash="c" * 64, seed=7)
        assert (step.step_index, step.status, step.pid) == (0, "running", os.getpid())
    v = add_version(store, "checkpoints/step-0000")
    with store.session() as s:
        done = repo.finish_step(s, step.id, succeeded=True, result_version_id=v)
        assert done.finished_at >= done.started_at and done.result_version_id == v
        with pytest.raises(IumadError, match="already succeeded"):
            repo.finish_step(s, step.id, succeeded=False)
        failed = repo.finish_step(s, repo.begin_step(s, "update", ["bagel"]), succeeded=False, error="oom")
        assert (failed.step_index, failed.status, failed.error) == (1, "failed", "oom")
        with pytest.raises(IumadError, match="kind"):
            repo.begin_step(s, "train", [])


def test_exemplars_thresholds_evaluation_sets_and_ingest(store: Store) -> None:
    v = add_version(store, "checkpoints/v1", "production")
    with store.session() as s:
        repo.register_class(s, "bagel", modalities=["rgb"], data_root="/d")
        ex = [repo.ExemplarRecord(f"train/good/{i:03d}.png", f"{i:064x}", "kcenter", i, f"key{i}") for i in range(3)]
        assert repo.record_exemplars(s, "bagel", ex) == 3
        assert repo.record_exemplars(s, "bagel", ex[:2]) == 2  # replaces
        assert [e.rank for e in repo.list_exemplars(s, "bagel")] == [0, 1]
        repo.record_thresholds(s, v, [repo.ThresholdRecord("bagel", 1.5, "normal-quantile", "no defects")])
        repo.record_thresholds(s, v, [repo.ThresholdRecord("bagel", 2.5, "defects")])
        t = repo.thresholds_for(s, v)["bagel"]
        assert (t.value, t.method, t.warning) == (2.5, "defects", None)
        repo.set_evaluation_set(s, "bagel", root="/d/bagel", split="test", n_samples=40, fingerprint="f")
        repo.set_evaluation_set(s, "bagel", root="/d/bagel2", split="test", n_samples=41)
        [(name, es)] = repo.evaluation_sets(s, "test")
        assert (name, es.root, es.n_samples) == ("bagel", "/d/bagel2", 41)
        digests = [f"{i:064x}" for i in range(1200)]
        for d in digests[::2]:
            repo.record_ingested(s, d, f"/in/{d[-4:]}.png", "bagel")
        repo.record_ingested(s, "f" * 64, "/in/bad.png", "bagel", status="quarantined", reason="NaN geometry")
        assert repo.ingested_among(s, digests + ["f" * 64]) == set(digests[::2]) | {"f" * 64}
        with pytest.raises(IumadError, match="already ingested"):
            repo.record_ingested(s, digests[0], "/in/again.png", "bagel")
    assert check_store(store)["ok"]


def test_r_matrix_from_hand_inserted_rows(store: Store) -> None:
    with store.session() as s:
        for name in ("a", "b", "c"):
            repo.register_class(s, name, modalities=["rgb"], data_root="/d")
        plan = [("add-class", True, {"a": 0.9}),
                ("add-class", False, {"a": 0.1, "b": 0.1}),  # failed: not a row of R
                ("add-class", True, {"a": 0.8, "b": 0.95}),
                ("rollback", True, {"a": 0.5}),  # rollbacks are not rows of R
                ("update", True, {"a": 0.85, "b": float("nan")})]
        for kind, ok, values in plan:
            step = repo.begin_step(s, kind, list(values))
            repo.record_evaluations(s, step.id, [repo.EvaluationRecord(c, "i_auroc", v, 10) for c, v in values.items()])
            repo.record_evaluations(s, step.id, [repo.EvaluationRecord("a", "p_auroc", 0.5, 10)])
            repo.finish_step(s, step, succeeded=ok)
        running = repo.begin_step(s, "add-class", ["c"])
        repo.record_evaluations(s, running.id, [repo.EvaluationRecord("c", "i_auroc", 0.7, 10)])
    with store.session() as s:
        steps, classes, r = repo.r_matrix(s, "i_auroc")
        assert steps == [0, 2, 4] and classes == ["a", "b", "c"]
        assert r == [[0.9, None, None], [0.8, 0.95, None], [0.85, None, None]]
        assert repo.r_matrix(s, "f1_max") == ([0, 2, 4], ["a", "b", "c"], [[None] * 3] * 3)


# ---------------------------------------------------------------------- PostgreSQL (only when one is given)


# pg_url (an empty database, or a skip without IUMAD_TEST_PG_URL) comes from conftest.py


def test_postgresql_store(tmp_path: Path, pg_url: str, newer_migrations: Path,
                          monkeypatch: pytest.MonkeyPatch) -> None:
    with Store.open(tmp_path / "s", pg_url) as s:
        assert s.dialect == "postgresql"
        with s.engine.connect() as conn:
            ctx = MigrationContext.configure(conn, opts={"compare_type": True})
            assert compare_metadata(ctx, Base.metadata) == []
        v1 = add_version(s, "checkpoints/v1", "production")
        v2 = add_version(s, "checkpoints/v2", "candidate", b"v2")
        with s.session() as session:
            repo.promote(session, v2)
            c = repo.register_class(session, "bagel", modalities=["rgb"], data_root="/d")
            step = repo.begin_step(session, "add-class", ["bagel"])
            repo.record_evaluations(session, step.id, [repo.EvaluationRecord("bagel", "i_auroc", 0.9, 5)])
            repo.finish_step(session, step, succeeded=True)
            assert c.added_at.tzinfo is not None
        with s.session() as session:
            assert repo.get_production(session).id == v2 and session.get(ModelVersion, v1).alias is None
            assert repo.r_matrix(session, "i_auroc") == ([0], ["bagel"], [[0.9]])
        assert check_store(s)["ok"], check_store(s)
        with s.engine.begin() as conn:  # an orphan, planted with the key checks of this session off
            conn.execute(text("SET session_replication_role = replica"))
            conn.execute(text("INSERT INTO exemplars (class_id, path, sha256, method, rank) "
                              "VALUES (999, 'x', :h, 'k', 0)"), {"h": "0" * 64})
            conn.execute(text("SET session_replication_role = DEFAULT"))
        assert codes(check_store(s)) == {"foreign-key"}
    monkeypatch.setattr(migrate, "migrations_dir", lambda: newer_migrations)
    with pytest.raises(StoreNeedsMigration, match="iumad db upgrade"):
        Store.open(tmp_path / "s", pg_url)
    report = upgrade(tmp_path / "s", pg_url)
    assert (report["from"], report["to"], report["backup"]) == (HEAD, "9999", None)
    with Store.open(tmp_path / "s", pg_url) as s:
        assert current(s)["up_to_date"]
