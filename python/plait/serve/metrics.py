"""Prometheus metrics of the server (prometheus-client, one registry per app)."""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class Metrics:
    """requests by outcome, time to first token, time per output token, and per replica: running,
    waiting, KV-cache blocks in use (fraction), prompt tokens read from the prefix cache, preemptions,
    and whether it is up."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("plait_requests", "Requests by endpoint and outcome", ["endpoint", "outcome"],
                                registry=r)
        self.ttft = Histogram("plait_time_to_first_token_seconds", "Time from arrival to the first token",
                              buckets=LATENCY_BUCKETS, registry=r)
        self.tpot = Histogram("plait_time_per_output_token_seconds", "Time per output token after the first",
                              buckets=LATENCY_BUCKETS, registry=r)
        self.running = Gauge("plait_running_requests", "Requests in the running batch", ["replica"], registry=r)
        self.waiting = Gauge("plait_waiting_requests", "Requests waiting for room in the batch and the KV cache", ["replica"],
                             registry=r)
        self.kv_used = Gauge("plait_kv_cache_usage", "Fraction of KV-cache blocks in use", ["replica"], registry=r)
        self.cache_hits = Gauge("plait_prefix_cache_hit_tokens", "Prompt tokens read from the prefix cache",
                                ["replica"], registry=r)
        self.preemptions = Gauge("plait_preemptions", "Requests sent back to the queue for KV-cache room",
                                 ["replica"], registry=r)
        self.replica_up = Gauge("plait_replica_up", "1 when the replica serves, else 0", ["replica"], registry=r)

    def describe(self, info: dict) -> None:
        """``plait_served_info{dtype, device}`` 1: how the model is served."""
        if info:
            Gauge("plait_served_info", "How the model is served", ["dtype", "device"],
                  registry=self.registry).labels(str(info.get("dtype")), str(info.get("device"))).set(1)

    def replica_stats(self, replica: int, stats: dict) -> None:
        label = str(replica)
        self.running.labels(label).set(stats["running"])
        self.waiting.labels(label).set(stats["waiting"])
        self.kv_used.labels(label).set(stats["kv_used"])
        self.cache_hits.labels(label).set(stats.get("cache_hits", 0))      # a replica on another host may not say
        self.preemptions.labels(label).set(stats.get("preemptions", 0))

    def render(self) -> bytes:
        return generate_latest(self.registry)
