"""Prometheus metrics of one app."""

from __future__ import annotations

from collections.abc import Mapping

from clipdistill.serve.app.limits import LATENCY_BUCKETS
from clipdistill.serve.app.served_index import ServedIndex


class Metrics:
    """Prometheus metrics in an app-private registry (several apps in one process stay apart)."""

    def __init__(self, indexes: Mapping[str, ServedIndex]) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter(
            "clipdistill_http_requests",
            "HTTP requests by route and status.",
            ["method", "route", "status"],
            registry=self.registry,
        )
        self.request_seconds = Histogram(
            "clipdistill_http_request_seconds",
            "HTTP request latency by route.",
            ["route"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.stage_seconds = Histogram(
            "clipdistill_search_stage_seconds",
            "POST /search latency per stage (encode, search, total) and query kind.",
            ["stage", "query", "index"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.searches = Counter(
            "clipdistill_searches",
            "Successful searches by index, query kind and target.",
            ["index", "query", "target"],
            registry=self.registry,
        )
        items = Gauge("clipdistill_index_items", "Vectors in each served index.", ["index"], registry=self.registry)
        for name, served in indexes.items():
            items.labels(index=name).set(served.count)

    def render(self) -> bytes:
        from prometheus_client import generate_latest

        return generate_latest(self.registry)
