"""Remote hits: a prefill instance copies the prompt blocks its decode instance (or another instance, which
lends them) caches instead of computing them (the transfer pulls them, `PullStart` → `Pulled`). The transfer
worker's side with a fake backend, the engine's waiting sequence on its own, and the pipeline when a pull
fails or its request ends mid-copy."""
import pytest
from conftest import make_prompts
from local_pipeline import LocalPipeline

from pdpipe.config import RoutingConfig, SchedulerConfig
from pdpipe.engine.block_manager import BlockManager
from pdpipe.engine.scheduler import Scheduler
from pdpipe.engine.sequence import Sequence
from pdpipe.messages import (
    AbortRequest,
    AbortTransfer,
    DecodeBlocks,
    DropAll,
    Free,
    KVLanded,
    LayersReady,
    LendBlocks,
    LentBlocks,
    PrefillDone,
    Pulled,
    PullStart,
    ReturnBlocks,
    SamplingParams,
    TransferStart,
)
from pdpipe.transfer.base import FakeTransfer
from pdpipe.transfer.worker import TransferWorker


def make_transfer():
    backend, sent = FakeTransfer(), []
    return TransferWorker("transfer", backend, 2, lambda dest, msg: sent.append((dest, msg))), backend, sent


def pulled(sent) -> list[tuple[str, str, int]]:
    return [(dest, m.request_id, m.blocks) for dest, m in sent if isinstance(m, Pulled)]


def frees(sent) -> list[str]:
    return [dest for dest, m in sent if isinstance(m, Free)]


CACHED = DecodeBlocks(request_id="r", instance="d", block_ids=[30, 31], skip=4, held_ids=[10, 11, 12, 13])


@pytest.mark.parametrize("blocks_first", [True, False])
def test_a_pull_copies_decodes_cached_blocks_whichever_message_comes_first(blocks_first):
    """The prefill instance holds the prompt's first 2 blocks and waits for blocks 2-3 (its 7 and 8): decode
    holds all 4 cached (ids 10-13). Both layers of 12, 13 → 7, 8 move in one call; the prefill instance hears 2
    came. Decode's blocks stay known for the prompt's own transfer, which then moves only what decode lacks."""
    worker, backend, sent = make_transfer()
    pull = PullStart(request_id="r", instance="p", block_ids=[7, 8], first=2)
    for msg in ([CACHED, pull] if blocks_first else [pull, CACHED]):
        worker.handle(msg)
    assert backend.batches == [(["r"], 0), (["r"], 1)] and pulled(sent) == [("p", "r", 2)]
    assert worker.blocks_pulled == 2 and not worker.pulls and not worker.has_work()
    worker.handle(TransferStart(request_id="r", src_instance="p", src_block_ids=[5, 6, 7, 8, 9, 4],
                                dst_instance="d"))
    worker.handle(LayersReady(request_ids=["r"], layer=1, count=2))
    worker.handle(PrefillDone(request_id="r", first_token=3))
    assert worker.blocks_sent == 2 and worker.blocks_skipped == 4
    assert [d for d, m in sent if isinstance(m, KVLanded)] == ["d"]


def test_a_pull_takes_what_decodes_cache_reaches_and_nothing_where_it_reaches_nothing():
    worker, backend, sent = make_transfer()
    worker.handle(PullStart(request_id="r", instance="p", block_ids=[7, 8, 9], first=2))
    worker.handle(CACHED)  # decode holds blocks 0-3: 2 and 3 of the 3 asked for
    worker.handle(PullStart(request_id="s", instance="p", block_ids=[5], first=0))
    worker.handle(DecodeBlocks(request_id="s", instance="d", block_ids=[1, 2]))  # decode's cache held nothing
    assert pulled(sent) == [("p", "r", 2), ("p", "s", 0)] and backend.batches == [(["r"], 0), (["r"], 1)]


