"""Entry point of every pipeline process: `python -m pdpipe.process ROLE NAME RUN_DIR`.

Each reads the run's resolved config from RUN_DIR/config.json, binds its inbox, tells the launcher it
is ready, and runs its loop until SIGTERM/SIGINT. Every role but the front-end (asyncio) runs the same
loop, `run_worker_loop`: drain the inbox (and control calls), handle each message through the
worker's handler table, step while there is work, report stats and run periodic duties a few times a
second; engines and the transfer also heartbeat from a thread of their own.
"""
from __future__ import annotations

import logging
import os
import queue
import signal
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path

import msgspec
import zmq

from pdpipe import envs
from pdpipe.config import TP_STORE_ENV, LaunchConfig, tp_group_of, transfer_name
from pdpipe.messages import (
    Forward,
    Handler,
    Heartbeat,
    InstanceStats,
    PoolInfo,
    Ready,
    Shutdown,
    State,
    StateEvent,
)
from pdpipe.wire import ControlCall, ControlThread, InboxThread, Outboxes, RunPaths, SenderThread

log = logging.getLogger("pdpipe")
STATS_PERIOD = 0.2
HEARTBEAT_PERIOD = 0.5


def load_run_config(run_dir: Path) -> LaunchConfig:
    return msgspec.json.decode((Path(run_dir) / "config.json").read_bytes(), type=LaunchConfig)


class ProcessBase:
    """Signals, logging, sockets: what every process has."""

    def __init__(self, role: str, name: str, run_dir: str):
        self.role, self.name = role, name
        self.paths = RunPaths(run_dir)
        self.cfg = load_run_config(self.paths.run_dir)
        self.stop = threading.Event()
        signal.signal(signal.SIGTERM, lambda *_: self.stop.set())
        signal.signal(signal.SIGINT, lambda *_: self.stop.set())
        self.ctx = zmq.Context()
        local = {"launcher", *(n for _, n in self.cfg.local_processes())} if self.cfg.cluster.redis_url else None
        self.out = Outboxes(self.ctx, self.paths, local)
        self._heartbeat: threading.Thread | None = None

    def ready(self) -> None:
        self.out.send("launcher", Ready(instance=self.name, pid=os.getpid()))
        log.info("%s ready (pid %d)", self.name, os.getpid())

    def start_heartbeat(self) -> None:
        """Tells the scheduler twice a second, from a thread of its own (a long step does not hold it
        up), that this process is alive and not frozen. Only on the scheduler's machine: other machines'
        instances are watched through the registry's entries (cluster.ttl). The first beat goes now,
        before `ready`: the scheduler watches a process from its first beat, and one that froze before
        beating would never be missed."""
        if self.cfg.cluster.redis_url and not self.cfg.cluster.frontend:
            return
        self.out.send("scheduler", Heartbeat(instance=self.name, role=self.role))

        def beat() -> None:
            out = Outboxes(self.ctx, self.paths, self.out.local)
            try:
                while not self.stop.wait(HEARTBEAT_PERIOD):
                    out.send("scheduler", Heartbeat(instance=self.name, role=self.role))
            finally:
                out.close()

        self._heartbeat = threading.Thread(target=beat, name="heartbeat", daemon=True)
        self._heartbeat.start()

    def close(self) -> None:
        self.stop.set()  # the heartbeat thread closes its socket, so that the context can end
        if self._heartbeat is not None:
            self._heartbeat.join(timeout=2)
        self.out.close()
        self.ctx.term()


def drain(q: queue.Queue, timeout: float) -> list:
    """Everything queued now, waiting up to `timeout` for the first item when there is none."""
    msgs = []
    try:
        msgs.append(q.get(timeout=timeout) if timeout else q.get_nowait())
        while True:
            msgs.append(q.get_nowait())
    except queue.Empty:
        pass
    return msgs


