"""The relay process, one per machine: the bridge between its processes (ZeroMQ) and Redis. What a local
process sends to a remote name goes onto that name's topic; what lands on a local name's topic is
handed to that process's inbox; the local instances' registry entries are kept alive from their stats."""
from __future__ import annotations

import logging
import threading
import time

import msgspec
import redis

from pdpipe.cluster import Registry
from pdpipe.loop import Idle, ProcessBase, run_worker_loop
from pdpipe.messages import Forward, Handler, InstanceEntry, InstanceStats
from pdpipe.wire import InboxThread

log = logging.getLogger("pdpipe")


def entry_from_stats(stats: InstanceStats, machine: str) -> InstanceEntry:
    return InstanceEntry(name=stats.instance, role=stats.role, machine=machine, time=time.time(),
                         free_blocks=stats.free_blocks, num_blocks=stats.num_blocks, running=stats.running)


class Relay:
    """One machine's bridge between its processes and Redis (see the module docstring)."""

    def __init__(self, registry: Registry, local_names: list[str], deliver, machine: str,
                 stop: threading.Event | None = None):
        self.registry, self.local_names, self.deliver, self.machine = registry, local_names, deliver, machine
        self.stop = stop or threading.Event()
        self.instances: dict[str, InstanceEntry] = {}  # local engines, refreshed from their stats

    def outbound(self, dest: str, payload: bytes) -> None:
        """A local process's message for a remote name; kept trying while Redis is away."""
        while not self.stop.is_set():
            try:
                self.registry.push(dest, payload)
                return
            except redis.RedisError as exc:
                log.warning("relay: Redis unreachable (%s); retrying", exc)
                self.stop.wait(0.5)

    def note_stats(self, stats: InstanceStats) -> None:
        if stats.role in ("prefill", "decode", "mixed"):
            self.instances[stats.instance] = entry_from_stats(stats, self.machine)

    def run_inbound(self) -> None:
        while not self.stop.is_set():
            try:
                got = self.registry.pop(self.local_names, timeout=1.0)
            except redis.RedisError as exc:
                log.warning("relay: Redis unreachable (%s); retrying", exc)
                self.stop.wait(0.5)
                continue
            if got is not None:
                self.deliver(*got)

    def run_heartbeats(self) -> None:
        while not self.stop.wait(self.registry.ttl / 3):
            try:
                for entry in list(self.instances.values()):
                    self.registry.heartbeat(msgspec.structs.replace(entry, time=time.time()))
            except redis.RedisError as exc:
                log.warning("relay: heartbeat failed (%s)", exc)


def run_relay(role: str, name: str, run_dir: str) -> None:
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
