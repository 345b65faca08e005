"""GPU suite (marked `gpu`; skipped where no CUDA device is): every Triton kernel against its torch
reference on fresh random inputs over a sweep of shapes, CUDA-graph decode, the GPU engine against
`transformers`, and the 1P+1D pipeline on two GPUs against the colocated GPU engine.

Run on a GPU machine: python -m pytest -m gpu tests/test_gpu.py
"""
import json
import time
import urllib.error
import urllib.request

import pytest
import torch

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU")]

from conftest import causal_prompt_reference, make_llm, make_prompts  # noqa: E402

from pdpipe.kernels import reference as ref  # noqa: E402
from pdpipe.messages import SamplingParams  # noqa: E402


def rel_err(out: torch.Tensor, expected: torch.Tensor) -> float:
    return ((out.double() - expected.double()).norm() / expected.double().norm().clamp_min(1e-12)).item()


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
    q_lens, ctx = [1, 5, 64, 200, 513], [1, 40, 64, 900, 513]  # chunked prefill: context beyond the queries
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
    q = torch.randn(qsl[-1], heads, dim, device="cuda").to(dtype)
    expected = ref.paged_attention(q.float(), kc.float(), vc.float(), tables, qsl, ctx, dim ** -0.5, window)
    out = torch.full_like(q, float("nan"))
    triton_ops.extend_attention(q, kc, vc, tables, torch.tensor(qsl, dtype=torch.int32, device="cuda"),
                                torch.tensor(ctx, dtype=torch.int32, device="cuda"), max(q_lens), dim ** -0.5,
                                window, out=out)
    assert not out.isnan().any()
    assert rel_err(out, expected) < (1e-5 if dtype == torch.float32 else 1e-2)


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


def test_no_live_step_times_the_skinny_gemm_of_a_tied_head(model_dir, monkeypatch):
    """After an engine's warm-up, a first eager prompt step of 3 sequences (beyond the prefill graphs)
    times nothing: the LM head (ERNIE's, tied to the embedding) was timed at every row count the skinny
    GEMM takes. Timed live it cost that step 0.6-0.8 s (do_bench and autotuning) under load."""
    from pdpipe.config import CacheConfig, EngineConfig, SchedulerConfig
    from pdpipe.engine.engine import LLMEngine
    from pdpipe.kernels import triton_ops

    monkeypatch.setattr(triton_ops, "skinny_timings", {})  # what other tests timed does not count
    engine = LLMEngine(EngineConfig(model=str(model_dir("ernie4_5_moe")), device="cuda:0", dtype="bfloat16",
                                    cache=CacheConfig(block_size=16, num_blocks=512),
                                    scheduler=SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=4096)))
    engine.warm_up()
    head = engine.runner.model.head_weight
    assert engine.spec.tie_word_embeddings and engine.runner.prefill_graphs is not None
    for rows in range(1, triton_ops.SKINNY_MAX_ROWS + 1):
        assert (rows, *head.shape, head.dtype, False, head.device) in triton_ops.skinny_timings, rows
    timed = set(triton_ops.skinny_timings)
    for i, p in enumerate(make_prompts(384, lengths=(700, 750, 800), seed=3)):  # 2250 tokens: eager
        engine.add_request(f"r{i}", p, SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True))
    while engine.has_unfinished():
        engine.step()
    assert set(triton_ops.skinny_timings) == timed and engine.leak_free()


@pytest.mark.parametrize("rows,inter", [(1, 14336), (64, 896), (5, 1000)])
def test_fused_silu_and_mul_matches_reference(rows, inter):
    from pdpipe.kernels import triton_ops

    gu = torch.randn(rows, 2 * inter, device="cuda").to(torch.bfloat16)
    assert rel_err(triton_ops.silu_and_mul(gu), ref.silu_and_mul(gu.float())) < 1e-2


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("tokens,experts,top_k,hidden,inter,held", [
    (1, 128, 8, 256, 128, 128), (7, 8, 2, 256, 512, 8), (64, 64, 6, 512, 256, 64), (4096, 8, 2, 256, 128, 8),
    (300, 128, 8, 256, 128, 64), (0, 8, 2, 256, 128, 8)])
