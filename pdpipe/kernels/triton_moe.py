"""Triton kernels of the routed experts: the router's top-k (`moe_route`), the sort of token-expert
pairs by expert (`moe_align`) and the two grouped GEMMs (`fused_moe`), each matching the function of
the same name in `reference.py`. A decode step's MoE layer is a handful of launches, none of them a
host sync, so CUDA graphs capture it."""
from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from .reference import QuantStack
from .triton_ops import _precision
from .triton_quant import fast_codes, high_nibbles_to_bf16, int8_to_bf16, low_nibbles_to_bf16, tile_scale

# ---- the router: softmax, top-k (by score + selection bias), renormalisation, a tile of tokens a program

@triton.jit
def _top_k_rows(logits, bias_ptr, weights_ptr, ids_ptr, t, tmask, offs, valid, norm_min, TOP_K: tl.constexpr,
                K_POW: tl.constexpr, HAS_BIAS: tl.constexpr, RENORM: tl.constexpr):
    """Each row's (token `t`'s) experts from its logits [rows, E] float32: stored as weights and ids."""
    logits = tl.where(valid[None, :], logits, -float("inf"))
    p = tl.exp(logits - tl.max(logits, 1)[:, None])
    p = p / tl.sum(p, 1)[:, None]
    score = p
    if HAS_BIAS:
        score = p + tl.load(bias_ptr + offs, mask=valid, other=0.0).to(tl.float32)[None, :]
    # a NaN score (a padding row of a CUDA graph may hold anything) never wins: every id stays in range
    score = tl.where(valid[None, :] & (score == score), score, -float("inf"))
    slots = tl.arange(0, K_POW)
    chosen_w = tl.zeros((logits.shape[0], K_POW), dtype=tl.float32)
    chosen_id = tl.zeros((logits.shape[0], K_POW), dtype=tl.int32)
    for j in tl.static_range(TOP_K):
        best = tl.argmax(score, 1)
        hit = offs[None, :] == best[:, None]
        w = tl.sum(tl.where(hit, p, 0.0), 1)
        chosen_w = tl.where(slots[None, :] == j, w[:, None], chosen_w)
        chosen_id = tl.where(slots[None, :] == j, best[:, None], chosen_id)
        score = tl.where(hit, -float("inf"), score)
    if RENORM:
        chosen_w = chosen_w / tl.maximum(tl.sum(chosen_w, 1), norm_min)[:, None]
    out = t[:, None] * TOP_K + slots[None, :]
    mask = tmask[:, None] & (slots[None, :] < TOP_K)
    tl.store(weights_ptr + out, chosen_w, mask=mask)
    tl.store(ids_ptr + out, chosen_id, mask=mask)


@triton.jit(do_not_specialize=["tokens"])  # see triton_ops.py, VARYING
def _moe_route_kernel(logits_ptr, bias_ptr, weights_ptr, ids_ptr, tokens, num_experts, stride_l, norm_min,
                      E: tl.constexpr, TOP_K: tl.constexpr, K_POW: tl.constexpr, HAS_BIAS: tl.constexpr,
                      RENORM: tl.constexpr, BLOCK_T: tl.constexpr):
    t = tl.program_id(0).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
    tmask = t < tokens
    offs = tl.arange(0, E)
    valid = offs < num_experts
    logits = tl.load(logits_ptr + t[:, None] * stride_l + offs[None, :], mask=tmask[:, None] & valid[None, :],
                     other=0.0).to(tl.float32)
    _top_k_rows(logits, bias_ptr, weights_ptr, ids_ptr, t, tmask, offs, valid, norm_min, TOP_K, K_POW, HAS_BIAS,
                RENORM)


