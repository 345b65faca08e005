"""The fused MoE kernels on one GPU at the ERNIE-4.5-21B-A3B and Qwen3-30B-A3B expert shapes: each
grouped GEMM over a grid of tile sizes (the fastest becomes `kernels/triton_moe.py`'s CONFIGS), the
router and the sort against their torch references, and where a MoE layer's time goes.

  decode   1 / 16 / 64 tokens, random top-k: each GEMM against the HBM floor of the experts it reads
           (distinct experts × their bytes ÷ the device's copy bandwidth); the weights of 4 layers
           cycled, so no layer's experts sit in L2 between calls
  prefill  512 and 2048 tokens: each GEMM's FLOPs against the bf16 GEMM rate
  router   16 to 8192 tokens: the fused router (tile sizes, float32 GEMM precisions) against cuBLAS's
           GEMM + the choice kernel (where kernels.ROUTER_FUSED_TOKENS comes from); the sort's kernels
           specialised on their sizes against not (triton_ops.py, VARYING)

No goal of its own: it chooses the tiles and the router's path, judged by time against the limits above
and against each other.

    python benchmarks/moe_kernel_sweep.py [--json OUT] [--only sweep,parts,router] [--cases 1,64]  (GPU)
Figures in benchmarks/RESULTS.md, "Mixture of experts on GPU", "The kernels"; JSON in
benchmarks/results/moe/.
"""
from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_bench import copy_bandwidth, cuda_time, gemm_tflops  # noqa: E402

SHAPES = {"ernie": dict(experts=64, top_k=6, hidden=2560, inter=1536),
          "qwen": dict(experts=128, top_k=8, hidden=2048, inter=768)}
LAYERS = 4
DECODE = [(bn, bk, w, s) for bn, bk, w, s in (
    (32, 128, 4, 4), (32, 256, 4, 3), (64, 64, 4, 4), (64, 64, 4, 6), (64, 128, 4, 3), (64, 128, 4, 4),
    (64, 256, 4, 3), (64, 256, 8, 3), (128, 64, 4, 4), (128, 128, 4, 3), (128, 128, 8, 3), (32, 64, 4, 5))]
PREFILL = [(bn, bk, w, s) for bn, bk, w, s in (
    (64, 64, 4, 3), (64, 128, 4, 3), (128, 64, 4, 3), (128, 64, 8, 3), (128, 64, 8, 4), (128, 128, 8, 3),
    (64, 64, 8, 4), (256, 64, 8, 3))]


def graph_time(fn, iters: int = 10) -> float:
    """Median seconds of `fn` replayed as a CUDA graph (no launch gaps from the host, as in the engine)."""
    from pdpipe.engine.graphs import capture

    graph, _ = capture(fn, None)
    return cuda_time(graph.replay, iters=iters, warmup=2)