def test_a_failed_pull_leaves_the_prompt_to_the_prefill_instance_once_its_copies_settled():
    """Layer 1's copy cannot start while layer 0's still writes into the prefill instance's blocks: it hears
    none came only once that copy settled."""
    backend, sent = FakeTransfer(refuse={1}), []
    worker = TransferWorker("transfer", backend, 2, lambda dest, msg: sent.append((dest, msg)))
    backend.in_flight.add("r")
    worker.handle(PullStart(request_id="r", instance="p", block_ids=[7, 8], first=2))
    worker.handle(CACHED)
    worker.step()
    assert not pulled(sent) and worker.has_work()
    backend.in_flight.clear()
    worker.step()
    assert pulled(sent) == [("p", "r", 0)] and worker.blocks_pulled == 0 and not worker.has_work()


def test_an_abort_mid_pull_frees_decode_and_answers_the_prefill_instance_once_nothing_copies():
    worker, backend, sent = make_transfer()
    backend.in_flight.add("r")
    worker.handle(PullStart(request_id="r", instance="p", block_ids=[7, 8], first=2))
    worker.handle(CACHED)
    worker.handle(AbortTransfer(request_id="r", decode_instance="d", reason="client gone"))
    assert not pulled(sent) and not frees(sent) and worker.has_work()
    backend.in_flight.clear()
    worker.step()
    assert pulled(sent) == [("p", "r", 0)] and frees(sent) == ["d"] and not worker.has_work()


def test_a_pull_asked_for_after_its_abort_or_waiting_at_it_is_answered_at_once():
    worker, backend, sent = make_transfer()
    worker.handle(PullStart(request_id="a", instance="p", block_ids=[7], first=0))
    worker.handle(AbortTransfer(request_id="a", decode_instance="", reason="deadline"))  # decode never reserved
    worker.handle(AbortTransfer(request_id="b", decode_instance="d", reason="client gone"))
    worker.handle(PullStart(request_id="b", instance="p", block_ids=[7], first=0))
    assert pulled(sent) == [("p", "a", 0), ("p", "b", 0)] and not backend.batches
    assert not worker._pull_waiting and not worker.pulls


def test_drop_all_answers_every_pull_and_frees_every_decode_once():
    worker, backend, sent = make_transfer()
    backend.in_flight.add("r")
    worker.handle(PullStart(request_id="r", instance="p", block_ids=[7, 8], first=2))
    worker.handle(CACHED)
    worker.handle(PullStart(request_id="w", instance="p", block_ids=[3], first=0))
    worker.handle(DropAll(reason="scheduler gone"))
    backend.in_flight.clear()
    worker.step()
    assert sorted(pulled(sent)) == [("p", "r", 0), ("p", "w", 0)] and frees(sent) == ["d"]
    assert not worker.has_work() and not worker.pulls and not worker._pull_waiting and not worker._blocks


# ---- pulls from a lender (another instance's cache) ----------------------------------------------
LENT = LentBlocks(request_id="r", instance="p1", held_ids=[20, 21, 22])


def returned(sent) -> list[tuple[str, str]]:
    return [(dest, m.request_id) for dest, m in sent if isinstance(m, ReturnBlocks)]


@pytest.mark.parametrize("lent_first", [True, False])
def test_a_pull_copies_a_lenders_blocks_and_gives_them_back_once_copied(lent_first):
    """p1 lends the prompt's first 3 blocks (its 20-22); p0 holds block 0 and waits for blocks 1-2 (its 7,
    8). Decode's blocks (it caches nothing) do not answer a lender's pull. Both layers of 21, 22 → 7, 8 move
    at once; p0 hears 2 came and p1 gets its blocks back, but only once the copy has settled."""
    worker, backend, sent = make_transfer()
    backend.in_flight.add("r")
    pull = PullStart(request_id="r", instance="p0", block_ids=[7, 8], first=1, source="p1")
    worker.handle(DecodeBlocks(request_id="r", instance="d", block_ids=[30, 31, 32, 33]))
    for msg in ([LENT, pull] if lent_first else [pull, LENT]):
        worker.handle(msg)
    job = worker.pulls["r"]
    assert (job.src_instance, job.src_block_ids, job.dst_block_ids) == ("p1", [21, 22], [7, 8])
    assert backend.batches == [(["r"], 0), (["r"], 1)] and not pulled(sent) and not returned(sent)
    backend.in_flight.clear()
    worker.step()
    assert pulled(sent) == [("p0", "r", 2)] and returned(sent) == [("p1", "r")] and worker.blocks_pulled == 2
    assert not worker._lent and not worker.has_work()


