"""The prefix cache on one engine: chained block hashes, cached blocks kept after their requests end and
evicted least recently used (a request's tail first), hits that skip computing the cached tokens, replies
that become reusable, salts that keep requests apart, and outputs equal to the cache's absence."""
import hashlib
import struct

import pytest
import torch
from conftest import assert_leak_free, make_prompts
from hypothesis import given, settings
from hypothesis import strategies as st

from pdpipe.config import CacheConfig, EngineConfig, SchedulerConfig
from pdpipe.engine.block_manager import BlockError, BlockManager
from pdpipe.engine.engine import LLMEngine
from pdpipe.kv_hash import block_hashes, reusable_blocks, root_hash
from pdpipe.messages import SamplingParams

GREEDY = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
ROOT = root_hash("m")


def hashes(*blocks: int, root: bytes = ROOT) -> list[bytes]:
    """Hashes of blocks of 4 tokens, block i holding the token id blocks[i] four times."""
    return block_hashes([t for b in blocks for t in [b] * 4], 4, root)


# ---- block hashes ------------------------------------------------------------------------------------
def test_a_block_hash_names_its_whole_prefix():
    ids = list(range(40))
    full = block_hashes(ids, 16, ROOT)
    assert len(full) == 2  # the 8 tokens of the partial third block have none
    first = hashlib.sha256(ROOT + struct.pack("<16i", *range(16))).digest()  # parent, then int32 little-endian
    assert full[0] == first and full[1] == hashlib.sha256(first + struct.pack("<16i", *range(16, 32))).digest()
    assert block_hashes(ids, 16, ROOT, full[:1]) == full  # extending a known chain
    other = block_hashes([99] + ids[1:], 16, ROOT)
    assert other[0] != full[0] and other[1] != full[1]  # a different first token changes every later block
    assert block_hashes(ids, 16, root_hash("m", cache_salt="s"))[0] != full[0]
    assert root_hash("m", kv_dtype="bfloat16") != root_hash("m", kv_dtype="float32") != root_hash("n")
    assert root_hash("m", epoch=1) != ROOT and root_hash("m", quantization="wint4") != ROOT


def test_reuse_leaves_the_last_token_to_compute_where_its_logits_are_needed():
    assert reusable_blocks(33, 16, computes_last=True) == 2 and reusable_blocks(32, 16, computes_last=True) == 1
    assert reusable_blocks(32, 16, computes_last=False) == 2 and reusable_blocks(15, 16, computes_last=False) == 0


# ---- the block manager's cache -------------------------------------------------------------------------
def test_freed_blocks_stay_cached_and_are_found_by_their_prefix():
    bm = BlockManager(num_blocks=8, block_size=4)
    table = bm.allocate(3)
    for block, h in zip(table, hashes(1, 2, 3)):
        bm.register(block, h)
    bm.free(table)
    assert bm.all_free() and bm.num_free_blocks == 8 and bm.num_cached_blocks == 3  # cached blocks are free
    assert bm.match(hashes(1, 2, 3, 4), limit=4) == table
    assert bm.match(hashes(1, 2, 9), limit=4) == table[:2] and bm.match(hashes(2, 3), limit=4) == []
    assert bm.match(hashes(1, 2, 3), limit=1) == table[:1]
    hit = bm.match(hashes(1, 2), limit=2)
    assert bm.can_allocate(6, hit) and not bm.can_allocate(7, hit)  # the hit's free blocks come out of the 8
    bm.share(hit)
    assert bm.num_free_blocks == 6 and bm.num_evictable_blocks == 1
    bm.free(hit)
    with pytest.raises(BlockError, match="already free"):
        bm.free(hit)


