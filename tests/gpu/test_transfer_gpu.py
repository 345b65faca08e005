"""KV between processes' GPU pools: a pool read through its CUDA IPC handle on another GPU, the CUDA IPC
backend running job after job as the transfer process does, Mooncake moving a GPU pool's blocks over
TCP, and NVML's view of the GPUs and of their peer access (which same-machine pairs may exchange KV).

Run on a GPU machine: python -m pytest -m gpu tests/gpu
"""
import time

import pytest
import torch

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU")]


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_block_copy_reads_peer_memory_through_ipc_handles():
    """The pool exported by one process, opened through its IPC handle, copied from on another GPU."""
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=_export_pool, args=(child,))
    proc.start()
    try:
        handle, offset, shape, checksum = parent.recv()
        from pdpipe.ipc.cuda import open_pool
        from pdpipe.kernels import triton_ops

        src = open_pool(handle, offset, shape, torch.bfloat16, 1)
        with torch.cuda.device(1):
            dst = torch.zeros(shape, dtype=torch.bfloat16, device="cuda:1")
            ids = torch.arange(shape[2], dtype=torch.int32, device="cuda:1")
            triton_ops.copy_pool_blocks(src, ids, dst, ids.flip(0), 0, shape[0])
            torch.cuda.synchronize()
        assert dst.float().sum().item() == pytest.approx(checksum, rel=1e-3)
        assert torch.equal(dst[:, :, 0].cpu(), src[:, :, -1].cpu())
    finally:
        parent.send("done")
        proc.join(timeout=30)


def _own_pool(conn, device, shape):
    from pdpipe.ipc.cuda import CudaPool

    pool = CudaPool(shape, torch.bfloat16, device)
    pool.tensor.copy_(torch.randn(shape, device=f"cuda:{device}").to(torch.bfloat16))
    torch.cuda.synchronize(device)
    handle, offset = pool.export()
    conn.send((handle, offset))
    while conn.recv() != "done":
        conn.send(pool.tensor.cpu())
    pool.close()


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_cuda_ipc_backend_runs_job_after_job():
    """The transfer process's backend against two other processes' pools, many jobs in a row, as the
    pipeline runs it (the GPU pipeline once stalled on its second job)."""
    import multiprocessing as mp

    from pdpipe.ipc.cuda_transfer import CudaIpcTransfer
    from pdpipe.messages import PoolInfo
    from pdpipe.transfer.base import TransferJob, TransferState

    shape = (4, 2, 64, 16, 8, 128)
    ctx = mp.get_context("spawn")
    owners, infos = [], {}
    for name, device in (("p", 0), ("d", 1)):
        parent, child = ctx.Pipe()
        proc = ctx.Process(target=_own_pool, args=(child, device, shape))
        proc.start()
        handle, offset = parent.recv()
        owners.append((parent, proc))
        infos[name] = PoolInfo(instance=name, path="", shape=list(shape), dtype="bfloat16", gpu=device,
                               ipc_handle=handle, ipc_offset=offset)
    try:
        backend = CudaIpcTransfer()
        for info in infos.values():
            backend.register_pool(info)
        owners[0][0].send("pool")
        src = owners[0][0].recv()
        for i in range(12):
            n = 1 + i % 5
            job = TransferJob(f"r{i}", "p", list(range(i, i + n)), "d", list(range(40 + i, 40 + i + n)))
            for layer in range(shape[0]):
                backend.send(job, layer)
            deadline = time.monotonic() + 30
            while backend.poll(job) is TransferState.PENDING:
                assert time.monotonic() < deadline, f"job {i} did not land within 30 s"
            backend.finished(job)
            owners[1][0].send("pool")
            dst = owners[1][0].recv()
            assert torch.equal(dst[:, :, job.dst_block_ids], src[:, :, job.src_block_ids]), f"job {i}"
        batch = [TransferJob(f"b{i}", "p", [20 + 3 * i, 21 + 3 * i], "d", [10 + 2 * i, 11 + 2 * i]) for i in range(3)]
        # requests one prefill step completed: one launch for all, for three layers announced together
        # (a short prompt's) and then for the last layer on its own
        backend.send_batch(batch, 0, shape[0] - 1)
        backend.send_batch(batch, shape[0] - 1)
        deadline = time.monotonic() + 30
        while any(backend.poll(job) is TransferState.PENDING for job in batch):
            assert time.monotonic() < deadline, "the batch did not land within 30 s"
        owners[1][0].send("pool")
        dst = owners[1][0].recv()
        for job in batch:
            assert job.layers_sent == set(range(shape[0])) and job.bytes_moved == backend.job_bytes(job)
            assert torch.equal(dst[:, :, job.dst_block_ids], src[:, :, job.src_block_ids]), job.request_id
    finally:
        for parent, proc in owners:
            parent.send("done")
            proc.join(timeout=30)


