"""The weight-read GEMM for quantized weights against its bytes floor and against bf16, on one GPU.

For each scheme (wint8, wint4, fp8, block_wise_fp8) and weight shape (the 8B shape's projections, the
70B shape's largest, DeepSeek's 2112 x 7168), and M in 1, 2, 3, 16 rows (64 for the dequantize + cuBLAS
path beyond the kernel's rows): the time of `QuantLinear(x)` (CUDA events, median of many runs, L2
flushed between), its floor — the bytes it must read (codes + scales + the activations) over the read
bandwidth of a plain device copy measured in the same run — and its efficiency (floor / time), beside
bf16's `F.linear` on the dequantized weights and the speed-up over it.

Goals (issue 24): FP8 >= 80 % of the floor at M = 1-16 for weights >= 8 MB (channel and block scales,
2112 x 7168 included); int4-g128 >= 70 % (>= 3x bf16 at M = 1) and >= 1.5x bf16 at M = 64; int8 >= 75 %.

    python benchmarks/quant_kernels.py [--json OUT.json]
"""
from __future__ import annotations

import argparse
import json
import statistics
from datetime import date
from pathlib import Path

import torch

from pdpipe.models.layers import QuantLinear
from pdpipe.quant.weights import dequantize, quantize

SHAPES = [(4096, 4096), (6144, 4096), (28672, 4096), (4096, 14336), (2112, 7168), (8192, 28672)]
SCHEMES = ("wint8", "wint4", "fp8", "block_wise_fp8")
ROWS = (1, 2, 3, 16, 64)


def timed(fn, runs: int = 50) -> float:
    """Median milliseconds of `fn`, the L2 flushed (a 256 MiB write) before each run."""
    flush = torch.empty(256 << 20, dtype=torch.uint8, device="cuda")
    times = []
    for i in range(runs + 5):
        flush.zero_()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        if i >= 5:
            times.append(start.elapsed_time(end))
    return statistics.median(times)


def copy_bandwidth() -> float:
    """Bytes read a second by a plain 1 GiB device-to-device copy (read bytes only)."""
    src = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    return src.numel() / (timed(lambda: dst.copy_(src), runs=20) / 1e3)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", default="")
    args = parser.parse_args()
    bandwidth = copy_bandwidth()
    print(f"{torch.cuda.get_device_name()}: a device copy reads {bandwidth / 1e9:.0f} GB/s")
    rows = []
    gen = torch.Generator(device="cuda").manual_seed(0)
    for n, k in SHAPES:
        w = torch.randn(n, k, device="cuda", generator=gen, dtype=torch.bfloat16) * 0.02
        for scheme in SCHEMES:
            qw = quantize(w, scheme)
            layer = QuantLinear(qw)
            plain = dequantize(qw, torch.bfloat16)
            for m in ROWS:
                x = torch.randn(m, k, device="cuda", generator=gen).to(torch.bfloat16)
                with torch.inference_mode():
                    layer(x)  # tunes the kernel for this shape first
                    ms = timed(lambda: layer(x))
                    bf16_ms = timed(lambda: torch.nn.functional.linear(x, plain))
                floor = (qw.nbytes + x.numel() * 2) / bandwidth * 1e3
                rows.append({"scheme": scheme, "n": n, "k": k, "m": m, "ms": ms, "floor_ms": floor,
                             "efficiency": floor / ms, "bf16_ms": bf16_ms, "speedup": bf16_ms / ms,
                             "weight_mb": qw.nbytes / 2**20})
                r = rows[-1]
                print(f"{scheme:>14} {n:>5}x{k:<5} M={m:<3} {ms * 1e3:8.1f} us  floor {floor * 1e3:7.1f} us  "
                      f"{r['efficiency'] * 100:5.1f} %  bf16 {bf16_ms * 1e3:8.1f} us  x{r['speedup']:.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps({"date": str(date.today()), "device": torch.cuda.get_device_name(),
                                               "copy_read_bytes_per_s": bandwidth, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
