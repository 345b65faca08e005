"""How many instructions does each quantized kernel's main loop spend on a weight element, and how many
registers a thread, on sm_90?

Compiles the weight-read GEMM (`triton_quant._quant_skinny_kernel`) and the fused experts' grouped GEMM
(`triton_moe._moe_gemm_kernel`) for an H100 on this machine — Triton's compiler and the `ptxas` and
`nvdisasm` it ships need no GPU — with the integer arguments marked as dividing by 16 (what a launch with
aligned shapes gets), disassembles them, and counts the instructions of the main loop (the largest
backward branch), divided by the weight elements a thread converts in one trip. Decode reads weights at
the memory's rate only if this stays small: an H100 issues about 30 T thread-instructions a second, so
6 instructions an element cap int8 near 5 TB/s before any stall, and the quarter-rate integer-to-float
conversions were the tighter bound.

Answer (Triton 3.9, 2026-12-07; the main loop, per weight element — a code; int4 bytes hold two):
- GEMM, 64-column tiles, 16 rows, tiles in one scale cell, bf16 activations: int8 5.6 (from 6.3 with a
  quarter-rate I2F an element, and 9.7 before weight loads lost their row masks), fp8 4.9, int4 3.8 (9.2
  with the nibbles interleaved by `tl.join`, 6.1 with the activations loaded strided); 128-column tiles:
  int8 4.5, fp8 3.9, int4 2.9. The float32 path (float32 activations, cells cut within a tile): 5-7.4.
- fused experts (gate and up, 32-column tiles): int8 5.9, fp8 5.2, int4 4.1 (7.4 while the int4 mask
  `j < (K + 1) // 2` kept every load a byte).
On the H100 those loops read (`quant_kernels.py`): int8 / fp8 GEMM 2.0-2.4 TB/s on large weights, int4
1.4; experts int8 / fp8 2.9 TB/s, int4 0.74 (before the byte-load fix).
Registers a thread (the sixth session, bf16 codes): int8 64 rows x 8 warps 64 (what the autotuner picks
for 28672 x 4096: four programs a multiprocessor), fp8 70; int4 103 at 64 x 8, 102 at 128 x 8 (its pick:
two programs a multiprocessor; Nsight Compute on the H100 read 104), 119 at 64 x 4, 153 at 128 x 4 — an
int4 byte tile becomes two bf16 operand tiles (even and odd columns) beside the split activations. So int4
runs half int8's warps: that, not instructions a code, is what its 1.4 TB/s reflects. Pairing a byte's
nibbles with columns j and j + 64 of a tile instead of 2j and 2j + 1 (a packing pdpipe does not use yet;
`_int4_tile_loop`, the loop alone) takes 57 registers instead of 80 at 64 rows x 8 warps, 84 instead of
107 at 128 x 8, for 0.3-0.4 more instructions a code: four programs a multiprocessor, as int8 runs.

    pip install triton; python benchmarks/probes/quant_sass.py
"""
from __future__ import annotations

import collections
import os
import re
import subprocess
import tempfile
from pathlib import Path

import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from pdpipe.kernels import triton_moe, triton_quant

TARGET = GPUTarget("cuda", 90, 32)
INSTRUCTION = re.compile(r"/\*[0-9a-f]{4}\*/\s+(?:@!?U?P\w+\s+)?([A-Z0-9_]+)")


def compiled(fn, types: dict[str, str], constants: dict, aligned: list[str], warps: int, stages: int):
    signature = dict(types) | {name: "constexpr" for name in constants}
    names = list(signature)
    attrs = {(names.index(a),): [["tt.divisibility", 16]] for a in aligned}
    source = ASTSource(fn=fn, signature=signature, constexprs=constants, attrs=attrs)
    return triton.compile(source, target=TARGET, options={"num_warps": warps, "num_stages": stages})


