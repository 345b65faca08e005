"""Prometheus metrics of the front-end (latencies it sees) and of the pipeline (states, blocks,
transfer, prefix cache), the latter read from the scheduler's snapshot at each scrape: levels as gauges,
and the processes' own running totals as counters (a restarted process starts its totals again, which
Prometheus reads as a counter reset)."""
from __future__ import annotations

import time

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily

_LATENCY = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


class ApiMetrics:
    def __init__(self):
        r = self.registry = CollectorRegistry()
        self.ttft = Histogram("pdpipe_time_to_first_token_seconds", "Time to first token", buckets=_LATENCY,
                              registry=r)
        self.tpot = Histogram("pdpipe_time_per_output_token_seconds", "Mean time per output token after the "
                              "first", buckets=_LATENCY, registry=r)
        self.e2e = Histogram("pdpipe_e2e_request_latency_seconds", "End-to-end request latency",
                             buckets=_LATENCY, registry=r)
        self.requests = Counter("pdpipe_requests", "Requests by finish reason", ["finish_reason"], registry=r)
        self.generated = Counter("pdpipe_generation_tokens", "Tokens generated", registry=r)
        self.prompt = Counter("pdpipe_prompt_tokens", "Prompt tokens processed", registry=r)
        self.refused = Counter("pdpipe_requests_refused_overloaded", "Requests refused with 429 (too many "
                               "waiting for a first token)", registry=r)
        self.state = Gauge("pdpipe_requests_in_state", "Live requests per lifecycle state", ["state"], registry=r)
        self.blocks_used = Gauge("pdpipe_kv_blocks_used", "KV blocks in use", ["instance", "role"], registry=r)
        self.blocks_free = Gauge("pdpipe_kv_blocks_free", "KV blocks free", ["instance", "role"], registry=r)
        self.gpu_memory = Gauge("pdpipe_gpu_memory_used_bytes", "Memory used on the instance's GPU (NVML, all "
                                "processes)", ["instance", "role"], registry=r)
        self.gpu_memory_total = Gauge("pdpipe_gpu_memory_total_bytes", "Memory of the instance's GPU",
                                      ["instance", "role"], registry=r)
        self.gpu_util = Gauge("pdpipe_gpu_utilization_percent", "Share of NVML's last sample period with a "
                              "kernel running on the instance's GPU", ["instance", "role"], registry=r)
        self.cached_blocks = Gauge("pdpipe_prefix_cache_blocks", "KV blocks the prefix cache holds",
                                   ["instance", "role"], registry=r)
        self.totals = SnapshotTotals()
        r.register(self.totals)
        self.xfer_inflight = Gauge("pdpipe_kv_transfers_in_flight", "KV transfers in flight", registry=r)
        self.queued = Gauge("pdpipe_admission_queue_requests", "Requests waiting for decode room", registry=r)
        self.oldest = Gauge("pdpipe_admission_oldest_wait_seconds", "How long the oldest queued request has "
                            "waited", registry=r)
        self.decisions = Gauge("pdpipe_prefill_placements_total", "Prompts computed on a prefill instance "
                               "for a decode instance (remote), on their decode instance (local), or with "
                               "their output on a prefill instance (whole)", ["where"], registry=r)
        self.scheduler_up = Gauge("pdpipe_scheduler_up", "1 if the scheduler answered", registry=r)

    def finished(self, gen, start: float, first_at: float | None) -> None:
        end = time.monotonic()
        out = gen.state.out
        self.e2e.observe(end - start)
        n = len(out.token_ids)
        if first_at is not None and n > 1:
            self.tpot.observe((end - first_at) / (n - 1))
        self.requests.labels(gen.error and "error" or out.finish_reason or "abort").inc()
        self.generated.inc(n)
        self.prompt.inc(len(gen.prompt))

    def render(self, snapshot: dict | None) -> tuple[bytes, str]:
        self.scheduler_up.set(1 if snapshot else 0)
        if snapshot:
            for state, n in snapshot["states"].items():
                self.state.labels(state).set(n)
            for name, inst in snapshot["instances"].items():
                stats = inst["stats"]
                if stats:
                    self.blocks_used.labels(name, inst["role"]).set(stats["num_blocks"] - stats["free_blocks"])
                    self.blocks_free.labels(name, inst["role"]).set(stats["free_blocks"])
                    if stats.get("gpu_utilization", -1) >= 0:
                        self.gpu_memory.labels(name, inst["role"]).set(stats["gpu_memory_used"])
                        self.gpu_memory_total.labels(name, inst["role"]).set(stats["gpu_memory_total"])
                        self.gpu_util.labels(name, inst["role"]).set(stats["gpu_utilization"])
            adm = snapshot.get("admission") or {}
            self.queued.set(adm.get("queued", 0))
            self.oldest.set(adm.get("oldest_wait_s", 0.0))
            for where in ("remote", "local", "whole"):
                self.decisions.labels(where).set(adm.get("prefill_decisions", {}).get(where, 0))
            for name, inst in snapshot["instances"].items():
                if inst["stats"]:
                    self.cached_blocks.labels(name, inst["role"]).set(inst["stats"].get("cached_blocks", 0))
            xfers = (snapshot.get("transfers") or {}).values()  # one transfer process per machine
            self.xfer_inflight.set(sum(x.get("transfers_in_flight", 0) for x in xfers))
        self.totals.snapshot = snapshot
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


