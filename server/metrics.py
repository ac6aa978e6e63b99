"""Prometheus metrics in a per-app registry, and the ASGI middleware that counts HTTP requests."""

from __future__ import annotations

import time
from typing import Any, Awaitable, Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

ENDPOINTS = frozenset(
    {"/v1/calculate", "/v1/stream", "/v1/models", "/health/live", "/health/ready", "/metrics", "/docs", "/openapi.json"}
)
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class Metrics:
    """Request counts, errors and latencies per endpoint; queue wait, compute time and batch sizes per model."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        labels = ["endpoint", "status"]
        self.requests = Counter("mlip_requests", "Requests (WebSocket: messages) by endpoint and status", labels, registry=self.registry)
        self.errors = Counter("mlip_errors", "Answers with status >= 400 by endpoint and status", labels, registry=self.registry)
        self.latency = Histogram(
            "mlip_request_seconds", "Time to answer, s", ["endpoint"], buckets=LATENCY_BUCKETS, registry=self.registry
        )
        self.queue_wait = Histogram(
            "mlip_queue_wait_seconds", "Time a structure waited for the worker, s", ["model"],
            buckets=LATENCY_BUCKETS, registry=self.registry,
        )
        self.compute = Histogram(
            "mlip_compute_seconds", "Time of one batched forward pass, s", ["model"],
            buckets=LATENCY_BUCKETS, registry=self.registry,
        )
        self.batch_structures = Histogram(
            "mlip_batch_structures", "Structures per batch", ["model"],
            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024), registry=self.registry,
        )
        self.batch_atoms = Histogram(
            "mlip_batch_atoms", "Atoms per batch", ["model"],
            buckets=(16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 16384, 65536), registry=self.registry,
        )
        self.queue_depth = Gauge("mlip_queue_structures", "Structures waiting", ["model"], registry=self.registry)
        self.worker_failures = Counter(
            "mlip_worker_failures", "Structures the worker failed to evaluate (device faults, bugs: 500)", ["model"],
            registry=self.registry,
        )

        # labelled children looked up once per label set (``labels()`` takes a lock and builds a key every call)
        self._by_answer: dict[tuple[str, int], tuple[Any, Any, Any]] = {}
        self._by_model: dict[str, tuple[Any, Any, Any, Any]] = {}

    def observe_request(self, endpoint: str, status: int, seconds: float) -> None:
        """Count one answer (endpoint label limited to known routes)."""
        endpoint = endpoint if endpoint in ENDPOINTS else "other"
        children = self._by_answer.get((endpoint, status))
        if children is None:
            errors = self.errors.labels(endpoint, str(status)) if status >= 400 else None
            requests = self.requests.labels(endpoint, str(status))
            children = self._by_answer[endpoint, status] = (requests, errors, self.latency.labels(endpoint))
        requests, errors, latency = children
        requests.inc()
        if errors is not None:
            errors.inc()
        latency.observe(seconds)

    def observe_batch(self, model: str, structures: int, atoms: int, waits: list[float], seconds: float) -> None:
        """Record one batch: its size, each member's queue wait and the forward-pass time."""
        children = self._by_model.get(model)
        if children is None:
            children = self._by_model[model] = tuple(
                metric.labels(model) for metric in (self.batch_structures, self.batch_atoms, self.queue_wait, self.compute)
            )
        batch_structures, batch_atoms, queue_wait, compute = children
        batch_structures.observe(structures)
        batch_atoms.observe(atoms)
        for wait in waits:
            queue_wait.observe(wait)
        compute.observe(seconds)

    def render(self) -> bytes:
        """Prometheus text exposition of this app's registry."""
        return generate_latest(self.registry)


ASGIApp = Callable[[dict, Callable, Callable], Awaitable[None]]


class MetricsMiddleware:
    """Counts every HTTP answer by path and status (WebSocket messages are counted by the stream handler)."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start, status = time.perf_counter(), 500

        async def send_and_record(message: dict[str, Any]) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_record)
        finally:
            self.metrics.observe_request(scope["path"], status, time.perf_counter() - start)
