"""What Triton's autotuning cache saves an engine's start: the warm-up of the 8B shape's quantized projections
(q/k/v, o, gate/up, down) at every decode row count 1-64, as `ModelRunner.warm_gemms` runs them, timed in
three fresh processes sharing one Triton cache directory:
- `cold`: an empty cache (every candidate compiled and timed);
- `restart`: the same again (compiled kernels and the chosen configurations read from the cache);
- `restart, retimed`: the compiled kernels from the cache, the autotuner's own cache switched off (every
  candidate timed again: what a restart cost before `AUTOTUNE_CACHE`).
Each process checks its outputs against `x @ dequantize(W).T` at 1, 16 and 64 rows.

    python benchmarks/probes/autotune_cache.py [--schemes wint4,fp8] [--json OUT.json]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

SHAPES = [(6144, 4096), (4096, 4096), (28672, 4096), (4096, 14336)]  # the 8B shape's projections


def warm(schemes: list[str], retime: bool) -> dict:
    """The child: quantize the shapes, then time the first calls at 1-64 rows (the tuning), then check."""
    import torch

    from pdpipe.kernels import triton_quant
    from pdpipe.models.layers import QuantLinear
    from pdpipe.quant.weights import dequantize, quantize

    if retime:
        triton_quant._quant_skinny_kernel.cache_results = False
    gen = torch.Generator(device="cuda").manual_seed(0)
    layers = {(s, n, k): QuantLinear(quantize(torch.randn(n, k, device="cuda", generator=gen) * 0.02, s))
              for s in schemes for n, k in SHAPES}
    torch.cuda.synchronize()
    start = time.perf_counter()
    with torch.inference_mode():
        for (_, _, k), layer in layers.items():
            x = torch.zeros(64, k, dtype=torch.bfloat16, device="cuda")
            for m in range(1, 65):
                layer(x[:m])
    torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    worst = 0.0
    with torch.inference_mode():
        for (_, _, k), layer in layers.items():
            plain = dequantize(layer.quantized).float()
            for m in (1, 16, 64):
                x = torch.randn(m, k, device="cuda", generator=gen).to(torch.bfloat16)
                want = x.float() @ plain.T
                worst = max(worst, ((layer(x).float() - want).abs().max() / want.abs().max()).item())
    return {"seconds": seconds, "max_rel_error": worst,
            "cache_results": getattr(triton_quant._quant_skinny_kernel, "cache_results", False)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--schemes", default="wint4,fp8")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--child", choices=["cached", "retimed"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    schemes = args.schemes.split(",")
    if args.child:
        print(json.dumps(warm(schemes, args.child == "retimed")))
        return
    runs = {}
    with tempfile.TemporaryDirectory() as cache:
        env = dict(os.environ, TRITON_CACHE_DIR=cache)
        for name, child in (("cold", "cached"), ("restart", "cached"), ("restart, retimed", "retimed")):
            done = subprocess.run([sys.executable, __file__, "--schemes", args.schemes, "--child", child], env=env,
                                  capture_output=True, text=True)
            if done.returncode:
                sys.exit(f"the {name} process failed:\n{done.stderr[-4000:]}")
            runs[name] = json.loads(done.stdout.strip().splitlines()[-1])
            print(f"{name:>17}: {runs[name]['seconds']:6.1f} s to warm {len(SHAPES) * len(schemes)} projections "
                  f"at 1-64 rows (autotuning cache {runs[name]['cache_results']}), largest error "
                  f"{runs[name]['max_rel_error']:.1e}")
    if args.json:
        import torch
        args.json.write_text(json.dumps({"date": str(date.today()), "device": torch.cuda.get_device_name(),
                                         "schemes": schemes, "shapes": SHAPES, "runs": runs}, indent=1))


if __name__ == "__main__":
    main()
