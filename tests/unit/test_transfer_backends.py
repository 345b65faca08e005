"""The same-machine GPU backend's bookkeeping on CPU: CUDA's device, streams and events replaced by
host stand-ins and the pools by host tensors, so what CI checks is the backend's own logic — one
launch per layer for the requests a step completed, blocks gathered into the right places, ids
reused across layers, completion only when the last launch's event has completed."""
import contextlib

import pytest
import torch

from pdpipe.ipc import cuda_transfer
from pdpipe.messages import PoolInfo
from pdpipe.transfer.base import TransferJob, TransferState

SHAPE = (3, 2, 16, 4, 2, 8)  # layers, K/V, blocks, block size, heads, dim


class HostEvent:
    def __init__(self, enable_timing=False):
        self.done = False

    def record(self, stream=None):
        stream.pending.append(self)

    def query(self):
        return self.done

    def elapsed_time(self, other):
        return 1.0


class HostStream:
    def __init__(self, device=None):
        self.pending: list[HostEvent] = []

    def finish(self):
        for event in self.pending:
            event.done = True
        self.pending.clear()


def host_backend(monkeypatch, pools: dict[bytes, torch.Tensor]):
    """A CudaIpcTransfer over host tensors (`pools` by IPC handle), and the list of its launches:
    (first layer, layers, source heads, destination heads) each."""
    launches = []
    cuda = cuda_transfer.torch.cuda
    monkeypatch.setattr(cuda, "device", lambda device: contextlib.nullcontext())
    monkeypatch.setattr(cuda, "stream", lambda stream: contextlib.nullcontext())
    monkeypatch.setattr(cuda, "Stream", HostStream)
    monkeypatch.setattr(cuda, "Event", HostEvent)
    monkeypatch.setattr(cuda_transfer, "visible_ordinal", lambda gpu: "cpu")
    monkeypatch.setattr(cuda_transfer, "open_pool", lambda handle, offset, shape, dtype, device: pools[handle])
    copy = cuda_transfer.kernels.copy_pool_blocks

    def counted(*args):
        launches.append(args[4:])
        copy(*args)

    monkeypatch.setattr(cuda_transfer.kernels, "copy_pool_blocks", counted)
    return cuda_transfer.CudaIpcTransfer(), launches


@pytest.fixture
def backend(monkeypatch):
    pools = {b"p" * 64: torch.randn(SHAPE), b"d" * 64: torch.zeros(SHAPE)}
    b, launches = host_backend(monkeypatch, pools)
    for name, gpu in (("p", 0), ("d", 1)):
        b.register_pool(PoolInfo(instance=name, path="", shape=list(SHAPE), dtype="float32", gpu=gpu,
                                 ipc_handle=name.encode() * 64))
    return b, pools[b"p" * 64], pools[b"d" * 64], launches


@pytest.mark.parametrize("src_tp,dst_tp", [(2, 1), (1, 2), (2, 2)])
def test_instances_of_different_tp_exchange_exactly_their_heads(monkeypatch, src_tp, dst_tp):
    """Pools a rank (each holding its key/value heads) on both sides: every destination rank gets its
    heads from the rank that holds them, one launch a run of heads a layer, and the job lands only once
    every launch has completed."""
    whole = torch.randn(SHAPE)  # what the source instance's ranks hold between them (2 heads)
    pools, infos = {}, []
    for name, tp in (("p", src_tp), ("d", dst_tp)):
        for rank in range(tp):
            heads = list(range(2))[rank::tp] if tp == 2 else [0, 1]
            handle = f"{name}{rank}".encode() * 32
            shape = (*SHAPE[:4], len(heads), SHAPE[5])
            pools[handle] = whole[..., heads, :].clone() if name == "p" else torch.zeros(shape)
            infos.append(PoolInfo(instance=name, path="", shape=list(shape), dtype="float32", gpu=rank,
                                  ipc_handle=handle, rank=rank, kv_heads=heads, tp=tp, group=f"{name}-start"))
    b, launches = host_backend(monkeypatch, pools)
    for info in infos:
        b.register_pool(info)
    job = TransferJob("a", "p", [1, 5, 6], "d", [9, 2, 3])
    for layer in range(SHAPE[0]):
        b.send_batch([job], layer)
    runs = 1 if src_tp == dst_tp == 1 else 2
    assert len(launches) == runs * SHAPE[0]
    got = torch.cat([pools[f"d{r}".encode() * 32] for r in range(dst_tp)], dim=4) if dst_tp == 2 else pools[b"d0" * 32]
    assert torch.equal(got[:, :, job.dst_block_ids], whole[:, :, job.src_block_ids])
    assert job.bytes_moved == b.job_bytes(job) == 3 * SHAPE[0] * whole[0, :, 0].numel() * 4
    assert b.poll(job) is TransferState.PENDING
    b._streams["cpu"].finish()
    assert b.poll(job) is TransferState.DONE


