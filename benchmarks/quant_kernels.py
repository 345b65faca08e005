"""The weight-read GEMM for quantized weights against its bytes floor and against bf16, on one GPU.

For each scheme (wint8, wint4, fp8, block_wise_fp8) and weight shape (the 8B shape's projections, the
70B shape's largest, DeepSeek's 2112 x 7168), and M in 1, 2, 3, 16, 64 rows (256 for the dequantize +
cuBLAS path beyond the kernel's rows): the time of `QuantLinear(x)` (a CUDA graph's replay, as decode runs
it, median of many, L2 flushed between), its floor — the bytes it must read (codes + scales + the
activations) over the read bandwidth of a plain device copy measured in the same run — and its efficiency
(floor / time), beside bf16's `F.linear` on the dequantized weights and the speed-up over it; where the
kernel cuts the weight's bands along K (`split_k`), the time without the cut too. Each row also gives the
bytes read a second and that over what a read-only pass (a sum) reaches: the copy's rate is
about half the memory's, so the issue's floor is a lenient one. Each is timed twice: alone (one call a
replay: the replay's launch and ramp, some microseconds, count against the kernel) and in a step (24 calls
back to back in one graph, each on its own copy of the weight so that none is read from the L2, as a
decode step's projections follow each other); bf16 the same way. And the largest error against `x @ W.T`
on the dequantized weights (float32), relative to the largest output: a wrong kernel shows here.

Goals (issue 24): FP8 >= 80 % of the floor at M = 1-16 for weights >= 8 MB (channel and block scales,
2112 x 7168 included); int4-g128 >= 70 % (>= 3x bf16 at M = 1) and >= 1.5x bf16 at M = 64; int8 >= 75 %.

`moe`: the fused experts (`kernels.fused_moe`: both grouped GEMMs, their sort and the weighted sum) on one
MoE layer of ERNIE-4.5-300B-A47B's shape (64 experts of width 3584 over hidden 8192, top-8) with quantized
experts (wint4, wint8, fp8) and bf16, at decode batches 16, 32, 64 (uniform random routing): the time
against the expert-bytes floor — the distinct experts the batch selects, codes and scales, over the copy
bandwidth. Goal: >= 85 % at batch 16-64.

    python benchmarks/quant_kernels.py [--only gemm,moe] [--shapes NxK,...] [--rows M,...] [--schemes S,...]
        [--json OUT.json]
"""
from __future__ import annotations

import argparse
import json
import statistics
from datetime import date
from pathlib import Path

import torch

from pdpipe import kernels
from pdpipe.kernels import triton_quant
from pdpipe.kernels.reference import QuantStack
from pdpipe.models.layers import QuantLinear
from pdpipe.quant.weights import dequantize, quantize

SHAPES = [(4096, 4096), (6144, 4096), (28672, 4096), (4096, 14336), (2112, 7168), (8192, 28672)]
SCHEMES = ("wint8", "wint4", "fp8", "block_wise_fp8")
ROWS = (1, 2, 3, 16, 64, 256)
MOE = {"experts": 64, "inter": 3584, "hidden": 8192, "top_k": 8}  # ERNIE-4.5-300B-A47B's routed experts
MOE_BATCHES = (16, 32, 64)


def timed(fn, runs: int = 50) -> float:
    """Median milliseconds of `fn` captured in a CUDA graph (no launch overheads: decode replays graphs), the
    L2 flushed (a 256 MiB write) before each replay."""
    flush = torch.empty(256 << 20, dtype=torch.uint8, device="cuda")
    fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return replayed(graph, runs, before=flush.zero_)


def replayed(graph, runs: int, before=None) -> float:
    """Median milliseconds of a graph's replay over `runs` (after five unrecorded), `before` run untimed
    ahead of each."""
    times = []
    for i in range(runs + 5):
        if before is not None:
            before()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        torch.cuda.synchronize()
        if i >= 5:
            times.append(start.elapsed_time(end))
    return statistics.median(times)


