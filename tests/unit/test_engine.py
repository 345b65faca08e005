"""The engine core on its own: block manager, admission control, abort, request validation, and moving
a request's KV block by block from one engine to another mid-request."""
import pytest
import torch
from conftest import assert_leak_free, causal_prompt_reference, make_prompts

from pdpipe.config import CacheConfig, EngineConfig, SchedulerConfig
from pdpipe.engine.block_manager import BlockError, BlockManager
from pdpipe.engine.engine import LLMEngine, RequestError
from pdpipe.messages import SamplingParams

GREEDY = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True)


def make_engine(model, num_blocks=64, block_size=8, **sched):
    return LLMEngine(EngineConfig(model=str(model), cache=CacheConfig(block_size=block_size,
                                                                     num_blocks=num_blocks),
                                  scheduler=SchedulerConfig(**sched)))


def run_all(engine, tokens: dict[str, list[int]] | None = None) -> dict[str, list[int]]:
    tokens = {} if tokens is None else tokens
    while engine.has_unfinished():
        for out in engine.step():
            tokens.setdefault(out.request_id, []).extend(out.token_ids)
    return tokens


def test_block_manager_counts_and_refuses_misuse():
    bm = BlockManager(num_blocks=4, block_size=16)
    a = bm.allocate(3)
    assert bm.num_free_blocks == 1 and not bm.can_allocate(2)
    with pytest.raises(BlockError, match="asked for 2 blocks, 1 free"):
        bm.allocate(2)
    bm.share(a[:1])
    bm.free(a)
    assert bm.num_free_blocks == 3  # the shared block is still held once
    bm.free(a[:1])
    assert bm.all_free()
    with pytest.raises(BlockError, match="already free"):
        bm.free(a[:1])
    table = []
    assert bm.ensure_capacity(table, 33) and len(table) == 3
    assert not bm.ensure_capacity(table, 100) and len(table) == 3


def test_queued_requests_wait_for_blocks_and_all_complete(model_dir):
    engine = make_engine(model_dir("llama"), num_blocks=12, block_size=8, max_num_seqs=8)
    prompts = make_prompts(384, lengths=(40, 40, 40, 40))  # 5 blocks each + growth: not all fit at once
    for i, p in enumerate(prompts):
        engine.add_request(str(i), p, GREEDY)
    first = {o.request_id: o.token_ids for o in engine.step()}
    assert len(engine.scheduler.running) == 2 and len(engine.scheduler.waiting) == 2
    tokens = run_all(engine, first)
    assert all(len(t) == 10 for t in tokens.values()) and len(tokens) == 4
    assert_leak_free(engine)


def test_abort_frees_blocks_wherever_the_request_is(model_dir):
    engine = make_engine(model_dir("llama"), num_blocks=16, block_size=8, max_num_seqs=2)
    for i, p in enumerate(make_prompts(384, lengths=(20, 30, 10))):
        engine.add_request(str(i), p, GREEDY)
    tokens = {o.request_id: o.token_ids for o in engine.step()}
    assert engine.abort_request("2").finish_reason == "abort"  # still waiting
    for o in engine.step():
        tokens[o.request_id] += o.token_ids
    assert engine.abort_request("0").finish_reason == "abort"  # decoding
    assert engine.abort_request("missing") is None
    run_all(engine, tokens)
    assert len(tokens["1"]) == 10
    assert_leak_free(engine)


def test_bad_requests_are_refused_without_harming_others(model_dir):
    engine = make_engine(model_dir("llama"), num_blocks=8, block_size=8)
    assert engine.max_model_len == 64
    engine.add_request("ok", [5, 6, 7], GREEDY)
    with pytest.raises(RequestError, match="prompt: is empty"):
        engine.add_request("a", [], GREEDY)
    with pytest.raises(RequestError, match="prompt: 64 tokens; the limit is 63"):
        engine.add_request("b", [5] * 64, GREEDY)
    with pytest.raises(RequestError, match="outside the vocabulary"):
        engine.add_request("c", [5, 10**6], GREEDY)
    with pytest.raises(RequestError, match=r"stop_token_ids: token id 1000000 is outside the vocabulary"):
        engine.add_request("d", [5, 6], SamplingParams(max_tokens=4, min_tokens=2, stop_token_ids=[10**6]))
    with pytest.raises(RequestError, match="already running"):
        engine.add_request("ok", [5], GREEDY)
    assert len(run_all(engine)["ok"]) == 10
    assert_leak_free(engine)


