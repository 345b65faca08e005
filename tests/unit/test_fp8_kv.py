"""The FP8 KV cache on CPU (`[engine.cache] kv_cache_dtype = "fp8"`): each (token, KV head) row stored as
e4m3 codes and a float32 scale in the pool's one allocation; attention reads back exactly the values the
rows stand for; a prompt reads the same stored values a later prefix hit reads (cache on = cache off, bit
for bit); 1P+1D moves the rows byte for byte (= the colocated engine); pools of different KV dtypes refuse
to pair; sizing counts the scales."""
import numpy as np
import pytest
import torch
from conftest import make_prompts
from local_pipeline import LocalPipeline
from quant_reference import to_e4m3

from pdpipe.config import CacheConfig, EngineConfig
from pdpipe.engine.engine import LLMEngine
from pdpipe.kernels import reference
from pdpipe.messages import SamplingParams

PARAMS = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True, logprobs=5)


def test_a_row_is_its_e4m3_codes_then_its_float32_scale():
    x = torch.randn(5, 3, 16) * 3
    x[0, 0] = 0.0  # a row of zeros: scale 1, codes 0
    rows = reference.to_fp8_rows(x)
    assert rows.dtype == torch.uint8 and rows.shape == (5, 3, 20)
    amax = np.abs(x.numpy()).max(-1, keepdims=True)
    scale = np.where(amax > 0, amax / np.float32(448), 1).astype(np.float32)
    assert np.array_equal(rows[..., 16:].contiguous().view(torch.float32).numpy(), scale)
    codes = rows[..., :16].contiguous().view(torch.float8_e4m3fn).float().numpy()
    assert np.array_equal(codes, to_e4m3((x.numpy() / scale).astype(np.float32)))
    assert torch.equal(reference.from_fp8_rows(rows), torch.from_numpy(codes * scale))


def test_attention_over_an_fp8_pool_is_attention_over_the_values_its_rows_stand_for():
    """Prefill, chunked and decode shapes alike: the same output as the float pool holding the dequantized
    values (the fake-quant reference), exactly."""
    gen = torch.Generator().manual_seed(0)
    blocks, bs, kv_heads, heads, d = 6, 4, 2, 4, 16
    k = torch.randn(blocks, bs, kv_heads, d, generator=gen)
    v = torch.randn(blocks, bs, kv_heads, d, generator=gen)
    k8, v8 = reference.to_fp8_rows(k), reference.to_fp8_rows(v)
    q = torch.randn(7, heads, d, generator=gen)
    tables = torch.tensor([[0, 2, 4], [5, 1, 3]], dtype=torch.int32)
    args = (tables, [0, 5, 7], [11, 9], d ** -0.5)
    got = reference.paged_attention(q, k8, v8, *args)
    want = reference.paged_attention(q, reference.from_fp8_rows(k8), reference.from_fp8_rows(v8), *args)
    assert torch.equal(got, want)
    assert (got - reference.paged_attention(q, k, v, *args)).abs().max() < 0.1  # and near the unquantized


def run(model, kv: str, caching: bool = True, prompts=None):
    engine = LLMEngine(EngineConfig(model=str(model), cache=CacheConfig(block_size=8, num_blocks=64,
                                                                       kv_cache_dtype=kv, prefix_caching=caching)))
    out = []
    for i, prompt in enumerate(prompts):
        engine.add_request(str(i), prompt, PARAMS)
        got = []
        while engine.has_unfinished():
            got += engine.step()
        out.append([(t, lp.logprob, lp.top) for o in got for t, lp in zip(o.token_ids, o.logprobs or [])])
    assert engine.leak_free()
    return out, engine


def shared_prompts() -> list[list[int]]:
    a, b = make_prompts(384, lengths=(45, 20), seed=31)
    return [a, a[:40] + b]  # the second hits the first's 5 blocks


