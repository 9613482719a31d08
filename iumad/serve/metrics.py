"""Prometheus metrics of one app, in its own registry (several apps in one process, e.g. tests, do not
collide): requests by route and status, latency, samples per class, the serving version, swaps."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


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
                             registry=r)
        self.last_swap = Gauge("iumad_model_last_swap_timestamp_seconds",
                               "Unix time the serving model was last loaded or swapped", registry=r)
        self.swaps = Counter("iumad_model_swaps", "Model versions swapped in after a production change", registry=r)
        self.refused = Counter("iumad_model_swap_refused", "Production versions refused (sha256 or load failed); "
                               "the previous model kept serving", ["version"], registry=r)

    def render(self) -> bytes:
        """Prometheus text exposition format."""
        return generate_latest(self.registry)