def test_empty_blocks_go_first_then_the_least_recently_freed_and_a_tables_tail_first():
    bm = BlockManager(num_blocks=6, block_size=4)
    older, newer = bm.allocate(3), bm.allocate(2)
    for block, h in zip(older, hashes(1, 2, 3)):
        bm.register(block, h)
    for block, h in zip(newer, hashes(7, 8)):
        bm.register(block, h)
    bm.free(older)
    bm.free(newer)
    fresh = bm.allocate(1)  # the one block that never held a hash
    assert fresh[0] not in older + newer and bm.num_cached_blocks == 5
    assert bm.allocate(1) == [older[2]]  # the older table's tail goes first, its prefix stays
    assert bm.match(hashes(1, 2, 3), limit=3) == older[:2] and bm.num_cached_blocks == 4
    assert bm.allocate(3) == [older[1], older[0], newer[1]]
    assert bm.match(hashes(7, 8), limit=2) == newer[:1]


def test_a_prefix_computed_twice_is_cached_once_and_the_copy_freed():
    bm = BlockManager(num_blocks=4, block_size=4)
    a, b = bm.allocate(1), bm.allocate(1)
    bm.register(a[0], hashes(5)[0])
    bm.register(b[0], hashes(5)[0])  # computed at the same time by another request
    bm.free(b)
    assert bm.num_cached_blocks == 1 and bm.match(hashes(5), 1) == a
    assert bm.num_evictable_blocks == 0 and bm.num_free_blocks == 3  # the copy went back as an empty block


def test_reset_forgets_every_cached_block_and_the_cache_can_be_off():
    bm = BlockManager(num_blocks=4, block_size=4)
    held, freed = bm.allocate(1), bm.allocate(1)
    bm.register(held[0], hashes(1)[0])
    bm.register(freed[0], hashes(2)[0])
    bm.free(freed)
    assert bm.reset_cache() == 2 and bm.num_cached_blocks == 0 and bm.match(hashes(1), 1) == []
    bm.free(held)
    assert bm.all_free() and bm.num_evictable_blocks == 0
    off = BlockManager(num_blocks=4, block_size=4, caching=False)
    table = off.allocate(1)
    off.register(table[0], hashes(1)[0])
    off.free(table)
    assert off.num_cached_blocks == 0 and off.match(hashes(1), 1) == []


def test_each_partition_caches_its_own_blocks_and_a_hit_picks_its_partition():
    bm = BlockManager(num_blocks=8, block_size=4, partitions=2)
    zero = bm.allocate(2, partition=0)
    one = bm.allocate(1, partition=1)
    for block, h in zip(zero, hashes(1, 2)):
        bm.register(block, h)
    bm.register(one[0], hashes(1)[0])  # the same first block on rank 1 too
    bm.free(zero)
    bm.free(one)
    held = bm.allocate(1, partition=0)  # rank 0 now has fewer free blocks
    assert bm.match(hashes(1, 2), limit=2) == zero  # rank 0 holds more of the prefix
    assert bm.match(hashes(1), limit=1) == one  # a tie: the partition with more free blocks
    bm.free(held)
    assert all(bm.partition_of(b) == 0 for b in bm.allocate(4, partition=0))  # evicting rank 0's alone
    assert bm.match(hashes(1, 2), limit=2) == one


# ---- engines -------------------------------------------------------------------------------------------
def make_engine(model, caching=True, num_blocks=64, block_size=8, **sched):
    return LLMEngine(EngineConfig(model=str(model), cache=CacheConfig(block_size=block_size, num_blocks=num_blocks,
                                                                     prefix_caching=caching),
                                  scheduler=SchedulerConfig(**sched)))


def serve(engine, prompts: list[list[int]], together: bool = False, salts: list[str] | None = None,
          params: SamplingParams = GREEDY) -> tuple[list[list[int]], list[int], list[int]]:
    """Each prompt's output tokens, its cached tokens, and the prompt tokens each step computed (the
    prompts one after another, or all queued at once)."""
    tokens: dict[str, list[int]] = {}
    cached: dict[str, int] = {}
    computed: list[int] = []
    execute = engine.runner.execute

    def counting(out, on_layer_done=None):
        computed.append(sum(c.num_tokens for c in out.chunks if c.num_tokens > 1 or c.start < c.seq.num_prompt_tokens))
        return execute(out, on_layer_done)

    engine.runner.execute = counting
    batches = [list(range(len(prompts)))] if together else [[i] for i in range(len(prompts))]
    for batch in batches:
        for i in batch:
            engine.add_request(str(i), prompts[i], params, cache_salt=(salts or [""] * len(prompts))[i])
        while engine.has_unfinished():
            for out in engine.step():
                tokens.setdefault(out.request_id, []).extend(out.token_ids)
                cached[out.request_id] = max(cached.get(out.request_id, 0), out.cached_tokens)
    engine.runner.execute = execute
    assert_leak_free(engine)
    ids = [str(i) for i in range(len(prompts))]
    return [tokens[i] for i in ids], [cached.get(i, 0) for i in ids], computed


