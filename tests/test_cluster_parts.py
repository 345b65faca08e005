"""The cluster's parts on their own: the registry's TTLs, topics whose messages expire, block
coalescing, and the Mooncake backend moving a pool's blocks between two processes over TCP."""
import multiprocessing as mp
import time
from pathlib import Path

import msgspec
import pytest
import torch
from cluster_hosts import RedisServer
from pipeline_launch import wait_until

from pdpipe.cluster import Registry
from pdpipe.messages import Envelope, InstanceEntry, PoolInfo
from pdpipe.rdma import MooncakeError, MooncakeTransfer, coalesce
from pdpipe.transfer import TransferError, TransferJob, TransferState


@pytest.fixture(scope="module")
def redis_url():
    server = RedisServer(["127.0.0.1"]).start()
    yield server.url("127.0.0.1")
    server.remove()


def test_coalesce_merges_runs_contiguous_on_both_sides():
    assert coalesce([4, 5, 6, 9, 10, 2], [0, 1, 2, 3, 7, 8]) == [(4, 0, 3), (9, 3, 1), (10, 7, 1), (2, 8, 1)]
    assert coalesce([], []) == []


def test_registry_entries_expire_without_heartbeats(redis_url):
    reg = Registry(redis_url, "ttl-test", ttl=0.5)
    reg.heartbeat(InstanceEntry("x-decode-0", "decode", "x", time.time(), free_blocks=3))
    assert reg.live_instances()["x-decode-0"].free_blocks == 3
    assert wait_until(lambda: "x-decode-0" not in reg.live_instances(), timeout=5, what="expiry")


def test_topic_messages_expire_unread(redis_url):
    reg = Registry(redis_url, "topic-test", ttl=5.0)
    reg.push("b-decode-0", b"first")
    assert reg.pop(["b-decode-0"], timeout=1) == ("b-decode-0", b"first")
    stale = msgspec.msgpack.encode(Envelope(time.time() - 1, b"old"))
    reg.redis.lpush(reg.keys.topic("b-decode-0"), stale)
    assert reg.pop(["b-decode-0"], timeout=1) is None  # dropped, not delivered
    reg.push("gone", b"nobody reads this")
    assert 0 < reg.redis.pttl(reg.keys.topic("gone")) <= 5000  # the topic itself expires


SHAPE = (3, 2, 12, 4, 2, 8)  # layers, K/V, blocks, block size, heads, dim


def _receiver(conn):
    pool = torch.zeros(SHAPE)
    backend = MooncakeTransfer("127.0.0.1", "tcp")
    conn.send(backend.expose(PoolInfo(instance="dst", path="", shape=list(SHAPE), dtype="float32"), pool))
    conn.recv()
    conn.send(pool.numpy().copy())  # by value: a shared tensor would die with this process
    conn.recv()


def _answer(conn, proc):
    """The child's next message; fails at once (not at the suite's timeout) if the child died."""
    while not conn.poll(0.5):
        assert proc.is_alive(), f"the receiving process died (exit code {proc.exitcode}); see its stderr"
    return conn.recv()


