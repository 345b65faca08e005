"""Data-parallel attention with the experts split by id, on CPU (gloo, the CPU twin of NCCL): each rank
of an instance serves its own sequences from its own KV pool and only the MoE layers exchange tokens;
an instance of two such ranks must generate what one engine does, its pools must never mix, and the
settings it needs are checked by name."""
import pytest
from parallel_ranks import BLOCK, PROMPT, engine_rank, on_two_ranks, run_requests

from pdpipe.config import CacheConfig, EngineConfig, InstanceConfig, SchedulerConfig
from pdpipe.engine.block_manager import BlockError, BlockManager
from pdpipe.engine.scheduler import Scheduler
from pdpipe.engine.sequence import Sequence
from pdpipe.messages import SamplingParams
from pdpipe.models.parallel import check_splittable
from pdpipe.models.spec import load_spec

MOE_ARCHS = ("ernie4_5_moe", "qwen3_moe", "mixtral")


def test_a_partitioned_pool_keeps_each_table_in_one_partition():
    bm = BlockManager(num_blocks=8, block_size=4, partitions=2)
    a = bm.allocate(3)  # the emptiest partition (a tie: the first)
    b = bm.allocate(2)  # now partition 1 has more free
    assert {bm.partition_of(i) for i in a} == {0} and {bm.partition_of(i) for i in b} == {1}
    assert bm.ensure_capacity(a, 16) and {bm.partition_of(i) for i in a} == {0} and len(a) == 4
    assert not bm.ensure_capacity(a, 17)  # partition 0 is full, though partition 1 has 2 free
    assert bm.num_free_blocks == 2 and bm.can_allocate(2) and not bm.can_allocate(3)
    with pytest.raises(BlockError, match="asked for 1 blocks, 0 free"):
        bm.allocate(1, partition=0)
    bm.free(a)
    bm.free(b)
    assert bm.all_free()
    with pytest.raises(ValueError, match="partitions must divide"):
        BlockManager(num_blocks=9, block_size=4, partitions=2)


def running_on_two_ranks(pool_blocks: int, seqs: list[tuple[int, int, int]]) -> tuple[Scheduler, BlockManager]:
    """A scheduler over two ranks' pools of `pool_blocks` blocks of 4 tokens, running s0, s1, ... given
    as (tokens, rank, blocks held): each decodes its last token next."""
    blocks = BlockManager(num_blocks=2 * pool_blocks, block_size=4, partitions=2)
    sched = Scheduler(SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=64), blocks, max_model_len=16,
                      eos_token_ids=frozenset())
    params = SamplingParams(max_tokens=8, ignore_eos=True)
    for i, (n, rank, count) in enumerate(seqs):
        tokens = list(range(1, n + 1))
        sched.add_running(Sequence(f"s{i}", tokens[:-1], params, arrival=i, token_ids=tokens, num_computed_tokens=n - 1,
                                   block_table=blocks.allocate(count, partition=rank)))
    return sched, blocks


def test_a_sequence_short_of_blocks_preempts_on_its_own_rank_only():
    """Two ranks' pools of 3 blocks, each full: when the oldest sequence (rank 0) needs a block, the
    newest sequence *of rank 0* is preempted, not the newest overall (on rank 1, whose blocks would not
    help it)."""
    sched, blocks = running_on_two_ranks(3, [(9, 0, 2), (4, 1, 1), (4, 0, 1), (4, 1, 1)])  # s0 needs a 3rd block
    out = sched.schedule()
    assert [s.request_id for s in out.preempted] == ["s2"]  # s3 is newer, but on rank 1
    assert [c.seq.request_id for c in out.chunks] == ["s0", "s1", "s3"]
    assert {blocks.partition_of(b) for b in sched.running[0].block_table} == {0}


def test_a_sequence_that_gives_way_on_its_rank_leaves_the_other_ranks_scheduled():
    """Rank 0's pool is full and its newest sequence needs a block: it is preempted, and the sequence of
    rank 1 after it still runs this step."""
    sched, _ = running_on_two_ranks(4, [(9, 0, 3), (4, 1, 1), (5, 0, 1), (4, 1, 1)])  # s2 needs a 2nd block
    out = sched.schedule()
    assert [s.request_id for s in out.preempted] == ["s2"]
    assert [c.seq.request_id for c in out.chunks] == ["s0", "s1", "s3"]


