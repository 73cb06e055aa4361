"""Prometheus metrics of the server (`GET /metrics`), in a registry of their own."""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class ServeMetrics:
    """Requests by status, queue length, active slots, tokens generated, prefix-cache hits and
    misses, time to first token and inter-token latency (seconds)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("griffinlm_requests", "Finished HTTP generation requests by status code",
                                ["status"], registry=r)
        self.queue = Gauge("griffinlm_queue_length", "Requests waiting for a slot", registry=r)
        self.active = Gauge("griffinlm_active_slots", "Slots holding a request", registry=r)
        self.tokens = Counter("griffinlm_generated_tokens", "Tokens generated", registry=r)
        self.ttft = Histogram("griffinlm_time_to_first_token_seconds", "Arrival to first token",
                              buckets=LATENCY_BUCKETS, registry=r)
        self.prefix_lookups = Counter("griffinlm_prefix_cache_lookups", "Prompt prefix-state lookups by result",
                                      ["result"], registry=r)
        self.itl = Histogram("griffinlm_inter_token_latency_seconds", "Time between a request's tokens",
                             buckets=LATENCY_BUCKETS, registry=r)

    def token(self, seconds: float, first: bool) -> None:
        self.tokens.inc()
        (self.ttft if first else self.itl).observe(seconds)

    def prefix(self, hit: bool) -> None:
        self.prefix_lookups.labels("hit" if hit else "miss").inc()

    def gauges(self, queued: int, active: int) -> None:
        self.queue.set(queued)
        self.active.set(active)

    def render(self) -> bytes:
        return generate_latest(self.registry)
