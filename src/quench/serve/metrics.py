"""Prometheus metrics, one registry per app (several apps can live in one process)."""

from __future__ import annotations

import json
import sys
import time
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

__all__ = ["CONTENT_TYPE_LATEST", "Metrics"]


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "quench_requests",
            "Requests by endpoint and status (gRPC: method GRPC, status the code's name).",
            ["endpoint", "method", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "quench_request_duration_seconds",
            "Request latency (HTTP and gRPC).",
            ["endpoint"],
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
            registry=self.registry,
        )
        self.batch_size = Histogram(
            "quench_batch_size",
            "Images per engine call.",
            ["model"],
            buckets=(1, 2, 4, 8, 16, 32, 64, 128),
            registry=self.registry,
        )
        self.queue_depth = Gauge(
            "quench_queue_depth",
            "Requests waiting for the engine.",
            ["model"],
            registry=self.registry,
        )
        self.inference = Histogram(
            "quench_inference_duration_seconds",
            "Engine time per batch.",
            ["model"],
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
            registry=self.registry,
        )

    def render(self) -> bytes:
        return generate_latest(self.registry)

    def answered(
        self,
        endpoint: str,
        method: str,
        status: int | str,
        elapsed: float,
        log: dict[str, Any] | None = None,
    ) -> None:
        """Count one answered request; ``log``: also write its JSON access-log line to stderr
        (fields ``path``, ``model`` and ``batch`` come from it)."""
        self.requests.labels(endpoint, method, str(status)).inc()
        self.latency.labels(endpoint).observe(elapsed)
        if log is not None:
            line = {
                "ts": round(time.time(), 3),
                "method": method,
                "path": log.get("path"),
                "status": status,
                "ms": round(elapsed * 1000, 2),
                "model": log.get("model"),
                "batch": log.get("batch"),
            }
            sys.stderr.write(json.dumps(line) + "\n")