def shared_prefix_prompts(n: int, system: int = 40, suffix: int = 13, seed: int = 3) -> list[list[int]]:
    head = make_prompts(384, lengths=(system,), seed=seed)[0]
    return [head + tail for tail in make_prompts(384, lengths=(suffix,) * n, seed=seed + 1)]


@pytest.mark.parametrize("arch", ["llama", "qwen3", "mistral", "ernie4_5_moe"])
def test_the_cache_on_generates_what_it_does_off(model_dir, arch):
    """Prompts sharing a 40-token system prompt, one after another and all at once (two requests with
    the same new prefix at once: computed twice, never wrong), greedy, float32: the same tokens with the
    cache on and off, and later prompts hit the shared blocks (5 of 8 tokens: 40 tokens)."""
    prompts = shared_prefix_prompts(4)
    for together in (False, True):
        off, none, _ = serve(make_engine(model_dir(arch), caching=False), prompts, together)
        on, cached, _ = serve(make_engine(model_dir(arch)), prompts, together)
        assert on == off and not any(none)
        assert cached == ([0, 40, 40, 40] if not together else [0, 0, 0, 0])


def test_a_hit_computes_only_the_uncached_tokens_chunked_or_not(model_dir):
    """The second prompt computes its 13 new tokens alone; with an 8-token step budget its suffix still
    comes in chunks after the hit."""
    prompts = shared_prefix_prompts(2)
    _, cached, computed = serve(make_engine(model_dir("llama")), prompts)
    assert cached == [0, 40] and computed.count(53) == 1 and 13 in computed
    _, cached, computed = serve(make_engine(model_dir("llama"), max_num_batched_tokens=8), prompts)
    assert cached == [0, 40] and sum(c for c in computed if c > 1) == 53 + 13


def test_a_reply_becomes_reusable_for_the_next_turn(model_dir):
    """Turn 2 is turn 1's prompt, its reply and a new message: it reuses every full block of the first
    two (the reply's KV computed as it was decoded)."""
    engine = make_engine(model_dir("llama"))
    first = make_prompts(384, lengths=(30,), seed=7)[0]
    reply_params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    (reply,), _, _ = serve(engine, [first], params=reply_params)
    second = first + reply + make_prompts(384, lengths=(9,), seed=8)[0]
    (answer,), (cached,), _ = serve(engine, [second])
    assert cached == (30 + 12 - 1) // 8 * 8  # the reply's last token was sampled, never fed back: not cached
    (expected,), _, _ = serve(make_engine(model_dir("llama"), caching=False), [second])
    assert answer == expected


def test_requests_with_different_salts_never_share(model_dir):
    prompts = shared_prefix_prompts(3)
    _, cached, _ = serve(make_engine(model_dir("llama")), prompts, salts=["a", "b", "a"])
    assert cached == [0, 0, 40]


def test_a_whole_prompt_in_the_cache_still_computes_its_last_token(model_dir):
    """The same 48-token prompt twice: 5 of its 6 blocks come from the cache (the last token runs, for
    its logits), and the outputs agree."""
    prompt = make_prompts(384, lengths=(48,), seed=9)[0]
    tokens, cached, computed = serve(make_engine(model_dir("llama")), [prompt, prompt])
    assert tokens[0] == tokens[1] and cached == [0, 40] and computed[:1] == [48] and 8 in computed


