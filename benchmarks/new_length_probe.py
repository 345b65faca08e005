"""Why is a prompt of a length the engine has not seen before slower? In service the first ~100
requests after a launch took about twice their prefill time (benchmarks/RESULTS.md, "Where TTFT goes");
the same prompts sent again did not. This times one engine's prefill of new lengths against the same
lengths seen once, and profiles one of each, so the operations that cost the difference show.

    python benchmarks/new_length_probe.py                       (GPU: the 8B-shaped launch config)
    python benchmarks/new_length_probe.py --config launch/single.toml --lengths 40,71,93   (CPU check)
"""
from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import replace
from pathlib import Path

import torch

CONFIG = Path(__file__).resolve().parent.parent / "launch" / "gpu-8b-1p1d.toml"


def main() -> None:
    from pdpipe.config import load_launch_config
    from pdpipe.engine.engine import LLMEngine
    from pdpipe.messages import SamplingParams

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(CONFIG))
    parser.add_argument("--lengths", default="1101,1234,1500,1777,2003,2222,2500,2901")
    args = parser.parse_args()
    cfg = load_launch_config(args.config)
    device = "cuda:0" if cfg.engine.device.startswith("cuda") else "cpu"
    engine = LLMEngine(replace(cfg.engine, device=device, cuda_graphs=False))
    engine.warm_up()
    gen = torch.Generator().manual_seed(0)
    params = SamplingParams(max_tokens=1, temperature=0.0)

    def prefill(n: int) -> float:
        prompt = torch.randint(0, engine.spec.vocab_size, (n,), generator=gen).tolist()
        start = time.perf_counter()
        engine.add_request("probe", prompt, params)
        while engine.has_unfinished():
            engine.step()
        return (time.perf_counter() - start) * 1e3

    lengths = [int(x) for x in args.lengths.split(",")]
    print(f"{'tokens':>7} {'new length ms':>14} {'seen once ms':>13} {'seen twice ms':>14}")
    rows = []
    for n in lengths:
        rows.append((n, prefill(n), prefill(n), prefill(n)))
        print(f"{n:>7} {rows[-1][1]:>14.1f} {rows[-1][2]:>13.1f} {rows[-1][3]:>14.1f}", flush=True)
    print(f"median: new {statistics.median(r[1] for r in rows):.1f} ms, "
          f"seen {statistics.median(r[2] for r in rows):.1f} ms")
    _profile(prefill, lengths[-1] + 7, device)


def _profile(prefill, n: int, device: str) -> None:
    """The operations of one prefill of a new length, then of the same length again, by self time."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device != "cpu" else [])
    sort = "self_cuda_time_total" if device != "cpu" else "self_cpu_time_total"
    for label in ("new length", "same length again"):
        with profile(activities=activities) as prof:
            prefill(n)
        print(f"--- {label}, {n} tokens: by {sort}")
        print(prof.key_averages().table(sort_by=sort, row_limit=12, max_name_column_width=60))
        print(f"--- {label}: by self_cpu_time_total")
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12, max_name_column_width=60))


if __name__ == "__main__":
    main()
