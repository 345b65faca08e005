"""The scheduler process: its inbox (state events, requests, stats) and its control socket (REQ/REP:
`pdpipe queues`, `pdpipe trace`, pause/resume, and the front-end's /metrics) on one poll loop."""
from __future__ import annotations

import logging
import threading
import time

import msgspec
import zmq

from pdpipe.messages import ControlRequest, Pause, decode

from .core import SchedulerCore

log = logging.getLogger("pdpipe")
TICK = 0.02


def control_reply(core: SchedulerCore, req: ControlRequest, send) -> dict:
    if req.op == "snapshot":
        return core.snapshot()
    if req.op == "trace":
        trace = core.trace(req.request_id)
        return trace if trace is not None else {"error": f"no request {req.request_id!r} is known"}
    if req.op in ("pause", "resume"):
        if req.instance not in core.roles:
            return {"error": f"instance {req.instance!r} unknown; known: {', '.join(core.roles)}"}
        send(req.instance, Pause(paused=req.op == "pause"))
        return {"ok": True}
    return {"error": f"op {req.op!r} unknown; known: snapshot, trace, pause, resume"}


class RegistryWatcher:
    """Reads the cluster's live instances from Redis on a thread of its own (a slow or absent Redis
    must not stall the scheduler's loop); the loop takes the latest view when it changes."""

    def __init__(self, cluster, local: dict[str, tuple[str, str]]):
        from pdpipe.cluster import Registry

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


def serve_scheduler(proc) -> None:
    cluster = proc.cfg.cluster
    local = {name: (inst.role, cluster.machine) for name, inst in proc.cfg.named_instances()}
    core = SchedulerCore({n: r for n, (r, _) in local.items()}, proc.cfg.deadlines, proc.out.send,
                         machines={n: m for n, (_, m) in local.items()}, routing=proc.cfg.routing)
    watcher = RegistryWatcher(cluster, local) if cluster.redis_url else None
    inbox = proc.ctx.socket(zmq.PULL)
    inbox.bind(proc.paths.inbox("scheduler"))
    control = proc.ctx.socket(zmq.REP)
    control.bind(proc.paths.control)
    for sock in (inbox, control):
        sock.setsockopt(zmq.LINGER, 0)
    poller = zmq.Poller()
    poller.register(inbox, zmq.POLLIN)
    poller.register(control, zmq.POLLIN)
    proc.ready()
    next_tick = 0.0
    while not proc.stop.is_set():
        events = dict(poller.poll(int(TICK * 1000)))
        if inbox in events:
            while True:
                try:
                    data = inbox.recv(zmq.NOBLOCK)
                except zmq.Again:
                    break
                try:
                    core.handle(decode(data))
                except Exception:  # noqa: BLE001 — one bad message must not stop the scheduler
                    log.exception("scheduler: failed to handle a message")
        if control in events:
            try:
                req = msgspec.json.decode(control.recv(), type=ControlRequest)
                reply = control_reply(core, req, proc.out.send)
            except (msgspec.DecodeError, msgspec.ValidationError) as exc:
                reply = {"error": f"bad control request: {exc}"}
            control.send(msgspec.json.encode(reply))
        now = time.monotonic()
        if now >= next_tick:
            view = watcher.take() if watcher else None
            if view is not None:  # a dead local instance stays out until the launcher says it is back
                view = {n: v for n, v in view.items() if n not in core.down}
            if view is not None and view != {n: (core.roles[n], core.machines.get(n, "")) for n in core.roles}:
                core.update_instances(view)
            core.tick()
            next_tick = now + TICK
    if watcher:
        watcher.stop()
    inbox.close()
    control.close()
