"""Prefix caching under multi-turn sessions, cache on against cache off on the same launch config.

Sessions of `--turns` turns over shared ~1k-token system prompts (`--dataset multi-turn`: each turn the
previous prompt, its reply's token ids and new tokens) run against the launch with
`engine.cache.prefix_caching` on, then off (each launch fresh, so each starts cold). Judged against:

  - every turn >= 2 reuses >= 90 % of the previous turn's prompt and reply (whole blocks: the reply's last
    token is sampled, never computed);
  - the first turn of a session after the first of its group reuses the shared system prompt;
  - time to first token of turns >= 2 (median) <= 0.5x the same turns with the cache off;
  - KV blocks moved prefill -> decode, and where the turns were computed, against cache off.

    python benchmarks/prefix_cache.py [--config launch/single.toml] [--sessions 8] [--turns 4]
        [--system 1000] [--user 40:80] [--reply 24:48] [--rate 1] [--result-file OUT.json]
"""
from __future__ import annotations

import argparse
import json
import statistics
from dataclasses import replace
from datetime import date
from pathlib import Path

from pdpipe.bench.config import LoadConfig, ServeConfig, WorkloadConfig
from pdpipe.bench.serve import api_base_url, run_serve
from pdpipe.config import load_launch_config
from pdpipe.inspect import control
from pdpipe.launcher import Launcher

CONFIG = Path(__file__).parent.parent / "launch" / "single.toml"


def run_layout(args, caching: bool) -> dict:
    cfg = load_launch_config(args.config)
    cfg = replace(cfg, name=f"prefix-cache-{'on' if caching else 'off'}",
                  engine=replace(cfg.engine, cache=replace(cfg.engine.cache, prefix_caching=caching)))
    workload = WorkloadConfig(dataset="multi-turn", num_prompts=args.sessions, num_prefixes=args.groups,
                              prefix_len=args.system, input_len=args.user, output_len=args.reply, turns=args.turns,
                              think_time=args.think, vocab_size=args.vocab, ignore_eos=True, seed=args.seed)
    launcher = Launcher(cfg)
    launcher.start()
    try:
        result = run_serve(ServeConfig(workload=workload, load=LoadConfig(args.rate), base_url=api_base_url(cfg.api),
                                       run_dir=cfg.resolved_run_dir, progress=False))
        placements = control(cfg.resolved_run_dir, "snapshot")["admission"]["prefill_decisions"]
    finally:
        launcher.stop()
    return {"caching": caching, "result": result, "placements": placements}