@pytest.mark.parametrize("where", ["forward", "sampling"])
def test_a_request_whose_step_raises_fails_alone(model_dir, where):
    """A batch raises because of one request (in the forward pass, or in sampling after the others'
    seeded draws): that request ends with an "error" output and frees its blocks; the others get the
    tokens they get without it, seeded draws included."""
    prompts = make_prompts(512, lengths=(9, 14, 11), seed=3)
    seeded = SamplingParams(max_tokens=8, temperature=0.9, seed=7, ignore_eos=True)
    reference = make_engine(model_dir("llama"))
    reference.add_request("a", prompts[0], GREEDY)
    reference.add_request("c", prompts[2], seeded)
    expected = run_all(reference)

    engine = make_engine(model_dir("llama"))
    bad = {"b"}
    if where == "forward":
        real = engine.runner.execute

        def execute(sched, *args, **kwargs):
            if any(c.seq.request_id in bad for c in sched.chunks) and len(engine.scheduler.running[0].token_ids) > 12:
                raise RuntimeError("kernel fault (simulated)")
            return real(sched, *args, **kwargs)
        engine.runner.execute = execute
    else:
        real = engine.sampler

        def sampler(logits, seqs):
            samples = real(logits, seqs)  # the others' generators have drawn
            if any(s.request_id in bad for s in seqs) and seqs[0].num_output_tokens >= 2:
                raise IndexError("stop token out of range (simulated)")
            return samples
        engine.sampler = sampler
    engine.add_request("a", prompts[0], GREEDY)
    engine.add_request("b", prompts[1], GREEDY)
    engine.add_request("c", prompts[2], seeded)
    outputs = {}
    while engine.has_unfinished():
        for out in engine.step():
            outputs.setdefault(out.request_id, []).append(out)
    failed = outputs["b"][-1]
    assert failed.finish_reason == "error" and "simulated" in failed.error
    assert {r: [t for o in outs for t in o.token_ids] for r, outs in outputs.items() if r != "b"} == expected
    assert_leak_free(engine)


def test_a_device_fault_is_no_request_s_fault(model_dir):
    """An error that leaves the GPU unusable (every run raises it) is raised out of the step: no request
    is blamed for it, and the engine's process must end (its worker re-raises after failing its
    requests; the launcher starts a new one)."""
    from pdpipe.engine.worker import EngineWorker

    engine = make_engine(model_dir("llama"))
    sent = []
    worker = EngineWorker("decode-0", "mixed", engine, lambda dest, msg: sent.append((dest, msg)))

    def execute(*args, **kwargs):
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    engine.runner.execute = execute
    for i, prompt in enumerate(make_prompts(512, lengths=(5, 6), seed=4)):
        engine.add_request(f"r{i}", prompt, GREEDY)
    with pytest.raises(RuntimeError, match="illegal memory access"):
        worker.step()
    failed = sorted(m.request_id for _, m in sent if getattr(m, "state", "") == "FAILED")
    assert failed == ["r0", "r1"]
    assert_leak_free(engine)


def test_a_slow_step_is_logged_with_the_triton_kernels_it_compiled(model_dir, monkeypatch, caplog):
    """A step over the slow mark is logged with its prompt tokens and the Triton kernels whose compiled
    variants grew since the worker started (after the warm-up) or since the last slow step; a slow step
    after which none grew names none. (Counts are faked here: CPU engines run no Triton kernel.)"""
    import logging

    from pdpipe import kernels
    from pdpipe.engine import worker as worker_module

    counts = iter([{"_rms_norm_kernel": 2, "_extend_kernel": 1},
                   {"_rms_norm_kernel": 2, "_extend_kernel": 3, "_moe_sum_kernel": 1},
                   {"_rms_norm_kernel": 2, "_extend_kernel": 3, "_moe_sum_kernel": 1}])
    monkeypatch.setattr(kernels, "compiled_variants", lambda: next(counts))
    monkeypatch.setattr(worker_module, "SLOW_STEP_S", 0.0)
    engine = make_engine(model_dir("llama"))
    worker = worker_module.EngineWorker("mixed-0", "mixed", engine, lambda dest, msg: None)
    engine.add_request("r", make_prompts(512, lengths=(9,), seed=2)[0], GREEDY)
    with caplog.at_level(logging.INFO, logger="pdpipe"):
        worker.step()
        worker.step()
    steps = [r.getMessage() for r in caplog.records if "a step took" in r.getMessage()]
    assert len(steps) == 2 and "(9 prompt tokens;" in steps[0]
    assert steps[0].endswith(": _extend_kernel, _moe_sum_kernel") and "new Triton kernel variants" in steps[0]
    assert "Triton" not in steps[1]


