"""The dense Triton kernels against their torch references (pdpipe/kernels/reference.py) on fresh random
inputs over a sweep of shapes: paged decode and extend attention, prompt attention, the KV store, RMS
norm, rotary embedding (alone and fused with the store), the skinny GEMM, SiLU-and-mul, and the copy of
a pool's blocks (whole, or head ranges between pools of different tensor parallelism).

Run on a GPU machine: python -m pytest -m gpu tests/gpu
"""
import pytest
import torch
from conftest import causal_prompt_reference
from gpu_checks import rel_err

from pdpipe.kernels import reference as ref

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU")]


def random_pool(num_blocks, page, kv_heads, dim, dtype):
    return (torch.randn(num_blocks, page, kv_heads, dim, device="cuda").to(dtype),
            torch.randn(num_blocks, page, kv_heads, dim, device="cuda").to(dtype))


SHAPES = [  # heads, kv_heads, head_dim, page
    (8, 8, 64, 16), (32, 8, 128, 16), (16, 2, 128, 32), (28, 4, 128, 16), (8, 1, 64, 8),
]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("heads,kv_heads,dim,page", SHAPES)
@pytest.mark.parametrize("window", [None, 100])
def test_decode_attention_matches_reference(dtype, heads, kv_heads, dim, page, window):
    from pdpipe.kernels import triton_ops

    torch.manual_seed(heads * dim + page)
    lens = [1, 7, page, page + 1, 300, 1024, 4099]
    num_blocks = sum(-(-n // page) for n in lens) + 8
    kc, vc = random_pool(num_blocks, page, kv_heads, dim, dtype)
    perm = torch.randperm(num_blocks, device="cuda").int()
    width = max(-(-n // page) for n in lens)
    tables = torch.zeros(len(lens), width, dtype=torch.int32, device="cuda")
    used = 0
    for i, n in enumerate(lens):
        nb = -(-n // page)
        tables[i, :nb] = perm[used:used + nb]
        used += nb
    q = torch.randn(len(lens), heads, dim, device="cuda").to(dtype)
    seq_lens = torch.tensor(lens, dtype=torch.int32, device="cuda")
    expected = ref.paged_attention(q.float(), kc.float(), vc.float(), tables, list(range(len(lens) + 1)), lens,
                                   dim ** -0.5, window)
    for splits in (1, 4, triton_ops.decode_splits(max(lens), len(lens), kv_heads)):
        out = torch.full_like(q, float("nan"))
        triton_ops.decode_attention(q, kc, vc, tables, seq_lens, dim ** -0.5, window, splits, out=out)
        assert not out.isnan().any(), "every output element is written"
        assert rel_err(out, expected) < (1e-5 if dtype == torch.float32 else 1e-2)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("heads,kv_heads,dim,page", SHAPES)
@pytest.mark.parametrize("window", [None, 64])
def test_extend_attention_matches_reference(dtype, heads, kv_heads, dim, page, window):
    from pdpipe.kernels import triton_ops

    torch.manual_seed(7 * heads + dim)
    # chunked prefill (context beyond the queries), decodes beside it (one-token chunks after long contexts)
    q_lens, ctx = [1, 5, 64, 200, 513, 1], [1, 40, 64, 900, 513, 3000]
    num_blocks = sum(-(-n // page) for n in ctx) + 4
    kc, vc = random_pool(num_blocks, page, kv_heads, dim, dtype)
    perm = torch.randperm(num_blocks, device="cuda").int()
    tables = torch.zeros(len(ctx), max(-(-n // page) for n in ctx), dtype=torch.int32, device="cuda")
    used = 0
    for i, n in enumerate(ctx):
        nb = -(-n // page)
        tables[i, :nb] = perm[used:used + nb]
        used += nb
    qsl = [0]
    for n in q_lens:
        qsl.append(qsl[-1] + n)
    q = torch.randn(qsl[-1] + 3, heads, dim, device="cuda").to(dtype)  # 3 padding rows in no chunk
    expected = ref.paged_attention(q[:qsl[-1]].float(), kc.float(), vc.float(), tables, qsl, ctx, dim ** -0.5,
                                   window)
    for splits in (1, 2, 8, triton_ops.extend_splits(qsl[-1], max(q_lens), max(ctx), heads, kv_heads)):
        out = torch.full_like(q, float("nan"))
        triton_ops.extend_attention(q, kc, vc, tables, torch.tensor(qsl, dtype=torch.int32, device="cuda"),
                                    torch.tensor(ctx, dtype=torch.int32, device="cuda"), max(q_lens), dim ** -0.5,
                                    window, out=out, num_splits=splits)
        assert not out[:qsl[-1]].isnan().any(), f"every chunk's row is written ({splits} splits)"
        assert rel_err(out[:qsl[-1]], expected) < (1e-5 if dtype == torch.float32 else 1e-2), splits
        if splits > 1:
            assert (out[qsl[-1]:] == 0).all(), "split parts of rows in no chunk are never read"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("heads,kv_heads,dim,page", SHAPES)
def test_prompt_attention_matches_reference(dtype, heads, kv_heads, dim, page):
    """Whole prompts in one batch (varlen flash attention on bf16/fp16, per prompt otherwise): each
    attends to itself alone, at lengths it has not seen before."""
    from pdpipe.models import decoder

    torch.manual_seed(heads + dim)
    bounds = [0]
    for n in (1, 7, 300, 1025, 129):
        bounds.append(bounds[-1] + n)
    q = torch.randn(bounds[-1], heads, dim, device="cuda").to(dtype)
    k, v = torch.randn(2, bounds[-1], kv_heads, dim, device="cuda").to(dtype)
    meta = decoder.AttentionMetadata(
        slot_mapping=torch.zeros(0), block_tables=torch.zeros(0), query_start_loc=bounds,
        seq_lens=[b - a for a, b in zip(bounds, bounds[1:])], fresh=True, max_query_len=1025,
        query_start_loc_t=torch.tensor(bounds, dtype=torch.int32, device="cuda"))
    out = decoder._prompt_attention(q, k, v, meta, dim ** -0.5)
    assert out.shape == q.shape and out.dtype == dtype
    expected = causal_prompt_reference(q, k, v, bounds, dim ** -0.5)
    assert rel_err(out.cpu(), expected) < (1e-5 if dtype == torch.float32 else 1e-2)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_store_kv_writes_exactly_its_slots(dtype):
    from pdpipe.kernels import triton_ops

    kc = torch.full((64, 16, 8, 128), float("nan"), device="cuda", dtype=dtype)
    vc = kc.clone()
    slots = torch.randperm(64 * 16, device="cuda")[:300]
    slots[::7] = -1  # padding rows write nothing
    k = torch.randn(300, 8, 128, device="cuda").to(dtype)
    v = torch.randn(300, 8, 128, device="cuda").to(dtype)
    triton_ops.store_kv(k, v, kc, vc, slots)
    keep = slots >= 0
    assert torch.equal(kc.view(-1, 8, 128)[slots[keep]], k[keep])
    assert torch.equal(vc.view(-1, 8, 128)[slots[keep]], v[keep])
    assert kc.isnan().sum().item() == (64 * 16 - keep.sum().item()) * 8 * 128


def test_compiled_variants_count_what_a_kernel_compiles():
    """`kernels.compiled_variants` (what a slow step's log names): a kernel met at a new specialisation (a
    hidden size nothing else uses) counts one more variant; called again at it, none."""
    from pdpipe import kernels
    from pdpipe.kernels import triton_ops

    x, w = torch.randn(3, 3001, device="cuda"), torch.randn(3001, device="cuda")
    before = kernels.compiled_variants()
    triton_ops.rms_norm(x, w, 1e-5)
    once = kernels.compiled_variants()
    triton_ops.rms_norm(x, w, 1e-5)
    assert once["_rms_norm_kernel"] == before["_rms_norm_kernel"] + 1
    assert kernels.compiled_variants() == once


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("rows,hidden", [(1, 4096), (37, 896), (300, 5120), (8, 100)])
def test_fused_rms_norm_matches_reference(dtype, rows, hidden):
    from pdpipe.kernels import triton_ops

    x = torch.randn(rows, hidden, device="cuda").to(dtype)
    res = torch.randn(rows, hidden, device="cuda").to(dtype)
    w = (1 + 0.1 * torch.randn(hidden, device="cuda")).to(dtype)
    out, new_res = triton_ops.rms_norm(x, w, 1e-5, res)
    ref_out, ref_res = ref.rms_norm(x, w, 1e-5, res)
    assert torch.equal(new_res, ref_res) and not out.isnan().any()
    assert rel_err(out, ref_out) < (1e-6 if dtype == torch.float32 else 1e-2)


@pytest.mark.parametrize("interleaved", [False, True])
@pytest.mark.parametrize("heads,dim", [(32, 128), (8, 64), (28, 128), (3, 32)])
def test_fused_rotary_matches_reference(interleaved, heads, dim):
    from pdpipe.kernels import triton_ops

    n = 77
    fused = torch.randn(n, (heads + 2) * dim, device="cuda").to(torch.bfloat16)
    x = fused[:, : heads * dim].view(n, heads, dim)  # a strided view, as the fused qkv projection gives
    freqs = torch.rand(n, dim // 2, device="cuda") * 100
    emb = freqs.repeat_interleave(2, -1) if interleaved else torch.cat([freqs, freqs], -1)
    out = triton_ops.rotary(x, emb.cos(), emb.sin(), interleaved)
    expected = ref.rotary(x.float(), emb.cos(), emb.sin(), interleaved)
    assert out.is_contiguous() and rel_err(out, expected) < 1e-2


@pytest.mark.parametrize("norm", [False, True])
@pytest.mark.parametrize("interleaved", [False, True])
@pytest.mark.parametrize("heads,kv_heads,dim", [(32, 8, 128), (14, 2, 64), (8, 8, 32), (28, 4, 128), (20, 4, 128)])
def test_fused_rope_and_store_matches_reference(interleaved, heads, kv_heads, dim, norm):
    """Strided q/k/v views of a fused qkv output, interleaved or half-split pairs, head counts of no
    power of two, with and without the per-head RMS norm first (Qwen3's q_norm/k_norm)."""
    from pdpipe.kernels import triton_ops

    n, blocks, page = 45, 20, 16
    qkv = torch.randn(n, (heads + 2 * kv_heads) * dim, device="cuda").to(torch.bfloat16)
    q, k, v = (t.view(n, -1, dim) for t in qkv.split([heads * dim, kv_heads * dim, kv_heads * dim], -1))
    freqs = torch.rand(n, dim // 2, device="cuda") * 100
    emb = freqs.repeat_interleave(2, -1) if interleaved else torch.cat([freqs, freqs], -1)
    slots = torch.randperm(blocks * page, device="cuda")[:n]
    slots[::7] = -1  # padding rows write nowhere
    kc = torch.full((blocks, page, kv_heads, dim), float("nan"), device="cuda", dtype=torch.bfloat16)
    vc = kc.clone()
    norms = (torch.rand(dim, device="cuda").to(torch.bfloat16) + 0.5, torch.rand(dim, device="cuda").to(
        torch.bfloat16) + 0.5, 1e-6) if norm else None
    q_out, k_out = triton_ops.rope_and_store(q, k, v, emb.cos(), emb.sin(), kc, vc, slots, interleaved, norms)
    if norms is not None:
        q, k = ref.rms_norm(q, norms[0], 1e-6)[0], ref.rms_norm(k, norms[1], 1e-6)[0]
    q_ref, k_ref = ref.rotary(q.float(), emb.cos(), emb.sin(), interleaved), ref.rotary(k.float(), emb.cos(),
                                                                                        emb.sin(), interleaved)
    assert rel_err(q_out, q_ref) < 1e-2 and rel_err(k_out, k_ref) < 1e-2
    keep = slots >= 0
    flat_k, flat_v = kc.view(-1, kv_heads, dim), vc.view(-1, kv_heads, dim)
    assert torch.equal(flat_k[slots[keep]], k_out[keep]) and torch.equal(flat_v[slots[keep]], v[keep])
    assert flat_k.isnan().all(-1).all(-1).sum().item() == blocks * page - keep.sum().item()  # nothing else written
    assert flat_v.isnan().all(-1).all(-1).sum().item() == blocks * page - keep.sum().item()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("rows", [1, 2, 3, 4])
@pytest.mark.parametrize("n,k,bias", [(6144, 4096, False), (4096, 14336, False), (100, 1000, True), (896, 64, True)])
def test_skinny_linear_matches_reference(dtype, rows, n, k, bias):
    from pdpipe.kernels import triton_ops

    x = torch.randn(rows, k, device="cuda").to(dtype)
    w = (torch.randn(n, k, device="cuda") / k ** 0.5).to(dtype)
    b = torch.randn(n, device="cuda").to(dtype) if bias else None
    out = triton_ops.skinny_linear(x, w, b)
    expected = torch.nn.functional.linear(x.double(), w.double(), None if b is None else b.double())
    assert out.shape == (rows, n) and not out.isnan().any() and rel_err(out, expected) < 1e-2
    assert isinstance(triton_ops.skinny_wins(x, w, b), bool)  # timed once against cuBLAS, then remembered


@pytest.mark.parametrize("rows,inter", [(1, 14336), (64, 896), (5, 1000)])
def test_fused_silu_and_mul_matches_reference(rows, inter):
    from pdpipe.kernels import triton_ops

    gu = torch.randn(rows, 2 * inter, device="cuda").to(torch.bfloat16)
    assert rel_err(triton_ops.silu_and_mul(gu), ref.silu_and_mul(gu.float())) < 1e-2


@pytest.mark.parametrize("layers,first,count", [(4, 0, 4), (32, 5, 1), (3, 2, 1)])
def test_block_copy_moves_exactly_the_blocks(layers, first, count):
    from pdpipe.kernels import triton_ops

    src = torch.randn(layers, 2, 50, 16, 8, 128, device="cuda").to(torch.bfloat16)
    dst = torch.full((layers, 2, 70, 16, 8, 128), float("nan"), device="cuda", dtype=torch.bfloat16)
    expected = dst.clone()
    si = torch.randperm(50, device="cuda")[:37].int()
    di = torch.randperm(70, device="cuda")[:37].int()
    triton_ops.copy_pool_blocks(src, si, dst, di, first, count)
    ref.copy_pool_blocks(src, si.long(), expected, di.long(), first, count)
    assert torch.equal(dst.nan_to_num(7.0), expected.nan_to_num(7.0))


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
@pytest.mark.parametrize("src_heads,dst_heads,src_n,dst_n", [
    (slice(0, 4), slice(4, 8), 4, 8), (slice(2, 3), slice(0, 1), 4, 1), (slice(4, 8), slice(0, 4), 8, 4),
    (None, None, 8, 8)])
def test_block_copy_moves_exactly_the_heads(src_heads, dst_heads, src_n, dst_n):
    """Between pools holding different key/value heads (tensor parallelism): only the given heads of
    the given blocks move, into the given heads; everything else is untouched."""
    from pdpipe.kernels import triton_ops

    src = torch.randn(3, 2, 20, 16, src_n, 64, device="cuda").to(torch.bfloat16)
    dst = torch.randn(3, 2, 20, 16, dst_n, 64, device="cuda").to(torch.bfloat16)
    expected = dst.clone()
    si = torch.tensor([3, 7, 0], dtype=torch.int32, device="cuda")
    di = torch.tensor([5, 1, 19], dtype=torch.int32, device="cuda")
    triton_ops.copy_pool_blocks(src, si, dst, di, 1, 2, src_heads, dst_heads)
    ref.copy_pool_blocks(src, si.long(), expected, di.long(), 1, 2, src_heads, dst_heads)
    assert torch.equal(dst, expected)
