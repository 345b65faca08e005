"""Torch reference implementations: paged attention, KV store and block copies.

They define the semantics the Triton kernels must match and are what CPU engines run.
A KV pool for one layer is `[num_blocks, block_size, num_kv_heads, head_dim]`; token `t` of a
sequence lives in block `block_table[t // block_size]` at offset `t % block_size`.
"""
from __future__ import annotations

from typing import NamedTuple

import torch


def store_kv(
    key: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
    value: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
    k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    slot_mapping: torch.Tensor,  # [num_tokens] int64, block_id * block_size + offset
) -> None:
    if k_cache.dtype == torch.uint8:  # an FP8 pool: each (token, head) row its codes and their scale
        key, value = to_fp8_rows(key), to_fp8_rows(value)
    assert key.shape == value.shape and key.shape[1:] == k_cache.shape[2:], (key.shape, k_cache.shape)
    assert slot_mapping.shape == (key.shape[0],), slot_mapping.shape
    if (slot_mapping < 0).any():  # padding rows write nowhere
        keep = slot_mapping >= 0
        key, value, slot_mapping = key[keep], value[keep], slot_mapping[keep]
    k_cache.view(-1, *k_cache.shape[2:]).index_copy_(0, slot_mapping, key.to(k_cache.dtype))
    v_cache.view(-1, *v_cache.shape[2:]).index_copy_(0, slot_mapping, value.to(v_cache.dtype))