def run_worker_loop(proc: ProcessBase, inbox: InboxThread, worker, periodic=None,
                    period: float = STATS_PERIOD) -> None:
    """Every process's loop: drain the inbox (messages and control calls), handle each through the
    worker's handler table, step while there is work, and every `period` report stats (where the
    worker has any) and call `periodic`. A bad message costs only itself."""
    next_stats = 0.0
    while not proc.stop.is_set():
        for msg in drain(inbox.queue, 0 if worker.has_work() else 0.02):
            if isinstance(msg, Shutdown):
                proc.stop.set()
            elif isinstance(msg, ControlCall):
                _answer(proc, worker, msg)
            else:
                _handle(proc, worker, msg)
        if worker.has_work():
            worker.step()
        now = time.monotonic()
        if now >= next_stats:
            stats = worker.stats(inbox.queue.qsize())
            if stats is not None:
                proc.out.send("scheduler", stats)
                if proc.cfg.cluster.redis_url:  # the relay puts this instance's load in the registry
                    proc.out.send("relay", stats)
            if periodic is not None:
                periodic()
            next_stats = now + period


def _answer(proc: ProcessBase, worker, call: ControlCall) -> None:
    if call.abandoned:
        return  # its asker was told there was no answer: doing it now would surprise them
    try:
        call.answer(worker.control(call.request))
    except Exception as exc:  # noqa: BLE001 — a failed inspection must not stop the process
        log.exception("%s: control %s failed", proc.name, call.request.op)
        call.answer({"error": f"{call.request.op} failed: {type(exc).__name__}: {exc}"})


def _handle(proc: ProcessBase, worker, msg) -> None:
    try:
        worker.handle(msg)
    except Exception as exc:  # noqa: BLE001 — fail that request alone; keep serving the rest
        log.exception("%s: failed to handle %s", proc.name, type(msg).__name__)
        rid = getattr(msg, "request_id", None)
        if rid is not None and proc.role != "scheduler":
            proc.out.send("scheduler", StateEvent(request_id=rid, state=State.FAILED, instance=proc.name,
                                                  time=time.time(), detail=f"{proc.name}: {exc}"))


class Idle:
    """What a worker without steps or stats of its own answers to the loop."""

    def has_work(self) -> bool:
        return False

    def step(self) -> None:
        pass

    def stats(self, inbox_depth: int = 0) -> None:
        return None

    def control(self, request) -> dict:
        return {"error": f"op {request.op!r}: this process answers no control requests"}


def run_engine(role: str, name: str, run_dir: str) -> None:
    from pdpipe.engine.engine import LLMEngine
    from pdpipe.engine.worker import EngineWorker

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
    from pdpipe.models.parallel import kv_heads_of
    from pdpipe.models.spec import load_spec

    info = PoolInfo(instance=tp_group_of(name)[0], path=str(pool_path), shape=list(engine.kv_cache.data.shape),
                    dtype=engine.spec.dtype, pid=os.getpid())
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
    from pdpipe.models.parallel import join_group

    if device.startswith("cuda"):
        import torch

        torch.cuda.set_device(torch.device(device))
    return join_group(tp_group_of(name)[1], size, f"file://{os.environ[TP_STORE_ENV]}", device)


def run_rank(role: str, name: str, run_dir: str) -> None:
    """A rank > 0 of a tensor-parallel instance: its share of the model and of the KV heads, running
    each step rank 0 hands over until rank 0 says stop (or dies: the launcher restarts the group)."""
    from pdpipe.engine.engine import LLMEngine

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


def run_transfer(role: str, name: str, run_dir: str) -> None:
    from pdpipe.demo import resolve_model
    from pdpipe.models.spec import load_spec
    from pdpipe.transfer.machine import MachineTransfer
    from pdpipe.transfer.worker import TransferWorker

    proc = ProcessBase(role, name, run_dir)
    spec = load_spec(resolve_model(proc.cfg.engine.model))
    backend = MachineTransfer.for_config(proc.cfg, proc.paths.run_dir / "pools")
    worker = TransferWorker(name, backend, spec.num_layers, proc.out.send, pool_lookup=backend.lookup,
                            copy_deadline=proc.cfg.deadlines.copy)
    inbox = InboxThread(proc.ctx, proc.paths.inbox(name)).start()
    proc.start_heartbeat()
    proc.ready()
    try:
        run_worker_loop(proc, inbox, worker, periodic=backend.refresh)
    finally:
        inbox.stop()
        proc.close()