@triton.jit(do_not_specialize=["tokens"])  # see triton_ops.py, VARYING
def _moe_router_kernel(x_ptr, w_ptr, bias_ptr, weights_ptr, ids_ptr, tokens, hidden, num_experts, stride_x,
                       norm_min, E: tl.constexpr, TOP_K: tl.constexpr, K_POW: tl.constexpr, HAS_BIAS: tl.constexpr,
                       RENORM: tl.constexpr, FP32: tl.constexpr, PRECISION: tl.constexpr, BLOCK_T: tl.constexpr,
                       BLOCK_H: tl.constexpr):
    """The router's GEMM and its choice in one kernel: logits = x · Wᵀ for a tile of tokens, in float32
    (FP32: ERNIE's router, as the model computes it in float32; PRECISION "tf32x3" where x is 16-bit:
    x's low part is zero, so the error is the gate's split alone — near float32's, not bit-equal to
    cuBLAS) or in x's dtype accumulated in float32 and rounded to it (a bf16 Linear), then _top_k_rows."""
    t = tl.program_id(0).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
    tmask = t < tokens
    offs = tl.arange(0, E)
    valid = offs < num_experts
    acc = tl.zeros((BLOCK_T, E), dtype=tl.float32)
    for h0 in range(0, hidden, BLOCK_H):
        h = h0 + tl.arange(0, BLOCK_H)
        hmask = h < hidden
        x = tl.load(x_ptr + t[:, None] * stride_x + h[None, :], mask=tmask[:, None] & hmask[None, :], other=0.0)
        w = tl.load(w_ptr + offs[None, :] * hidden + h[:, None], mask=valid[None, :] & hmask[:, None], other=0.0)
        if FP32:
            acc += tl.dot(x.to(tl.float32), w.to(tl.float32), input_precision=PRECISION)
        else:
            acc += tl.dot(x, w)
    if not FP32:
        acc = acc.to(w_ptr.dtype.element_ty).to(tl.float32)  # the Linear's output dtype, as the model rounds
    _top_k_rows(acc, bias_ptr, weights_ptr, ids_ptr, t, tmask, offs, valid, norm_min, TOP_K, K_POW, HAS_BIAS,
                RENORM)


ROUTE_TOKENS = 16  # tokens a program routes


def moe_route(logits, bias, top_k: int, renormalize: bool, norm_min: float):
    """reference.moe_route: (weights [tokens, top_k] float32, expert ids [tokens, top_k] int32). Of
    experts with exactly equal scores the lower id is taken first (torch.topk leaves that open: a router
    of all-equal logits may pick other experts on CPU than here)."""
    tokens, experts = logits.shape
    assert logits.stride(1) == 1 and 1 <= top_k <= experts and (bias is None or bias.numel() == experts)
    weights = torch.empty(tokens, top_k, dtype=torch.float32, device=logits.device)
    ids = torch.empty(tokens, top_k, dtype=torch.int32, device=logits.device)
    if tokens:
        _moe_route_kernel[(triton.cdiv(tokens, ROUTE_TOKENS),)](
            logits, bias if bias is not None else logits, weights, ids, tokens, experts, logits.stride(0), norm_min,
            E=triton.next_power_of_2(experts), TOP_K=top_k, K_POW=triton.next_power_of_2(top_k),
            HAS_BIAS=bias is not None, RENORM=renormalize, BLOCK_T=ROUTE_TOKENS)
    return weights, ids


ROUTER_TOKENS = 16  # tokens a program of the fused router takes (each reads the whole gate)


def moe_router(x, gate, bias, top_k: int, renormalize: bool, norm_min: float, fp32: bool,
               block_t: int = ROUTER_TOKENS, precision: str = ""):
    """reference.moe_router in one launch: the router's GEMM (x [tokens, hidden] by gate [experts,
    hidden]) and moe_route's choice. Each program reads the whole gate, so this is for steps of many
    tokens (a prompt's: one launch instead of the float32 copy of x, cuBLAS's GEMM and the choice);
    kernels.moe_router takes it for float32 routers over 16-bit x only (the bf16 path, a bf16 Linear's,
    measured slower than cuBLAS + moe_route and serves tests and the sweep). `precision` of the float32
    GEMM: "ieee" where x is float32, else "tf32x3" (near float32 at tensor-core speed, where "ieee" took
    120 us a layer for 2k ERNIE tokens)."""
    tokens, hidden = x.shape
    experts = gate.shape[0]
    assert x.stride(1) == 1 and gate.is_contiguous() and gate.shape[1] == hidden and 1 <= top_k <= experts
    fp32 = fp32 or gate.dtype == torch.float32  # a float32 Linear computes in float32 (no TF32)
    assert fp32 or x.dtype == gate.dtype, (x.dtype, gate.dtype)
    assert block_t >= 16 and block_t & (block_t - 1) == 0, f"block_t {block_t}: a power of two >= 16"
    assert bias is None or bias.numel() == experts
    weights = torch.empty(tokens, top_k, dtype=torch.float32, device=x.device)
    ids = torch.empty(tokens, top_k, dtype=torch.int32, device=x.device)
    if tokens:
        _moe_router_kernel[(triton.cdiv(tokens, block_t),)](
            x, gate, bias if bias is not None else gate, weights, ids, tokens, hidden, experts, x.stride(0), norm_min,
            E=max(16, triton.next_power_of_2(experts)), TOP_K=top_k, K_POW=triton.next_power_of_2(top_k),
            HAS_BIAS=bias is not None, RENORM=renormalize, FP32=fp32,
            PRECISION=precision or ("ieee" if x.dtype == torch.float32 else "tf32x3"), BLOCK_T=block_t,
            BLOCK_H=32 if fp32 else 64)
    return weights, ids