def test_fused_moe_matches_reference(dtype, tokens, experts, top_k, hidden, inter, held):
    """Tokens per expert from 0 (one token, 128 experts) to ~1000 (4096 tokens, 8 experts); an expert-
    parallel rank holding the second half of the experts; no tokens at all; with odd token counts the
    shared experts' output added in the sum's kernel."""
    from pdpipe.kernels import triton_moe

    gen = torch.Generator(device="cuda").manual_seed(tokens + experts)
    x = torch.randn(tokens, hidden, device="cuda", generator=gen).to(dtype)
    w13 = (torch.randn(held, 2 * inter, hidden, device="cuda", generator=gen) / hidden ** 0.5).to(dtype)
    w2 = (torch.randn(held, hidden, inter, device="cuda", generator=gen) / inter ** 0.5).to(dtype)
    weights, ids = torch.randn(tokens, experts, device="cuda", generator=gen).softmax(-1).topk(top_k, -1)
    first = experts - held
    add = torch.randn(tokens, hidden, device="cuda", generator=gen).to(dtype) if tokens % 2 else None  # shared
    torch.cuda.empty_cache()  # the kernels' scratch then comes from NaN-filled memory: rows of other ranks'
    poison = torch.full((4 * tokens * top_k * max(hidden, inter) + (1 << 20),), float("nan"), device="cuda",
                        dtype=dtype)
    del poison  # experts are never read
    got = triton_moe.fused_moe(x, w13, w2, weights, ids, first, add)
    expected = ref.fused_moe(x.double(), w13.double(), w2.double(), weights.double(), ids, first,
                             None if add is None else add.double())
    assert got.shape == (tokens, hidden)
    if tokens:
        assert rel_err(got, expected) < (2e-2 if dtype == torch.bfloat16 else 1e-5)


@pytest.mark.parametrize("tokens,experts,top_k,bias,renormalize", [
    (1, 64, 6, True, True), (64, 128, 8, False, True), (300, 8, 2, False, False), (5, 6, 2, True, False),
    (0, 8, 2, False, True)])
def test_moe_route_matches_reference(tokens, experts, top_k, bias, renormalize):
    """The router kernel picks the experts torch's topk picks (by probability, or probability plus the
    selection bias), with their probabilities (renormalised or not) as the weights."""
    from pdpipe.kernels import triton_moe

    gen = torch.Generator(device="cuda").manual_seed(tokens + experts)
    logits = torch.randn(tokens, experts, device="cuda", generator=gen)
    b = torch.randn(experts, device="cuda", generator=gen) * 0.1 if bias else None
    weights, ids = triton_moe.moe_route(logits, b, top_k, renormalize, 1e-12)
    ref_weights, ref_ids = ref.moe_route(logits, b, top_k, renormalize, 1e-12)
    assert torch.equal(ids.long(), ref_ids)
    assert torch.allclose(weights, ref_weights, rtol=1e-5, atol=1e-7)


def test_moe_kernels_compile_once_for_every_step_size():
    """Steps of other token counts (their pairs, sort blocks and shares of every divisibility by 16)
    reuse the compiled MoE kernels: a new variant cost the first request of such a step 0.3-0.9 s."""
    from pdpipe.kernels import triton_moe

    kernels = (triton_moe._moe_align_kernel, triton_moe._moe_count_kernel, triton_moe._moe_offsets_kernel,
               triton_moe._moe_place_kernel, triton_moe._moe_gemm_kernel)

    def variants() -> list[int]:
        return [sum(len(cache[0]) for cache in k.device_caches.values()) for k in kernels]

    experts, top_k, hidden, inter = 64, 6, 256, 128
    w13 = torch.randn(experts, 2 * inter, hidden, device="cuda").to(torch.bfloat16) / hidden ** 0.5
    w2 = torch.randn(experts, hidden, inter, device="cuda").to(torch.bfloat16) / inter ** 0.5
    seen: list[int] = []
    # the first two compile (one-program sort: up to 2048 pairs; three kernels beyond), the rest reuse:
    # pairs, sort blocks and shares of other divisibilities by 16, blocks of 64 throughout
    for i, tokens in enumerate((100, 400, 111, 128, 150, 433, 512, 777, 1000, 1031)):
        x = torch.randn(tokens, hidden, device="cuda").to(torch.bfloat16)
        weights, ids = torch.randn(tokens, experts, device="cuda").softmax(-1).topk(top_k, -1)
        got = triton_moe.fused_moe(x, w13, w2, weights, ids, 0, None, block_m=64)
        assert rel_err(got, ref.fused_moe(x.float(), w13.float(), w2.float(), weights, ids)) < 2e-2
        if i == 1:
            seen = variants()
        elif i > 1:
            assert variants() == seen, (tokens, variants(), seen)


@pytest.mark.parametrize("tokens,experts,top_k,bias,fp32,renormalize", [
    (64, 64, 6, True, True, True), (2048, 64, 6, True, True, True), (300, 128, 8, False, False, True),
    (77, 8, 2, False, False, False), (100, 60, 4, False, True, False), (90, 64, 6, True, False, True)])
