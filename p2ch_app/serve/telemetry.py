"""What an operator watches: Prometheus metrics and one log line per request.

prometheus-client writes the exposition format that every scraper reads, with histograms and
label escaping done right, which hand-written text would have to copy. Each app has a registry of
its own, so two servers in one process (the tests) never mix their counts.
"""

from __future__ import annotations

import logging

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

log = logging.getLogger("nodule_serve")
CONTENT_TYPE = CONTENT_TYPE_LATEST


class Telemetry:
    def __init__(self):
        self.registry = CollectorRegistry()
        self.requests = Counter("nodule_serve_requests", "HTTP requests by route and status",
                                ["route", "status"], registry=self.registry)
        self.latency = Histogram("nodule_serve_request_seconds", "Request latency by route", ["route"],
                                 registry=self.registry,
                                 buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30))
        self.queue_depth = Gauge("nodule_serve_predict_queue_depth", "/predict crops waiting for a pass",
                                 registry=self.registry)
        self.batch_size = Histogram("nodule_serve_batch_size", "Crops per classifier pass", registry=self.registry,
                                    buckets=(1, 2, 4, 8, 16, 32, 64, 128))
        self.jobs = Gauge("nodule_serve_jobs", "/analyze jobs by state", ["state"], registry=self.registry)

    def observe(self, route: str, status: int, seconds: float) -> None:
        self.requests.labels(route, str(status)).inc()
        self.latency.labels(route).observe(seconds)

    def set_jobs(self, counts: dict[str, int]) -> None:
        for state, count in counts.items():
            self.jobs.labels(state).set(count)

    def render(self) -> bytes:
        return generate_latest(self.registry)


def log_request(client: str, method: str, path: str, status: int, seconds: float) -> None:
    """One line per request: who, what, the status and how long it took (never a query string: it
    could carry a token)."""
    log.info('%s "%s %s" %d %.1f ms', client, method, path, status, seconds * 1000)