# ---- the pairs sorted by expert, each expert's run padded to whole blocks -------------------------
# Decode-sized steps: one program does it all. Larger ones: programs count their share of the pairs,
# one program turns the counts into each share's first slot per expert (and the block experts), and
# the programs place their pairs.

ALIGN_ONE_PROGRAM = 2048  # pairs up to which one program sorts them all
SHARE = 1024  # pairs a program counts and places beyond that
FILL = tl.constexpr(1024)  # slots a program writes at once


@triton.jit
def _expert_onehot(ids_ptr, offs, pairs, first_expert, experts, mine):
    local = tl.load(ids_ptr + offs, mask=offs < pairs, other=-1).to(tl.int32) - first_expert
    local = tl.where(offs < pairs, local, -1)
    return ((local[:, None] == experts[None, :]) & mine[None, :]).to(tl.int32)  # [CHUNK, E]


@triton.jit
def _padded_runs(counts, sorted_ptr, block_expert_ptr, pairs, size, blocks, mine, CHUNK: tl.constexpr,
                 BLOCK_M: tl.constexpr):
    """Writes the sentinel into every slot and each block's expert; returns each expert's first slot."""
    padded = (counts + BLOCK_M - 1) // BLOCK_M * BLOCK_M
    padded_end = tl.cumsum(padded, 0)
    for s0 in range(0, size, FILL):
        offs = s0 + tl.arange(0, FILL)
        tl.store(sorted_ptr + offs, tl.zeros((FILL,), dtype=tl.int32) + pairs, mask=offs < size)
    for b0 in range(0, blocks, CHUNK):  # a block's expert: how many experts' runs end at or before it
        b = b0 + tl.arange(0, CHUNK)
        ended = (padded_end[None, :] <= (b * BLOCK_M)[:, None]) & mine[None, :]
        tl.store(block_expert_ptr + b, tl.sum(ended.to(tl.int32), 1), mask=b < blocks)
    return padded_end - padded


@triton.jit
def _place_pairs(ids_ptr, sorted_ptr, lo, hi, first_expert, experts, mine, start, CHUNK: tl.constexpr):
    """Writes pairs lo..hi into their slots, each expert's from `start` on, in order."""
    for p0 in range(lo, hi, CHUNK):
        offs = p0 + tl.arange(0, CHUNK)
        onehot = _expert_onehot(ids_ptr, offs, hi, first_expert, experts, mine)
        rank = tl.sum((tl.cumsum(onehot, 0) - 1) * onehot, 1)  # earlier pairs of its expert in this chunk
        tl.store(sorted_ptr + tl.sum(onehot * start[None, :], 1) + rank, offs, mask=tl.sum(onehot, 1) > 0)
        start += tl.sum(onehot, 0)


@triton.jit(do_not_specialize=["pairs", "size", "blocks"])  # see triton_ops.py, VARYING
def _moe_align_kernel(ids_ptr, sorted_ptr, block_expert_ptr, pairs, first_expert, num_experts, size, blocks,
                      E: tl.constexpr, CHUNK: tl.constexpr, BLOCK_M: tl.constexpr):
    experts = tl.arange(0, E)
    mine = experts < num_experts
    counts = tl.zeros((E,), dtype=tl.int32)
    for p0 in range(0, pairs, CHUNK):
        counts += tl.sum(_expert_onehot(ids_ptr, p0 + tl.arange(0, CHUNK), pairs, first_expert, experts, mine), 0)
    start = _padded_runs(counts, sorted_ptr, block_expert_ptr, pairs, size, blocks, mine, CHUNK, BLOCK_M)
    tl.debug_barrier()  # the sentinels are down before the pairs overwrite theirs
    _place_pairs(ids_ptr, sorted_ptr, 0, pairs, first_expert, experts, mine, start, CHUNK)