def test_generation_stops_at_max_model_len(model_dir):
    engine = make_engine(model_dir("llama"), num_blocks=4, block_size=4)
    engine.add_request("r", [5] * 10, SamplingParams(max_tokens=50, temperature=0.0, ignore_eos=True))
    outs = []
    while engine.has_unfinished():
        outs += engine.step()
    assert sum(len(o.token_ids) for o in outs) == 6 and outs[-1].finish_reason == "length"
    assert_leak_free(engine)


def test_max_model_len_larger_than_the_pool_is_refused(model_dir):
    with pytest.raises(ValueError, match="max_model_len: 100 exceeds"):
        make_engine(model_dir("llama"), num_blocks=4, block_size=4, max_model_len=100)


@pytest.mark.parametrize("arch", ["llama", "ernie4_5"])
def test_kv_moved_between_engines_continues_identically(model_dir, arch):
    prompt = make_prompts(384, lengths=(37,))[0]
    colocated = make_engine(model_dir(arch))
    colocated.add_request("r", prompt, GREEDY)
    expected = run_all(colocated)["r"]

    prefill, decode = make_engine(model_dir(arch), block_size=8), make_engine(model_dir(arch), block_size=8)
    decode.add_request("busy", make_prompts(384, lengths=(5,), seed=9)[0], GREEDY)  # blocks 0.. in use
    decode.step()
    dst = decode.reserve("r", len(prompt)).blocks
    prefill.add_request("r", prompt, SamplingParams(max_tokens=1, temperature=0.0), hold_kv=True)
    (first,) = prefill.step()
    src = prefill.kv_blocks("r")
    assert first.finish_reason == "length" and len(src) == len(dst) == 5 and src != dst
    for layer in range(prefill.spec.num_layers):  # layer by layer, as the transfer will push them
        decode.kv_cache.import_blocks(dst, prefill.kv_cache.export_blocks(src, layer), layer)
    assert prefill.release_kv("r")
    assert_leak_free(prefill)
    assert decode.add_prefilled("r", prompt, first.token_ids[0], GREEDY) is None
    rest = run_all(decode)["r"]
    assert first.token_ids + rest == expected
    assert_leak_free(decode)


def test_reservations_are_refused_when_full_and_cancellable(model_dir):
    engine = make_engine(model_dir("llama"), num_blocks=4, block_size=8)
    assert engine.reserve("a", 24) is not None
    assert engine.reserve("b", 16) is None
    assert engine.cancel_reservation("a") and not engine.cancel_reservation("a")
    assert_leak_free(engine)



def test_warm_up_runs_every_shape_class_and_leaves_the_engine_empty(model_dir):
    from conftest import make_llm

    llm = make_llm(model_dir("llama"), max_num_batched_tokens=64, num_blocks=64)
    engine, batches = llm.engine, []
    schedule = engine.scheduler.schedule

    def recording():
        out = schedule()
        batches.append([(c.start, c.num_tokens) for c in out.chunks])
        return out

    engine.scheduler.schedule = recording
    engine.warm_up()
    chunks = [c for batch in batches for c in batch]
    assert any(len([c for c in b if c[0] == 0 and c[1] > 1]) > 1 for b in batches)  # prompts together
    assert any(start > 0 and n > 16 for start, n in chunks)  # a continued chunk, long remainder
    assert any(start > 0 and 1 < n <= 16 for start, n in chunks)  # ... and short
    assert any(all(n == 1 for _, n in b) for b in batches if b)  # decode steps
    assert engine.leak_free()
    out = llm.generate([[5, 6, 7]], SamplingParams(max_tokens=2, temperature=0.0))[0]
    assert len(out.token_ids) == 2 and engine.leak_free()