def test_a_pull_that_needs_none_of_the_lenders_blocks_gives_them_back_at_once():
    """The prefill instance's own cache held what was lent (an empty pull), or the lender held nothing (no
    word back for it), or held fewer blocks than the pull starts at."""
    worker, backend, sent = make_transfer()
    worker.handle(LENT)
    worker.handle(PullStart(request_id="r", instance="p0", block_ids=[], first=3, source="p1"))
    worker.handle(LentBlocks(request_id="s", instance="p1", held_ids=[]))
    worker.handle(PullStart(request_id="s", instance="p0", block_ids=[4], first=0, source="p1"))
    worker.handle(PullStart(request_id="t", instance="p0", block_ids=[5], first=2, source="p1"))
    worker.handle(LentBlocks(request_id="t", instance="p1", held_ids=[9, 10]))
    assert pulled(sent) == [("p0", "r", 0), ("p0", "s", 0), ("p0", "t", 0)] and not backend.batches
    assert returned(sent) == [("p1", "r"), ("p1", "t")] and not worker._lent and not worker._pull_waiting


def test_a_lenders_blocks_go_back_after_an_abort_however_late_they_come():
    """Aborted mid-copy: back once nothing reads them. Aborted before they were lent: back as they come.
    Aborted while the pull waits for them: the prefill instance hears at once, the lender as they come."""
    worker, backend, sent = make_transfer()
    backend.in_flight.add("r")
    worker.handle(PullStart(request_id="r", instance="p0", block_ids=[7, 8], first=1, source="p1"))
    worker.handle(LENT)
    worker.handle(AbortTransfer(request_id="r", decode_instance="d", reason="client gone"))
    assert not returned(sent) and worker.has_work()
    backend.in_flight.clear()
    worker.step()
    assert returned(sent) == [("p1", "r")] and pulled(sent) == [("p0", "r", 0)]
    worker.handle(AbortTransfer(request_id="a", decode_instance="d", reason="deadline"))
    worker.handle(LentBlocks(request_id="a", instance="p1", held_ids=[3]))
    worker.handle(PullStart(request_id="w", instance="p0", block_ids=[4], first=0, source="p1"))
    worker.handle(AbortTransfer(request_id="w", decode_instance="d", reason="deadline"))
    worker.handle(LentBlocks(request_id="w", instance="p1", held_ids=[3]))
    assert returned(sent) == [("p1", "r"), ("p1", "a"), ("p1", "w")] and ("p0", "w", 0) in pulled(sent)
    assert not worker._lent and not worker.pulls and not worker._pull_waiting and not worker.has_work()


GONE = LentBlocks(request_id="r", instance="p1", held_ids=[])  # the lender held none, or (the scheduler) is gone
PULL = PullStart(request_id="r", instance="p0", block_ids=[7, 8], first=1, source="p1")


