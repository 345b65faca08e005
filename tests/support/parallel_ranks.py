"""Two ranks on CPU for the tensor- and data-parallel tests: spawned processes joined by torch.distributed
(gloo, the CPU twin of NCCL), an engine split over them, and the requests both kinds of test run on it."""
import multiprocessing as mp
import queue

import torch

from pdpipe.config import CacheConfig, EngineConfig
from pdpipe.models.parallel import TensorParallel

BLOCK = 8
PROMPT = [(7 * i + 3) % 500 + 1 for i in range(30)]  # longer than mistral's 24-token window


def end_rank(results, failed: bool) -> None:
    """Ends a rank's process as pdpipe's ranks end, once its results are out: gloo's threads can abort
    the interpreter's teardown ("terminate called without an active exception")."""
    import os
    import traceback

    if failed:
        traceback.print_exc()
    results.close()
    results.join_thread()
    os._exit(1 if failed else 0)


def on_two_ranks(target, tmp_path, work, count: int) -> list:
    """`target(rank, 2, store, work, results)` run as two spawned ranks (gloo): the first `count` things
    they put on `results`, once both ended cleanly."""
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    ranks = [ctx.Process(target=target, args=(r, 2, str(tmp_path / "store"), work, results)) for r in range(2)]
    for p in ranks:
        p.start()
    got: list = []
    while len(got) < count:
        assert all(p.is_alive() or p.exitcode == 0 for p in ranks), "a rank died; see its stderr"
        try:
            got.append(results.get(timeout=1))
        except queue.Empty:
            continue
    for p in ranks:
        p.join(timeout=60)
        assert p.exitcode == 0
    return got


def engine_rank(rank: int, size: int, init_file: str, work: list[tuple], results) -> None:
    """Rank `rank` of an engine split over `size` processes, for each (model folder, KV blocks a rank,
    more EngineConfig fields, what rank 0 runs on it: `run(engine)`, its result reported[, what every
    rank does to its engine first: `prepare(engine, rank)`])."""
    from pdpipe.engine.engine import LLMEngine

    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=size)
    try:
        tp = TensorParallel(rank, size, torch.distributed.group.WORLD)
        for model_dir, num_blocks, fields, run, *prepare in work:
            fields = {"cache": CacheConfig(block_size=BLOCK, num_blocks=num_blocks), **fields}
            engine = LLMEngine(EngineConfig(model=model_dir, **fields), tp=tp)
            for step in prepare:
                step(engine, rank)
            if rank:
                engine.runner.follow()
                continue
            results.put((model_dir, run(engine)))  # type: ignore[operator]
            engine.runner.stop_followers()
    except BaseException:  # noqa: BLE001 — reported, and the exit code says so
        end_rank(results, failed=True)
    end_rank(results, failed=False)


def run_requests(engine) -> dict[str, list[int]]:
    """Three requests of different lengths batched together, greedy and seeded, to the end."""
    from pdpipe.messages import SamplingParams

    for i, n in enumerate((30, 9, 17)):
        params = SamplingParams(max_tokens=6, temperature=0.8 if i == 2 else 0.0, seed=11, ignore_eos=True)
        engine.add_request(f"r{i}", PROMPT[:n], params)
    tokens: dict[str, list[int]] = {}
    while engine.has_unfinished():
        for out in engine.step():
            tokens.setdefault(out.request_id, []).extend(out.token_ids)
    assert engine.leak_free()
    return tokens
