"""Sampling: seeded reproducibility, filters and penalties, logprobs, and every finish reason."""
import json
import shutil

import pytest
import torch
from conftest import assert_leak_free, make_llm, make_prompts

from pdpipe.engine.sampler import apply_penalties, filter_logits
from pdpipe.engine.sequence import Sequence
from pdpipe.messages import SamplingParams


@pytest.fixture(scope="module")
def llm(model_dir):
    return make_llm(model_dir("llama"))


@pytest.fixture(scope="module")
def prompts():
    return make_prompts(384, lengths=(3, 9, 20, 40))


def test_seeded_sampling_is_reproducible_whatever_the_batch(llm, prompts):
    params = SamplingParams(max_tokens=16, temperature=1.0, seed=1234)
    alone = llm.generate([prompts[1]], params)[0].token_ids
    in_batch = llm.generate(prompts, [SamplingParams(max_tokens=16, temperature=1.0)] * 1
                            + [params] + [SamplingParams(max_tokens=16, temperature=0.8)] * 2)[1].token_ids
    other_seed = llm.generate([prompts[1]], SamplingParams(max_tokens=16, temperature=1.0, seed=99))[0]
    assert alone == in_batch
    assert other_seed.token_ids != alone
    assert_leak_free(llm)


def test_top_k_one_is_greedy(llm, prompts):
    greedy = llm.generate(prompts, SamplingParams(max_tokens=10, temperature=0.0))
    top1 = llm.generate(prompts, SamplingParams(max_tokens=10, temperature=1.3, top_k=1, seed=5))
    assert [o.token_ids for o in greedy] == [o.token_ids for o in top1]


def test_logprobs_report_chosen_token_and_sorted_alternatives(llm, prompts):
    out = llm.generate(prompts[0], SamplingParams(max_tokens=6, temperature=0.0, logprobs=5))[0]
    assert len(out.logprobs) == len(out.token_ids) == 6
    for token, lp in zip(out.token_ids, out.logprobs):
        assert lp.token_id == token and len(lp.top) == 5
        values = [v for _, v in lp.top]
        assert values == sorted(values, reverse=True)
        assert lp.top[0] == (token, pytest.approx(lp.logprob))
    assert llm.generate(prompts[0], SamplingParams(max_tokens=2))[0].logprobs is None


def test_max_tokens_finishes_with_length(llm, prompts):
    outs = llm.generate(prompts, SamplingParams(max_tokens=7, temperature=0.0, ignore_eos=True))
    assert all(o.finish_reason == "length" and len(o.token_ids) == 7 for o in outs)


def test_stop_string_cuts_text_and_finishes_with_stop(llm, prompts):
    free = llm.generate(prompts[2], SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True))[0]
    text = free.text
    stop = text[6:9]
    out = llm.generate(prompts[2], SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True,
                                                  stop=[stop, "never appears \u2603"]))[0]
    assert out.finish_reason == "stop" and out.stop_reason == stop
    assert out.text == text[: text.index(stop)]
    assert len(out.token_ids) < len(free.token_ids)
    kept = llm.generate(prompts[2], SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True,
                                                   stop=[stop], include_stop_str_in_output=True))[0]
    assert kept.text == text[: text.index(stop) + len(stop)]
    assert_leak_free(llm)


def test_stop_token_ids_finish_with_stop(llm, prompts):
    free = llm.generate(prompts[0], SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True))[0]
    target = free.token_ids[4]
    out = llm.generate(prompts[0], SamplingParams(max_tokens=10, temperature=0.0, stop_token_ids=[target]))[0]
    cut = free.token_ids.index(target) + 1
    assert out.token_ids == free.token_ids[:cut]
    assert out.finish_reason == "stop" and out.stop_reason == target