def test_preemption_of_requests_sharing_blocks_keeps_outputs_and_frees_every_block(model_dir):
    """A pool too small for every request's output: running requests that share the system prompt's
    blocks are preempted and recomputed (from the cache), with the same tokens as without the cache."""
    prompts = shared_prefix_prompts(5, system=24, suffix=5)
    params = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
    off, _, _ = serve(make_engine(model_dir("llama"), caching=False, num_blocks=14), prompts, True, params=params)
    engine = make_engine(model_dir("llama"), num_blocks=14)
    on, _, _ = serve(engine, prompts, True, params=params)
    assert on == off and engine.scheduler.num_preemptions > 0


def test_reset_empties_the_cache(model_dir):
    engine = make_engine(model_dir("llama"))
    prompts = shared_prefix_prompts(2)
    serve(engine, prompts[:1])  # 53 prompt tokens and 5 fed-back outputs: 7 full blocks
    assert engine.blocks.num_cached_blocks == 7 and engine.reset_prefix_cache() == 7
    _, cached, _ = serve(engine, prompts[1:])
    assert cached == [0] and engine.blocks.num_cached_blocks == 7


def test_the_llm_api_reports_cached_tokens(model_dir):
    from conftest import make_llm

    llm = make_llm(model_dir("llama"), dtype="float32")
    prompts = shared_prefix_prompts(2, system=32)
    first = llm.generate(prompts[0], GREEDY)[0]
    second = llm.generate(prompts[1], GREEDY)[0]
    assert first.num_cached_tokens == 0 and second.num_cached_tokens == 32
    assert torch.equal(torch.tensor(second.prompt_token_ids[:32]), torch.tensor(first.prompt_token_ids[:32]))


# ---- KV events -----------------------------------------------------------------------------------------
def test_the_cache_says_what_it_stored_evicted_and_cleared():
    from pdpipe.kv_events import AllBlocksCleared, BlockRemoved, BlockStored

    bm = BlockManager(num_blocks=4, block_size=4, partitions=2)
    bm.record_events = True
    chain = hashes(1, 2)
    table = bm.allocate(2, partition=1)
    bm.register(table[0], chain[0], None, [1] * 4)
    bm.register(table[1], chain[1], chain[0], [2] * 4)  # the same chain: one event
    bm.free(table)
    bm.allocate(2, partition=1)  # evicts both, the tail first
    bm.reset_cache()
    events = bm.take_events()
    assert events[0] == (1, BlockStored(chain, None, [1] * 4 + [2] * 4, 4))
    assert events[1] == (1, BlockRemoved([chain[1], chain[0]]))
    assert events[2:] == [(0, AllBlocksCleared()), (1, AllBlocksCleared())] and bm.take_events() == []


def test_kv_events_reach_a_subscriber_in_vllms_wire_shape(tmp_path):
    """Three frames (topic: the instance; an 8-byte big-endian sequence number; a msgpack KVEventBatch),
    the batch tagged and decodable as vLLM's consumers decode it."""
    import msgspec
    import zmq

    from pdpipe.kv_events import BlockStored, KVEventBatch, decode_batch, encode_batch
    from pdpipe.scheduler.service import KVEventPublisher

    ctx = zmq.Context()
    endpoint = f"ipc://{tmp_path / 'kv-events.sock'}"
    publisher = KVEventPublisher(ctx, endpoint)
    sub = ctx.socket(zmq.SUB)
    sub.setsockopt(zmq.SUBSCRIBE, b"")
    sub.setsockopt(zmq.RCVTIMEO, 10_000)
    sub.connect(endpoint)
    batch = KVEventBatch(1.5, [BlockStored(hashes(1), None, [1] * 4, 4)], data_parallel_rank=1)
    poller = zmq.Poller()
    poller.register(sub, zmq.POLLIN)
    seqs = []
    while not poller.poll(50):  # a SUB socket misses what is published before it has joined
        publisher.publish("decode-0", encode_batch(batch))
    topic, seq, payload = sub.recv_multipart()
    seqs.append(int.from_bytes(seq, "big"))
    publisher.publish("decode-0", encode_batch(batch))
    while (frames := sub.recv_multipart())[1] == seq:
        pass
    seqs.append(int.from_bytes(frames[1], "big"))
    assert topic == b"decode-0" and len(seq) == 8 and seqs[1] > seqs[0] and decode_batch(payload) == batch
    raw = msgspec.msgpack.decode(payload)  # as a consumer without pdpipe's structs sees it: arrays, tag first
    assert raw == [1.5, [["BlockStored", hashes(1), None, [1] * 4, 4, None, "GPU"]], 1]
    publisher.close()
    sub.close()
    ctx.term()


