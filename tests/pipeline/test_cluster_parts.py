"""The cluster's parts on their own: the registry's TTLs, topics whose messages expire, block
coalescing, the writes between pools of different tensor parallelism, and the Mooncake backend moving
a pool's blocks between two processes over TCP (also between instances of a pool a rank)."""
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
from pdpipe.rdma.mooncake import MooncakeError, MooncakeTransfer
from pdpipe.rdma.writes import block_writes, coalesce
from pdpipe.transfer.base import TransferError, TransferJob, TransferState


@pytest.fixture(scope="module")
def redis_url():
    server = RedisServer(["127.0.0.1"]).start()
    yield server.url("127.0.0.1")
    server.remove()


def test_coalesce_merges_runs_contiguous_on_both_sides():
    assert coalesce([4, 5, 6, 9, 10, 2], [0, 1, 2, 3, 7, 8]) == [(4, 0, 3), (9, 3, 1), (10, 7, 1), (2, 8, 1)]
    assert coalesce([], []) == []



@pytest.mark.parametrize("src_heads,dst_heads,src_n,dst_n", [
    (None, None, 2, 2), (slice(0, 1), slice(1, 2), 1, 2), (slice(1, 2), slice(0, 1), 2, 1),
    (slice(0, 2), slice(2, 4), 2, 4)])
def test_block_writes_move_what_the_reference_copy_moves(src_heads, dst_heads, src_n, dst_n):
    """The writes (addresses from each pool's base) applied to the pools' bytes move exactly what the
    reference block copy moves, for whole blocks and for runs of heads between pools of other heads."""
    from pdpipe.kernels import reference

    shape = lambda heads: (3, 2, 12, 4, heads, 8)  # noqa: E731
    src, dst = torch.randn(shape(src_n)), torch.randn(shape(dst_n))
    expected = dst.clone()
    src_ids, dst_ids = [1, 2, 3, 9], [5, 6, 7, 0]
    reference.copy_pool_blocks(src, torch.tensor(src_ids), expected, torch.tensor(dst_ids), 0, 3, src_heads, dst_heads)
    info = lambda t: PoolInfo(instance="x", path="", shape=list(t.shape), dtype="float32")  # noqa: E731
    src_bytes, dst_bytes = src.view(-1).view(torch.uint8), dst.view(-1).view(torch.uint8)
    writes = [w for layer in range(3) for w in block_writes(info(src), info(dst), layer, src_ids, dst_ids,
                                                             src_heads, dst_heads)]
    for s, d, n in writes:
        dst_bytes[d:d + n] = src_bytes[s:s + n]
    assert torch.equal(dst, expected)
    if src_heads is None:
        assert len(writes) == 3 * 2 * 2  # a layer, K and V: runs 1-3 → 5-7 and 9 → 0


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



def _rank_receiver(conn, tp, heads_each):
    """A decode instance of `tp` ranks on another machine: a pool a rank, each exposed and published."""
    backend = MooncakeTransfer("127.0.0.1", "tcp")
    pools, infos = [], []
    for rank in range(tp):
        pools.append(torch.zeros(*SHAPE[:4], heads_each, SHAPE[5]))
        heads = list(range(rank * heads_each, (rank + 1) * heads_each))
        infos.append(backend.expose(PoolInfo(instance="dst", path="", shape=list(pools[-1].shape), dtype="float32",
                                             rank=rank, kv_heads=heads, tp=tp, group="d-start"), pools[-1]))
    conn.send(infos)
    conn.recv()
    conn.send([p.numpy().copy() for p in pools])
    conn.recv()