def test_a_prefix_hit_reads_the_fp8_values_its_prompt_computed_with(model_dir):
    """Cache on equals cache off, logprobs and all: a prompt's attention read its KV back from the pool,
    as the later hit does."""
    on, engine = run(model_dir("qwen3"), "fp8", prompts=shared_prompts())
    off, _ = run(model_dir("qwen3"), "fp8", caching=False, prompts=shared_prompts())
    assert on == off and engine.scheduler.prefix_hit_tokens == 40
    assert engine.kv_cache.data.dtype == torch.uint8 and engine.kv_cache.data.shape[-1] == 32 + 4
    auto, _ = run(model_dir("qwen3"), "auto", prompts=shared_prompts())
    assert max(abs(a[1] - b[1]) for x, y in zip(on, auto) for a, b in zip(x, y)) < 0.2  # near bf16/f32 KV


def test_1p1d_moves_fp8_rows_byte_for_byte(model_dir):
    """The decode instance continues from the rows the prefill instance stored, moved as bytes (codes and
    scales together): tokens and logprobs equal the colocated FP8 engine's, exactly."""
    prompts = make_prompts(384, lengths=(13, 30), seed=32)
    expected, _ = run(model_dir("qwen3"), "fp8", caching=False, prompts=prompts)
    pipe = LocalPipeline(model_dir("qwen3"), {"prefill-0": "prefill", "decode-0": "decode"}, kv_cache_dtype="fp8",
                         prefix_caching=False)
    for i, prompt in enumerate(prompts):
        pipe.submit(str(i), prompt, PARAMS)
        pipe.run()
        outs = sorted(pipe.outputs[str(i)], key=lambda o: o.index)
        assert [(t, lp.logprob, lp.top) for o in outs for t, lp in zip(o.token_ids, o.logprobs or [])] == expected[i]
    assert pipe.leak_free()


def test_pools_of_different_kv_dtypes_refuse_to_pair(model_dir):
    from pdpipe.engine.process import pool_info
    from pdpipe.transfer.base import TransferError, check_pair

    fp8 = LLMEngine(EngineConfig(model=str(model_dir("llama")), cache=CacheConfig(block_size=8, num_blocks=8,
                                                                                 kv_cache_dtype="fp8")))
    plain = LLMEngine(EngineConfig(model=str(model_dir("llama")), cache=CacheConfig(block_size=8, num_blocks=8)))
    a, b = (pool_info(n, e, model_dir("llama") / "pool", None) for n, e in (("prefill-0", fp8), ("decode-0", plain)))
    assert (a.dtype, a.kv_dtype, b.kv_dtype) == ("uint8", "fp8_e4m3", "float32")
    heads = set(range(a.shape[4]))
    with pytest.raises(TransferError, match="prefill-0 and decode-0 cannot exchange KV: KV cache dtype fp8_e4m3 "
                                            "against float32"):
        check_pair(a, b, heads, heads)
    assert fp8.cache_root("") != plain.cache_root("")  # the prefix cache's keys differ too


def test_sizing_counts_the_scales_and_fp8_holds_more_blocks(model_dir):
    from pdpipe.engine.sizing import block_bytes, pool_blocks
    from pdpipe.models.spec import load_spec

    spec = load_spec(model_dir("llama"), "bfloat16")  # head_dim 16: 32 bytes a row in bf16, 20 in fp8
    assert block_bytes(spec, 16, "bfloat16", "fp8") * 32 == block_bytes(spec, 16, "bfloat16") * 20
    cfg = lambda kv: EngineConfig(cache=CacheConfig(kv_cache_mb=1, kv_cache_dtype=kv))  # noqa: E731
    assert pool_blocks(spec, cfg("fp8")) > pool_blocks(spec, cfg("auto"))
    with pytest.raises(ValueError, match="kv_cache_dtype: 'int8'; allowed: auto, fp8"):
        CacheConfig(kv_cache_dtype="int8")