def judge(on: dict, off: dict, system: int) -> dict:
    """The goals' figures from the two runs' per-request records."""
    records = {r["request_id"]: r for r in on["result"]["requests"]}
    block = on["result"]["multi_turn"]["block_size"]
    by_session: dict[int, dict[int, dict]] = {}
    for r in records.values():
        by_session.setdefault(r["session"], {})[r["turn"]] = r
    follow_ups = []  # (cached, the previous turn's prompt and reply in whole blocks)
    for turns in by_session.values():
        for number, r in turns.items():
            prev = turns.get(number - 1)
            if prev is not None and r["ok"]:
                follow_ups.append((r["cached_tokens"], (prev["prompt_tokens"] + prev["output_tokens"] - 1)
                                   // block * block))
    shares = [cached / held for cached, held in follow_ups if held]
    firsts = sorted((turns[1] for turns in by_session.values() if 1 in turns), key=lambda r: r["sent_at"])
    seen, later_firsts = set(), []
    groups = on["result"]["config"]["workload"]["num_prefixes"]
    for r in firsts:
        group = r["session"] % groups
        if group in seen:
            later_firsts.append(r["cached_tokens"] >= system // block * block)
        seen.add(group)

    def ttft_p50(result: dict, follow: bool) -> float:
        values = [r["ttft_ms"] for r in result["requests"] if r["ok"] and (r["turn"] >= 2) == follow]
        return statistics.median(values) if values else float("nan")

    return {"block_size": block,
            "follow_up_reuse_min": min(shares) if shares else None,
            "follow_up_reuse_mean": statistics.mean(shares) if shares else None,
            "follow_ups_at_90_percent": sum(s >= 0.9 for s in shares) / len(shares) if shares else None,
            "later_first_turns_hit_system": sum(later_firsts) / len(later_firsts) if later_firsts else None,
            "ttft_p50_ms_turns_2_on": ttft_p50(on["result"], True),
            "ttft_p50_ms_turns_2_off": ttft_p50(off["result"], True),
            "ttft_p50_ms_turn_1_on": ttft_p50(on["result"], False),
            "ttft_p50_ms_turn_1_off": ttft_p50(off["result"], False),
            "kv_blocks_sent_on": on["result"]["multi_turn"].get("kv_blocks_sent"),
            "kv_blocks_sent_off": off["result"]["multi_turn"].get("kv_blocks_sent"),
            "kv_blocks_skipped_on": on["result"]["multi_turn"].get("kv_blocks_skipped"),
            "placements_on": on["placements"], "placements_off": off["placements"],
            "by_turn_on": on["result"]["multi_turn"]["turns"], "by_turn_off": off["result"]["multi_turn"]["turns"],
            **{f"failed_{name}": failures(run["result"]) for name, run in (("on", on), ("off", off))}}


def failures(result: dict) -> dict:
    """How many requests failed, and their distinct errors (HTTP status and message)."""
    failed = [r for r in result["requests"] if not r["ok"]]
    return {"requests": len(failed), "errors": sorted({f"{r['status']}: {r['error']}" for r in failed})[:5]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(CONFIG))
    parser.add_argument("--sessions", type=int, default=8)
    parser.add_argument("--groups", type=int, default=2, help="distinct system prompts")
    parser.add_argument("--turns", type=int, default=4)
    parser.add_argument("--system", type=int, default=1000, help="system prompt tokens")
    parser.add_argument("--user", default="40:80", help="new tokens a turn")
    parser.add_argument("--reply", default="24:48", help="reply tokens")
    parser.add_argument("--rate", type=float, default=1.0, help="sessions a second")
    parser.add_argument("--think", type=float, default=0.5, help="seconds between a reply and the next turn")
    parser.add_argument("--vocab", type=int, default=512)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--result-file", default="")
    args = parser.parse_args()
    on, off = run_layout(args, True), run_layout(args, False)
    figures = judge(on, off, args.system)
    figures.update(date=date.today().isoformat(), config=args.config, settings=vars(args))
    ratio = figures["ttft_p50_ms_turns_2_on"] / figures["ttft_p50_ms_turns_2_off"]
    print(f"follow-up turns reusing >= 90 % of the previous prompt and reply: "
          f"{figures['follow_ups_at_90_percent']:.0%} (least {figures['follow_up_reuse_min']:.1%})")
    print(f"later sessions' first turns hitting the system prompt: {figures['later_first_turns_hit_system']:.0%}")
    print(f"TTFT p50, turns >= 2: {figures['ttft_p50_ms_turns_2_on']:.1f} ms on, "
          f"{figures['ttft_p50_ms_turns_2_off']:.1f} ms off ({ratio:.2f}x); turn 1: "
          f"{figures['ttft_p50_ms_turn_1_on']:.1f} / {figures['ttft_p50_ms_turn_1_off']:.1f} ms")
    print(f"KV blocks moved prefill -> decode: {figures['kv_blocks_sent_on']} on ({figures['kv_blocks_skipped_on']} "
          f"skipped), {figures['kv_blocks_sent_off']} off; placements on {figures['placements_on']}, "
          f"off {figures['placements_off']}")
    for name in ("on", "off"):
        if figures[f"failed_{name}"]["requests"]:
            print(f"cache {name}: {figures[f'failed_{name}']['requests']} requests failed: "
                  f"{figures[f'failed_{name}']['errors']}")
    if args.result_file:
        Path(args.result_file).write_text(json.dumps(figures, indent=1))


if __name__ == "__main__":
    main()
