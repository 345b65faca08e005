"""The printed summaries of `bench serve` and `bench compare`, and their JSON files."""
from __future__ import annotations

import json
import math
from pathlib import Path

from .traces import OFF_PATH_STAGES, PATH_STAGES

WIDTH = 56
METRICS = (("ttft_ms", "Time to first token"), ("tpot_ms", "Time per output token (excl. 1st)"),
           ("itl_ms", "Inter-token latency"), ("e2e_ms", "End-to-end latency"))


def _num(value, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _line(label: str, value) -> str:
    return f"{label:<40}{value:>{WIDTH - 40}}"


def _rule(title: str = "") -> str:
    return f" {title} ".center(WIDTH, "-") if title else "=" * WIDTH


def _goodput_line(goodput: dict) -> list[str]:
    if not goodput["slo_ms"]:
        return []
    slo = ", ".join(f"{k}<={v:g}" for k, v in goodput["slo_ms"].items())
    return [_line(f"Goodput (req/s) [{slo} ms]:", _num(goodput["requests_per_s"])),
            _line("Requests meeting the SLOs:", f"{goodput['met']} ({goodput['attainment'] * 100:.1f} %)")]


def _stage_line(stage: str, dist: dict) -> str:
    return f"{stage:<26}{_num(dist['p50'], 3):>10}{_num(dist['p90'], 3):>10}{_num(dist['mean'], 3):>10}"


def format_split(split: dict) -> list[str]:
    """The path's stages (they sum to TTFT), then those that run beside it (the reservation)."""
    stages = split["stages_ms"]
    lines = [_rule(f"TTFT by stage, {split['traced']} traced (ms)"),
             f"{'stage':<26}{'p50':>10}{'p90':>10}{'mean':>10}"]
    lines += [_stage_line(stage, stages[stage]) for stage in PATH_STAGES if stage in stages]
    beside = [stage for stage in OFF_PATH_STAGES if stage in stages]
    if beside:
        lines.append("off the path to the first token (beside the prefill):")
        lines += [_stage_line(stage, stages[stage]) for stage in beside]
    if split["untraced"]:
        lines.append(f"not traced (the scheduler no longer holds them): {len(split['untraced'])}")
    return lines


def format_summary(result: dict) -> str:
    s = result["summary"]
    lines = [_rule(), "pdpipe bench serve".center(WIDTH), _rule(),
             _line("Successful requests:", s["completed"]), _line("Failed requests:", s["failed"]),
             _line("Benchmark duration (s):", _num(s["duration_s"])),
             _line("Total input tokens:", s["total_input_tokens"]),
             _line("Total generated tokens:", s["total_output_tokens"]),
             _line("Request throughput (req/s):", _num(s["request_throughput"])),
             _line("Output token throughput (tok/s):", _num(s["output_throughput"])),
             _line("Total token throughput (tok/s):", _num(s["total_token_throughput"])),
             *_goodput_line(s["goodput"])]
    for key, title in METRICS:
        dist = s[key]
        lines += [_rule(title)] + [_line(f"{name.capitalize()} (ms):", _num(dist[name]))
                                   for name in ("mean", "p50", "p90", "p99")]
    if result.get("ttft_split"):
        lines += format_split(result["ttft_split"])
    if result.get("multi_turn"):
        lines += format_turns(result["multi_turn"])
    errors = sorted({r["error"] for r in result["requests"] if r["error"]})
    lines += [f"error: {e}" for e in errors[:5]] + [_rule()]
    return "\n".join(lines)


def format_turns(report: dict) -> list[str]:
    """The multi-turn figures by turn: TTFT and the share of prompt tokens reused, measured and by the
    oracles (an infinite cache; an LRU of the launch's pools)."""
    lru = bool(report["cache_blocks"])
    lines = [_rule("Multi-turn: by turn"),
             f"{'turn':<6}{'requests':>9}{'ttft p50':>10}{'p90':>9}{'cached':>8}{'infinite':>10}"
             + (f"{'lru':>7}" if lru else "")]
    for number, t in report["turns"].items():
        lines.append(f"{number:<6}{t['requests']:>9}{_num(t['ttft_ms_p50'], 1):>10}{_num(t['ttft_ms_p90'], 1):>9}"
                     f"{t['cached_share'] * 100:>7.1f}%{t['oracle_infinite_share'] * 100:>9.1f}%"
                     + (f"{t['oracle_lru_share'] * 100:>6.1f}%" if lru else ""))
    if "kv_bytes_moved" in report:
        lines.append(_line("KV bytes moved prefill → decode:", report["kv_bytes_moved"]))
        lines.append(_line("KV blocks sent / skipped:", f"{report['kv_blocks_sent']} / {report['kv_blocks_skipped']}"))
    return lines


def format_compare(result: dict) -> str:
    """Per layout and rate: latency percentiles, throughput and SLO attainment; then goodput and
    where the layouts cross."""
    head = f"{'layout':<14}{'rate':>6}{'ttft p50':>10}{'p99':>9}{'tpot p50':>10}{'p99':>8}{'itl p50':>9}" \
           f"{'p99':>8}{'req/s':>8}{'tok/s':>8}{'slo ok':>8}"
    lines = [head]
    for name, layout in result["layouts"].items():
        for p in layout["points"]:
            lines.append(f"{name:<14}{p['rate']:>6g}{_num(p['ttft_ms']['p50'], 1):>10}"
                         f"{_num(p['ttft_ms']['p99'], 1):>9}{_num(p['tpot_ms']['p50'], 1):>10}"
                         f"{_num(p['tpot_ms']['p99'], 1):>8}{_num(p['itl_ms']['p50'], 1):>9}"
                         f"{_num(p['itl_ms']['p99'], 1):>8}{_num(p['request_throughput']):>8}"
                         f"{_num(p['output_throughput'], 1):>8}{p['attainment'] * 100:>7.0f}%")
    target = result["slo_attainment"] * 100
    for name, layout in result["layouts"].items():
        rate = layout["goodput_rate"]
        lines.append(f"goodput {name}: " + (f"{rate:g} req/s" if rate is not None else "none of the swept rates")
                     + f" (>= {target:g} % of requests within the SLOs)")
    for c in result["crossings"]:
        lines.append(f"crossing ({c['metric']}): {c['before']} leads up to {c['between'][0]:g} req/s, "
                     f"{c['after']} from {c['between'][1]:g} req/s")
    if not result["crossings"] and len(result["layouts"]) > 1:
        lines.append("no crossing: one layout leads (or ties) at every swept rate")
    return "\n".join(lines)


def _strict(obj):
    """JSON has no Infinity or NaN: a rate of inf is written as the string "inf"."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return str(obj)
    if isinstance(obj, dict):
        return {k: _strict(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_strict(v) for v in obj]
    return obj


def write_json(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(_strict(obj), indent=1, ensure_ascii=False, allow_nan=False))