@pytest.mark.parametrize("order, got", [
    ("lent pull gone settle", 2),  # a copy reading the blocks: a word of none leaves it alone
    ("pull gone lent", 0),  # answered with none: the late lend goes back at once
    ("lent pull settle gone", 2),  # copied and given back: the late word changes nothing
    ("gone pull lent", 0),
    ("lent gone pull", 0),  # not read yet: the lend goes back, the pull is answered with none
])
def test_a_lend_and_a_word_of_none_in_any_order_leave_nothing_lent_or_waiting(order, got):
    """The lender's LentBlocks, the scheduler's word that the lender is gone (an empty LentBlocks; the lender
    may be frozen and thaw with the blocks still held) and the prefill instance's pull, in any order: the pull
    is answered once, the lent blocks go back exactly once, and nothing is left behind."""
    worker, backend, sent = make_transfer()
    backend.in_flight.add("r")
    for step in order.split():
        if step == "settle":
            backend.in_flight.clear()
            worker.step()
        else:
            worker.handle({"lent": LENT, "gone": GONE, "pull": PULL}[step])
    backend.in_flight.clear()
    worker.step()
    assert pulled(sent) == [("p0", "r", got)] and returned(sent) == [("p1", "r")]
    assert not worker._lent and not worker.pulls and not worker._pull_waiting and not worker.has_work()


def test_drop_all_gives_every_lenders_blocks_back():
    worker, backend, sent = make_transfer()
    backend.in_flight.add("r")
    worker.handle(LENT)
    worker.handle(PullStart(request_id="r", instance="p0", block_ids=[7, 8], first=1, source="p1"))
    worker.handle(LentBlocks(request_id="q", instance="p2", held_ids=[5]))  # its pull not asked for yet
    worker.handle(DropAll(reason="scheduler gone"))
    backend.in_flight.clear()
    worker.step()
    assert sorted(returned(sent)) == [("p1", "r"), ("p2", "q")] and pulled(sent) == [("p0", "r", 0)]
    assert not worker._lent and not worker.has_work()


def test_an_engine_lends_its_cached_prompt_blocks_until_they_come_back(model_dir):
    """A lent block is held (not free, not evictable; the leak oracle sees it) and lent once however often
    asked; it is the prompt's leading cached run, at most the blocks asked for and never the last token's.
    Given back, or dropped with everything else (DropAll), the engine is leak-free again."""
    from pdpipe.config import CacheConfig, EngineConfig
    from pdpipe.engine.engine import LLMEngine
    from pdpipe.engine.worker import EngineWorker

    engine = LLMEngine(EngineConfig(model=str(model_dir("llama")), cache=CacheConfig(block_size=8, num_blocks=16)))
    sent = []
    worker = EngineWorker("p1", "prefill", engine, lambda d, m: sent.append((d, m)))
    prompt = make_prompts(384, lengths=(40,), seed=21)[0]
    engine.add_request("warm", prompt, SamplingParams(max_tokens=1))
    while engine.has_unfinished():
        engine.step()
    assert engine.leak_free() and engine.blocks.num_cached_blocks == 5
    lend = LendBlocks(request_id="r", prompt_token_ids=prompt, blocks=9, transfer="transfer")
    worker.handle(lend)
    worker.handle(lend)
    (dest, first), (_, again) = [(d, m) for d, m in sent if isinstance(m, LentBlocks)]
    assert dest == "transfer" and len(first.held_ids) == 4 and again.held_ids == first.held_ids  # 39 of 40 at most
    assert not engine.leak_free() and engine.blocks.num_evictable_blocks == 1
    worker.handle(LendBlocks(request_id="s", prompt_token_ids=prompt[:20] + [1] * 20, blocks=3,
                             transfer="transfer"))
    assert len(sent[-1][1].held_ids) == 2  # what it caches of the other prompt
    worker.handle(LendBlocks(request_id="u", prompt_token_ids=[1] * 40, blocks=3, transfer="transfer"))
    assert sent[-1][1].held_ids == [] and "u" not in engine.lent  # nothing held, nothing to give back
    worker.handle(ReturnBlocks(request_id="r"))
    worker.handle(ReturnBlocks(request_id="r"))  # a second word changes nothing
    assert not engine.leak_free()  # s still holds 2
    worker.handle(DropAll(reason="scheduler gone"))
    assert engine.leak_free() and engine.blocks.num_cached_blocks == 5


# ---- the engine's side ---------------------------------------------------------------------------
def engine_scheduler(num_blocks=8):
    blocks = BlockManager(num_blocks=num_blocks, block_size=4)
    return Scheduler(SchedulerConfig(max_num_batched_tokens=64, watermark_blocks=0), blocks, 1000, frozenset()), blocks