def main_loop(kernel) -> collections.Counter:
    """The instructions of the longest loop: from a label to the backward branch that jumps to it."""
    with tempfile.TemporaryDirectory() as tmp:
        cubin = Path(tmp) / "k.cubin"
        cubin.write_bytes(kernel.asm["cubin"])
        nvdisasm = Path(triton.__file__).parent / "backends/nvidia/bin/nvdisasm"
        lines = subprocess.run([str(nvdisasm), "-c", str(cubin)], capture_output=True, text=True,
                               check=True).stdout.splitlines()
    labels = {line.strip()[:-1]: i for i, line in enumerate(lines) if re.match(r"\s*\.L_x_\d+:", line)}
    best = (0, 0)
    for i, line in enumerate(lines):
        target = re.search(r"BRA\s+`\((\.L_x_\d+)\)", line)
        if target and labels.get(target.group(1), i) < i and i - labels[target.group(1)] > best[1] - best[0]:
            best = (labels[target.group(1)], i)
    return collections.Counter(m.group(1) for line in lines[best[0]:best[1] + 1] if (m := INSTRUCTION.search(line)))


def registers(kernel) -> int:
    """The registers a thread of the compiled kernel takes (`cuobjdump -res-usage`): with the threads of a
    program, what bounds how many of its programs a multiprocessor holds (65,536 registers)."""
    with tempfile.TemporaryDirectory() as tmp:
        cubin = Path(tmp) / "k.cubin"
        cubin.write_bytes(kernel.asm["cubin"])
        cuobjdump = Path(triton.__file__).parent / "backends/nvidia/bin/cuobjdump"
        usage = subprocess.run([str(cuobjdump), "-res-usage", str(cubin)], capture_output=True, text=True,
                               check=True).stdout
    return int(re.search(r"REG:(\d+)", usage).group(1))


def gemm(kind: int, fast: bool, block_n: int, warps: int, stages: int) -> tuple[float, collections.Counter, int]:
    types = {"x_ptr": "*bf16", "q_ptr": "*u8" if kind == 1 else "*i8", "s_ptr": "*fp32", "b_ptr": "*fp32",
             "out_ptr": "*bf16", "part_ptr": "*fp32", "lock_ptr": "*i32"} | {
        a: "i32" for a in ("M", "N", "K", "k_bytes", "stride_xm", "stride_qn", "stride_sn", "stride_om", "n_off",
                           "k_off", "cell_n", "cell_k")}
    constants = {"KIND": kind, "HAS_BIAS": False, "TILE_SCALE": True, "FAST": fast, "EVEN_K": True,
                 "PRECISION": "tf32", "BLOCK_M": 16, "BLOCK_N": block_n, "BLOCK_K": triton_quant.BLOCK_K,
                 "CUT_BY_TILE": False, "TILES": 1, "SMS": 132}
    kernel = compiled(triton_quant._quant_skinny_kernel.fn, types, constants,
                      ["x_ptr", "q_ptr", "s_ptr", "b_ptr", "out_ptr", "N", "K", "k_bytes", "stride_xm", "stride_qn",
                       "stride_om"], warps, stages)
    loop = main_loop(kernel)
    return sum(loop.values()) / (block_n * triton_quant.BLOCK_K / (warps * 32)), loop, registers(kernel)


def experts(kind: int, fast: bool) -> tuple[float, collections.Counter]:
    types = {"a_ptr": "*bf16", "w_ptr": "*u8" if kind == 1 else "*i8", "c_ptr": "*bf16", "sorted_ptr": "*i32",
             "block_expert_ptr": "*i32", "weight_ptr": "*fp32"} | {
        a: "i32" for a in ("N", "K", "k_bytes", "num_pairs", "num_experts", "stride_am", "stride_we", "stride_wn",
                           "stride_cm")} | {"s_ptr": "*fp32"} | {
        a: "i32" for a in ("stride_se", "stride_sn", "n_off", "k_off", "cell_n", "cell_k")}
    block_n, warps = 32, 4
    constants = {"TOP_K": 8, "ROWS_ARE_PAIRS": False, "GATED": True, "MUL_WEIGHT": False, "QKIND": kind,
                 "TILE_SCALE": True, "FAST": fast, "PRECISION": "tf32", "BLOCK_M": 16, "BLOCK_N": block_n,
                 "BLOCK_K": 128}
    kernel = compiled(triton_moe._moe_gemm_kernel, types, constants,
                      ["a_ptr", "w_ptr", "c_ptr", "s_ptr", "N", "K", "k_bytes", "stride_am", "stride_we",
                       "stride_wn", "stride_cm", "stride_se"], warps, 4)
    loop = main_loop(kernel)
    return sum(loop.values()) / (2 * block_n * 128 / (warps * 32)), loop


