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
    started = [d for _, s, _, d in pipe.scheduler.recent["t2"].events if s == "PREFILLING"]
    assert started == [f"{cached[1]} of 61 prompt tokens from the prefix cache"]  # what `pdpipe trace` shows


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


def serve_one(pipe: LocalPipeline, rid: str, prompt: list[int]) -> list[int]:
    pipe.submit(rid, prompt, REPLY)
    pipe.run()
    return pipe.tokens(rid)


def test_decode_holding_the_prompt_moves_only_the_blocks_it_lacks(model_dir):
    """A prompt whose first 8 blocks landed on decode before: decode reserves them from its cache, the
    transfer moves only the other 3, and the tokens are those without any cache. A prompt decode holds
    whole moves nothing at all and still gets its first token from prefill."""
    prompt = make_prompts(384, lengths=(70,), seed=24)[0]
    longer = prompt[:64] + make_prompts(384, lengths=(20,), seed=25)[0]
    plain = LocalPipeline(model_dir("llama"), PD, prefix_caching=False)
    expected = [serve_one(plain, r, p) for r, p in (("a", prompt), ("b", longer), ("c", prompt[:64]))]
    pipe = LocalPipeline(model_dir("llama"), PD)
    assert serve_one(pipe, "a", prompt) == expected[0]
    xfer = pipe.transfer
    assert (xfer.blocks_sent, xfer.blocks_skipped) == (9, 0)
    assert serve_one(pipe, "b", longer) == expected[1]  # 84 tokens: 11 blocks, the first 8 held by decode
    assert (xfer.blocks_sent, xfer.blocks_skipped) == (9 + 3, 8)
    assert serve_one(pipe, "c", prompt[:64]) == expected[2]  # 8 blocks, all held by decode
    assert (xfer.blocks_sent, xfer.blocks_skipped) == (12, 16)
    reserved = [d for _, s, _, d in pipe.scheduler.recent["c"].events if s == "RESERVED"]
    assert reserved and "8 of them cached there" in reserved[0]
    assert plain.transfer.blocks_sent == 9 + 11 + 8 and pipe.leak_free() and plain.leak_free()


def test_an_abort_mid_prompt_leaves_the_requests_sharing_its_blocks_whole(model_dir):
    """Two requests share a cached 48-token prefix on the prefill instance; one is aborted while its
    suffix is computed in chunks: the other completes with its cache-off tokens and every block returns."""
    from pdpipe.messages import AbortRequest

    head = make_prompts(384, lengths=(48,), seed=26)[0]
    a, b = (head + tail for tail in make_prompts(384, lengths=(60, 60), seed=27))
    plain = LocalPipeline(model_dir("llama"), PD, prefix_caching=False, max_num_batched_tokens=16)
    expected = serve_one(plain, "b", b)
    pipe = LocalPipeline(model_dir("llama"), PD, max_num_batched_tokens=16)
    serve_one(pipe, "seed", head + [1])  # the prefix enters both caches
    pipe.submit("a", a, REPLY)
    pipe.submit("b", b, REPLY)
    for _ in range(3):  # a few 16-token steps: both mid-prompt
        pipe.deliver()
        pipe.step("prefill-0")
    pipe.send("scheduler", AbortRequest(request_id="a", reason="client gone"))
    pipe.run()
    assert pipe.tokens("b") == expected and pipe.cached_tokens("b") == 48 and pipe.finish_reason("a") is None
    assert pipe.leak_free()


def test_a_follow_up_turn_is_computed_on_the_decode_instance_holding_its_history(model_dir):
    """Conditional disaggregation by what each instance holds: turn 1 (40 tokens, over the 32 computed
    locally) goes to the prefill instance; turn 2 (61 tokens) too long by length, but its decode instance
    holds 48 of them (turn 1's landed prompt and the reply it decoded), leaving 13 to compute: computed
    there, no prefill, no transfer. The tokens are those without any cache."""
    routing = RoutingConfig(local_prompt_tokens=32)
    off, _, plain = two_turns(model_dir("llama"), routing, caching=False)
    on, cached, pipe = two_turns(model_dir("llama"), routing, caching=True)
    assert on == off and cached == [0, 48]
    assert plain.scheduler.decisions == {"remote": 2} and pipe.scheduler.decisions == {"remote": 1, "local": 1}
    placed = [d for _, s, _, d in pipe.scheduler.recent["t2"].events if s == "QUEUED"][-1]
    assert "decode-0 holds 48 of its 61 tokens: 13 to compute" in placed
    assert pipe.transfer.blocks_sent == 5 and plain.transfer.blocks_sent == 5 + 8


