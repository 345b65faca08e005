"""The extend-attention Triton kernel in Triton's interpreter, on CPU, against the torch reference: a step
of one-token chunks (decodes) beside prompt chunks after context, empty chunks (a graph's padding) and
rows in no chunk, sliding window or none, query-head groups of 1, 4, 7 and 8, the keys in 1, 2 and 4
parts. Float32 only (the interpreter's dots); tests/gpu/test_kernels_gpu.py runs bf16 and FP8 pools on a
GPU. Needs `pip install triton`; no GPU; ~2 minutes.

    python benchmarks/probes/attention_interpret.py
"""
from __future__ import annotations

import os

os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported

import torch  # noqa: E402

from pdpipe.kernels import reference, triton_ops  # noqa: E402

Q_LENS = [1, 5, 1, 70, 33, 0, 1, 0]  # decodes, chunks after context, empty chunks
CONTEXTS = [1, 40, 150, 130, 33, 0, 200, 0]  # each sequence's length after the step
PADDING = 5  # rows in no chunk after the last


def error(heads: int, kv_heads: int, dim: int, page: int, window: int | None, splits: int) -> float:
    """Relative error of the kernel's rows in chunks against the reference; rows in no chunk must be 0 when
    the keys are split (their parts are never written, never read)."""
    gen = torch.Generator().manual_seed(heads * 7 + dim + splits)
    num_blocks = sum(-(-n // page) for n in CONTEXTS) + 4
    k_cache, v_cache = torch.randn(2, num_blocks, page, kv_heads, dim, generator=gen)
    order = torch.randperm(num_blocks, generator=gen).int()
    tables = torch.zeros(len(CONTEXTS), max(-(-n // page) for n in CONTEXTS), dtype=torch.int32)
    used = 0
    for i, n in enumerate(CONTEXTS):
        tables[i, : -(-n // page)] = order[used: used + -(-n // page)]
        used += -(-n // page)
    bounds = [0]
    for n in Q_LENS:
        bounds.append(bounds[-1] + n)
    q = torch.randn(bounds[-1] + PADDING, heads, dim, generator=gen)
    expected = reference.paged_attention(q[: bounds[-1]], k_cache, v_cache, tables, bounds, CONTEXTS, dim ** -0.5,
                                         window)
    out = torch.full_like(q, float("nan"))
    triton_ops.extend_attention(q, k_cache, v_cache, tables, torch.tensor(bounds, dtype=torch.int32),
                                torch.tensor(CONTEXTS, dtype=torch.int32), max(Q_LENS), dim ** -0.5, window, out=out,
                                num_splits=splits)
    got = out[: bounds[-1]]
    assert not got.isnan().any(), "a row of a chunk was not written"
    if splits > 1:
        assert (out[bounds[-1]:] == 0).all(), "rows in no chunk"
    return ((got - expected).norm() / expected.norm()).item()


def main() -> None:
    for heads, kv_heads, dim, page in ((8, 8, 16, 16), (8, 2, 32, 16), (28, 4, 16, 16), (8, 1, 16, 8)):
        for window in (None, 24):
            for splits in (1, 2, 4):
                err = error(heads, kv_heads, dim, page, window, splits)
                print(f"heads {heads:2d}/{kv_heads} dim {dim} page {page:2d} window {window} splits {splits}: "
                      f"relative error {err:.1e}", flush=True)
                assert err < 1e-5, err
    print("extend attention equals the reference")


if __name__ == "__main__":
    main()
