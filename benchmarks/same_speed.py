"""Did a change leave the GPU hot paths' speed alone? Compares `gpu_bench.py --only decode,prefill` runs
of two trees made on one machine in one call, alternating (old, new, old, new: drift shows as spread):
the decode step of the Llama-3.1-8B shape at 1k context, batch 1 and 64, and a 2k-token prefill, each
the median over the runs of a tree. Passes when every new figure is within ±tolerance of the old.

Usage: python benchmarks/same_speed.py --old OLD1.json OLD2.json --new NEW1.json NEW2.json [--tolerance 0.03]
       (bash benchmarks/device_run.sh samespeed OLD_TREE runs both trees and this)
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

FIGURES = {"decode b1 step (ms)": ("decode", "batch", 1, "step_ms"),
           "decode b64 step (ms)": ("decode", "batch", 64, "step_ms"),
           "decode b1 graph replay (ms)": ("decode", "batch", 1, "graph_ms"),
           "decode b64 graph replay (ms)": ("decode", "batch", 64, "graph_ms"),
           "prefill 1x2048 (ms)": ("prefill", "prompts", "1x2048", "ms")}


def figure(run: dict, where: tuple) -> float:
    table, key, value, field = where
    return next(row[field] for row in run[table] if row[key] == value)


def compare(old: list[dict], new: list[dict], tolerance: float) -> tuple[list[dict], bool]:
    rows, ok = [], True
    for name, where in FIGURES.items():
        a = [figure(r, where) for r in old]
        b = [figure(r, where) for r in new]
        ratio = statistics.median(b) / statistics.median(a)
        within = abs(ratio - 1) <= tolerance
        ok &= within
        rows.append({"figure": name, "old": a, "new": b, "ratio": ratio, "within": within})
    return rows, ok


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--old", nargs="+", required=True)
    parser.add_argument("--new", nargs="+", required=True)
    parser.add_argument("--tolerance", type=float, default=0.03)
    parser.add_argument("--json", default="")
    args = parser.parse_args()
    old = [json.loads(Path(p).read_text()) for p in args.old]
    new = [json.loads(Path(p).read_text()) for p in args.new]
    rows, ok = compare(old, new, args.tolerance)
    print(f"{old[0]['device']}, {old[0]['date']}; medians of {len(old)} old and {len(new)} new runs, alternating")
    for r in rows:
        print(f"{r['figure']:30s} old {statistics.median(r['old']):8.3f}  new {statistics.median(r['new']):8.3f}  "
              f"new/old {r['ratio']:.3f}  {'ok' if r['within'] else 'OUTSIDE'} ±{args.tolerance:.0%}  "
              f"(runs: old {', '.join(f'{x:.3f}' for x in r['old'])}; new {', '.join(f'{x:.3f}' for x in r['new'])})")
    if args.json:
        Path(args.json).write_text(json.dumps({"device": old[0]["device"], "date": old[0]["date"], "rows": rows,
                                               "within": ok}, indent=1))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
