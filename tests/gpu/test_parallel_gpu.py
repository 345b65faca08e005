"""One engine split over two GPUs (NCCL): tensor, expert and data-parallel splits against the whole
model on one GPU, and the ranks of an instance sized from GPU memory agreeing on one pool.

Run on a GPU machine: python -m pytest -m gpu tests/gpu
"""
import pytest
import torch
from conftest import make_prompts

from pdpipe.messages import SamplingParams

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU")]


TP_PROMPTS = ((3, 17, 40, 8, 25), (600,))  # a step of five prompts (prefill graph), then one over 512 (eager)


def _gpu_rank(rank: int, init_file: str, results, work, *args) -> None:
    """Rank `rank` of two, on GPU `rank` (NCCL): runs work(rank, tp, put, *args), put(kind, value)
    reporting to the test; then ("exit", rank, failed), and ends without the interpreter's teardown
    (NCCL's and gloo's threads can abort it)."""
    import os
    import traceback

    from pdpipe.models.parallel import join_group

    failed = False
    try:
        torch.cuda.set_device(rank)
        tp = join_group(rank, 2, f"file://{init_file}", f"cuda:{rank}")
        work(rank, tp, lambda kind, value: results.put((kind, rank, value)), *args)
    except BaseException:  # noqa: BLE001 — reported, and the exit code says so
        traceback.print_exc()
        failed = True
    results.put(("exit", rank, failed))
    results.close()
    results.join_thread()
    os._exit(1 if failed else 0)


def _on_two_gpus(tmp_path, work, *args) -> dict[str, dict[int, object]]:
    """`work` run as both ranks of a TP2 group (`_gpu_rank`): what they reported, by kind and rank, once
    both ended cleanly."""
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    ranks = [ctx.Process(target=_gpu_rank, args=(r, str(tmp_path / "s"), results, work, *args)) for r in range(2)]
    for p in ranks:
        p.start()
    got: dict[str, dict[int, object]] = {"exit": {}}
    while len(got["exit"]) < 2:
        kind, rank, value = results.get(timeout=300)
        got.setdefault(kind, {})[rank] = value
    for p in ranks:
        p.join(timeout=60)
    assert got["exit"] == {0: False, 1: False}
    return got


def _tp_engine_work(rank: int, tp, put, model_dir: str, dtype: str, split: str = "tp") -> None:
    from pdpipe.config import CacheConfig, EngineConfig, SchedulerConfig
    from pdpipe.engine.engine import LLMEngine

    engine = LLMEngine(EngineConfig(model=model_dir, device=f"cuda:{rank}", dtype=dtype, expert_parallel=split != "tp",
                                    data_parallel_attention=split == "dp",
                                    cache=CacheConfig(block_size=16, num_blocks=256),
                                    scheduler=SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=1024)), tp=tp)
    if rank:
        engine.runner.follow()
    else:
        engine.warm_up()  # its GEMM warm-up is handed to rank 1 too
        put("result", _tp_generate(engine))
        engine.runner.stop_followers()


def _tp_generate(engine) -> list[tuple[list[int], list[float]]]:
    """Greedy, 8 tokens, each group of prompts batched: (tokens, their logprobs) per prompt."""
    out = []
    for group, lengths in enumerate(TP_PROMPTS):
        for i, p in enumerate(make_prompts(384, lengths=lengths, seed=9 + group)):
            engine.add_request(f"{group}-{i}", p, SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True,
                                                                  logprobs=0))
        done = {}
        while engine.has_unfinished():
            for o in engine.step():
                tokens, logprobs = done.setdefault(o.request_id, ([], []))
                tokens += o.token_ids
                logprobs += [lp.logprob for lp in o.logprobs or []]
        out += [done[k] for k in sorted(done, key=lambda k: int(k.split("-")[1]))]
    assert engine.leak_free()
    return out


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
@pytest.mark.parametrize("arch,split,dtype", [
    ("llama", "tp", "float32"), ("llama", "tp", "bfloat16"), ("ernie4_5_moe", "ep", "float32"),
    ("ernie4_5_moe", "ep", "bfloat16"), ("qwen3_moe", "tp", "bfloat16"), ("qwen3_moe", "dp", "float32"),
    ("ernie4_5_moe", "dp", "bfloat16")])
def test_tp2_on_two_gpus_computes_what_one_gpu_does(model_dir, tmp_path, arch, split, dtype):
    """One engine split over two GPUs (NCCL; decode and prefill CUDA graphs with their all-reduces
    inside, and eager steps; a MoE model's experts split by width (tp), by id (ep), or by id with each
    GPU serving its own sequences — data-parallel attention, eager steps with the MoE layers' all-gather
    and reduce-scatter) against the whole model on one GPU, greedy. fp32: the same tokens, logprobs within 1e-3. bf16,
    where the split changes the order of the sums and so the rounding: the first token of every prompt
    equal (one forward pass, no feedback), with its logprob within 0.05 (0.1 for MoE models, whose
    output adds k experts' rounded sums, and whose routing moves with them); the tokens after it are
    compared up to the first difference only, where the same bound holds."""
    from pdpipe.config import CacheConfig, EngineConfig, SchedulerConfig
    from pdpipe.engine.engine import LLMEngine

    got = _on_two_gpus(tmp_path, _tp_engine_work, str(model_dir(arch)), dtype, split)["result"][0]
    whole = LLMEngine(EngineConfig(model=str(model_dir(arch)), device="cuda:0", dtype=dtype,
                                   cache=CacheConfig(block_size=16, num_blocks=256),
                                   scheduler=SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=1024)))
    expected = _tp_generate(whole)
    tolerance = 1e-3 if dtype == "float32" else 0.1 if "moe" in arch else 0.05
    for (tokens, logprobs), (exp_tokens, exp_logprobs) in zip(got, expected):
        if dtype == "float32":
            assert tokens == exp_tokens
        assert tokens[0] == exp_tokens[0]
        same = next((i for i, (a, b) in enumerate(zip(tokens, exp_tokens)) if a != b), len(tokens))
        assert max(abs(a - b) for a, b in zip(logprobs[:same], exp_logprobs[:same])) < tolerance


def _tp_sized_work(rank: int, tp, put, model_dir: str) -> None:
    from pdpipe.config import CacheConfig, EngineConfig
    from pdpipe.engine.engine import LLMEngine

    free, total = torch.cuda.mem_get_info()
    hold = torch.empty(int(free - 0.1 * total), dtype=torch.uint8, device="cuda") if rank else None  # noqa: F841
    engine = LLMEngine(EngineConfig(model=model_dir, device=f"cuda:{rank}", dtype="bfloat16",
                                    cache=CacheConfig(block_size=16, gpu_memory_utilization=0.3)), tp=tp)
    put("blocks", engine.blocks.num_blocks)
    if rank:
        engine.runner.follow()
    else:
        put("served", _tp_generate(engine)[0][0])
        engine.runner.stop_followers()


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_tp_ranks_sized_from_gpu_memory_agree_on_their_pool(model_dir, tmp_path):
    """gpu_memory_utilization on a TP2 instance whose second GPU has only a tenth free: both ranks get
    the smaller pool (rank 0's block ids index every rank's pool), and the instance serves."""
    got = _on_two_gpus(tmp_path, _tp_sized_work, str(model_dir("llama")))
    assert got["blocks"][0] == got["blocks"][1] and got["served"][0]