# ---- the host tier -------------------------------------------------------------------------------------
def test_blocks_evicted_from_the_device_go_to_the_host_tier_and_come_back():
    from pdpipe.kv_events import BlockRemoved, BlockStored

    bm = BlockManager(num_blocks=3, block_size=4, host_blocks=2)
    bm.record_events = True
    table = bm.allocate(3)
    for block, h, parent in zip(table, hashes(1, 2, 3), [None, *hashes(1, 2)]):
        bm.register(block, h, parent, [])
    bm.free(table)
    bm.take_events()
    taken = bm.allocate(2)  # evicts the tail first: blocks 3 and 2 go to the host
    assert taken == [table[2], table[1]] and bm.take_copies() == [("out", table[2], 0), ("out", table[1], 1)]
    assert bm.match(hashes(1, 2, 3), 3) == table[:1]
    assert bm.match_host(hashes(1, 2, 3)[1:], 2) == [1, 0]  # the prefix's rest, block 2 then 3
    bm.restore([1, 0], taken)
    assert bm.take_copies() == [("in", 1, taken[0]), ("in", 0, taken[1])] and bm.host_blocks_in == 2
    bm.free(taken)  # never registered here (the scheduler registers restored blocks): empty again
    assert bm.allocate(3)[2] == table[0]  # the two empty ones, then the last cached block (hash 1) evicted
    assert bm.take_copies() == [("out", table[0], 1)]  # into the host block of the least recently used (2)
    events = bm.take_events()
    assert (0, BlockRemoved([hashes(1, 2)[1]], medium="CPU")) in events
    assert (0, BlockStored([hashes(1)[0]], None, [], 4, medium="CPU")) in events
    assert bm.match_host(hashes(1, 2, 3), 3) == [1] and bm.num_host_cached_blocks == 2
    assert bm.reset_cache() == 0 and bm.num_host_cached_blocks == 0


def test_blocks_next_in_line_are_written_ahead_and_their_eviction_then_copies_nothing():
    """Four cached free blocks, none empty: written ahead, the two next in line for eviction go to the host
    (copies for the side stream) and stay cached on the device; asked again, nothing more. Evicting them
    copies nothing then, but the engine must first wait for those copies (they may still read the blocks);
    so it must for a restore from a host block they wrote, or a copy into one; after a wait, nothing
    earlier is in flight."""
    bm = BlockManager(num_blocks=4, block_size=4, host_blocks=3)
    table = bm.allocate(4)
    for block, h, parent in zip(table, hashes(1, 2, 3, 4), [None, *hashes(1, 2, 3)]):
        bm.register(block, h, parent, [])
    bm.free(table)  # in line for eviction: the tail first (4, 3, 2, 1)
    bm.write_ahead(2)
    assert bm.take_ahead() == [("out", table[3], 0), ("out", table[2], 1)] and not bm.take_copies()
    assert bm.match(hashes(1, 2, 3, 4), 4) == table and bm.num_host_cached_blocks == 2  # cached in both tiers
    bm.write_ahead(2)
    assert not bm.take_ahead() and not bm.take_sync()
    assert bm.allocate(1) == [table[3]] and not bm.take_copies()  # on the host already: no copy
    assert bm.take_sync() and not bm.take_sync()  # the wait, once
    bm.write_ahead(2)  # block 2 was copied (before the wait: done now); block 1 is next in line
    assert bm.take_ahead() == [("out", table[1], 2)]
    assert bm.match_host(hashes(1, 2), 2, 0) == [] and bm.match_host(hashes(1, 2, 3, 4)[1:], 3) == [2, 1, 0]
    bm.restore([2], bm.allocate(1))  # takes block 3's device block (copied before the wait) and reads host 2
    assert bm.take_sync()  # host block 2 may still be being written
    bm.restore([1], [table[3]])
    assert not bm.take_sync()


