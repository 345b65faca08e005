"""Triton weight-read GEMM for quantized weights at decode batch sizes (up to 64 rows of activations): each
program streams a band of weight rows once, upcasting int8, int4 (two codes a byte) or float8 e4m3 codes in
registers, multiplying by their scale (`pdpipe.quant.weights`' one layout: the scale of element (n, k) is
`scale[(n + n0) // bn, (k + k0) // bk]`, so a tensor-parallel shard that cuts a group or block reads its
neighbour's) in float32 and rounding into the activations' dtype — the weight `dequantize` gives — then one
tensor-core product a tile (rows padded to 16), float32 accumulation. Its reference is `x @ dequantize(w).T`.

Where a tile of 128 columns lies inside one scale cell (channel scales; groups or blocks of 128 that the
shard does not cut) the scales are one load a weight row and tile, not one an element. int4 bytes are
loaded once and split into their two nibbles (`tl.join`), not loaded once for each."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

KINDS = {"wint8": 0, "wint4": 1, "fp8": 2, "block_wise_fp8": 2}
QUANT_MAX_ROWS = 64  # more rows than this: dequantize and cuBLAS (the weights' bytes no longer dominate)
BLOCK_K = 128  # the columns of a tile: one scale cell's width (groups and blocks of 128)

_CONFIGS = [triton.Config({"BLOCK_N": bn}, num_warps=w, num_stages=st)
            for bn, w, st in ((16, 4, 4), (32, 4, 4), (64, 4, 3), (64, 8, 4), (128, 8, 3))]


@triton.autotune(configs=_CONFIGS, key=["BLOCK_M", "N", "K", "KIND", "TILE_SCALE"])  # rows by 16, 32, 64
@triton.jit
def _quant_skinny_kernel(x_ptr, q_ptr, s_ptr, b_ptr, out_ptr, M, N, K, stride_xm, stride_qn, stride_sn, stride_om,
                         n_off, k_off, cell_n, cell_k, KIND: tl.constexpr, HAS_BIAS: tl.constexpr,
                         TILE_SCALE: tl.constexpr, PRECISION: tl.constexpr, BLOCK_M: tl.constexpr,
                         BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    m = tl.arange(0, BLOCK_M)
    nmask, mmask = n < N, m < M
    rows = n.to(tl.int64) * stride_qn
    scale_rows = ((n + n_off) // cell_n).to(tl.int64) * stride_sn
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        if KIND == 1:  # int4: byte j holds k = 2j (low nibble) and 2j + 1 (high), code + 8 stored
            j = k0 // 2 + tl.arange(0, BLOCK_K // 2)
            jmask = nmask[:, None] & (j < (K + 1) // 2)[None, :]
            byte = tl.load(q_ptr + rows[:, None] + j[None, :], mask=jmask, other=0x88).to(tl.int32)
            w = tl.join((byte & 0xF) - 8, (byte >> 4) - 8).reshape(BLOCK_N, BLOCK_K).to(tl.float32)
        else:
            k = k0 + tl.arange(0, BLOCK_K)
            wmask = nmask[:, None] & (k < K)[None, :]
            w = tl.load(q_ptr + rows[:, None] + k[None, :], mask=wmask, other=0)
            if KIND == 2:  # float8 e4m3, stored as bytes
                w = w.to(tl.float8e4nv, bitcast=True)
            w = w.to(tl.float32)
        k = k0 + tl.arange(0, BLOCK_K)
        kmask = k < K
        if TILE_SCALE:  # the tile lies in one cell a row
            s = tl.load(s_ptr + scale_rows + (k0 + k_off) // cell_k, mask=nmask, other=0.0)
            w = w * s[:, None]
        else:
            s = tl.load(s_ptr + scale_rows[:, None] + ((k + k_off) // cell_k)[None, :],
                        mask=nmask[:, None] & kmask[None, :], other=0.0)
            w = w * s
        x = tl.load(x_ptr + m[:, None] * stride_xm + k[None, :], mask=mmask[:, None] & kmask[None, :], other=0.0)
        w = tl.where(kmask[None, :], w, 0.0).to(x.dtype)  # an odd K's last byte: its high nibble is no column
        acc += tl.dot(x, tl.trans(w), input_precision=PRECISION)
    if HAS_BIAS:
        acc += tl.load(b_ptr + n, mask=nmask, other=0.0).to(tl.float32)[None, :]
    tl.store(out_ptr + m[:, None] * stride_om + n[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=mmask[:, None] & nmask[None, :])


def tile_scale(k: int, cell_k: int, k_off: int, block_k: int = BLOCK_K) -> bool:
    """Whether every `block_k`-column tile of a K-wide weight lies inside one scale cell a row."""
    return (cell_k % block_k == 0 and k_off % block_k == 0) or k_off + k <= cell_k


def quant_skinny_linear(x: torch.Tensor, scheme: str, codes: torch.Tensor, scale: torch.Tensor,
                        shape: tuple[int, int], cell: tuple[int, int], offset: tuple[int, int],
                        bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [M, K] (M <= QUANT_MAX_ROWS) by the quantized weight [N, K] (+ bias): [M, N] in x's dtype."""
    m, k = x.shape
    n = shape[0]
    assert 1 <= m <= QUANT_MAX_ROWS and k == shape[1] and x.stride(1) == 1, (x.shape, shape)
    assert codes.is_contiguous() and scale.is_contiguous() and scale.dtype == torch.float32
    q = codes.view(torch.uint8) if codes.dtype == torch.float8_e4m3fn else codes
    out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    grid = lambda meta: (triton.cdiv(n, meta["BLOCK_N"]),)  # noqa: E731
    _quant_skinny_kernel[grid](x, q, scale, bias if bias is not None else scale, out, m, n, k, x.stride(0),
                               q.stride(0), scale.stride(0), out.stride(0), offset[0], offset[1], cell[0], cell[1],
                               KIND=KINDS[scheme], HAS_BIAS=bias is not None,
                               TILE_SCALE=tile_scale(k, cell[1], offset[1]),
                               PRECISION="ieee" if x.dtype == torch.float32 else "tf32",
                               BLOCK_M=max(16, triton.next_power_of_2(m)), BLOCK_K=BLOCK_K)
    return out


