"""What every pipeline process has, and the one loop every role but the front-end (asyncio) runs.

`ProcessBase`: the run's config, signals, the outboxes and the heartbeat thread. `run_worker_loop`:
drain the inbox (and control calls), handle each message through the worker's handler table, step
while there is work, report stats and run periodic duties a few times a second. Workers are
socket-free (handle / step / stats / control), which is what lets the tests run them in one process.
"""
from __future__ import annotations

import logging
import os
import queue
import signal
import threading
import time
from pathlib import Path

import msgspec
import zmq

from pdpipe.config import LaunchConfig
from pdpipe.messages import Heartbeat, Ready, Shutdown, State, StateEvent
from pdpipe.wire import ControlCall, InboxThread, Outboxes, RunPaths

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
