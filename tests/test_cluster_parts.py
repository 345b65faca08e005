"""The cluster's parts on their own: the registry's TTLs, topics whose messages expire, block
coalescing, and the Mooncake backend moving a pool's blocks between two processes over TCP."""
import multiprocessing as mp
import time

import msgspec
import pytest
import torch
from cluster_hosts import RedisServer
from pipeline_launch import wait_until

from pdpipe.cluster import Envelope, InstanceEntry, Registry
from pdpipe.messages import PoolInfo
from pdpipe.rdma import MooncakeError, MooncakeTransfer, coalesce
from pdpipe.transfer import TransferJob


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
            backend.send(job, layer)
        assert job.bytes_moved == backend.job_bytes(job) == 3 * 2 * 4 * (4 * 2 * 8 * 4)
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
    finally:
        if proc.is_alive():
            parent.send("done")
        proc.join(timeout=30)
