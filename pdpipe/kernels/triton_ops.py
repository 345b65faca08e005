"""Triton kernels: KV store, paged decode attention (GQA, split-K), paged prefill/extend attention
(varlen, causal) and the batched block copy the KV transfer uses. Each matches a function of
`reference.py`; wrappers assert shapes, dtypes and strides before launching."""
from __future__ import annotations

import inspect

import torch
import triton
import triton.language as tl

# VARYING: integer arguments that change with a step's sizes (token-expert pairs, sort blocks, a block
# table's width, blocks to copy) are not specialised on. Triton compiles a variant for each value's
# divisibility by 16 (and for 1), 0.3-0.9 s each, which the first request of a step bringing a new one
# would wait for. (The 600-900 ms TTFT bursts once seen under load were not these but the skinny GEMM
# timed live: ModelRunner.warm_gemms.) Measured cost: Qwen3-MoE's sort (128 experts) 25-35 % slower
# unspecialised on its pairs (benchmarks/results/moe/2026-11-30-kernel-sweep-router-sort.json), ERNIE's none.


FP8_ROW_EXTRA = 4  # an FP8 pool's (token, head) row: head_dim e4m3 codes, then a float32 scale (its bytes)


def _head_dim(k_cache: torch.Tensor) -> int:
    """The head dim a cache layer holds: its rows', less an FP8 row's scale."""
    return k_cache.shape[3] - (FP8_ROW_EXTRA if k_cache.dtype == torch.uint8 else 0)


def _check_cache(k_cache: torch.Tensor, v_cache: torch.Tensor) -> None:
    assert k_cache.dim() == 4 and k_cache.shape == v_cache.shape, (k_cache.shape, v_cache.shape)
    dim = _head_dim(k_cache)
    assert dim & (dim - 1) == 0 and dim >= 16, f"head_dim {dim}: the attention kernels need a power of two >= 16"
    assert k_cache.is_contiguous() and v_cache.is_contiguous(), "KV cache layers must be contiguous"
    assert k_cache.dtype == v_cache.dtype


# ---- store new K/V into the paged cache ---------------------------------------------------------

