"""CPU threads per process: `launch/single.toml` (1 prefill + 1 decode engine on the demo model)
under bursts of 16 concurrent streams (~750-token prompts, 48 output tokens each), launched with the
launcher's thread budget (`engine.cpu_threads = 0`: the engine processes share the cores) and without
it (`cpu_threads = -1` with OMP_NUM_THREADS / MKL_NUM_THREADS unset: torch's default, every core in
every process). Each layout serves one burst to warm up, then `--rounds` measured ones.

    python benchmarks/cpu_threads.py [--rounds 3] [--result-file /tmp/cpu_threads.json]
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import statistics
from dataclasses import replace
from datetime import date
from pathlib import Path

from pdpipe.bench.config import LoadConfig, ServeConfig, WorkloadConfig
from pdpipe.bench.serve import api_base_url, run_serve
from pdpipe.config import load_launch_config
from pdpipe.launcher import THREAD_ENV, Launcher, physical_cores

CONFIG = Path(__file__).parent.parent / "launch" / "single.toml"
STREAMS, INPUT_LEN, OUTPUT_LEN = 16, 750, 48


def burst(launch, seed: int) -> dict:
    workload = WorkloadConfig(num_prompts=STREAMS, input_len=str(INPUT_LEN), output_len=str(OUTPUT_LEN),
                              vocab_size=512, ignore_eos=True, seed=seed)
    serve = ServeConfig(workload=workload, load=LoadConfig(math.inf, 1.0, STREAMS), base_url=api_base_url(launch.api),
                        progress=False)
    s = run_serve(serve)["summary"]
    return {"duration_s": s["duration_s"], "completed": s["completed"], "ttft_p50_ms": s["ttft_ms"]["p50"],
            "tpot_p50_ms": s["tpot_ms"]["p50"], "output_tok_s": s["output_throughput"]}


def run_layout(cpu_threads: int, rounds: int, port: int) -> dict:
    cfg = load_launch_config(str(CONFIG))
    cfg = replace(cfg, name=f"cpu-threads-{cpu_threads}", api=replace(cfg.api, port=port),
                  engine=replace(cfg.engine, cpu_threads=cpu_threads))
    launcher = Launcher(cfg)
    launcher.start()
    try:
        threads = {name: _logged_threads(launcher.paths.log(name)) for name in ("prefill-0", "decode-0", "transfer")}
        burst(cfg, seed=100)  # warm-up: the allocators' caches and the first steps of each size
        bursts = [burst(cfg, seed=r) for r in range(rounds)]
    finally:
        launcher.stop()
    return {"cpu_threads": cpu_threads, "torch_threads": threads, "bursts": bursts,
            "duration_s_median": statistics.median(b["duration_s"] for b in bursts)}


def _logged_threads(log: Path) -> int | None:
    found = re.search(r": (\d+) torch threads", log.read_text())
    return int(found.group(1)) if found else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3, help="measured bursts per layout")
    parser.add_argument("--port", type=int, default=8123)
    parser.add_argument("--result-file", default="")
    args = parser.parse_args()
    for name in THREAD_ENV:  # "without the budget" means torch's own default, not an inherited setting
        os.environ.pop(name, None)
    cores = physical_cores(os.sched_getaffinity(0))
    print(f"{CONFIG.name}: {STREAMS} concurrent streams of {INPUT_LEN} prompt tokens x {OUTPUT_LEN} output tokens, "
          f"{cores} cores, {date.today()}")
    layouts = [run_layout(threads, args.rounds, args.port) for threads in (0, -1)]
    for layout in layouts:
        label = "budget (cpu_threads = 0)" if layout["cpu_threads"] == 0 else "torch default (cpu_threads = -1)"
        print(f"\n{label}: torch threads {layout['torch_threads']}")
        print(f"{'burst':>5} {'done':>5} {'duration s':>11} {'TTFT p50 ms':>12} {'TPOT p50 ms':>12} {'out tok/s':>10}")
        for i, b in enumerate(layout["bursts"]):
            print(f"{i:>5} {b['completed']:>5} {b['duration_s']:>11.2f} {b['ttft_p50_ms']:>12.0f} "
                  f"{b['tpot_p50_ms']:>12.1f} {b['output_tok_s']:>10.1f}")
    if args.result_file:
        Path(args.result_file).write_text(json.dumps({"cores": cores, "layouts": layouts}, indent=1))


if __name__ == "__main__":
    main()
