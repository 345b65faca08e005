"""Would another int4 layout read faster? Times, on one GPU, the int4 weight-read GEMM's loop in four forms
beside the production kernel (`triton_quant.quant_skinny_linear`), each checked against `x @ W.T`:
- `pairs`: pdpipe's packing (a byte's low nibble column 2j, high 2j + 1; the activations split into even
  and odd columns in registers): the production loop, to see the probe's own harness cost;
- `halves`: each 128-column tile's byte j holds column j (low nibble) and j + 64 (high): the activations
  load as two halves, nothing split in registers (fewer registers: `quant_sass.py`);
- `pairs2`, `halves2`: the same with two 128-column tiles a trip of the loop (twice the bytes a load);
- `pairs_st`, `halves_st`: the scales stored [K / 128, N] (a tile's rows' scales side by side, one coalesced
  load) instead of [N, K / 128] (a scale a row, each in its own sector).
Bands are cut along K as the production kernel cuts them (`split_k`), the parts added by float32 atomics
into a zeroed output (the zeroing inside the timed graph). Each form is tuned over the same configurations.
Timed as `quant_kernels.py` times "in a step": 24 calls back to back in one CUDA graph, each on its own
copy of the weight past the L2.

    python benchmarks/probes/int4_layouts.py [--json OUT.json]
"""
from __future__ import annotations

import argparse
import json
import sys
from datetime import date
from pathlib import Path

import torch
import triton
import triton.language as tl

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from quant_kernels import copies_past_l2, copy_bandwidth, timed_in_step  # noqa: E402

from pdpipe.kernels import triton_quant  # noqa: E402
from pdpipe.quant.weights import dequantize, quantize  # noqa: E402

CONFIGS = [triton.Config({"BLOCK_N": bn}, num_warps=w, num_stages=st)
           for bn, w, st in ((32, 4, 4), (64, 4, 3), (64, 4, 4), (64, 8, 4), (128, 4, 3), (128, 8, 3))]
FORMS = {"pairs": (False, 1, False), "halves": (True, 1, False), "pairs2": (False, 2, False),
         "halves2": (True, 2, False), "pairs_st": (False, 1, True), "halves_st": (True, 1, True)}