def seq(rid, n, pull=0, max_tokens=8):
    return Sequence(rid, list(range(n)), SamplingParams(max_tokens=max_tokens), pull_blocks=pull, cache_root=b"r")


def test_a_sequence_waits_for_its_pull_computing_nothing_and_then_only_the_rest():
    sched, blocks = engine_scheduler()
    a, b = seq("a", 14, pull=3), seq("b", 5)
    sched.add(a)
    sched.add(b)
    out = sched.schedule()
    assert [c.seq.request_id for c in out.chunks] == ["b"] and sched.take_pulls() == [a]
    assert a.pulling == (0, 3) and len(a.block_table) == 4 and not sched.take_pulls()
    assert sched.has_unfinished()  # b runs
    assert [c.seq.request_id for c in sched.schedule().chunks] == ["b"]  # a still waits
    assert sched.pulled("a", 2)  # 2 of 3 came: the third block is computed here
    assert a.pulling is None and a.num_computed_tokens == 8 and a.num_cached_tokens == 8 == a.num_pulled_tokens
    chunk = next(c for c in sched.schedule().chunks if c.seq is a)
    assert (chunk.start, chunk.num_tokens) == (8, 6) and sched.prefix_hit_tokens_remote == 8
    assert a.num_registered == 2  # the copied blocks are cached here now


def test_a_sequence_waiting_for_its_pull_is_never_preempted_and_keeps_its_blocks_past_its_end():
    """a copies into 4 of the 8 blocks; b grows until blocks run out: b, not a, gives way. a ends (an abort)
    while its copy runs: its blocks stay taken until the copy settles."""
    sched, blocks = engine_scheduler()
    a, b = seq("a", 13, pull=3), seq("b", 14, max_tokens=100)
    sched.add(a)
    sched.schedule()
    sched.add(b)
    sched.schedule()
    assert a.pulling and b.block_table and blocks.num_free_blocks == 0
    b.token_ids += [1, 2, 3]  # b's next tokens need a block: none is free
    b.num_computed_tokens = b.num_tokens - 1
    out = sched.schedule()
    assert out.preempted == [b] and a.pulling and not [c for c in out.chunks if c.seq is a]
    sched.finish(a, "abort")
    assert sched.pull_holds["a"] and blocks.num_free_blocks == 4
    assert sched.pulled("a", 3) and blocks.num_free_blocks == 8 and not sched.pull_holds
    assert not sched.pulled("a", 3)  # a second word changes nothing


# ---- in the pipeline ----------------------------------------------------------------------------
PD = {"prefill-0": "prefill", "decode-0": "decode"}
REPLY = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)


class FailingPulls(FakeTransfer):
    """The pipeline's copies, but pulls fail (or stay in flight while `hold` is set)."""

    def __init__(self, pools):
        super().__init__()
        self.pools_backend, self.hold = pools, False

    def register_pool(self, pool):
        self.pools_backend.register_pool(pool)

    def send_batch(self, jobs, layer, count=1):
        for job in jobs:
            if job.pull:
                job.error = "" if self.hold else "the pull's peer is gone"
            else:
                self.pools_backend.send_batch([job], layer, count)

    def poll(self, job):
        from pdpipe.transfer.base import TransferState

        if job.pull:
            return TransferState.PENDING if self.hold else TransferState.FAILED
        return self.pools_backend.poll(job)


