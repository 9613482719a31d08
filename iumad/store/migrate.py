"""Alembic plumbing for the store: find the migrations, read revisions, decide and run upgrades.

There is no alembic.ini (the repository's top level is fixed): the Alembic `Config` is built here, with
`script_location` = the `migrations/` folder beside the installed `iumad` package, and the live
connection handed to `migrations/env.py` through `Config.attributes["connection"]`.
"""

from __future__ import annotations

import enum
import functools
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import inspect
from sqlalchemy.engine import Connection, Engine

import iumad
from iumad.errors import IumadError, StoreNeedsMigration

VERSION_TABLE = "alembic_version"


def migrations_dir() -> Path:
    """The repository's `migrations/` folder (present in a source checkout / editable install)."""
    folder = Path(iumad.__file__).resolve().parents[1] / "migrations"
    if not (folder / "env.py").is_file():
        raise IumadError(f"{folder}: Alembic migrations not found; install iumad from its source checkout "
                         "(pip install -e .) so that the migrations/ folder sits beside the package",
                         file=folder, fix="pip install -e . from the source checkout")
    return folder


def alembic_config(connection: Connection | None = None) -> Config:
    """An in-memory Alembic config; `env.py` runs on `connection` when one is given."""
    cfg = Config()
    cfg.set_main_option("script_location", str(migrations_dir()))
    if connection is not None:
        cfg.attributes["connection"] = connection
    return cfg


def script_directory() -> ScriptDirectory:
    return _script_directory(str(migrations_dir()))


@functools.lru_cache(maxsize=4)
def _script_directory(folder: str) -> ScriptDirectory:
    # Parsing the revision files costs milliseconds per open; they do not change while we run.
    cfg = Config()
    cfg.set_main_option("script_location", folder)
    return ScriptDirectory.from_config(cfg)


def head_revision() -> str:
    """The newest revision this code knows."""
    head = script_directory().get_current_head()
    if head is None:
        raise IumadError(f"{migrations_dir()}: no migration revisions found")
    return head


def known_revisions() -> set[str]:
    return {s.revision for s in script_directory().walk_revisions()}


def database_revision(connection: Connection) -> str | None:
    """The revision stamped in the database, None when it has none (empty or not yet migrated)."""
    return MigrationContext.configure(connection).get_current_revision()


def user_tables(connection: Connection) -> list[str]:
    """Tables other than Alembic's own; an empty list means a brand-new database."""
    return sorted(t for t in inspect(connection).get_table_names() if t != VERSION_TABLE)


class Action(enum.Enum):
    """What opening a store has to do about its schema."""

    NONE = "none"  # at head
    CREATE = "create"  # empty database: migrate to head, nothing to back up
    UPGRADE = "upgrade"  # older schema: back a SQLite file up, then migrate


def decide(dialect: str, revision: str | None, head: str, known: set[str], has_tables: bool, *,
           create: bool = True, upgrade_sqlite: bool = True, explicit: bool = False,
           where: str = "store") -> Action:
    """What opening (or, with `explicit`, `iumad db upgrade`) must do; raises when the store must not or
    cannot be used as it is. Opening upgrades older SQLite stores only; other databases are migrated
    only on request, since other hosts may still run the older code against them."""
    if revision is None:
        if has_tables:
            raise IumadError(f"{where}: the database holds tables but no iumad schema revision; "
                             "it is not an iumad store (point --store / IUMAD_DB_URL elsewhere)", file=where,
                             fix="point --store / IUMAD_DB_URL elsewhere")
        if not create:
            raise StoreNeedsMigration(f"{where}: the database has no iumad schema yet; run `iumad db upgrade`",
                                      file=where, fix="run `iumad db upgrade`")
        return Action.CREATE
    if revision == head:
        return Action.NONE
    if revision not in known:
        raise IumadError(f"{where}: schema revision {revision!r} was written by a newer iumad "
                         f"(this one knows up to {head!r}); upgrade iumad", file=where, fix="upgrade iumad")
    if explicit or (dialect == "sqlite" and upgrade_sqlite):
        return Action.UPGRADE
    raise StoreNeedsMigration(f"{where}: schema revision {revision!r} is older than {head!r}; "
                              "run `iumad db upgrade`", file=where, fix="run `iumad db upgrade`")


def upgrade_connection(connection: Connection, target: str = "head") -> None:
    """Run the migrations on `connection` (inside the caller's transaction)."""
    command.upgrade(alembic_config(connection), target)


def upgrade_engine(engine: Engine, target: str = "head") -> None:
    with engine.begin() as conn:
        upgrade_connection(conn, target)