def test_moe_router_matches_reference(tokens, experts, top_k, bias, fp32, renormalize):
    """The router's GEMM and choice in one kernel (prompt steps) against torch's Linear and topk: in
    float32 (ERNIE's router) the same experts and weights; in bf16 (a Linear in the model's dtype,
    its logits rounded to bf16, so near-ties may order otherwise) the chosen experts' probabilities
    are the top-k probabilities, and the weights are those probabilities."""
    from pdpipe.kernels import triton_moe

    gen = torch.Generator(device="cuda").manual_seed(tokens + experts)
    x = torch.randn(tokens, 1024, device="cuda", generator=gen).to(torch.bfloat16)
    gate = torch.randn(experts, 1024, device="cuda", generator=gen) / 32
    gate = gate if fp32 else gate.to(torch.bfloat16)
    b = torch.randn(experts, device="cuda", generator=gen) * 0.1 if bias else None
    weights, ids = triton_moe.moe_router(x, gate, b, top_k, renormalize, 1e-12, fp32)
    ref_weights, ref_ids = ref.moe_router(x, gate, b, top_k, renormalize, 1e-12, fp32)
    if fp32:
        assert torch.equal(ids.long(), ref_ids)
        assert torch.allclose(weights, ref_weights, rtol=1e-5, atol=1e-6)
    else:  # a logit may round one bf16 step apart (another summation order): ~2e-3 of a probability
        probs = ref.router_logits(x, gate, False).float().softmax(-1)
        score = probs + b.view(1, -1) if b is not None else probs
        chosen = probs.gather(-1, ids.long())
        picked = score.gather(-1, ids.long()).sort(-1).values
        assert torch.allclose(picked, score.topk(top_k, -1).values.sort(-1).values, atol=3e-3)
        expected = chosen / chosen.sum(-1, keepdim=True) if renormalize else chosen
        assert torch.allclose(weights, expected, atol=3e-3)


def test_moe_route_keeps_ids_in_range_on_nan_rows():
    """A padding row of a CUDA graph may hold NaN: its experts are still ids the sort can count."""
    from pdpipe.kernels import triton_moe

    logits = torch.randn(6, 60, device="cuda")
    logits[1] = float("nan")
    logits[4, ::3] = float("nan")
    weights, ids = triton_moe.moe_route(logits, None, 6, True, 1e-12)
    assert ((ids >= 0) & (ids < 60)).all()
    ref_weights, ref_ids = ref.moe_route(logits[[0, 2, 3, 5]], None, 6, True, 1e-12)
    assert torch.equal(ids[[0, 2, 3, 5]].long(), ref_ids)


@pytest.mark.parametrize("tokens,experts,top_k,first,held,block_m", [
    (1, 64, 6, 0, 64, 16), (64, 128, 8, 0, 128, 16), (7, 8, 2, 4, 4, 16), (256, 64, 6, 32, 32, 64),
    (255, 128, 8, 0, 128, 64), (0, 8, 2, 0, 8, 16), (3000, 64, 6, 0, 64, 128), (500, 128, 8, 64, 64, 64)])
def test_moe_align_kernel_matches_reference(tokens, experts, top_k, first, held, block_m):
    """The sort gives the reference's padded runs: one program up to 2048 pairs, three kernels beyond."""
    from pdpipe.kernels import triton_moe

    gen = torch.Generator(device="cuda").manual_seed(tokens)
    ids = torch.rand(tokens, experts, device="cuda", generator=gen).topk(top_k, -1).indices.int()
    got = triton_moe.moe_align(ids, held, first, block_m)
    expected = ref.moe_align(ids, held, first, block_m)
    assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1]) and got[2] == expected[2]


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


def test_block_copy_reads_peer_memory_through_ipc_handles():
    """The pool exported by one process, opened through its IPC handle, copied from on another GPU."""
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=_export_pool, args=(child,))
    proc.start()
    try:
        handle, offset, shape, checksum = parent.recv()
        from pdpipe.ipc.cuda import open_pool
        from pdpipe.kernels import triton_ops

        src = open_pool(handle, offset, shape, torch.bfloat16, 1)
        with torch.cuda.device(1):
            dst = torch.zeros(shape, dtype=torch.bfloat16, device="cuda:1")
            ids = torch.arange(shape[2], dtype=torch.int32, device="cuda:1")
            triton_ops.copy_pool_blocks(src, ids, dst, ids.flip(0), 0, shape[0])
            torch.cuda.synchronize()
        assert dst.float().sum().item() == pytest.approx(checksum, rel=1e-3)
        assert torch.equal(dst[:, :, 0].cpu(), src[:, :, -1].cpu())
    finally:
        parent.send("done")
        proc.join(timeout=30)


