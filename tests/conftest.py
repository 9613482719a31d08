"""Shared test fixtures: where ../shared lives, small writers for dataset files, PostgreSQL databases."""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image

SHARED = Path(os.environ.get("IUMAD_SHARED", Path(__file__).resolve().parents[2] / "shared"))
PG_ENV = "IUMAD_TEST_PG_URL"
PG_SKIP = (f"PostgreSQL tests need {PG_ENV}=postgresql+psycopg://USER@HOST/DB (a role that may CREATE "
           "DATABASE, or an empty database); .ci/run starts a throwaway server and sets it")


@pytest.fixture
def shared_data() -> Path:
    """../shared/data, or skip: the real MVTec 3D-AD files are not part of the repository."""
    data = SHARED / "data"
    if not data.is_dir():
        pytest.skip(f"shared data not found at {data} (set IUMAD_SHARED to the folder beside the checkout)")
    return data


def write_png(path: Path, arr: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)
    return path


def write_tiff(path: Path, arr: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tifffile.imwrite(path, arr, photometric="minisblack", planarconfig="contig")
    return path


def scene(size: int = 32, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A tiny rgb image and organized xyz cloud (a box on a plane, a few missing points)."""
    rng = np.random.default_rng(seed)
    rgb = rng.integers(0, 255, (size, size, 3), dtype=np.uint8)
    v, u = np.mgrid[0:size, 0:size].astype(np.float32)
    z = np.full((size, size), 0.6, np.float32)
    z[size // 4: 3 * size // 4, size // 4: 3 * size // 4] -= 0.01
    xyz = np.stack([(u - size / 2) * 1e-3, (v - size / 2) * 1e-3, z], -1).astype(np.float32)
    xyz[0, :3] = 0.0
    return rgb, xyz


# ---------------------------------------------------------------------- PostgreSQL (IUMAD_TEST_PG_URL)


@pytest.fixture(scope="session")
def pg_admin() -> Iterator[object]:
    """An autocommit engine on the database named by IUMAD_TEST_PG_URL, or skip when it is not set."""
    url = os.environ.get(PG_ENV)
    if not url:
        pytest.skip(PG_SKIP)
    from sqlalchemy import create_engine
    from sqlalchemy.pool import NullPool

    engine = create_engine(url, isolation_level="AUTOCOMMIT", poolclass=NullPool)
    yield engine
    engine.dispose()


@pytest.fixture
def pg_database(pg_admin) -> Iterator[Callable[[], str | None]]:
    """Factory of fresh, empty PostgreSQL databases (`iumad_test_<random>`) on the server of
    IUMAD_TEST_PG_URL, returning their URLs (None when the role may not CREATE DATABASE); each is dropped
    (closing what still connects to it) when the test ends."""
    from sqlalchemy import text
    from sqlalchemy.exc import ProgrammingError

    created: list[str] = []

    def make() -> str | None:
        name = f"iumad_test_{uuid.uuid4().hex[:12]}"
        try:
            with pg_admin.connect() as conn:
                conn.execute(text(f'CREATE DATABASE "{name}"'))
        except ProgrammingError as exc:
            if getattr(exc.orig, "sqlstate", None) == "42501":  # insufficient_privilege
                return None
            raise
        created.append(name)
        return pg_admin.url.set(database=name).render_as_string(hide_password=False)

    yield make
    with pg_admin.connect() as conn:
        for name in created:
            try:
                conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
            except Exception:  # PostgreSQL < 13 has no FORCE
                conn.execute(text(f'DROP DATABASE IF EXISTS "{name}"'))


@pytest.fixture
def pg_url(pg_admin, pg_database) -> Iterator[str]:
    """The URL of an empty PostgreSQL database for this test (skips without IUMAD_TEST_PG_URL).

    A fresh database per test when the role may create databases; otherwise the database of
    IUMAD_TEST_PG_URL itself, which must then hold no tables, and whose store tables are dropped after."""
    from sqlalchemy import inspect, text

    fresh = pg_database()
    if fresh is not None:
        yield fresh
        return
    with pg_admin.connect() as conn:
        if inspect(conn).get_table_names():
            pytest.skip(f"{PG_ENV}: its role may not CREATE DATABASE and its database is not empty")
    yield pg_admin.url.render_as_string(hide_password=False)
    from iumad.store.models import Base

    with pg_admin.connect() as conn:
        for name in [t.name for t in Base.metadata.sorted_tables] + ["alembic_version", "test_only"]:
            conn.execute(text(f'DROP TABLE IF EXISTS "{name}" CASCADE'))


@pytest.fixture(autouse=True)
def _process_choices_reset() -> Iterator[None]:
    """--device and --cache-limit set process-wide choices; a test that ran the CLI in-process must
    not hand them to the next one."""
    yield
    from iumad.model.device import set_process_device
    from iumad.model.feature_cache import set_process_limit

    set_process_device(None)
    set_process_limit(None)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item: pytest.Item) -> Iterator[None]:
    """A hostile-input property of tests/test_hostile.py fails when it tried no case (every example
    filtered out), whatever else runs and in whatever order."""
    import sys

    hypothesis_test = getattr(getattr(item, "obj", None), "is_hypothesis_test", False)
    if not (item.path.name == "test_hostile.py" and hypothesis_test):
        return (yield)
    counts = sys.modules["tests.hostile_counts"].COUNTS
    before = sum(counts.values())
    result = yield
    assert sum(counts.values()) > before, f"{item.name} tried no hostile case: its strategy filters out everything"
    return result


def pytest_terminal_summary(terminalreporter) -> None:  # type: ignore[no-untyped-def]
    """Print how many hostile inputs tests/test_hostile.py tried, per property, and which kill points
    tests/test_crash.py survived (shown with -q too)."""
    import sys

    counts = sys.modules.get("tests.hostile_counts")
    if counts is not None and counts.COUNTS:
        terminalreporter.write_sep("-", "hostile input cases tried")
        for name, n in sorted(counts.COUNTS.items()):
            terminalreporter.write_line(f"{name}: {n}")
        terminalreporter.write_line(f"total: {sum(counts.COUNTS.values())}")
    crash = sys.modules.get("tests.test_crash")
    if crash is not None and crash.SURVIVED:
        terminalreporter.write_sep("-", "kill points survived")
        terminalreporter.write_line(f"{len(crash.SURVIVED)}: {', '.join(crash.SURVIVED)}")
