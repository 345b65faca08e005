"""The same-machine GPU backend's bookkeeping on CPU: CUDA's device, streams and events replaced by
host stand-ins and the pools by host tensors, so what CI checks is the backend's own logic — one
launch per layer for the requests a step completed, blocks gathered into the right places, ids
reused across layers, completion only when the last launch's event has completed."""
import contextlib

import pytest
import torch

from pdpipe.ipc import cuda_transfer
from pdpipe.messages import PoolInfo
from pdpipe.transfer import TransferJob, TransferState

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


@pytest.fixture
def backend(monkeypatch):
    pools = {b"p" * 64: torch.randn(SHAPE), b"d" * 64: torch.zeros(SHAPE)}
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
        launches.append(args[4:6])  # (first layer, layers)
        copy(*args)

    monkeypatch.setattr(cuda_transfer.kernels, "copy_pool_blocks", counted)
    b = cuda_transfer.CudaIpcTransfer()
    for name, gpu in (("p", 0), ("d", 1)):
        b.register_pool(PoolInfo(instance=name, path="", shape=list(SHAPE), dtype="float32", gpu=gpu,
                                 ipc_handle=name.encode() * 64))
    return b, pools[b"p" * 64], pools[b"d" * 64], launches


def test_one_launch_per_layer_moves_every_request_of_the_batch(backend):
    b, src, dst, launches = backend
    jobs = [TransferJob("a", "p", [1, 2], "d", [7, 3]), TransferJob("b", "p", [5], "d", [0]),
            TransferJob("c", "p", [9, 10, 11], "d", [12, 13, 14])]
    for layer in range(SHAPE[0]):
        b.send_batch(jobs, layer)
    assert launches == [(0, 1), (1, 1), (2, 1)]  # one per layer, all three requests in it
    for job in jobs:
        assert torch.equal(dst[:, :, job.dst_block_ids], src[:, :, job.src_block_ids])
        assert job.layers_sent == {0, 1, 2} and job.bytes_moved == b.job_bytes(job)
    assert {id(b._flights[j.request_id].src_ids) for j in jobs} == {id(b._flights["a"].src_ids)}  # built once
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
    assert launches == [(0, 1), (1, 1), (2, 1)] and b._flights["c"].group == ("c",)
    assert torch.equal(dst[:, :, [4]], src[:, :, [3]]) and not dst[1:, :, [2]].any()


def test_layers_announced_together_go_in_one_launch(backend):
    """A short prompt's layers come in one message: one launch moves them all, and the job lands only
    once that launch has completed."""
    b, src, dst, launches = backend
    jobs = [TransferJob("a", "p", [4, 6], "d", [1, 8]), TransferJob("b", "p", [2], "d", [5])]
    b.send_batch(jobs, 0, 2)
    b.send_batch(jobs, 2)
    assert launches == [(0, 2), (2, 1)]
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
