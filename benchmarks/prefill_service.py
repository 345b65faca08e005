"""Prefill throughput in service against the same engine alone, on the same prompts (2 GPUs).

alone:      an LLMEngine on GPU 0 with the prefill instance's settings computes every prompt (one output
            token each), batched as its scheduler batches them; prompt tokens ÷ wall time.
in service: launch/gpu-8b-1p1d.toml, always disaggregated, the same prompts sent at once through the
            API; prompt tokens ÷ (last prompt's end − first prompt's start) from the scheduler's traces.
            The prefill instance's own counters split that span into stepping and waiting.
Goal: in service ≥ 90 % of alone (the pipeline around the prefill engine does not starve it).

    python benchmarks/prefill_service.py [--prompts N] [--input-len 2048] [--out results.json]
    (on CPU, as a check of the script: --config launch/single.toml --vocab-size 500 --input-len 64)
    (on the GPU machine: bash benchmarks/device_run.sh prefill 2048 64; figures in benchmarks/RESULTS.md,
    "Serving under load")
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

CONFIG = Path(__file__).resolve().parent.parent / "launch" / "gpu-8b-1p1d.toml"


def workload(args):
    from pdpipe.bench.config import WorkloadConfig

    return WorkloadConfig(num_prompts=args.prompts, input_len=args.input_len, output_len="2",
                          vocab_size=args.vocab_size, ignore_eos=True, seed=args.seed)


def alone(args) -> dict:
    """Runs in a process of its own on GPU 0 (its memory is gone before the service starts)."""
    import torch

    from pdpipe.bench.datasets import load_prompts
    from pdpipe.config import load_launch_config
    from pdpipe.engine.engine import LLMEngine
    from pdpipe.messages import SamplingParams

    cfg = load_launch_config(args.config)
    device = "cuda:0" if cfg.engine.device.startswith("cuda") else "cpu"
    engine = LLMEngine(replace(cfg.engine, device=device, cuda_graphs=False))
    prompts = [p.prompt for p in load_prompts(workload(args))]
    params = SamplingParams(max_tokens=1, temperature=0.0)
    engine.warm_up()  # as an engine process does before it says it is ready
    if device != "cpu":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for i, p in enumerate(prompts):
        engine.add_request(str(i), p, params)
    steps = 0
    while engine.has_unfinished():
        engine.step()
        steps += 1
    seconds = time.perf_counter() - start
    tokens = sum(map(len, prompts))
    return {"prompt_tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds, "steps": steps}


def in_service(args) -> dict:
    from pdpipe.bench.config import LoadConfig, ServeConfig
    from pdpipe.bench.serve import run_serve
    from pdpipe.bench.traces import fetch_traces
    from pdpipe.config import RoutingConfig, load_launch_config
    from pdpipe.inspect import control
    from pdpipe.launcher import Launcher

    cfg = load_launch_config(args.config)
    cfg = replace(cfg, name="prefill-service", run_dir=tempfile.mkdtemp(prefix="pdb-", dir="/tmp"),
                  routing=RoutingConfig(disaggregation="always"))
    launcher = Launcher(cfg)
    launcher.start()
    try:
        base = f"http://127.0.0.1:{cfg.api.port}"
        warm = ServeConfig(workload=replace(workload(args), num_prompts=4, seed=args.seed + 1),
                           load=LoadConfig(), base_url=base, api_key=cfg.api.api_key, progress=False)
        run_serve(warm)
        before = control(cfg.run_dir, "snapshot")["instances"]["prefill-0"]["stats"]
        result = run_serve(ServeConfig(workload=workload(args), load=LoadConfig(), base_url=base,
                                       api_key=cfg.api.api_key, progress=False))
        after = control(cfg.run_dir, "snapshot")["instances"]["prefill-0"]["stats"]
        ids = [r["request_id"] for r in result["requests"] if r.get("ok")]
        traces = fetch_traces(cfg.run_dir, ids)
    finally:
        launcher.stop()
    starts, ends = [], []
    for trace in traces.values():
        events = trace["events"]
        starts += [t for t, state, _, _ in events if state == "PREFILLING"][:1]
        ends += [t for t, state, _, detail in events if state == "TRANSFERRING" and detail == "prefill end"][:1]
    tokens = sum(r["prompt_tokens"] for r in result["requests"] if r.get("ok"))
    span = max(ends) - min(starts)
    busy = after["busy_seconds"] - before["busy_seconds"]
    stepped = after["prompt_tokens"] - before["prompt_tokens"]
    return {"requests": len(ids), "traced": len(traces), "prompt_tokens": tokens, "span_s": span,
            "tokens_per_s": tokens / span, "stepping_s": busy, "stepped_prompt_tokens": stepped,
            "tokens_per_stepping_s": stepped / busy if busy else 0.0,
            "client_ttft_p50_ms": result["summary"]["ttft_ms"]["p50"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--input-len", default="2048", help="N or MIN:MAX")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--vocab-size", type=int, default=128000)
    parser.add_argument("--config", default=str(CONFIG), help="the 1P+1D launch config")
    parser.add_argument("--alone", action="store_true", help="(internal) the stand-alone half, as JSON")
    parser.add_argument("--out", default="")
    args = parser.parse_args()
    if args.alone:
        print(json.dumps(alone(args)))
        return
    cmd = [sys.executable, __file__, "--alone", "--prompts", str(args.prompts), "--input-len", args.input_len,
           "--seed", str(args.seed), "--vocab-size", str(args.vocab_size), "--config", args.config]
    standalone = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.splitlines()[-1])
    service = in_service(args)
    ratio = service["tokens_per_s"] / standalone["tokens_per_s"]
    result = {"input_len": args.input_len, "prompts": args.prompts, "alone": standalone, "service": service,
              "service_over_alone": ratio}
    print(json.dumps(result, indent=1))
    print(f"prefill {args.prompts} x {args.input_len} tokens: alone {standalone['tokens_per_s']:.0f} tok/s, "
          f"in service {service['tokens_per_s']:.0f} tok/s ({ratio * 100:.1f} %); while stepping "
          f"{service['tokens_per_stepping_s']:.0f} tok/s, stepping {service['stepping_s']:.2f} s of "
          f"{service['span_s']:.2f} s")
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