@triton.jit
def _tile(acc, x_rows, q_ptr, s_ptr, rows, scale_rows, n_in, stride_sk, mmask, k0, HALVES: tl.constexpr,
          SCALE_T: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    if SCALE_T:
        s = tl.load(s_ptr + (k0 // BLOCK_K) * stride_sk + n_in)
    else:
        s = tl.load(s_ptr + scale_rows + k0 // BLOCK_K)
    byte = tl.load(q_ptr + rows[:, None] + (k0 // 2 + tl.arange(0, BLOCK_K // 2))[None, :])
    if HALVES:
        half = k0 + tl.arange(0, BLOCK_K // 2)
        xl = tl.load(x_rows + half[None, :], mask=mmask[:, None], other=0.0)
        xh = tl.load(x_rows + (half + BLOCK_K // 2)[None, :], mask=mmask[:, None], other=0.0)
    else:
        x = tl.load(x_rows + (k0 + tl.arange(0, BLOCK_K))[None, :], mask=mmask[:, None], other=0.0)
        xl, xh = tl.split(x.reshape(BLOCK_M, BLOCK_K // 2, 2))
    part = tl.dot(xl, tl.trans(triton_quant.low_nibbles_to_bf16(byte)))
    part = tl.dot(xh, tl.trans(triton_quant.high_nibbles_to_bf16(byte)), part)
    return acc + part * s[None, :]


@triton.autotune(configs=CONFIGS, key=["BLOCK_M", "N", "K", "HALVES", "TILES", "SCALE_T"])
@triton.jit
def _int4_kernel(x_ptr, q_ptr, s_ptr, out_ptr, M, N, K, stride_xm, stride_qn, stride_sn, stride_sk,
                 HALVES: tl.constexpr, TILES: tl.constexpr, SCALE_T: tl.constexpr, BLOCK_M: tl.constexpr,
                 BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    split = tl.num_programs(1)
    tiles_per = tl.cdiv(tl.cdiv(K, BLOCK_K), split)
    k_lo = tl.program_id(1) * tiles_per * BLOCK_K
    n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    m = tl.arange(0, BLOCK_M)
    n_in = tl.minimum(n, N - 1)
    rows = n_in.to(tl.int64) * stride_qn
    scale_rows = n_in.to(tl.int64) * stride_sn
    x_rows = x_ptr + m[:, None] * stride_xm
    mmask = m < M
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k0 in range(k_lo, tl.minimum(K, k_lo + tiles_per * BLOCK_K), TILES * BLOCK_K):
        acc = _tile(acc, x_rows, q_ptr, s_ptr, rows, scale_rows, n_in, stride_sk, mmask, k0, HALVES, SCALE_T,
                    BLOCK_M, BLOCK_K)
        if TILES == 2:
            acc = _tile(acc, x_rows, q_ptr, s_ptr, rows, scale_rows, n_in, stride_sk, mmask, k0 + BLOCK_K, HALVES,
                        SCALE_T, BLOCK_M, BLOCK_K)
    tl.atomic_add(out_ptr + m[:, None] * N + n[None, :], acc, mask=mmask[:, None] & (n < N)[None, :], sem="relaxed")


def halves_of(pairs: torch.Tensor) -> torch.Tensor:
    """pdpipe's int4 bytes [N, K / 2] (K a multiple of 128) in the halves layout."""
    low, high = pairs & 0xF, pairs >> 4
    codes = torch.stack([low, high], -1).reshape(pairs.shape[0], -1, 128)
    return codes[..., :64] | (codes[..., 64:] << 4)


def launcher(form: str, x: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor, n: int, k: int):
    halves, tiles, scale_t = FORMS[form]
    if scale_t:
        scale = scale.T.contiguous()
    m = x.shape[0]
    out = torch.empty(m, n, dtype=torch.float32, device=x.device)
    split = triton_quant.split_k(n, k, x.device)
    while split > 1 and -(-k // 128) % (split * tiles):  # whole trips a part
        split -= 1

    def call():
        out.zero_()
        grid = lambda meta: (triton.cdiv(n, meta["BLOCK_N"]), split)  # noqa: E731
        _int4_kernel[grid](x, codes, scale, out, m, n, k, x.stride(0), codes.stride(0), scale.stride(0),
                           scale.stride(0) if scale_t else 0, HALVES=halves, TILES=tiles, SCALE_T=scale_t,
                           BLOCK_M=max(16, triton.next_power_of_2(m)), BLOCK_K=128)
        return out
    return call


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", default="")
    parser.add_argument("--shapes", default="4096x4096,2112x7168,4096x14336,28672x4096,8192x28672")
    parser.add_argument("--rows", default="1,16,64")
    args = parser.parse_args()
    bandwidth = copy_bandwidth()
    gen = torch.Generator(device="cuda").manual_seed(0)
    rows = []
    for shape in args.shapes.split(","):
        n, k = (int(d) for d in shape.split("x"))
        qw = quantize(torch.randn(n, k, device="cuda", generator=gen, dtype=torch.bfloat16) * 0.02, "wint4")
        assert qw.cell == (1, 128), qw.cell
        plain = dequantize(qw, torch.float32)
        layouts = {"pairs": qw.codes, "halves": halves_of(qw.codes)}
        copies = copies_past_l2(qw.nbytes)
        for m in (int(r) for r in args.rows.split(",")):
            x = torch.randn(m, k, device="cuda", generator=gen).to(torch.bfloat16)
            want = x.float() @ plain.T
            row = {"n": n, "k": k, "m": m}
            layers = [qw] + [qw.clone() for _ in range(copies - 1)]
            prod = [lambda w=w: triton_quant.quant_skinny_linear(x, "wint4", w.codes, w.scale, w.shape, w.cell,
                                                                 w.offset) for w in layers]
            calls = {"production": prod}
            for form, (halves, _, _) in FORMS.items():
                codes = layouts["halves" if halves else "pairs"]
                calls[form] = [launcher(form, x, c, qw.scale, n, k) for c in [codes] + [codes.clone()
                                                                                       for _ in range(copies - 1)]]
            for form, fns in calls.items():
                err = ((fns[0]().float() - want).abs().max() / want.abs().max()).item()
                ms = timed_in_step(fns)
                floor = (qw.nbytes + x.numel() * 2) / bandwidth * 1e3
                row[form] = {"us": ms * 1e3, "efficiency": floor / ms, "err": err}
            rows.append(row)
            print(f"{n:>5}x{k:<5} M={m:<3} " + "  ".join(
                f"{f} {r['us']:6.1f} us {r['efficiency'] * 100:4.0f} %{' WRONG' if r['err'] > 2e-2 else ''}"
                for f, r in row.items() if isinstance(r, dict)), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"date": str(date.today()), "device": torch.cuda.get_device_name(),
                                               "copy_read_bytes_per_s": bandwidth, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
