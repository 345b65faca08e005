"""The quantized-weight Triton kernels in Triton's interpreter, on CPU, against the torch references: the
weight-read GEMM (`triton_quant.quant_skinny_linear`, each of a few tile widths, bands cut along K or not,
float32 and float16 rows, whole weights and shards that cut groups and blocks), the one-pass dequantize
(bit for bit), and the fused experts' grouped GEMMs on QuantStacks (`triton_moe.fused_moe`; its final sum
in torch, which the interpreter does not run); int4's codes-as-they-are loop (one or two tiles a trip) with
float32 stand-ins for its nibble conversions. The bf16 paths' inline assembly (integer codes into bf16)
does not run here: tests/gpu/test_quant_gpu.py checks it. Needs `pip install triton`; no GPU.

    python benchmarks/probes/quant_interpret.py
"""
from __future__ import annotations

import os

os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported

import torch  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from pdpipe.kernels import reference, triton_moe, triton_quant  # noqa: E402
from pdpipe.kernels.reference import QuantStack  # noqa: E402
from pdpipe.quant.weights import dequantize, quantize  # noqa: E402

SCHEMES = ("wint8", "wint4", "fp8", "block_wise_fp8")
SHAPES = ((64, 256), (48, 200), (40, 328), (96, 576), (33, 129))


def parts(n: int, k: int, scheme: str) -> list:
    whole = quantize(torch.randn(n, k) * 0.02, scheme)
    return [whole, whole[:, 72:k], whole[8:n]] if n >= 40 and k >= 200 else [whole]


AUTOTUNED = triton_quant._quant_skinny_kernel


def fixed(config: triton.Config):
    """The autotuned kernel at one configuration (the interpreter cannot time configurations)."""
    jit = AUTOTUNED.fn

    class Fixed:
        configs = [config]

        def __getitem__(self, grid):
            return lambda *a, **kw: jit[grid(config.kwargs)](*a, **config.kwargs, **kw)
    return Fixed()


def fixed_width(block_n: int):
    return fixed(triton.Config({"BLOCK_N": block_n, "CUT_BY_TILE": False, "TILES": 1}))


def check_gemm() -> int:
    bad = 0
    split_k = triton_quant.split_k
    for block_n, split in ((16, 1), (32, 3), (128, 1)):  # 3: bands cut along K, the last program adds them
        triton_quant._quant_skinny_kernel = fixed_width(block_n)
        triton_quant.split_k = lambda n, k, device, band=64, split=split: split
        for (n, k), scheme in ((s, q) for s in SHAPES for q in SCHEMES):
            for part in parts(n, k, scheme):
                for m, dtype in ((1, torch.float32), (3, torch.float16), (16, torch.float32), (40, torch.float16)):
                    x = torch.randn(m, part.shape[1]).to(dtype)
                    bias = torch.randn(part.shape[0]).to(dtype) if m == 3 else None
                    got = triton_quant.quant_skinny_linear(x, scheme, part.codes.contiguous(), part.scale.contiguous(),
                                                           part.shape, part.cell, part.offset, bias).float()
                    want = x.float() @ dequantize(part, dtype).float().T + (bias.float() if bias is not None else 0)
                    err = ((got - want).abs().max() / want.abs().max().clamp(min=1e-6)).item()
                    if err > (1e-5 if dtype == torch.float32 else 2e-2):
                        bad += 1
                        print(f"GEMM {scheme} {part.shape} offset {part.offset} M={m} {dtype} BLOCK_N={block_n} "
                              f"split {split}: {err}")
    triton_quant._quant_skinny_kernel = AUTOTUNED
    triton_quant.split_k = split_k
    return bad


@triton.jit
def _low_nibbles(byte):
    return ((byte & 0xF).to(tl.int32) - 8).to(tl.float32)


@triton.jit
def _high_nibbles(byte):
    return ((byte >> 4).to(tl.int32) - 8).to(tl.float32)