@triton.jit
def _int4_tile_loop(x_ptr, q_ptr, s_ptr, out_ptr, N, K, stride_xm, stride_qn, BLOCK_M: tl.constexpr,
                    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, HALVES: tl.constexpr):
    """The int4 GEMM's loop alone, two ways of pairing a byte's nibbles with columns: as pdpipe packs them
    (low nibble column 2j, high 2j + 1: the activations split into even and odd columns in registers) or,
    HALVES, low nibble column j and high j + 64 of each 128-column tile (the activations loaded as two
    halves). Only compiled, to count registers."""
    n = tl.minimum(tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N), N - 1)
    m = tl.arange(0, BLOCK_M)
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        byte = tl.load(q_ptr + n.to(tl.int64)[:, None] * stride_qn + (k0 // 2 + tl.arange(0, BLOCK_K // 2))[None, :])
        if HALVES:
            half = k0 + tl.arange(0, BLOCK_K // 2)
            lo_x = tl.load(x_ptr + m[:, None] * stride_xm + half[None, :], mask=(m < 1)[:, None], other=0.0)
            hi_x = tl.load(x_ptr + m[:, None] * stride_xm + (half + BLOCK_K // 2)[None, :], mask=(m < 1)[:, None],
                           other=0.0)
        else:
            x = tl.load(x_ptr + m[:, None] * stride_xm + (k0 + tl.arange(0, BLOCK_K))[None, :], mask=(m < 1)[:, None],
                        other=0.0)
            lo_x, hi_x = tl.split(x.reshape(BLOCK_M, BLOCK_K // 2, 2))
        part = tl.dot(lo_x, tl.trans(triton_quant.low_nibbles_to_bf16(byte)))
        part = tl.dot(hi_x, tl.trans(triton_quant.high_nibbles_to_bf16(byte)), part)
        acc += part * tl.load(s_ptr + n)[None, :]
    tl.store(out_ptr + m[:, None] * N + n[None, :], acc.to(tl.bfloat16), mask=(m < 1)[:, None])


def int4_pairings(block_n: int, warps: int, halves: bool) -> tuple[float, int]:
    types = {"x_ptr": "*bf16", "q_ptr": "*u8", "s_ptr": "*fp32", "out_ptr": "*bf16"} | {
        a: "i32" for a in ("N", "K", "stride_xm", "stride_qn")}
    kernel = compiled(_int4_tile_loop, types, {"BLOCK_M": 16, "BLOCK_N": block_n, "BLOCK_K": 128, "HALVES": halves},
                      ["x_ptr", "q_ptr", "out_ptr", "N", "K", "stride_xm", "stride_qn"], warps, 3)
    return sum(main_loop(kernel).values()) / (block_n * 128 / (warps * 32)), registers(kernel)


def main() -> None:
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    names = {0: "int8", 1: "int4", 2: "fp8"}
    for kind in (0, 2, 1):
        for fast in (False, True):
            for block_n, warps, stages in ((64, 4, 3), (64, 8, 4), (128, 4, 3), (128, 8, 3)):
                per, loop, regs = gemm(kind, fast, block_n, warps, stages)
                print(f"GEMM    {names[kind]} {'bf16 codes' if fast else 'float32   '} {block_n:>3} rows x {warps} "
                      f"warps: {per:5.2f} a weight element, {regs:3d} registers  {loop.most_common(6)}")
            per, loop = experts(kind, fast)
            print(f"experts {names[kind]} {'bf16 codes' if fast else 'float32   '}  32-column tiles: "
                  f"{per:5.2f} a weight element  {loop.most_common(6)}")
    for block_n, warps in ((64, 8), (128, 8), (128, 4)):
        for halves in (False, True):
            per, regs = int4_pairings(block_n, warps, halves)
            print(f"int4 loop, nibbles {'as halves  ' if halves else 'even / odd'} {block_n:>3} rows x {warps} warps: "
                  f"{per:5.2f} a code, {regs:3d} registers")


if __name__ == "__main__":
    main()
