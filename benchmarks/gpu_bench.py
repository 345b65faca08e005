"""GPU benchmarks, each against a limit measured in the same run:

  transfer  4k-token Llama-3.1-8B KV (32 layers, 8 KV heads, dim 128, bf16, scattered blocks) GPU0 → GPU1
            through CUDA IPC, against a raw 1 GiB peer copy                                  (goal ≥ 90 %)
  decode    one decode step of the 8B shape at batch 1/16/64, 1k context, against the HBM floor
            (weight + KV bytes ÷ device copy bandwidth)                          (goal ≤ 1.3× / ≤ 1.5×)
  prefill   one 2k prompt and 8×512: TFLOP/s against a bf16 GEMM                               (goal ≥ 60 %)
  ttft      time to first token through the launched 1P+1D pipeline on two GPUs, 4k and 128-token
            prompts, against the prefill compute alone (overhead ≤ 5 % at 4k), and through one mixed
            engine behind the same front-end
  profile   the decode step's kernels, by time (not part of the table); quantprofile: with wint8 and wint4
            weights
  tpcopy    the same KV between instances of different tensor parallelism (TP2 pool pair → TP1 pool,
            TP1 → TP2) through the CUDA IPC backend's head-range plan, against the raw peer copy
  rdma      the Mooncake backend moving the same 4k-token KV between two processes' GPU pools over tcp
  hf        the same model under transformers: decode tokens/s at batch 1 and time to first token
  hosttier  an 8k-token context to the host tier and back against pinned copies (goal >= 70 %) and
            against recomputing it (goal restore >= 5x faster)
  cacheoverhead  prefix caching on against off where nothing is reused (goal <= 2 % throughput)
  hitstep   a mixed engine's step computing a 150-token prompt after a cached 3k-token history beside
            0-24 decodes, against the decode steps around it, as planned and forced eager
  quantload the 8B shape's bf16 checkpoint (8 of its layers, real files) loaded onto the GPU plain and
            quantized online: time and peak GPU memory above what it holds (goal: + one bf16 layer + 2 GiB)
  quantdecode  the decode step with wint4, fp8 and wint8 weights (dummy, quantized as made) against the floor
            of the bytes it reads as stored (goal <= 1.3x at batch 1, <= 1.5x at 64)
  quant70bdecode  the same for the Llama-3.1-70B shape in wint4 on one GPU (goal <= 1.25x at batch 1)
  quantprefill  prompt steps with fp8 weights (weight-only and W8A8: activation_quantization = fp8), wint8
            and wint4, as the prefill stage measures bf16

Usage: python benchmarks/gpu_bench.py [--only transfer,decode,...] [--json OUT.json]
       (or bash benchmarks/device_run.sh bench transfer,decode,...; figures in benchmarks/RESULTS.md,
       "GPU data path")
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import statistics
import time
from pathlib import Path

import torch

LLAMA_8B = dict(arch="llama", layers=32, hidden=4096, heads=32, kv_heads=8, intermediate=14336, vocab=128256,
                max_position=131072, dtype="bfloat16", weights=False)
LLAMA_70B = dict(LLAMA_8B, layers=80, hidden=8192, heads=64, intermediate=28672)
BLOCK = 16


def cuda_time(fn, iters: int = 20, warmup: int = 3) -> float:
    """Median seconds of `fn` on the current stream, timed with CUDA events."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return statistics.median(times)


def copy_bandwidth(device: int, nbytes: int = 4 << 30) -> float:
    """Device-to-device copy, bytes read + written per second."""
    with torch.cuda.device(device):
        a = torch.randint(0, 255, (nbytes,), dtype=torch.uint8, device="cuda")
        b = torch.empty_like(a)
        t = cuda_time(lambda: b.copy_(a))
        del a, b
    return 2 * nbytes / t


def gemm_tflops(device: int, n: int = 8192) -> float:
    with torch.cuda.device(device):
        a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
        b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
        t = cuda_time(lambda: a @ b)
    return 2 * n ** 3 / t / 1e12


def model_dir(root: Path, shape: dict = LLAMA_8B, name: str = "llama-8b-shape") -> Path:
    from dataclasses import replace

    from pdpipe.models.make import MakeModelConfig, make_model

    path = root / name
    if not (path / "config.json").exists():
        make_model(path, replace(MakeModelConfig(), **shape))
    return path


# ---- transfer --------------------------------------------------------------------------------------

def _pool_owner(conn, shape):
    from pdpipe.ipc.cuda import CudaPool

    pool = CudaPool(shape, torch.bfloat16, 0)
    pool.tensor.view(-1).normal_()
    torch.cuda.synchronize()
    conn.send(pool.export())
    conn.recv()
    pool.close()


