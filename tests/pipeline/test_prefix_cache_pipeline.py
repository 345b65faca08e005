"""The prefix cache in the pipeline (in one process): a prompt's blocks cached on the prefill instance
that computed them, and on the decode instance they landed in; a follow-up turn reuses the history on
whichever instance computes it, with the tokens it gets without the cache, and every block comes back."""
import pytest
from conftest import make_prompts
from local_pipeline import LocalPipeline

from pdpipe.config import RoutingConfig
from pdpipe.messages import SamplingParams

PD = {"prefill-0": "prefill", "decode-0": "decode"}
REPLY = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)


def two_turns(model, routing: RoutingConfig, caching: bool) -> tuple[list[list[int]], list[int], LocalPipeline]:
    """Turn 1: a 40-token prompt, a 12-token reply; turn 2: the prompt, the reply and 9 new tokens. Each
    turn's tokens and cached tokens."""
    pipe = LocalPipeline(model, PD, routing=routing, prefix_caching=caching)
    first = make_prompts(384, lengths=(40,), seed=21)[0]
    pipe.submit("t1", first, REPLY)
    pipe.run()
    second = first + pipe.tokens("t1") + make_prompts(384, lengths=(9,), seed=22)[0]
    pipe.submit("t2", second, REPLY)
    pipe.run()
    assert pipe.leak_free()
    return [pipe.tokens("t1"), pipe.tokens("t2")], [pipe.cached_tokens("t1"), pipe.cached_tokens("t2")], pipe


@pytest.mark.parametrize("where", ["prefill", "decode"])
def test_a_follow_up_turn_reuses_the_history_where_it_is_computed(model_dir, where):
    """Disaggregated, both turns are computed on the prefill instance, which holds turn 1's prompt (5
    blocks of 8) but not its reply (decoded elsewhere). Computed on the decode instance (conditional
    disaggregation: prompts this short go there), turn 2 reuses the prompt and the reply decoded there:
    6 blocks (the reply's last token was never fed back)."""
    routing = RoutingConfig(disaggregation="always") if where == "prefill" else RoutingConfig(local_prompt_tokens=64)
    off, none, _ = two_turns(model_dir("llama"), routing, caching=False)
    on, cached, pipe = two_turns(model_dir("llama"), routing, caching=True)
    assert on == off and none == [0, 0]
    assert cached == ([0, 40] if where == "prefill" else [0, 48])
    assert pipe.scheduler.decisions == ({"remote": 2} if where == "prefill" else {"local": 2})


def test_the_landed_prompt_is_cached_on_decode_and_salts_keep_requests_apart(model_dir):
    pipe = LocalPipeline(model_dir("llama"), PD, routing=RoutingConfig(local_prompt_tokens=60))
    prompt = make_prompts(384, lengths=(70,), seed=23)[0]
    pipe.submit("a", prompt, REPLY, cache_salt="x")  # 70 tokens: on the prefill instance
    pipe.run()
    assert pipe.engines["decode-0"].blocks.num_cached_blocks >= 70 // 8
    follow = prompt[:50]  # short: computed on decode, whose cache holds the landed prompt
    pipe.submit("b", follow, REPLY, cache_salt="x")
    pipe.submit("c", follow, REPLY, cache_salt="y")
    pipe.run()
    assert pipe.cached_tokens("b") == 48 and pipe.cached_tokens("c") == 0 and pipe.tokens("b") == pipe.tokens("c")
    assert pipe.leak_free()
