"""Prometheus metrics of the operator (served by ``--metrics-port``)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram, start_http_server

from dsi_operator.api.spec import Phase

#: Every phase, in lifecycle order (the values of the phase gauge's label).
PHASES = tuple(Phase)

RESTARTS = Counter(
    "dsi_operator_group_restarts_total",
    "Whole-group restarts started, by trigger.",
    ["namespace", "name", "trigger"],
)
REFORMS = Counter(
    "dsi_operator_group_reforms_total",
    "In-place group re-forms seen (a rank process lost while its pod ran on).",
    ["namespace", "name"],
)
RECONCILES = Counter(
    "dsi_operator_reconciles_total",
    "Reconcile passes, by what caused them and their outcome.",
    ["cause", "outcome"],
)
RECONCILE_SECONDS = Histogram(
    "dsi_operator_reconcile_seconds",
    "Duration of reconcile passes that did I/O.",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
STATUS_WRITES = Counter(
    "dsi_operator_status_writes_total", "Status patches written (only when status changed)."
)
API_REQUESTS = Counter(
    "dsi_operator_api_requests_total",
    "API requests made by the operator's own client (kopf's watches not included).",
    ["verb", "resource"],
)
API_ERRORS = Counter(
    "dsi_operator_api_errors_total",
    "API requests of the operator's own client that failed, by HTTP status code "
    '(code "none": no HTTP answer, e.g. connection refused or timed out).',
    ["verb", "resource", "code"],
)
PHASE = Gauge(
    "dsi_operator_resource_phase",
    "1 for the current phase of each DeepSpeedInference, 0 for the others.",
    ["namespace", "name", "phase"],
)
READY_GROUPS = Gauge(
    "dsi_operator_ready_groups", "Ready groups per resource.", ["namespace", "name"]
)


def set_phase(namespace: str, name: str, phase: str | None, ready: int | None) -> None:
    """Publish a resource's phase (one-hot) and ready groups."""
    for p in PHASES:
        PHASE.labels(namespace=namespace, name=name, phase=p).set(1 if p == phase else 0)
    READY_GROUPS.labels(namespace=namespace, name=name).set(ready or 0)


def forget(namespace: str, name: str) -> None:
    """Drop the series of a deleted resource."""
    for p in PHASES:
        try:
            PHASE.remove(namespace, name, p)
        except KeyError:
            pass
    try:
        READY_GROUPS.remove(namespace, name)
    except KeyError:
        pass


def serve(port: int) -> None:
    """Start the metrics HTTP server on ``port`` (0 disables)."""
    if port:
        start_http_server(port)