def test_one_launch_per_layer_moves_every_request_of_the_batch(backend):
    b, src, dst, launches = backend
    jobs = [TransferJob("a", "p", [1, 2], "d", [7, 3]), TransferJob("b", "p", [5], "d", [0]),
            TransferJob("c", "p", [9, 10, 11], "d", [12, 13, 14])]
    for layer in range(SHAPE[0]):
        b.send_batch(jobs, layer)
    assert [x[:2] for x in launches] == [(0, 1), (1, 1), (2, 1)]  # one per layer, all three requests in it
    for job in jobs:
        assert torch.equal(dst[:, :, job.dst_block_ids], src[:, :, job.src_block_ids])
        assert job.layers_sent == {0, 1, 2} and job.bytes_moved == b.job_bytes(job)
    assert {id(b._flights[j.request_id].ids["cpu"][0]) for j in jobs} == {id(b._flights["a"].ids["cpu"][0])}  # once
    assert all(b.poll(j) is TransferState.PENDING for j in jobs)
    b._streams["cpu"].finish()
    assert all(b.poll(j) is TransferState.DONE for j in jobs)


def test_a_request_leaving_the_batch_regroups_the_rest(backend):
    b, src, dst, launches = backend
    a, c = TransferJob("a", "p", [1], "d", [2]), TransferJob("c", "p", [3], "d", [4])
    b.send_batch([a, c], 0)
    b.abort(a)  # (the worker aborts only once poll is no longer PENDING; the bookkeeping is the same)
    b.send_batch([c], 1)
    b.send_batch([c], 2)
    assert [x[:2] for x in launches] == [(0, 1), (1, 1), (2, 1)] and b._flights["c"].group == ("c",)
    assert torch.equal(dst[:, :, [4]], src[:, :, [3]]) and not dst[1:, :, [2]].any()


def test_layers_announced_together_go_in_one_launch(backend):
    """A short prompt's layers come in one message: one launch moves them all, and the job lands only
    once that launch has completed."""
    b, src, dst, launches = backend
    jobs = [TransferJob("a", "p", [4, 6], "d", [1, 8]), TransferJob("b", "p", [2], "d", [5])]
    b.send_batch(jobs, 0, 2)
    b.send_batch(jobs, 2)
    assert [x[:2] for x in launches] == [(0, 2), (2, 1)]
    for job in jobs:
        assert torch.equal(dst[:, :, job.dst_block_ids], src[:, :, job.src_block_ids])
        assert job.layers_sent == {0, 1, 2} and job.bytes_moved == b.job_bytes(job)
        assert b._flights[job.request_id].layers == [0, 1, 2]
    assert all(b.poll(j) is TransferState.PENDING for j in jobs)
    b._streams["cpu"].finish()
    assert all(b.poll(j) is TransferState.DONE for j in jobs)


def test_a_layer_span_beyond_the_pools_is_refused():
    from pdpipe import kernels

    src, dst, ids = torch.randn(SHAPE), torch.zeros(SHAPE), torch.tensor([1, 2])
    for first, count in ((2, 2), (-1, 1), (0, 0)):
        with pytest.raises(AssertionError):
            kernels.copy_pool_blocks(src, ids, dst, ids, first, count)
    assert not dst.any()
    kernels.copy_pool_blocks(src, ids, dst, ids, 1, 2)
    assert torch.equal(dst[1:, :, [1, 2]], src[1:, :, [1, 2]]) and not dst[0].any()