def _own_pool(conn, device, shape):
    from pdpipe.ipc.cuda import CudaPool

    pool = CudaPool(shape, torch.bfloat16, device)
    pool.tensor.copy_(torch.randn(shape, device=f"cuda:{device}").to(torch.bfloat16))
    torch.cuda.synchronize(device)
    handle, offset = pool.export()
    conn.send((handle, offset))
    while conn.recv() != "done":
        conn.send(pool.tensor.cpu())
    pool.close()


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_cuda_ipc_backend_runs_job_after_job():
    """The transfer process's backend against two other processes' pools, many jobs in a row, as the
    pipeline runs it (the GPU pipeline once stalled on its second job)."""
    import multiprocessing as mp

    from pdpipe.ipc.cuda_transfer import CudaIpcTransfer
    from pdpipe.messages import PoolInfo
    from pdpipe.transfer.base import TransferJob, TransferState

    shape = (4, 2, 64, 16, 8, 128)
    ctx = mp.get_context("spawn")
    owners, infos = [], {}
    for name, device in (("p", 0), ("d", 1)):
        parent, child = ctx.Pipe()
        proc = ctx.Process(target=_own_pool, args=(child, device, shape))
        proc.start()
        handle, offset = parent.recv()
        owners.append((parent, proc))
        infos[name] = PoolInfo(instance=name, path="", shape=list(shape), dtype="bfloat16", gpu=device,
                               ipc_handle=handle, ipc_offset=offset)
    try:
        backend = CudaIpcTransfer()
        for info in infos.values():
            backend.register_pool(info)
        owners[0][0].send("pool")
        src = owners[0][0].recv()
        for i in range(12):
            n = 1 + i % 5
            job = TransferJob(f"r{i}", "p", list(range(i, i + n)), "d", list(range(40 + i, 40 + i + n)))
            for layer in range(shape[0]):
                backend.send(job, layer)
            deadline = time.monotonic() + 30
            while backend.poll(job) is TransferState.PENDING:
                assert time.monotonic() < deadline, f"job {i} did not land within 30 s"
            backend.finished(job)
            owners[1][0].send("pool")
            dst = owners[1][0].recv()
            assert torch.equal(dst[:, :, job.dst_block_ids], src[:, :, job.src_block_ids]), f"job {i}"
        batch = [TransferJob(f"b{i}", "p", [20 + 3 * i, 21 + 3 * i], "d", [10 + 2 * i, 11 + 2 * i]) for i in range(3)]
        # requests one prefill step completed: one launch for all, for three layers announced together
        # (a short prompt's) and then for the last layer on its own
        backend.send_batch(batch, 0, shape[0] - 1)
        backend.send_batch(batch, shape[0] - 1)
        deadline = time.monotonic() + 30
        while any(backend.poll(job) is TransferState.PENDING for job in batch):
            assert time.monotonic() < deadline, "the batch did not land within 30 s"
        owners[1][0].send("pool")
        dst = owners[1][0].recv()
        for job in batch:
            assert job.layers_sent == set(range(shape[0])) and job.bytes_moved == backend.job_bytes(job)
            assert torch.equal(dst[:, :, job.dst_block_ids], src[:, :, job.src_block_ids]), job.request_id
    finally:
        for parent, proc in owners:
            parent.send("done")
            proc.join(timeout=30)


def _export_pool(conn):
    from pdpipe.ipc.cuda import CudaPool

    pool = CudaPool((2, 2, 10, 16, 8, 128), torch.bfloat16, 0)
    pool.tensor.copy_(torch.randn(pool.shape, device="cuda:0").to(torch.bfloat16))
    torch.cuda.synchronize()
    handle, offset = pool.export()
    conn.send((handle, offset, pool.shape, pool.tensor.float().sum().item()))
    conn.recv()
    pool.close()


def test_gpu_engine_fp32_matches_transformers(model_dir):
    prompts = make_prompts(384, lengths=(1, 9, 33, 70))
    expected = hf_greedy_gpu(model_dir("qwen3"), prompts, 12)
    llm = make_llm(model_dir("qwen3"), device="cuda")
    outs = llm.generate(prompts, SamplingParams(max_tokens=12, temperature=0.0, logprobs=0))
    for out, (tokens, logprobs) in zip(outs, expected):
        assert out.token_ids == tokens
        assert max(abs(a.logprob - b) for a, b in zip(out.logprobs, logprobs)) < 1e-3
    assert llm.engine.leak_free() and llm.engine.runner.graphs is not None


@pytest.mark.parametrize("arch", ["ernie4_5_moe", "qwen3_moe", "mixtral"])
def test_gpu_moe_engine_fp32_matches_transformers(model_dir, arch):
    """The fused MoE kernel in the GPU engine, decode steps replaying CUDA graphs: transformers' greedy
    tokens, logprobs within 1e-3 (fp32)."""
    prompts = make_prompts(384, lengths=(1, 9, 33, 70))
    expected = hf_greedy_gpu(model_dir(arch), prompts, 10)
    llm = make_llm(model_dir(arch), device="cuda")
    assert llm.engine.runner.graphs is not None
    outs = llm.generate(prompts, SamplingParams(max_tokens=10, temperature=0.0, logprobs=0))
    for out, (tokens, logprobs) in zip(outs, expected):
        assert out.token_ids[:len(tokens)] == tokens
        assert max(abs(a.logprob - b) for a, b in zip(out.logprobs, logprobs)) < 1e-3
    assert llm.engine.leak_free()


def hf_greedy_gpu(path, prompts, steps):
    """transformers' greedy tokens and their logprobs on the GPU, fp32."""
    import transformers

    hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).cuda()
    expected = []
    for p in prompts:
        ids = torch.tensor([p], device="cuda")
        out = hf.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=steps,
                          output_logits=True, return_dict_in_generate=True)
        toks = out.sequences[0, len(p):].tolist()
        expected.append((toks, [torch.log_softmax(row[0].float(), -1)[t].item() for row, t in zip(out.logits, toks)]))
    del hf
    torch.cuda.empty_cache()
    return expected


