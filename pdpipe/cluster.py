"""Redis as the meeting point of machines: a registry of live instances kept alive by heartbeats with a
TTL, the published KV pools, and one topic (a list) per process whose key expires when nobody feeds it,
so nothing waits for a machine that is gone. Everything stored is msgpack from msgspec; no pickle.
Processes never talk to Redis for messages: each machine's relay (`pdpipe.relay`) does.
"""
from __future__ import annotations

import logging
import time
from typing import cast

import msgspec
import redis

from pdpipe.messages import Envelope, InstanceEntry, PoolInfo

log = logging.getLogger("pdpipe")


class Keys:
    def __init__(self, cluster: str):
        self.prefix = f"pdpipe:{cluster}:"

    def instance(self, name: str) -> str:
        return f"{self.prefix}inst:{name}"

    def pool(self, name: str, rank: int = 0) -> str:
        return f"{self.prefix}pool:{name}" + (f".rank{rank}" if rank else "")

    def topic(self, name: str) -> str:
        return f"{self.prefix}topic:{name}"


class Registry:
    """Reads and writes the cluster's shared state. Raises redis.ConnectionError when Redis is away."""

    def __init__(self, url: str, cluster: str, ttl: float):
        self.redis = redis.Redis.from_url(url, socket_timeout=2.0, socket_connect_timeout=2.0)
        self.keys = Keys(cluster)
        self.ttl = ttl
        self._enc = msgspec.msgpack.Encoder()

    def ping(self) -> None:
        self.redis.ping()

    def heartbeat(self, entry: InstanceEntry) -> None:
        self.redis.set(self.keys.instance(entry.name), self._enc.encode(entry), px=int(self.ttl * 1000))

    def live_instances(self) -> dict[str, InstanceEntry]:
        names = list(self.redis.scan_iter(self.keys.instance("*"), count=1000))
        entries = {}
        for raw in self.redis.mget(names) if names else []:
            if raw is not None:
                entry = msgspec.msgpack.decode(cast(bytes, raw), type=InstanceEntry)
                entries[entry.name] = entry
        return entries

    def publish_pool(self, info: PoolInfo) -> None:
        """An instance's pool (each rank's, for a tensor-parallel instance)."""
        self.redis.set(self.keys.pool(info.instance, info.rank), self._enc.encode(info), px=int(self.ttl * 1000))

    def pool(self, name: str, rank: int = 0) -> PoolInfo | None:
        raw = self.redis.get(self.keys.pool(name, rank))
        return msgspec.msgpack.decode(cast(bytes, raw), type=PoolInfo) if raw is not None else None

    def push(self, dest: str, payload: bytes) -> None:
        key = self.keys.topic(dest)
        pipe = self.redis.pipeline(transaction=False)
        pipe.lpush(key, self._enc.encode(Envelope(time.time() + self.ttl, payload)))
        pipe.pexpire(key, int(self.ttl * 1000))
        pipe.execute()

    def pop(self, names: list[str], timeout: float = 1.0) -> tuple[str, bytes] | None:
        """The oldest message for any of `names` (None after `timeout`); expired ones are dropped."""
        keys = [self.keys.topic(n) for n in names]
        got = self.redis.brpop(keys, timeout=timeout)
        if got is None:
            return None
        key, raw = cast(tuple[bytes, bytes], got)  # the client returns bytes (no decode_responses)
        env = msgspec.msgpack.decode(raw, type=Envelope)
        if env.expires < time.time():
            log.warning("dropped an expired message for %s", key.decode())
            return None
        return key.decode()[len(self.keys.prefix) + len("topic:"):], env.payload
