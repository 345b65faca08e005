"""Triton weight-read GEMM for quantized weights at decode batch sizes (up to 64 rows of activations): each
program streams a band of weight rows once, turning int8, int4 (two codes a byte) or float8 e4m3 codes
into the activations' dtype in registers, then one tensor-core product a tile (rows padded to 16),
float32 accumulation. The scale of element (n, k) is `scale[(n + n0) // bn, (k + k0) // bk]`
(`pdpipe.quant.weights`' one layout, so a tensor-parallel shard that cuts a group or block reads its
neighbour's). Its reference is `x @ dequantize(w).T`.

Decode reads weights at the memory's rate only if the instructions a weight byte costs stay few: a weight
tile's conversion, not its load, is what bounds such a kernel. So, for bf16 activations (the serving
dtype):
- where a tile of 128 columns lies inside one scale cell a row (channel scales; groups or blocks of 128
  that the shard does not cut: TILE_SCALE) the codes go into the product as they are (integers, exact in
  bf16) and the tile's partial product is scaled once, [rows, BLOCK_N] values instead of one multiply a
  weight;
- int8 codes become bf16 without the quarter-rate integer-to-float unit (each byte biased to unsigned,
  placed under a float32's exponent 2^23 by a byte permute, the bias subtracted, two rounded into one
  register); int4 the same way in bf16 directly (a nibble under exponent 2^7: 128 + u, exact, then minus
  136 in packed bf16), the even columns' low nibbles and the odd columns' high nibbles as two operands
  against the activations' even and odd columns — no interleaving shuffle.
So there the product uses each code times its unrounded float32 scale, where `dequantize` (and with it
prefill's path) rounds code × scale to bf16 first: decode is a little closer to the quantized weights than
the reference, within the tests' tolerances. Other cases (float32 or float16 activations, shards that cut
a cell within a tile, Triton's interpreter, which runs no inline assembly) take the plain path: code ×
scale in float32, rounded to x's dtype, as `dequantize` does. Weight
rows past N are read as row N - 1 (never stored), so weight loads carry no masks and go through
asynchronous copies; where too few bands of rows would run, each band is cut along K (`split_k`).

Beyond 64 rows (prefill) the weight is dequantized in one pass (`dequantize`, one scale load a row and
128-column tile where the tile lies in one cell) and cuBLAS multiplies."""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

from .triton_ops import AUTOTUNE_CACHE

KINDS = {"wint8": 0, "wint4": 1, "fp8": 2, "block_wise_fp8": 2}
QUANT_MAX_ROWS = 64  # more rows than this: dequantize and cuBLAS (the weights' bytes no longer dominate)
BLOCK_K = 128  # the columns of a tile: one scale cell's width (groups and blocks of 128)

_CONFIGS = [triton.Config({"BLOCK_N": bn, "CUT_BY_TILE": False, "TILES": 1}, num_warps=w, num_stages=st)
            for bn, w, st in ((16, 4, 4), (32, 4, 4), (64, 4, 3), (64, 8, 4), (128, 4, 3), (128, 8, 3), (128, 4, 5))]
# int4-only candidates: two 128-column tiles a trip of the loop (TILES = 2: twice the bytes in flight for a
# byte tile half int8's; on an H100 13 % less time for 8192 x 28672 and 28672 x 4096 at 1-16 rows, slower at
# 64: `probes/int4_layouts.py`), and bands cut along K by their own width (CUT_BY_TILE) rather than by 64
# rows. Deeper (6 stages) and wider (256 rows) int4 tiles were timed too and never chosen; each candidate
# costs a compile a row count at every new shape.
_INT4_CONFIGS = [triton.Config({"BLOCK_N": bn, "CUT_BY_TILE": False, "TILES": 2}, num_warps=w, num_stages=st)
                 for bn, w, st in ((32, 4, 4), (64, 4, 3))] + \
    [triton.Config({"BLOCK_N": 128, "CUT_BY_TILE": True, "TILES": 1}, num_warps=4, num_stages=3)]


def _configs_for_kind(configs, named_args, **kwargs):
    """The autotuner's candidates for one launch: int4's own only for int4, two tiles a trip only where the
    tiles pair up (K a multiple of 256) and the codes go into products as they are (FAST and TILE_SCALE)."""
    def get(name):
        return kwargs.get(name, named_args.get(name))
    pairs = get("K") is not None and get("K") % (2 * BLOCK_K) == 0 and bool(get("FAST")) and bool(get("TILE_SCALE"))
    return [c for c in configs if (get("KIND") == 1 or c not in _INT4_CONFIGS) and (pairs or c.kwargs["TILES"] == 1)]


