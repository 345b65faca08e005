"""Quantized weights on a GPU: the weight-read GEMM (and the dequantize + cuBLAS path beyond its rows)
against the dequantized reference over the issue's sweep of rows, ragged shapes and shards; the engine
(CUDA graphs, fused projections) on online-quantized weights generates what it does on a folder of their
dequantized weights (fp32, greedy); the FP8 KV cache's rows as the kernels store and read them.

Run on a GPU machine: python -m pytest -m gpu tests/gpu
"""
import pytest
import torch
from conftest import engine_tokens, make_prompts

from pdpipe.config import CacheConfig, EngineConfig
from pdpipe.messages import SamplingParams
from pdpipe.quant import QuantPlan
from pdpipe.quant.weights import dequantize, dequantized_copy, quantize

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU")]


def greedy(model, prompts=None, **fields) -> list[list[int]]:
    from pdpipe.engine.engine import LLMEngine

    fields.setdefault("cache", CacheConfig(block_size=16, num_blocks=64))
    engine = LLMEngine(EngineConfig(model=str(model), device="cuda", dtype="float32", **fields))
    tokens = engine_tokens(engine, prompts or make_prompts(384, lengths=(3, 40, 130), seed=5),
                           SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True))
    del engine
    torch.cuda.empty_cache()
    return tokens


@pytest.mark.parametrize("scheme", ["wint8", "wint4", "fp8", "block_wise_fp8"])
def test_the_quantized_engine_on_a_gpu_generates_what_the_dequantized_folder_does(model_dir, tmp_path, scheme):
    model = model_dir("llama")
    assert greedy(model, quantization=scheme) == greedy(dequantized_copy(model, QuantPlan(scheme), tmp_path / "deq"))


def test_fp8_kv_rows_stored_and_read_by_the_kernels_are_the_references(model_dir):
    """The Triton store writes the rows torch's reference writes, byte for byte (IEEE division, rounding to
    nearest even); decode and extend attention over them equal the reference's over the same rows."""
    from pdpipe.kernels import reference, triton_ops

    gen = torch.Generator(device="cuda").manual_seed(3)
    blocks, page, kv_heads, heads, d = 8, 16, 2, 8, 128
    k = torch.randn(100, kv_heads, d, device="cuda", generator=gen, dtype=torch.bfloat16)
    v = torch.randn(100, kv_heads, d, device="cuda", generator=gen, dtype=torch.bfloat16)
    slots = torch.arange(100, device="cuda")
    caches = [torch.zeros(blocks, page, kv_heads, d + 4, dtype=torch.uint8, device="cuda") for _ in range(4)]
    triton_ops.store_kv(k, v, caches[0], caches[1], slots)
    reference.store_kv(k, v, caches[2], caches[3], slots)
    for got, want in ((caches[0], caches[2]), (caches[1], caches[3])):
        differ = (got != want).nonzero()
        assert not len(differ), f"{len(differ)} bytes differ, first at {differ[0].tolist()} (head dim {d}: codes, " \
                                f"then 4 scale bytes): {got[tuple(differ[0])]} against {want[tuple(differ[0])]}"
    tables = torch.tensor([[0, 1, 2, 3, 4, 5, 6], [6, 5, 4, 3, 2, 1, 0]], dtype=torch.int32, device="cuda")
    lens = torch.tensor([100, 77], dtype=torch.int32, device="cuda")
    q = torch.randn(2, heads, d, device="cuda", generator=gen, dtype=torch.bfloat16)
    got = triton_ops.decode_attention(q, caches[0], caches[1], tables, lens, d ** -0.5, num_splits=4)
    want = reference.paged_attention(q, caches[0], caches[1], tables, [0, 1, 2], [100, 77], d ** -0.5)
    assert torch.allclose(got.float(), want.float(), atol=2e-2), f"decode: {(got.float() - want.float()).abs().max()}"
    q = torch.randn(9, heads, d, device="cuda", generator=gen, dtype=torch.bfloat16)
    starts = torch.tensor([0, 5, 9], dtype=torch.int32, device="cuda")
    got = triton_ops.extend_attention(q, caches[0], caches[1], tables, starts, lens, 5, d ** -0.5)
    want = reference.paged_attention(q, caches[0], caches[1], tables, [0, 5, 9], [100, 77], d ** -0.5)
    assert torch.allclose(got.float(), want.float(), atol=2e-2), f"extend: {(got.float() - want.float()).abs().max()}"


