"""Prometheus metrics of the server: outcomes, latencies, and the scheduler's state at scrape."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class _SchedulerCollector:
    def __init__(self, stats, num_waiting) -> None:
        self._stats = stats
        self._num_waiting = num_waiting

    def collect(self):
        s = self._stats()
        yield GaugeMetricFamily(
            "tessera_num_requests_running", "Requests in the running batch", value=s.num_running
        )
        yield GaugeMetricFamily(
            "tessera_num_requests_waiting",
            "Requests admitted and waiting to run (the queue --max-waiting-requests bounds)",
            value=self._num_waiting(),
        )
        yield GaugeMetricFamily(
            "tessera_kv_cache_usage_ratio", "Share of KV blocks held by requests", value=s.kv_cache_usage
        )
        yield GaugeMetricFamily(
            "tessera_prefix_cache_hit_rate",
            "Prompt tokens found in the prefix cache / looked up",
            value=s.prefix_cache_hit_rate,
        )
        yield CounterMetricFamily(
            "tessera_prefix_cache_queries",
            "Prompt tokens looked up in the prefix cache",
            value=s.prefix_cache_queries,
        )
        yield CounterMetricFamily(
            "tessera_prefix_cache_hits", "Prompt tokens found in the prefix cache", value=s.prefix_cache_hits
        )
        yield CounterMetricFamily(
            "tessera_num_preemptions", "Requests preempted since start", value=s.num_preemptions
        )
        yield CounterMetricFamily(
            "tessera_prompt_tokens_computed",
            "Prompt tokens run through the model (not prefix-cache hits, not prompts whose K/V was pulled "
            "from a disaggregated producer)",
            value=s.prompt_tokens_computed,
        )
        yield from _spec_decode_metrics(s)


def _spec_decode_metrics(s):
    """Speculative decoding since start (zero without it)."""
    yield CounterMetricFamily(
        "tessera_spec_decode_num_drafts", "Speculative drafts verified (one per request and step)",
        value=s.spec_num_drafts,
    )  # fmt: skip
    yield CounterMetricFamily(
        "tessera_spec_decode_num_draft_tokens", "Draft tokens verified", value=s.spec_num_draft_tokens
    )
    yield CounterMetricFamily(
        "tessera_spec_decode_num_accepted_tokens", "Draft tokens accepted", value=s.spec_num_accepted_tokens
    )
    yield GaugeMetricFamily(
        "tessera_spec_decode_acceptance_rate",
        "Accepted / verified draft tokens",
        value=s.spec_acceptance_rate,
    )
    yield GaugeMetricFamily(
        "tessera_spec_decode_mean_accepted_length",
        "Tokens per verification: accepted draft tokens and the one sampled after them",
        value=s.spec_mean_accepted_length,
    )
    yield GaugeMetricFamily(
        "tessera_spec_decode_step_share",
        "Share of engine steps that verified a draft",
        value=s.spec_step_share,
    )


class _EncoderCollector:
    """A vision-language model's encoder: inputs encoded, and those its cache answered."""

    def __init__(self, encoders) -> None:
        self._encoders = encoders

    def collect(self):
        e = self._encoders
        yield CounterMetricFamily(
            "tessera_encoder_runs", "Images run through the vision encoder", value=e.encoder_runs
        )
        yield CounterMetricFamily(
            "tessera_encoder_cache_hits", "Images whose encoder output came from the encoder cache",
            value=e.encoder_cache_hits,
        )  # fmt: skip


class _KVTransferCollector:
    """Disaggregated prefill/decode: blocks moved, failed pulls, holds."""

    def __init__(self, connector, stats) -> None:
        self._connector = connector
        self._stats = stats

    def collect(self):
        t = self._connector.stats
        s = self._stats()
        yield CounterMetricFamily(
            "tessera_kv_transfer_blocks_sent", "KV blocks a producer sent to consumers", value=t.blocks_sent
        )
        yield CounterMetricFamily(
            "tessera_kv_transfer_bytes_sent", "Bytes of KV blocks a producer sent", value=t.bytes_sent
        )
        yield CounterMetricFamily(
            "tessera_kv_transfer_blocks_received",
            "KV blocks a consumer pulled (prompt blocks its prefix cache lacked)",
            value=t.blocks_received,
        )
        yield CounterMetricFamily(
            "tessera_kv_transfer_bytes_received",
            "Bytes of KV blocks a consumer pulled",
            value=t.bytes_received,
        )
        yield CounterMetricFamily(
            "tessera_kv_transfer_pulls_failed",
            "Consumer requests ended because their producer vanished, stalled or refused",
            value=t.pulls_failed,
        )
        yield CounterMetricFamily(
            "tessera_kv_transfer_holds_expired",
            "Producer prompts whose blocks no consumer pulled within kv_hold_timeout",
            value=t.holds_expired,
        )
        yield GaugeMetricFamily(
            "tessera_kv_transfer_holds",
            "Producer prompts whose blocks wait for a consumer",
            value=s.num_kv_held,
        )
        yield GaugeMetricFamily(
            "tessera_num_requests_waiting_for_remote_kvs",
            "Consumer requests whose prompt's K/V is on its way",
            value=s.num_waiting_for_remote_kvs,
        )


class Metrics:
    def __init__(self, stats, num_waiting, encoders=None, kv_connector=None) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "tessera_requests", "Finished requests by outcome", ["finish_reason"], registry=self.registry
        )
        self.ttft = Histogram(
            "tessera_time_to_first_token_seconds",
            "Time to first token",
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.itl = Histogram(
            "tessera_inter_token_latency_seconds",
            "Time between output tokens",
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.rejected = Counter(
            "tessera_rejected_requests",
            "Requests refused or failed, by HTTP status (503: queue full or draining; 499: client left)",
            ["status"],
            registry=self.registry,
        )
        self.registry.register(_SchedulerCollector(stats, num_waiting))
        if encoders is not None:
            self.registry.register(_EncoderCollector(encoders))
        if kv_connector is not None:
            self.registry.register(_KVTransferCollector(kv_connector, stats))

    def on_finish(self, out, track) -> None:
        self.requests.labels(out.finish_reason or "unknown").inc()
        if track.first_token is not None:
            self.ttft.observe(track.first_token - track.arrival)
        for gap in track.itl:
            self.itl.observe(gap)