@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (8, 2)])
def test_prompt_attention_without_varlen_matches_reference(monkeypatch, heads, kv_heads):
    """The per-prompt path (torch without varlen flash attention), run on CPU: each prompt sees only its
    own earlier tokens, whatever else is in the batch."""
    import torch

    from pdpipe.models import decoder

    monkeypatch.setattr(decoder, "_VARLEN", ())
    torch.manual_seed(heads)
    bounds = [0, 1, 8, 40, 97]
    q = torch.randn(bounds[-1], heads, 16)
    k, v = torch.randn(2, bounds[-1], kv_heads, 16)
    meta = decoder.AttentionMetadata(slot_mapping=torch.zeros(0), block_tables=torch.zeros(0),
                                     query_start_loc=bounds, seq_lens=[b - a for a, b in zip(bounds, bounds[1:])],
                                     max_query_len=57, fresh=True)
    out = decoder._prompt_attention(q, k, v, meta, 0.3)
    assert torch.allclose(out.double(), causal_prompt_reference(q, k, v, bounds, 0.3), atol=1e-5)



@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_padded_steps_generate_what_unpadded_steps_do(model_dir, arch):
    """Steps rounded up to a multiple of 32 tokens (as on GPU) with rows that belong to no sequence:
    prompts together, chunked prompts beside decodes; same tokens, and the padding writes no block."""
    prompts = make_prompts(384, lengths=(3, 37, 50, 70), seed=2)
    results = []
    for pad in (1, 32):
        engine = make_engine(model_dir(arch), num_blocks=64, block_size=8, max_num_batched_tokens=48)
        engine.runner.pad_tokens = pad
        sizes = []
        place = engine.runner.place

        def recording(lay, place=place, sizes=sizes):
            ids, pos, meta = place(lay)
            sizes.append((ids.shape[0], meta.query_start_loc[-1], meta.slot_mapping[meta.query_start_loc[-1]:]))
            return ids, pos, meta

        engine.runner.place = recording
        for i, p in enumerate(prompts):
            engine.add_request(str(i), p, GREEDY)
        results.append(run_all(engine))
        assert_leak_free(engine)
        padded = [(n, real, tail) for n, real, tail in sizes if n != real]
        if pad == 1:
            assert not padded
        else:
            assert padded and all(n % 32 == 0 and (tail == -1).all() for n, _, tail in padded)
    assert results[0] == results[1]


@pytest.mark.parametrize("arch", ["qwen2", "ernie4_5_moe"])
def test_gemm_warm_up_runs_every_projection_at_every_padded_count(model_dir, monkeypatch, arch):
    """Every layer's projections (a MoE model's dense and routed layers differ) at every padded token
    count and decode row count, each as the model runs it (decoder Linears through kernels.linear, a
    router's gate through torch's), and the LM head's weight (the embedding's where tied) at every row
    count: no live step is the first at a shape (a first 3-sequence prompt step once timed the skinny
    GEMM for the tied head live, 0.6-0.8 s)."""
    from pdpipe import kernels
    from pdpipe.models.layers import Linear

    engine = make_engine(model_dir(arch))
    engine.runner.pad_tokens = 32
    seen: dict[str, set] = {"kernels": set(), "torch": set()}
    torch_linear = torch.nn.functional.linear

    def recording(path, fn):
        def run(x, weight, bias=None):
            seen[path].add((x.shape[0], weight.data_ptr(), tuple(weight.shape), bias is not None))
            return fn(x, weight, bias)
        return run

    monkeypatch.setattr(kernels, "linear", recording("kernels", torch_linear))  # what it runs on CPU, unrecorded
    monkeypatch.setattr(torch.nn.functional, "linear", recording("torch", torch_linear))
    engine.runner.warm_gemms(max_tokens=100, max_rows=5)
    model = engine.runner.model
    mods = [m for layer in model.model.layers for m in layer.modules() if isinstance(m, torch.nn.Linear)]
    gates = {(tuple(m.weight.shape), m.bias is not None) for m in mods if not isinstance(m, Linear)}
    assert bool(gates) == (arch == "ernie4_5_moe")
    gate_ptrs = {m.weight.data_ptr() for m in mods if not isinstance(m, Linear)}
    assert not any(ptr in gate_ptrs for _, ptr, _, _ in seen["kernels"])  # not timed as a skinny GEMM
    for path, shapes in (("kernels", {(tuple(m.weight.shape), m.bias is not None) for m in mods
                                      if isinstance(m, Linear)}), ("torch", gates)):
        for shape, bias in shapes:
            counts = {m for m, _, s, b in seen[path] if (s, b) == (shape, bias)}
            assert counts == {1, 2, 3, 4, 5, 32, 64, 96, 128}, (path, shape)
    tied = model.spec.tie_word_embeddings
    assert tied == (arch == "ernie4_5_moe")
    head = model.model.embed_tokens.weight if tied else model.lm_head.weight
    assert {m for m, ptr, _, _ in seen["kernels"] if ptr == head.data_ptr()} == {1, 2, 3, 4, 5}