def timed_in_step(calls, runs: int = 20) -> float:
    """Median milliseconds a call, each call reading its own copy of the weight, captured back to back in one
    CUDA graph as a decode step runs its projections: enough copies that each read misses the L2, and so
    many calls that one replay's launch is spread over them."""
    for call in calls:
        call()
    reps = len(calls) * -(-24 // len(calls))
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(reps):
            calls[i % len(calls)]()
    return replayed(graph, runs) / reps


def copies_past_l2(nbytes: int) -> int:
    """How many copies of `nbytes` to cycle through so that each is gone from the L2 before it is read again."""
    return min(32, max(2, -(-3 * torch.cuda.get_device_properties(0).L2_cache_size // nbytes)))


def copy_bandwidth() -> float:
    """Bytes read a second by a plain 1 GiB device-to-device copy (read bytes only)."""
    src = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    return src.numel() / (timed(lambda: dst.copy_(src), runs=20) / 1e3)


def read_bandwidth() -> float:
    """Bytes read a second by a read-only pass: the sum of 1 GiB of bf16."""
    src = torch.ones(1 << 29, dtype=torch.bfloat16, device="cuda")
    return src.numel() * 2 / (timed(lambda: src.sum(dtype=torch.float32), runs=20) / 1e3)


def check(got: torch.Tensor, want: torch.Tensor) -> bool:
    """Raises where `got` is off `want` (float32) by more than 2 % of its largest value."""
    err = ((got.float() - want).abs().max() / want.abs().max()).item()
    if err > 2e-2:
        raise AssertionError(f"the weight-read GEMM is off its reference by {err:.1e}")
    return True


def unsplit(time_it, n: int, k: int, m: int, scheme: str) -> float | None:
    """The time with the weight's bands not cut along K, where some configuration the autotuner weighs for
    this scheme cuts them (None where none does): whether the cut pays for its partial sums. Tuned afresh
    for it (not from Triton's on-disk cache of choices, which holds the cut launches'); the autotuner's
    choices for the cut launches are put back after."""
    kernel = triton_quant._quant_skinny_kernel
    configs = triton_quant._configs_for_kind(kernel.configs, {"K": k}, KIND=triton_quant.KINDS[scheme], FAST=True,
                                             TILE_SCALE=True)
    device = torch.device("cuda")
    if m > triton_quant.QUANT_MAX_ROWS or all(
            triton_quant.split_k(n, k, device, c.kwargs["BLOCK_N"] if c.kwargs["CUT_BY_TILE"] else 64) == 1
            for c in configs):
        return None
    chosen, tuned, on_disk = triton_quant.split_k, dict(kernel.cache), getattr(kernel, "cache_results", False)
    triton_quant.split_k = lambda n, k, device, band=64: 1
    kernel.cache.clear()
    kernel.cache_results = False
    try:
        return time_it()
    finally:
        triton_quant.split_k = chosen
        kernel.cache_results = on_disk
        kernel.cache.clear()
        kernel.cache.update(tuned)


def gemm_rows(bandwidth: float, read_rate: float, shapes=SHAPES, row_counts=ROWS, schemes=SCHEMES) -> list[dict]:
    rows = []
    gen = torch.Generator(device="cuda").manual_seed(0)
    for n, k in shapes:
        w = torch.randn(n, k, device="cuda", generator=gen, dtype=torch.bfloat16) * 0.02
        for scheme in schemes:
            qw = quantize(w, scheme)
            layer = QuantLinear(qw)
            plain = dequantize(qw, torch.bfloat16)
            layers = [layer] + [QuantLinear(qw.clone()) for _ in range(copies_past_l2(qw.nbytes) - 1)]
            plains = [plain] + [plain.clone() for _ in range(copies_past_l2(plain.numel() * 2) - 1)]
            for m in row_counts:
                x = torch.randn(m, k, device="cuda", generator=gen).to(torch.bfloat16)
                with torch.inference_mode():
                    want = x.float() @ plain.float().T
                    err = ((layer(x).float() - want).abs().max() / want.abs().max()).item()  # tunes it first
                    config = str(triton_quant._quant_skinny_kernel.best_config) if m <= triton_quant.QUANT_MAX_ROWS \
                        else "dequantize + cuBLAS"
                    ms = timed(lambda: layer(x))
                    bf16_ms = timed(lambda: torch.nn.functional.linear(x, plain))
                    unsplit_ms = unsplit(lambda: check(layer(x), want) and timed(lambda: layer(x)), n, k, m, scheme)
                    step_ms = timed_in_step([lambda layer=layer: layer(x) for layer in layers])
                    bf16_step_ms = timed_in_step([lambda w=w: torch.nn.functional.linear(x, w) for w in plains])
                read = qw.nbytes + x.numel() * 2
                floor = read / bandwidth * 1e3
                rows.append({"scheme": scheme, "n": n, "k": k, "m": m, "ms": ms, "floor_ms": floor,
                             "efficiency": floor / ms, "bytes_per_s": read / ms * 1e3,
                             "of_read_rate": read / ms * 1e3 / read_rate, "bf16_ms": bf16_ms,
                             "speedup": bf16_ms / ms, "weight_mb": qw.nbytes / 2**20, "max_rel_error": err,
                             "unsplit_ms": unsplit_ms, "in_step_ms": step_ms, "in_step_efficiency": floor / step_ms,
                             "in_step_of_read_rate": read / step_ms * 1e3 / read_rate,
                             "in_step_bf16_ms": bf16_step_ms, "in_step_speedup": bf16_step_ms / step_ms,
                             "config": config})
                r = rows[-1]
                print(f"{scheme:>14} {n:>5}x{k:<5} M={m:<3} {ms * 1e3:8.1f} us  floor {floor * 1e3:7.1f} us  "
                      f"{r['efficiency'] * 100:5.1f} %  {r['bytes_per_s'] / 1e9:5.0f} GB/s "
                      f"({r['of_read_rate'] * 100:3.0f} % of a read)  bf16 {bf16_ms * 1e3:8.1f} us  "
                      f"x{r['speedup']:.2f}  err {err:.1e}{'  WRONG' if err > 2e-2 else ''}"
                      f"{f'  unsplit {unsplit_ms * 1e3:.1f} us' if unsplit_ms else ''} | in a step "
                      f"{step_ms * 1e3:.1f} us {r['in_step_efficiency'] * 100:.0f} % "
                      f"({r['in_step_of_read_rate'] * 100:.0f} % of a read) x{r['in_step_speedup']:.2f} | {config}")
    return rows


def expert_stacks(scheme: str, gen: torch.Generator) -> tuple[torch.Tensor | QuantStack, torch.Tensor | QuantStack]:
    """One layer's experts, gate/up [E, 2 * inter, hidden] and down [E, hidden, inter]: bf16 (scheme "") or
    quantized expert by expert (the bf16 copy of one expert at a time)."""
    e, inter, hidden = MOE["experts"], MOE["inter"], MOE["hidden"]
    stacks = []
    for n, k in ((2 * inter, hidden), (hidden, inter)):
        experts = [torch.randn(n, k, device="cuda", generator=gen, dtype=torch.bfloat16) * 0.02 for _ in range(e)] \
            if not scheme else [quantize(torch.randn(n, k, device="cuda", generator=gen, dtype=torch.bfloat16) * 0.02,
                                         scheme) for _ in range(e)]
        if not scheme:
            stacks.append(torch.stack(experts))
            continue
        q = experts[0]
        stacks.append(QuantStack(scheme, torch.stack([x.codes for x in experts]),
                                 torch.stack([x.scale for x in experts]).contiguous(), q.cell, q.offset, (e, n, k)))
    return stacks[0], stacks[1]


def expert_bytes(w: torch.Tensor | QuantStack) -> int:
    """One expert's bytes of a stack (codes and scales)."""
    if isinstance(w, torch.Tensor):
        return w[0].numel() * w.element_size()
    return w.codes[0].numel() * w.codes.element_size() + w.scale[0].numel() * w.scale.element_size()


def moe_rows(bandwidth: float, read_rate: float) -> list[dict]:
    rows = []
    gen = torch.Generator(device="cuda").manual_seed(1)
    for scheme in ("", "wint4", "wint8", "fp8"):
        w13, w2 = expert_stacks(scheme, gen)
        per_expert = expert_bytes(w13) + expert_bytes(w2)
        for batch in MOE_BATCHES:
            x = torch.randn(batch, MOE["hidden"], device="cuda", generator=gen).to(torch.bfloat16)
            logits = torch.randn(batch, MOE["experts"], device="cuda", generator=gen)
            weights, ids = torch.softmax(logits, -1).topk(MOE["top_k"], dim=-1)
            ids = ids.to(torch.int32)
            with torch.inference_mode():
                kernels.fused_moe(x, w13, w2, weights, ids)  # compiles and tunes first
                ms = timed(lambda: kernels.fused_moe(x, w13, w2, weights, ids))
            touched = int(ids.unique().numel())
            floor = (touched * per_expert + x.numel() * 2 * 2) / bandwidth * 1e3
            rate = floor / 1e3 * bandwidth / (ms / 1e3)
            rows.append({"scheme": scheme or "bf16", "batch": batch, "experts_touched": touched, "ms": ms,
                         "floor_ms": floor, "efficiency": floor / ms, "bytes_per_s": rate,
                         "of_read_rate": rate / read_rate, "expert_mb": per_expert / 2**20})
            print(f"moe {scheme or 'bf16':>6} batch {batch:<3} {touched} experts  {ms * 1e3:8.1f} us  "
                  f"floor {floor * 1e3:8.1f} us  {floor / ms * 100:5.1f} %  {rate / 1e9:5.0f} GB/s "
                  f"({rate / read_rate * 100:3.0f} % of a read)")
        del w13, w2
        torch.cuda.empty_cache()
    bf16 = {r["batch"]: r["ms"] for r in rows if r["scheme"] == "bf16"}
    for r in rows:
        r["speedup"] = bf16[r["batch"]] / r["ms"]
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", default="")
    parser.add_argument("--only", default="gemm,moe", help="of gemm, moe")
    parser.add_argument("--shapes", default="", help="N x K of the GEMM, e.g. 4096x4096,2112x7168 (default: all six)")
    parser.add_argument("--rows", default="", help="the GEMM's M, e.g. 1,64 (default: 1,2,3,16,64,256)")
    parser.add_argument("--schemes", default=",".join(SCHEMES), help="of " + ", ".join(SCHEMES))
    args = parser.parse_args()
    shapes = [tuple(int(d) for d in s.split("x")) for s in args.shapes.split(",")] if args.shapes else SHAPES
    row_counts = [int(m) for m in args.rows.split(",")] if args.rows else ROWS
    only = set(args.only.split(","))
    bandwidth, read_rate = copy_bandwidth(), read_bandwidth()
    print(f"{torch.cuda.get_device_name()}: a device copy reads {bandwidth / 1e9:.0f} GB/s, a sum "
          f"{read_rate / 1e9:.0f} GB/s")
    result = {"date": str(date.today()), "device": torch.cuda.get_device_name(), "copy_read_bytes_per_s": bandwidth,
              "sum_read_bytes_per_s": read_rate}
    if "gemm" in only:
        result["rows"] = gemm_rows(bandwidth, read_rate, shapes, row_counts, args.schemes.split(","))
    if "moe" in only:
        result["moe"] = moe_rows(bandwidth, read_rate)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