def test_an_fp8_kv_cache_on_gpu_reads_what_its_prompts_stored(model_dir):
    """CUDA graphs and all: a prefix hit reads the rows its prompt computed with: cache on = cache off."""
    from pdpipe.engine.engine import LLMEngine

    head, a, b = make_prompts(384, lengths=(64, 9, 30), seed=8)
    prompts = [head + a, head + b, head + a + b]  # the later ones hit the first's blocks
    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    runs = []
    for caching in (True, False):
        cache = CacheConfig(block_size=16, num_blocks=64, kv_cache_dtype="fp8", prefix_caching=caching)
        engine = LLMEngine(EngineConfig(model=str(model_dir("llama")), device="cuda", dtype="float32", cache=cache))
        runs.append([engine_tokens(engine, [p], params)[0] for p in prompts])
        if caching:
            assert engine.scheduler.prefix_hit_tokens >= 2 * 64
        del engine
        torch.cuda.empty_cache()
    assert runs[0] == runs[1]


@pytest.mark.parametrize("scheme", ["wint8", "wint4", "fp8", "block_wise_fp8"])
@pytest.mark.parametrize("n,k", [(4096, 4096), (2112, 7168), (200, 328), (1536, 576)])
def test_the_weight_read_gemm_equals_the_dequantized_reference(scheme, n, k):
    """QuantLinear on GPU, bf16 activations, M in the issue's sweep (the Triton kernel up to 64 rows,
    dequantize + cuBLAS beyond), whole weights and tensor-parallel shards that cut groups and blocks:
    against x @ dequantize(W).T in float32."""
    from pdpipe.models.layers import QuantLinear

    gen = torch.Generator(device="cuda").manual_seed(n + k)
    whole = quantize(torch.randn(n, k, device="cuda", generator=gen) * 0.02, scheme)
    parts = [whole, whole[n // 3: 2 * n // 3], whole[:, k // 4 // 2 * 2: k // 2 // 2 * 2 + 66]]
    for part in parts:
        layer = QuantLinear(part, torch.randn(part.shape[0], device="cuda", dtype=torch.bfloat16))
        w = dequantize(part).float()
        for m in (1, 2, 3, 16, 17, 64, 128, 2048):
            x = torch.randn(m, part.shape[1], device="cuda", generator=gen).to(torch.bfloat16)
            ref = x.float() @ w.T + layer.bias.float()
            got = layer(x).float()
            assert torch.allclose(got, ref, rtol=2e-2, atol=2e-2 * ref.abs().max().item()), (scheme, n, k, m)


@pytest.mark.parametrize("n,k", [(4096, 14336), (2112, 7168), (2048, 1024)])
def test_every_configuration_the_autotuner_may_pick_for_int4_equals_the_reference(n, k, monkeypatch):
    """The autotuner takes whichever configuration is fastest on the day: each int4 candidate (two tiles a
    trip, bands cut by their own width included), forced in turn, against the dequantized reference, on
    weights whose bands are cut along K (the first two) and one whose are not."""
    from pdpipe.kernels import triton_quant

    tuned = triton_quant._quant_skinny_kernel
    configs = triton_quant._configs_for_kind(tuned.configs, {"K": k}, KIND=1, FAST=True, TILE_SCALE=True)
    assert {c.kwargs["TILES"] for c in configs} == {1, 2} and any(c.kwargs["CUT_BY_TILE"] for c in configs)

    class Forced:  # the kernel at one configuration, as the launch calls the autotuned one
        def __init__(self, config):
            self.configs = [config]

        def __getitem__(self, grid):
            config = self.configs[0]
            return lambda *args, **kwargs: tuned.fn[grid(config.kwargs)](
                *args, **kwargs, **config.kwargs, num_warps=config.num_warps, num_stages=config.num_stages)

    gen = torch.Generator(device="cuda").manual_seed(12)
    qw = quantize(torch.randn(n, k, device="cuda", generator=gen) * 0.02, "wint4")
    plain = dequantize(qw).float()
    xs = [torch.randn(m, k, device="cuda", generator=gen).to(torch.bfloat16) for m in (1, 64)]
    for config in configs:
        monkeypatch.setattr(triton_quant, "_quant_skinny_kernel", Forced(config))
        for x in xs:
            got = triton_quant.quant_skinny_linear(x, "wint4", qw.codes, qw.scale, qw.shape, qw.cell, qw.offset)
            want = x.float() @ plain.T
            assert torch.allclose(got.float(), want, rtol=2e-2, atol=2e-2 * want.abs().max().item()), (config, x.shape)


@pytest.mark.parametrize("scheme", ["wint8", "wint4"])
def test_a_gemm_cut_along_k_gives_the_same_bits_eager_and_replayed(scheme):
    """A weight whose bands are cut along K (4096 x 14336: the band's last program adds the parts): the same
    bits call after call and in a CUDA graph's replays (each band's counter back at zero after a launch)."""
    from pdpipe.kernels import triton_quant
    from pdpipe.models.layers import QuantLinear

    gen = torch.Generator(device="cuda").manual_seed(9)
    layer = QuantLinear(quantize(torch.randn(4096, 14336, device="cuda", generator=gen) * 0.02, scheme))
    assert triton_quant.split_k(4096, 14336, torch.device("cuda")) > 1
    x = torch.randn(3, 14336, device="cuda", generator=gen).to(torch.bfloat16)
    first = layer(x)
    want = x.float() @ dequantize(layer.quantized).float().T
    assert torch.allclose(first.float(), want, rtol=2e-2, atol=2e-2 * want.abs().max().item())
    assert all(torch.equal(layer(x), first) for _ in range(5))
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = layer(x)
    for _ in range(5):
        out.zero_()
        graph.replay()
        assert torch.equal(out, first)
    assert not triton_quant._LOCKS[x.device].any()


@pytest.mark.parametrize("scheme", ["wint4", "fp8"])
def test_quantized_experts_in_the_fused_kernels_generate_what_the_dequantized_folder_does(model_dir, tmp_path,
                                                                                           scheme):
    """ERNIE MoE: wint4 means dense wint8 with wint4 experts; the experts stacked quantized for the fused
    grouped GEMMs (each weight tile dequantized in the kernel), fp32, greedy."""
    from pdpipe.models.spec import load_spec
    from pdpipe.quant import plan_for

    model = model_dir("ernie4_5_moe")
    plan = plan_for(EngineConfig(quantization=scheme), load_spec(model).architecture, True)
    assert greedy(model, quantization=scheme) == greedy(dequantized_copy(model, plan, tmp_path / "deq"))


@pytest.mark.parametrize("scheme", ["wint8", "wint4", "fp8", "block_wise_fp8"])
def test_quantized_experts_in_bf16_equal_the_dequantized_reference(scheme):
    """The fused experts on bf16 activations (the codes go into the products as bf16 integers, each tile's
    product scaled): against the torch reference on the dequantized experts, for decode- and prefill-sized
    batches (block sizes 16, 64, 128), whole experts and shards that cut groups and blocks."""
    from pdpipe.kernels import reference, triton_moe
    from pdpipe.kernels.reference import QuantStack

    gen = torch.Generator(device="cuda").manual_seed(11)
    experts, hidden, inter = 8, 384, 640

    def stack(n, k, cols=None):
        qs = [quantize(torch.randn(n, k, device="cuda", generator=gen) * 0.05, scheme) for _ in range(experts)]
        qs = [q[:, cols[0]:cols[1]] for q in qs] if cols else qs
        q = qs[0]
        return (QuantStack(scheme, torch.stack([x.codes.contiguous() for x in qs]).contiguous(),
                           torch.stack([x.scale.contiguous() for x in qs]).contiguous(), q.cell, q.offset,
                           (experts, q.shape[0], q.shape[1])),
                torch.stack([dequantize(x, torch.bfloat16) for x in qs]))

    for cols in (None, (64, 448)):
        width = cols[1] - cols[0] if cols else inter
        q13, d13 = stack(2 * width, hidden)
        q2, d2 = stack(hidden, inter, cols)
        for tokens in (3, 16, 64, 300):
            x = torch.randn(tokens, hidden, device="cuda", generator=gen).to(torch.bfloat16)
            logits = torch.randn(tokens, experts, device="cuda", generator=gen)
            weights, ids = torch.softmax(logits, -1).topk(2, -1)
            got = triton_moe.fused_moe(x, q13, q2, weights, ids.to(torch.int32)).float()
            want = reference.fused_moe(x.float(), d13.float(), d2.float(), weights, ids).float()
            err = ((got - want).abs().max() / want.abs().max()).item()
            assert err < 3e-2, (scheme, cols, tokens, err)


def test_fp8_activations_on_gpu_take_the_scaled_fp8_gemm_for_prompts():
    """W8A8 on the GPU's FP8 tensor cores (bf16 activations, per-token scales, per-channel weight scales):
    against the product of the per-token-quantized activations and the dequantized weights in float32;
    decode-sized batches unchanged; the activations' one-pass quantizer against torch's, bit for bit."""
    from pdpipe.kernels import reference, triton_quant
    from pdpipe.models.layers import QuantLinear, use_fp8_activations

    gen = torch.Generator(device="cuda").manual_seed(6)
    qw = quantize(torch.randn(4096, 1024, device="cuda", generator=gen) * 0.02, "fp8")
    bias = torch.randn(4096, device="cuda", generator=gen).to(torch.bfloat16)
    plain, w8a8 = QuantLinear(qw, bias), QuantLinear(qw, bias)
    use_fp8_activations(w8a8)
    x = torch.randn(16, 1024, device="cuda", generator=gen).to(torch.bfloat16)
    assert torch.equal(w8a8(x), plain(x))
    for k in (1024, 576, 14336):  # the one-pass per-row quantizer against torch's, bit for bit
        rows = torch.randn(70, k, device="cuda", generator=gen).mul(torch.rand(70, 1, device="cuda", generator=gen) * 9)
        rows[3] = 0
        codes, scale = triton_quant.fp8_per_row(rows.to(torch.bfloat16))
        want_codes, want_scale = reference.fp8_per_row(rows.to(torch.bfloat16))
        assert torch.equal(codes.view(torch.uint8), want_codes.view(torch.uint8)) and torch.equal(scale, want_scale), k
        rows[5, 7], rows[6, 9] = float("nan"), float("inf")  # NaN stays NaN (and inf / inf is NaN), as in torch
        codes, scale = triton_quant.fp8_per_row(rows.to(torch.bfloat16))
        want_codes, want_scale = reference.fp8_per_row(rows.to(torch.bfloat16))
        assert torch.equal(codes.float().isnan(), want_codes.float().isnan()) and codes.float()[5, 7].isnan()
        assert torch.equal(codes.float().nan_to_num(), want_codes.float().nan_to_num()), k
        assert torch.equal(scale, want_scale), k
    for rows in (65, 512, 2048):
        x = torch.randn(rows, 1024, device="cuda", generator=gen).to(torch.bfloat16)
        amax = x.float().abs().amax(-1, keepdim=True)
        xq = (x.float() / (amax / 448)).to(torch.float8_e4m3fn).float() * (amax / 448)
        want = xq @ dequantize(qw).float().T + bias.float()
        got = w8a8(x).float()
        assert torch.allclose(got, want, rtol=2e-2, atol=2e-2 * want.abs().max().item()), rows