@triton.jit(do_not_specialize=["pairs"])  # see triton_ops.py, VARYING
def _moe_count_kernel(ids_ptr, counts_ptr, pairs, first_expert, num_experts, E: tl.constexpr,
                      CHUNK: tl.constexpr, SHARE: tl.constexpr):
    share = tl.program_id(0)
    experts = tl.arange(0, E)
    mine = experts < num_experts
    counts = tl.zeros((E,), dtype=tl.int32)
    end = tl.minimum(share * SHARE + SHARE, pairs)
    for p0 in range(share * SHARE, end, CHUNK):
        counts += tl.sum(_expert_onehot(ids_ptr, p0 + tl.arange(0, CHUNK), end, first_expert, experts, mine), 0)
    tl.store(counts_ptr + share * E + experts, counts)


@triton.jit(do_not_specialize=["shares", "pairs", "size", "blocks"])  # see triton_ops.py, VARYING
def _moe_offsets_kernel(counts_ptr, starts_ptr, sorted_ptr, block_expert_ptr, shares, pairs, num_experts, size,
                        blocks, E: tl.constexpr, CHUNK: tl.constexpr, BLOCK_M: tl.constexpr):
    experts = tl.arange(0, E)
    mine = experts < num_experts
    counts = tl.zeros((E,), dtype=tl.int32)
    for share in range(0, shares):
        counts += tl.load(counts_ptr + share * E + experts)
    start = _padded_runs(counts, sorted_ptr, block_expert_ptr, pairs, size, blocks, mine, CHUNK, BLOCK_M)
    for share in range(0, shares):  # each share's pairs of an expert follow the earlier shares'
        tl.store(starts_ptr + share * E + experts, start)
        start += tl.load(counts_ptr + share * E + experts)


@triton.jit(do_not_specialize=["pairs"])  # see triton_ops.py, VARYING
def _moe_place_kernel(ids_ptr, starts_ptr, sorted_ptr, pairs, first_expert, num_experts, E: tl.constexpr,
                      CHUNK: tl.constexpr, SHARE: tl.constexpr):
    share = tl.program_id(0)
    experts = tl.arange(0, E)
    start = tl.load(starts_ptr + share * E + experts)
    _place_pairs(ids_ptr, sorted_ptr, share * SHARE, tl.minimum(share * SHARE + SHARE, pairs), first_expert, experts,
                 experts < num_experts, start, CHUNK)