@triton.jit
def int8_to_bf16(q):
    """int8 codes → bfloat16, exactly: a byte permute puts each code + 128 under a float32's exponent 2^23,
    2^23 + 128 is subtracted, and two results round into one register (no integer-to-float conversion)."""
    return tl.inline_asm_elementwise(
        asm="""{
        .reg .b32 a, m, f0, f1, f2, f3;
        xor.b32 a, $2, 0x80808080;
        mov.b32 m, 0x4B000000;
        prmt.b32 f0, a, m, 0x7440;
        prmt.b32 f1, a, m, 0x7441;
        prmt.b32 f2, a, m, 0x7442;
        prmt.b32 f3, a, m, 0x7443;
        sub.f32 f0, f0, 0f4B000080;
        sub.f32 f1, f1, 0f4B000080;
        sub.f32 f2, f2, 0f4B000080;
        sub.f32 f3, f3, 0f4B000080;
        cvt.rn.bf16x2.f32 $0, f1, f0;
        cvt.rn.bf16x2.f32 $1, f3, f2;
        }""", constraints="=r,=r,r", args=[q], dtype=tl.bfloat16, is_pure=True, pack=4)


def _nibbles_asm(shift: str) -> str:
    """int4 bytes (code + 8 a nibble), 4 a register → their low (or, shifted first, high) nibbles' codes in
    bf16, two a register: each nibble u under bf16's exponent 2^7 (128 + u, exact), minus 136."""
    return f"""{{
        .reg .b32 z, t0, t1, mask, magic, one, bias;
        mov.b32 z, 0;
        mov.b32 mask, 0x000F000F;
        mov.b32 magic, 0x43004300;
        mov.b32 one, 0x3F803F80;
        mov.b32 bias, 0xC308C308;
        prmt.b32 t0, $2, z, 0x4140;
        prmt.b32 t1, $2, z, 0x4342;
        {shift}
        lop3.b32 t0, t0, mask, magic, 0xEA;
        lop3.b32 t1, t1, mask, magic, 0xEA;
        fma.rn.bf16x2 $0, t0, one, bias;
        fma.rn.bf16x2 $1, t1, one, bias;
        }}"""


_LOW_NIBBLES = tl.constexpr(_nibbles_asm(""))
_HIGH_NIBBLES = tl.constexpr(_nibbles_asm("shr.b32 t0, t0, 4;\n        shr.b32 t1, t1, 4;"))


@triton.jit
def low_nibbles_to_bf16(byte):
    """int4 bytes → the even columns' codes (their low nibbles) in bf16, exactly (see _nibbles_asm)."""
    return tl.inline_asm_elementwise(asm=_LOW_NIBBLES, constraints="=r,=r,r", args=[byte], dtype=tl.bfloat16,
                                     is_pure=True, pack=4)


@triton.jit
def high_nibbles_to_bf16(byte):
    """int4 bytes → the odd columns' codes (their high nibbles) in bf16, exactly (see _nibbles_asm)."""
    return tl.inline_asm_elementwise(asm=_HIGH_NIBBLES, constraints="=r,=r,r", args=[byte], dtype=tl.bfloat16,
                                     is_pure=True, pack=4)


