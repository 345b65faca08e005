"""Why is a prompt of a length the engine has not seen before slower? In service the first ~100
requests after a launch took about twice their prefill time; the same prompts sent again did not.
This times one engine's prefill of new lengths against the same lengths seen once, each attention
backend and a projection's GEMM at a new length against the second call, and profiles one prefill of
each, so the operations that cost the difference show.

Answer (one H200, torch 2.11.0+cu130, cuBLAS 13, 2026-11-30), two causes, both removed since:
- torch's SDPA picked cuDNN for prompts, and cuDNN builds a graph per new sequence length: the first
  call at a new length took 40-64 ms, again 0.19-0.24 ms (flash attention: 0.20 ms first, 0.18
  again). Prompts now attend through varlen flash attention, one call per layer for the whole batch
  (24 prompts of 128-512 tokens: 0.29 ms a layer, against 1.31 ms for one SDPA call per prompt).
- cuBLAS pays ~3 ms the first time a GEMM runs at a row count it has not run (one random new count in
  3-6, any projection); neither a sweep of other counts (step 128 or 32) nor CUDA_MODULE_LOADING=EAGER
  removed it. GPU steps are now padded to a multiple of 32 tokens and the warm-up runs every count.
The 8B-shaped engine's prefill of 1.1k-2.9k-token prompts, new against seen (medians): 82.3 / 43.9 ms
with SDPA, 48.2 / 48.6 ms with varlen attention, padding and the warm-up (benchmarks/RESULTS.md,
"New prompt lengths"). Worth running again after a torch, CUDA or cuBLAS upgrade: a new length should
still cost nothing.

    python benchmarks/probes/new_length_probe.py                 (GPU: the 8B-shaped launch config;
                                                                   or bash benchmarks/device_run.sh lengths)
    python benchmarks/probes/new_length_probe.py --config launch/single.toml --lengths 40,71,93   (CPU check)
    python benchmarks/probes/new_length_probe.py --gemm-only     (the GEMMs alone, no engine)
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

CONFIG = Path(__file__).resolve().parents[2] / "launch" / "gpu-8b-1p1d.toml"


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
    if device != "cpu":
        _attention_probe(engine.spec, lengths)
    print(f"{'tokens':>7} {'new length ms':>14} {'seen once ms':>13} {'seen twice ms':>14}")
    rows = []
    for n in lengths:
        rows.append((n, prefill(n), prefill(n), prefill(n)))
        print(f"{n:>7} {rows[-1][1]:>14.1f} {rows[-1][2]:>13.1f} {rows[-1][3]:>14.1f}", flush=True)
    print(f"median: new {statistics.median(r[1] for r in rows):.1f} ms, "
          f"seen {statistics.median(r[2] for r in rows):.1f} ms")
    if device != "cpu":
        short = torch.randint(128, 512, (24,), generator=gen).tolist()
        pairs = [(prefill(n), prefill(n)) for n in short]
        print(f"short prompts 128-512: median new {statistics.median(r[0] for r in pairs):.1f} ms, "
              f"seen {statistics.median(r[1] for r in pairs):.1f} ms", flush=True)
        _gemm_probe(_engine_weights(engine))
        pairs = [(prefill(n + 1), prefill(n + 1)) for n in short]
        print(f"after the GEMM sweep, short prompts: median new {statistics.median(r[0] for r in pairs):.1f} ms, "
              f"seen {statistics.median(r[1] for r in pairs):.1f} ms", flush=True)
        torch.backends.cuda.enable_cudnn_sdp(False)
        news = [(prefill(n + 11), prefill(n + 11)) for n in lengths]
        print(f"cuDNN SDPA off: median new {statistics.median(r[0] for r in news):.1f} ms, "
              f"seen {statistics.median(r[1] for r in news):.1f} ms", flush=True)
        torch.backends.cuda.enable_cudnn_sdp(True)
    _profile(prefill, lengths[-1] + 7, device)


def timed(fn) -> float:
    """Milliseconds of `fn` on the GPU, from an idle stream to its end."""
    torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) * 1e3


def _engine_weights(engine) -> dict[str, torch.Tensor]:
    layer = engine.runner.model.model.layers[0]
    weights = {name: mod.weight for name, mod in layer.named_modules() if isinstance(mod, torch.nn.Linear)}
    head = getattr(engine.runner.model, "lm_head", None)
    if head is not None:
        weights["lm_head"] = head.weight
    return weights


def _gemm_probe(weights: dict[str, torch.Tensor], sweeps=(128, 32)) -> None:
    """cuBLAS at a row count it has not run: first call against the second, for each projection of one
    layer and the LM head, then again after sweeps of row counts (is it per new M, or per kernel, which
    a sweep would load once?)."""
    print(f"cuBLAS: {torch.backends.cuda.preferred_blas_library()}, CUDA_MODULE_LOADING="
          f"{os.environ.get('CUDA_MODULE_LOADING', '(unset: lazy)')}; shapes "
          f"{ {k: tuple(w.shape) for k, w in weights.items()} }")
    gen = torch.Generator().manual_seed(2)

    def new_rows(label: str) -> None:
        ms = torch.randint(100, 8000, (12,), generator=gen).tolist()
        for name, w in weights.items():
            firsts, agains = [], []
            for m in ms:
                x = torch.randn(m + 3, w.shape[1], device=w.device, dtype=w.dtype)
                firsts.append(timed(lambda: x @ w.T))
                agains.append(timed(lambda: x @ w.T))
            print(f"{label} {name}: first call at a new M median {statistics.median(firsts):.2f} ms "
                  f"(max {max(firsts):.2f}, {sum(f > a + 1 for f, a in zip(firsts, agains))} of {len(ms)} "
                  f"over 1 ms more), again {statistics.median(agains):.2f} ms", flush=True)

    new_rows("before a sweep")
    for step in sweeps:
        start = time.perf_counter()
        for w in weights.values():
            x = torch.randn(8192, w.shape[1], device=w.device, dtype=w.dtype)
            for m in range(step, 8193, step):
                x[:m] @ w.T
        torch.cuda.synchronize()
        print(f"sweep of M = {step}..8192 step {step} over {len(weights)} shapes: {time.perf_counter() - start:.2f} s")
        new_rows(f"after the step-{step} sweep")


def gemm_only() -> None:
    """The 8B shapes' projections with random weights, no engine (run under CUDA_MODULE_LOADING=EAGER)."""
    start = time.perf_counter()
    torch.cuda.init()
    torch.zeros(1, device="cuda")
    print(f"CUDA context: {time.perf_counter() - start:.2f} s")
    shapes = {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336)}
    weights = {k: torch.randn(*s, device="cuda", dtype=torch.bfloat16) for k, s in shapes.items()}
    start = time.perf_counter()
    x = torch.randn(100, 4096, device="cuda", dtype=torch.bfloat16)
    torch.cuda.synchronize()
    (x @ weights["o"].T).sum().item()
    print(f"first GEMM: {(time.perf_counter() - start) * 1e3:.1f} ms")
    _gemm_probe(weights, sweeps=())


