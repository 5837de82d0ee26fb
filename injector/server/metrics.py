"""Prometheus metrics of the webhook (the CA's live in injector.ca.service)."""

from __future__ import annotations

import os

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector

ADMISSIONS = Counter(
    "injector_admission_requests",
    "AdmissionReviews answered, by result (injected, skipped, denied, ignored, rejected)"
    " and reason",
    ["result", "reason"],
)
INJECTION_SECONDS = Histogram(
    "injector_injection_duration_seconds",
    "Time to decide and build the answer to one AdmissionReview, parsing included",
    buckets=(0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5, 1.0),
)
CONNECTIONS_REFUSED = Counter(
    "injector_connections_refused",
    "Connections refused or cut by a limit (SECURITY.md), by reason",
    ["reason"],
)
CONNECTIONS_OPEN = Gauge(
    "injector_connections_open",
    "Client connections open, TLS handshakes included",
    multiprocess_mode="livesum",
)


def exposition() -> bytes:
    """The text for /metrics: this process's metrics, or with `serve --workers N` (Prometheus
    multiprocess mode) the sum over every worker, whichever worker answers."""
    if not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        return generate_latest()
    registry = CollectorRegistry()
    MultiProcessCollector(registry)
    return generate_latest(registry)
