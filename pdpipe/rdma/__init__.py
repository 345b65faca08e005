"""Cross-machine KV transfer on the Mooncake Transfer Engine.

The same calls run over RDMA NICs (`protocol="rdma"`, `device_names` naming the NICs) and over plain
TCP (`protocol="tcp"`). Each machine's transfer process runs one engine, registers the KV pools of
its machine's engines, and publishes (segment, base address, layout) per pool in the registry; a
job writes the request's blocks into the peer's registered pool, layer by layer, coalescing runs of
contiguous blocks into single writes. Writes are submitted (one batch a layer) and a thread waits for
each batch in Mooncake's own wait (every write of it), so the transfer process goes on with other jobs
meanwhile; a job is done when every batch landed, and failed once every batch settled with one failed
(nothing of it still writes). Integer return codes
become `MooncakeError`.
"""
from __future__ import annotations

import queue
import threading
import time
from dataclasses import dataclass

import torch

from pdpipe.messages import PoolInfo
from pdpipe.transfer import TransferBackend, TransferError, TransferJob, TransferState


class MooncakeError(TransferError):
    """A Mooncake call that returned an error code: the call, the peer and the code."""


def _check(rc: int, op: str, peer: str = "") -> None:
    if rc != 0:
        raise MooncakeError(f"mooncake {op}{' to ' + peer if peer else ''} failed with code {rc}")


def coalesce(src_ids: list[int], dst_ids: list[int]) -> list[tuple[int, int, int]]:
    """(src_start, dst_start, count) runs where both sides are contiguous, in order."""
    runs: list[tuple[int, int, int]] = []
    for s, d in zip(src_ids, dst_ids):
        if runs and runs[-1][0] + runs[-1][2] == s and runs[-1][1] + runs[-1][2] == d:
            runs[-1] = (runs[-1][0], runs[-1][1], runs[-1][2] + 1)
        else:
            runs.append((s, d, 1))
    return runs


def _plane_bytes(info: PoolInfo) -> tuple[int, int]:
    """(bytes of one block in one layer's K or V plane, blocks per plane) of a pool
    [layers, 2, blocks, block_size, heads, dim]."""
    itemsize = torch.empty(0, dtype=getattr(torch, info.dtype)).element_size()
    return info.shape[3] * info.shape[4] * info.shape[5] * itemsize, info.shape[2]


@dataclass
class _Flight:
    """A job's batches: how many are still in flight, since when, and the first failure."""

    since: float
    pending: int = 0
    moved: int = 0
    error: str = ""


_NO_BATCH = (0, 2**64 - 1)  # what a refused submit returns (an unsigned -1 when the peer cannot be opened)


