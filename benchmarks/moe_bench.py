"""Mixture-of-experts models on one GPU, each figure against a limit measured in the same run:

  decode   one step of an ERNIE-4.5-21B-A3B-shaped and a Qwen3-30B-A3B-shaped model (dummy weights, bf16,
           CUDA graphs, the fused MoE kernel) at batch 1/16/64, 1k context, against the HBM floor of the
           weights the step reads — everything but the experts, plus in each routed layer the experts
           its tokens select (counted by running the router on the step's own hidden states) — and its
           KV, at the device's copy bandwidth                       (goal ≤ 1.5× at batch 1, ≤ 1.6× at 64)
  prefill  one 2048-token prompt, FLOPs of the parameters each token uses (its top-k experts, the
           shared ones, the rest) and causal attention, against the bf16 GEMM            (goal ≥ 45 %)
  ernie300b      ERNIE-4.5-300B-A47B's shape (hidden 8192, 64 experts of 3584, top-8, MoE from layer 3) with
                 --layers of its 54 (as many as fit one GPU) and --quantization (wint4: experts int4, dense
                 int8, as FastDeploy): decode and prefill as above, and per layer, for the TP4 figure
  --profile      the kernels of decode steps of 1 and 64 and of the prefill, by time, and how long
                 Python takes to enqueue the eager prefill step (and where, by cProfile)
  --first-steps  prompt steps beyond the prefill graphs run twice on a started engine, with the Triton
                 kernels that compiled and the first run's costliest host calls (a first step should
                 cost what its second does)

    python benchmarks/moe_bench.py [--json OUT] [--models ernie,qwen,ernie300b] [--layers N] [--quantization Q]
                                   [--profile] [--first-steps]
                                        (GPU; makes the folders; or bash benchmarks/device_run.sh moebench)
Figures in benchmarks/RESULTS.md, "Mixture of experts on GPU"; JSON in benchmarks/results/moe/.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_bench import BLOCK, attention_flops, batch_of, copy_bandwidth, cuda_time, gemm_tflops, make_engine, release  # noqa: E402

SHAPES = {
    "ernie": ("ernie-21b-a3b-shape", dict(arch="ernie4_5_moe", layers=28, hidden=2560, heads=20, kv_heads=4,
                                          head_dim=128, intermediate=12288, moe_intermediate=1536, experts=64,
                                          top_k=6, shared_experts=2, first_moe_layer=1, vocab=103424)),
    "qwen": ("qwen3-30b-a3b-shape", dict(arch="qwen3_moe", layers=48, hidden=2048, heads=32, kv_heads=4,
                                         head_dim=128, intermediate=6144, moe_intermediate=768, experts=128,
                                         top_k=8, first_moe_layer=0, norm_topk=True, vocab=151936)),
    "ernie300b": ("ernie-300b-a47b-shape", dict(arch="ernie4_5_moe", layers=54, hidden=8192, heads=64, kv_heads=8,
                                                head_dim=128, intermediate=28672, moe_intermediate=3584, experts=64,
                                                top_k=8, shared_experts=0, first_moe_layer=3, vocab=103424)),
}


def model_dir(root: Path, name: str, layers: int = 0) -> Path:
    from dataclasses import replace

    from pdpipe.models.make import make_model
    from pdpipe.models.make_config import MakeModelConfig

    folder, shape = SHAPES[name]
    if layers:
        shape = {**shape, "layers": layers}
        folder += f"-{layers}l"
    path = root / folder
    if not (path / "config.json").exists():
        make_model(path, replace(MakeModelConfig(), max_position=131072, dtype="bfloat16", weights=False, **shape))
    return path


def expert_split(model) -> tuple[int, int, int, int, list]:
    """(bytes of every weight but the routed experts', and their parameters; bytes of one routed expert,
    and its parameters; the MoE layers). Quantized weights count their codes and scales."""
    from pdpipe.models.layers import QuantLinear
    from pdpipe.models.moe import MoE

    def stack(w) -> tuple[int, int]:  # one expert's (bytes, parameters) of a stacked weight
        if isinstance(w, torch.Tensor):
            return w[0].numel() * w.element_size(), w[0].numel()
        return (w.codes[0].numel() * w.codes.element_size() + w.scale[0].numel() * w.scale.element_size(),
                w.shape[1] * w.shape[2])

    layers = [m for m in model.modules() if isinstance(m, MoE)]
    (b13, p13), (b2, p2) = stack(layers[0].w13), stack(layers[0].w2)
    named = [(n, p) for n, p in model.named_parameters() if "embed_tokens" not in n]
    rest, params = sum(p.numel() * p.element_size() for _, p in named), sum(p.numel() for _, p in named)
    for m in model.modules():
        if isinstance(m, QuantLinear):
            rest += m.codes.numel() * m.codes.element_size() + m.scale.numel() * m.scale.element_size()
            params += m.out_features * m.in_features
    if model.spec.tie_word_embeddings:  # the LM head reads the embedding
        rest += model.model.embed_tokens.weight.numel() * model.model.embed_tokens.weight.element_size()
        params += model.model.embed_tokens.weight.numel()
    return rest, params, b13 + b2, p13 + p2, layers


def experts_read(engine, out, layers) -> int:
    """Distinct experts the step's tokens select, over the routed layers: the step run once eagerly with
    the routers watched."""
    seen: list[int] = []
    originals = {}
    for moe in layers:
        originals[moe] = moe.route

        def watched(x, moe=moe):
            weights, ids = originals[moe](x)
            seen.append(int(ids.unique().numel()))
            return weights, ids

        moe.route = watched
    runner = engine.runner
    runner.forward(runner.layout(out))
    for moe in layers:
        moe.route = originals[moe]
    return sum(seen)


def bench(name: str, root: Path, copy_bw: float, gemm: float, profile: bool = False, first: bool = False,
          layers_wanted: int = 0, quantization: str = "") -> dict:
    path = model_dir(root, name, layers_wanted)
    engine = make_engine(path, 0, 64, num_blocks=64 * 1040 // BLOCK + 64, quantization=quantization)
    if first:
        engine.warm_up()  # as an engine process starts
    first_steps = unseen_steps(engine) if first else None
    spec, model = engine.spec, engine.model
    rest, rest_params, expert, expert_params, layers = expert_split(model)
    rows = []
    for batch in (1, 16, 64):
        out = batch_of(engine, [1024] * batch, decode=True)
        step = cuda_time(lambda: engine.runner.execute(out)[0].argmax(-1).tolist(), iters=30)
        read = experts_read(engine, out, layers)
        floor = (rest + read * expert + batch * 1024 * spec.kv_bytes_per_token) / copy_bw
        rows.append(dict(batch=batch, step_ms=step * 1e3, floor_ms=floor * 1e3, step_x_floor=step / floor,
                         experts_read=read, experts_read_per_layer=read / len(layers), tokens_per_s=batch / step))
        release(engine, out)
    if profile:
        for row in (rows[0], rows[-1]):
            row["kernels"] = kernel_profile(engine, batch_of(engine, [1024] * row["batch"], decode=True))
    moe = spec.moe
    active = rest_params - spec.vocab_size * spec.hidden_size + len(layers) * moe.top_k * expert_params
    prompt = batch_of(engine, [2048], decode=False)
    t = cuda_time(lambda: engine.runner.execute(prompt)[0].argmax(-1).tolist(), iters=10)
    release(engine, prompt)
    flops = 2 * active * 2048 + attention_flops(spec, [2048])
    prefill = dict(ms=t * 1e3, tflops=flops / t / 1e12, pct_of_gemm=100 * flops / t / 1e12 / gemm)
    if profile:
        prefill["kernels"] = kernel_profile(engine, batch_of(engine, [2048], decode=False))
    result = dict(model=name, quantization=quantization, layers=spec.num_layers, moe_layers=len(layers),
                  weights_GB=(rest + expert * moe.num_experts * len(layers)) / 1e9, decode=rows,
                  prefill_2048=prefill, first_steps=first_steps)
    for row in rows:  # per layer (the embedding and LM head's share spread over them), for a deeper model's figure
        row["step_ms_per_layer"] = row["step_ms"] / spec.num_layers
        row["floor_ms_per_layer"] = row["floor_ms"] / spec.num_layers
    prefill["ms_per_layer"] = prefill["ms"] / spec.num_layers
    del engine
    torch.cuda.empty_cache()
    return result


def unseen_steps(engine) -> list[dict]:
    """Prompt steps the warmed-up engine has no CUDA graph for (over the prefill graphs' largest size),
    run once and again: their times, the Triton kernels that compiled a variant for them and the first
    run's costliest host calls (the first request of such a step under load waits for what a first
    run does more)."""
    import time

    import triton
    from torch.profiler import ProfilerActivity, profile

    from pdpipe.kernels import triton_moe, triton_ops

    jits = {name: k for module in (triton_ops, triton_moe) for name, k in vars(module).items()
            if isinstance(k, triton.runtime.jit.JITFunction)}

    def variants() -> dict[str, int]:
        return {name: sum(len(cache[0]) for cache in k.device_caches.values()) for name, k in jits.items()}

    out = []
    for lengths in ([1082, 1034, 1278], [2071], [1576, 1654], [3000]):
        before, times = variants(), []
        for again in (False, True):
            step = batch_of(engine, lengths, decode=False)
            torch.cuda.synchronize()
            start = time.perf_counter()
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                engine.runner.execute(step)[0].argmax(-1).tolist()
            times.append((time.perf_counter() - start) * 1e3)
            release(engine, step)
            if not again:  # where a first step's host time went
                slow = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)[:8]
        after = variants()
        out.append(dict(prompts=lengths, first_ms=round(times[0], 1), again_ms=round(times[1], 1),
                        compiled=[name for name in after if after[name] != before[name]],
                        first_top_ops_ms=[(e.key, round(e.self_cpu_time_total / 1e3, 1)) for e in slow]))
        print(json.dumps(out[-1]))
    return out


def kernel_profile(engine, out) -> dict:
    """One step run eagerly under the profiler: GPU time by kernel (the top 12, in µs), their sum and
    how many launches; next to the step's time it shows what the gaps between kernels cost."""
    from torch.profiler import ProfilerActivity, profile

    runner = engine.runner
    lay = runner.layout(out)
    runner.forward(lay)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        runner.forward(lay)
        torch.cuda.synchronize()
    events = [e for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA]
    events.sort(key=lambda e: -e.self_device_time_total)
    host = host_profile(runner, lay)
    release(engine, out)
    return {"total_us": sum(e.self_device_time_total for e in events), "launches": sum(e.count for e in events),
            "top": [(e.key[:60], e.count, round(e.self_device_time_total, 1)) for e in events[:12]], **host}