def routing(tokens: int, experts: int, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator(device="cuda").manual_seed(tokens)
    scores = torch.rand(tokens, experts, device="cuda", generator=gen)
    weights, ids = scores.softmax(-1).topk(top_k, -1)
    return weights.float().contiguous(), ids.int().contiguous()


def sweep_case(name: str, shape: dict, tokens: int, block_m: int, copy_bw: float, gemm: float) -> dict:
    from pdpipe.kernels import triton_moe as tm

    e, k, h, inter = shape["experts"], shape["top_k"], shape["hidden"], shape["inter"]
    w13 = [torch.randn(e, 2 * inter, h, device="cuda", dtype=torch.bfloat16) * 0.02 for _ in range(LAYERS)]
    w2 = [torch.randn(e, h, inter, device="cuda", dtype=torch.bfloat16) * 0.02 for _ in range(LAYERS)]
    x = torch.randn(tokens, h, device="cuda", dtype=torch.bfloat16)
    weights, ids = routing(tokens, e, k)
    sorted_pairs, block_expert, pairs = tm.moe_align(ids, e, 0, block_m)
    inter_out = torch.empty(pairs, inter, device="cuda", dtype=torch.bfloat16)
    down = torch.zeros(pairs, h, device="cuda", dtype=torch.bfloat16)
    flat_w = weights.reshape(-1)
    distinct = int(ids.unique().numel())
    floors = {"gate_up": distinct * 2 * inter * h * 2 / copy_bw, "down": distinct * inter * h * 2 / copy_bw}
    flops = {"gate_up": 2 * pairs * 2 * inter * h, "down": 2 * pairs * inter * h}
    grid = DECODE if block_m == 16 else PREFILL
    result: dict = {"model": name, "tokens": tokens, "block_m": block_m, "distinct_experts": distinct}
    for gemm_name in ("gate_up", "down"):
        times = {}
        for cfg in map(lambda c: tm.GemmConfig(*c), grid):
            def run(cfg=cfg, gemm_name=gemm_name):
                for layer in range(LAYERS):
                    if gemm_name == "gate_up":
                        tm._moe_gemm(x, w13[layer], inter_out, sorted_pairs, block_expert, None, pairs, k, False,
                                     True, block_m, cfg)
                    else:
                        tm._moe_gemm(inter_out, w2[layer], down, sorted_pairs, block_expert, flat_w, pairs, k,
                                     True, False, block_m, cfg)
            try:
                times[cfg] = graph_time(run) / LAYERS
            except Exception as exc:  # noqa: BLE001 — a tile that does not fit (shared memory): skipped
                result.setdefault("skipped", []).append(f"{gemm_name} {tuple(cfg)}: {type(exc).__name__}")
        best = min(times, key=times.__getitem__)
        current = tm.CONFIGS[block_m][0 if gemm_name == "gate_up" else 1] if block_m in tm.CONFIGS else None
        result[gemm_name] = dict(best=tuple(best), best_us=times[best] * 1e6,
                                 current=tuple(current) if current else None,
                                 current_us=times[current] * 1e6 if current in times else None,
                                 floor_us=floors[gemm_name] * 1e6, x_floor=times[best] / floors[gemm_name],
                                 pct_of_gemm=100 * flops[gemm_name] / times[best] / 1e12 / gemm,
                                 all_us={str(tuple(c)): round(t * 1e6, 1) for c, t in times.items()})
    return result


def parts(name: str, shape: dict, tokens: int) -> dict:
    """One MoE layer's pieces timed alone: router (GEMM + top-k), sort, the whole fused call; the
    Triton router and sort against the torch references."""
    from pdpipe.kernels import reference
    from pdpipe.kernels import triton_moe as tm

    e, k, h, inter = shape["experts"], shape["top_k"], shape["hidden"], shape["inter"]
    x = torch.randn(tokens, h, device="cuda", dtype=torch.bfloat16)
    gate = torch.randn(e, h, device="cuda") * 0.02
    bias = torch.randn(e, device="cuda") * 0.01
    w13 = torch.randn(e, 2 * inter, h, device="cuda", dtype=torch.bfloat16) * 0.02
    w2 = torch.randn(e, h, inter, device="cuda", dtype=torch.bfloat16) * 0.02
    logits = torch.nn.functional.linear(x.float(), gate)
    weights, ids = tm.moe_route(logits, bias, k, True, 1e-12)
    ref_w, ref_ids = reference.moe_route(logits, bias, k, True, 1e-12)
    block_m = tm.block_m_for(tokens, k, e)
    us = lambda fn: round(graph_time(fn, iters=20) * 1e6, 1)  # noqa: E731
    return {"model": name, "tokens": tokens, "router_gemm_us": us(lambda: torch.nn.functional.linear(x.float(), gate)),
            "route_us": us(lambda: tm.moe_route(logits, bias, k, True, 1e-12)),
            "route_torch_us": us(lambda: reference.moe_route(logits, bias, k, True, 1e-12)),
            "route_ids_equal": bool(torch.equal(ids.long(), ref_ids)),
            "align_us": us(lambda: tm.moe_align(ids, e, 0, block_m)),
            "align_torch_us": us(lambda: reference.moe_align(ids, e, 0, block_m)),
            "fused_moe_us": us(lambda: tm.fused_moe(x, w13, w2, weights, ids)),
            "fused_moe_max_err": float((tm.fused_moe(x, w13, w2, weights, ids).float() - reference.fused_moe(
                x.float(), w13.float(), w2.float(), ref_w, ref_ids).float()).abs().max())}


def router(name: str, shape: dict) -> list[dict]:
    """The router two ways by step size (see the module's docstring), and the sort specialised or not."""
    import triton

    from pdpipe.kernels import triton_moe as tm

    e, k, h = shape["experts"], shape["top_k"], shape["hidden"]
    fp32 = name == "ernie"  # ERNIE's router is float32; Qwen's a bf16 Linear
    gate = torch.randn(e, h, device="cuda") * 0.02
    gate = gate if fp32 else gate.to(torch.bfloat16)
    bias = torch.randn(e, device="cuda") * 0.01 if fp32 else None
    us = lambda fn: round(graph_time(fn, iters=20) * 1e6, 1)  # noqa: E731
    rows = []
    for tokens in (16, 64, 128, 256, 512, 2048, 8192):
        x = torch.randn(tokens, h, device="cuda", dtype=torch.bfloat16)

        def unfused():
            logits = torch.nn.functional.linear(x.float(), gate) if fp32 else torch.nn.functional.linear(x, gate)
            return tm.moe_route(logits, bias, k, True, 1e-12)
        row = {"model": name, "tokens": tokens, "unfused_us": us(unfused)}
        for block_t in (16, 32, 64):
            row[f"fused_t{block_t}_us"] = us(lambda: tm.moe_router(x, gate, bias, k, True, 1e-12, fp32, block_t))
        if fp32:
            row["fused_t16_ieee_us"] = us(lambda: tm.moe_router(x, gate, bias, k, True, 1e-12, fp32, 16, "ieee"))
        ids = unfused()[1]
        block_m = tm.block_m_for(tokens, k, e)
        row["align_us"] = us(lambda: tm.moe_align(ids, e, 0, block_m))
        names = ("_moe_align_kernel", "_moe_count_kernel", "_moe_offsets_kernel", "_moe_place_kernel")
        kept = {n: getattr(tm, n) for n in names}
        for which in (names, *((n,) for n in names[1:])):  # all specialised on every integer, then each alone
            try:
                for n in which:
                    setattr(tm, n, triton.jit(kept[n].fn))
                label = "all" if len(which) > 1 else which[0].split("_")[2]
                row[f"align_specialised_{label}_us"] = us(lambda: tm.moe_align(ids, e, 0, block_m))
            finally:
                for n in names:
                    setattr(tm, n, kept[n])
        print(json.dumps(row))
        rows.append(row)
    return rows


def chosen(sweep: list[dict]) -> dict:
    """Per block size and GEMM, the tile whose time, relative to each case's fastest, averages least."""
    out = {}
    for block_m in sorted({c["block_m"] for c in sweep}):
        for gemm in ("gate_up", "down"):
            cases = [c[gemm]["all_us"] for c in sweep if c["block_m"] == block_m]
            common = set.intersection(*(set(c) for c in cases))
            out[f"{block_m} {gemm}"] = min(common, key=lambda cfg: sum(c[cfg] / min(c.values()) for c in cases))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", default="")
    parser.add_argument("--models", default="ernie,qwen")
    parser.add_argument("--only", default="sweep,parts,router")
    parser.add_argument("--cases", default="", help="token counts of the sweep, e.g. 1,64 (default: all)")
    args = parser.parse_args()
    only, models = args.only.split(","), args.models.split(",")
    copy_bw, gemm = copy_bandwidth(0), gemm_tflops(0)
    cases = [(m, t, bm) for m, (t, bm) in itertools.product(models, (
        (1, 16), (16, 16), (64, 16), (512, 64), (2048, 128))) if not args.cases or str(t) in args.cases.split(",")
    ] if "sweep" in only else []
    results = {"device": torch.cuda.get_device_name(0), "copy_bw_TBps": copy_bw / 1e12, "gemm_tflops": gemm,
               "router": [r for m in models for r in router(m, SHAPES[m])] if "router" in only else [],
               "sweep": [sweep_case(m, SHAPES[m], t, bm, copy_bw, gemm) for m, t, bm in cases],
               "parts": [parts(m, SHAPES[m], t) for m in models for t in (1, 64, 256, 2048)] if "parts" in only else []}
    for r in results["sweep"]:
        for g in ("gate_up", "down"):
            row = r[g]
            print(f"{r['model']:5} {r['tokens']:>5} tok bm {r['block_m']:>3} {g:7}: best {row['best']} "
                  f"{row['best_us']:7.1f} us ({row['x_floor']:.2f}x floor, {row['pct_of_gemm']:.0f} % GEMM); "
                  f"current {row['current']} {row['current_us']}")
    results["chosen"] = chosen(results["sweep"]) if cases else {}
    print("chosen (least time over the cases, each relative to its fastest):", results["chosen"])
    for p in results["parts"]:
        print(json.dumps(p))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