class MooncakeTransfer(TransferBackend):
    def __init__(self, hostname: str, protocol: str = "tcp", device_names: str = ""):
        from mooncake.engine import TransferEngine  # imported here: only cross-machine setups need it

        if protocol not in ("tcp", "rdma"):
            raise ValueError(f"protocol: {protocol!r}; allowed: tcp, rdma")
        self.engine = TransferEngine()
        _check(self.engine.initialize(hostname, "P2PHANDSHAKE", protocol, device_names), "initialize",
               f"{hostname} ({protocol})")
        self.segment = f"{hostname}:{self.engine.get_rpc_port()}"
        self.pools: dict[str, PoolInfo] = {}
        self._local: dict[str, torch.Tensor] = {}
        self._flights: dict[str, _Flight] = {}
        # a thread waits for each submitted batch (every write of it, in Mooncake's own wait) and
        # passes its outcome to poll(): the transfer loop never blocks on a write
        self._submitted: queue.SimpleQueue = queue.SimpleQueue()
        self._settled: queue.SimpleQueue = queue.SimpleQueue()
        threading.Thread(target=self._wait_batches, name="mooncake-wait", daemon=True).start()

    def expose(self, info: PoolInfo, pool: torch.Tensor) -> PoolInfo:
        """Registers a local pool with the engine (again when its engine restarted with a new one);
        returns its info as peers need it."""
        old = self._local.pop(info.instance, None)
        if old is not None:
            self.engine.unregister_memory(old.data_ptr())
        _check(self.engine.register_memory(pool.data_ptr(), pool.numel() * pool.element_size()),
               "register_memory", info.instance)
        self._local[info.instance] = pool
        published = PoolInfo(instance=info.instance, path=info.path, shape=list(pool.shape), dtype=info.dtype,
                             pid=info.pid,
                             segment=self.segment, base_addr=pool.data_ptr())
        self.pools[info.instance] = published
        return published

    def register_pool(self, pool: PoolInfo) -> None:
        if not pool.segment:
            raise TransferError(f"{pool.instance}: its pool was not published with a transfer segment")
        self.pools[pool.instance] = pool

    def send(self, job: TransferJob, layer: int) -> None:
        src, dst = self.pools.get(job.src_instance), self.pools.get(job.dst_instance)
        if src is None or dst is None or job.src_instance not in self._local:
            raise TransferError(f"request {job.request_id}: pools of {job.src_instance} → {job.dst_instance} "
                                "are not both known here")
        block, src_blocks = _plane_bytes(src)
        _, dst_blocks = _plane_bytes(dst)
        srcs, dsts, lengths = [], [], []
        for plane in range(2):
            src_plane = src.base_addr + (layer * 2 + plane) * src_blocks * block
            dst_plane = dst.base_addr + (layer * 2 + plane) * dst_blocks * block
            for s, d, n in coalesce(job.src_block_ids, job.dst_block_ids):
                srcs.append(src_plane + s * block)
                dsts.append(dst_plane + d * block)
                lengths.append(n * block)
        batch = self.engine.batch_transfer_async_write(dst.segment, srcs, dsts, lengths)
        if batch in _NO_BATCH or batch < 0:
            raise MooncakeError(f"mooncake batch write to {dst.segment} ({job.dst_instance}, request "
                                f"{job.request_id}, layer {layer}) could not be submitted")
        flight = self._flights.setdefault(job.request_id, _Flight(time.perf_counter()))
        flight.pending += 1
        self._submitted.put((job.request_id, batch, sum(lengths), layer))
        job.layers_sent.add(layer)

    def _wait_batches(self) -> None:
        while True:
            rid, batch, size, layer = self._submitted.get()
            self._settled.put((rid, self.engine.get_batch_transfer_status([batch]), size, layer))

    def _take_settled(self) -> None:
        while True:
            try:
                rid, rc, size, layer = self._settled.get_nowait()
            except queue.Empty:
                return
            flight = self._flights.get(rid)
            if flight is None:
                continue  # its job was given up
            flight.pending -= 1
            if rc == 0:
                flight.moved += size
            elif not flight.error:
                flight.error = f"mooncake write of layer {layer} failed or timed out (code {rc})"

    def poll(self, job: TransferJob) -> TransferState:
        self._take_settled()
        flight = self._flights.get(job.request_id)
        if flight is None:
            return TransferState.FAILED if job.error else TransferState.DONE
        if flight.pending:
            return TransferState.PENDING
        del self._flights[job.request_id]
        job.seconds += time.perf_counter() - flight.since
        job.bytes_moved += flight.moved
        if flight.error:
            job.error = f"{flight.error}, to {job.dst_instance}"
            return TransferState.FAILED
        return TransferState.DONE

    def abort(self, job: TransferJob) -> None:
        self._flights.pop(job.request_id, None)  # what still settles for it is dropped

    def job_bytes(self, job: TransferJob) -> int:
        info = self.pools.get(job.src_instance)
        if info is None:
            return 0
        block, _ = _plane_bytes(info)
        return 2 * info.shape[0] * block * len(job.src_block_ids)
