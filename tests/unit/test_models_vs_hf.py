"""Greedy output of every architecture equals `transformers` token for token, logprobs to 1e-4,
alone and under continuous batching with a pool small enough that preemption must act."""
import pytest
from conftest import ARCHS, assert_leak_free, hf_greedy, make_llm, make_prompts

from pdpipe.config import CacheConfig, EngineConfig, SchedulerConfig
from pdpipe.engine.engine import LLMEngine
from pdpipe.messages import SamplingParams

MAX_NEW = 12
GREEDY = SamplingParams(max_tokens=MAX_NEW, temperature=0.0, logprobs=0)


def assert_same_as_hf(got_tokens, got_logprobs, expected):
    exp_tokens, exp_logprobs = expected
    assert got_tokens == exp_tokens
    assert len(got_logprobs) == len(exp_logprobs)
    for a, b in zip(got_logprobs, exp_logprobs):
        assert abs(a - b) < 1e-4, (a, b)


@pytest.fixture(scope="module")
def hf_results(model_dir):
    cache = {}

    def get(arch):
        if arch not in cache:
            prompts = make_prompts(384)
            cache[arch] = (prompts, hf_greedy(model_dir(arch), prompts, MAX_NEW))
        return cache[arch]

    return get


@pytest.mark.parametrize("arch", ARCHS)
def test_batch_greedy_matches_transformers(arch, model_dir, hf_results):
    prompts, expected = hf_results(arch)
    llm = make_llm(model_dir(arch))
    outs = llm.generate(prompts, GREEDY)
    for out, exp in zip(outs, expected):
        assert_same_as_hf(out.token_ids, [lp.logprob for lp in out.logprobs], exp)
        assert out.finish_reason in ("length", "stop")
    assert_leak_free(llm)


@pytest.mark.parametrize("arch", ARCHS)
def test_continuous_batching_with_preemption_matches_transformers(arch, model_dir, hf_results):
    prompts, expected = hf_results(arch)
    engine = LLMEngine(EngineConfig(
        model=str(model_dir(arch)),
        cache=CacheConfig(block_size=4, num_blocks=22),
        scheduler=SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=24, watermark_blocks=0)))
    tokens = {str(i): [] for i in range(len(prompts))}
    logprobs = {str(i): [] for i in range(len(prompts))}
    partial_chunks = []
    schedule = engine.scheduler.schedule

    def recording_schedule():
        out = schedule()
        partial_chunks.extend(c for c in out.chunks if not c.samples)
        return out

    engine.scheduler.schedule = recording_schedule
    arrival_order = [3, 5, 0, 6, 1, 4, 7, 2]  # long and short prompts interleaved
    step = 0
    while arrival_order or engine.has_unfinished():
        if arrival_order and step % 2 == 0:  # a new prompt every other step, while others decode
            i = arrival_order.pop(0)
            engine.add_request(str(i), prompts[i], GREEDY)
        for out in engine.step():
            tokens[out.request_id] += out.token_ids
            logprobs[out.request_id] += [lp.logprob for lp in out.logprobs or []]
        step += 1
    for i, exp in enumerate(expected):
        assert_same_as_hf(tokens[str(i)], logprobs[str(i)], exp)
    assert engine.scheduler.num_preemptions > 0, "the pool was meant to force preemption"
    assert partial_chunks, "the token budget was meant to split prompts into chunks"
    assert_leak_free(engine)


@pytest.mark.parametrize("arch", ["ernie4_5_moe", "qwen3_moe", "mixtral"])
def test_moe_steps_where_some_experts_get_no_token_match_transformers(arch, model_dir, hf_results, monkeypatch):
    """The routed layers saw steps whose tokens left some experts without any (every decode step of
    one sequence does, top-2 of 8-16) and steps that reached many; the output is still transformers'."""
    from pdpipe.models.moe import MoE

    hit: list[tuple[int, int]] = []  # (experts that got tokens, experts) per routed-layer call
    forward = MoE.forward

    def counting(self, x):
        hit.append((len(self.route(x)[1].unique()), self.moe.num_experts))
        return forward(self, x)

    monkeypatch.setattr(MoE, "forward", counting)
    prompts, expected = hf_results(arch)
    llm = make_llm(model_dir(arch))
    for prompt, exp in zip(prompts[:3], expected[:3]):
        out = llm.generate([prompt], GREEDY)[0]
        assert_same_as_hf(out.token_ids, [lp.logprob for lp in out.logprobs], exp)
    assert any(got < of for got, of in hit) and any(got > 2 for got, _ in hit)


@pytest.mark.parametrize("arch", ["ernie4_5_moe", "qwen3_moe", "mixtral"])
def test_moe_with_stacked_experts_computes_what_the_loop_does(arch, model_dir):
    """The experts stacked for the fused kernel (its CPU twin: `reference.fused_moe`) give the logits of
    the per-expert loop, on the whole model and on an expert-parallel rank's half of the experts."""
    import torch

    from pdpipe.models.loader import load_model
    from pdpipe.models.moe import MoE
    from pdpipe.models.parallel import TensorParallel

    x = torch.randn(37, load_model(model_dir(arch)).spec.hidden_size, generator=torch.Generator().manual_seed(3))
    for tp in (None, TensorParallel(1, 2, expert_parallel=True)):
        layers = [m for m in load_model(model_dir(arch), tp=tp).modules() if isinstance(m, MoE)]
        assert layers
        for moe in layers:
            weights, ids = moe.route(x)
            looped = moe._experts_loop(x, weights, ids)
            moe.fuse()
            assert len(moe.experts) == 0 and moe.w13 is not None
            from pdpipe import kernels

            torch.testing.assert_close(kernels.fused_moe(x, moe.w13, moe.w2, weights, ids, moe.held.start), looped,
                                       atol=1e-5, rtol=1e-5)
