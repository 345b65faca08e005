"""Tensor parallelism on two GPUs (NCCL), a Llama-3.1-70B-shaped model (dummy weights, 80 layers, hidden
8192, 64/8 heads, MLP 28672; 141 GB in bf16, more than one H200 holds), each figure against a limit
measured in the same run on the same GPUs:

  decode   one engine step (rank 0 schedules nothing: a prepared batch, handed to rank 1, both replaying
           their CUDA graph with the all-reduces inside) at batch 1/16/64, 1k context, against the HBM
           floor of one GPU's share: its weights + its KV heads' bytes ÷ its copy bandwidth
           (goal ≤ 1.4× at batch 1, ≤ 1.5× at 64); the all-reduce share: the step's 160 all-reduces
           alone, captured in a graph and replayed on both GPUs
  prefill  one 2048-token prompt, eager, against two GPUs' bf16 GEMM rate               (goal ≥ 60 %)

  With --expert-parallel (a MoE model, its experts split by id), and --data-parallel-attention (each
  GPU its own sequences, eager steps): the decode step and prefill times, set beside the one-GPU
  figures of benchmarks/moe_bench.py (the floors above assume dense weights).

    python benchmarks/tp_bench.py --model DIR [--expert-parallel] [--data-parallel-attention] [--json OUT]
                          (2 GPUs; DIR made by `pdpipe make-model`; or device_run.sh tp70b, ep2, dp2)
Figures in benchmarks/RESULTS.md, "Tensor parallelism on two GPUs" and "Mixture of experts on GPU".
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_bench import attention_flops, batch_of, copy_bandwidth, cuda_time, gemm_tflops, release, weight_bytes  # noqa: E402

BLOCK = 16
BATCHES = (1, 16, 64)


def all_reduce_ms(hidden: int, layers: int, batch: int) -> float:
    """The decode step's all-reduces alone (two a layer, [batch, hidden] bf16), as one graph replay."""
    x = torch.ones(batch, hidden, dtype=torch.bfloat16, device="cuda")

    def reduces():
        for _ in range(2 * layers):
            torch.distributed.all_reduce(x)

    from pdpipe.engine.graphs import capture

    graph, _ = capture(reduces, None)
    return cuda_time(graph.replay, iters=20) * 1e3


def rank_main(rank: int, model: str, store: str, results, expert_parallel: bool, data_parallel: bool) -> None:
    failed = False
    try:
        measure(rank, model, store, results, expert_parallel, data_parallel)
    except BaseException:  # noqa: BLE001 — reported, and the exit code says so
        import traceback

        traceback.print_exc()
        failed = True
    results.close()
    results.join_thread()
    os._exit(1 if failed else 0)  # NCCL's and gloo's threads can abort the interpreter's teardown