def make_tiered(model, host_mb: float, num_blocks: int = 12):
    return LLMEngine(EngineConfig(model=str(model), cache=CacheConfig(block_size=8, num_blocks=num_blocks,
                                                                     host_kv_cache_mb=host_mb)))


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_a_prefix_evicted_to_the_host_tier_is_copied_back_not_computed(model_dir, arch):
    """A 12-block device pool: a 64-token prompt, then others that evict its blocks (to the host tier),
    then the first prompt again: its 7 reusable blocks come back from the host, and every output equals
    the cache's absence."""
    first = make_prompts(384, lengths=(64,), seed=41)[0]
    others = make_prompts(384, lengths=(60, 61, 62), seed=42)
    prompts = [first, *others, first]
    off, _, _ = serve(make_engine(model_dir(arch), caching=False, num_blocks=12), prompts)
    engine = LLMEngine(EngineConfig(model=str(model_dir(arch)), cache=CacheConfig(
        block_size=8, num_blocks=12, host_kv_cache_mb=1)))
    on, cached, computed = serve(engine, prompts)
    assert on == off and cached == [0, 0, 0, 0, 56] and sum(computed) == 64 + 60 + 61 + 62 + 8
    blocks = engine.blocks
    assert blocks.host_blocks_out >= 7 and blocks.host_blocks_in == 7 and engine.scheduler.prefix_hit_tokens_host == 56
    assert blocks.host_blocks_ahead > 0  # some went before their eviction (a quarter of the pool kept ahead)
    no_tier = LLMEngine(EngineConfig(model=str(model_dir(arch)), cache=CacheConfig(block_size=8, num_blocks=12)))
    assert serve(no_tier, prompts)[1][-1] == 0  # without the tier the prefix was gone


def test_each_data_parallel_partition_has_a_host_tier_of_its_own():
    """Two partitions of 3 device and 2 host blocks: partition 1's evicted blocks go to its host blocks (2, 3),
    its events say partition 1, a prompt no device partition caches is placed where its host tier holds it
    (with room), and what partition 0 evicts never takes partition 1's host blocks."""
    from pdpipe.kv_events import BlockStored

    bm = BlockManager(num_blocks=6, block_size=4, partitions=2, host_blocks=4)
    bm.record_events = True
    table = bm.allocate(3, partition=1)
    for block, h, parent in zip(table, hashes(1, 2, 3), [None, *hashes(1, 2)]):
        bm.register(block, h, parent, [])
    bm.free(table)
    bm.take_events()
    taken = bm.allocate(3, partition=1)  # evicts all three, the tail first
    assert bm.take_copies() == [("out", table[2], 2), ("out", table[1], 3), ("out", table[0], 2)]
    assert [p for p, e in bm.take_events() if isinstance(e, BlockStored)] == [1, 1, 1]
    assert bm.match(hashes(1, 2, 3), 3) == [] and bm.match_host(hashes(1, 2, 3), 3, partition=0) == []
    assert bm.host_partition(hashes(1, 2, 3), 3, need=1) is None  # partition 1 has no room
    bm.free(taken)
    assert bm.host_partition(hashes(1, 2, 3), 3, need=3) == 1 and bm.match_host(hashes(1, 2, 3), 3, 1) == [2, 3]
    other = bm.allocate(3, partition=0)
    for block, h in zip(other, hashes(7, 8, 9)):
        bm.register(block, h)
    bm.free(other)
    bm.allocate(3, partition=0)
    assert {host for _, _, host in bm.take_copies()} == {0, 1}  # partition 0's own host blocks
    with pytest.raises(ValueError, match="host_blocks"):
        BlockManager(num_blocks=8, block_size=4, partitions=2, host_blocks=3)


