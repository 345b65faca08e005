"""The engine processes: `run_engine` (an instance's rank 0: its sockets, the engine worker's loop, the
prefill engine's layer announcer) and `run_rank` (a rank > 0 of a tensor-parallel or data-parallel
instance, which runs each step rank 0 hands over); both join their instance's group, build the engine
and announce their KV pool to the machine's transfer process."""
from __future__ import annotations

import os
import signal
from dataclasses import replace
from pathlib import Path

import msgspec
import torch

from pdpipe.config import TP_STORE_ENV, LaunchConfig, tp_group_of, transfer_name
from pdpipe.loop import ProcessBase, run_worker_loop
from pdpipe.messages import PoolInfo
from pdpipe.models.parallel import join_group, kv_heads_of
from pdpipe.models.spec import load_spec
from pdpipe.wire import InboxThread, SenderThread

from .engine import LLMEngine
from .worker import EngineWorker


def run_engine(role: str, name: str, run_dir: str) -> None:
    proc = ProcessBase(role, name, run_dir)
    inst, engine_cfg = engine_config(proc.cfg, name)
    pool_path = proc.paths.pool(name)
    tp = join_tp_group(name, inst.tp, engine_cfg.device)
    try:
        engine = LLMEngine(engine_cfg, pool_path=str(pool_path), tp=tp)
        if engine_cfg.device.startswith("cuda"):
            engine.warm_up()
        inbox = InboxThread(proc.ctx, proc.paths.inbox(name)).start()
        # a prefill engine sends from a thread, so that it can announce layers once the GPU wrote them
        sender = SenderThread(proc.ctx, proc.paths, proc.out.local) if role == "prefill" else None
        worker = EngineWorker(name, role, engine, sender.send if sender else proc.out.send,
                              transfer=transfer_name(proc.cfg.cluster.machine))
        announce_pool(proc, name, role, pool_info(name, engine, pool_path, tp))
        proc.start_heartbeat()
        proc.ready()
        run_worker_loop(proc, inbox, worker)
        inbox.stop()
        if sender is not None:
            sender.close()
        engine.runner.stop_followers()
    finally:
        pool_path.unlink(missing_ok=True)
        proc.close()


def engine_config(cfg: LaunchConfig, name: str):
    """(the instance's config, the engine config its processes run) for the engine process `name` (a
    rank > 0 gets its instance's)."""
    instance = tp_group_of(name)[0]
    inst = dict(cfg.named_instances())[instance]
    engine_cfg = cfg.engine
    if inst.num_blocks:
        engine_cfg = replace(engine_cfg, cache=replace(engine_cfg.cache, num_blocks=inst.num_blocks))
    if inst.expert_parallel is not None:
        engine_cfg = replace(engine_cfg, expert_parallel=inst.expert_parallel)
    if inst.data_parallel_attention is not None:
        engine_cfg = replace(engine_cfg, data_parallel_attention=inst.data_parallel_attention)
    if inst.role == "decode":  # the prompts it computes itself (conditional disaggregation) go in small chunks
        engine_cfg = replace(engine_cfg, scheduler=replace(engine_cfg.scheduler,
                                                           max_prefill_tokens=cfg.routing.local_step_tokens))
    if engine_cfg.device.startswith("cuda"):
        # the launcher made only this instance's GPUs visible; a prefill engine decodes only whole
        # requests (routing.decode_busy_ms)
        decodes = inst.role != "prefill" or cfg.routing.decode_busy_ms > 0
        rank = tp_group_of(name)[1] if inst.tp > 1 else 0  # the instance's GPUs are visible to each rank, which
        # runs on its own (NCCL then sees the peers it reaches directly)
        engine_cfg = replace(engine_cfg, device=f"cuda:{rank}", cuda_graphs=engine_cfg.cuda_graphs and decodes)
    return inst, engine_cfg


def announce_pool(proc: ProcessBase, name: str, role: str, info: PoolInfo) -> None:
    """Writes the pool down in the run directory (a restarted transfer reads it there) and hands it to
    the machine's transfer process, which maps (and, across machines, publishes) it now."""
    (proc.paths.run_dir / "pools").mkdir(exist_ok=True)
    (proc.paths.run_dir / "pools" / f"{name}.json").write_bytes(msgspec.json.encode(info))
    if role != "mixed":
        proc.out.send(transfer_name(proc.cfg.cluster.machine), info)


def pool_info(name: str, engine, pool_path: Path, tp) -> PoolInfo:
    """What the transfer needs of this engine's pool: where (a shared-memory file, or a CUDA IPC
    handle), its shape, and, for a rank of a tensor-parallel instance, which rank it is and the
    key/value heads it holds."""
    info = PoolInfo(instance=tp_group_of(name)[0], path=str(pool_path), shape=list(engine.kv_cache.data.shape),
                    dtype=str(engine.kv_cache.data.dtype).removeprefix("torch."), kv_dtype=engine.kv_dtype,
                    weights=engine.quant.name, pid=os.getpid())
    if engine.gpu_pool is not None:
        from pdpipe.ipc.cuda import physical_gpu

        handle, offset = engine.gpu_pool.export()
        info = msgspec.structs.replace(info, path="", gpu=physical_gpu(engine.kv_cache.data.device.index or 0),
                                       ipc_handle=handle, ipc_offset=offset)
    if tp is None:
        return info
    whole = load_spec(engine.model_dir)
    data_parallel = engine.config.data_parallel_attention
    heads = [] if data_parallel else list(kv_heads_of(tp.rank, tp.size, whole.num_heads, whole.num_kv_heads))
    return msgspec.structs.replace(info, rank=tp.rank, kv_heads=heads, tp=tp.size, data_parallel=data_parallel,
                                   group=Path(os.environ[TP_STORE_ENV]).name)


def join_tp_group(name: str, size: int, device: str):
    """Joins this process to its instance's ranks (gloo on CPU, NCCL on GPU); None for one rank."""
    if size == 1:
        return None
    if device.startswith("cuda"):
        torch.cuda.set_device(torch.device(device))
    return join_group(tp_group_of(name)[1], size, f"file://{os.environ[TP_STORE_ENV]}", device)


def run_rank(role: str, name: str, run_dir: str) -> None:
    """A rank > 0 of a tensor-parallel instance: its share of the model and of the KV heads, running
    each step rank 0 hands over until rank 0 says stop (or dies: the launcher restarts the group)."""
    proc = ProcessBase(role, name, run_dir)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # it waits inside collectives: end at once when told
    inst, engine_cfg = engine_config(proc.cfg, name)
    tp = join_tp_group(name, inst.tp, engine_cfg.device)
    pool_path = proc.paths.pool(name)
    try:
        engine = LLMEngine(engine_cfg, pool_path=str(pool_path), tp=tp)
        proc.role = inst.role  # its heartbeat speaks for its instance: a frozen rank freezes the instance
        proc.start_heartbeat()
        announce_pool(proc, name, inst.role, pool_info(name, engine, pool_path, tp))  # the transfer moves its heads too
        proc.ready()
        engine.runner.follow()
    finally:
        pool_path.unlink(missing_ok=True)
        proc.close()