@triton.jit
def _store_kv_kernel(k_ptr, v_ptr, kc_ptr, vc_ptr, slot_ptr, stride_k, stride_v,
                     ROW: tl.constexpr, BLOCK: tl.constexpr):
    t = tl.program_id(0)
    slot = tl.load(slot_ptr + t).to(tl.int64)
    if slot >= 0:  # negative slots are padding (CUDA-graph batches)
        offs = tl.arange(0, BLOCK)
        mask = offs < ROW
        k = tl.load(k_ptr + t * stride_k + offs, mask=mask)
        v = tl.load(v_ptr + t * stride_v + offs, mask=mask)
        tl.store(kc_ptr + slot * ROW + offs, k.to(kc_ptr.dtype.element_ty), mask=mask)
        tl.store(vc_ptr + slot * ROW + offs, v.to(vc_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _fp8_rows_store(x, cache_ptr, slot, h, d, mask, KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr):
    """x [heads, head_dim] (float32) into an FP8 pool's rows of `slot`: each head's e4m3 codes (x / scale,
    rounded to nearest even) then its float32 scale, amax / 448 (1 for a row of zeros)."""
    ROW: tl.constexpr = HEAD_DIM + 4
    amax = tl.max(tl.where(mask, tl.abs(x), 0.0), 1)
    scale = tl.where(amax > 0, tl.math.div_rn(amax, 448.0), 1.0)  # IEEE division, as torch's: the same codes
    scaled = tl.math.div_rn(x, scale[:, None])
    codes = tl.minimum(tl.maximum(scaled, -448.0), 448.0).to(tl.float8e4nv).to(tl.uint8, bitcast=True)
    rows = (slot * KV_HEADS + h).to(tl.int64) * ROW
    tl.store(cache_ptr + rows[:, None] + d[None, :], codes, mask=mask)
    tl.store((cache_ptr + rows + HEAD_DIM).to(tl.pointer_type(tl.float32)), scale, mask=h < KV_HEADS)


@triton.jit
def _store_kv_fp8_kernel(k_ptr, v_ptr, kc_ptr, vc_ptr, slot_ptr, stride_kt, stride_kh, stride_vt, stride_vh,
                         KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_KVH: tl.constexpr,
                         BLOCK_D: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    slot = tl.load(slot_ptr + t).to(tl.int64)
    if slot >= 0:  # negative slots are padding (CUDA-graph batches)
        h = tl.arange(0, BLOCK_KVH)
        d = tl.arange(0, BLOCK_D)
        mask = (h < KV_HEADS)[:, None] & (d < HEAD_DIM)[None, :]
        k = tl.load(k_ptr + t * stride_kt + h[:, None] * stride_kh + d[None, :], mask=mask, other=0.0)
        v = tl.load(v_ptr + t * stride_vt + h[:, None] * stride_vh + d[None, :], mask=mask, other=0.0)
        _fp8_rows_store(k.to(tl.float32), kc_ptr, slot, h, d, mask, KV_HEADS, HEAD_DIM)
        _fp8_rows_store(v.to(tl.float32), vc_ptr, slot, h, d, mask, KV_HEADS, HEAD_DIM)


def store_kv_fp8(key, value, k_cache, v_cache, slot_mapping) -> None:
    """key/value [num_tokens, kv_heads, head_dim] (strided views are fine) into FP8 pools' rows."""
    n, heads, dim = key.shape
    assert k_cache.dtype == v_cache.dtype == torch.uint8 and tuple(k_cache.shape[2:]) == (heads, dim + FP8_ROW_EXTRA)
    assert value.shape == key.shape and key.stride(2) == 1 and value.stride(2) == 1
    assert k_cache.is_contiguous() and v_cache.is_contiguous() and slot_mapping.shape == (n,)
    if n:
        _store_kv_fp8_kernel[(n,)](key, value, k_cache, v_cache, slot_mapping, key.stride(0), key.stride(1),
                                   value.stride(0), value.stride(1), KV_HEADS=heads, HEAD_DIM=dim,
                                   BLOCK_KVH=triton.next_power_of_2(heads), BLOCK_D=triton.next_power_of_2(dim))


def store_kv(key, value, k_cache, v_cache, slot_mapping) -> None:
    # key/value: [num_tokens, kv_heads, head_dim]; caches: [num_blocks, block_size, kv_heads, head_dim]
    if k_cache.dtype == torch.uint8:
        return store_kv_fp8(key, value, k_cache, v_cache, slot_mapping)
    _check_cache(k_cache, v_cache)
    n, heads, dim = key.shape
    assert value.shape == key.shape and (heads, dim) == tuple(k_cache.shape[2:]), (key.shape, k_cache.shape)
    assert key.stride(2) == 1 and key.stride(1) == dim and value.stride(2) == 1 and value.stride(1) == dim
    assert slot_mapping.shape == (n,) and slot_mapping.dtype in (torch.int32, torch.int64)
    if n == 0:
        return
    row = heads * dim
    _store_kv_kernel[(n,)](key, value, k_cache, v_cache, slot_mapping, key.stride(0), value.stride(0),
                           ROW=row, BLOCK=triton.next_power_of_2(row))


@triton.jit
def _paged_kv_tile(kc_ptr, vc_ptr, bt_ptr, seq, stride_bt, tok, valid, kvh, d, PAGE: tl.constexpr,
                   KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, FP8: tl.constexpr = False):
    """Keys and values of tokens `tok` of sequence `seq`, gathered through its block table (of an FP8
    pool: the values its rows stand for, code x scale, in float32)."""
    page = tl.load(bt_ptr + seq * stride_bt + tok // PAGE, mask=valid, other=0).to(tl.int64)
    row = (page * PAGE + tok % PAGE) * KV_HEADS + kvh
    if FP8:
        ROW: tl.constexpr = HEAD_DIM + 4
        k = tl.load(kc_ptr + row[:, None] * ROW + d[None, :], mask=valid[:, None], other=0)
        v = tl.load(vc_ptr + row[:, None] * ROW + d[None, :], mask=valid[:, None], other=0)
        k_scale = tl.load((kc_ptr + row * ROW + HEAD_DIM).to(tl.pointer_type(tl.float32)), mask=valid, other=0.0)
        v_scale = tl.load((vc_ptr + row * ROW + HEAD_DIM).to(tl.pointer_type(tl.float32)), mask=valid, other=0.0)
        k = k.to(tl.float8e4nv, bitcast=True).to(tl.float32) * k_scale[:, None]
        v = v.to(tl.float8e4nv, bitcast=True).to(tl.float32) * v_scale[:, None]
    else:
        k = tl.load(kc_ptr + row[:, None] * HEAD_DIM + d[None, :], mask=valid[:, None], other=0.0)
        v = tl.load(vc_ptr + row[:, None] * HEAD_DIM + d[None, :], mask=valid[:, None], other=0.0)
    return k, v


@triton.jit
def _attend_tile(q, k, v, allowed, m, l_sum, acc, scale, PRECISION: tl.constexpr):
    """One online-softmax step of flash attention over a tile of keys (`allowed` masks scores)."""
    s = tl.dot(q, tl.trans(k), input_precision=PRECISION).to(tl.float32) * scale
    s = tl.where(allowed, s, float("-inf"))
    m_new = tl.maximum(m, tl.max(s, 1))
    m_safe = tl.where(m_new > float("-inf"), m_new, 0.0)
    alpha = tl.exp(m - m_safe)
    p = tl.exp(s - m_safe[:, None])
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION).to(tl.float32)
    return m_new, l_sum * alpha + tl.sum(p, 1), acc


# ---- decode attention: one query token per sequence, split over the context --------------------

@triton.jit(do_not_specialize=["stride_bt", "max_blocks"])  # see VARYING
def _decode_split_kernel(q_ptr, kc_ptr, vc_ptr, bt_ptr, lens_ptr, part_ptr, lse_ptr,
                         scale, window, stride_bt, max_blocks,
                         GROUP: tl.constexpr, BLOCK_G: tl.constexpr, KV_HEADS: tl.constexpr,
                         HEAD_DIM: tl.constexpr, PAGE: tl.constexpr, BLOCK_N: tl.constexpr,
                         SPLITS: tl.constexpr, PRECISION: tl.constexpr, FP8: tl.constexpr = False):
    seq = tl.program_id(0)
    kvh = tl.program_id(1)
    split = tl.program_id(2)
    seq_len = tl.load(lens_ptr + seq)
    start = 0
    if window > 0:
        start = tl.maximum(seq_len - window, 0)
    span = seq_len - start
    per_split = tl.cdiv(tl.cdiv(span, SPLITS), BLOCK_N) * BLOCK_N
    lo = start + split * per_split
    hi = tl.minimum(lo + per_split, seq_len)

    g = tl.arange(0, BLOCK_G)
    d = tl.arange(0, HEAD_DIM)
    heads = kvh * GROUP + g
    g_mask = g < GROUP
    q = tl.load(q_ptr + (seq * KV_HEADS * GROUP + heads)[:, None] * HEAD_DIM + d[None, :],
                mask=g_mask[:, None], other=0.0)
    m = tl.full([BLOCK_G], float("-inf"), tl.float32)
    l_sum = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, HEAD_DIM], tl.float32)
    n = tl.arange(0, BLOCK_N)
    for tile in range(lo, hi, BLOCK_N):
        tok = tile + n
        valid = tok < hi
        k, v = _paged_kv_tile(kc_ptr, vc_ptr, bt_ptr, seq, stride_bt, tok, valid, kvh, d, PAGE, KV_HEADS, HEAD_DIM,
                              FP8)
        if FP8:
            k, v = k.to(q.dtype), v.to(q.dtype)
        m, l_sum, acc = _attend_tile(q, k, v, valid[None, :], m, l_sum, acc, scale, PRECISION)
    out_row = (seq * KV_HEADS * GROUP + heads) * SPLITS + split
    has = l_sum > 0
    tl.store(part_ptr + out_row[:, None] * HEAD_DIM + d[None, :],
             acc / tl.where(has, l_sum, 1.0)[:, None], mask=g_mask[:, None])
    tl.store(lse_ptr + out_row, tl.where(has, m + tl.log(tl.where(has, l_sum, 1.0)), float("-inf")),
             mask=g_mask)


@triton.jit
def _decode_reduce_kernel(part_ptr, lse_ptr, out_ptr, HEAD_DIM: tl.constexpr, SPLITS: tl.constexpr,
                          BLOCK_S: tl.constexpr):
    row = tl.program_id(0)  # seq * heads + head
    s = tl.arange(0, BLOCK_S)
    d = tl.arange(0, HEAD_DIM)
    lse = tl.load(lse_ptr + row * SPLITS + s, mask=s < SPLITS, other=float("-inf"))
    top = tl.max(lse, 0)
    w = tl.where(lse > float("-inf"), tl.exp(lse - top), 0.0)
    total = tl.sum(w, 0)
    # parts never written (extend attention's rows of no chunk) are not read; a NaN part still reaches the output
    parts = tl.load(part_ptr + (row * SPLITS + s)[:, None] * HEAD_DIM + d[None, :],
                    mask=(lse != float("-inf"))[:, None], other=0.0)
    out = tl.sum(parts * w[:, None], 0) / tl.where(total > 0, total, 1.0)
    tl.store(out_ptr + row * HEAD_DIM + d, out.to(out_ptr.dtype.element_ty))


def decode_splits(max_seq_len: int, batch: int, kv_heads: int) -> int:
    """Enough programs to fill the GPU when the batch is small and the context long."""
    want = max(1, 264 // max(1, batch * kv_heads))
    return int(min(max(1, triton.cdiv(max_seq_len, 256)), want, 32))


def _precision(t: torch.Tensor) -> str:
    return "ieee" if t.dtype == torch.float32 else "tf32"  # fp32 models get exact fp32 dots


def decode_attention(query, k_cache, v_cache, block_tables, seq_lens, scale: float,
                     sliding_window: int | None = None, num_splits: int = 8,
                     out: torch.Tensor | None = None) -> torch.Tensor:
    # query: [num_seqs, heads, head_dim]; block_tables: [num_seqs, max_blocks] int32; seq_lens: [num_seqs] int32
    _check_cache(k_cache, v_cache)
    batch, heads, dim = query.shape
    page, kv_heads = k_cache.shape[1], k_cache.shape[2]
    assert query.is_contiguous() and dim == _head_dim(k_cache) and heads % kv_heads == 0
    assert block_tables.dtype == torch.int32 and block_tables.stride(1) == 1 and block_tables.shape[0] == batch
    assert seq_lens.dtype == torch.int32 and seq_lens.shape == (batch,)
    group = heads // kv_heads
    part = torch.empty(batch, heads, num_splits, dim, dtype=torch.float32, device=query.device)
    lse = torch.empty(batch, heads, num_splits, dtype=torch.float32, device=query.device)
    _decode_split_kernel[(batch, kv_heads, num_splits)](
        query, k_cache, v_cache, block_tables, seq_lens, part, lse, scale, sliding_window or 0,
        block_tables.stride(0), block_tables.shape[1], GROUP=group, BLOCK_G=max(16, triton.next_power_of_2(group)),
        KV_HEADS=kv_heads, HEAD_DIM=dim, PAGE=page, BLOCK_N=max(16, min(64, page * 4)), SPLITS=num_splits,
        PRECISION=_precision(query), FP8=k_cache.dtype == torch.uint8, num_warps=4, num_stages=2)
    out = torch.empty_like(query) if out is None else out
    assert out.shape == query.shape and out.is_contiguous()
    _decode_reduce_kernel[(batch * heads,)](part, lse, out, HEAD_DIM=dim, SPLITS=num_splits,
                                            BLOCK_S=max(2, triton.next_power_of_2(num_splits)))
    return out


# ---- prefill / extend attention: variable-length queries over their paged context --------------

@triton.jit(do_not_specialize=["num_seqs", "stride_bt"])  # see VARYING
def _extend_kernel(q_ptr, kc_ptr, vc_ptr, out_ptr, part_ptr, lse_ptr, bt_ptr, qstart_ptr, lens_ptr, num_seqs, scale,
                   window, stride_bt, HEADS: tl.constexpr, KV_HEADS: tl.constexpr, GROUP: tl.constexpr,
                   HEAD_DIM: tl.constexpr, PAGE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_T: tl.constexpr,
                   BLOCK_N: tl.constexpr, SPLITS: tl.constexpr, PRECISION: tl.constexpr, FP8: tl.constexpr = False):
    """A tile of BLOCK_T query tokens of one sequence, all GROUP query heads of one KV head (rows: token-major,
    head-minor), against the SPLITS-th part of the keys the tile may see: each key tile loaded once for the
    group. With SPLITS > 1 the part's normalised output and log-sum-exp go to `part`/`lse` (reduced after).
    Tiles are numbered across the step: sequence i's start at q_start_i // BLOCK_T + i (never overlapping),
    so the grid is the step's tokens' tiles plus one a sequence, not the longest chunk's times every
    sequence (a graph's grid holds its whole token count and every sequence it may take)."""
    tile_id = tl.program_id(0)
    kvh = tl.program_id(1)
    split = tl.program_id(2)
    lo_seq, hi_seq = 0, num_seqs  # the last sequence whose first tile is at or before this one
    while lo_seq < hi_seq:
        mid = (lo_seq + hi_seq) // 2
        if tl.load(qstart_ptr + mid) // BLOCK_T + mid <= tile_id:
            lo_seq = mid + 1
        else:
            hi_seq = mid
    seq = lo_seq - 1
    q_start = tl.load(qstart_ptr + seq)
    q_len = tl.load(qstart_ptr + seq + 1) - q_start
    mblock = tile_id - (q_start // BLOCK_T + seq)
    if mblock * BLOCK_T < q_len:
        seq_len = tl.load(lens_ptr + seq)
        r = tl.arange(0, BLOCK_M)
        t = mblock * BLOCK_T + r // GROUP
        row_ok = (r < BLOCK_T * GROUP) & (t < q_len)
        q_row = (q_start + t) * HEADS + kvh * GROUP + r % GROUP
        q_pos = seq_len - q_len + t
        d = tl.arange(0, HEAD_DIM)
        q = tl.load(q_ptr + q_row[:, None] * HEAD_DIM + d[None, :], mask=row_ok[:, None], other=0.0)
        m = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_sum = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
        last = tl.minimum(seq_len, seq_len - q_len + (mblock + 1) * BLOCK_T)  # causal end of this tile
        first = 0
        if window > 0:
            first = tl.maximum(seq_len - q_len + mblock * BLOCK_T - window + 1, 0) // BLOCK_N * BLOCK_N
        per_split = tl.cdiv(tl.cdiv(last - first, SPLITS), BLOCK_N) * BLOCK_N
        lo = first + split * per_split
        hi = tl.minimum(lo + per_split, last)
        n = tl.arange(0, BLOCK_N)
        for tile in range(lo, hi, BLOCK_N):
            tok = tile + n
            valid = tok < hi
            k, v = _paged_kv_tile(kc_ptr, vc_ptr, bt_ptr, seq, stride_bt, tok, valid, kvh, d, PAGE, KV_HEADS,
                                  HEAD_DIM, FP8)
            if FP8:
                k, v = k.to(q.dtype), v.to(q.dtype)
            allowed = valid[None, :] & (tok[None, :] <= q_pos[:, None])
            if window > 0:
                allowed = allowed & (tok[None, :] > q_pos[:, None] - window)
            m, l_sum, acc = _attend_tile(q, k, v, allowed, m, l_sum, acc, scale, PRECISION)
        has = l_sum > 0
        out = acc / tl.where(has, l_sum, 1.0)[:, None]
        if SPLITS == 1:
            tl.store(out_ptr + q_row[:, None] * HEAD_DIM + d[None, :], out.to(out_ptr.dtype.element_ty),
                     mask=row_ok[:, None])
        else:
            part_row = q_row * SPLITS + split
            tl.store(part_ptr + part_row[:, None] * HEAD_DIM + d[None, :], out, mask=row_ok[:, None])
            tl.store(lse_ptr + part_row, tl.where(has, m + tl.log(tl.where(has, l_sum, 1.0)), float("-inf")),
                     mask=row_ok)


def _extend_tile(max_query_len: int, group: int) -> tuple[int, int]:
    """(rows a program holds, query tokens they are): 64 rows (16 when a step's chunks are that short), at
    least a whole group of query heads."""
    block_m = max(64 if max_query_len * group > 16 else 16, triton.next_power_of_2(group))
    return block_m, block_m // group


def extend_splits(tokens: int, max_query_len: int, max_context: int, heads: int, kv_heads: int) -> int:
    """How many parts extend attention splits each query tile's keys into: enough programs to fill the GPU
    (about two a multiprocessor) where a step's few query tiles attend to long contexts — a short prompt
    after a long cached history, decodes beside it — in powers of two, at least 256 keys a part."""
    _, block_t = _extend_tile(max_query_len, heads // kv_heads)
    tiles = max(1, triton.cdiv(tokens, block_t))
    want = min(triton.cdiv(264, tiles * kv_heads), 16, max(1, max_context // 256))
    splits = 1
    while splits * 2 <= want:
        splits *= 2
    return splits


def extend_attention(query, k_cache, v_cache, block_tables, query_start_loc, seq_lens, max_query_len: int,
                     scale: float, sliding_window: int | None = None,
                     out: torch.Tensor | None = None, num_splits: int = 1) -> torch.Tensor:
    # query: [num_tokens, heads, head_dim]; query_start_loc: [num_seqs + 1] int32; seq_lens: [num_seqs] int32
    _check_cache(k_cache, v_cache)
    tokens, heads, dim = query.shape
    page, kv_heads = k_cache.shape[1], k_cache.shape[2]
    assert query.is_contiguous() and dim == _head_dim(k_cache) and heads % kv_heads == 0
    assert block_tables.dtype == torch.int32 and block_tables.stride(1) == 1
    assert query_start_loc.dtype == torch.int32 and seq_lens.dtype == torch.int32
    num_seqs = seq_lens.shape[0]
    assert query_start_loc.shape == (num_seqs + 1,) and block_tables.shape[0] == num_seqs
    out = torch.empty_like(query) if out is None else out
    assert out.shape == query.shape and out.is_contiguous()
    group = heads // kv_heads
    block_m, block_t = _extend_tile(max_query_len, group)
    part = lse = out  # unused without a split
    if num_splits > 1:  # rows of no chunk (padding) keep -inf parts: the reduction writes them 0
        assert tokens * heads * num_splits * dim < 2 ** 31, "the split parts' offsets are int32"
        part = torch.empty(tokens, heads, num_splits, dim, dtype=torch.float32, device=query.device)
        lse = torch.full((tokens, heads, num_splits), float("-inf"), dtype=torch.float32, device=query.device)
    grid = (triton.cdiv(tokens, block_t) + num_seqs, kv_heads, num_splits)
    _extend_kernel[grid](query, k_cache, v_cache, out, part, lse, block_tables, query_start_loc, seq_lens, num_seqs,
                         scale, sliding_window or 0, block_tables.stride(0), HEADS=heads, KV_HEADS=kv_heads,
                         GROUP=group, HEAD_DIM=dim, PAGE=page, BLOCK_M=block_m, BLOCK_T=block_t, BLOCK_N=64,
                         SPLITS=num_splits, PRECISION=_precision(query), FP8=k_cache.dtype == torch.uint8, num_warps=4,
                         num_stages=2)
    if num_splits > 1:
        _decode_reduce_kernel[(tokens * heads,)](part, lse, out, HEAD_DIM=dim, SPLITS=num_splits,
                                                 BLOCK_S=max(2, triton.next_power_of_2(num_splits)))
    return out


# ---- block copy: one launch moves many scattered blocks (the KV transfer) -----------------------

@triton.jit(do_not_specialize=["num_ids"])  # see VARYING
def _copy_blocks_kernel(src_ptr, dst_ptr, src_ids_ptr, dst_ids_ptr, num_ids, src_plane, dst_plane,
                        src_block, dst_block, src_row, dst_row, src_first, dst_first,
                        ELEMS: tl.constexpr, ROW: tl.constexpr, CHUNK: tl.constexpr):
    """Moves ELEMS elements of each block: its rows (one a token) of ROW elements (the heads copied, head
    dim each) that start `src_first`/`dst_first` into a row of `src_row`/`dst_row` elements."""
    item = tl.program_id(0)  # plane * num_ids + i
    chunk = tl.program_id(1)
    plane = item // num_ids
    i = item % num_ids
    s = tl.load(src_ids_ptr + i).to(tl.int64)
    d = tl.load(dst_ids_ptr + i).to(tl.int64)
    offs = chunk * CHUNK + tl.arange(0, CHUNK)
    mask = offs < ELEMS
    token = offs // ROW
    within = offs % ROW
    x = tl.load(src_ptr + plane.to(tl.int64) * src_plane + s * src_block + token * src_row + src_first + within,
                mask=mask)
    tl.store(dst_ptr + plane.to(tl.int64) * dst_plane + d * dst_block + token * dst_row + dst_first + within, x,
             mask=mask)


def copy_pool_blocks(src_pool, src_ids, dst_pool, dst_ids, first_layer: int = 0, num_layers: int = 1,
                     src_heads: slice | None = None, dst_heads: slice | None = None) -> None:
    """Moves blocks of `num_layers` layers from `first_layer` on, K and V, in one launch; with
    `src_heads`/`dst_heads` (ranges of the same length) only those key/value heads, into those.

    Pools: [num_layers, 2, num_blocks, block_size, kv_heads, head_dim], contiguous (the two may hold
    different heads); ids int32/int64 on the device that runs the copy (the pools may live on different
    GPUs: one is then peer memory)."""
    assert src_pool.dim() == 6 and src_pool.shape[3] == dst_pool.shape[3] and src_pool.shape[5] == dst_pool.shape[5]
    assert src_pool.dtype == dst_pool.dtype and src_pool.is_contiguous() and dst_pool.is_contiguous()
    assert src_ids.shape == dst_ids.shape and src_ids.dim() == 1
    layers = min(src_pool.shape[0], dst_pool.shape[0])
    assert num_layers >= 1 and 0 <= first_layer and first_layer + num_layers <= layers, \
        (first_layer, num_layers, layers)
    sh = range(src_pool.shape[4])[src_heads or slice(None)]
    dh = range(dst_pool.shape[4])[dst_heads or slice(None)]
    assert len(sh) == len(dh) > 0 and sh.step == dh.step == 1, (src_heads, dst_heads)
    n = src_ids.shape[0]
    if n == 0:
        return
    page, dim = src_pool.shape[3], src_pool.shape[5]
    row = len(sh) * dim
    elems = page * row
    chunk = min(4096, triton.next_power_of_2(elems))
    src = src_pool[first_layer:first_layer + num_layers]
    dst = dst_pool[first_layer:first_layer + num_layers]
    src_block, dst_block = src_pool[0, 0, 0].numel(), dst_pool[0, 0, 0].numel()
    grid = (num_layers * 2 * n, triton.cdiv(elems, chunk))
    _copy_blocks_kernel[grid](src, dst, src_ids, dst_ids, n, src_pool.shape[2] * src_block,
                              dst_pool.shape[2] * dst_block, src_block, dst_block, src_pool.shape[4] * dim,
                              dst_pool.shape[4] * dim, sh.start * dim, dh.start * dim, ELEMS=elems, ROW=row,
                              CHUNK=chunk, num_warps=8)


# ---- fused elementwise work of a layer: decode steps are launch-bound without these ----------------

@triton.jit
def _rms_norm_kernel(x_ptr, res_ptr, w_ptr, out_ptr, res_out_ptr, stride_x, stride_r, stride_o, eps,
                     N: tl.constexpr, BLOCK: tl.constexpr, HAS_RES: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < N
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
    if HAS_RES:
        x = x + tl.load(res_ptr + row * stride_r + cols, mask=mask, other=0.0)
        tl.store(res_out_ptr + row * N + cols, x, mask=mask)
    x32 = x.to(tl.float32)
    var = tl.sum(x32 * x32, 0) / N
    normed = (x32 * tl.rsqrt(var + eps)).to(x.dtype)
    w = tl.load(w_ptr + cols, mask=mask)
    tl.store(out_ptr + row * stride_o + cols, w * normed, mask=mask)


def rms_norm(x, weight, eps: float, residual=None):
    # x: [num_tokens, hidden]; residual: same shape or None
    n, hidden = x.shape
    assert x.stride(1) == 1 and weight.shape == (hidden,) and weight.is_contiguous()
    out = torch.empty_like(x)
    res_out = torch.empty_like(x) if residual is not None else None
    if residual is not None:
        assert residual.shape == x.shape and residual.stride(1) == 1
    if n:
        _rms_norm_kernel[(n,)](x, residual if residual is not None else x, weight, out,
                               res_out if res_out is not None else out, x.stride(0),
                               residual.stride(0) if residual is not None else 0, out.stride(0), eps,
                               N=hidden, BLOCK=triton.next_power_of_2(hidden), HAS_RES=residual is not None,
                               num_warps=8 if hidden >= 2048 else 4)
    return out, res_out


@triton.jit
def _rotate_heads(x_ptr, stride_h, cos, sin, norm_ptr, eps, HEADS: tl.constexpr, HALF: tl.constexpr,
                  BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr, INTERLEAVED: tl.constexpr, NORM: tl.constexpr):
    """One token's heads rotated: (first halves of the pairs, second halves, head index), float32
    [BLOCK_H, BLOCK_HALF]. Interleaved pairs (2i, 2i+1) are split from whole rows (vector loads, where
    loads of every other element were ~6x slower); NORM: each head RMS-normalised over its head_dim and
    scaled by `norm_ptr`'s weights first (Qwen3's q_norm/k_norm, rounded to the input's dtype as the
    model does)."""
    h = tl.arange(0, BLOCK_H)
    i = tl.arange(0, BLOCK_HALF)
    base = x_ptr + h[:, None] * stride_h
    if INTERLEAVED:
        d = tl.arange(0, 2 * BLOCK_HALF)
        row = tl.load(base + d[None, :], mask=(h < HEADS)[:, None] & (d < 2 * HALF)[None, :], other=0.0)
        x1, x2 = tl.split(tl.reshape(row, (BLOCK_H, BLOCK_HALF, 2)))
        lo, hi = 2 * i, 2 * i + 1
    else:
        hmask = (h < HEADS)[:, None] & (i < HALF)[None, :]
        x1 = tl.load(base + i[None, :], mask=hmask, other=0.0)
        x2 = tl.load(base + HALF + i[None, :], mask=hmask, other=0.0)
        lo, hi = i, i + HALF
    if NORM:
        a, b = x1.to(tl.float32), x2.to(tl.float32)
        r = tl.rsqrt((tl.sum(a * a, 1) + tl.sum(b * b, 1)) / (2 * HALF) + eps)[:, None]
        w1 = tl.load(norm_ptr + lo, mask=i < HALF, other=0.0).to(tl.float32)[None, :]
        w2 = tl.load(norm_ptr + hi, mask=i < HALF, other=0.0).to(tl.float32)[None, :]
        # weight · normalised.to(dtype), each product rounded to the dtype (as torch's does)
        x1 = (w1 * (a * r).to(x1.dtype).to(tl.float32)).to(x1.dtype)
        x2 = (w2 * (b * r).to(x2.dtype).to(tl.float32)).to(x2.dtype)
    x1, x2 = x1.to(tl.float32), x2.to(tl.float32)
    return x1 * cos - x2 * sin, x2 * cos + x1 * sin, h


@triton.jit
def _cos_sin(cos_ptr, sin_ptr, t, stride_c, HALF: tl.constexpr, BLOCK_HALF: tl.constexpr,
             INTERLEAVED: tl.constexpr):
    """Token t's cos and sin of each pair, [1, BLOCK_HALF] float32."""
    i = tl.arange(0, BLOCK_HALF)
    lo = 2 * i if INTERLEAVED else i
    cos = tl.load(cos_ptr + t * stride_c + lo, mask=i < HALF, other=0.0).to(tl.float32)[None, :]
    sin = tl.load(sin_ptr + t * stride_c + lo, mask=i < HALF, other=0.0).to(tl.float32)[None, :]
    return cos, sin


@triton.jit
def _store_rotated(out_ptr, first_row, h, r1, r2, HEADS: tl.constexpr, HALF: tl.constexpr,
                   BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr, INTERLEAVED: tl.constexpr):
    """Rotated heads into rows `first_row + h` of a [rows, head_dim] array (interleaved pairs joined
    back into whole rows: vector stores)."""
    base = out_ptr + (first_row + h[:, None]) * (2 * HALF)
    if INTERLEAVED:
        d = tl.arange(0, 2 * BLOCK_HALF)
        row = tl.reshape(tl.join(r1, r2), (BLOCK_H, 2 * BLOCK_HALF))
        tl.store(base + d[None, :], row.to(out_ptr.dtype.element_ty),
                 mask=(h < HEADS)[:, None] & (d < 2 * HALF)[None, :])
    else:
        i = tl.arange(0, BLOCK_HALF)
        hmask = (h < HEADS)[:, None] & (i < HALF)[None, :]
        tl.store(base + i[None, :], r1.to(out_ptr.dtype.element_ty), mask=hmask)
        tl.store(base + HALF + i[None, :], r2.to(out_ptr.dtype.element_ty), mask=hmask)


@triton.jit
def _rotary_kernel(x_ptr, out_ptr, cos_ptr, sin_ptr, stride_xt, stride_xh, stride_c, HEADS: tl.constexpr,
                   HALF: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr, INTERLEAVED: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    cos, sin = _cos_sin(cos_ptr, sin_ptr, t, stride_c, HALF, BLOCK_HALF, INTERLEAVED)
    r1, r2, h = _rotate_heads(x_ptr + t * stride_xt, stride_xh, cos, sin, x_ptr, 0.0, HEADS, HALF, BLOCK_H,
                              BLOCK_HALF, INTERLEAVED, False)
    _store_rotated(out_ptr, t * HEADS, h, r1, r2, HEADS, HALF, BLOCK_H, BLOCK_HALF, INTERLEAVED)


def rotary(x, cos, sin, interleaved: bool):
    # x: [num_tokens, heads, head_dim], may be a strided view (of a fused qkv output); → contiguous copy
    n, heads, dim = x.shape
    assert x.stride(2) == 1 and cos.shape == (n, dim) and sin.shape == (n, dim) and cos.stride(1) == 1
    out = torch.empty(n, heads, dim, dtype=x.dtype, device=x.device)
    if n:
        _rotary_kernel[(n,)](x, out, cos, sin, x.stride(0), x.stride(1), cos.stride(0), HEADS=heads,
                             HALF=dim // 2, BLOCK_H=triton.next_power_of_2(heads),
                             BLOCK_HALF=triton.next_power_of_2(dim // 2), INTERLEAVED=interleaved)
    return out


@triton.jit
def _rope_store_kernel(q_ptr, k_ptr, v_ptr, qo_ptr, ko_ptr, kc_ptr, vc_ptr, cos_ptr, sin_ptr, slot_ptr,
                       qn_ptr, kn_ptr, eps, stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh,
                       stride_c, HEADS: tl.constexpr, KV_HEADS: tl.constexpr, HALF: tl.constexpr,
                       BLOCK_H: tl.constexpr, BLOCK_KVH: tl.constexpr, BLOCK_HALF: tl.constexpr,
                       BLOCK_D: tl.constexpr, INTERLEAVED: tl.constexpr, NORM: tl.constexpr,
                       STORE: tl.constexpr = True):
    t = tl.program_id(0).to(tl.int64)
    cos, sin = _cos_sin(cos_ptr, sin_ptr, t, stride_c, HALF, BLOCK_HALF, INTERLEAVED)
    r1, r2, h = _rotate_heads(q_ptr + t * stride_qt, stride_qh, cos, sin, qn_ptr, eps, HEADS, HALF, BLOCK_H,
                              BLOCK_HALF, INTERLEAVED, NORM)
    _store_rotated(qo_ptr, t * HEADS, h, r1, r2, HEADS, HALF, BLOCK_H, BLOCK_HALF, INTERLEAVED)
    r1, r2, h = _rotate_heads(k_ptr + t * stride_kt, stride_kh, cos, sin, kn_ptr, eps, KV_HEADS, HALF, BLOCK_KVH,
                              BLOCK_HALF, INTERLEAVED, NORM)
    _store_rotated(ko_ptr, t * KV_HEADS, h, r1, r2, KV_HEADS, HALF, BLOCK_KVH, BLOCK_HALF, INTERLEAVED)
    slot = tl.load(slot_ptr + t).to(tl.int64)
    if STORE and slot >= 0:  # negative slots are padding (CUDA-graph batches)
        _store_rotated(kc_ptr, slot * KV_HEADS, h, r1, r2, KV_HEADS, HALF, BLOCK_KVH, BLOCK_HALF, INTERLEAVED)
        d = tl.arange(0, BLOCK_D)
        vmask = (h < KV_HEADS)[:, None] & (d < 2 * HALF)[None, :]
        v = tl.load(v_ptr + t * stride_vt + h[:, None] * stride_vh + d[None, :], mask=vmask)
        tl.store(vc_ptr + (slot * KV_HEADS + h[:, None]) * (2 * HALF) + d[None, :], v.to(vc_ptr.dtype.element_ty),
                 mask=vmask)


def rope_and_store(q, k, v, cos, sin, k_cache, v_cache, slot_mapping, interleaved: bool, norms=None):
    """Rotates q and k (RMS-normalising each head first with `norms` = (q weight, k weight, eps)), and
    writes the rotated k and v into the paged cache, in one launch (an FP8 pool's rows in a second).

    q: [num_tokens, heads, head_dim], k/v: [num_tokens, kv_heads, head_dim] (strided views of a fused qkv
    output are fine); returns contiguous rotated (q, k)."""
    _check_cache(k_cache, v_cache)
    n, heads, dim = q.shape
    kv_heads = k.shape[1]
    fp8 = k_cache.dtype == torch.uint8
    assert k.shape == v.shape == (n, kv_heads, dim) and k_cache.shape[2] == kv_heads and _head_dim(k_cache) == dim, \
        (q.shape, k.shape, v.shape, k_cache.shape)
    assert q.stride(2) == 1 and k.stride(2) == 1 and v.stride(2) == 1
    assert cos.shape == (n, dim) and sin.shape == (n, dim) and cos.stride(1) == 1 and sin.stride() == cos.stride()
    assert slot_mapping.shape == (n,) and slot_mapping.dtype in (torch.int32, torch.int64)
    q_norm, k_norm, eps = norms if norms is not None else (q, k, 0.0)
    assert norms is None or (q_norm.shape == k_norm.shape == (dim,) and q_norm.is_contiguous()
                             and k_norm.is_contiguous())
    q_out = torch.empty(n, heads, dim, dtype=q.dtype, device=q.device)
    k_out = torch.empty(n, kv_heads, dim, dtype=k.dtype, device=k.device)
    if n:
        _rope_store_kernel[(n,)](q, k, v, q_out, k_out, k_cache, v_cache, cos, sin, slot_mapping, q_norm, k_norm, eps,
                                 q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
                                 cos.stride(0), HEADS=heads, KV_HEADS=kv_heads, HALF=dim // 2,
                                 BLOCK_H=triton.next_power_of_2(heads), BLOCK_KVH=triton.next_power_of_2(kv_heads),
                                 BLOCK_HALF=triton.next_power_of_2(dim // 2), BLOCK_D=triton.next_power_of_2(dim),
                                 INTERLEAVED=interleaved, NORM=norms is not None, STORE=not fp8)
        if fp8:
            store_kv_fp8(k_out, v, k_cache, v_cache, slot_mapping)
    return q_out, k_out


@triton.jit
def _silu_mul_kernel(x_ptr, out_ptr, stride_x, INTER: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < INTER
    gate = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(x_ptr + row * stride_x + INTER + cols, mask=mask, other=0.0)
    act = (gate / (1.0 + tl.exp(-gate))).to(up.dtype)
    tl.store(out_ptr + row * INTER + cols, act * up, mask=mask)


def silu_and_mul(gate_up):
    n, two_inter = gate_up.shape
    assert gate_up.stride(1) == 1 and two_inter % 2 == 0
    inter = two_inter // 2
    out = torch.empty(n, inter, dtype=gate_up.dtype, device=gate_up.device)
    if n:
        block = 1024
        _silu_mul_kernel[(n, triton.cdiv(inter, block))](gate_up, out, gate_up.stride(0), INTER=inter, BLOCK=block)
    return out


# ---- skinny GEMM: the decode step's projections at batch 1-4, where the weights' bytes are all ------

_SKINNY_CONFIGS = [triton.Config({"BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w, num_stages=st)
                   for bn, bk, w, st in ((8, 512, 4, 3), (16, 256, 4, 4), (16, 512, 8, 3), (32, 256, 8, 3),
                                         (16, 1024, 8, 2), (64, 128, 8, 4))]


# An autotuned kernel keeps the configuration it chose, with every candidate's timing, in Triton's cache (keyed
# by Triton, the GPU's architecture, the kernel's source, the key's values and the candidates): an engine that
# restarts, or a second one on the machine, reads its choice there instead of timing each candidate again.
# Triton before 3.4 has no such cache and times them as before. The choice persists: to time the candidates
# again (after tuning on a busy GPU, say) remove the cache's `*.autotune.json` files or point
# TRITON_CACHE_DIR elsewhere.
AUTOTUNE_CACHE = {"cache_results": True} if "cache_results" in inspect.signature(triton.autotune).parameters else {}


@triton.autotune(configs=_SKINNY_CONFIGS, key=["M", "N", "K"], **AUTOTUNE_CACHE)
@triton.jit
def _skinny_kernel(x_ptr, w_ptr, b_ptr, out_ptr, M, N, K, stride_xm, stride_wn, stride_om,
                   HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    m = tl.arange(0, BLOCK_M)
    nmask, mmask = n < N, m < M
    kk = tl.arange(0, BLOCK_K)
    acc = tl.zeros([BLOCK_M, BLOCK_N, BLOCK_K], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + kk
        kmask = k < K
        w = tl.load(w_ptr + n[:, None].to(tl.int64) * stride_wn + k[None, :], mask=nmask[:, None] & kmask[None, :],
                    other=0.0)
        x = tl.load(x_ptr + m[:, None] * stride_xm + k[None, :], mask=mmask[:, None] & kmask[None, :], other=0.0)
        acc += x.to(tl.float32)[:, None, :] * w.to(tl.float32)[None, :, :]
    out = tl.sum(acc, 2)
    if HAS_BIAS:
        out += tl.load(b_ptr + n, mask=nmask, other=0.0).to(tl.float32)[None, :]
    tl.store(out_ptr + m[:, None] * stride_om + n[None, :], out.to(out_ptr.dtype.element_ty),
             mask=mmask[:, None] & nmask[None, :])


SKINNY_MAX_ROWS = 4


def skinny_linear(x, weight, bias=None):
    """x @ weight.T (+ bias) for a few rows of x: each program streams a band of weight rows once."""
    m, k = x.shape
    n = weight.shape[0]
    assert 1 <= m <= SKINNY_MAX_ROWS and weight.shape == (n, k) and x.dtype == weight.dtype
    assert x.stride(1) == 1 and weight.is_contiguous() and (bias is None or bias.shape == (n,))
    out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    grid = lambda meta: (triton.cdiv(n, meta["BLOCK_N"]),)  # noqa: E731
    _skinny_kernel[grid](x, weight, bias if bias is not None else weight, out, m, n, k, x.stride(0),
                         weight.stride(0), out.stride(0), HAS_BIAS=bias is not None,
                         BLOCK_M=triton.next_power_of_2(m))
    return out


skinny_timings: dict[tuple, tuple[float, float]] = {}  # shape key → (skinny ms, cuBLAS ms), as measured


def skinny_wins(x, weight, bias=None) -> bool:
    """Whether skinny_linear beats cuBLAS for this shape: timed once per shape (outside graph capture),
    then remembered."""
    if x.dim() != 2 or x.shape[0] > SKINNY_MAX_ROWS or x.dtype not in (torch.bfloat16, torch.float16) \
            or x.stride(1) != 1 or not weight.is_contiguous():
        return False
    key = (x.shape[0], *weight.shape, x.dtype, bias is not None, x.device)
    times = skinny_timings.get(key)
    if times is None:
        if torch.cuda.is_current_stream_capturing():
            return False
        from triton.testing import do_bench

        times = skinny_timings[key] = (
            do_bench(lambda: skinny_linear(x, weight, bias), warmup=5, rep=20, return_mode="median"),
            do_bench(lambda: torch.nn.functional.linear(x, weight, bias), warmup=5, rep=20, return_mode="median"))
    return times[0] < times[1]