def test_cuda_graph_decode_equals_eager(model_dir):
    prompts = make_prompts(384, lengths=(3, 17, 40, 8, 25), seed=4)
    params = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True, logprobs=0)
    graphed = make_llm(model_dir("llama"), device="cuda", dtype="bfloat16").generate(prompts, params)
    eager = make_llm(model_dir("llama"), device="cuda", dtype="bfloat16", cuda_graphs=False).generate(prompts, params)
    for a, b in zip(graphed, eager):
        assert a.token_ids == b.token_ids


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_prefill_graphs_equal_eager_steps(model_dir, arch):
    """Steps of whole prompts replaying prefill graphs (five prompts in one step; then a prompt longer
    than the graphs, which runs eagerly) give the eager steps' tokens, and logprobs within bf16's
    rounding of theirs."""
    from pdpipe.engine.graphs import PrefillGraphs

    groups = [make_prompts(384, lengths=(3, 17, 40, 8, 25), seed=6), make_prompts(384, lengths=(300,), seed=7)]
    params = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True, logprobs=0)
    replays = []
    replay = PrefillGraphs.replay

    def counting(self, size, inputs):
        replays.append(size)
        return replay(self, size, inputs)

    PrefillGraphs.replay = counting
    try:
        results = {}
        for tokens in (256, 0):
            llm = make_llm(model_dir(arch), device="cuda", dtype="bfloat16", cuda_graphs=False,
                           prefill_graph_tokens=tokens)
            assert (llm.engine.runner.prefill_graphs is not None) == (tokens > 0)
            results[tokens] = [out for group in groups for out in llm.generate(group, params)]
            assert llm.engine.leak_free()
    finally:
        PrefillGraphs.replay = replay
    assert replays == [96]  # the five prompts' step (93 tokens); the 300-token prompt ran eagerly
    for a, b in zip(results[256], results[0]):
        assert a.token_ids == b.token_ids
        assert max(abs(x.logprob - y.logprob) for x, y in zip(a.logprobs, b.logprobs)) < 0.05


def test_gpu_memory_utilization_keeps_the_engine_within_its_share(model_dir):
    """A quarter of the GPU: the pool gets nearly all of it (a tiny model's weights, step and graphs
    take little), the engine's memory stays within it, and it serves."""
    share = 0.25
    free_before, total = torch.cuda.mem_get_info()
    llm = make_llm(model_dir("llama"), device="cuda", dtype="bfloat16", num_blocks=0, gpu_memory_utilization=share)
    pool = llm.engine.kv_cache.data
    used = free_before - torch.cuda.mem_get_info()[0]
    assert share * total - 3 * 2**30 < pool.numel() * pool.element_size() < share * total
    assert used <= share * total
    out = llm.generate(make_prompts(384, lengths=(5, 40), seed=1), SamplingParams(max_tokens=4, temperature=0.0))
    assert all(len(o.token_ids) == 4 for o in out) and llm.engine.leak_free()


def _complete(port, prompt, max_tokens):
    body = json.dumps({"model": "llama", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
                       "ignore_eos": True, "return_token_ids": True}).encode()
    req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/completions", data=body,
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=120) as resp:
            return json.loads(resp.read())["choices"][0]["token_ids"]
    except urllib.error.HTTPError as exc:
        raise AssertionError(f"HTTP {exc.code}: {exc.read().decode(errors='replace')}") from None


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_1p1d_on_two_gpus_equals_colocated_gpu_engine(model_dir, monkeypatch, dtype):
    """bf16 and fp32: the pipeline's greedy tokens equal the colocated GPU engine's; in fp32 they also
    equal transformers' on the same generated model."""
    from dataclasses import replace

    from conftest import hf_greedy
    from pipeline_launch import launched, leak_free, make_launch_config, wait_until

    from pdpipe.config import InstanceConfig

    prompts = make_prompts(384, lengths=(1, 16, 47, 130), seed=6)
    colocated = make_llm(model_dir("llama"), device="cuda", dtype=dtype)
    expected = [colocated.generate([p], SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True))[0].token_ids
                for p in prompts]  # one at a time, as the pipeline gets them below
    del colocated
    torch.cuda.empty_cache()
    if dtype == "float32":  # transformers stops at EOS, the engine was told to ignore it: compare its length
        for (tokens, _), exp in zip(hf_greedy(model_dir("llama"), prompts, 20), expected):
            assert tokens and tokens == exp[:len(tokens)]
    monkeypatch.setenv("PDPIPE_LOG_LEVEL", "DEBUG")  # the processes log every message they handle
    cfg = make_launch_config(model_dir("llama"), ["prefill", "decode"])
    from pdpipe.config import DeadlineConfig

    cfg = replace(cfg, engine=replace(cfg.engine, device="cuda", dtype=dtype),
                  deadlines=DeadlineConfig(transferring=15, decoding=60),
                  instances=(InstanceConfig("prefill", gpus=(0,)), InstanceConfig("decode", gpus=(1,))))
    with launched(cfg) as launcher:
        try:
            for p, exp in zip(prompts, expected):
                assert _complete(cfg.api.port, p, 20) == exp
            assert wait_until(lambda: leak_free(launcher), what="all blocks free")
        except AssertionError:
            from pdpipe.inspect import control, format_queues

            print(format_queues(control(str(launcher.paths.run_dir), "snapshot")))
            print("exit codes:", {c.name: c.popen.poll() for c in launcher.children})
            dumps = {c.name: c.log_path.read_text().count("most recent call first") for c in launcher.children}
            launcher.dump_stacks()
            wait_until(lambda: all(c.log_path.read_text().count("most recent call first") > dumps[c.name]
                                   for c in launcher.children if c.popen.poll() is None), timeout=15,
                       what="fresh stack dumps")
            for c in launcher.children:
                if c.role == "transfer":
                    print(c.log_path.read_text()[-6000:])
            raise