def test_prefill_graph_sizes_cover_every_count_with_little_padding():
    from pdpipe.engine.graphs import prefill_graph_sizes

    sizes = prefill_graph_sizes(512)
    assert sizes == [*range(32, 257, 32), 320, 384, 448, 512]
    sizes = prefill_graph_sizes(1000)
    assert sizes[-1] == 1024 and sizes == sorted(set(sizes)) and all(s % 32 == 0 for s in sizes)
    for n in range(1, 1001):
        size = next(s for s in sizes if s >= n)
        assert size - n < 32 or size - n <= n // 4, (n, size)
    assert prefill_graph_sizes(20) == [32]
    sizes = prefill_graph_sizes(8192)
    assert sizes[-1] == 8192 and len(sizes) == 40 and sizes == sorted(set(sizes))
    for n in range(1025, 8193):  # beyond 1k tokens an eighth at most
        size = next(s for s in sizes if s >= n)
        assert size - n < n // 8, (n, size)


def test_prefill_graphs_by_default_hold_more_tokens_for_mixture_of_experts_models():
    from types import SimpleNamespace

    from pdpipe.config import EngineConfig, SchedulerConfig
    from pdpipe.engine.sizing import prefill_graph_limit

    dense, moe = SimpleNamespace(moe=None), SimpleNamespace(moe=object())
    assert prefill_graph_limit(EngineConfig(model="m"), dense) == 512
    assert prefill_graph_limit(EngineConfig(model="m"), moe) == 2048
    assert prefill_graph_limit(EngineConfig(model="m", prefill_graph_tokens=0), moe) == 0
    assert prefill_graph_limit(EngineConfig(model="m", prefill_graph_tokens=300), moe) == 300
    small = EngineConfig(model="m", scheduler=SchedulerConfig(max_num_batched_tokens=1024))
    assert prefill_graph_limit(small, moe) == 1024  # never more than a step holds
    assert prefill_graph_limit(EngineConfig(model="m"), moe, ranks=2) == 1024  # a data-parallel rank's share
    assert prefill_graph_limit(EngineConfig(model="m", prefill_graph_tokens=0), moe, ranks=2) == 0
    with pytest.raises(ValueError, match="prefill_graph_tokens"):
        EngineConfig(model="m", prefill_graph_tokens=-2)


def test_prefill_graph_layout_computes_what_the_eager_step_does(model_dir):
    """A step of whole prompts laid out as a prefill graph reads it (padded rows in no prompt, empty
    prompts after the real ones, sampled rows picked by index): the same logits as the eager step, and
    the padding writes no block. The CPU twin of the GPU graph (same layout, reference kernels)."""
    from pdpipe.engine.graphs import pack_prompts
    from pdpipe.models.decoder import AttentionMetadata

    engine = make_engine(model_dir("llama"), num_blocks=64, block_size=8, max_num_batched_tokens=150)
    prompts = make_prompts(384, lengths=(3, 37, 50, 70), seed=5)
    for i, p in enumerate(prompts):
        engine.add_request(str(i), p, GREEDY)
    out = engine.scheduler.schedule()
    assert [c.start for c in out.chunks] == [0, 0, 0, 0] and out.chunks[-1].samples is False  # the 70 split at 150
    runner = engine.runner
    eager, seqs = runner.execute(out)
    kv_before = engine.runner.kv_cache.data.clone()
    packed = {name: values.tolist() for name, values in pack_prompts(out.chunks, 8, size=192, max_seqs=6).items()}
    cu = packed["cu"]
    assert len(packed["ids"]) == 192 and packed["slots"][out.num_tokens:] == [-1] * (192 - out.num_tokens)
    assert cu[-3:] == [out.num_tokens] * 3 and packed["rows"] == [2, 39, 89, 0, 0, 0]
    bounds = cu[: len(out.chunks) + 1]
    tables = runner.place(runner.layout(out))[2].block_tables
    meta = AttentionMetadata(slot_mapping=torch.tensor(packed["slots"]), block_tables=tables, query_start_loc=bounds,
                             seq_lens=[b - a for a, b in zip(bounds, bounds[1:])])
    model = engine.runner.model
    hidden = model(torch.tensor(packed["ids"]), torch.tensor(packed["pos"]), engine.runner.kv_layers, meta)
    graphed = model.logits(hidden[torch.tensor(packed["rows"][: len(seqs)])])
    torch.testing.assert_close(graphed, eager)
    theirs = {b for c in out.chunks for b in c.seq.block_table}
    others = torch.tensor([b for b in range(64) if b not in theirs])
    assert torch.equal(kv_before[:, :, others], engine.runner.kv_cache.data[:, :, others])