def test_mooncake_moves_blocks_between_processes_over_tcp():
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=_receiver, args=(child,))
    proc.start()
    try:
        remote = _answer(parent, proc)
        src = torch.randn(SHAPE)
        backend = MooncakeTransfer("127.0.0.1", "tcp")
        backend.expose(PoolInfo(instance="src", path="", shape=list(SHAPE), dtype="float32"), src)
        backend.register_pool(remote)
        job = TransferJob("r", "src", [1, 2, 3, 7], "dst", [5, 6, 7, 0])
        for layer in range(SHAPE[0]):
            backend.send(job, layer)  # submitted: the writes land while we go on
        wait_until(lambda: backend.poll(job) is not TransferState.PENDING, timeout=30, what="landing")
        assert backend.poll(job) is TransferState.DONE
        assert job.bytes_moved == backend.job_bytes(job) == 3 * 2 * 4 * (4 * 2 * 8 * 4) and not job.error
        parent.send("read")
        dst = torch.from_numpy(_answer(parent, proc))
        assert torch.equal(dst[:, :, [5, 6, 7, 0]], src[:, :, [1, 2, 3, 7]])
        untouched = [i for i in range(12) if i not in (5, 6, 7, 0)]
        assert not dst[:, :, untouched].any()
        bogus = PoolInfo(instance="dst2", path="", shape=list(SHAPE), dtype="float32", segment="127.0.0.1:1",
                         base_addr=remote.base_addr)
        backend.register_pool(bogus)
        with pytest.raises(MooncakeError, match="127.0.0.1:1"):
            backend.send(TransferJob("r2", "src", [1], "dst2", [1]), 0)
        # a write the peer refuses (outside its registered memory) fails its job once it settled
        outside = msgspec.structs.replace(remote, instance="dst3", base_addr=remote.base_addr + (1 << 30))
        backend.register_pool(outside)
        refused = TransferJob("r3", "src", [1], "dst3", [1])
        backend.send(refused, 0)
        wait_until(lambda: backend.poll(refused) is not TransferState.PENDING, timeout=30, what="settling")
        assert backend.poll(refused) is TransferState.FAILED and "dst3" in refused.error
    finally:
        if proc.is_alive():
            parent.send("done")
        proc.join(timeout=30)


def test_the_transfer_follows_pools_published_anew(monkeypatch):
    """Another machine's decode restarted: its pool is published anew (another segment or address) and
    the transfer writes there from its next refresh; a local engine that restarted is exposed again."""
    from pdpipe.transfer import FakeTransfer
    from pdpipe.transfer import machine as machine_mod

    class Registry:
        ttl = 3.0

        def __init__(self):
            self.pools, self.published = {}, []

        def pool(self, name):
            return self.pools.get(name)

        def publish_pool(self, info):
            self.published.append(info)

    class Remote(FakeTransfer):
        def __init__(self):
            super().__init__()
            self.exposed = []

        def expose(self, info, tensor):
            self.exposed.append(info.path)
            return msgspec.structs.replace(info, segment="127.0.0.1:9", base_addr=4096)

    monkeypatch.setattr(machine_mod, "_pool_tensor", lambda info: torch.zeros(1))
    registry, remote = Registry(), Remote()
    transfer = machine_mod.MachineTransfer(FakeTransfer(), Path("/nonexistent"), remote, registry, "a")
    old = PoolInfo(instance="b-decode-0", path="", shape=list(SHAPE), dtype="float32", segment="10.0.0.2:7",
                   base_addr=1 << 20)
    registry.pools["b-decode-0"] = old
    transfer.register_pool(old)
    transfer._next_publish = 0.0
    transfer.refresh()
    assert remote.pools["b-decode-0"] == old
    transfer.local_names.add("a-prefill-0")
    running = TransferJob("r", "a-prefill-0", [1], "b-decode-0", [2])
    transfer.send(running, 0)  # its blocks are in the old pool
    registry.pools["b-decode-0"] = new = msgspec.structs.replace(old, segment="10.0.0.2:8", base_addr=1 << 21)
    transfer._next_publish = 0.0
    transfer.refresh()
    assert remote.pools["b-decode-0"] == new
    with pytest.raises(TransferError, match="pool was replaced"):
        transfer.send(running, 1)  # not into the new pool, at block ids of the old one
    transfer.send(TransferJob("r2", "a-prefill-0", [1], "b-decode-0", [3]), 0)  # a new job writes there
    local = PoolInfo(instance="a-prefill-0", path="/dev/shm/one", shape=list(SHAPE), dtype="float32")
    transfer.register_pool(local)
    transfer.register_pool(local)  # the same pool announced again: exposed once
    transfer.register_pool(msgspec.structs.replace(local, path="/dev/shm/two"))  # its engine restarted
    assert remote.exposed == ["/dev/shm/one", "/dev/shm/two"]
    assert registry.published[-1].path == "/dev/shm/two" and registry.published[-1].machine == "a"