def bench_transfer(results: dict) -> None:
    from pdpipe.ipc.cuda import CudaPool, open_pool
    from pdpipe.kernels import triton_ops

    num_blocks, tokens = 1024, 4096
    shape = (32, 2, num_blocks, BLOCK, 8, 128)
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    owner = ctx.Process(target=_pool_owner, args=(child, shape))
    owner.start()
    handle, offset = parent.recv()
    try:
        src = open_pool(handle, offset, shape, torch.bfloat16, 1)
        torch.cuda.set_device(1)  # the copy runs on the destination GPU and reads the source over NVLink
        dst_pool = CudaPool(shape, torch.bfloat16, 1)
        dst = dst_pool.tensor
        n = tokens // BLOCK
        gen = torch.Generator().manual_seed(0)
        src_ids = torch.randperm(num_blocks, generator=gen)[:n].int().cuda(1)
        dst_ids = torch.randperm(num_blocks, generator=gen)[:n].int().cuda(1)
        moved = n * 32 * 2 * BLOCK * 8 * 128 * 2
        flat_src, flat_dst = src.view(-1)[: (1 << 30) // 2], dst.view(-1)[: (1 << 30) // 2]
        raw = (1 << 30) / cuda_time(lambda: flat_dst.copy_(flat_src))
        per_layer = moved / cuda_time(lambda: [triton_ops.copy_pool_blocks(src, src_ids, dst, dst_ids, layer, 1)
                                              for layer in range(32)])
        one_launch = moved / cuda_time(lambda: triton_ops.copy_pool_blocks(src, src_ids, dst, dst_ids, 0, 32))
        ok = torch.equal(dst[:, :, dst_ids.long()].cpu(), src[:, :, src_ids.long()].cpu())
        results["transfer"] = dict(bytes=moved, raw_peer_GBps=raw / 1e9, per_layer_GBps=per_layer / 1e9,
                                   one_launch_GBps=one_launch / 1e9, per_layer_pct=100 * per_layer / raw,
                                   one_launch_pct=100 * one_launch / raw, correct=ok)
        dst_pool.close()
    finally:
        parent.send("done")
        owner.join(timeout=60)


def _tp_pool_owner(conn, pools):
    """Makes the pools {name: (shape, gpu)} (random), hands out their IPC handles, keeps them until told."""
    from pdpipe.ipc.cuda import CudaPool

    made = {}
    for name, (shape, gpu) in pools.items():
        made[name] = CudaPool(shape, torch.bfloat16, gpu)
        made[name].tensor.view(-1).normal_()
    torch.cuda.synchronize()
    conn.send({name: pool.export() for name, pool in made.items()})
    conn.recv()
    for pool in made.values():
        pool.close()


def bench_tp_copy(results: dict) -> None:
    """KV of a 4k-token request (8B shape) between instances of different tensor parallelism through
    the CUDA IPC backend (`head_copy_plan`: a launch a run of heads a layer, on the destination rank's
    GPU): a TP2 pool pair (GPU0: heads 0-3, GPU1: heads 4-7) into a TP1 pool on GPU1, and a TP1 pool on
    GPU0 into a TP2 pair; against the raw GPU0 → GPU1 peer copy of 1 GiB. With four GPUs also between
    instances on separate GPUs (TP2 on 0-1 into TP2 on 2-3, into TP1 on 2; TP1 on 0 into TP2 on 2-3),
    beside two peer copies at once (0 → 2 and 1 → 3). Timed on the GPU from the
    first copy's start to the last's end: all layers in one send (the copy's own speed), and a send a
    layer (as a prefill announces them; the span then includes the host's time between sends)."""
    from pdpipe.ipc.cuda_transfer import CudaIpcTransfer
    from pdpipe.messages import PoolInfo
    from pdpipe.transfer.base import TransferJob, TransferState

    num_blocks, layers = 512, 32
    half, whole = (layers, 2, num_blocks, BLOCK, 4, 128), (layers, 2, num_blocks, BLOCK, 8, 128)
    layout = {"p2.0": (half, 0), "p2.1": (half, 1), "d1": (whole, 1), "p1": (whole, 0), "d2.0": (half, 0),
              "d2.1": (half, 1)}
    pairs = [("TP2 -> TP1", "p2", "d1"), ("TP1 -> TP2", "p1", "d2")]
    four = torch.cuda.device_count() >= 4  # instances on separate GPUs: 0-1 → 2-3, 0-1 → 2, 0 → 2-3
    if four:
        layout.update({"q2.0": (half, 2), "q2.1": (half, 3), "t1": (whole, 2)})
        pairs += [("TP2 (0-1) -> TP2 (2-3)", "p2", "q2"), ("TP2 (0-1) -> TP1 (2)", "p2", "t1"),
                  ("TP1 (0) -> TP2 (2-3)", "p1", "q2")]
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    owner = ctx.Process(target=_tp_pool_owner, args=(child, layout))
    owner.start()
    handles = parent.recv()
    try:
        a = torch.empty(1 << 29, dtype=torch.bfloat16, device="cuda:0")
        b = torch.empty(1 << 29, dtype=torch.bfloat16, device="cuda:1")
        torch.cuda.set_device(1)
        raw = (1 << 30) / cuda_time(lambda: b.copy_(a))
        del a, b
        if four:  # two peer copies at once, 0 → 2 and 1 → 3: what a TP2 → TP2 transfer may reach
            src_pair = [torch.empty(1 << 29, dtype=torch.bfloat16, device=f"cuda:{g}") for g in (0, 1)]
            dst_pair = [torch.empty(1 << 29, dtype=torch.bfloat16, device=f"cuda:{g}") for g in (2, 3)]
            streams = [torch.cuda.Stream(device=f"cuda:{g}") for g in (2, 3)]

            def both():
                for src_t, dst_t, stream in zip(src_pair, dst_pair, streams):
                    with torch.cuda.stream(stream):
                        dst_t.copy_(src_t, non_blocking=True)
                for g in (2, 3):
                    torch.cuda.synchronize(g)
            both()
            start = time.perf_counter()
            for _ in range(5):
                both()
            results["peer_pair_GBps"] = 2 * (1 << 30) * 5 / (time.perf_counter() - start) / 1e9
            del src_pair, dst_pair
        rows = {}
        for label, src, dst in pairs:
            backend = CudaIpcTransfer()
            for name, (shape, gpu) in layout.items():
                if name.split(".")[0] not in (src, dst):
                    continue
                rank = int(name.split(".")[1]) if "." in name else 0
                tp = 2 if "." in name else 1
                heads = list(range(8))[rank * 4:(rank + 1) * 4] if tp == 2 else list(range(8))
                handle, offset = handles[name]
                backend.register_pool(PoolInfo(instance=name.split(".")[0], path="", shape=list(shape),
                                               dtype="bfloat16", gpu=gpu, ipc_handle=handle, ipc_offset=offset,
                                               rank=rank, kv_heads=heads, tp=tp, group="bench"))
            n = 4096 // BLOCK
            gen = torch.Generator().manual_seed(5)
            src_ids = torch.randperm(num_blocks, generator=gen)[:n].tolist()
            dst_ids = torch.randperm(num_blocks, generator=gen)[:n].tolist()
            spans = {}
            for how, per_send in (("per layer", 1), ("all layers at once", layers)):
                times = []
                for _ in range(6):
                    job = TransferJob("bench", src, src_ids, dst, dst_ids)
                    for layer in range(0, layers, per_send):
                        backend.send_batch([job], layer, per_send)
                    while backend.poll(job) is TransferState.PENDING:
                        pass
                    times.append(job.seconds)
                    backend.finished(job)
                spans[how] = statistics.median(times[1:])
            seconds = spans["all layers at once"]
            views = {r: backend._view(info, 1) for r, (_, info) in backend.pools[src].items()}
            got = {r: backend._view(info, 1) for r, (_, info) in backend.pools[dst].items()}
            full_src = torch.cat([views[r] for r in sorted(views)], dim=4)[:, :, src_ids]
            full_dst = torch.cat([got[r] for r in sorted(got)], dim=4)[:, :, dst_ids]
            rows[label] = dict(bytes=job.bytes_moved, ms=seconds * 1e3, GBps=job.bytes_moved / seconds / 1e9,
                               per_layer_sends_ms=spans["per layer"] * 1e3,
                               pct_of_raw_peer=100 * job.bytes_moved / seconds / raw,
                               launches_per_layer=len(backend.copy_plan(job)[2]),
                               correct=bool(torch.equal(full_src, full_dst)))
        results["tp_copy"] = dict(raw_peer_GBps=raw / 1e9, **rows)
    finally:
        parent.send("done")
        owner.join(timeout=60)


# ---- rdma: the Mooncake backend moving a GPU pool between processes (over tcp here) ----------------------

def _mooncake_target(conn, shape):
    from pdpipe.ipc.cuda import CudaPool
    from pdpipe.messages import PoolInfo
    from pdpipe.rdma.mooncake import MooncakeTransfer

    pool = CudaPool(shape, torch.bfloat16, 1)
    backend = MooncakeTransfer("127.0.0.1", "tcp")
    conn.send(backend.expose(PoolInfo(instance="dst", path="", shape=list(shape), dtype="bfloat16"), pool.tensor))
    ids = conn.recv()
    conn.send(pool.tensor[:, :, ids].float().sum().item())
    conn.recv()


def bench_rdma(results: dict) -> None:
    from pdpipe.ipc.cuda import CudaPool
    from pdpipe.messages import PoolInfo
    from pdpipe.rdma.mooncake import MooncakeTransfer
    from pdpipe.transfer.base import TransferJob

    shape = (32, 2, 512, BLOCK, 8, 128)
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    target = ctx.Process(target=_mooncake_target, args=(child, shape))
    target.start()
    try:
        remote = parent.recv()
        src = CudaPool(shape, torch.bfloat16, 0)
        src.tensor.view(-1).normal_()
        torch.cuda.synchronize()
        backend = MooncakeTransfer("127.0.0.1", "tcp")
        backend.expose(PoolInfo(instance="src", path="", shape=list(shape), dtype="bfloat16"), src.tensor)
        backend.register_pool(remote)
        n = 4096 // BLOCK
        gen = torch.Generator().manual_seed(3)
        src_ids = torch.randperm(512, generator=gen)[:n].tolist()
        dst_ids = torch.randperm(512, generator=gen)[:n].tolist()
        job = TransferJob("bench", "src", src_ids, "dst", dst_ids)
        start = time.perf_counter()
        for layer in range(32):
            backend.send(job, layer)
        seconds = time.perf_counter() - start
        parent.send(dst_ids)
        remote_sum = parent.recv()
        local_sum = src.tensor[:, :, src_ids].float().sum().item()
        results["rdma_tcp"] = dict(bytes=job.bytes_moved, GBps=job.bytes_moved / seconds / 1e9,
                                   correct=abs(remote_sum - local_sum) <= 1e-3 * abs(local_sum))
    finally:
        parent.send("done")
        target.join(timeout=60)


# ---- engine on one GPU: decode steps and prefill ------------------------------------------------------

def make_engine(model: Path, device: int, max_num_seqs: int, num_blocks: int, graphs: bool = True,
                quantization: str = "", activation_quantization: str = ""):
    from pdpipe.config import CacheConfig, EngineConfig, SchedulerConfig
    from pdpipe.engine.engine import LLMEngine

    cfg = EngineConfig(model=str(model), device=f"cuda:{device}", dtype="bfloat16", load_format="dummy",
                       quantization=quantization, activation_quantization=activation_quantization,
                       cuda_graphs=graphs, cache=CacheConfig(block_size=BLOCK, num_blocks=num_blocks),
                       scheduler=SchedulerConfig(max_num_seqs=max_num_seqs, max_num_batched_tokens=16384,
                                                 max_model_len=8192))
    torch.cuda.set_device(device)
    engine = LLMEngine(cfg)
    engine.kv_cache.data.view(-1).normal_()
    return engine


def batch_of(engine, lengths: list[int], decode: bool):
    """A scheduler output for sequences of these context lengths: one new token each (decode), or whole
    prompts (prefill)."""
    from pdpipe.engine.scheduler import ScheduledChunk, SchedulerOutput
    from pdpipe.engine.sequence import Sequence
    from pdpipe.messages import SamplingParams

    out = SchedulerOutput()
    gen = torch.Generator().manual_seed(len(lengths))
    for i, n in enumerate(lengths):
        seq = Sequence(f"b{i}", torch.randint(0, min(128000, engine.spec.vocab_size), (n,), generator=gen).tolist(),
                       SamplingParams(max_tokens=8, temperature=0.0))
        seq.block_table = engine.blocks.allocate(engine.blocks.blocks_for(n + 1))
        out.chunks.append(ScheduledChunk(seq, n - 1, 1) if decode else ScheduledChunk(seq, 0, n))
    return out


def release(engine, out) -> None:
    for c in out.chunks:
        engine.blocks.free(c.seq.block_table)


def weight_bytes(model) -> int:
    """The bytes a step reads at most: the parameters but the embedding, quantized projections' codes and
    scales, and a MoE layer's stacked experts (plain tensors, or codes and scales, once fused)."""
    stacked = []
    for m in model.modules():
        for w in (getattr(m, "w13", None), getattr(m, "w2", None)):
            stacked += [w] if isinstance(w, torch.Tensor) else [w.codes, w.scale] if w is not None else []
    quantized = [b for n, b in model.named_buffers() if n.endswith((".codes", ".scale"))]
    return sum(t.numel() * t.element_size() for t in [*stacked, *quantized]) + \
        sum(p.numel() * p.element_size() for n, p in model.named_parameters() if "embed_tokens" not in n)


def bench_decode(model: Path, results: dict, copy_bw: float, quantization: str = "", key: str = "") -> None:
    """Decode steps of 1, 16 and 64 sequences of 1k context against the floor: the bytes a step reads (weights,
    quantized ones as stored, and the KV) over a device copy's bandwidth."""
    engine = make_engine(model, 0, 64, num_blocks=64 * 1040 // BLOCK + 64, quantization=quantization)
    spec = engine.spec
    rows = []
    for batch in (1, 16, 64):
        out = batch_of(engine, [1024] * batch, decode=True)
        step = cuda_time(lambda: engine.runner.execute(out)[0].argmax(-1).tolist(), iters=30)
        graph, _ = engine.runner.graphs.graphs[min(b for b in engine.runner.graphs.graphs if b >= batch)]
        replay = cuda_time(graph.replay, iters=30)
        kv = batch * 1024 * spec.kv_bytes_per_token
        floor = (weight_bytes(engine.model) + kv) / copy_bw
        rows.append(dict(batch=batch, step_ms=step * 1e3, graph_ms=replay * 1e3, floor_ms=floor * 1e3,
                         step_x_floor=step / floor, graph_x_floor=replay / floor, tokens_per_s=batch / step))
        release(engine, out)
    results[key or (f"decode_{quantization}" if quantization else "decode")] = rows
    from pdpipe.kernels import triton_ops

    results["skinny_vs_cublas_us"] = {f"{m}x{n}x{k}": [round(a * 1e3, 2), round(b * 1e3, 2)]
                                      for (m, n, k, *_), (a, b) in triton_ops.skinny_timings.items()}
    del engine
    torch.cuda.empty_cache()


def bench_quant_load(work: Path, results: dict, layers: int = 8) -> None:
    """Loading a bf16 checkpoint of the 8B shape (`layers` of its 32, real files) onto the GPU, plain and
    quantized online: the load's time, the GPU memory held after, and the peak above it (goal: the
    quantized size + one bf16 layer + 2 GiB; load time no worse than bf16's)."""
    from pdpipe.models.loader import load_model
    from pdpipe.models.make import make_model
    from pdpipe.models.make_config import MakeModelConfig
    from pdpipe.quant import QuantPlan

    folder = work / f"llama-8b-{layers}-layers"
    if not (folder / "config.json").is_file():
        make_model(folder, MakeModelConfig(arch="llama", layers=layers, hidden=4096, heads=32, kv_heads=8,
                                           intermediate=14336, vocab=128256, max_position=8192, dtype="bfloat16",
                                           shard_mb=2048))
    rows = []
    for scheme in ("", "wint4", "fp8", "wint8"):
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        model = load_model(folder, device="cuda", quant=QuantPlan(scheme) if scheme else None)
        torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        held = torch.cuda.memory_allocated() - base
        peak = torch.cuda.max_memory_allocated() - base
        layer = 2 * sum(p.numel() for p in model.model.layers[0].parameters()) if not scheme else 0
        rows.append(dict(scheme=scheme or "bf16", seconds=seconds, held_gib=held / 2**30,
                         peak_above_held_gib=(peak - held) / 2**30, bf16_layer_gib=layer / 2**30))
        print(rows[-1], flush=True)
        del model
    results["quantload"] = rows


def bench_host_tier(model: Path, results: dict) -> None:
    """An 8k-token context's KV (512 blocks of 16 tokens, 1 GiB for the 8B shape) copied to the host tier
    and back by HostTier (a block's layers in one copy), against one 1 GiB pinned copy each way in the same
    run (goal >= 70 %), and the restore against recomputing the 8k-token prompt (goal >= 5x faster)."""
    from pdpipe.engine.host_tier import HostTier

    engine = make_engine(model, 0, 8, num_blocks=8192 // BLOCK + 64, graphs=False)
    n = 8192 // BLOCK
    tier = HostTier(engine.kv_cache, n)
    device_ids = engine.blocks.allocate(n)
    t_out = cuda_time(lambda: tier.run([("out", d, h) for h, d in enumerate(device_ids)]), iters=5)
    t_in = cuda_time(lambda: tier.run([("in", h, d) for h, d in enumerate(device_ids)]), iters=5)
    nbytes = n * tier.block_bytes
    pinned = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    dev = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    t_h2d = cuda_time(lambda: dev.copy_(pinned, non_blocking=True), iters=5)
    t_d2h = cuda_time(lambda: pinned.copy_(dev, non_blocking=True), iters=5)
    del pinned, dev, tier
    engine.blocks.free(device_ids)
    out = batch_of(engine, [8192], decode=False)
    t_prefill = cuda_time(lambda: engine.runner.execute(out)[0].argmax(-1).tolist(), iters=3)
    release(engine, out)
    results["host_tier"] = dict(blocks=n, bytes=nbytes, out_ms=t_out * 1e3, in_ms=t_in * 1e3,
                                out_GBps=nbytes / t_out / 1e9, in_GBps=nbytes / t_in / 1e9,
                                pinned_d2h_GBps=nbytes / t_d2h / 1e9, pinned_h2d_GBps=nbytes / t_h2d / 1e9,
                                out_share=t_d2h / t_out, in_share=t_h2d / t_in, recompute_ms=t_prefill * 1e3,
                                restore_speedup=t_prefill / t_in)
    print(f"host tier: 8k tokens out {t_out * 1e3:.1f} ms ({t_d2h / t_out:.0%} of a pinned copy), in "
          f"{t_in * 1e3:.1f} ms ({t_h2d / t_in:.0%}); recompute {t_prefill * 1e3:.1f} ms: restore "
          f"{t_prefill / t_in:.1f}x faster", flush=True)
    del engine
    torch.cuda.empty_cache()


def bench_cache_overhead(model: Path, results: dict, rounds: int = 3) -> None:
    """What prefix caching costs where nothing is reused: 64 random 512-token prompts x 64 output tokens
    on one engine, with the cache on and off in turn (interleaved, `rounds` times each: the noise is
    larger than the goal of <= 2 %)."""
    from pdpipe.messages import SamplingParams

    engine = make_engine(model, 0, 64, num_blocks=64 * 600 // BLOCK + 64)
    params = SamplingParams(max_tokens=64, temperature=0.0, ignore_eos=True)
    gen = torch.Generator().manual_seed(5)
    runs: dict[str, list[float]] = {"on": [], "off": []}
    for r in range(rounds + 1):  # the first round warms up
        for mode in ("on", "off"):
            engine.blocks.caching = mode == "on"
            engine.reset_prefix_cache()
            for i in range(64):
                engine.add_request(f"{mode}{r}-{i}", torch.randint(100, 120000, (512,), generator=gen).tolist(),
                                   params)
            torch.cuda.synchronize()
            start = time.perf_counter()
            while engine.has_unfinished():
                engine.step()
            torch.cuda.synchronize()
            if r:
                runs[mode].append(64 * 64 / (time.perf_counter() - start))
    on, off = statistics.median(runs["on"]), statistics.median(runs["off"])
    results["cache_overhead"] = dict(tokens_per_s_on=runs["on"], tokens_per_s_off=runs["off"],
                                     cost=1 - on / off)
    print(f"prefix caching on random prompts: {on:.0f} against {off:.0f} output tokens/s off ({1 - on / off:+.1%} "
          f"cost; runs on {[round(x) for x in runs['on']]}, off {[round(x) for x in runs['off']]})", flush=True)
    engine.blocks.caching = True
    del engine
    torch.cuda.empty_cache()


def bench_hit_step(model: Path, results: dict, context: int = 3000, suffix: int = 150, rounds: int = 6) -> None:
    """What a prompt that hits the prefix cache costs a mixed engine: the step computing a `suffix`-token
    prompt after a cached `context`-token history beside N decodes of `context` tokens, against the
    decode steps around it — as planned (a prefill graph of chunks after context while at most
    PrefillGraphs.MAX_SEQS chunks, else eager), forced eager, and the prompt's step alone; whole
    engine.step() times (host planning, the forward, sampling, bookkeeping), the host's planning apart."""
    from pdpipe.messages import SamplingParams

    engine = make_engine(model, 0, 64, num_blocks=40 * (context + 400) // BLOCK + 64)
    runner, plan = engine.runner, engine.runner.plan
    seen: list = []

    def recording(out, on_layer_done=None):
        start = time.perf_counter()
        step, seqs = plan(out, on_layer_done)
        seen.append((type(step).__name__, time.perf_counter() - start,
                     [(c.start, c.num_tokens) for c in out.chunks if c.num_tokens > 1]))
        return step, seqs

    runner.plan = recording
    gen = torch.Generator().manual_seed(7)

    def tokens(n: int) -> list[int]:
        return torch.randint(100, 120000, (n,), generator=gen).tolist()

    def timed_step() -> float:
        torch.cuda.synchronize()
        start = time.perf_counter()
        engine.step()
        torch.cuda.synchronize()
        return time.perf_counter() - start

    once = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)
    rows = []
    for decodes in (0, 4, 12, 24):
        ids = [f"d{decodes}-{i}" for i in range(decodes)]
        for rid in ids:
            engine.add_request(rid, tokens(context), SamplingParams(max_tokens=4096, temperature=0.0, ignore_eos=True))
        history = tokens(context)
        engine.add_request(f"h{decodes}", history, once)
        while engine.scheduler.waiting or any(s.num_output_tokens == 0 for s in engine.scheduler.running):
            engine.step()
        times: dict[str, list[float]] = {"decode": [], "hit": [], "hit_eager": []}
        kinds, plans, hits = set(), [], []
        for r in range(rounds + 1):  # the first round warms up
            for mode in ("hit", "hit_eager"):
                if decodes:
                    decode = timed_step()
                engine.add_request(f"q{decodes}-{r}-{mode}", history + tokens(suffix), once)
                graphs = runner.prefill_graphs
                if mode == "hit_eager":
                    runner.prefill_graphs = None
                seen.clear()
                took = timed_step()
                runner.prefill_graphs = graphs
                assert seen and seen[-1][2], f"round {r} ({mode}): the step held no prompt chunk"
                if r:
                    times[mode].append(took)
                    if decodes:
                        times["decode"].append(decode)
                    if mode == "hit":
                        kinds.add(seen[-1][0])
                        plans.append(seen[-1][1])
                        hits.append(seen[-1][2])
        if decodes == 12:  # where such a step's GPU time goes, kernel by kernel
            from torch.profiler import ProfilerActivity, profile

            engine.add_request(f"q{decodes}-profiled", history + tokens(suffix), once)
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                timed_step()
            results["hit_step_profile"] = prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=15,
                                                                    max_name_column_width=60)
            print(results["hit_step_profile"], flush=True)
        for rid in ids:
            engine.abort_request(rid)
        row = dict(decodes=decodes, context=context, suffix=suffix,
                   **{f"{k}_ms": statistics.median(v) * 1e3 for k, v in times.items() if v},
                   hit_plan=sorted(kinds), host_plan_ms=statistics.median(plans) * 1e3, prompt_chunks=hits[0])
        rows.append(row)
        print(f"hit step beside {decodes} decodes: {row.get('hit_ms', 0):.1f} ms ({'/'.join(kinds)}, host plan "
              f"{row['host_plan_ms']:.2f} ms), eager {row.get('hit_eager_ms', 0):.1f}, decode alone "
              f"{row.get('decode_ms', 0):.1f}; prompt chunks {hits[0]}", flush=True)
    results["hit_step"] = rows
    runner.plan = plan
    del engine
    torch.cuda.empty_cache()


def bench_profile(model: Path, results: dict, quantization: str = "") -> None:
    """Where a graph-replayed decode step spends its time, kernel by kernel (batch 1 and 64)."""
    from torch.profiler import ProfilerActivity, profile

    engine = make_engine(model, 0, 64, num_blocks=64 * 1040 // BLOCK + 64, quantization=quantization)
    tables = {}
    for batch in (1, 64):
        out = batch_of(engine, [1024] * batch, decode=True)
        graph, _ = engine.runner.graphs.graphs[min(b for b in engine.runner.graphs.graphs if b >= batch)]
        engine.runner.execute(out)  # the graph's inputs filled (its decode replay)
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(5):
                graph.replay()
            torch.cuda.synchronize()
        tables[batch] = prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=25,
                                                  max_name_column_width=70)
        print(f"decode batch {batch}, 5 replays\n{tables[batch]}", flush=True)
        release(engine, out)
    results[f"profile_{quantization}" if quantization else "profile"] = {str(b): t for b, t in tables.items()}
    del engine
    torch.cuda.empty_cache()


def attention_flops(spec, lengths) -> float:
    pairs = sum(n * (n + 1) / 2 for n in lengths)
    return 4 * spec.num_layers * spec.num_heads * spec.head_dim * pairs


def bench_prefill(model: Path, results: dict, gemm: float, quantization: str = "",
                  activation_quantization: str = "") -> None:
    """Prompt steps: TFLOP/s (the projections' FLOPs counted as bf16's, attention's, the head's) against a
    bf16 GEMM; with `quantization` (and `activation_quantization`), of a quantized model."""
    engine = make_engine(model, 0, 8, num_blocks=8192 // BLOCK + 64, graphs=False, quantization=quantization,
                         activation_quantization=activation_quantization)
    spec = engine.spec
    # the projections' parameters (the head's and the embeddings' aside), however their weights are stored
    matmul_params = spec.num_layers * (spec.hidden_size * (spec.num_heads + 2 * spec.num_kv_heads) * spec.head_dim
                                       + spec.num_heads * spec.head_dim * spec.hidden_size
                                       + 3 * spec.hidden_size * spec.intermediate_size)
    rows = []
    for label, lengths in (("1x2048", [2048]), ("8x512", [512] * 8), ("1x4096", [4096]), ("1x128", [128])):
        out = batch_of(engine, lengths, decode=False)
        t = cuda_time(lambda: engine.runner.execute(out)[0].argmax(-1).tolist(), iters=10)
        flops = 2 * matmul_params * sum(lengths) + attention_flops(spec, lengths) \
            + 2 * spec.vocab_size * spec.hidden_size * len(lengths)
        rows.append(dict(prompts=label, ms=t * 1e3, tflops=flops / t / 1e12, pct_of_gemm=100 * flops / t / 1e12 / gemm))
        release(engine, out)
    key = "_".join(filter(None, ("prefill", quantization, activation_quantization and "w8a8")))
    results[key] = rows
    if not quantization:
        results["attention_2k"] = attention_vs_sdpa(spec)
    del engine
    torch.cuda.empty_cache()


def attention_vs_sdpa(spec) -> dict:
    from pdpipe.kernels import triton_ops

    n, h, kvh, d = 2048, spec.num_heads, spec.num_kv_heads, spec.head_dim
    q = torch.randn(n, h, d, device="cuda", dtype=torch.bfloat16)
    kc = torch.randn(n // BLOCK, BLOCK, kvh, d, device="cuda", dtype=torch.bfloat16)
    vc = torch.randn_like(kc)
    tables = torch.arange(n // BLOCK, dtype=torch.int32, device="cuda")[None]
    qsl = torch.tensor([0, n], dtype=torch.int32, device="cuda")
    lens = torch.tensor([n], dtype=torch.int32, device="cuda")
    ours = cuda_time(lambda: triton_ops.extend_attention(q, kc, vc, tables, qsl, lens, n, d ** -0.5))
    qs = q.transpose(0, 1)[None]
    ks, vs = kc.view(n, kvh, d).transpose(0, 1)[None], vc.view(n, kvh, d).transpose(0, 1)[None]
    sdpa = cuda_time(lambda: torch.nn.functional.scaled_dot_product_attention(qs, ks, vs, is_causal=True,
                                                                             enable_gqa=True))
    flops = 4 * h * d * n * (n + 1) / 2
    return dict(triton_ms=ours * 1e3, sdpa_ms=sdpa * 1e3, triton_tflops=flops / ours / 1e12,
                sdpa_tflops=flops / sdpa / 1e12)


# ---- ttft through the launched pipeline --------------------------------------------------------------

class _Client:
    """Streams completions and times the first token, over one kept-alive connection (as the OpenAI
    SDK's connection pool does) or, with `fresh`, a new connection per request."""

    def __init__(self, port: int, fresh: bool = False):
        import http.client

        self.port, self.fresh = port, fresh
        self.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)

    def _post(self, payload: dict):
        body = json.dumps(payload).encode()
        if self.fresh:
            self.conn.close()
        sent, start = time.time(), time.perf_counter()
        self.conn.request("POST", "/v1/completions", body=body, headers={"Content-Type": "application/json"})
        return self.conn.getresponse(), sent, start

    def first_token(self, prompt: list[int]) -> tuple[float, str, float, float]:
        """(seconds to the first streamed token, request id, wall clock at sending, at the first token)."""
        resp, sent, start = self._post({"model": "llama-8b-shape", "prompt": prompt, "max_tokens": 2,
                                        "temperature": 0, "ignore_eos": True, "stream": True,
                                        "return_token_ids": True})
        while line := resp.readline():
            if line.startswith(b"data: {"):
                first, got = time.perf_counter() - start, time.time()
                resp.read()
                return first, json.loads(line[6:])["id"], sent, got
        raise RuntimeError(f"no token came back (HTTP {resp.status})")

    def rejected(self, prompt: list[int]) -> float:
        """Seconds for the front-end to read, parse and refuse (unknown model) a request of this size: the
        HTTP leg alone, without the pipeline."""
        resp, _, start = self._post({"model": "no-such-model", "prompt": prompt, "max_tokens": 2})
        resp.read()
        if resp.status != 404:
            raise RuntimeError(f"expected 404 for an unknown model, got {resp.status}")
        return time.perf_counter() - start


def _split(timeline: dict, sent: float, got: float) -> dict:
    """Where one request's time to first token went, from its trace and the client's clock."""
    when = {state + detail[:11]: t for t, state, _, detail in timeline["events"]}
    end = when.get("TRANSFERRINGprefill end", when.get("DECODING"))  # 1P+1D, or a mixed engine
    return dict(client_to_api_handler_ms=(timeline["arrival"] - sent) * 1e3,  # arrival: the handler's start
                handler_to_scheduler_ms=(when["QUEUED"] - timeline["arrival"]) * 1e3,
                scheduler_to_prefilling_ms=(when["PREFILLING"] - when["QUEUED"]) * 1e3,
                prefilling_ms=(end - when["PREFILLING"]) * 1e3,
                prefill_end_to_client_ms=(got - end) * 1e3)


def _serve(model: Path, instances: tuple):
    import socket
    import tempfile

    from pdpipe.config import ApiConfig, CacheConfig, EngineConfig, LaunchConfig, SchedulerConfig
    from pdpipe.launcher import Launcher

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cfg = LaunchConfig(
        name="bench", run_dir=tempfile.mkdtemp(prefix="pdb-", dir="/tmp"), ready_timeout=600,
        engine=EngineConfig(model=str(model), device="cuda", dtype="bfloat16", load_format="dummy",
                            cache=CacheConfig(block_size=BLOCK, num_blocks=4096),
                            scheduler=SchedulerConfig(max_num_seqs=16, max_num_batched_tokens=8192,
                                                      max_model_len=8192)),
        api=ApiConfig(port=port), instances=instances)
    launcher = Launcher(cfg)
    launcher.start()
    return launcher, cfg, port


def bench_ttft(model: Path, results: dict, prefill_ms: dict[str, float]) -> None:
    """1P+1D (prefill GPU0, decode GPU1), and one mixed engine on GPU0 through the same front-end: the
    difference is what disaggregation itself costs; both against the prefill compute alone."""
    from pdpipe.config import InstanceConfig
    from pdpipe.inspect import control, format_trace

    layouts = (("1P+1D", (InstanceConfig("prefill", gpus=(0,)), InstanceConfig("decode", gpus=(1,)))),
               ("mixed", (InstanceConfig("mixed", gpus=(0,)),)))
    rows = results["ttft_1p1d"] = []
    gen = torch.Generator().manual_seed(1)
    for layout, instances in layouts:
        launcher, cfg, port = _serve(model, instances)
        try:
            for n, label in ((4096, "1x4096"), (128, "1x128")):
                alone = prefill_ms[label] / 1e3
                prompts = [torch.randint(0, 128000, (n,), generator=gen).tolist() for _ in range(8)]
                probe = _Client(port)
                http_only = statistics.median(probe.rejected(p) for p in prompts)
                for fresh, pause in ((False, 0.0), (True, 0.0), (False, 0.05)):
                    client, runs = _Client(port, fresh), []
                    for p in prompts:
                        time.sleep(pause)  # load shape: a request arriving to an idle front-end
                        runs.append(client.first_token(p))
                    ttft = statistics.median(r[0] for r in runs[2:])
                    splits = [_split(control(cfg.run_dir, "trace", request_id=rid), sent, got)
                              for _, rid, sent, got in runs[2:]]
                    split = {k: statistics.median(s[k] for s in splits) for k in splits[0]}
                    trace = format_trace(control(cfg.run_dir, "trace", request_id=runs[-1][1]))
                    how = ("new connection each" if fresh else "kept-alive connection") + (
                        f", {pause * 1e3:.0f} ms apart" if pause else "")
                    print(f"ttft {layout} {n} tokens ({how}): {[round(r[0] * 1e3, 2) for r in runs]} ms; "
                          f"HTTP refusal alone {http_only * 1e3:.2f} ms; medians: {split}\n{trace}", flush=True)
                    rows.append(dict(layout=layout, prompt_tokens=n, connection=how, ttft_ms=ttft * 1e3,
                                     prefill_alone_ms=alone * 1e3, overhead_pct=100 * (ttft - alone) / alone,
                                     http_refusal_ms=http_only * 1e3, median_split=split,
                                     last_trace=trace.splitlines()))
        finally:
            launcher.stop()


# ---- transformers, the peer every user has ------------------------------------------------------------

def bench_hf(model: Path, results: dict) -> None:
    import transformers

    config = transformers.AutoConfig.from_pretrained(model)
    torch.cuda.set_device(0)
    with torch.device("cuda:0"):
        hf = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).eval()
    gen = torch.Generator().manual_seed(2)
    long = torch.randint(0, 128000, (1, 4096), generator=gen).cuda()
    short = torch.randint(0, 128000, (1, 128), generator=gen).cuda()
    with torch.no_grad():
        ttft = cuda_time(lambda: hf.generate(long, attention_mask=torch.ones_like(long), max_new_tokens=1,
                                             do_sample=False), iters=5, warmup=1)
        new = 128
        total = cuda_time(lambda: hf.generate(short, attention_mask=torch.ones_like(short), max_new_tokens=new,
                                              min_new_tokens=new, do_sample=False), iters=3, warmup=1)
        first = cuda_time(lambda: hf.generate(short, attention_mask=torch.ones_like(short), max_new_tokens=1,
                                              do_sample=False), iters=5, warmup=1)
    results["transformers"] = dict(ttft_4k_ms=ttft * 1e3, decode_tokens_per_s=(new - 1) / (total - first),
                                   version=transformers.__version__)
    del hf
    torch.cuda.empty_cache()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", default="transfer,rdma,decode,prefill,ttft,hf")
    parser.add_argument("--json", default=os.path.join(os.environ.get("OUT", "."), "gpu_bench.json"))
    parser.add_argument("--work", default="/tmp/pdpipe-bench")
    args = parser.parse_args()
    parts = set(args.only.split(","))
    results: dict = {"device": torch.cuda.get_device_name(0), "gpus": torch.cuda.device_count(),
                     "torch": torch.__version__, "date": time.strftime("%Y-%m-%d")}
    model = model_dir(Path(args.work))
    results["copy_bw_TBps"] = copy_bandwidth(0) / 1e12
    results["gemm_tflops"] = gemm_tflops(0)
    stages = [("transfer", lambda: bench_transfer(results)),
              ("tpcopy", lambda: bench_tp_copy(results)),
              ("rdma", lambda: bench_rdma(results)),
              ("decode", lambda: bench_decode(model, results, results["copy_bw_TBps"] * 1e12)),
              ("quantload", lambda: bench_quant_load(Path(args.work), results)),
              ("quantdecode", lambda: [bench_decode(model, results, results["copy_bw_TBps"] * 1e12, q)
                                       for q in os.environ.get("QUANT_SCHEMES", "wint4,fp8,wint8").split(",")]),
              ("quant70bdecode", lambda: bench_decode(model_dir(Path(args.work), LLAMA_70B, "llama-70b-shape"),
                                                      results, results["copy_bw_TBps"] * 1e12, "wint4",
                                                      "decode_70b_wint4")),
              ("prefill", lambda: bench_prefill(model, results, results["gemm_tflops"])),
              ("quantprefill", lambda: [bench_prefill(model, results, results["gemm_tflops"], q, a)
                                        for q, a in (("fp8", ""), ("fp8", "fp8"), ("wint8", ""), ("wint4", ""))]),
              ("ttft", lambda: bench_ttft(model, results, {r["prompts"]: r["ms"] for r in results.get("prefill", [])})),
              ("hf", lambda: bench_hf(model, results)),
              ("hosttier", lambda: bench_host_tier(model, results)),
              ("cacheoverhead", lambda: bench_cache_overhead(model, results)),
              ("hitstep", lambda: bench_hit_step(model, results)),
              ("profile", lambda: bench_profile(model, results)),
              ("quantprofile", lambda: [bench_profile(model, results, q) for q in ("wint8", "wint4")])]
    for name, run in stages:
        if name in parts:
            start = time.perf_counter()
            try:
                run()
            except Exception as exc:  # noqa: BLE001 — keep the other figures: a lease is short
                results[f"{name}_error"] = repr(exc)
            print(f"[{name}: {time.perf_counter() - start:.0f} s]", flush=True)
            Path(args.json).write_text(json.dumps(results, indent=2))
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