TP_PROMPTS = ((3, 17, 40, 8, 25), (600,))  # a step of five prompts (prefill graph), then one over 512 (eager)


def _gpu_rank(rank: int, init_file: str, results, work, *args) -> None:
    """Rank `rank` of two, on GPU `rank` (NCCL): runs work(rank, tp, put, *args), put(kind, value)
    reporting to the test; then ("exit", rank, failed), and ends without the interpreter's teardown
    (NCCL's and gloo's threads can abort it)."""
    import os
    import traceback

    from pdpipe.models.parallel import join_group

    failed = False
    try:
        torch.cuda.set_device(rank)
        tp = join_group(rank, 2, f"file://{init_file}", f"cuda:{rank}")
        work(rank, tp, lambda kind, value: results.put((kind, rank, value)), *args)
    except BaseException:  # noqa: BLE001 — reported, and the exit code says so
        traceback.print_exc()
        failed = True
    results.put(("exit", rank, failed))
    results.close()
    results.join_thread()
    os._exit(1 if failed else 0)


def _on_two_gpus(tmp_path, work, *args) -> dict[str, dict[int, object]]:
    """`work` run as both ranks of a TP2 group (`_gpu_rank`): what they reported, by kind and rank, once
    both ended cleanly."""
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    ranks = [ctx.Process(target=_gpu_rank, args=(r, str(tmp_path / "s"), results, work, *args)) for r in range(2)]
    for p in ranks:
        p.start()
    got: dict[str, dict[int, object]] = {"exit": {}}
    while len(got["exit"]) < 2:
        kind, rank, value = results.get(timeout=300)
        got.setdefault(kind, {})[rank] = value
    for p in ranks:
        p.join(timeout=60)
    assert got["exit"] == {0: False, 1: False}
    return got


def _tp_engine_work(rank: int, tp, put, model_dir: str, dtype: str, split: str = "tp") -> None:
    from pdpipe.config import CacheConfig, EngineConfig, SchedulerConfig
    from pdpipe.engine.engine import LLMEngine

    engine = LLMEngine(EngineConfig(model=model_dir, device=f"cuda:{rank}", dtype=dtype, expert_parallel=split != "tp",
                                    data_parallel_attention=split == "dp",
                                    cache=CacheConfig(block_size=16, num_blocks=256),
                                    scheduler=SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=1024)), tp=tp)
    if rank:
        engine.runner.follow()
    else:
        engine.warm_up()  # its GEMM warm-up is handed to rank 1 too
        put("result", _tp_generate(engine))
        engine.runner.stop_followers()


def _tp_generate(engine) -> list[tuple[list[int], list[float]]]:
    """Greedy, 8 tokens, each group of prompts batched: (tokens, their logprobs) per prompt."""
    out = []
    for group, lengths in enumerate(TP_PROMPTS):
        for i, p in enumerate(make_prompts(384, lengths=lengths, seed=9 + group)):
            engine.add_request(f"{group}-{i}", p, SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True,
                                                                  logprobs=0))
        done = {}
        while engine.has_unfinished():
            for o in engine.step():
                tokens, logprobs = done.setdefault(o.request_id, ([], []))
                tokens += o.token_ids
                logprobs += [lp.logprob for lp in o.logprobs or []]
        out += [done[k] for k in sorted(done, key=lambda k: int(k.split("-")[1]))]
    assert engine.leak_free()
    return out


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
@pytest.mark.parametrize("arch,split,dtype", [
    ("llama", "tp", "float32"), ("llama", "tp", "bfloat16"), ("ernie4_5_moe", "ep", "float32"),
    ("ernie4_5_moe", "ep", "bfloat16"), ("qwen3_moe", "tp", "bfloat16"), ("qwen3_moe", "dp", "float32"),
    ("ernie4_5_moe", "dp", "bfloat16")])