def _export_pool(conn):
    from pdpipe.ipc.cuda import CudaPool

    pool = CudaPool((2, 2, 10, 16, 8, 128), torch.bfloat16, 0)
    pool.tensor.copy_(torch.randn(pool.shape, device="cuda:0").to(torch.bfloat16))
    torch.cuda.synchronize()
    handle, offset = pool.export()
    conn.send((handle, offset, pool.shape, pool.tensor.float().sum().item()))
    conn.recv()
    pool.close()


def _mooncake_gpu_receiver(conn, shape):
    from pdpipe.ipc.cuda import CudaPool
    from pdpipe.messages import PoolInfo
    from pdpipe.rdma.mooncake import MooncakeTransfer

    pool = CudaPool(shape, torch.bfloat16, 1)  # zeroed
    backend = MooncakeTransfer("127.0.0.1", "tcp")
    conn.send(backend.expose(PoolInfo(instance="dst", path="", shape=list(shape), dtype="bfloat16"), pool.tensor))
    conn.recv()
    conn.send(pool.tensor.cpu())
    conn.recv()


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_mooncake_moves_a_gpu_pool_between_processes_over_tcp():
    import multiprocessing as mp

    pytest.importorskip("mooncake.engine")
    from pdpipe.ipc.cuda import CudaPool
    from pdpipe.messages import PoolInfo
    from pdpipe.rdma.mooncake import MooncakeTransfer
    from pdpipe.transfer.base import TransferJob, TransferState

    shape = (4, 2, 40, 16, 8, 128)
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=_mooncake_gpu_receiver, args=(child, shape))
    proc.start()
    try:
        assert parent.poll(120), "the receiving process did not publish its pool"
        remote = parent.recv()
        src = CudaPool(shape, torch.bfloat16, 0)
        src.tensor.copy_(torch.randn(shape, device="cuda:0").to(torch.bfloat16))
        torch.cuda.synchronize(0)
        backend = MooncakeTransfer("127.0.0.1", "tcp")
        backend.expose(PoolInfo(instance="src", path="", shape=list(shape), dtype="bfloat16"), src.tensor)
        backend.register_pool(remote)
        job = TransferJob("r", "src", [3, 4, 5, 17, 30], "dst", [0, 1, 2, 39, 8])
        for layer in range(shape[0]):
            backend.send(job, layer)
        deadline = time.monotonic() + 60
        while backend.poll(job) is TransferState.PENDING and time.monotonic() < deadline:
            pass  # the writes were submitted; poll until they land
        assert backend.poll(job) is TransferState.DONE and job.bytes_moved == backend.job_bytes(job)
        parent.send("read")
        dst = parent.recv()
        expected = src.tensor.cpu()
        assert torch.equal(dst[:, :, job.dst_block_ids], expected[:, :, job.src_block_ids])
        others = [i for i in range(shape[2]) if i not in job.dst_block_ids]
        assert not dst[:, :, others].any()
    finally:
        if proc.is_alive():
            parent.send("done")
        proc.join(timeout=30)


def test_nvml_sees_the_gpus_and_their_peer_access():
    from pdpipe import gpus

    first = gpus.figures(0)
    assert first is not None and first.memory_total > 16 * 2**30 and 0 <= first.utilization <= 100
    if torch.cuda.device_count() >= 2:
        assert gpus.peer_access(0, 1) is torch.cuda.can_device_access_peer(0, 1)