def test_prompt_steps_replay_every_ranks_prefill_graph_of_one_size(model_dir):
    """A step of whole prompts spread over two ranks: each rank's inputs to its prefill graph of one
    token count (the smallest graph holding the larger share; the other rank pads), KV slots in its
    own pool, the logits gathered rank 0 first in the order of the sampling sequences — or no graph
    when a share is not whole prompts. The layout the GPU graphs replay, checked without them (the
    graphs' replay returns row numbers, the gather adds 100 for rank 1)."""
    from types import SimpleNamespace

    import torch

    from pdpipe.engine.data_parallel import DataParallelRunner
    from pdpipe.engine.graphs import PrefillGraphs
    from pdpipe.engine.kv_cache import KVCache
    from pdpipe.engine.layout import EagerShares, PrefillShares
    from pdpipe.engine.scheduler import ScheduledChunk, SchedulerOutput
    from pdpipe.models.loader import load_model

    per_rank, block = 8, 4
    model = load_model(model_dir("ernie4_5_moe"))
    tp = SimpleNamespace(size=2, rank=0, all_gather_rows=lambda x: torch.cat([x, x + 100]))
    runner = DataParallelRunner(model, KVCache(model.spec, per_rank, block, torch.float32), 64, tp=tp)
    graphs = PrefillGraphs.__new__(PrefillGraphs)  # its layout, without a GPU to capture on
    graphs.sizes, graphs.block_size, graphs.context_graphs = [32, 64, 96], block, {}  # whole prompts' graphs only
    graphs.replay = lambda size, inputs: torch.arange(PrefillGraphs.MAX_SEQS, dtype=torch.float32)[:, None]
    runner.prefill_graphs = graphs
    params = SamplingParams(max_tokens=4)

    def chunk(name: str, n: int, table: list[int], start: int = 0, length: int = 0) -> ScheduledChunk:
        tokens = list(range(1, (length or n) + 1))
        seq = Sequence(name, tokens, params, token_ids=tokens, block_table=table)
        return ScheduledChunk(seq, start, n)

    # rank 0: a 10-token prompt and the first 7 tokens of a 20-token one; rank 1: one 30-token prompt
    a, b = chunk("a", 10, [1, 2, 3]), chunk("b", 7, [4, 5, 6, 7, 0], length=20)
    c = chunk("c", 30, [8 + i for i in range(8)])
    step, seqs = runner.plan(SchedulerOutput(chunks=[c, a, b]))
    assert isinstance(step, PrefillShares) and step.size == 32 and step.counts == [1, 1]
    assert [s.request_id for s in seqs] == ["a", "c"]
    zero, one = step.inputs
    assert zero["cu"].tolist()[:3] == [0, 10, 17] and one["cu"].tolist()[:2] == [0, 30]
    assert len(zero["ids"]) == len(one["ids"]) == 32 and (zero["slots"][17:] == -1).all()
    assert zero["slots"][:10].tolist() == [4 + i for i in range(10)]  # blocks 1-3 of rank 0's pool
    assert one["slots"][:30].tolist() == list(range(30))  # blocks 8-15: rank 1's pool's 0-7
    assert zero["rows"][:1].tolist() == [9] and one["rows"][:1].tolist() == [29]
    announced: list[int] = []
    logits = runner.run(step, announced.append)
    layers = model.spec.num_layers
    assert logits[:, 0].tolist() == [0.0, 100.0] and announced == list(range(layers))  # a's row, then c's
    step, seqs = runner.plan(SchedulerOutput(chunks=[a]))  # rank 1: nothing
    assert isinstance(step, PrefillShares) and step.size == 32 and step.counts == [1, 0]
    assert [s.request_id for s in seqs] == ["a"]
    assert step.inputs[1]["cu"].tolist() == [0] * 17 and (step.inputs[1]["slots"] == -1).all()  # padding only
    assert runner.run(step)[:, 0].tolist() == [0.0]
    b.start, b.num_tokens = 7, 13  # the rest of b: a chunk with context runs eagerly
    step, _ = runner.plan(SchedulerOutput(chunks=[b, c]))
    assert isinstance(step, EagerShares) and len(step.layouts[0].ids) == len(step.layouts[1].ids) == 30


def serve(engine) -> dict:
    """Three requests batched (spread over the ranks: steps where the ranks hold different token
    counts), then one alone (a rank with nothing to attend to follows along); greedy and seeded. The
    tokens, and the pools (partitions) the requests' blocks came from."""
    from pdpipe.messages import SamplingParams

    for i, n in enumerate((30, 9, 17)):  # as run_requests
        params = SamplingParams(max_tokens=6, temperature=0.8 if i == 2 else 0.0, seed=11, ignore_eos=True)
        engine.add_request(f"r{i}", PROMPT[:n], params)
    tokens: dict[str, list[int]] = {}
    pools = set()
    for alone in (True, False):
        while engine.has_unfinished():
            for out in engine.step():
                tokens.setdefault(out.request_id, []).extend(out.token_ids)
            pools |= {engine.blocks.partition_of(s.block_table[0]) for s in engine.scheduler.running}
        if alone:
            engine.add_request("alone", PROMPT[:13], SamplingParams(max_tokens=5, temperature=0.0, ignore_eos=True))
    assert engine.leak_free()
    return {"tokens": tokens, "pools": sorted(pools), "partition_size": engine.blocks.partition_size}