def _attention_probe(spec, lengths: list[int]) -> None:
    """One layer's prompt attention and projections, alone: the first call at a new length against the
    second, per SDPA backend, then torch's varlen flash attention over a batch of prompts."""
    import inspect

    from torch.nn.attention import SDPBackend, sdpa_kernel

    heads, kv_heads, dim = spec.num_heads, spec.num_kv_heads, spec.head_dim
    dev, dt = "cuda:0", torch.bfloat16

    def sdpa(n: int):
        q = torch.randn(1, heads, n, dim, device=dev, dtype=dt)
        k = torch.randn(1, kv_heads, n, dim, device=dev, dtype=dt)
        return lambda: torch.nn.functional.scaled_dot_product_attention(q, k, k, is_causal=True, enable_gqa=True)

    backends = {"default": None, "flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION,
                "efficient": SDPBackend.EFFICIENT_ATTENTION}
    for offset, (name, backend) in enumerate(backends.items()):
        rows = []
        for n in lengths:
            call = sdpa(n + 3 + offset)
            try:
                if backend is None:
                    rows.append((timed(call), timed(call)))
                else:
                    with sdpa_kernel(backend):
                        rows.append((timed(call), timed(call)))
            except RuntimeError as err:
                print(f"sdpa {name}: {str(err).splitlines()[0]}")
                break
        if rows:
            print(f"sdpa {name}: first call at a new length {statistics.median(r[0] for r in rows):.2f} ms, "
                  f"again {statistics.median(r[1] for r in rows):.2f} ms (medians of {len(rows)})", flush=True)
    for n in lengths:
        x = torch.randn(n + 5, spec.hidden_size, device=dev, dtype=dt)
        w = torch.randn(spec.intermediate_size * 2, spec.hidden_size, device=dev, dtype=dt)
        first, again = timed(lambda: x @ w.T), timed(lambda: x @ w.T)
        print(f"gate_up GEMM M={n + 5}: first {first:.2f} ms, again {again:.2f} ms", flush=True)
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError as err:
        print(f"varlen_attn: {err}")
        return
    print(f"varlen_attn{inspect.signature(varlen_attn)}")
    gen = torch.Generator().manual_seed(1)
    for count, lo, hi in ((4, 1024, 3072), (24, 128, 512)):
        lens = torch.randint(lo, hi, (count,), generator=gen).tolist()
        total = sum(lens)
        q = torch.randn(total, heads, dim, device=dev, dtype=dt)
        k = torch.randn(total, kv_heads, dim, device=dev, dtype=dt)
        v = torch.randn(total, kv_heads, dim, device=dev, dtype=dt)
        cu = torch.tensor([0] + list(torch.tensor(lens).cumsum(0).tolist()), device=dev, dtype=torch.int32)
        bounds = cu.tolist()

        def loop():
            out = torch.empty_like(q)
            for a, b in zip(bounds, bounds[1:]):
                out[a:b] = torch.nn.functional.scaled_dot_product_attention(
                    q[a:b].transpose(0, 1)[None], k[a:b].transpose(0, 1)[None], v[a:b].transpose(0, 1)[None],
                    is_causal=True, enable_gqa=True)[0].transpose(0, 1)
            return out

        params = inspect.signature(varlen_attn).parameters
        extra = {"window_size": (-1, 0)} if "window_size" in params else {"is_causal": True}
        if "enable_gqa" in params:
            extra["enable_gqa"] = True

        def packed():
            return varlen_attn(q, k, v, cu, cu, max(lens), max(lens), **extra)

        try:
            error = (packed() - loop()).abs().max().item()
        except (RuntimeError, TypeError) as err:
            print(f"varlen_attn {count} prompts: {str(err).splitlines()[0]}")
            continue
        for fn in (loop, packed):
            fn()
        loop_ms = statistics.median(timed(loop) for _ in range(5))
        packed_ms = statistics.median(timed(packed) for _ in range(5))
        print(f"{count} prompts {lo}-{hi}: per-prompt SDPA loop {loop_ms:.2f} ms, varlen_attn {packed_ms:.2f} ms, "
              f"max |difference| {error:.4f}", flush=True)


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
    gemm_only() if "--gemm-only" in sys.argv else main()