def moe_align(ids, num_experts: int, first_expert: int, block_m: int):
    """reference.moe_align: one launch up to ALIGN_ONE_PROGRAM pairs, three beyond."""
    pairs = ids.numel()
    size = pairs + num_experts * (block_m - 1)
    blocks = -(-size // block_m)
    sorted_pairs = torch.empty(size, dtype=torch.int32, device=ids.device)
    block_expert = torch.empty(blocks, dtype=torch.int32, device=ids.device)
    e_pow = triton.next_power_of_2(num_experts)
    chunk = max(16, min(128, 8192 // e_pow))
    ids = ids.contiguous()
    if pairs <= ALIGN_ONE_PROGRAM:
        chunk = min(chunk, max(16, triton.next_power_of_2(pairs)))  # a decode step's few pairs: small tiles
        _moe_align_kernel[(1,)](ids, sorted_pairs, block_expert, pairs, first_expert, num_experts, size, blocks,
                                E=e_pow, CHUNK=chunk, BLOCK_M=block_m, num_warps=4)
        return sorted_pairs, block_expert, pairs
    shares = triton.cdiv(pairs, SHARE)
    counts = torch.empty(shares, e_pow, dtype=torch.int32, device=ids.device)
    starts = torch.empty_like(counts)
    _moe_count_kernel[(shares,)](ids, counts, pairs, first_expert, num_experts, E=e_pow, CHUNK=chunk, SHARE=SHARE)
    _moe_offsets_kernel[(1,)](counts, starts, sorted_pairs, block_expert, shares, pairs, num_experts, size, blocks,
                              E=e_pow, CHUNK=chunk, BLOCK_M=block_m)
    _moe_place_kernel[(shares,)](ids, starts, sorted_pairs, pairs, first_expert, num_experts, E=e_pow, CHUNK=chunk,
                                 SHARE=SHARE)
    return sorted_pairs, block_expert, pairs


# ---- the grouped GEMMs ---------------------------------------------------------------------------

@triton.jit
def _codes_dot(acc, a, w_ptr, s_ptr, e, n, k0, K, stride_we, stride_wn, stride_se, stride_sn, n_off, k_off,
               cell_n, cell_k, QKIND: tl.constexpr, TILE_SCALE: tl.constexpr, FAST: tl.constexpr,
               PRECISION: tl.constexpr, BLOCK_K: tl.constexpr):
    """acc + a @ (expert e's quantized W.T tile: rows n — within the weight: the caller clamps them —,
    columns k0 …), int8 or float8 e4m3 codes (as bytes); the scale of (n, k) at [(n + n_off) // cell_n,
    (k + k_off) // cell_k] (pdpipe.quant.weights' layout), one load a column where the tile lies inside one
    cell (TILE_SCALE). FAST (bf16 a, a tile in one cell): the codes go into the product as bf16 integers and
    the product is scaled (triton_quant)."""
    k = k0 + tl.arange(0, BLOCK_K)
    kmask = k < K
    w = tl.load(w_ptr + e * stride_we + n[None, :].to(tl.int64) * stride_wn + k[:, None], mask=kmask[:, None], other=0)
    s_rows = s_ptr + e * stride_se + ((n + n_off) // cell_n).to(tl.int64) * stride_sn
    if TILE_SCALE:
        s = tl.load(s_rows + (k0 + k_off) // cell_k)
    if FAST and TILE_SCALE:
        if QKIND == 2:
            w = w.to(tl.float8e4nv, bitcast=True).to(tl.bfloat16)
        else:
            w = int8_to_bf16(w)
        acc += tl.dot(a, w) * s[None, :]
    else:
        if QKIND == 2:
            w = w.to(tl.float8e4nv, bitcast=True)
        w = w.to(tl.float32)
        if TILE_SCALE:
            w = w * s[None, :]
        else:
            w = w * tl.load(s_rows[None, :] + ((k + k_off) // cell_k)[:, None], mask=kmask[:, None], other=0.0)
        acc = tl.dot(a, w.to(a.dtype), acc, input_precision=PRECISION)
    return acc


@triton.jit
def _int4_dot(acc, a_even, a_odd, w_ptr, s_ptr, e, n, k0, K, k_bytes, stride_we, stride_wn, stride_se, stride_sn,
              n_off, k_off, cell_n, cell_k, TILE_SCALE: tl.constexpr, FAST: tl.constexpr, PRECISION: tl.constexpr,
              BLOCK_K: tl.constexpr):
    """As _codes_dot for int4 codes (code + 8 a nibble, the even k low): the low nibbles against a's even
    columns and the high nibbles against its odd ones, each byte loaded once and nothing interleaved."""
    j = k0 // 2 + tl.arange(0, BLOCK_K // 2)
    byte = tl.load(w_ptr + e * stride_we + n[None, :].to(tl.int64) * stride_wn + j[:, None],
                   mask=(j < k_bytes)[:, None], other=0)  # past K: code -8 against a's zeros
    s_rows = s_ptr + e * stride_se + ((n + n_off) // cell_n).to(tl.int64) * stride_sn
    if TILE_SCALE:
        s = tl.load(s_rows + (k0 + k_off) // cell_k)
    if FAST and TILE_SCALE:
        part = tl.dot(a_even, low_nibbles_to_bf16(byte))
        part = tl.dot(a_odd, high_nibbles_to_bf16(byte), part)
        acc += part * s[None, :]
    else:
        lo = ((byte & 0xF).to(tl.int32) - 8).to(tl.float32)
        hi = ((byte >> 4).to(tl.int32) - 8).to(tl.float32)
        if TILE_SCALE:
            lo, hi = lo * s[None, :], hi * s[None, :]
        else:
            even = k0 + 2 * tl.arange(0, BLOCK_K // 2)
            lo *= tl.load(s_rows[None, :] + ((even + k_off) // cell_k)[:, None], mask=(even < K)[:, None], other=0.0)
            hi *= tl.load(s_rows[None, :] + ((even + 1 + k_off) // cell_k)[:, None], mask=(even + 1 < K)[:, None],
                          other=0.0)
        acc = tl.dot(a_even, lo.to(a_even.dtype), acc, input_precision=PRECISION)
        acc = tl.dot(a_odd, hi.to(a_odd.dtype), acc, input_precision=PRECISION)
    return acc


@triton.jit(do_not_specialize=["num_pairs"])  # see triton_ops.py, VARYING
def _moe_gemm_kernel(a_ptr, w_ptr, c_ptr, sorted_ptr, block_expert_ptr, weight_ptr, N, K, k_bytes, num_pairs,
                     num_experts, stride_am, stride_we, stride_wn, stride_cm, s_ptr, stride_se, stride_sn, n_off,
                     k_off, cell_n, cell_k, TOP_K: tl.constexpr, ROWS_ARE_PAIRS: tl.constexpr, GATED: tl.constexpr,
                     MUL_WEIGHT: tl.constexpr, QKIND: tl.constexpr, TILE_SCALE: tl.constexpr, FAST: tl.constexpr,
                     PRECISION: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """C[pair] = A[row of pair] @ W[expert].T (· the pair's routing weight), for the pairs of one block
    of one expert; A's row is the pair's token (first GEMM) or the pair itself (second). GATED: W's
    rows are gate then up (N each), and C = silu(A @ gate.T) · (A @ up.T). One program a (block, column
    tile), a block's column tiles consecutive: the programs running together share their block's
    gathered rows in L2 (block-major order re-read every block's rows from HBM once per column tile:
    ~2 GB a layer for a 2k-token ERNIE prefill, more than its experts' weights). QKIND >= 0: W is
    quantized (see _codes_dot and _int4_dot)."""
    tiles_n = tl.cdiv(N, BLOCK_N)
    pid_m = tl.program_id(0) // tiles_n
    pid_n = tl.program_id(0) % tiles_n
    e = tl.load(block_expert_ptr + pid_m).to(tl.int64)
    if e < num_experts:
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        pair = tl.load(sorted_ptr + offs_m).to(tl.int64)
        valid = pair < num_pairs
        if ROWS_ARE_PAIRS:
            row = pair
        else:
            row = pair // TOP_K
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_k = tl.arange(0, BLOCK_K)
        a_ptrs = a_ptr + row[:, None] * stride_am + offs_k[None, :]
        w_ptrs = w_ptr + e * stride_we + offs_n[None, :] * stride_wn + offs_k[:, None]
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        acc_up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            kmask = offs_k < K - k0
            n_in = tl.minimum(offs_n, N - 1)  # columns past N read column N - 1 (never stored): no masks
            if QKIND == 1:  # int4: a's even and odd columns (a thread's pairs), against the low and high nibbles
                a = tl.load(a_ptrs, mask=valid[:, None] & kmask[None, :], other=0.0)
                a_even, a_odd = tl.split(a.reshape(BLOCK_M, BLOCK_K // 2, 2))
                acc = _int4_dot(acc, a_even, a_odd, w_ptr, s_ptr, e, n_in, k0, K, k_bytes, stride_we, stride_wn,
                                stride_se, stride_sn, n_off, k_off, cell_n, cell_k, TILE_SCALE, FAST, PRECISION,
                                BLOCK_K)
                if GATED:
                    acc_up = _int4_dot(acc_up, a_even, a_odd, w_ptr, s_ptr, e, n_in + N, k0, K, k_bytes, stride_we,
                                       stride_wn, stride_se, stride_sn, n_off, k_off, cell_n, cell_k, TILE_SCALE,
                                       FAST, PRECISION, BLOCK_K)
            else:
                a = tl.load(a_ptrs, mask=valid[:, None] & kmask[None, :], other=0.0)
                if QKIND >= 0:
                    acc = _codes_dot(acc, a, w_ptr, s_ptr, e, n_in, k0, K, stride_we, stride_wn, stride_se,
                                     stride_sn, n_off, k_off, cell_n, cell_k, QKIND, TILE_SCALE, FAST, PRECISION,
                                     BLOCK_K)
                    if GATED:
                        acc_up = _codes_dot(acc_up, a, w_ptr, s_ptr, e, n_in + N, k0, K, stride_we,
                                            stride_wn, stride_se, stride_sn, n_off, k_off, cell_n, cell_k, QKIND,
                                            TILE_SCALE, FAST, PRECISION, BLOCK_K)
                else:
                    wmask = (offs_n < N)[None, :] & kmask[:, None]
                    acc += tl.dot(a, tl.load(w_ptrs, mask=wmask, other=0.0), input_precision=PRECISION)
                    if GATED:
                        acc_up += tl.dot(a, tl.load(w_ptrs + N * stride_wn, mask=wmask, other=0.0),
                                         input_precision=PRECISION)
            a_ptrs += BLOCK_K
            w_ptrs += BLOCK_K
        if GATED:
            acc = acc * tl.sigmoid(acc) * acc_up
        if MUL_WEIGHT:
            acc = acc * tl.load(weight_ptr + pair, mask=valid, other=0.0)[:, None]
        tl.store(c_ptr + pair[:, None] * stride_cm + offs_n[None, :], acc.to(c_ptr.dtype.element_ty),
                 mask=valid[:, None] & (offs_n[None, :] < N))


QKINDS = {"wint8": 0, "wint4": 1, "fp8": 2, "block_wise_fp8": 2}


class GemmConfig(NamedTuple):
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int


# (gate/up GEMM, down GEMM) by the pairs' block size: 16 where experts get a few pairs (decode), 64 or
# 128 where they get many (prefill); the tiles are what benchmarks/moe_kernel_sweep.py measured
# fastest on an H200 over the ERNIE-4.5-21B-A3B and Qwen3-30B-A3B shapes
CONFIGS: dict[int, tuple[GemmConfig, GemmConfig]] = {
    16: (GemmConfig(32, 128, 4, 4), GemmConfig(64, 128, 4, 3)),
    64: (GemmConfig(64, 64, 4, 3), GemmConfig(128, 64, 8, 4)),
    128: (GemmConfig(128, 64, 8, 4), GemmConfig(128, 64, 8, 3)),
}


def block_m_for(tokens: int, top_k: int, experts: int) -> int:
    """A block reads its expert's weights once: small blocks where experts get few pairs (decode),
    larger ones where they get many (prefill), so the weights are not re-read every 16 pairs."""
    per_expert = tokens * top_k / experts
    return 16 if per_expert < 32 else 64 if per_expert < 128 else 128


SHARED_MEMORY = 200 << 10  # what a tile's pipeline stages may take (an H100/H200 SM has 227 KiB)


def _fitted(cfg: GemmConfig, block_m: int, gated: bool, element_size: int) -> GemmConfig:
    """The tile with fewer stages, then a shorter K step, until its stages fit in shared memory (the
    tiles are sized for bf16; fp32 models take twice the bytes)."""
    def stages_bytes(c: GemmConfig) -> int:
        return c.num_stages * (block_m * c.block_k + (2 if gated else 1) * c.block_k * c.block_n) * element_size

    while stages_bytes(cfg) > SHARED_MEMORY and cfg.num_stages > 2:
        cfg = cfg._replace(num_stages=cfg.num_stages - 1)
    while stages_bytes(cfg) > SHARED_MEMORY and cfg.block_k > 16:
        cfg = cfg._replace(block_k=cfg.block_k // 2)
    return cfg


def _moe_gemm(a, w, c, sorted_pairs, block_expert, weights, pairs: int, top_k: int, rows_are_pairs: bool,
              gated: bool, block_m: int, cfg: GemmConfig) -> None:
    n, k = w.shape[1] // (2 if gated else 1), w.shape[2]
    codes = w.codes if isinstance(w, QuantStack) else w
    if isinstance(w, QuantStack):
        codes = codes.view(torch.uint8) if codes.dtype == torch.float8_e4m3fn else codes
        scale, qkind, (cell_n, cell_k), (n_off, k_off) = w.scale, QKINDS[w.scheme], w.cell, w.offset
        assert scale.is_contiguous() and scale.dtype == torch.float32
    else:
        scale, qkind, cell_n, cell_k, n_off, k_off = codes, -1, 1, 1, 0, 0
    assert a.stride(1) == 1 and codes.is_contiguous() and c.stride(1) == 1 and c.shape[1] == n
    if not pairs:
        return
    cfg = _fitted(cfg, block_m, gated, a.element_size())
    # the blocks holding pairs come first, and there are at most as many as pairs
    grid = (min(block_expert.shape[0], pairs) * triton.cdiv(n, cfg.block_n),)
    # (k + 1) // 2: an int4 row's bytes, an argument so that Triton sees it divide by 16 and vectorises loads
    _moe_gemm_kernel[grid](a, codes, c, sorted_pairs, block_expert, weights, n, k, (k + 1) // 2, pairs,
                           codes.shape[0], a.stride(0), codes.stride(0), codes.stride(1), c.stride(0), scale,
                           scale.stride(0), scale.stride(1) if scale.dim() > 1 else 0, n_off, k_off, cell_n, cell_k,
                           TOP_K=top_k,
                           ROWS_ARE_PAIRS=rows_are_pairs, GATED=gated, MUL_WEIGHT=weights is not None, QKIND=qkind,
                           TILE_SCALE=qkind >= 0 and tile_scale(k, cell_k, k_off, cfg.block_k),
                           FAST=qkind >= 0 and fast_codes(a),
                           PRECISION=_precision(a), BLOCK_M=block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
                           num_warps=cfg.num_warps, num_stages=cfg.num_stages)


@triton.jit
def _moe_sum_kernel(down_ptr, ids_ptr, add_ptr, out_ptr, hidden, first_expert, held_experts, TOP_K: tl.constexpr,
                    HAS_ADD: tl.constexpr, BLOCK: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = h < hidden
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for j in tl.static_range(TOP_K):
        local = tl.load(ids_ptr + t * TOP_K + j) - first_expert
        held = (local >= 0) & (local < held_experts)  # another rank's expert: its row was never written
        acc += tl.load(down_ptr + (t * TOP_K + j) * hidden + h, mask=mask & held, other=0.0).to(tl.float32)
    if HAS_ADD:
        acc += tl.load(add_ptr + t * hidden + h, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + t * hidden + h, acc.to(out_ptr.dtype.element_ty), mask=mask)


def moe_sum(down, ids, first_expert: int, held_experts: int, add=None):
    """Each token's k rows of `down` ([tokens · k, hidden]) summed, those of the experts this rank holds
    (`ids` [tokens, k]: first_expert .. first_expert + held_experts - 1; the other rows are never read,
    so `down` needs no zeroing), plus its row of `add` (the shared experts' output) if given: one launch,
    one rounding."""
    tokens, top_k = ids.shape
    hidden = down.shape[1]
    assert down.is_contiguous() and down.shape[0] == tokens * top_k and ids.is_contiguous()
    assert add is None or add.shape == (tokens, hidden)
    add = add.contiguous() if add is not None else None
    out = torch.empty(tokens, hidden, dtype=down.dtype, device=down.device)
    if tokens:
        block = min(1024, triton.next_power_of_2(hidden))
        _moe_sum_kernel[(tokens, triton.cdiv(hidden, block))](down, ids, add if add is not None else down, out, hidden,
                                                              first_expert, held_experts, TOP_K=top_k,
                                                              HAS_ADD=add is not None, BLOCK=block)
    return out


def fused_moe(x, w13, w2, weights, ids, first_expert: int = 0, add=None, block_m: int = 0,
              configs: tuple[GemmConfig, GemmConfig] | None = None):
    """reference.fused_moe on the GPU: the pairs sorted by expert (`moe_align`), one grouped GEMM for
    gate/up with SiLU·mul in its epilogue, one for down with the routing weight applied, and the sum
    over each token's k pairs with `add` (the shared experts' output) in one kernel. No Python loop
    over experts and no host sync (CUDA-graph safe). `w13` and `w2` may be QuantStacks (quantized
    experts: each weight tile dequantized in the GEMM)."""
    tokens, top_k = ids.shape
    experts, two_inter, hidden = w13.shape
    assert x.shape == (tokens, hidden) and w2.shape == (experts, hidden, two_inter // 2)
    block_m = block_m or block_m_for(tokens, top_k, experts)
    first, second = configs or CONFIGS[block_m]
    sorted_pairs, block_expert, pairs = moe_align(ids, experts, first_expert, block_m)
    inter = torch.empty(pairs, two_inter // 2, dtype=x.dtype, device=x.device)
    _moe_gemm(x, w13, inter, sorted_pairs, block_expert, None, pairs, top_k, False, True, block_m, first)
    down = torch.empty(pairs, hidden, dtype=x.dtype, device=x.device)  # pairs of no expert here: never read
    _moe_gemm(inter, w2, down, sorted_pairs, block_expert, weights.reshape(-1).float().contiguous(), pairs, top_k,
              True, False, block_m, second)
    return moe_sum(down, ids.contiguous(), first_expert, experts, add)
