"""Triton weight-read GEMM for quantized weights at decode batch sizes (a few rows of activations): each
program streams a band of weight rows once, upcasting int8, int4 (two codes a byte) or float8 e4m3 codes
to float32 in registers and multiplying by their scale (`pdpipe.quant.weights`' one layout: the scale of
element (n, k) is `scale[(n + n0) // bn, (k + k0) // bk]`, so a tensor-parallel shard that cuts a group
or block reads its neighbour's), against the activations' dtype; float32 accumulation. Its reference is
`x @ dequantize(w).T`."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

KINDS = {"wint8": 0, "wint4": 1, "fp8": 2, "block_wise_fp8": 2}
QUANT_MAX_ROWS = 16  # more rows than this: dequantize and cuBLAS (the weights' bytes no longer dominate)

_CONFIGS = [triton.Config({"BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w, num_stages=st)
            for bn, bk, w, st in ((8, 256, 4, 3), (16, 256, 4, 4), (16, 512, 8, 3), (32, 128, 4, 4), (64, 128, 8, 3))]


@triton.autotune(configs=_CONFIGS, key=["M", "N", "K", "KIND"])
@triton.jit
def _quant_skinny_kernel(x_ptr, q_ptr, s_ptr, b_ptr, out_ptr, M, N, K, stride_xm, stride_qn, stride_sn, stride_om,
                         n_off, k_off, cell_n, cell_k, KIND: tl.constexpr, HAS_BIAS: tl.constexpr,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    m = tl.arange(0, BLOCK_M)
    nmask, mmask = n < N, m < M
    kk = tl.arange(0, BLOCK_K)
    rows = n.to(tl.int64) * stride_qn
    scale_rows = ((n + n_off) // cell_n).to(tl.int64) * stride_sn
    acc = tl.zeros([BLOCK_M, BLOCK_N, BLOCK_K], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + kk
        kmask = k < K
        wmask = nmask[:, None] & kmask[None, :]
        if KIND == 1:  # int4: the byte holding k, its low nibble for even k; code + 8 stored
            byte = tl.load(q_ptr + rows[:, None] + (k // 2)[None, :], mask=wmask, other=0).to(tl.int32)
            code = ((byte >> ((k % 2) * 4)[None, :]) & 0xF) - 8
            w = code.to(tl.float32)
        elif KIND == 2:  # float8 e4m3, stored as bytes
            w = tl.load(q_ptr + rows[:, None] + k[None, :], mask=wmask, other=0).to(tl.float8e4nv, bitcast=True)
            w = w.to(tl.float32)
        else:
            w = tl.load(q_ptr + rows[:, None] + k[None, :], mask=wmask, other=0).to(tl.float32)
        s = tl.load(s_ptr + scale_rows[:, None] + ((k + k_off) // cell_k)[None, :], mask=wmask, other=0.0)
        x = tl.load(x_ptr + m[:, None] * stride_xm + k[None, :], mask=mmask[:, None] & kmask[None, :], other=0.0)
        acc += x.to(tl.float32)[:, None, :] * (w * s)[None, :, :]
    out = tl.sum(acc, 2)
    if HAS_BIAS:
        out += tl.load(b_ptr + n, mask=nmask, other=0.0).to(tl.float32)[None, :]
    tl.store(out_ptr + m[:, None] * stride_om + n[None, :], out.to(out_ptr.dtype.element_ty),
             mask=mmask[:, None] & nmask[None, :])


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
                               KIND=KINDS[scheme], HAS_BIAS=bias is not None, BLOCK_M=triton.next_power_of_2(m))
    return out