@triton.jit
def _int4_tile(x_rows, q_ptr, rows, mmask, k0, K, k_bytes, EVEN_K: tl.constexpr, BLOCK_M: tl.constexpr,
               BLOCK_K: tl.constexpr):
    """One 128-column int4 tile's bytes [rows, 64] (byte j: column 2j low, 2j + 1 high, code + 8) and the
    activations' even and odd columns [BLOCK_M, 64] (split in registers: a thread's pairs)."""
    j = k0 // 2 + tl.arange(0, BLOCK_K // 2)
    k = k0 + tl.arange(0, BLOCK_K)
    if EVEN_K:
        byte = tl.load(q_ptr + rows[:, None] + j[None, :])
        x = tl.load(x_rows + k[None, :], mask=mmask[:, None], other=0.0)
    else:
        byte = tl.load(q_ptr + rows[:, None] + j[None, :], mask=(j < k_bytes)[None, :], other=0x88)
        x = tl.load(x_rows + k[None, :], mask=mmask[:, None] & (k < K)[None, :], other=0.0)
    xe, xo = tl.split(x.reshape(BLOCK_M, BLOCK_K // 2, 2))
    return byte, xe, xo


@triton.jit
def _int4_codes_tile(acc, x_rows, q_ptr, s_ptr, rows, scale_rows, mmask, k0, K, k_bytes, k_off, cell_k,
                     EVEN_K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    """acc + one int4 tile's product, its codes as bf16 integers (the even columns' low nibbles and the odd
    columns' high nibbles against the activations' even and odd columns), scaled once a row."""
    s = tl.load(s_ptr + scale_rows + (k0 + k_off) // cell_k)
    byte, xe, xo = _int4_tile(x_rows, q_ptr, rows, mmask, k0, K, k_bytes, EVEN_K, BLOCK_M, BLOCK_K)
    part = tl.dot(xe, tl.trans(low_nibbles_to_bf16(byte)))
    part = tl.dot(xo, tl.trans(high_nibbles_to_bf16(byte)), part)
    return acc + part * s[None, :]


@triton.autotune(configs=_CONFIGS + _INT4_CONFIGS, key=["BLOCK_M", "N", "K", "KIND", "TILE_SCALE", "FAST", "SMS"],
                 prune_configs_by={"early_config_prune": _configs_for_kind}, **AUTOTUNE_CACHE)
@triton.jit
def _quant_skinny_kernel(x_ptr, q_ptr, s_ptr, b_ptr, out_ptr, part_ptr, lock_ptr, M, N, K, k_bytes, stride_xm,
                         stride_qn, stride_sn, stride_om, n_off, k_off, cell_n, cell_k, KIND: tl.constexpr,
                         HAS_BIAS: tl.constexpr, TILE_SCALE: tl.constexpr, FAST: tl.constexpr, EVEN_K: tl.constexpr,
                         PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                         BLOCK_K: tl.constexpr, CUT_BY_TILE: tl.constexpr, TILES: tl.constexpr, SMS: tl.constexpr):
    """out[M, N] = x @ W.T (+ bias). With the bands cut along K (a second grid axis of `split` programs, as
    many as the launch's grid gives: one compiled kernel serves every split), program (i, j) sums its share
    of the K tiles into float32 part[j] (part: [split, M, N]); the band's last program to finish (a counter
    a band, lock[i], which it sets back to 0) adds the parts in order, the bias, and stores out.
    CUT_BY_TILE changes only the grid the launch is given (its bands cut by their own width). TILES = 2 (int4
    codes as bf16 integers, K a multiple of 256: the autotuner's pruning) takes two tiles a trip. SMS, the
    GPU's multiprocessor count, is not read here: it keys the autotuner's choice (kept in Triton's cache,
    which knows the architecture but not the model), since the split, and so the grid, depends on it."""
    tl.static_assert(TILES == 1 or (KIND == 1 and FAST and TILE_SCALE and EVEN_K), "two tiles a trip: int4 as bf16")
    split = tl.num_programs(1)
    tiles_per = tl.cdiv(tl.cdiv(K, BLOCK_K), split * TILES) * TILES  # whole trips a part
    n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    k_lo = tl.program_id(1) * tiles_per * BLOCK_K  # a multiple of BLOCK_K, as the compiler can see
    m = tl.arange(0, BLOCK_M)
    nmask, mmask = n < N, m < M
    n_in = tl.minimum(n, N - 1)  # rows past N read row N - 1 (never stored): weight loads without masks
    rows = n_in.to(tl.int64) * stride_qn
    scale_rows = ((n_in + n_off) // cell_n).to(tl.int64) * stride_sn
    x_rows = x_ptr + m[:, None] * stride_xm
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k0 in range(k_lo, tl.minimum(K, k_lo + tiles_per * BLOCK_K), TILES * BLOCK_K):
        if TILE_SCALE and not (KIND == 1 and FAST):  # the tile lies in one cell a row: one scale a row
            s = tl.load(s_ptr + scale_rows + (k0 + k_off) // cell_k)
        if KIND == 1:  # int4: byte j holds k = 2j (low nibble) and 2j + 1 (high), code + 8 stored
            if FAST and TILE_SCALE:
                acc = _int4_codes_tile(acc, x_rows, q_ptr, s_ptr, rows, scale_rows, mmask, k0, K, k_bytes, k_off,
                                       cell_k, EVEN_K, BLOCK_M, BLOCK_K)
                if TILES == 2:
                    acc = _int4_codes_tile(acc, x_rows, q_ptr, s_ptr, rows, scale_rows, mmask, k0 + BLOCK_K, K,
                                           k_bytes, k_off, cell_k, EVEN_K, BLOCK_M, BLOCK_K)
            else:
                byte, xe, xo = _int4_tile(x_rows, q_ptr, rows, mmask, k0, K, k_bytes, EVEN_K, BLOCK_M, BLOCK_K)
                even = k0 + 2 * tl.arange(0, BLOCK_K // 2)
                lo = ((byte & 0xF).to(tl.int32) - 8).to(tl.float32)
                hi = ((byte >> 4).to(tl.int32) - 8).to(tl.float32)
                if TILE_SCALE:
                    lo, hi = lo * s[:, None], hi * s[:, None]
                else:
                    lo *= tl.load(s_ptr + scale_rows[:, None] + ((even + k_off) // cell_k)[None, :],
                                  mask=(even < K)[None, :], other=0.0)
                    hi *= tl.load(s_ptr + scale_rows[:, None] + ((even + 1 + k_off) // cell_k)[None, :],
                                  mask=(even + 1 < K)[None, :], other=0.0)
                acc = tl.dot(xe, tl.trans(lo.to(xe.dtype)), acc, input_precision=PRECISION)
                acc = tl.dot(xo, tl.trans(hi.to(xo.dtype)), acc, input_precision=PRECISION)
        else:
            k = k0 + tl.arange(0, BLOCK_K)
            if EVEN_K:
                w = tl.load(q_ptr + rows[:, None] + k[None, :])
                x = tl.load(x_rows + k[None, :], mask=mmask[:, None], other=0.0)
            else:
                w = tl.load(q_ptr + rows[:, None] + k[None, :], mask=(k < K)[None, :], other=0)
                x = tl.load(x_rows + k[None, :], mask=mmask[:, None] & (k < K)[None, :], other=0.0)
            if FAST and TILE_SCALE:
                if KIND == 2:
                    w = w.to(tl.float8e4nv, bitcast=True).to(tl.bfloat16)
                else:
                    w = int8_to_bf16(w)
                acc += tl.dot(x, tl.trans(w)) * s[None, :]
            else:
                if KIND == 2:  # float8 e4m3, stored as bytes
                    w = w.to(tl.float8e4nv, bitcast=True)
                w = w.to(tl.float32)
                if TILE_SCALE:
                    w = w * s[:, None]
                else:
                    w = w * tl.load(s_ptr + scale_rows[:, None] + ((k + k_off) // cell_k)[None, :],
                                    mask=(k < K)[None, :], other=0.0)
                acc = tl.dot(x, tl.trans(w.to(x.dtype)), acc, input_precision=PRECISION)
    mask = mmask[:, None] & nmask[None, :]
    last = split == 1
    if split > 1:  # this program's part; the band's last to finish adds them up
        part = m[:, None] * N + n[None, :]  # part is [split, M, N], contiguous
        tl.store(part_ptr + tl.program_id(1).to(tl.int64) * M * N + part, acc, mask=mask)
        tl.debug_barrier()  # every thread's part stored before the counter moves (the release covers them)
        done = tl.atomic_add(lock_ptr + tl.program_id(0), 1, sem="acq_rel", scope="gpu")
        if done == split - 1:
            acc = tl.load(part_ptr + part, mask=mask, other=0.0, cache_modifier=".cg").to(tl.float32)
            for j in range(1, split):  # in order, whichever program came last: the same sums every time
                acc += tl.load(part_ptr + j * M * N + part, mask=mask, other=0.0, cache_modifier=".cg")
            tl.atomic_xchg(lock_ptr + tl.program_id(0), 0, sem="relaxed", scope="gpu")  # for the next launch
        last = done == split - 1
    if last:
        if HAS_BIAS:
            acc += tl.load(b_ptr + n, mask=nmask, other=0.0).to(tl.float32)[None, :]
        tl.store(out_ptr + m[:, None] * stride_om + n[None, :], acc.to(out_ptr.dtype.element_ty), mask=mask)


def fast_codes(x: torch.Tensor) -> bool:
    """Whether codes go into products as bf16 integers, scaled a tile (bf16 activations; not in Triton's
    interpreter, which runs no inline assembly)."""
    return x.dtype == torch.bfloat16 and os.environ.get("TRITON_INTERPRET") != "1"


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
    kind = KINDS[scheme]

    def cut(meta) -> int:  # the launch's split: by 64-row bands, or (CUT_BY_TILE) by the config's own
        assert meta["TILES"] == 1 or k % (2 * BLOCK_K) == 0, "two tiles a trip need K a multiple of 256"
        return split_k(n, k, x.device, meta["BLOCK_N"] if meta["CUT_BY_TILE"] else 64)

    fast, whole_cells = fast_codes(x), tile_scale(k, cell[1], offset[1])
    candidates = _configs_for_kind(_quant_skinny_kernel.configs, {"K": k}, KIND=kind, FAST=fast,
                                   TILE_SCALE=whole_cells)
    most = max(cut(c.kwargs) for c in candidates)
    # the parts are float32 whichever way: the kernel's summing branch is compiled even where no band is cut
    part = torch.empty(most, m, n, dtype=torch.float32, device=x.device) if most > 1 else scale
    grid = lambda meta: (triton.cdiv(n, meta["BLOCK_N"]), cut(meta))  # noqa: E731
    # (k + 1) // 2, an int4 row's bytes, is an argument so that Triton sees it divide by 16: vectorised loads
    _quant_skinny_kernel[grid](x, q, scale, bias if bias is not None else scale, out, part,
                               _band_locks(x.device, triton.cdiv(n, 16)), m, n, k, (k + 1) // 2, x.stride(0),
                               q.stride(0), scale.stride(0), out.stride(0), offset[0], offset[1], cell[0], cell[1],
                               KIND=kind, HAS_BIAS=bias is not None, TILE_SCALE=whole_cells, FAST=fast,
                               EVEN_K=k % BLOCK_K == 0,
                               PRECISION="ieee" if x.dtype == torch.float32 else "tf32",
                               BLOCK_M=max(16, triton.next_power_of_2(m)), BLOCK_K=BLOCK_K,
                               SMS=_multiprocessors(x.device))
    return out


def split_k(n: int, k: int, device: torch.device, band: int = 64) -> int:
    """How many programs share a band of weight rows along K: a kernel whose bands of `band` rows number
    fewer than two a multiprocessor (an 8B model's 4096 x 14336 down projection: 64 bands of 64 on 132)
    keeps too few loads in flight to read at the memory's rate, so the bands are cut along K (into tiles of
    at least 1,024 columns), their float32 partial sums added by each band's last program to finish."""
    bands = triton.cdiv(n, band)
    want = triton.cdiv(2 * _multiprocessors(device), bands)
    return max(1, min(want, k // 1024))


_LOCKS: dict[torch.device, torch.Tensor] = {}
_OUTGROWN: list[torch.Tensor] = []


def _band_locks(device: torch.device, bands: int) -> torch.Tensor:
    """A device's counters of finished parts a band, zero between launches (each band's last program sets
    its counter back): the GEMMs on a device run one at a time here (the engine's one compute stream; its
    side streams only copy), so one set serves them all — two split GEMMs in flight on two streams at once
    would need a set each. Made (zeros) at a device's first GEMM, before any CUDA graph captures one."""
    locks = _LOCKS.get(device)
    if locks is None or locks.numel() < bands:
        if locks is not None:
            _OUTGROWN.append(locks)  # graphs captured with it still use it
        locks = _LOCKS[device] = torch.zeros(max(bands, 1 << 16), dtype=torch.int32, device=device)
    return locks


@functools.cache
def _multiprocessors(device: torch.device) -> int:
    if device.type != "cuda":
        return 1  # Triton's interpreter on CPU
    return torch.cuda.get_device_properties(device).multi_processor_count


@triton.jit
def _dequantize_kernel(q_ptr, s_ptr, out_ptr, N, K, k_bytes, stride_qn, stride_sn, stride_on, n_off, k_off, cell_n,
                       cell_k, KIND: tl.constexpr, TILE_SCALE: tl.constexpr, BLOCK_N: tl.constexpr,
                       BLOCK_K: tl.constexpr):
    n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    k0 = tl.program_id(1) * BLOCK_K
    k = k0 + tl.arange(0, BLOCK_K)
    nmask, kmask = n < N, k < K
    rows = n.to(tl.int64) * stride_qn
    if KIND == 1:
        j = k0 // 2 + tl.arange(0, BLOCK_K // 2)
        byte = tl.load(q_ptr + rows[:, None] + j[None, :], mask=nmask[:, None] & (j < k_bytes)[None, :],
                       other=0x88).to(tl.int32)
        w = tl.join((byte & 0xF) - 8, (byte >> 4) - 8).reshape(BLOCK_N, BLOCK_K).to(tl.float32)
    else:
        w = tl.load(q_ptr + rows[:, None] + k[None, :], mask=nmask[:, None] & kmask[None, :], other=0)
        if KIND == 2:
            w = w.to(tl.float8e4nv, bitcast=True)
        w = w.to(tl.float32)
    mask = nmask[:, None] & kmask[None, :]
    scale_rows = ((n + n_off) // cell_n).to(tl.int64) * stride_sn
    if TILE_SCALE:  # the tile lies in one cell a row: one scale a row, one division a program
        w = w * tl.load(s_ptr + scale_rows + (k0 + k_off) // cell_k, mask=nmask, other=0.0)[:, None]
    else:
        w = w * tl.load(s_ptr + scale_rows[:, None] + ((k + k_off) // cell_k)[None, :], mask=mask, other=0.0)
    tl.store(out_ptr + n.to(tl.int64)[:, None] * stride_on + k[None, :], w.to(out_ptr.dtype.element_ty), mask=mask)


def dequantize(scheme: str, codes: torch.Tensor, scale: torch.Tensor, shape: tuple[int, int],
               cell: tuple[int, int], offset: tuple[int, int], dtype: torch.dtype) -> torch.Tensor:
    """The weight [N, K] in `dtype`, as `pdpipe.quant.weights.dequantize` gives it (code × scale in float32,
    then `dtype`), in one pass: codes and scales read once, the weight written once."""
    n, k = shape
    q = codes.view(torch.uint8) if codes.dtype == torch.float8_e4m3fn else codes
    out = torch.empty(n, k, dtype=dtype, device=codes.device)
    grid = (triton.cdiv(n, 64), triton.cdiv(k, BLOCK_K))
    _dequantize_kernel[grid](q, scale, out, n, k, (k + 1) // 2, q.stride(0), scale.stride(0), out.stride(0),
                             offset[0], offset[1], cell[0], cell[1], KIND=KINDS[scheme],
                             TILE_SCALE=tile_scale(k, cell[1], offset[1]),
                             BLOCK_N=64, BLOCK_K=BLOCK_K, num_warps=4)
    return out


@triton.jit
def _fp8_rows_kernel(x_ptr, q_ptr, s_ptr, K, stride_xm, stride_qm, BLOCK: tl.constexpr):
    """Row m of x in e4m3: its codes (x / scale, rounded to nearest even, IEEE division as torch's) and its
    float32 scale amax / 448 (1 for a row of zeros), as `reference.fp8_per_row` gives them, bit for bit for
    finite rows. A NaN stays NaN, as in torch (its row's scale 1, the clamp passing NaN on): Triton's max and
    clamp would drop it and hide it as -448."""
    m = tl.program_id(0).to(tl.int64)
    k = tl.arange(0, BLOCK)
    x = tl.load(x_ptr + m * stride_xm + k, mask=k < K, other=0.0).to(tl.float32)
    amax = tl.max(tl.abs(x), 0)
    nan = tl.max((x != x).to(tl.int32), 0) > 0
    scale = tl.where((amax > 0) & ~nan, tl.math.div_rn(amax, 448.0), 1.0)
    clamped = tl.minimum(tl.maximum(tl.math.div_rn(x, scale), -448.0, propagate_nan=tl.PropagateNan.ALL), 448.0,
                         propagate_nan=tl.PropagateNan.ALL)
    codes = clamped.to(tl.float8e4nv)
    tl.store(q_ptr + m * stride_qm + k, codes, mask=k < K)
    tl.store(s_ptr + m, scale)


def fp8_per_row(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] → its e4m3 codes [M, K] and float32 scales [M, 1] (`reference.fp8_per_row`), in one pass: x read
    once, where torch's eight elementwise passes over a float32 copy cost a 2,048-token prompt's W8A8
    projections more than their FP8 GEMMs save."""
    x = x if x.stride(1) == 1 else x.contiguous()
    m, k = x.shape
    codes = torch.empty(m, k, dtype=torch.float8_e4m3fn, device=x.device)
    scale = torch.empty(m, 1, dtype=torch.float32, device=x.device)
    block = triton.next_power_of_2(k)
    _fp8_rows_kernel[(m,)](x, codes, scale, k, x.stride(0), codes.stride(0), BLOCK=block,
                           num_warps=max(4, min(16, block // 1024)))
    return codes, scale