def test_tp2_on_two_gpus_computes_what_one_gpu_does(model_dir, tmp_path, arch, split, dtype):
    """One engine split over two GPUs (NCCL; decode and prefill CUDA graphs with their all-reduces
    inside, and eager steps; a MoE model's experts split by width (tp), by id (ep), or by id with each
    GPU serving its own sequences — data-parallel attention, eager steps with the MoE layers' all-gather
    and reduce-scatter) against the whole model on one GPU, greedy. fp32: the same tokens, logprobs within 1e-3. bf16,
    where the split changes the order of the sums and so the rounding: the first token of every prompt
    equal (one forward pass, no feedback), with its logprob within 0.05 (0.1 for MoE models, whose
    output adds k experts' rounded sums, and whose routing moves with them); the tokens after it are
    compared up to the first difference only, where the same bound holds."""
    from pdpipe.config import CacheConfig, EngineConfig, SchedulerConfig
    from pdpipe.engine.engine import LLMEngine

    got = _on_two_gpus(tmp_path, _tp_engine_work, str(model_dir(arch)), dtype, split)["result"][0]
    whole = LLMEngine(EngineConfig(model=str(model_dir(arch)), device="cuda:0", dtype=dtype,
                                   cache=CacheConfig(block_size=16, num_blocks=256),
                                   scheduler=SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=1024)))
    expected = _tp_generate(whole)
    tolerance = 1e-3 if dtype == "float32" else 0.1 if "moe" in arch else 0.05
    for (tokens, logprobs), (exp_tokens, exp_logprobs) in zip(got, expected):
        if dtype == "float32":
            assert tokens == exp_tokens
        assert tokens[0] == exp_tokens[0]
        same = next((i for i, (a, b) in enumerate(zip(tokens, exp_tokens)) if a != b), len(tokens))
        assert max(abs(a - b) for a, b in zip(logprobs[:same], exp_logprobs[:same])) < tolerance


def _one_gpu_completions(model, prompts, max_tokens: int) -> list[list[int]]:
    """Each prompt's greedy tokens from a one-GPU fp32 engine, one prompt at a time (as the pipeline
    gets them in these tests); the GPU freed after."""
    one = make_llm(model, device="cuda", dtype="float32")
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    expected = [one.generate([p], params)[0].token_ids for p in prompts]
    del one
    torch.cuda.empty_cache()
    return expected


def _tp_sized_work(rank: int, tp, put, model_dir: str) -> None:
    from pdpipe.config import CacheConfig, EngineConfig
    from pdpipe.engine.engine import LLMEngine

    free, total = torch.cuda.mem_get_info()
    hold = torch.empty(int(free - 0.1 * total), dtype=torch.uint8, device="cuda") if rank else None  # noqa: F841
    engine = LLMEngine(EngineConfig(model=model_dir, device=f"cuda:{rank}", dtype="bfloat16",
                                    cache=CacheConfig(block_size=16, gpu_memory_utilization=0.3)), tp=tp)
    put("blocks", engine.blocks.num_blocks)
    if rank:
        engine.runner.follow()
    else:
        put("served", _tp_generate(engine)[0][0])
        engine.runner.stop_followers()


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_tp_ranks_sized_from_gpu_memory_agree_on_their_pool(model_dir, tmp_path):
    """gpu_memory_utilization on a TP2 instance whose second GPU has only a tenth free: both ranks get
    the smaller pool (rank 0's block ids index every rank's pool), and the instance serves."""
    got = _on_two_gpus(tmp_path, _tp_sized_work, str(model_dir("llama")))
    assert got["blocks"][0] == got["blocks"][1] and got["served"][0]


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_launched_tp2_mixed_instance_on_two_gpus_answers_as_one_gpu(model_dir):
    """`pdpipe launch` of one mixed instance with gpus = [0, 1] (two rank processes, NCCL): the OpenAI
    completions equal the one-GPU engine's, fp32 greedy; every block free after."""
    from dataclasses import replace

    from pipeline_launch import launched, leak_free, make_launch_config, wait_until

    from pdpipe.config import InstanceConfig

    prompts = make_prompts(384, lengths=(1, 16, 47, 130), seed=6)
    expected = _one_gpu_completions(model_dir("llama"), prompts, 12)
    cfg = make_launch_config(model_dir("llama"), ["mixed"])
    cfg = replace(cfg, engine=replace(cfg.engine, device="cuda", dtype="float32"),
                  instances=(InstanceConfig("mixed", gpus=(0, 1), tp=2),))
    with launched(cfg) as launcher:
        for p, exp in zip(prompts, expected):
            assert _complete(cfg.api.port, p, 12) == exp
        assert wait_until(lambda: leak_free(launcher), what="all blocks free")


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
@pytest.mark.parametrize("prefill_tp,decode_tp", [(2, 1), (1, 2)])
def test_launched_1p1d_of_different_tp_on_two_gpus_equals_one_gpu(model_dir, prefill_tp, decode_tp):
    """1P+1D where one side is split over both GPUs (NCCL) and the other runs on one of them: KV moves
    between ranks' pools by head range through CUDA IPC; the completions equal the one-GPU engine's
    (fp32 greedy), and every block of every rank is free after."""
    from dataclasses import replace

    from pipeline_launch import launched, leak_free, make_launch_config, wait_until

    from pdpipe.config import InstanceConfig

    prompts = make_prompts(384, lengths=(1, 16, 47, 130), seed=8)
    expected = _one_gpu_completions(model_dir("llama"), prompts, 12)
    gpus = {1: (0,), 2: (0, 1)}
    cfg = make_launch_config(model_dir("llama"), ["prefill", "decode"])
    cfg = replace(cfg, engine=replace(cfg.engine, device="cuda", dtype="float32"),
                  instances=(InstanceConfig("prefill", gpus=gpus[prefill_tp], tp=prefill_tp),
                             InstanceConfig("decode", gpus=gpus[decode_tp] if decode_tp == 2 else (1,), tp=decode_tp)))
    with launched(cfg) as launcher:
        for p, exp in zip(prompts, expected):
            assert _complete(cfg.api.port, p, 12) == exp
        assert wait_until(lambda: leak_free(launcher), what="all blocks free")