def evict_and_return_on_rank_1(engine) -> tuple[list[list[int]], list[int], int, set[int]]:
    """The host-tier workload on a data-parallel instance, one block of rank 0's pool held so that every
    prompt is placed on rank 1: its tokens, cached tokens, blocks restored, and the partitions whose host
    tier stored blocks."""
    from pdpipe.kv_events import BlockStored

    engine.blocks.record_events = True
    held = engine.blocks.allocate(1, partition=0)
    first = make_prompts(384, lengths=(64,), seed=41)[0]
    tokens, cached = [], []
    for i, prompt in enumerate([first, *make_prompts(384, lengths=(60, 61, 62), seed=42), first]):
        engine.add_request(str(i), prompt, GREEDY)
        got, hit = [], 0
        while engine.has_unfinished():
            for out in engine.step():
                got += out.token_ids
                hit = max(hit, out.cached_tokens)
        tokens.append(got)
        cached.append(hit)
    engine.blocks.free(held)
    stored = {p for p, e in engine.blocks.take_events() if isinstance(e, BlockStored) and e.medium == "CPU"}
    return tokens, cached, engine.blocks.host_blocks_in, stored


def test_the_host_tier_under_data_parallel_attention_computes_what_one_engine_does(model_dir, tmp_path):
    """A MoE model on two data-parallel ranks, each with its own pool and host tier: rank 1's evicted prefix
    goes to its host blocks and comes back into its pool (the copies run on rank 1, in its own ids); the
    tokens equal one engine's without any cache."""
    from parallel_ranks import engine_rank, on_two_ranks

    model = model_dir("ernie4_5_moe")
    fields = {"cache": CacheConfig(block_size=8, num_blocks=12, host_kv_cache_mb=1),
              "expert_parallel": True, "data_parallel_attention": True}
    [(_, (tokens, cached, restored, stored))] = on_two_ranks(engine_rank, tmp_path, [(str(model), 12, fields,
                                                                                       evict_and_return_on_rank_1)], 1)
    first = make_prompts(384, lengths=(64,), seed=41)[0]
    expected = serve(make_engine(model, caching=False, num_blocks=12),
                     [first, *make_prompts(384, lengths=(60, 61, 62), seed=42), first])[0]
    assert tokens == expected and cached[-1] == 56 and restored == 7 and stored == {1}


def evict_and_return(engine) -> tuple[list[list[int]], list[int], int]:
    """The host-tier workload (a 64-token prompt, three that evict it, the first again) on `engine`."""
    first = make_prompts(384, lengths=(64,), seed=41)[0]
    tokens, cached, _ = serve(engine, [first, *make_prompts(384, lengths=(60, 61, 62), seed=42), first])
    return tokens, cached, engine.blocks.host_blocks_in


def test_the_host_tier_on_two_tensor_parallel_ranks_computes_what_one_engine_does(model_dir, tmp_path):
    """Every rank copies its own heads out and back (rank 0 hands the copies over before each step):
    the same tokens as one engine without any cache, the prefix back from the host."""
    from parallel_ranks import engine_rank, on_two_ranks

    model = model_dir("qwen3")
    tiered = {"cache": CacheConfig(block_size=8, num_blocks=12, host_kv_cache_mb=1)}
    [(_, (tokens, cached, restored))] = on_two_ranks(engine_rank, tmp_path, [(str(model), 12, tiered,
                                                                               evict_and_return)], 1)
    expected = serve(make_engine(model, caching=False, num_blocks=12),
                     [make_prompts(384, lengths=(64,), seed=41)[0],
                      *make_prompts(384, lengths=(60, 61, 62), seed=42), make_prompts(384, lengths=(64,), seed=41)[0]])
    assert tokens == expected[0] and cached[-1] == 56 and restored == 7