def test_data_parallel_attention_on_two_ranks_generates_what_one_engine_does(model_dir, tmp_path):
    """Each MoE architecture on two ranks of data-parallel attention (32 blocks a rank, scheduled by
    rank 0 as one 64-block pool of two partitions): the tokens of one whole engine, and no block left."""
    from pdpipe.engine.engine import LLMEngine

    dirs = [str(model_dir(arch)) for arch in MOE_ARCHS]
    data_parallel = {"expert_parallel": True, "data_parallel_attention": True}
    got = dict(on_two_ranks(engine_rank, tmp_path, [(d, 32, data_parallel, serve) for d in dirs], len(dirs)))
    for d in dirs:
        whole = LLMEngine(EngineConfig(model=d, cache=CacheConfig(block_size=BLOCK, num_blocks=64)))
        assert got[d]["tokens"] == serve(whole)["tokens"], d
        assert got[d]["partition_size"] == 32 and got[d]["pools"] == [0, 1]


def _fail_rank1_once(engine, rank: int) -> None:
    """Rank 1's third forward pass raises (a fault of one of its own sequences)."""
    if rank != 1:
        return
    real, calls = engine.runner.forward, []

    def forward(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("a kernel fault on rank 1 (simulated)")
        return real(*args, **kwargs)
    engine.runner.forward = forward


def _serve_or_report(engine):
    try:
        return serve(engine)
    except Exception as exc:  # noqa: BLE001 — what the test wants to see
        return f"raised {type(exc).__name__}"


def test_a_step_failing_on_one_rank_ends_the_group_instead_of_hanging(model_dir, tmp_path):
    """With data-parallel attention the ranks run other sequences, so a step may fail on one rank only:
    that rank ends (the launcher restarts the group) and rank 0's step raises, instead of rank 0 retrying
    the batch while rank 1 waits for the next step (two ranks in different collectives: a hang)."""
    import multiprocessing as mp
    import queue

    work = [(str(model_dir("ernie4_5_moe")), 32, {"expert_parallel": True, "data_parallel_attention": True},
             _serve_or_report, _fail_rank1_once)]
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    ranks = [ctx.Process(target=engine_rank, args=(r, 2, str(tmp_path / "store"), work, results)) for r in range(2)]
    for p in ranks:
        p.start()
    model, outcome = results.get(timeout=120)
    assert outcome.startswith("raised")
    ranks[1].join(timeout=60)
    assert ranks[1].exitcode == 1
    ranks[0].join(timeout=60)
    with pytest.raises(queue.Empty):
        results.get(timeout=0.1)


def test_a_failed_step_ends_a_data_parallel_rank_0_where_a_lone_engine_serves_on(model_dir):
    """A step that raises fails its requests; a lone engine then serves on, but rank 0 of a data-parallel
    instance ends (the launcher restarts its group: the other ranks may sit in the step's collectives)."""
    from pdpipe.engine.engine import LLMEngine
    from pdpipe.engine.worker import EngineWorker

    engine = LLMEngine(EngineConfig(model=str(model_dir("llama")), cache=CacheConfig(block_size=BLOCK, num_blocks=32)))
    sent: list = []
    worker = EngineWorker("mixed-0", "mixed", engine, lambda dest, msg: sent.append(msg))

    def execute(*args, **kwargs):
        raise RuntimeError("a kernel fault (simulated)")
    engine.runner.execute = execute
    params = SamplingParams(max_tokens=4, temperature=0.0)
    engine.add_request("lone", PROMPT[:9], params)
    worker.step()  # no exception: the request failed, the engine goes on
    assert not engine.has_unfinished() and any("a kernel fault" in str(m) for m in sent)
    engine.data_parallel = True  # what an engine of data-parallel ranks has
    engine.add_request("ranked", PROMPT[:9], params)
    with pytest.raises(RuntimeError, match="a kernel fault"):
        worker.step()


def test_a_launched_data_parallel_instance_serves_what_one_engine_does(model_dir):
    """`tp = 2` with data-parallel attention on a mixed instance: the OpenAI API answers concurrent
    requests with one engine's tokens; every block free after."""
    from concurrent.futures import ThreadPoolExecutor

    import httpx
    from pipeline_launch import launched, leak_free, make_launch_config, wait_until

    from pdpipe.engine.engine import LLMEngine

    model = model_dir("ernie4_5_moe")
    expected = run_requests(LLMEngine(EngineConfig(model=str(model), cache=CacheConfig(block_size=8, num_blocks=64))))
    cfg = make_launch_config(model, [], num_blocks=32, instances=(
        InstanceConfig("mixed", tp=2, expert_parallel=True, data_parallel_attention=True),))
    with launched(cfg) as launcher:
        def complete(n: int) -> list[int]:
            body = {"model": "ernie4_5_moe", "prompt": PROMPT[:n], "max_tokens": 6, "temperature": 0,
                    "ignore_eos": True,
                    "return_token_ids": True}
            resp = httpx.post(f"http://127.0.0.1:{cfg.api.port}/v1/completions", json=body, timeout=60)
            assert resp.status_code == 200, resp.text
            return resp.json()["choices"][0]["token_ids"]

        with ThreadPoolExecutor(4) as pool:
            answers = list(pool.map(complete, (30, 9, 30, 9)))
        assert answers == [expected["r0"], expected["r1"]] * 2
        assert wait_until(lambda: leak_free(launcher), what="every block free")


@pytest.mark.parametrize("prefill, decode", [("dp", "dp"), ("dp", "tp1"), ("tp2", "dp")])
def test_disaggregated_data_parallel_instances_generate_what_one_engine_does(model_dir, prefill, decode):
    """1P+1D launched where either side (or both) runs data-parallel attention on two ranks: each
    request's prompt KV lives in one prefill rank's pool and moves, whole heads, into one decode rank's
    (or from a TP2 prefill's head halves into a decode rank's whole heads); concurrent requests spread
    over the ranks; the tokens of one colocated engine, nothing left allocated."""
    from concurrent.futures import ThreadPoolExecutor

    import httpx
    from pipeline_launch import launched, leak_free, make_launch_config, wait_until

    from pdpipe.engine.engine import LLMEngine

    model = model_dir("ernie4_5_moe")
    expected = run_requests(LLMEngine(EngineConfig(model=str(model), cache=CacheConfig(block_size=8, num_blocks=64))))
    side = {"dp": dict(tp=2, expert_parallel=True, data_parallel_attention=True), "tp1": dict(tp=1),
            "tp2": dict(tp=2)}
    cfg = make_launch_config(model, [], num_blocks=32, instances=(
        InstanceConfig("prefill", **side[prefill]), InstanceConfig("decode", **side[decode])))
    with launched(cfg) as launcher:
        def complete(n: int) -> list[int]:
            body = {"model": "ernie4_5_moe", "prompt": PROMPT[:n], "max_tokens": 6, "temperature": 0,
                    "ignore_eos": True, "return_token_ids": True}
            resp = httpx.post(f"http://127.0.0.1:{cfg.api.port}/v1/completions", json=body, timeout=60)
            assert resp.status_code == 200, resp.text
            return resp.json()["choices"][0]["token_ids"]

        with ThreadPoolExecutor(4) as pool:
            answers = list(pool.map(complete, (30, 9, 30, 9, 30, 9)))
        assert answers == [expected["r0"], expected["r1"]] * 3
        assert wait_until(lambda: leak_free(launcher), what="every block free")
        assert launcher.children and all(c.popen.poll() is None for c in launcher.children)


def test_data_parallel_attention_is_refused_where_it_cannot_run(model_dir):
    with pytest.raises(ValueError, match="data_parallel_attention: needs expert_parallel"):
        EngineConfig(data_parallel_attention=True)
    with pytest.raises(ValueError, match="data_parallel_attention: the model has no routed experts"):
        check_splittable(load_spec(model_dir("llama")), 2, expert_parallel=True, data_parallel_attention=True)
    from pipeline_launch import make_launch_config

    with pytest.raises(ValueError, match="instances.data_parallel_attention: mixed-0 needs expert_parallel"):
        make_launch_config(model_dir("ernie4_5_moe"), [], instances=(
            InstanceConfig("mixed", tp=2, data_parallel_attention=True),))


def test_quantized_weights_under_data_parallel_attention_generate_what_one_quantized_engine_does(model_dir,
                                                                                                 tmp_path):
    """ERNIE MoE, wint4 (dense int8, experts int4): each rank quantizes the whole model but keeps its own
    experts (quantized where kept), and the two ranks generate what one quantized engine does."""
    from pdpipe.engine.engine import LLMEngine

    d = str(model_dir("ernie4_5_moe"))
    fields = {"expert_parallel": True, "data_parallel_attention": True, "quantization": "wint4"}
    [(_, got)] = on_two_ranks(engine_rank, tmp_path, [(d, 32, fields, serve)], 1)
    whole = LLMEngine(EngineConfig(model=d, quantization="wint4", cache=CacheConfig(block_size=BLOCK, num_blocks=64)))
    assert got["tokens"] == serve(whole)["tokens"] and got["pools"] == [0, 1]