@pytest.mark.parametrize("src_tp,dst_tp", [(2, 1), (1, 2), (2, 2)])
def test_mooncake_moves_kv_between_instances_of_a_pool_a_rank(src_tp, dst_tp):
    """Each destination rank's pool gets exactly its heads of the blocks, from whichever source rank
    holds them, over TCP; the job lands once every batch (one a destination segment a layer) has."""
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=_rank_receiver, args=(child, dst_tp, 2 // dst_tp))
    proc.start()
    try:
        remote = _answer(parent, proc)
        whole = torch.randn(SHAPE)  # 2 heads
        backend = MooncakeTransfer("127.0.0.1", "tcp")
        per = 2 // src_tp
        for rank in range(src_tp):
            heads = list(range(rank * per, (rank + 1) * per))
            backend.expose(PoolInfo(instance="src", path="", shape=[*SHAPE[:4], per, SHAPE[5]], dtype="float32",
                                    rank=rank, kv_heads=heads, tp=src_tp, group="p-start"),
                           whole[..., heads, :].clone())
        for info in remote:
            backend.register_pool(info)
        job = TransferJob("r", "src", [1, 2, 3, 7], "dst", [5, 6, 7, 0])
        for layer in range(SHAPE[0]):
            backend.send(job, layer)
        wait_until(lambda: backend.poll(job) is not TransferState.PENDING, timeout=30, what="landing")
        assert backend.poll(job) is TransferState.DONE and not job.error
        assert job.bytes_moved == backend.job_bytes(job) == SHAPE[0] * 2 * 4 * (4 * 2 * 8 * 4)
        parent.send("read")
        got = torch.cat([torch.from_numpy(a) for a in _answer(parent, proc)], dim=4)
        assert torch.equal(got[:, :, [5, 6, 7, 0]], whole[:, :, [1, 2, 3, 7]])
        assert not got[:, :, [i for i in range(12) if i not in (5, 6, 7, 0)]].any()
    finally:
        if proc.is_alive():
            parent.send("done")
        proc.join(timeout=30)


def test_the_transfer_follows_pools_published_anew(monkeypatch):
    """Another machine's decode restarted: its pool is published anew (another segment or address) and
    the transfer writes there from its next refresh; a local engine that restarted is exposed again."""
    from pdpipe.transfer import machine as machine_mod
    from pdpipe.transfer.base import FakeTransfer

    class Registry:
        ttl = 3.0

        def __init__(self):
            self.pools, self.published = {}, []

        def pool(self, name, rank=0):
            return self.pools.get(name) if rank == 0 else None

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
    assert remote.pools["b-decode-0"][0][1] == old
    transfer.local_names.add("a-prefill-0")
    running = TransferJob("r", "a-prefill-0", [1], "b-decode-0", [2])
    transfer.send(running, 0)  # its blocks are in the old pool
    registry.pools["b-decode-0"] = new = msgspec.structs.replace(old, segment="10.0.0.2:8", base_addr=1 << 21)
    transfer._next_publish = 0.0
    transfer.refresh()
    assert remote.pools["b-decode-0"][0][1] == new
    with pytest.raises(TransferError, match="pool was replaced"):
        transfer.send(running, 1)  # not into the new pool, at block ids of the old one
    transfer.send(TransferJob("r2", "a-prefill-0", [1], "b-decode-0", [3]), 0)  # a new job writes there
    local = PoolInfo(instance="a-prefill-0", path="/dev/shm/one", shape=list(SHAPE), dtype="float32")
    transfer.register_pool(local)
    transfer.register_pool(local)  # the same pool announced again: exposed once
    transfer.register_pool(msgspec.structs.replace(local, path="/dev/shm/two"))  # its engine restarted
    assert remote.exposed == ["/dev/shm/one", "/dev/shm/two"]
    assert registry.published[-1].path == "/dev/shm/two" and registry.published[-1].machine == "a"


def test_a_remote_instance_of_two_ranks_is_used_once_both_published(monkeypatch):
    """Rank 1 of another machine's TP2 decode publishes after its rank 0: a job meanwhile fails naming
    the missing rank, the next one (rank 1 published) goes through; back with one rank, the second is
    forgotten."""
    from pdpipe.transfer import machine as machine_mod
    from pdpipe.transfer.base import FakeTransfer

    class Registry:
        ttl = 3.0

        def __init__(self):
            self.pools = {}

        def pool(self, name, rank=0):
            return self.pools.get((name, rank))

        def publish_pool(self, info):
            pass

    registry, remote = Registry(), FakeTransfer()
    transfer = machine_mod.MachineTransfer(FakeTransfer(), Path("/nonexistent"), remote, registry, "a")
    transfer.local_names.add("a-prefill-0")
    rank = lambda r, tp=2: PoolInfo(instance="b-decode-0", path="", shape=list(SHAPE), dtype="float32",  # noqa: E731
                                    segment="10.0.0.2:7", base_addr=1 << 20, rank=r, tp=tp, group="g")
    registry.pools["b-decode-0", 0] = rank(0)
    with pytest.raises(TransferError, match="rank 1 of b-decode-0 has published no pool"):
        transfer.send(TransferJob("r1", "a-prefill-0", [1], "b-decode-0", [2]), 0)
    registry.pools["b-decode-0", 1] = rank(1)
    transfer.send(TransferJob("r2", "a-prefill-0", [1], "b-decode-0", [2]), 0)
    assert sorted(remote.pools["b-decode-0"]) == [0, 1] and remote.sent == [("r2", 0)]
    registry.pools["b-decode-0", 0] = rank(0, tp=1)
    transfer._next_publish = 0.0
    transfer.refresh()
    assert sorted(remote.pools["b-decode-0"]) == [0]