@triton.jit
def _dequantize_kernel(q_ptr, s_ptr, out_ptr, N, K, stride_qn, stride_sn, stride_on, n_off, k_off, cell_n, cell_k,
                       KIND: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    k0 = tl.program_id(1) * BLOCK_K
    k = k0 + tl.arange(0, BLOCK_K)
    nmask, kmask = n < N, k < K
    rows = n.to(tl.int64) * stride_qn
    if KIND == 1:
        j = k0 // 2 + tl.arange(0, BLOCK_K // 2)
        byte = tl.load(q_ptr + rows[:, None] + j[None, :], mask=nmask[:, None] & (j < (K + 1) // 2)[None, :],
                       other=0x88).to(tl.int32)
        w = tl.join((byte & 0xF) - 8, (byte >> 4) - 8).reshape(BLOCK_N, BLOCK_K).to(tl.float32)
    else:
        w = tl.load(q_ptr + rows[:, None] + k[None, :], mask=nmask[:, None] & kmask[None, :], other=0)
        if KIND == 2:
            w = w.to(tl.float8e4nv, bitcast=True)
        w = w.to(tl.float32)
    mask = nmask[:, None] & kmask[None, :]
    s = tl.load(s_ptr + ((n + n_off) // cell_n).to(tl.int64)[:, None] * stride_sn + ((k + k_off) // cell_k)[None, :],
                mask=mask, other=0.0)
    tl.store(out_ptr + n.to(tl.int64)[:, None] * stride_on + k[None, :], (w * s).to(out_ptr.dtype.element_ty),
             mask=mask)


def dequantize(scheme: str, codes: torch.Tensor, scale: torch.Tensor, shape: tuple[int, int],
               cell: tuple[int, int], offset: tuple[int, int], dtype: torch.dtype) -> torch.Tensor:
    """The weight [N, K] in `dtype`, as `pdpipe.quant.weights.dequantize` gives it (code × scale in float32,
    then `dtype`), in one pass: codes and scales read once, the weight written once."""
    n, k = shape
    q = codes.view(torch.uint8) if codes.dtype == torch.float8_e4m3fn else codes
    out = torch.empty(n, k, dtype=dtype, device=codes.device)
    grid = (triton.cdiv(n, 32), triton.cdiv(k, 256))
    _dequantize_kernel[grid](q, scale, out, n, k, q.stride(0), scale.stride(0), out.stride(0), offset[0], offset[1],
                             cell[0], cell[1], KIND=KINDS[scheme], BLOCK_N=32, BLOCK_K=256, num_warps=4)
    return out
