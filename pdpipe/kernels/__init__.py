"""Kernels for the engine's hot paths, each beside the torch reference it is tested against.

The wrappers here pick the Triton kernel for CUDA tensors (when Triton is installed) and the torch
reference otherwise, so CPU engines and CI run the references.
"""
from __future__ import annotations

import torch

from . import reference
from .reference import copy_blocks, gather_blocks, scatter_blocks

try:  # Triton is optional: GPU machines have it, CPU-only installs need not
    from . import triton_moe, triton_ops, triton_quant
except ImportError:  # pragma: no cover - exercised on machines without triton
    triton_moe = triton_ops = triton_quant = None  # type: ignore[assignment]


def use_triton(t: torch.Tensor) -> bool:
    return t.is_cuda and triton_ops is not None


def compiled_variants() -> dict[str, int]:
    """How many compiled variants each of pdpipe's Triton kernels holds in this process (an autotuned kernel
    counted by its candidates compiled): a count that grows after the warm-up names a kernel a live step
    compiled (a second or more each; `EngineWorker` logs them with the slow step). Empty without Triton."""
    if triton_ops is None:
        return {}
    from triton.runtime.autotuner import Autotuner, Heuristics
    from triton.runtime.jit import JITFunction

    counts: dict[str, int] = {}
    for module in (triton_ops, triton_moe, triton_quant):
        for name, kernel in vars(module).items():
            fn = kernel
            while isinstance(fn, Autotuner | Heuristics):
                fn = fn.fn
            caches = getattr(fn, "device_caches", None)  # Triton 3.2 and later
            if isinstance(fn, JITFunction) and isinstance(caches, dict):
                counts[name] = sum(len(cache[0]) for cache in caches.values())
    return counts


def store_kv(key, value, k_cache, v_cache, slot_mapping) -> None:
    if use_triton(key):
        return triton_ops.store_kv(key, value, k_cache, v_cache, slot_mapping)
    return reference.store_kv(key, value, k_cache, v_cache, slot_mapping)


def paged_attention(query, k_cache, v_cache, block_tables, query_start_loc, seq_lens, scale,
                    sliding_window=None):
    """The reference's signature (python lists for offsets and lengths), for CPU and tests."""
    return reference.paged_attention(query, k_cache, v_cache, block_tables, query_start_loc, seq_lens, scale,
                                     sliding_window)


def decode_splits(max_seq_len: int, batch: int, kv_heads: int) -> int:
    """How many parts decode attention splits each sequence's context into (1 without Triton)."""
    return triton_ops.decode_splits(max_seq_len, batch, kv_heads) if triton_ops is not None else 1


def extend_splits(tokens: int, max_query_len: int, max_context: int, heads: int, kv_heads: int) -> int:
    """How many parts extend attention splits each query tile's keys into (1 without Triton)."""
    return triton_ops.extend_splits(tokens, max_query_len, max_context, heads, kv_heads) if triton_ops is not None \
        else 1


def rms_norm(x, weight, eps: float, residual=None):
    """(normalized, new residual): the residual add fused into the norm on GPU."""
    if use_triton(x) and x.dim() == 2:
        return triton_ops.rms_norm(x, weight, eps, residual)
    return reference.rms_norm(x, weight, eps, residual)


def rotary(x, cos, sin, interleaved: bool):
    if use_triton(x):
        return triton_ops.rotary(x, cos, sin, interleaved)
    return reference.rotary(x, cos, sin, interleaved)


def rope_and_store(q, k, v, cos, sin, k_cache, v_cache, slot_mapping, interleaved: bool, norms=None):
    """(rotated q, rotated k), with the rotated k and v written into the cache, each head RMS-normalised
    first where `norms` = (q weight, k weight, eps) is given: one launch on GPU."""
    ops = triton_ops if use_triton(q) else reference
    return ops.rope_and_store(q, k, v, cos, sin, k_cache, v_cache, slot_mapping, interleaved, norms)


_skinny = False  # decode engines turn it on: they time each shape while capturing their graphs


def enable_skinny() -> None:
    """Lets `linear` pick the skinny GEMM. An engine that captures CUDA graphs calls this first, so
    the per-shape timing happens at start-up; elsewhere a live request would pay for it."""
    global _skinny
    _skinny = True


def linear(x, weight, bias=None):
    """x @ weight.T + bias: cuBLAS, or on GPU for a few rows the skinny Triton GEMM where it measured faster."""
    if _skinny and use_triton(x) and triton_ops.skinny_wins(x, weight, bias):
        return triton_ops.skinny_linear(x, weight, bias)
    return torch.nn.functional.linear(x, weight, bias)


def quant_skinny_fits(x) -> bool:
    """Whether a quantized projection of `x` takes the weight-read Triton GEMM (GPU, a few rows) rather than
    its weights dequantized and cuBLAS."""
    return use_triton(x) and x.dim() == 2 and 1 <= x.shape[0] <= triton_quant.QUANT_MAX_ROWS and x.stride(1) == 1


