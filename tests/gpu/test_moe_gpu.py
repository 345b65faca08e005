"""The mixture-of-experts kernels against their torch references: the router (its GEMM and choice in
one kernel, and the choice alone, NaN rows included), the sort of tokens by expert, the fused MoE
GEMMs, and their compiling once for steps of every size.

Run on a GPU machine: python -m pytest -m gpu tests/gpu
"""
import pytest
import torch
from gpu_checks import rel_err

from pdpipe.kernels import reference as ref

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU")]


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
