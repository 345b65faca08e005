"""How big an engine's parts are, computed without torch (the front-end sizes requests with it): the KV
pool's blocks, the room for KV under gpu_memory_utilization, the longest sequence, the token count of
prefill CUDA graphs, the padding of steps on GPU; and what counts as a device fault."""
from __future__ import annotations

import sys

from pdpipe.config import DTYPE_BYTES, FP8_KV_SCALE_BYTES, EngineConfig
from pdpipe.models.spec import ModelSpec

# On GPU a step's token count is rounded up to a multiple of this with rows that write nowhere (slot -1)
# and belong to no sequence. cuBLAS pays ~3 ms the first time a GEMM runs at a row count it has not
# seen (H200, cuBLAS 13: one call in 3-6 at a random new count, 2-5 ms a new prompt length, and no
# sweep of other counts avoids it; benchmarks/RESULTS.md): with padding the counts are few enough for
# the warm-up to run them all.
TOKEN_PAD = 32


def device_fault(exc: BaseException) -> bool:
    """A GPU error that leaves the device unusable (an illegal address, a device-side assert): no
    request is at fault, and only a new process serves again. (A process without torch has none.)"""
    torch = sys.modules.get("torch")
    accelerator_error = getattr(torch, "AcceleratorError", None)
    return (accelerator_error is not None and isinstance(exc, accelerator_error)) or "CUDA error" in str(exc)


def kv_row_bytes(spec: ModelSpec, dtype: str, kv_cache_dtype: str = "auto") -> int:
    """Bytes of one token's one KV head in the pool: head_dim values of the model's dtype, or of an FP8 pool
    head_dim e4m3 codes and their float32 scale."""
    if kv_cache_dtype == "fp8":
        return spec.head_dim + FP8_KV_SCALE_BYTES
    return spec.head_dim * DTYPE_BYTES[dtype]


def kv_dtype_name(spec: ModelSpec, kv_cache_dtype: str) -> str:
    """What the KV is, for the prefix cache's hash root and for pairing pools: the model's dtype or fp8_e4m3."""
    return "fp8_e4m3" if kv_cache_dtype == "fp8" else spec.dtype


def block_bytes(spec: ModelSpec, block_size: int, dtype: str, kv_cache_dtype: str = "auto") -> int:
    """Bytes one KV block takes over all layers, keys and values (an FP8 pool's scales included)."""
    return 2 * spec.num_layers * block_size * spec.num_kv_heads * kv_row_bytes(spec, dtype, kv_cache_dtype)


def pool_blocks(spec: ModelSpec, config: EngineConfig, gpu_room: int | None = None) -> int:
    """KV blocks the pool gets: as configured, or as many as fit in `gpu_room` bytes (sized from
    gpu_memory_utilization), or in kv_cache_mb."""
    per_block = block_bytes(spec, config.cache.block_size, spec.dtype, config.cache.kv_cache_dtype)
    if config.cache.num_blocks:
        return config.cache.num_blocks
    return max(1, (gpu_room if gpu_room is not None else config.cache.kv_cache_mb * 2**20) // per_block)


# What is allocated after the pool is sized, counted against gpu_memory_utilization up front: the CUDA
# graphs (their activations for the largest decode batch and prefill step, and logits) and the kernel
# code the warm-up and the captures load (H200, test model: 1.4 GB in all; a 1 GiB reserve let an
# engine at a 0.25 share end 0.4 GB over it).
GRAPH_RESERVE = 2 << 30


def kv_room(utilization: float, total: int, free_at_start: int, free_now: int, step_peak: int,
            reserve: int = GRAPH_RESERVE) -> int:
    """Bytes for the KV pool under gpu_memory_utilization: the engine's share of the GPU (`utilization` ×
    `total`) less what it already uses (free memory before its weights less free memory now), a full
    step's activations beyond that (`step_peak`) and `reserve`; and no more than is free now less those.
    Refuses, naming the setting, when nothing is left."""
    used = free_at_start - free_now
    room = min(int(utilization * total) - used, free_now) - step_peak - reserve
    if room <= 0:
        gib = 2**30
        raise ValueError(
            f"gpu_memory_utilization: {utilization} of the GPU's {total / gib:.1f} GiB leaves no room for KV: the "
            f"weights take {used / gib:.1f} GiB, a full step's activations {step_peak / gib:.1f} GiB, the CUDA "
            f"graphs up to {reserve / gib:.1f} GiB, and {free_now / gib:.1f} GiB is free; raise it (or free the GPU)")
    return room


def resolve_max_model_len(spec: ModelSpec, config: EngineConfig, num_blocks: int) -> int:
    asked = config.scheduler.max_model_len
    pool_tokens = num_blocks * config.cache.block_size
    limit = min(spec.max_position_embeddings, pool_tokens)
    if asked > limit:
        raise ValueError(
            f"max_model_len: {asked} exceeds what fits: the model's max_position_embeddings is "
            f"{spec.max_position_embeddings} and the KV pool holds {pool_tokens} tokens "
            "(raise num_blocks or kv_cache_mb)")
    return asked or limit


def prefill_graph_limit(config: EngineConfig, spec: ModelSpec, ranks: int = 1) -> int:
    """How many tokens of whole prompts a step may hold to replay a prefill graph: the configured count,
    or by the model (-1): 512 for dense models, 2048 for mixture-of-experts ones (a MoE step launches
    ~20-30 kernels a layer for few FLOPs: an ERNIE-21B-A3B-shaped 2048-token prompt took longer to
    enqueue than to compute; benchmarks/RESULTS.md); never more than a step's token budget. With
    `ranks` data-parallel ranks, a rank's share: its MoE layers gather every rank's rows, so its graphs'
    memory (held for good, beside the eager steps') stays that of one graph of the whole count."""
    tokens = config.prefill_graph_tokens
    if tokens < 0:
        tokens = 2048 if spec.moe is not None else 512
    tokens = min(tokens, config.scheduler.max_num_batched_tokens)
    return tokens if ranks == 1 or not tokens else max(TOKEN_PAD, tokens // ranks)