def quant_skinny_linear(x, scheme: str, codes, scale, shape, cell, offset, bias=None):
    """x @ W.T (+ bias) for quantized W (see triton_quant), a few rows of x, on GPU."""
    return triton_quant.quant_skinny_linear(x, scheme, codes, scale, shape, cell, offset, bias)


W8A8_MIN_ROWS = 65  # prompt-sized: fewer rows read the weights at decode's rate weight-only (triton_quant)


def fp8_w8a8_fits(x, codes) -> bool:
    """Whether x @ W.T for FP8 codes W takes the FP8 GEMM with x quantized per row: prompt-sized x, and on
    GPU what its FP8 GEMM takes (bf16 x, K and N multiples of 16)."""
    if x.dim() != 2 or x.shape[0] < W8A8_MIN_ROWS:
        return False
    return not x.is_cuda or (x.dtype == torch.bfloat16 and x.shape[1] % 16 == 0 and codes.shape[0] % 16 == 0)


def fp8_w8a8_linear(x, codes, w_scale, bias=None):
    """x @ W.T (+ bias), W = codes (e4m3, [N, K]) x w_scale (float32 [N], a scale an output row), with x
    quantized per row to e4m3 (scale amax / 448, 1 for a row of zeros) and one FP8 GEMM accumulating in
    float32 (`torch._scaled_mm`: tensor cores on GPU), in x's dtype."""
    xq, scale = triton_quant.fp8_per_row(x) if use_triton(x) else reference.fp8_per_row(x)
    return torch._scaled_mm(xq, codes.t(), scale_a=scale, scale_b=w_scale.view(1, -1),
                            bias=bias.to(x.dtype) if bias is not None else None, out_dtype=x.dtype)


def quant_dequantize(scheme: str, codes, scale, shape, cell, offset, dtype):
    """A quantized weight [N, K] in `dtype` (code x scale in float32, then `dtype`), in one pass on GPU."""
    return triton_quant.dequantize(scheme, codes, scale, shape, cell, offset, dtype)


def silu_and_mul(gate_up):
    if use_triton(gate_up):
        return triton_ops.silu_and_mul(gate_up)
    return reference.silu_and_mul(gate_up)


def moe_route(logits, bias, top_k: int, renormalize: bool, norm_min: float):
    """The router's choice from its logits (see reference.moe_route): one launch on GPU."""
    ops = triton_moe if use_triton(logits) else reference
    return ops.moe_route(logits, bias, top_k, renormalize, norm_min)


ROUTER_FUSED_TOKENS = 1024  # from here a float32 router's GEMM and choice run as one kernel on GPU


def moe_router(x, gate, bias, top_k: int, renormalize: bool, norm_min: float, fp32: bool):
    """The router: its logits (x by gate, in float32 where `fp32`) and their choice (see
    reference.moe_router). On GPU one kernel for a float32 router (ERNIE's) over 16-bit x of
    ROUTER_FUSED_TOKENS rows or more (float32 x would take the kernel's slow "ieee" path); otherwise
    cuBLAS's GEMM and moe_route, which measured faster (benchmarks/moe_kernel_sweep.py, router: ERNIE's
    20 us against the kernel's 37 us up to 256 rows, 51 against 39 at 2048; a bf16 router's 17 us
    against 22 at every size — each program of the kernel reads the whole gate)."""
    if use_triton(x) and fp32 and x.dtype != torch.float32 and x.shape[0] >= ROUTER_FUSED_TOKENS:
        return triton_moe.moe_router(x, gate, bias, top_k, renormalize, norm_min, fp32)
    logits = reference.router_logits(x, gate, fp32)
    return moe_route(logits, bias, top_k, renormalize, norm_min)


def fused_moe(x, w13, w2, weights, ids, first_expert: int = 0, add=None):
    """Routed experts over stacked weights, plus `add` (see reference.fused_moe)."""
    ops = triton_moe if use_triton(x) else reference
    return ops.fused_moe(x, w13, w2, weights, ids, first_expert, add)


def copy_pool_blocks(src_pool, src_ids, dst_pool, dst_ids, first_layer: int = 0, num_layers: int = 1,
                     src_heads: slice | None = None, dst_heads: slice | None = None) -> None:
    ops = triton_ops if use_triton(dst_pool) else reference
    return ops.copy_pool_blocks(src_pool, src_ids, dst_pool, dst_ids, first_layer, num_layers, src_heads, dst_heads)


__all__ = ["W8A8_MIN_ROWS", "copy_blocks", "copy_pool_blocks", "decode_splits", "enable_skinny", "extend_splits",
           "fp8_w8a8_fits", "fp8_w8a8_linear", "fused_moe", "gather_blocks", "linear", "moe_route", "moe_router",
           "paged_attention", "quant_dequantize", "quant_skinny_fits", "quant_skinny_linear", "reference", "rms_norm",
           "rope_and_store", "rotary", "scatter_blocks", "silu_and_mul", "store_kv", "triton_moe", "triton_ops",
           "triton_quant", "use_triton"]
