"""The task store on PostgreSQL: migration of an empty database, the repository operations, the writer lock
as an advisory lock (threads, another process, other store folders), and `iumad db` with IUMAD_DB_URL.

Every test gets a fresh database from the `pg_url` fixture (conftest.py) and skips without
IUMAD_TEST_PG_URL; `.ci/run` starts a throwaway server and sets it."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import inspect, make_url, text
from sqlalchemy.exc import IntegrityError
from typer.testing import CliRunner

from iumad.cli import app
from iumad.errors import IumadError, LockedError, StoreNeedsMigration, UsageError
from iumad.store import migrate
from iumad.store import repository as repo
from iumad.store.check import check_store, current, upgrade
from iumad.store.db import Store
from iumad.store.lock import ADVISORY_KEY
from iumad.store.models import Base

HEAD = migrate.head_revision()


@pytest.fixture
def pg_store(tmp_path: Path, pg_url: str):
    s = Store.open(tmp_path / "store", pg_url)
    yield s
    s.close()


def add_version(store: Store, rel: str, alias: str | None = None, payload: bytes = b"weights") -> int:
    folder = store.path(rel)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "model.pt").write_bytes(payload)
    (folder / "detector.json").write_text('{"classes": []}')  # a version's manifest (no class blobs)
    with store.session() as s:
        v = repo.add_model_version(s, rel, hashlib.sha256(payload).hexdigest(), len(payload))
        if alias:
            repo.set_alias(s, v.id, alias)
        return v.id


def with_password(url: str) -> str:
    """The URL with a password in it (the test server trusts every local connection and ignores it), to
    see that messages hide it; unchanged when it has one or a password comes from the environment."""
    u = make_url(url)
    if u.password or os.environ.get("PGPASSWORD") or os.environ.get("PGPASSFILE"):
        return url
    return u.set(password="not-a-secret-7f3a").render_as_string(hide_password=False)


# ---------------------------------------------------------------------- schema


def test_empty_database_is_migrated_to_head_and_checks_ok(tmp_path: Path, pg_url: str) -> None:
    with pytest.raises(StoreNeedsMigration, match="iumad db upgrade"):
        Store.open(tmp_path / "s", pg_url, create=False)  # readers never create the tables
    assert current(tmp_path / "s", pg_url)["revision"] is None
    with Store.open(tmp_path / "s", pg_url) as s:
        assert s.dialect == "postgresql" and s.backup is None and s.sqlite_path is None
        assert current(s)["up_to_date"] and current(s)["revision"] == HEAD
        with s.engine.connect() as conn:
            ctx = MigrationContext.configure(conn, opts={"compare_type": True})
            assert compare_metadata(ctx, Base.metadata) == []
            insp = inspect(conn)
            in_db = {(t, c["name"]) for t in insp.get_table_names() for c in insp.get_check_constraints(t)}
        in_models = {(t.name, c.name) for t in Base.metadata.tables.values() for c in t.constraints
                     if c.__class__.__name__ == "CheckConstraint"}
        assert in_db == in_models
        report = check_store(s)
        assert report["ok"] and report["problems"] == [] and report["revision"] == HEAD
    with Store.open(tmp_path / "s", pg_url, create=False) as s:  # at head: opens without a lock
        assert "postgresql" in s.where and str(tmp_path / "s") in s.where
    assert upgrade(tmp_path / "s", pg_url)["from"] == HEAD  # already at head: nothing to do


# ---------------------------------------------------------------------- repository


def test_classes_steps_promotion_and_r_on_postgresql(pg_store: Store) -> None:
    s_ = pg_store
    with s_.session() as s:
        for name in ("cable_gland", "0-rope", "bagel"):
            repo.register_class(s, name, modalities=["rgb", "geometry"], data_root=f"/d/{name}")
    with pytest.raises(UsageError, match="already learned"):
        with s_.session() as s:
            repo.register_class(s, "bagel", modalities=["rgb"], data_root="/d")
    with pytest.raises(UsageError, match=r"must match \^\[a-z0-9\]"):
        with s_.session() as s:
            repo.register_class(s, "x'; DROP TABLE classes;--", modalities=["rgb"], data_root="/d")
    with s_.session() as s:
        assert [(c.name, c.arrival_order) for c in repo.list_classes(s)] == [
            ("cable_gland", 0), ("0-rope", 1), ("bagel", 2)]
        c = repo.require_class(s, "bagel")
        assert c.added_at.tzinfo is not None and c.modalities == ["rgb", "geometry"]

    # steps: indices, finishing, refusing a second finish
    with s_.session() as s:
        first = repo.begin_step(s, "add-class", ["cable_gland"], config_hash="c" * 64, seed=7)
        assert (first.step_index, first.status, first.pid) == (0, "running", os.getpid())
    v1 = add_version(s_, "checkpoints/step-0000", "production")
    with s_.session() as s:
        done = repo.finish_step(s, first.id, succeeded=True, result_version_id=v1)
        assert done.finished_at >= done.started_at and done.result_version_id == v1
        with pytest.raises(IumadError, match="already succeeded"):
            repo.finish_step(s, first.id, succeeded=False)

    # promotion: exactly one production; the database refuses a second one
    v2 = add_version(s_, "checkpoints/step-0001", "candidate", b"v2")
    with s_.session() as s:
        repo.promote(s, v2)
    with s_.session() as s:
        assert repo.get_production(s).id == v2 and repo.get_alias(s, "candidate") is None
    with pytest.raises(RuntimeError):
        with s_.session() as s:
            repo.promote(s, v1)
            raise RuntimeError("evaluation failed")
    with s_.session() as s:
        assert repo.get_production(s).id == v2
    with pytest.raises(IntegrityError):
        with s_.session() as s:
            s.execute(text("UPDATE model_versions SET alias = 'production'"))

    # R: failed steps and rollbacks are not rows; NaN and missing cells are None (step 0 evaluated nothing)
    with s_.session() as s:
        plan = [("add-class", False, {"cable_gland": 0.1}),
                ("add-class", True, {"cable_gland": 0.8, "0-rope": 0.95}),
                ("rollback", True, {"cable_gland": 0.5}),
                ("update", True, {"cable_gland": 0.85, "0-rope": float("nan")})]
        for kind, ok, values in plan:
            step = repo.begin_step(s, kind, list(values))
            repo.record_evaluations(s, step.id, [repo.EvaluationRecord(c, "i_auroc", v, 10)
                                                 for c, v in values.items()])
            repo.finish_step(s, step, succeeded=ok)
    with s_.session() as s:
        steps, classes, r = repo.r_matrix(s, "i_auroc")
        assert steps == [0, 2, 4] and classes == ["cable_gland", "0-rope", "bagel"]
        assert r == [[None] * 3, [0.8, 0.95, None], [0.85, None, None]]
    assert check_store(s_)["ok"], check_store(s_)


# ---------------------------------------------------------------------- the writer lock


def test_advisory_key_is_fixed() -> None:
    digest = hashlib.sha256(b"iumad-writer").digest()[:8]
    assert ADVISORY_KEY == int.from_bytes(digest, "big", signed=True) and -2**63 <= ADVISORY_KEY < 2**63


@pytest.mark.parametrize("same_folder", [True, False], ids=["same-folder", "other-folder"])
def test_second_writer_is_refused_at_once_then_waits(tmp_path: Path, pg_url: str, same_folder: bool) -> None:
    url = with_password(pg_url)
    first = Store.open(tmp_path / "a", url)
    second = Store.open(tmp_path / ("a" if same_folder else "b"), url)
    entered, release = threading.Event(), threading.Event()

    def hold() -> None:
        with first.writer_lock():
            entered.set()
            release.wait(10)

    t = threading.Thread(target=hold)
    t.start()
    try:
        assert entered.wait(10)
        t0 = time.monotonic()
        with pytest.raises(LockedError, match=f"pid {os.getpid()}") as info:
            with second.writer_lock():
                pass
        assert info.value.exit_code == 5 and time.monotonic() - t0 < 1.0
        message = str(info.value)
        assert "not-a-secret" not in message
        if not same_folder:  # only the database can have refused it: the message names the database
            assert make_url(pg_url).database in message and "database" in message
        threading.Timer(0.3, release.set).start()
        t0 = time.monotonic()
        with second.writer_lock(wait=10):
            assert time.monotonic() - t0 >= 0.2
    finally:
        release.set()
        t.join()
        first.close()
        second.close()


def test_lock_held_by_another_process_with_another_folder(tmp_path: Path, pg_url: str) -> None:
    with Store.open(tmp_path / "here", pg_url) as store:
        code = ("import sys, time; from iumad.store.db import Store\n"
                "with Store.open(sys.argv[1], sys.argv[2]) as s, s.writer_lock():\n"
                "    print('held', flush=True); time.sleep(60)\n")
        proc = subprocess.Popen([sys.executable, "-c", code, str(tmp_path / "there"), pg_url],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            line = proc.stdout.readline().strip()
            assert line == "held", proc.stderr.read() if proc.poll() is not None else line
            t0 = time.monotonic()
            with pytest.raises(LockedError, match=f"pid {proc.pid}.* after waiting 0.2 s") as info:
                with store.writer_lock(wait=0.2):
                    pass
            assert info.value.exit_code == 5 and 0.15 < time.monotonic() - t0 < 2.0
        finally:
            proc.kill()
            proc.wait()
        with store.writer_lock(wait=5):  # the server ended the killed holder's session and its lock
            pass


def test_databases_of_one_server_do_not_contend(tmp_path: Path, pg_url: str, pg_database) -> None:
    other = pg_database()
    if other is None:
        pytest.skip("the role of IUMAD_TEST_PG_URL may not CREATE DATABASE")
    with Store.open(tmp_path / "a", pg_url) as a, Store.open(tmp_path / "b", other) as b:
        with a.writer_lock(), b.writer_lock():
            pass


def test_cli_upgrade_is_refused_while_another_host_writes(tmp_path: Path, pg_url: str) -> None:
    with Store.open(tmp_path / "host-a", pg_url) as store, store.writer_lock():
        result = CliRunner().invoke(app, ["db", "upgrade", "--store", str(tmp_path / "host-b")],
                                    env={"IUMAD_DB_URL": pg_url})
    assert result.exit_code == 5, result.output
    assert "being written by" in result.output and f"pid {os.getpid()}" in result.output


# ---------------------------------------------------------------------- `iumad db` with IUMAD_DB_URL


def test_db_commands_with_iumad_db_url(tmp_path: Path, pg_url: str) -> None:
    url = with_password(pg_url)
    runner = CliRunner()
    store = ["--store", str(tmp_path / "s")]
    env = {"IUMAD_DB_URL": url}

    def run(*args: str):
        return runner.invoke(app, ["db", *args, *store, "--json"], env=env)

    result = run("current")
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert (report["revision"], report["up_to_date"]) == (None, False)
    assert "not-a-secret" not in result.output
    result = run("check")  # an empty database: readers never create the tables
    assert result.exit_code == 3 and "iumad db upgrade" in result.output
    result = run("upgrade")
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert (report["from"], report["to"], report["backup"]) == (None, HEAD, None)
    assert report["url"].startswith("postgresql+psycopg://") and "not-a-secret" not in report["url"]
    report = json.loads(run("current").output)
    assert (report["revision"], report["up_to_date"]) == (HEAD, True)
    result = run("check")
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["ok"]
    result = runner.invoke(app, ["db", "check", *store], env=env)
    assert result.exit_code == 0 and result.output.strip().endswith(": ok")
