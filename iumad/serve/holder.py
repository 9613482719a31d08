"""The serving model and its hot swap.

A `Served` snapshot (detector, version, thresholds) is immutable; the holder replaces its reference in
one assignment, so a request that took a snapshot finishes on that model while the next request gets
the new one. A background thread polls the store's production alias; a new version is loaded and
checked (sha256 of model.pt and class blobs, as `load_version`) before the swap, and a version that
fails is refused, logged and counted while the old model keeps serving.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

from iumad.errors import IumadError
from iumad.model.detector import Detector
from iumad.serve.metrics import Metrics
from iumad.store import repository as repo
from iumad.store.checkpoints import load_detector
from iumad.store.db import Store
from iumad.store.models import ModelVersion

log = logging.getLogger("iumad.serve")


@dataclass
class Served:
    """One loaded model version; `lock` serialises scoring on it (the detector is not thread-safe)."""

    detector: Detector
    version: int
    sha256: str
    thresholds: dict[str, float]
    loaded_at: float
    lock: threading.Lock = field(default_factory=threading.Lock)


def load_served(store: Store, version: ModelVersion) -> Served:
    """Load `version`, refused unless its files match their recorded sha256. No feature cache: uploads
    are scored without writing anything into the store."""
    det = load_detector(store.path(version.checkpoint_dir), expected_sha256=version.sha256, cache_dir=None)
    with store.session() as s:
        thresholds = {n: t.value for n, t in repo.thresholds_for(s, version.id).items()}
    return Served(det, version.id, version.sha256, thresholds, time.time())


class ModelHolder:
    """Holds the serving model; `start()` loads production in the background and then polls for changes."""

    def __init__(self, store: Store, metrics: Metrics, poll_s: float = 2.0, retry_s: float = 60.0,
                 loader: Callable[[Store, ModelVersion], Served] = load_served) -> None:
        self.store = store
        self.metrics = metrics
        self.poll_s = poll_s
        self.retry_s = retry_s  # a refused version is tried again this much later (its files may be restored)
        self.loader = loader
        self.refused: dict[tuple[int, str], tuple[str, float]] = {}  # (version, sha256) -> (why, when)
        self.last_error: str | None = None
        self._served: Served | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def served(self) -> Served | None:
        """The current snapshot (None until the first load succeeds)."""
        return self._served

    def start(self) -> None:
        """Start the polling thread (its first pass loads the production model)."""
        self._thread = threading.Thread(target=self._run, name="iumad-serve-swap", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop polling; waits for a load in progress to finish."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.check()
            except Exception as exc:  # the store unreadable for a moment: keep serving, retry next poll
                self.last_error = f"cannot read the store's production alias: {exc}"
                log.warning(self.last_error)
            self._stop.wait(self.poll_s)

    def check(self) -> bool:
        """Swap in the production version if it changed and loads; True when a swap happened."""
        with self.store.session() as s:
            version = repo.get_production(s)
            if version is not None:
                s.expunge(version)
        if version is None:
            self.last_error = f"{self.store.where}: no production model yet; learn a class with `iumad add-class`"
            return False
        current = self._served
        if current is not None and current.version == version.id and current.sha256 == version.sha256:
            self.last_error = None  # production is back on the serving version (e.g. a refused one undone)
            return False
        key = (version.id, version.sha256)
        if key in self.refused and time.monotonic() - self.refused[key][1] < self.retry_s:
            return False
        try:
            served = self.loader(self.store, version)
        except (IumadError, OSError, RuntimeError, ValueError, KeyError) as exc:
            why = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            self.refused[key] = (why, time.monotonic())
            self.last_error = f"model version {version.id} refused, version " \
                f"{current.version if current else 'none'} keeps serving: {why}"
            self.metrics.refused.labels(version=str(version.id)).inc()
            log.error(self.last_error)
            return False
        self._served = served  # the swap: one reference assignment
        self.refused.pop(key, None)
        self.last_error = None
        self.metrics.version.set(served.version)
        self.metrics.last_swap.set(served.loaded_at)
        if current is not None:
            self.metrics.swaps.inc()
        log.info("serving model version %d (was %s)", served.version, current.version if current else "none")
        return True


def version_rows(store: Store, holder: ModelHolder) -> list[dict]:
    """Every model version (oldest first) with whether it serves and, when refused, why."""
    from sqlalchemy import select

    served = holder.served
    with store.session() as s:
        versions = s.scalars(select(ModelVersion).order_by(ModelVersion.id)).all()
        return [{"version": v.id, "alias": v.alias, "created_at": v.created_at.isoformat(), "sha256": v.sha256,
                 "size_bytes": v.size_bytes, "pinned": bool(v.pinned),
                 "removed_at": v.removed_at.isoformat() if v.removed_at else None,
                 "serving": served is not None and served.version == v.id,
                 "refused": next((why for (i, _), (why, _) in holder.refused.items() if i == v.id), None)}
                for v in versions]
