"""Prometheus metrics of the ingress (served at the app's ``GET /metrics``).

Kept apart from :mod:`dsi_worker.app` so it imports without Ray: the chart's Grafana
dashboard is checked against these names by a unit test that runs without the worker extras.
"""

from __future__ import annotations

from functools import partial

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram


class Metrics:
    """Prometheus metrics of one ingress replica (own registry: no clashes on re-init)."""

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.requests = Counter("dsi_requests", "HTTP requests", ["endpoint", "status"], registry=r)
        self.prompt_tokens = Counter("dsi_prompt_tokens", "Prompt tokens", registry=r)
        self.generated_tokens = Counter(
            "dsi_generated_tokens", "Generated (completion) tokens", registry=r
        )
        self.latency = Histogram(
            "dsi_request_latency_seconds",
            "End-to-end latency of generation requests",
            ["endpoint"],
            buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120),
            registry=r,
        )
        self.batch_size = Histogram(
            "dsi_batch_size",
            "Size of the batch each request ran in",
            buckets=(1, 2, 4, 8, 16, 32, 64, 128),
            registry=r,
        )
        self.group_restarts = Counter(
            "dsi_group_restarts", "Times a group re-formed (new epoch seen)", ["group"], registry=r
        )
        self.groups_ready = Gauge("dsi_groups_ready", "Groups currently ready", registry=r)
        self.groups_total = Gauge("dsi_groups", "Groups configured", registry=r)
        self.inflight = Gauge(
            "dsi_inflight_requests",
            "Requests sent to a group and not answered yet (streams: until their last token)",
            ["group"],
            registry=r,
        )

    def track_inflight(self, inflight: dict[int, int]) -> None:
        """Publish ``inflight`` (group -> requests in flight), read at scrape time: the ingress
        changes the counts in several places and none of them has to remember the gauge."""
        for g in inflight:
            self.inflight.labels(group=str(g)).set_function(partial(inflight.__getitem__, g))