def host_profile(runner, lay) -> dict:
    """The same step's host side: how long Python takes to enqueue it (against the time until the GPU
    is done: a step whose enqueue takes as long is host-bound), and where that time goes (cProfile's
    top functions by their own time; cProfile slows Python, so read these as shares)."""
    import cProfile
    import pstats
    import time

    torch.cuda.synchronize()
    start = time.perf_counter()
    runner.forward(lay)
    enqueued = time.perf_counter()
    torch.cuda.synchronize()
    done = time.perf_counter()
    profiler = cProfile.Profile()
    profiler.enable()
    runner.forward(lay)
    torch.cuda.synchronize()
    profiler.disable()
    stats = pstats.Stats(profiler)
    rows = sorted(stats.stats.items(), key=lambda kv: -kv[1][2])[:20]  # type: ignore[attr-defined]
    return {"host_enqueue_ms": (enqueued - start) * 1e3, "host_wall_ms": (done - start) * 1e3,
            "host_top": [(f"{Path(f).name}:{line}:{fn}", calls, round(tt * 1e3, 2), round(ct * 1e3, 2))
                         for (f, line, fn), (_, calls, tt, ct, _) in rows]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", default="")
    parser.add_argument("--models", default="ernie,qwen")
    parser.add_argument("--work", default="/tmp/pdpipe-models")
    parser.add_argument("--profile", action="store_true", help="kernels of steps of 1 and 64, a prefill's")
    parser.add_argument("--first-steps", action="store_true", help="prompt steps beyond the graphs, first and again")
    parser.add_argument("--layers", type=int, default=0, help="layers of each model (0: its own count)")
    parser.add_argument("--quantization", default="", help="[engine] quantization: wint8, wint4, fp8, ...")
    args = parser.parse_args()
    copy_bw, gemm = copy_bandwidth(0), gemm_tflops(0)
    results = {"device": torch.cuda.get_device_name(0), "copy_bw_TBps": copy_bw / 1e12, "gemm_tflops": gemm,
               "models": [bench(m, Path(args.work), copy_bw, gemm, args.profile, args.first_steps, args.layers,
                                args.quantization) for m in args.models.split(",")]}
    print(json.dumps(results, indent=1))
    for r in results["models"]:
        for row in r["decode"]:
            print(f"{r['model']} {r['quantization'] or 'bf16'} ({r['layers']} layers) decode batch {row['batch']:>3}: "
                  f"{row['step_ms']:.2f} ms, floor {row['floor_ms']:.2f} ms, {row['step_x_floor']:.2f}x "
                  f"({row['experts_read_per_layer']:.1f} experts a layer; {row['step_ms_per_layer']:.3f} ms a layer)")
        p = r["prefill_2048"]
        print(f"{r['model']} prefill 2048: {p['ms']:.1f} ms, {p['pct_of_gemm']:.0f} % of GEMM")
        for name, k in (("decode batch 1", r["decode"][0].get("kernels")), ("prefill 2048", p.get("kernels"))):
            if k:
                print(f"  {name} eager: kernels {k['total_us'] / 1e3:.1f} ms ({k['launches']} launches), "
                      f"enqueued in {k['host_enqueue_ms']:.1f} ms, done in {k['host_wall_ms']:.1f} ms")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
