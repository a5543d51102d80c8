"""Prometheus metrics of one server, in its own registry (so several apps can live in one process)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from rag_model.retriever import SwapResult

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class ServerMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            "ragindex_requests", "HTTP requests by route and status code", ["route", "status"], registry=r
        )
        self.latency = Histogram(
            "ragindex_request_seconds", "HTTP request latency by route", ["route"], buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.swaps = Counter("ragindex_index_swaps", "Index versions swapped in", registry=r)
        self.swap_failures = Counter(
            "ragindex_index_swap_failures", "Index versions refused or failed to load", registry=r
        )
        self.verification_failures = Counter(
            "ragindex_index_verification_failures",
            "Index versions refused because a file did not match its manifest sha256 (altered, truncated, missing)",
            registry=r,
        )
        self.swap_seconds = Histogram(
            "ragindex_index_swap_seconds", "Time to load, check and warm up a version", registry=r,
            buckets=(0.01, 0.05, 0.1, 0.5, 1, 5, 10, 30, 60, 300),
        )
        self.serving = Gauge(
            "ragindex_serving_version", "1 for the index version being served", ["version"], registry=r
        )
        self.ready = Gauge("ragindex_ready", "1 when an index version is loaded", registry=r)
        self.batch_size = Histogram(
            "ragindex_search_batch_size", "Questions answered per batched index search", registry=r,
            buckets=(1, 2, 4, 8, 16, 32, 64),
        )

    def on_swap(self, result: SwapResult) -> None:
        if not result.ok:
            self.swap_failures.inc()
            if result.error_kind == "Corrupt":
                self.verification_failures.inc()
            return
        if not result.changed:
            return
        self.swaps.inc()
        self.swap_seconds.observe(result.seconds)
        self.serving.clear()
        self.serving.labels(version=result.version).set(1)
        self.ready.set(1)

    def render(self) -> bytes:
        return generate_latest(self.registry)