def run_relay(role: str, name: str, run_dir: str) -> None:
    from pdpipe.cluster import Registry, Relay
    from pdpipe.messages import InstanceEntry

    proc = ProcessBase(role, name, run_dir)
    cluster = proc.cfg.cluster
    registry = Registry(cluster.redis_url, cluster.name, cluster.ttl)
    local = [n for _, n in proc.cfg.local_processes() if n != "relay"]
    relay = Relay(registry, local, proc.out.send_raw, cluster.machine, stop=proc.stop)
    for inst_name, inst in proc.cfg.named_instances():
        relay.instances[inst_name] = InstanceEntry(inst_name, inst.role, cluster.machine, time.time())
    inbox = InboxThread(proc.ctx, proc.paths.inbox(name)).start()
    threads = [threading.Thread(target=relay.run_inbound, daemon=True),
               threading.Thread(target=relay.run_heartbeats, daemon=True)]
    for t in threads:
        t.start()
    proc.ready()
    try:
        run_worker_loop(proc, inbox, RelayWorker(relay))
    finally:
        inbox.stop()
        proc.close()


class RelayWorker(Idle, Handler):
    """The relay's inbox: messages for other machines go onto their Redis topics; local stats feed
    this machine's registry entries."""

    name = "relay"

    def __init__(self, relay):
        self.relay = relay

    def _on_Forward(self, msg: Forward) -> None:
        self.relay.outbound(msg.dest, msg.payload)

    def _on_InstanceStats(self, msg: InstanceStats) -> None:
        self.relay.note_stats(msg)


def run_scheduler(role: str, name: str, run_dir: str) -> None:
    from pdpipe.scheduler.service import TICK, SchedulerWorker

    proc = ProcessBase(role, name, run_dir)
    worker = SchedulerWorker(proc.cfg, proc.out.send)
    inbox = InboxThread(proc.ctx, proc.paths.inbox(name)).start()
    control = ControlThread(proc.ctx, proc.paths.control, inbox.queue).start()
    proc.ready()
    try:
        run_worker_loop(proc, inbox, worker, periodic=worker.periodic, period=TICK)
    finally:
        worker.close()
        control.stop()
        inbox.stop()
        proc.close()


def run_api(role: str, name: str, run_dir: str) -> None:
    """The front-end's loop is asyncio's (uvicorn), its wires `api/bridge.py`'s."""
    from pdpipe.api.server import serve_api

    proc = ProcessBase(role, name, run_dir)
    try:
        serve_api(proc)
    finally:
        proc.close()


RUNNERS = {"prefill": run_engine, "decode": run_engine, "mixed": run_engine, "transfer": run_transfer,
           "scheduler": run_scheduler, "api": run_api, "relay": run_relay, "rank": run_rank}


def die_with_launcher() -> None:
    """SIGKILL to this process when its launcher dies, however it dies (Linux's parent-death signal), so
    that no process outlives its launch holding its port and pools."""
    launcher = os.environ.get("PDPIPE_LAUNCHER_PID")
    if not launcher or not sys.platform.startswith("linux"):
        return
    import ctypes

    # SIGKILL: with no launcher there is nobody to drain for, and a graceful stop could hang on a peer
    # that is gone (the next launch of the run cleans its sockets and pools)
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    if os.getppid() != int(launcher):  # it died before the signal was armed
        os._exit(1)


def main(argv: list[str] | None = None) -> int:
    import faulthandler

    die_with_launcher()
    role, name, run_dir = (argv or sys.argv[1:])[:3]
    logging.basicConfig(level=envs.log_level(), stream=sys.stderr,
                        format=f"%(asctime)s {name} %(levelname)s %(message)s")
    faulthandler.enable()  # a crash in native code (CUDA, Triton) still leaves its Python stack in the log
    faulthandler.register(signal.SIGUSR1, all_threads=True)  # a hang: every thread's stack, on demand
    if role in ("prefill", "decode", "mixed", "rank", "transfer"):  # their share of the cores (launcher.thread_budget)
        import torch

        log.info("%s: %d torch threads", name, torch.get_num_threads())
    try:
        RUNNERS[role](role, name, run_dir)
    except Exception:
        log.exception("%s failed", name)
        return 1
    if "torch.distributed" in sys.modules and sys.modules["torch.distributed"].is_initialized():
        # a rank of a tensor-parallel instance: gloo's threads can abort the interpreter's teardown
        # ("terminate called without an active exception"), which would read as a crash
        logging.shutdown()
        os._exit(0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