def test_under_eviction_pressure_no_block_in_use_or_in_transfer_is_reused(model_dir):
    """Pools of 20 blocks on both sides, 8 requests sharing a 32-token prefix, all at once: cached blocks
    are evicted and reused while others are computed, held for the transfer and written into decode;
    every request gets its cache-off tokens and every block comes back."""
    head = make_prompts(384, lengths=(32,), seed=28)[0]
    prompts = [head + tail for tail in make_prompts(384, lengths=(9, 17, 25, 30, 12, 20, 27, 14), seed=29)]

    def run(caching: bool) -> tuple[list[list[int]], LocalPipeline]:
        pipe = LocalPipeline(model_dir("llama"), PD, num_blocks=20, prefix_caching=caching,
                             routing=RoutingConfig(disaggregation="always"))
        for i, p in enumerate(prompts):
            pipe.submit(f"r{i}", p, REPLY)
        pipe.run()
        assert pipe.leak_free()
        return [pipe.tokens(f"r{i}") for i in range(len(prompts))], pipe

    off, _ = run(False)
    on, pipe = run(True)
    assert on == off
    assert sum(pipe.cached_tokens(f"r{i}") for i in range(len(prompts))) > 0
    assert pipe.engines["prefill-0"].blocks.num_evictions > 0 and pipe.engines["decode-0"].blocks.num_evictions > 0


def test_a_new_engine_says_its_cache_is_empty_before_anything_else(model_dir):
    """Its first KV events clear whatever a consumer (an external router) held of an earlier process of
    the same name."""
    from pdpipe.engine.worker import EngineWorker
    from pdpipe.kv_events import AllBlocksCleared, decode_batch
    from pdpipe.messages import KVEvents

    pipe = LocalPipeline(model_dir("llama"), PD)
    sent = []
    worker = EngineWorker("decode-0", "decode", pipe.engines["decode-0"], lambda dest, msg: sent.append(msg))
    worker.stats()
    (first,) = [m for m in sent if isinstance(m, KVEvents)]
    assert decode_batch(first.batches[0]).events == [AllBlocksCleared()]


def test_decode_admits_the_requests_sharing_its_cached_prefix_counting_the_prefix_once(model_dir):
    """Decode has 20 blocks of 8 tokens and caches a 48-token prefix (6 blocks). Six requests over it (54
    prompt tokens, 12 out: 9 blocks of room each) arrive at once: their whole rooms would let 2 in at a time;
    the scheduler counts the prefix once (9 + 3 + 3 + 3 + 3 = 18) and dispatches 4 at once, which decode
    takes without refusing one. Tokens as without any cache; the ledger empties."""
    head = make_prompts(384, lengths=(48,), seed=30)[0]
    prompts = [head + tail for tail in make_prompts(384, lengths=(6,) * 6, seed=31)]

    def run(caching: bool) -> tuple[list[list[int]], int, LocalPipeline]:
        pipe = LocalPipeline(model_dir("llama"), PD, num_blocks=20, prefix_caching=caching,
                             routing=RoutingConfig(disaggregation="always", cache_min_tokens=8, pull_min_tokens=8))
        serve_one(pipe, "seed", head + [1])  # the prefix lands in decode's cache
        for i, p in enumerate(prompts):
            pipe.submit(f"r{i}", p, REPLY)
        pipe.deliver()
        at_once = len(pipe.scheduler.ledger.commitments)
        pipe.run()
        assert pipe.leak_free() and not pipe.scheduler.ledger.rooms["decode-0"].held
        return [pipe.tokens(f"r{i}") for i in range(len(prompts))], at_once, pipe

    off, off_at_once, _ = run(False)
    on, on_at_once, pipe = run(True)
    assert on == off and (off_at_once, on_at_once) == (2, 4)
    refused = [d for rec in pipe.scheduler.recent.values() for _, _, _, d in rec.events if d.startswith("refused")]
    assert not refused and all(pipe.cached_tokens(f"r{i}") == 48 for i in range(len(prompts)))


def test_a_prefill_instance_copies_the_history_its_decode_instance_caches_instead_of_computing_it(model_dir):
    """A remote hit. Turn 2 (61 tokens) goes to the prefill instance, which holds turn 1's prompt (5 blocks)
    but not its reply, decoded on decode-0; decode-0 holds 6 blocks of it. The transfer copies the sixth from
    decode-0's cache into the prefill instance's blocks, which computes only the last 13 tokens, and moves
    decode-0 only the 2 blocks it lacks. Tokens as without any cache."""
    routing = RoutingConfig(disaggregation="always", cache_min_tokens=8, pull_min_tokens=8)
    off, _, _ = two_turns(model_dir("llama"), routing, caching=False)
    on, cached, pipe = two_turns(model_dir("llama"), routing, caching=True)
    assert on == off and cached == [0, 48]
    assert pipe.transfer.blocks_pulled == 1 and pipe.transfer.blocks_sent == 5 + 2
    started = [d for _, s, _, d in pipe.scheduler.recent["t2"].events if s == "PREFILLING"]
    assert started == ["48 of 61 prompt tokens from the prefix cache (8 copied from the decode instance's)"]
    prefill = pipe.workers["prefill-0"].stats()
    assert prefill.prefix_hit_tokens == 48 and prefill.prefix_hit_tokens_remote == 8
    off_routing = RoutingConfig(disaggregation="always", cache_min_tokens=8, pull_min_tokens=8, remote_hits=False)
    without, _, plain = two_turns(model_dir("llama"), off_routing, caching=True)
    assert without == off and plain.transfer.blocks_pulled == 0