def paged_attention(
    query: torch.Tensor,  # [num_tokens, num_heads, head_dim]
    k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    block_tables: torch.Tensor,  # [num_seqs, max_blocks_per_seq] int32
    query_start_loc: list[int],  # num_seqs + 1 offsets into query
    seq_lens: list[int],  # per sequence: tokens in the cache after this step's store
    scale: float,
    sliding_window: int | None = None,
) -> torch.Tensor:  # [num_tokens, num_heads, head_dim]
    """Causal attention of each sequence's new tokens over its whole paged context.

    The new tokens are the last `query_len` of the sequence, so prefill, chunked prefill and decode
    are one operation.
    """
    num_heads, head_dim = query.shape[1:]
    block_size, num_kv_heads = k_cache.shape[1], k_cache.shape[2]
    group = num_heads // num_kv_heads
    out = torch.empty_like(query)
    fp8 = k_cache.dtype == torch.uint8  # rows of codes and scales: read back as the values they stand for
    for i, seq_len in enumerate(seq_lens):
        start, end = query_start_loc[i], query_start_loc[i + 1]
        num_blocks = -(-seq_len // block_size)
        blocks = block_tables[i, :num_blocks].long()
        k_rows, v_rows = k_cache[blocks], v_cache[blocks]
        if fp8:
            k_rows, v_rows = from_fp8_rows(k_rows, query.dtype), from_fp8_rows(v_rows, query.dtype)
        k = k_rows.reshape(-1, num_kv_heads, head_dim)[:seq_len].transpose(0, 1)
        v = v_rows.reshape(-1, num_kv_heads, head_dim)[:seq_len].transpose(0, 1)
        q = query[start:end].view(end - start, num_kv_heads, group, head_dim).permute(1, 2, 0, 3)
        scores = torch.matmul(q.float(), k.float().unsqueeze(1).transpose(-1, -2)) * scale
        q_pos = torch.arange(seq_len - (end - start), seq_len).unsqueeze(1)
        k_pos = torch.arange(seq_len).unsqueeze(0)
        allowed = k_pos <= q_pos
        if sliding_window is not None:
            allowed &= k_pos > q_pos - sliding_window
        scores.masked_fill_(~allowed.to(scores.device), float("-inf"))
        probs = torch.softmax(scores, dim=-1).to(v.dtype)
        o = torch.matmul(probs, v.unsqueeze(1))  # [kv_heads, group, q_len, head_dim]
        out[start:end] = o.permute(2, 0, 1, 3).reshape(end - start, num_heads, head_dim)
    return out


FP8_MAX = 448.0  # the largest e4m3 value


def fp8_per_row(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row (last dim) of x in e4m3: its codes (x / scale, rounded to nearest even) and its float32
    scale amax / 448 (1 for a row of zeros), [..., 1]. The FP8 KV rows and W8A8's activations."""
    x32 = x.float()
    amax = x32.abs().amax(dim=-1, keepdim=True)
    # over a tensor, not the number: CUDA divides a tensor by a number as a product with its reciprocal,
    # 1 ulp off IEEE division (which the Triton store does) for some amax
    scale = torch.where(amax > 0, amax / torch.full_like(amax, FP8_MAX), torch.ones_like(amax))
    return (x32 / scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn), scale


def to_fp8_rows(x: torch.Tensor) -> torch.Tensor:
    """[..., head_dim] → uint8 [..., head_dim + 4]: each row's e4m3 codes, then its float32 scale as 4 bytes
    (`fp8_per_row`)."""
    codes, scale = fp8_per_row(x)
    return torch.cat([codes.view(torch.uint8), scale.contiguous().view(torch.uint8)], dim=-1)


def from_fp8_rows(rows: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The inverse of to_fp8_rows: code x scale in float32, then `dtype`: [..., head_dim]."""
    codes = rows[..., :-4].contiguous().view(torch.float8_e4m3fn).float()
    scale = rows[..., -4:].contiguous().view(torch.float32)
    return (codes * scale).to(dtype)


def gather_blocks(pool: torch.Tensor, block_ids: torch.Tensor) -> torch.Tensor:
    """pool [num_blocks, ...] → [len(block_ids), ...]."""
    return pool.index_select(0, block_ids.to(pool.device, torch.long))


def scatter_blocks(pool: torch.Tensor, block_ids: torch.Tensor, blocks: torch.Tensor) -> None:
    """Writes blocks [len(block_ids), ...] into pool at block_ids."""
    assert blocks.shape[1:] == pool.shape[1:], (blocks.shape, pool.shape)
    pool.index_copy_(0, block_ids.to(pool.device, torch.long), blocks.to(pool.dtype))


def copy_blocks(src: torch.Tensor, src_ids: torch.Tensor, dst: torch.Tensor, dst_ids: torch.Tensor) -> None:
    """dst[dst_ids[i]] = src[src_ids[i]] for every i, pools of the same block shape."""
    assert src_ids.shape == dst_ids.shape, (src_ids.shape, dst_ids.shape)
    scatter_blocks(dst, dst_ids, gather_blocks(src, src_ids))


def copy_pool_blocks(src_pool: torch.Tensor, src_ids: torch.Tensor, dst_pool: torch.Tensor, dst_ids: torch.Tensor,
                     first_layer: int = 0, num_layers: int = 1, src_heads: slice | None = None,
                     dst_heads: slice | None = None) -> None:
    """Pools `[num_layers, 2, num_blocks, block_size, kv_heads, head_dim]`: moves the blocks of layers
    first_layer .. first_layer + num_layers - 1, keys and values; with `src_heads`/`dst_heads`, only
    those key/value heads of each block, into those of the destination (pools of different tensor
    parallelism hold different heads)."""
    layers = min(src_pool.shape[0], dst_pool.shape[0])
    assert num_layers >= 1 and 0 <= first_layer and first_layer + num_layers <= layers, \
        (first_layer, num_layers, layers)
    src_pool = src_pool[..., src_heads or slice(None), :]
    dst_pool = dst_pool[..., dst_heads or slice(None), :]
    for layer in range(first_layer, first_layer + num_layers):
        for plane in range(2):
            copy_blocks(src_pool[layer, plane], src_ids, dst_pool[layer, plane], dst_ids)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float,
             residual: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """`weight * normalize(x [+ residual])`, normalized in float32, as Hugging Face's RMSNorm does.
    With `residual`, also returns the sum (the new residual stream)."""
    if residual is not None:
        x = x + residual
        residual = x
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x32.to(x.dtype), residual


def rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool) -> torch.Tensor:
    """x: [num_tokens, heads, head_dim]; cos/sin: [num_tokens, head_dim] (each frequency repeated for its
    pair). Neox style pairs i with i + d/2; interleaved (ERNIE) pairs 2i with 2i+1, in float32."""
    cos, sin = cos[:, None, :], sin[:, None, :]
    if interleaved:
        x1, x2 = x[..., 0::2].float(), x[..., 1::2].float()
        rotated = torch.stack((-x2, x1), dim=-1).flatten(-2)
        return (x.float() * cos + rotated * sin).to(x.dtype)
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos.to(x.dtype) + rotated * sin.to(x.dtype)


def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """gate_up: [num_tokens, 2 * inter] → silu(gate) * up: [num_tokens, inter]."""
    gate, up = gate_up.chunk(2, dim=-1)
    return torch.nn.functional.silu(gate) * up


def rope_and_store(q, k, v, cos, sin, k_cache, v_cache, slot_mapping, interleaved: bool, norms=None):
    """Rotary on q and k (each head RMS-normalised first where `norms` = (q weight, k weight, eps):
    Qwen3's q_norm/k_norm), then the rotated k and v stored into the paged cache; returns (q, k)."""
    if norms is not None:
        q_norm, k_norm, eps = norms
        q, k = rms_norm(q, q_norm, eps)[0], rms_norm(k, k_norm, eps)[0]
    q, k = rotary(q, cos, sin, interleaved), rotary(k, cos, sin, interleaved)
    store_kv(k, v, k_cache, v_cache, slot_mapping)
    return q, k


def fused_moe(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor,
              first_expert: int = 0, add: torch.Tensor | None = None) -> torch.Tensor:
    """Routed experts over stacked weights: token t's output is the sum over its top-k experts e (those
    this rank holds: first_expert .. first_expert + len(w13) - 1) of weights[t, j] · down_e(silu(gate_e(x_t))
    · up_e(x_t)). x: [tokens, hidden]; w13: [experts, 2 · inter, hidden] (gate rows, then up rows); w2:
    [experts, hidden, inter]; weights: [tokens, k] float32; ids: [tokens, k] (the model's expert ids);
    `add` ([tokens, hidden], the shared experts' output) added to the sum."""
    acc = torch.promote_types(x.dtype, torch.float32)
    out = torch.zeros(x.shape, dtype=acc, device=x.device)
    local = ids - first_expert
    for e in range(w13.shape[0]):
        rows, slot = (local == e).nonzero(as_tuple=True)
        if rows.numel():
            y = silu_and_mul(x[rows] @ w13[e].t()) @ w2[e].t()
            out.index_add_(0, rows, y.to(acc) * weights[rows, slot, None].to(acc))
    if add is not None:
        out += add.to(acc)
    return out.to(x.dtype)


def moe_route(logits: torch.Tensor, bias: torch.Tensor | None, top_k: int, renormalize: bool,
              norm_min: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The router's choice: softmax over the experts (float32); each token's top-k by probability
    (plus `bias`, ERNIE's selection bias, which picks but does not weigh); their probabilities as the
    weights, divided by their sum (at least `norm_min`) where the model renormalises. logits: [tokens,
    experts]; returns (weights [tokens, top_k] float32, expert ids [tokens, top_k])."""
    probs = torch.softmax(logits, dim=-1, dtype=torch.float32)
    if bias is not None:
        ids = torch.topk(probs + bias.float().view(1, -1), top_k, dim=-1).indices
        weights = probs.gather(-1, ids)
    else:
        weights, ids = torch.topk(probs, top_k, dim=-1)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True).clamp_min(norm_min)
    return weights, ids


def router_logits(x: torch.Tensor, gate: torch.Tensor, fp32: bool) -> torch.Tensor:
    """x [tokens, hidden] by the router's weight [experts, hidden]: in float32 where the model computes
    its router in float32 (ERNIE), else in the weight's dtype as its Linear does."""
    return torch.nn.functional.linear(x.float(), gate.float()) if fp32 else torch.nn.functional.linear(x, gate)


def moe_router(x: torch.Tensor, gate: torch.Tensor, bias: torch.Tensor | None, top_k: int, renormalize: bool,
               norm_min: float, fp32: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The router from the hidden states: router_logits, then moe_route's choice."""
    return moe_route(router_logits(x, gate, fp32), bias, top_k, renormalize, norm_min)


def moe_align(ids: torch.Tensor, num_experts: int, first_expert: int, block_m: int):
    """(token-expert pairs sorted by expert, each expert's run padded to a multiple of `block_m` with the
    sentinel `pairs`; the expert of each block of `block_m`, `num_experts` past the last; pairs). Pair
    p is token p // k's j = p % k-th choice. Sizes are fixed by the shapes (no host sync: capturable);
    pairs whose expert this rank does not hold are left out. Plain torch: the fused kernel's sort, run
    (and tested) anywhere."""
    pairs = ids.numel()
    local = ids.flatten().long() - first_expert
    bucket = torch.where((local >= 0) & (local < num_experts), local, num_experts)
    counts = torch.zeros(num_experts + 1, dtype=torch.long, device=ids.device).scatter_add_(
        0, bucket, torch.ones_like(bucket))[:num_experts]
    padded = (counts + block_m - 1) // block_m * block_m
    padded_end = padded.cumsum(0)
    padded_start = padded_end - padded
    order = torch.argsort(bucket, stable=True)  # pairs by expert; those of no expert here last
    sorted_bucket = bucket[order]
    run_start = counts.cumsum(0) - counts
    held = sorted_bucket < num_experts
    e = sorted_bucket.clamp(max=num_experts - 1)
    rank = torch.arange(pairs, device=ids.device) - run_start[e]
    size = pairs + num_experts * (block_m - 1)
    position = torch.where(held, padded_start[e] + rank, size)  # the last slot takes the left-out pairs
    sorted_pairs = torch.full((size + 1,), pairs, dtype=torch.int32, device=ids.device)
    sorted_pairs.scatter_(0, position, order.to(torch.int32))
    blocks = -(-size // block_m)
    block_expert = torch.searchsorted(padded_end, torch.arange(blocks, device=ids.device) * block_m, right=True)
    return sorted_pairs[:size], block_expert.to(torch.int32), pairs


class QuantStack(NamedTuple):
    """Every held expert's quantized weight of one GEMM, stacked: codes [experts, N, K or ⌈K/2⌉ bytes],
    scales [experts, rows, cols] float32 in one grid geometry (cell, offset), `shape` the logical
    [experts, N, K] (gate/up: N = 2 · inter, gate's rows first)."""

    scheme: str
    codes: torch.Tensor
    scale: torch.Tensor
    cell: tuple[int, int]
    offset: tuple[int, int]
    shape: tuple[int, int, int]
