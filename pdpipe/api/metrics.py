"""Prometheus metrics of the front-end (latencies it sees) and of the pipeline (states, blocks,
transfer), the latter read from the scheduler's snapshot at each scrape."""
from __future__ import annotations

import time

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

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
        self.xfer_bytes = Gauge("pdpipe_kv_transfer_bytes_total", "KV bytes moved prefill to decode", registry=r)
        self.xfer_seconds = Gauge("pdpipe_kv_transfer_seconds_total", "Seconds spent moving KV", registry=r)
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
            xfers = (snapshot.get("transfers") or {}).values()  # one transfer process per machine
            self.xfer_bytes.set(sum(x.get("bytes_moved", 0) for x in xfers))
            self.xfer_seconds.set(sum(x.get("seconds_moving", 0.0) for x in xfers))
            self.xfer_inflight.set(sum(x.get("transfers_in_flight", 0) for x in xfers))
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