@pytest.mark.skipif(torch.cuda.device_count() < 4, reason="needs four GPUs")
@pytest.mark.parametrize("prefill,decode", [((0, 1), (2, 3)), ((0, 1), (2,)), ((0,), (1, 2))])
def test_launched_1p1d_on_four_gpus_equals_one_gpu(model_dir, prefill, decode):
    """1P(TP2)+1D(TP2) on GPUs 0-1 and 2-3, and TP2 → TP1 / TP1 → TP2 on three GPUs (no GPU shared
    between the instances): KV moves by head range between the ranks' pools; the completions equal the
    one-GPU engine's (fp32 greedy), every block free after."""
    from dataclasses import replace

    from pipeline_launch import launched, leak_free, make_launch_config, wait_until

    from pdpipe.config import InstanceConfig

    prompts = make_prompts(384, lengths=(1, 16, 47, 130), seed=8)
    expected = _one_gpu_completions(model_dir("llama"), prompts, 12)
    cfg = make_launch_config(model_dir("llama"), ["prefill", "decode"])
    cfg = replace(cfg, engine=replace(cfg.engine, device="cuda", dtype="float32"),
                  instances=(InstanceConfig("prefill", gpus=prefill, tp=len(prefill)),
                             InstanceConfig("decode", gpus=decode, tp=len(decode))))
    with launched(cfg) as launcher:
        for p, exp in zip(prompts, expected):
            assert _complete(cfg.api.port, p, 12) == exp
        assert wait_until(lambda: leak_free(launcher), what="all blocks free")


def _mooncake_gpu_receiver(conn, shape):
    from pdpipe.ipc.cuda import CudaPool
    from pdpipe.messages import PoolInfo
    from pdpipe.rdma.mooncake import MooncakeTransfer

    pool = CudaPool(shape, torch.bfloat16, 1)  # zeroed
    backend = MooncakeTransfer("127.0.0.1", "tcp")
    conn.send(backend.expose(PoolInfo(instance="dst", path="", shape=list(shape), dtype="bfloat16"), pool.tensor))
    conn.recv()
    conn.send(pool.tensor.cpu())
    conn.recv()


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_mooncake_moves_a_gpu_pool_between_processes_over_tcp():
    import multiprocessing as mp

    pytest.importorskip("mooncake.engine")
    from pdpipe.ipc.cuda import CudaPool
    from pdpipe.messages import PoolInfo
    from pdpipe.rdma.mooncake import MooncakeTransfer
    from pdpipe.transfer.base import TransferJob, TransferState

    shape = (4, 2, 40, 16, 8, 128)
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=_mooncake_gpu_receiver, args=(child, shape))
    proc.start()
    try:
        assert parent.poll(120), "the receiving process did not publish its pool"
        remote = parent.recv()
        src = CudaPool(shape, torch.bfloat16, 0)
        src.tensor.copy_(torch.randn(shape, device="cuda:0").to(torch.bfloat16))
        torch.cuda.synchronize(0)
        backend = MooncakeTransfer("127.0.0.1", "tcp")
        backend.expose(PoolInfo(instance="src", path="", shape=list(shape), dtype="bfloat16"), src.tensor)
        backend.register_pool(remote)
        job = TransferJob("r", "src", [3, 4, 5, 17, 30], "dst", [0, 1, 2, 39, 8])
        for layer in range(shape[0]):
            backend.send(job, layer)
        deadline = time.monotonic() + 60
        while backend.poll(job) is TransferState.PENDING and time.monotonic() < deadline:
            pass  # the writes were submitted; poll until they land
        assert backend.poll(job) is TransferState.DONE and job.bytes_moved == backend.job_bytes(job)
        parent.send("read")
        dst = parent.recv()
        expected = src.tensor.cpu()
        assert torch.equal(dst[:, :, job.dst_block_ids], expected[:, :, job.src_block_ids])
        others = [i for i in range(shape[2]) if i not in job.dst_block_ids]
        assert not dst[:, :, others].any()
    finally:
        if proc.is_alive():
            parent.send("done")
        proc.join(timeout=30)


def test_nvml_sees_the_gpus_and_their_peer_access():
    from pdpipe import gpus

    first = gpus.figures(0)
    assert first is not None and first.memory_total > 16 * 2**30 and 0 <= first.utilization <= 100
    if torch.cuda.device_count() >= 2:
        assert gpus.peer_access(0, 1) is torch.cuda.can_device_access_peer(0, 1)