def follow_up(model, caching=True, hold=False, abort=False):
    """Turn 1, then turn 2 over its history (decode caches 6 blocks of it, prefill 5: a pull of 1)."""
    from local_pipeline import TensorPools

    pipe = LocalPipeline(model, PD, prefix_caching=caching,
                         routing=RoutingConfig(disaggregation="always", cache_min_tokens=8, pull_min_tokens=8))
    backend = FailingPulls(TensorPools(pipe.engines))
    backend.hold = hold
    pipe.transfer.backend = backend
    first = make_prompts(384, lengths=(40,), seed=21)[0]
    pipe.submit("t1", first, REPLY)
    pipe.run()
    pipe.submit("t2", first + pipe.tokens("t1") + make_prompts(384, lengths=(9,), seed=22)[0], REPLY)
    if not abort:
        pipe.run()
        return pipe
    for _ in range(5):
        pipe.deliver()
        pipe.step("prefill-0")
    assert pipe.transfer.pulls  # copying
    pipe.send("scheduler", AbortRequest(request_id="t2", reason="client gone"))
    pipe.run()
    assert pipe.engines["prefill-0"].scheduler.pull_holds  # the copy still runs: its blocks stay taken
    backend.hold = False  # the copy ends (failed)
    pipe.transfer.step()
    pipe.run()
    return pipe


def test_a_failed_pull_is_computed_on_the_prefill_instance_with_the_same_tokens(model_dir):
    plain = follow_up(model_dir("llama"), caching=False)
    pipe = follow_up(model_dir("llama"))
    assert pipe.tokens("t2") == plain.tokens("t2") and pipe.cached_tokens("t2") == 40
    assert pipe.transfer.blocks_pulled == 0 and pipe.leak_free()


def test_a_request_ending_mid_pull_frees_every_block_once_the_copy_settles(model_dir):
    pipe = follow_up(model_dir("llama"), hold=True, abort=True)
    assert pipe.state("t2") == "ABORTED" and pipe.leak_free()


def lent_turn(model, caching=True):
    """Two prefill instances. Turn 1 (40 tokens) is computed on one; a long prompt over the same prefix then
    queues there (routed to its cache); decode's cache is emptied. Turn 2 (turn 1's prompt and 9 new tokens)
    goes to the idle prefill instance, which copies turn 1's 5 blocks from the busy one's cache."""
    from pdpipe.messages import ResetPrefixCache

    pipe = LocalPipeline(model, {"prefill-0": "prefill", "prefill-1": "prefill", "decode-0": "decode"},
                         prefix_caching=caching,
                         routing=RoutingConfig(disaggregation="always", cache_min_tokens=8, pull_min_tokens=8))
    first = make_prompts(384, lengths=(40,), seed=21)[0]
    pipe.submit("t1", first, REPLY)
    pipe.run()
    pipe.send("decode-0", ResetPrefixCache())
    pipe.run()
    pipe.scheduler.handle(pipe.workers["decode-0"].stats())  # its heartbeat: its KV events say all cleared
    pipe.run()
    pipe.submit("long", first + make_prompts(384, lengths=(300,), seed=23)[0], REPLY)
    pipe.deliver("scheduler")
    pipe.submit("t2", first + make_prompts(384, lengths=(9,), seed=22)[0], REPLY)
    pipe.run()
    assert pipe.leak_free()
    return pipe


def test_a_prefill_instance_copies_what_another_prefill_instance_caches_and_gives_the_blocks_back(model_dir):
    plain = lent_turn(model_dir("llama"), caching=False)
    pipe = lent_turn(model_dir("llama"))
    computed = {rid: next(d for _, s, i, d in pipe.scheduler.recent[rid].events if s == "PREFILLING")
                for rid in ("t1", "long", "t2")}
    where = {rid: next(i for _, s, i, _ in pipe.scheduler.recent[rid].events if s == "PREFILLING")
             for rid in ("t1", "long", "t2")}
    assert where["long"] == where["t1"] != where["t2"]
    assert computed["t2"] == f"40 of 49 prompt tokens from the prefix cache (40 copied from {where['t1']}'s)"
    assert all(pipe.tokens(rid) == plain.tokens(rid) for rid in ("t1", "long", "t2"))
    assert pipe.cached_tokens("t2") == 40 and pipe.transfer.blocks_pulled == 5
    assert pipe.workers[where["t2"]].stats().prefix_hit_tokens_remote == 40
