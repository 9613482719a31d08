"""Prometheus metrics of one app, in its own registry (several apps in one process, e.g. tests, do not
collide): requests by route and status, latency, samples per class, the serving version, swaps.

With several worker processes (`iumad serve --workers N`), prometheus-client's multiprocess mode keeps
each worker's values in files under $PROMETHEUS_MULTIPROC_DIR and /metrics sums the counters and
histograms of every worker; the version and swap-time gauges are listed per live worker (`pid` label),
so a scrape shows whether every worker has swapped.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead

from iumad.errors import UsageError

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"


class Metrics:
    """The app's metric families; `render()` is the /metrics body."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("iumad_requests", "HTTP requests by route and status", ["route", "status"], registry=r)
        self.latency = Histogram("iumad_request_seconds", "Request latency by route", ["route"],
                                 buckets=LATENCY_BUCKETS, registry=r)
        self.samples = Counter("iumad_samples_scored", "Samples scored, by the class they were scored as",
                               ["class_name"], registry=r)
        self.version = Gauge("iumad_model_version", "Id of the model version that serves (0 before the first load)",
                             registry=r, multiprocess_mode="liveall")
        self.last_swap = Gauge("iumad_model_last_swap_timestamp_seconds",
                               "Unix time the serving model was last loaded or swapped", registry=r,
                               multiprocess_mode="liveall")
        self.swaps = Counter("iumad_model_swaps", "Model versions swapped in after a production change", registry=r)
        self.refused = Counter("iumad_model_swap_refused", "Production versions refused (sha256 or load failed); "
                               "the previous model kept serving", ["version"], registry=r)

    def render(self) -> bytes:
        """Prometheus text exposition format: this process's values, or every worker's in multiprocess mode."""
        if os.environ.get(MULTIPROC_ENV):
            merged = CollectorRegistry()
            MultiProcessCollector(merged)
            return generate_latest(merged)
        return generate_latest(self.registry)


def worker_exited() -> None:
    """Drop this process's per-worker gauges (multiprocess mode): a stopped worker no longer serves."""
    if os.environ.get(MULTIPROC_ENV):
        mark_process_dead(os.getpid())


@contextlib.contextmanager
def multiprocess_dir() -> Iterator[Path]:
    """The folder where the workers of one server write their metrics: $PROMETHEUS_MULTIPROC_DIR when set
    (it must exist; the .db files a previous run left there are removed, as prometheus-client requires),
    else a fresh temporary folder removed when the server stops. Sets the variable for the workers."""
    given = os.environ.get(MULTIPROC_ENV)
    if given:
        folder = Path(given)
        if not folder.is_dir():
            raise UsageError(f"{folder}: ${MULTIPROC_ENV} is not a directory; create it or unset the variable",
                             file=folder, fix=f"mkdir it, or unset {MULTIPROC_ENV} (a temporary folder is used)")
        for stale in folder.glob("*.db"):
            stale.unlink()
        yield folder
        return
    with tempfile.TemporaryDirectory(prefix="iumad-metrics-") as tmp:
        os.environ[MULTIPROC_ENV] = tmp
        try:
            yield Path(tmp)
        finally:
            os.environ.pop(MULTIPROC_ENV, None)
