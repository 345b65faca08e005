"""The engine on one GPU: dense and MoE models against `transformers` (fp32), decode CUDA graphs and
prefill graphs against eager steps, the warm-up that leaves no GEMM to time in a live step, and the
KV pool sized from a share of the GPU's memory.

Run on a GPU machine: python -m pytest -m gpu tests/gpu
"""
import contextlib

import pytest
import torch
from conftest import make_llm, make_prompts

from pdpipe.messages import SamplingParams

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU")]


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


@contextlib.contextmanager
def counting_replays(graphs_class, seen):
    """Every `graphs_class.replay` while the block runs calls `seen(size, inputs)` first."""
    replay = graphs_class.replay

    def counting(self, size, inputs):
        seen(size, inputs)
        return replay(self, size, inputs)

    graphs_class.replay = counting
    try:
        yield
    finally:
        graphs_class.replay = replay


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_prefill_graphs_equal_eager_steps(model_dir, arch):
    """Steps of whole prompts replaying prefill graphs (five prompts in one step; then a prompt longer
    than the graphs, which runs eagerly) give the eager steps' tokens, and logprobs within bf16's
    rounding of theirs."""
    from pdpipe.engine.graphs import PrefillGraphs

    groups = [make_prompts(384, lengths=(3, 17, 40, 8, 25), seed=6), make_prompts(384, lengths=(300,), seed=7)]
    params = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True, logprobs=0)
    replays: list = []
    with counting_replays(PrefillGraphs, lambda size, inputs: replays.append(size)):
        results = {}
        for tokens in (256, 0):
            llm = make_llm(model_dir(arch), device="cuda", dtype="bfloat16", cuda_graphs=False,
                           prefill_graph_tokens=tokens)
            assert (llm.engine.runner.prefill_graphs is not None) == (tokens > 0)
            results[tokens] = [out for group in groups for out in llm.generate(group, params)]
            assert llm.engine.leak_free()
    assert replays == [96]  # the five prompts' step (93 tokens); the 300-token prompt ran eagerly
    for a, b in zip(results[256], results[0]):
        assert a.token_ids == b.token_ids
        assert max(abs(x.logprob - y.logprob) for x, y in zip(a.logprobs, b.logprobs)) < 0.05


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_prefill_graphs_take_chunks_after_a_cache_hit(model_dir, arch):
    """Prompts sharing a 64-token head after one that put it in the prefix cache: their step (three chunks
    starting at 64, 58 tokens) replays the context variant of the 64-token prefill graph, attending to
    the cached blocks, with the eager steps' tokens and logprobs within bf16's rounding."""
    from pdpipe.engine.graphs import PrefillGraphs

    head = make_prompts(384, lengths=(64,), seed=8)[0]
    tails = make_prompts(384, lengths=(5, 20, 33), seed=9)
    params = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True, logprobs=0)
    replays: list = []
    with counting_replays(PrefillGraphs, lambda size, inputs: replays.append((size, "tables" in inputs))):
        results = {}
        for tokens in (256, 0):
            llm = make_llm(model_dir(arch), device="cuda", dtype="bfloat16", cuda_graphs=False,
                           prefill_graph_tokens=tokens)
            llm.generate([head + [7]], params)
            results[tokens] = llm.generate([head + t for t in tails], params)
            assert [o.num_cached_tokens for o in results[tokens]] == [64, 64, 64] and llm.engine.leak_free()
    assert replays == [(96, False), (64, True)]  # the head's step (65 tokens), then the three chunks'
    for a, b in zip(results[256], results[0]):
        assert a.token_ids == b.token_ids
        assert max(abs(x.logprob - y.logprob) for x, y in zip(a.logprobs, b.logprobs)) < 0.05


def test_gpu_memory_utilization_keeps_the_engine_within_its_share(model_dir):
    """A quarter of the GPU: the pool gets nearly all of it (a tiny model's weights, step and graphs
    take little), the engine's memory stays within it, and it serves. It reads the device's free memory, so
    it needs the GPU to itself: beside other pytest-xdist workers it counts their memory as the engine's."""
    share = 0.25
    free_before, total = torch.cuda.mem_get_info()
    llm = make_llm(model_dir("llama"), device="cuda", dtype="bfloat16", num_blocks=0, gpu_memory_utilization=share)
    pool = llm.engine.kv_cache.data
    used = free_before - torch.cuda.mem_get_info()[0]
    assert share * total - 3 * 2**30 < pool.numel() * pool.element_size() < share * total
    assert used <= share * total
    out = llm.generate(make_prompts(384, lengths=(5, 40), seed=1), SamplingParams(max_tokens=4, temperature=0.0))
    assert all(len(o.token_ids) == 4 for o in out) and llm.engine.leak_free()


@pytest.mark.parametrize("kv_cache_dtype", ["auto", "fp8"])
def test_a_prefix_evicted_to_the_pinned_host_tier_comes_back_as_it_left(model_dir, kv_cache_dtype):
    """A 12-block device pool on the GPU with a host tier (pinned, batched copies): a 64-token prompt, others
    that evict its blocks to the host, then the first prompt again: its 7 reusable blocks are copied back
    (not computed), and every output equals a run whose pool holds everything (fp32, greedy)."""
    first = make_prompts(384, lengths=(64,), seed=41)[0]
    prompts = [first, *make_prompts(384, lengths=(60, 61, 62), seed=42), first]
    params = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)

    def run(**kwargs):
        llm = make_llm(model_dir("llama"), device="cuda", dtype="float32", block_size=8,
                       kv_cache_dtype=kv_cache_dtype, **kwargs)
        outs = [llm.generate([p], params)[0] for p in prompts]
        assert llm.engine.leak_free()
        return llm, [o.token_ids for o in outs], [o.num_cached_tokens for o in outs]

    _, want, _ = run(num_blocks=64, prefix_caching=False)
    llm, got, cached = run(num_blocks=12, host_kv_cache_mb=1)
    assert llm.engine.blocks.host_blocks_in == 7 and cached[-1] == 56 and got == want