def test_a_hit_in_a_full_partition_is_given_up_for_one_with_room():
    """Data-parallel partitions: the prefix is cached in rank 0's pool, which has no room for the rest of
    the prompt; rank 1's has: the prompt is admitted there, computed whole, rather than waiting."""
    from pdpipe.config import SchedulerConfig as Sched
    from pdpipe.engine.scheduler import Scheduler
    from pdpipe.engine.sequence import Sequence

    bm = BlockManager(num_blocks=16, block_size=4, partitions=2)
    cached = bm.allocate(4, partition=0)
    prompt = [t for b in (1, 2, 3, 4) for t in [b] * 4] + [9, 9, 9, 9]
    chain = block_hashes(prompt, 4, ROOT)
    for i, block in enumerate(cached):
        bm.register(block, chain[i])
    bm.free(cached)
    held = bm.allocate(4, partition=0)  # rank 0: its 4 other blocks in use, only the cached 4 free
    sched = Scheduler(Sched(max_num_seqs=4, max_num_batched_tokens=64, watermark_blocks=0), bm, max_model_len=64,
                      eos_token_ids=frozenset())
    sched.add(Sequence("r", prompt, GREEDY, cache_root=ROOT))
    out = sched.schedule()
    (chunk,) = out.chunks
    assert chunk.start == 0 and {bm.partition_of(b) for b in chunk.seq.block_table} == {1}
    bm.free(held)


def test_the_index_counts_a_block_held_while_any_tier_holds_it():
    from pdpipe.kv_events import BlockRemoved, BlockStored, KVEventBatch
    from pdpipe.scheduler.cache_index import CacheIndex

    index = CacheIndex()
    chain = hashes(1, 2)
    index.apply("d", KVEventBatch(1.0, [BlockStored(chain, None, [], 4),
                                        BlockStored(chain[1:], None, [], 4, medium="CPU")]))
    index.apply("d", KVEventBatch(2.0, [BlockRemoved(chain[1:])]))  # evicted from the device, kept on the host
    assert index.hit_blocks("d", chain, 2) == 2
    index.apply("d", KVEventBatch(3.0, [BlockRemoved(chain[1:], medium="CPU")]))
    assert index.hit_blocks("d", chain, 2) == 1


def reserve_after_eviction(engine) -> tuple[int, int]:
    """Fills a 12-block pool's cache, then reserves room that evicts cached blocks to the host tier: the
    copies must be done on every rank before the reservation is answered (the transfer writes next)."""
    serve(engine, [make_prompts(384, lengths=(64,), seed=41)[0]])
    before = engine.blocks.host_blocks_out
    held = engine.reserve("r", 80)
    assert held is not None
    engine.cancel_reservation("r")
    return before, engine.blocks.host_blocks_out


def test_a_reservation_that_evicts_to_the_host_settles_on_every_rank(model_dir, tmp_path):
    from parallel_ranks import engine_rank, on_two_ranks

    tiered = {"cache": CacheConfig(block_size=8, num_blocks=12, host_kv_cache_mb=1)}
    [(_, (before, after))] = on_two_ranks(engine_rank, tmp_path, [(str(model_dir("qwen3")), 12, tiered,
                                                                    reserve_after_eviction)], 1)
    assert after > before  # copies ran (and every rank met after them: rank 0 would hang otherwise)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["out", "in"]), st.integers(0, 7), st.integers(0, 5)), max_size=40),
       st.integers(1, 4))
def test_the_host_tiers_batched_copies_leave_what_copies_one_by_one_do(ops, most_blocks):
    """Copies in any order, blocks repeated (a device block copied out, then refilled from the host; a host
    block read, then overwritten), batches of at most a few blocks: both pools end as copying each block on
    its own, in order, leaves them."""
    from types import SimpleNamespace

    from pdpipe.engine.host_tier import HostTier

    kv = torch.randn(3, 2, 8, 4, 2, 5)  # layers, K/V, blocks, block size, heads, head dim
    block_bytes = kv[:, :, 0].numel() * kv.element_size()
    tier = HostTier(SimpleNamespace(data=kv.clone()), 6, staging_bytes=most_blocks * block_bytes)
    tier.data.copy_(torch.randn_like(tier.data))
    want_kv, want_host = kv.clone(), tier.data.clone()
    copies = [(kind, a, b) if kind == "out" else (kind, b, a) for kind, a, b in ops]  # (kind, src, dst)
    for kind, src, dst in copies:
        if kind == "out":
            want_host[dst] = want_kv[:, :, src]
        else:
            want_kv[:, :, dst] = want_host[src]
    tier.run(copies)
    assert torch.equal(tier.kv, want_kv) and torch.equal(tier.data, want_host)
