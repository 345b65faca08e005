"""The scheduler process's worker on the common loop (`process.run_worker_loop`): its inbox (state
events, requests, stats) and its control calls (`pdpipe queues`, `pdpipe trace`, pause/resume, and
the front-end's /metrics) go to the core; every TICK the registry's view and the deadlines."""
from __future__ import annotations

import itertools
import logging
import threading

import zmq

from pdpipe.cluster import Registry
from pdpipe.demo import resolve_model
from pdpipe.engine.sizing import kv_dtype_name
from pdpipe.kv_hash import root_hash
from pdpipe.loop import Idle, ProcessBase, run_worker_loop
from pdpipe.messages import ControlRequest, Pause, ResetPrefixCache
from pdpipe.models.spec import load_spec
from pdpipe.quant import quant_plan
from pdpipe.wire import ControlThread, InboxThread

from .core import CacheKeys, SchedulerCore

log = logging.getLogger("pdpipe")
TICK = 0.02


def control_reply(core: SchedulerCore, req: ControlRequest, send) -> dict:
    if req.op == "snapshot":
        return core.snapshot()
    if req.op == "trace":
        trace = core.trace(req.request_id)
        return trace if trace is not None else {"error": f"no request {req.request_id!r} is known"}
    if req.op == "reset_prefix_cache":
        engines = [n for n, role in core.roles.items() if role in ("prefill", "decode", "mixed")]
        for name in engines:
            send(name, ResetPrefixCache())
        return {"ok": True, "instances": engines}
    if req.op in ("pause", "resume"):
        if req.instance not in core.roles:
            return {"error": f"instance {req.instance!r} unknown; known: {', '.join(core.roles)}"}
        send(req.instance, Pause(paused=req.op == "pause"))
        return {"ok": True}
    return {"error": f"op {req.op!r} unknown; known: snapshot, trace, pause, resume, reset_prefix_cache"}


class RegistryWatcher:
    """Reads the cluster's live instances from Redis on a thread of its own (a slow or absent Redis
    must not stall the scheduler's loop); the loop takes the latest view when it changes."""

    def __init__(self, cluster, local: dict[str, tuple[str, str]]):
        self.registry = Registry(cluster.redis_url, cluster.name, cluster.ttl)
        self.local, self.period = local, cluster.ttl / 4
        self.view: dict[str, tuple[str, str]] | None = None
        self._stop = threading.Event()
        threading.Thread(target=self._run, name="registry", daemon=True).start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                live = {e.name: (e.role, e.machine) for e in self.registry.live_instances().values()}
                self.view = {**live, **self.local}
            except Exception as exc:  # noqa: BLE001 — Redis away: keep the last view, say so
                log.warning("scheduler: cannot read the registry: %s", exc)
            self._stop.wait(self.period)

    def take(self) -> dict[str, tuple[str, str]] | None:
        view, self.view = self.view, None
        return view

    def stop(self) -> None:
        self._stop.set()


class KVEventPublisher:
    """Republishes the engines' KV event batches as vLLM does (ZeroMQ PUB, frames: topic, an 8-byte
    big-endian sequence number, the msgpack batch), the topic the instance's name: on the run's ipc
    endpoint, and on `tcp` where given (one for the cluster, not one a machine or an engine)."""

    def __init__(self, ctx: zmq.Context, ipc: str, tcp: str = ""):
        self.socket = ctx.socket(zmq.PUB)
        self.socket.setsockopt(zmq.SNDHWM, 100_000)
        self.socket.setsockopt(zmq.LINGER, 0)
        self.socket.bind(ipc)
        if tcp:
            self.socket.bind(tcp)
        self._seq = itertools.count()

    def publish(self, instance: str, payload: bytes) -> None:
        self.socket.send_multipart((instance.encode(), next(self._seq).to_bytes(8, "big"), payload), zmq.NOBLOCK)

    def close(self) -> None:
        self.socket.close()


def cache_keys(cfg) -> CacheKeys | None:
    """How this launch's engines hash prompts, for routing by their caches (None with caching off)."""
    if not cfg.engine.cache.prefix_caching:
        return None
    model_dir = resolve_model(cfg.engine.model)
    try:
        kv_dtype = kv_dtype_name(load_spec(model_dir, cfg.engine.dtype or None), cfg.engine.cache.kv_cache_dtype)
        quant = quant_plan(cfg.engine, model_dir).name
    except (OSError, ValueError) as exc:  # the engines fail on it, saying why; routing goes by load meanwhile
        log.warning("scheduler: not routing by cache: %s", exc)
        return None
    return CacheKeys(lambda salt: root_hash(model_dir.name, quant, kv_dtype=kv_dtype, cache_salt=salt),
                     cfg.engine.cache.block_size)


class SchedulerWorker(Idle):
    """The scheduler process's worker for the common loop: messages go to the core, control calls get
    their replies, and the periodic duty takes the registry's view and runs the core's deadlines."""

    def __init__(self, cfg, send, publish=None):
        cluster = cfg.cluster
        local = {name: (inst.role, cluster.machine) for name, inst in cfg.named_instances()}
        self.core = SchedulerCore({n: r for n, (r, _) in local.items()}, cfg.deadlines, send,
                                  machines={n: m for n, (_, m) in local.items()}, routing=cfg.routing,
                                  cache=cache_keys(cfg), publish=publish)
        self.watcher = RegistryWatcher(cluster, local) if cluster.redis_url else None
        self.send = send

    def handle(self, msg) -> None:
        self.core.handle(msg)

    def control(self, request: ControlRequest) -> dict:
        return control_reply(self.core, request, self.send)

    def periodic(self) -> None:
        core = self.core
        view = self.watcher.take() if self.watcher else None
        if view is not None:  # a dead local instance stays out until the launcher says it is back
            view = {n: v for n, v in view.items() if not core.liveness.is_down(n)}
        if view is not None and view != {n: (core.roles[n], core.machines.get(n, "")) for n in core.roles}:
            core.update_instances(view)
        core.tick()

    def close(self) -> None:
        if self.watcher:
            self.watcher.stop()


def run_scheduler(role: str, name: str, run_dir: str) -> None:
    proc = ProcessBase(role, name, run_dir)
    events = KVEventPublisher(proc.ctx, proc.paths.kv_events, proc.cfg.routing.kv_events_endpoint)
    worker = SchedulerWorker(proc.cfg, proc.out.send, events.publish)
    inbox = InboxThread(proc.ctx, proc.paths.inbox(name)).start()
    control = ControlThread(proc.ctx, proc.paths.control, inbox.queue).start()
    proc.ready()
    try:
        run_worker_loop(proc, inbox, worker, periodic=worker.periodic, period=TICK)
    finally:
        worker.close()
        events.close()
        control.stop()
        inbox.stop()
        proc.close()