def check_two_tiles() -> int:
    """int4's codes-as-they-are path (FAST, bf16 on a GPU) with one and two tiles a trip, bands cut along K
    into parts of whole trips or not: its nibble conversions (inline assembly) stood in for by float32 ones
    and the rows float32 (the interpreter's bf16 casts are not exact), so the loop, the split and the
    scales are what is checked."""
    bad = 0
    saved = triton_quant.low_nibbles_to_bf16, triton_quant.high_nibbles_to_bf16, triton_quant.fast_codes
    split_k = triton_quant.split_k
    triton_quant.low_nibbles_to_bf16, triton_quant.high_nibbles_to_bf16 = _low_nibbles, _high_nibbles
    triton_quant.fast_codes = lambda x: True
    try:
        for (n, k), split in (((64, 1024), 1), ((96, 3584), 3), ((64, 2048), 5), ((40, 7168), 8), ((64, 1024), 3)):
            triton_quant.split_k = lambda n, k, device, band=64, split=split: split
            whole = quantize(torch.randn(n, k) * 0.02, "wint4")
            for config in triton_quant._configs_for_kind(AUTOTUNED.configs, {"K": k}, KIND=1, FAST=True,
                                                         TILE_SCALE=True):
                if config.kwargs["BLOCK_N"] > 64:
                    continue
                triton_quant._quant_skinny_kernel = fixed(config)
                for m in (1, 3):
                    x = torch.randn(m, k)
                    got = triton_quant.quant_skinny_linear(x, "wint4", whole.codes, whole.scale, whole.shape,
                                                           whole.cell, whole.offset)
                    want = x @ dequantize(whole).T
                    err = ((got - want).abs().max() / want.abs().max()).item()
                    if err > 1e-5:
                        bad += 1
                        print(f"int4 codes as they are {n} x {k} M={m} {config.kwargs} split {split}: {err}")
    finally:
        triton_quant.low_nibbles_to_bf16, triton_quant.high_nibbles_to_bf16, triton_quant.fast_codes = saved
        triton_quant._quant_skinny_kernel = AUTOTUNED
        triton_quant.split_k = split_k
    return bad


def check_dequantize() -> int:
    bad = 0
    for (n, k), scheme in ((s, q) for s in SHAPES for q in SCHEMES):
        for part in parts(n, k, scheme):
            for dtype in (torch.float32, torch.float16):
                got = triton_quant.dequantize(scheme, part.codes.contiguous(), part.scale.contiguous(), part.shape,
                                              part.cell, part.offset, dtype)
                if not torch.equal(got, dequantize(part, dtype)):
                    bad += 1
                    print(f"dequantize {scheme} {part.shape} offset {part.offset} {dtype}: differs")
    return bad


def stack(weights: list[torch.Tensor], scheme: str, cols: tuple[int, int] | None = None):
    qs = [quantize(w, scheme) for w in weights]
    if cols:
        qs = [q[:, cols[0]:cols[1]] for q in qs]
    q = qs[0]
    packed = QuantStack(scheme, torch.stack([x.codes.contiguous() for x in qs]).contiguous(),
                        torch.stack([x.scale.contiguous() for x in qs]).contiguous(), q.cell, q.offset,
                        (len(qs), q.shape[0], q.shape[1]))
    return packed, torch.stack([dequantize(x) for x in qs])


def check_experts() -> int:
    bad = 0
    sum_kernel = triton_moe.moe_sum
    triton_moe.moe_sum = lambda down, ids, first, held, add=None: down.view(*ids.shape, -1).sum(1)
    for hidden, inter, cols in ((256, 96, None), (200, 128, None), (192, 320, (72, 264)), (256, 256, (64, 192))):
        for scheme in ("wint8", "wint4", "fp8"):
            width = cols[1] - cols[0] if cols else inter
            q13, d13 = stack([torch.randn(2 * width, hidden) * 0.05 for _ in range(4)], scheme)
            q2, d2 = stack([torch.randn(hidden, inter) * 0.05 for _ in range(4)], scheme, cols)
            for tokens in (3, 16):
                x = torch.randn(tokens, hidden)
                weights, ids = torch.softmax(torch.randn(tokens, 4), -1).topk(2, -1)
                got = triton_moe.fused_moe(x, q13, q2, weights, ids.to(torch.int32))
                want = reference.fused_moe(x, d13, d2, weights, ids)
                err = ((got - want).abs().max() / want.abs().max()).item()
                if err > 1e-4:
                    bad += 1
                    print(f"experts {scheme} hidden {hidden} inter {inter} cols {cols} tokens {tokens}: {err}")
    triton_moe.moe_sum = sum_kernel
    return bad


def main() -> None:
    torch.manual_seed(0)
    bad = {"gemm": check_gemm(), "int4 two tiles": check_two_tiles(), "dequantize": check_dequantize(),
           "experts": check_experts()}
    print("mismatches:", bad)
    raise SystemExit(1 if any(bad.values()) else 0)


if __name__ == "__main__":
    main()