def test_eos_from_generation_config_ends_unless_ignored(model_dir, tmp_path, prompts):
    src = model_dir("llama")
    free = make_llm(src).generate(prompts[0], SamplingParams(max_tokens=10, temperature=0.0,
                                                             ignore_eos=True))[0]
    eos = free.token_ids[3]
    dst = tmp_path / "eos-model"
    shutil.copytree(src, dst)
    gen = json.loads((dst / "generation_config.json").read_text())
    gen["eos_token_id"] = [eos]
    (dst / "generation_config.json").write_text(json.dumps(gen))
    llm = make_llm(dst)
    out = llm.generate(prompts[0], SamplingParams(max_tokens=10, temperature=0.0))[0]
    assert out.finish_reason == "stop" and out.token_ids == free.token_ids[: free.token_ids.index(eos) + 1]
    ignored = llm.generate(prompts[0], SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True))[0]
    assert ignored.finish_reason == "length" and ignored.token_ids == free.token_ids
    held = llm.generate(prompts[0], SamplingParams(max_tokens=10, temperature=0.0, min_tokens=6))[0]
    assert len(held.token_ids) >= 6 and eos not in held.token_ids[:5]
    assert_leak_free(llm)


def _seq(prompt, output, **params):
    seq = Sequence("r", prompt, SamplingParams(**params))
    seq.token_ids += output
    return seq


def test_penalties_follow_their_definitions():
    logits = torch.tensor([2.0, -1.0, 0.5, 3.0])
    rep = apply_penalties(logits.clone(), _seq([0], [1], repetition_penalty=2.0))
    assert rep.tolist() == [1.0, -2.0, 0.5, 3.0]  # seen tokens: positive halved, negative doubled
    freq = apply_penalties(logits.clone(), _seq([3], [2, 2, 1], frequency_penalty=0.5, presence_penalty=0.25))
    assert freq.tolist() == pytest.approx([2.0, -1.0 - 0.5 - 0.25, 0.5 - 1.0 - 0.25, 3.0])  # prompt not counted


def test_top_p_and_min_p_filters():
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    kept = filter_logits(logits, SamplingParams(top_p=0.7)).isfinite().tolist()
    assert kept == [True, True, False, False]
    kept = filter_logits(logits, SamplingParams(min_p=0.25)).isfinite().tolist()
    assert kept == [True, True, True, False]
    kept = filter_logits(logits, SamplingParams(top_k=2)).isfinite().tolist()
    assert kept == [True, True, False, False]


@pytest.mark.parametrize("field,value", [
    ("max_tokens", 0), ("temperature", -1.0), ("top_p", 0.0), ("top_p", 1.5), ("top_k", -2),
    ("min_p", 2.0), ("repetition_penalty", 0.0), ("presence_penalty", 3.0), ("frequency_penalty", -3.0),
    ("logprobs", 21), ("stop", [""]), ("stop_token_ids", [-1]), ("seed", 2 ** 64), ("seed", -(2 ** 63) - 1),
    ("top_k", 2 ** 64), ("max_tokens", 2 ** 64), ("stop_token_ids", [2 ** 64]), ("stop", ["x"] * 65),
    ("stop", ["x" * 1024] * 17), ("repetition_penalty", 2.2e-309), ("repetition_penalty", 0.009),
])
def test_bad_sampling_params_name_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**{field: value})


def test_extreme_but_valid_params_sample_finite_tokens(llm, prompts):
    """A subnormal temperature is greedy (dividing by it overflowed to nan, found by the API fuzz test);
    the smallest repetition penalty still samples."""
    greedy = llm.generate(prompts[:1], SamplingParams(max_tokens=4, temperature=0.0))[0].token_ids
    tiny = llm.generate(prompts[:1], SamplingParams(max_tokens=4, temperature=2.2e-309))[0]
    assert tiny.token_ids == greedy and tiny.finish_reason == "length"
    low = llm.generate(prompts[:1], SamplingParams(max_tokens=4, temperature=1.0, repetition_penalty=0.01, seed=3))[0]
    assert low.finish_reason == "length" and len(low.token_ids) == 4