def measure(rank: int, model: str, store: str, results, expert_parallel: bool, data_parallel: bool) -> None:
    from pdpipe.config import CacheConfig, EngineConfig, SchedulerConfig
    from pdpipe.engine.engine import LLMEngine
    from pdpipe.messages import SamplingParams
    from pdpipe.models.parallel import join_group
    from pdpipe.models.spec import load_spec

    torch.cuda.set_device(rank)
    tp = join_group(rank, 2, f"file://{store}", f"cuda:{rank}")
    whole = load_spec(model)
    out: dict = {"rank": rank, "copy_bw_TBps": copy_bandwidth(rank) / 1e12, "gemm_tflops": gemm_tflops(rank)}
    out["all_reduce_ms"] = {b: all_reduce_ms(whole.hidden_size, whole.num_layers, b) for b in BATCHES}
    cfg = EngineConfig(model=model, device=f"cuda:{rank}", dtype="bfloat16", load_format="dummy",
                       expert_parallel=expert_parallel, data_parallel_attention=data_parallel,
                       cache=CacheConfig(block_size=BLOCK, num_blocks=64 * 1040 // BLOCK + 256),
                       scheduler=SchedulerConfig(max_num_seqs=64, max_num_batched_tokens=8192, max_model_len=8192))
    start = time.perf_counter()
    engine = LLMEngine(cfg, tp=tp)
    out["engine_start_s"] = time.perf_counter() - start
    out["weights_GB"] = weight_bytes(engine.model) / 1e9
    out["memory_GB"] = torch.cuda.memory_allocated() / 1e9
    if rank:
        engine.runner.follow()
        results.put(out)
        return
    start = time.perf_counter()
    engine.warm_up()
    out["warm_up_s"] = time.perf_counter() - start
    engine.kv_cache.data.view(-1).normal_()
    spec, bw = engine.spec, out["copy_bw_TBps"] * 1e12
    rows = []
    for batch in BATCHES:
        step_out = batch_of(engine, [1024] * batch, decode=True)
        step = cuda_time(lambda: engine.runner.execute(step_out)[0].argmax(-1).tolist(), iters=30)
        floor = (weight_bytes(engine.model) + batch * 1024 * spec.kv_bytes_per_token) / bw
        reduce_ms = out["all_reduce_ms"][batch]
        rows.append(dict(batch=batch, step_ms=step * 1e3, floor_ms=floor * 1e3, step_x_floor=step / floor,
                         all_reduce_ms=reduce_ms, all_reduce_share=reduce_ms / (step * 1e3),
                         tokens_per_s=batch / step))
        release(engine, step_out)
    out["decode"] = rows
    matmul_params = 2 * (weight_bytes(engine.model) // 2) - whole.vocab_size * whole.hidden_size  # both ranks'
    prefill = batch_of(engine, [2048], decode=False)
    t = cuda_time(lambda: engine.runner.execute(prefill)[0].argmax(-1).tolist(), iters=10)
    release(engine, prefill)
    flops = 2 * matmul_params * 2048 + attention_flops(whole, [2048])
    two_gemm = 2 * out["gemm_tflops"]
    out["prefill_2048"] = dict(ms=t * 1e3, tflops=flops / t / 1e12,
                               pct_of_two_gpus_gemm=100 * flops / t / 1e12 / two_gemm)
    # the engine's own path too: a request through add_request/step, greedy
    engine.add_request("r", list(range(1, 2049)), SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True))
    start, tokens = time.perf_counter(), []
    while engine.has_unfinished():
        for o in engine.step():
            tokens += o.token_ids
    out["request_2048_16_s"] = time.perf_counter() - start
    out["request_tokens"] = len(tokens)
    out["leak_free"] = engine.leak_free()
    engine.runner.stop_followers()
    results.put(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--json", default="")
    parser.add_argument("--expert-parallel", action="store_true")
    parser.add_argument("--data-parallel-attention", action="store_true")
    args = parser.parse_args()
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    store = os.path.join(tempfile.mkdtemp(), "store")
    ranks = [ctx.Process(target=rank_main, args=(r, args.model, store, results, args.expert_parallel,
                                                 args.data_parallel_attention)) for r in range(2)]
    for p in ranks:
        p.start()
    got = {}
    while len(got) < 2:
        try:
            item = results.get(timeout=5)
        except Exception:  # noqa: BLE001 — queue.Empty: see whether a rank died
            if any(p.exitcode not in (None, 0) for p in ranks):
                sys.exit(f"a rank failed: exit codes {[p.exitcode for p in ranks]}")
            continue
        got[item["rank"]] = item
    for p in ranks:
        p.join(timeout=60)
        if p.is_alive():
            p.kill()
    r0 = got[0]
    print(json.dumps(got, indent=1, default=str))
    label = f"{Path(args.model).name} TP2{' EP' if args.expert_parallel else ''}" \
            f"{' DP attention' if args.data_parallel_attention else ''}"
    print(f"{label}: weights {r0['weights_GB']:.1f} GB a GPU, copy {r0['copy_bw_TBps']:.2f} TB/s, "
          f"GEMM {r0['gemm_tflops']:.0f} TFLOP/s a GPU")
    for row in r0["decode"]:
        # MoE: no dense floor here (moe_bench's is of the experts a step reads)
        floor = "" if args.expert_parallel else f", floor {row['floor_ms']:.2f} ms, {row['step_x_floor']:.2f}x"
        print(f"decode batch {row['batch']:>3}: {row['step_ms']:.2f} ms{floor}; "
              f"all-reduces {row['all_reduce_ms']:.2f} ms ({100 * row['all_reduce_share']:.0f} %); "
              f"{row['tokens_per_s']:.0f} tok/s")
    p = r0["prefill_2048"]
    print(f"prefill 2048: {p['ms']:.1f} ms, {p['tflops']:.0f} TFLOP/s, "
          f"{p['pct_of_two_gpus_gemm']:.0f} % of two GPUs' GEMM")
    if args.json:
        Path(args.json).write_text(json.dumps(got, indent=1, default=str))


if __name__ == "__main__":
    main()
