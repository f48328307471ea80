"""Prometheus metrics of the server: the engine's counters and gauges, request latencies."""

from __future__ import annotations

from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from herd.serve import engine as eng


class _EngineCollector:
    """Engine counters and gauges, read at scrape time."""

    def __init__(self, engine: eng.Engine):
        self.engine = engine

    def collect(self):
        e, stats = self.engine, self.engine.stats
        counters = {
            "herd_prompt_tokens": ("Prompt tokens submitted.", stats.prompt_tokens),
            "herd_generation_tokens": ("Tokens generated.", stats.generated_tokens),
            "herd_prefix_cached_tokens": (
                "Prompt tokens served from the prefix cache.",
                stats.cached_prompt_tokens,
            ),
            "herd_preemptions": ("Sequences preempted for KV cache space.", stats.preemptions),
            "herd_forward_passes": ("Model forward passes.", stats.steps),
            "herd_batched_sequences": (
                "Sequences summed over forward passes (/ passes = mean batch size).",
                stats.batched_sequences,
            ),
            "herd_draft_tokens": ("Tokens drafted by prompt lookup.", e.speculation.drafted),
            "herd_accepted_draft_tokens": (
                "Drafted tokens the model kept.",
                e.speculation.accepted,
            ),
        }
        for name, (doc, value) in counters.items():
            yield CounterMetricFamily(name, doc, value=value)
        queried = stats.prefix_blocks_queried
        hit_rate = stats.prefix_blocks_hit / queried if queried else 0.0
        gauges = {
            "herd_queue_depth": ("Sequences waiting to start.", e.queue_depth),
            "herd_running_sequences": ("Sequences in the running batch.", e.num_running),
            "herd_batch_size": ("Sequences in the latest forward pass.", stats.last_batch),
            "herd_kv_blocks_free": ("Free KV cache blocks.", e.free_blocks),
            "herd_kv_blocks_total": ("KV cache blocks.", e.total_blocks),
            "herd_prefix_cache_hit_rate": ("Prefix-cache block hits / lookups.", hit_rate),
        }
        for name, (doc, value) in gauges.items():
            yield GaugeMetricFamily(name, doc, value=value)


@dataclass
class Metrics:
    """The server's Prometheus registry: engine state at scrape time, request latencies."""

    registry: CollectorRegistry
    requests: Counter
    ttft: Histogram
    itl: Histogram
    latency: Histogram

    @classmethod
    def create(cls, engine: eng.Engine) -> Metrics:
        registry = CollectorRegistry()
        registry.register(_EngineCollector(engine))
        buckets = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
        return cls(
            registry,
            Counter("herd_requests", "HTTP requests.", ["endpoint", "status"], registry=registry),
            Histogram(
                "herd_time_to_first_token_seconds",
                "Arrival to first token.",
                registry=registry,
                buckets=buckets,
            ),
            Histogram(
                "herd_inter_token_latency_seconds",
                "Time between tokens of a choice.",
                registry=registry,
                buckets=buckets,
            ),
            Histogram(
                "herd_request_latency_seconds",
                "Arrival to last token.",
                registry=registry,
                buckets=buckets,
            ),
        )
