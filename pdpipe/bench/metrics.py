"""Per-request latencies and their aggregates. Times are seconds inside, milliseconds in reports.

- TTFT: send → the first chunk that carries a token.
- ITL: gaps between token arrivals, over the tokens each chunk is known to carry: k for a chunk with
  k token ids, 1 for a chunk with text only (a server that ignores return_token_ids). A chunk of k
  tokens splits the gap since the previous chunk evenly over them (the first chunk's extra tokens
  arrived with the first token: gaps of 0). So a request's ITLs sum to last token − first token.
  With token ids there are n − 1 of them; without, one per chunk after the first (vLLM's benchmark
  counts the same way), even where usage later says the chunks held more tokens.
- TPOT: (e2e − TTFT) / (output tokens − 1), the tokens being the ids counted or, without ids, the
  usage's total; undefined for a single token. Without ids a chunk that held several tokens (or a
  token with no text) makes the mean ITL exceed TPOT: ITL is per chunk there, TPOT per token.
- E2E: send → the end of the stream.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .client import RequestResult

QUANTILES = (50, 90, 99)


@dataclass(frozen=True)
class Latencies:
    ttft: float
    tpot: float | None
    e2e: float
    itls: list[float]


def inter_token_latencies(chunks: list[tuple[float, int]]) -> list[float]:
    if not chunks:
        return []
    itls = [0.0] * (chunks[0][1] - 1)
    for (before, _), (when, tokens) in zip(chunks, chunks[1:]):
        itls += [(when - before) / tokens] * tokens
    return itls


def latencies(result: RequestResult) -> Latencies:
    ttft = result.chunks[0][0]
    n = result.output_tokens
    tpot = (result.e2e - ttft) / (n - 1) if n > 1 else None
    return Latencies(ttft, tpot, result.e2e, inter_token_latencies(result.chunks))


def percentile(values, q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default); NaN when there are no values."""
    return float(np.percentile(values, q)) if len(values) else math.nan


def distribution_ms(values: list[float]) -> dict[str, float | None]:
    """mean, p50, p90, p99 in ms; None throughout when there are no values (JSON has no NaN)."""
    if not values:
        return {"mean": None, **{f"p{q}": None for q in QUANTILES}}
    ms = [v * 1e3 for v in values]
    out: dict[str, float | None] = {"mean": float(np.mean(ms))}
    out.update({f"p{q}": percentile(ms, q) for q in QUANTILES})
    return out


def meets_slos(lat: Latencies, slos_ms: dict[str, float]) -> bool:
    """Every given SLO holds; a single-token reply has no TPOT and so cannot miss one."""
    values = {"ttft": lat.ttft, "tpot": lat.tpot, "e2e": lat.e2e}
    return all((value := values[name]) is None or value * 1e3 <= limit for name, limit in slos_ms.items())


def summarize(results: list[RequestResult], duration: float, slos_ms: dict[str, float]) -> dict:
    """The aggregates over a run: counts, throughputs, latency distributions and goodput."""
    done = [r for r in results if r.ok]
    lats = [latencies(r) for r in done]
    input_tokens = sum(r.prompt_tokens or 0 for r in done)
    output_tokens = sum(r.output_tokens for r in done)
    met = sum(meets_slos(lat, slos_ms) for lat in lats)
    return {
        "duration_s": duration,
        "num_prompts": len(results),
        "completed": len(done),
        "failed": len(results) - len(done),
        "total_input_tokens": input_tokens,
        "total_output_tokens": output_tokens,
        "request_throughput": len(done) / duration,
        "output_throughput": output_tokens / duration,
        "total_token_throughput": (input_tokens + output_tokens) / duration,
        "ttft_ms": distribution_ms([lat.ttft for lat in lats]),
        "tpot_ms": distribution_ms([lat.tpot for lat in lats if lat.tpot is not None]),
        "itl_ms": distribution_ms([x for lat in lats for x in lat.itls]),
        "e2e_ms": distribution_ms([lat.e2e for lat in lats]),
        # failed requests miss every SLO: attainment is over all requests sent
        "goodput": {"slo_ms": dict(slos_ms), "met": met, "requests_per_s": met / duration,
                    "attainment": met / len(results) if results else None},
    }


def request_record(result: RequestResult, slos_ms: dict[str, float]) -> dict:
    """One request in the JSON result."""
    record = {"index": result.index, "request_id": result.request_id, "ok": result.ok,
              "status": result.status, "error": result.error, "prompt_tokens": result.prompt_tokens,
              "max_tokens": result.max_tokens, "output_tokens": result.output_tokens,
              "cached_tokens": result.cached_tokens, "sent_at": result.sent_at, "e2e_ms": result.e2e * 1e3}
    if result.ok:
        lat = latencies(result)
        record.update(ttft_ms=lat.ttft * 1e3, tpot_ms=None if lat.tpot is None else lat.tpot * 1e3,
                      itl_ms=[x * 1e3 for x in lat.itls], meets_slo=meets_slos(lat, slos_ms))
    return record