def test_gpu_memory_utilization_sizes_the_pool_from_what_is_left():
    from pdpipe.engine.sizing import kv_room, pool_blocks
    from pdpipe.models.spec import load_spec

    gib = 2**30
    # 80 GiB GPU, 90 %: the weights took 16 GiB, a full step needs 2 more, the graphs up to 1
    assert kv_room(0.9, 80 * gib, 79 * gib, 63 * gib, 2 * gib, reserve=gib) == int(0.9 * 80 * gib) - 16 * gib - 3 * gib
    # another process holds most of the GPU: no more than is free now
    assert kv_room(0.9, 80 * gib, 30 * gib, 14 * gib, 2 * gib, reserve=gib) == 11 * gib
    with pytest.raises(ValueError, match=r"gpu_memory_utilization: 0.2 .* leaves no room for KV"):
        kv_room(0.2, 80 * gib, 79 * gib, 63 * gib, 2 * gib)
    for bad in (1.0, -0.1):
        with pytest.raises(ValueError, match="gpu_memory_utilization"):
            CacheConfig(gpu_memory_utilization=bad)
    from pdpipe.demo import resolve_model

    spec = load_spec(resolve_model(""))
    per_block = 2 * spec.num_layers * 16 * spec.num_kv_heads * spec.head_dim * 4
    cfg = EngineConfig(cache=CacheConfig(block_size=16, kv_cache_mb=1))
    assert pool_blocks(spec, cfg, gpu_room=100 * per_block + 5) == 100
    assert pool_blocks(spec, cfg) == 2**20 // per_block
    assert pool_blocks(spec, EngineConfig(cache=CacheConfig(num_blocks=7)), gpu_room=100 * per_block) == 7


def test_prefill_graph_layout_of_chunks_after_a_cache_hit_computes_what_the_eager_step_does(model_dir):
    """Chunks that start after cached tokens (a prefix-cache hit, an earlier chunk), laid out as the
    prefill graphs' context variant reads them (positions and slots from each chunk's start, its length
    after the chunk, its block table): the same logits as the eager step. The CPU twin of the GPU graph."""
    from pdpipe.engine.graphs import pack_prompts
    from pdpipe.models.decoder import AttentionMetadata

    engine = make_engine(model_dir("llama"), num_blocks=64, block_size=8, max_num_batched_tokens=150)
    head = make_prompts(384, lengths=(40,), seed=6)[0]
    engine.add_request("seed", head + [5], GREEDY)
    run_all(engine)
    for i, tail in enumerate(make_prompts(384, lengths=(9, 30), seed=7)):
        engine.add_request(str(i), head + tail, GREEDY)
    out = engine.scheduler.schedule()
    assert [c.start for c in out.chunks] == [40, 40]  # both hit the cached head
    runner = engine.runner
    eager, seqs = runner.execute(out)
    packed = pack_prompts(out.chunks, 8, size=64, max_seqs=4, context=True)
    cu, lens = packed["cu"].tolist(), packed["lens"].tolist()
    assert cu == [0, 9, 39, 39, 39] and lens == [49, 70, 0, 0] and packed["pos"][:2].tolist() == [40, 41]
    tables = torch.zeros(4, 9, dtype=torch.int32)
    for i, table in enumerate(packed["tables"]):
        tables[i, : len(table)] = torch.tensor(table, dtype=torch.int32)
    meta = AttentionMetadata(slot_mapping=torch.tensor(packed["slots"]), block_tables=tables[:2],
                             query_start_loc=cu[:3], seq_lens=lens[:2])
    hidden = runner.model(torch.tensor(packed["ids"]), torch.tensor(packed["pos"]), runner.kv_layers, meta)
    graphed = runner.model.logits(hidden[torch.tensor(packed["rows"][: len(seqs)])])
    torch.testing.assert_close(graphed, eager)