class SnapshotTotals:
    """The processes' running totals in the latest snapshot, as counters."""

    def __init__(self) -> None:
        self.snapshot: dict | None = None

    def collect(self) -> list[CounterMetricFamily]:
        snap = self.snapshot or {}
        queries = CounterMetricFamily("pdpipe_prefix_cache_queries_tokens", "Prompt tokens looked up in the "
                                      "prefix cache", labels=["instance", "tier"])
        hits = CounterMetricFamily("pdpipe_prefix_cache_hits_tokens", "Prompt tokens found in the prefix cache "
                                   "(their KV reused, not computed), by the tier they were found in",
                                   labels=["instance", "tier"])
        tier = CounterMetricFamily("pdpipe_host_tier_bytes", "KV copied to the host tier (out) and back (in)",
                                   labels=["instance", "direction"])
        for name, inst in (snap.get("instances") or {}).items():
            stats = inst["stats"]
            if stats and inst["role"] in ("prefill", "decode", "mixed"):
                queries.add_metric([name, "gpu"], stats.get("prefix_query_tokens", 0))
                host, remote = stats.get("prefix_hit_tokens_host", 0), stats.get("prefix_hit_tokens_remote", 0)
                hits.add_metric([name, "gpu"], stats.get("prefix_hit_tokens", 0) - host - remote)
                hits.add_metric([name, "cpu"], host)
                hits.add_metric([name, "remote"], remote)
                tier.add_metric([name, "out"], stats.get("host_bytes_out", 0))
                tier.add_metric([name, "in"], stats.get("host_bytes_in", 0))
        xfers = (snap.get("transfers") or {}).values()  # one transfer process per machine
        moved = CounterMetricFamily("pdpipe_kv_transfer_bytes", "KV bytes moved prefill to decode")
        moved.add_metric([], sum(x.get("bytes_moved", 0) for x in xfers))
        seconds = CounterMetricFamily("pdpipe_kv_transfer_seconds", "Seconds spent moving KV")
        seconds.add_metric([], sum(x.get("seconds_moving", 0.0) for x in xfers))
        blocks = CounterMetricFamily("pdpipe_kv_transfer_blocks", "Prompt KV blocks moved prefill to decode (sent), "
                                     "not moved because decode's prefix cache held them (skipped), or copied from "
                                     "decode's cache to prefill instead of computed (pulled)", labels=["kind"])
        blocks.add_metric(["sent"], sum(x.get("blocks_sent", 0) for x in xfers))
        blocks.add_metric(["skipped"], sum(x.get("blocks_skipped", 0) for x in xfers))
        blocks.add_metric(["pulled"], sum(x.get("blocks_pulled", 0) for x in xfers))
        return [queries, hits, tier, moved, seconds, blocks]
