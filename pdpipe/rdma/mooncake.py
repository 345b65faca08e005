"""The Mooncake Transfer Engine as a transfer backend: registers this machine's pools, writes a job's
blocks into a peer machine's published pool (one batch of writes a layer and destination segment) or, for a
pull, reads a peer's cached blocks into a pool of this machine's (one batch of reads a layer and source
segment), and waits for the batches on a thread of its own. Integer return codes become `MooncakeError`."""
from __future__ import annotations

import queue
import threading
import time
from dataclasses import dataclass

import msgspec
import torch

from pdpipe.messages import PoolInfo
from pdpipe.transfer.base import RankedBackend, TransferError, TransferJob, TransferState

from .writes import block_writes


class MooncakeError(TransferError):
    """A Mooncake call that returned an error code: the call, the peer and the code."""


def _check(rc: int, op: str, peer: str = "") -> None:
    if rc != 0:
        raise MooncakeError(f"mooncake {op}{' to ' + peer if peer else ''} failed with code {rc}")


@dataclass
class _Flight:
    """A job's batches: how many are still in flight, since when, and the first failure."""

    since: float
    pending: int = 0
    moved: int = 0
    error: str = ""


_NO_BATCH = (0, 2**64 - 1)  # what a refused submit returns (an unsigned -1 when the peer cannot be opened)


class MooncakeTransfer(RankedBackend):
    def __init__(self, hostname: str, protocol: str = "tcp", device_names: str = ""):
        from mooncake.engine import TransferEngine  # imported here: only cross-machine setups need it

        if protocol not in ("tcp", "rdma"):
            raise ValueError(f"protocol: {protocol!r}; allowed: tcp, rdma")
        super().__init__()  # pools[instance][rank]: (the local tensor, or None for another machine's; info)
        self.engine = TransferEngine()
        _check(self.engine.initialize(hostname, "P2PHANDSHAKE", protocol, device_names), "initialize",
               f"{hostname} ({protocol})")
        self.segment = f"{hostname}:{self.engine.get_rpc_port()}"
        self._flights: dict[str, _Flight] = {}
        # a thread waits for each submitted batch (every write of it, in Mooncake's own wait) and
        # passes its outcome to poll(): the transfer loop never blocks on a write
        self._submitted: queue.SimpleQueue = queue.SimpleQueue()
        self._settled: queue.SimpleQueue = queue.SimpleQueue()
        threading.Thread(target=self._wait_batches, name="mooncake-wait", daemon=True).start()

    def expose(self, info: PoolInfo, pool: torch.Tensor) -> PoolInfo:
        """Registers a local pool (a rank's) with the engine (again when its engine restarted with a new
        one); returns its info as peers need it."""
        old = self.pools.get(info.instance, {}).get(info.rank)
        if old is not None and old[0] is not None:
            self.engine.unregister_memory(old[0].data_ptr())
        _check(self.engine.register_memory(pool.data_ptr(), pool.numel() * pool.element_size()),
               "register_memory", info.instance)
        published = msgspec.structs.replace(info, shape=list(pool.shape), gpu=-1, ipc_handle=b"", ipc_offset=0,
                                            segment=self.segment, base_addr=pool.data_ptr())
        self.pools.setdefault(info.instance, {})[info.rank] = (pool, published)
        self._checked = {pair for pair in self._checked if info.instance not in pair}
        return published

    def open(self, pool: PoolInfo) -> None:
        """Another machine's pool: written through its segment, nothing to open here."""
        if not pool.segment:
            raise TransferError(f"{pool.instance}: its pool was not published with a transfer segment")

    def send_group(self, jobs: list[TransferJob], layer: int, count: int) -> None:
        for job in jobs:
            for one in range(layer, layer + count):
                self.send(job, one)

    def send(self, job: TransferJob, layer: int) -> None:
        """Submits `layer` of the job: one batch of writes a destination segment, or for a pull (this
        machine's pool filled from another's) one batch of reads a source segment."""
        src, dst, plan = self.copy_plan(job)
        here, there = (dst, src) if job.pull else (src, dst)
        if any(tensor is None for tensor, _ in here.values()):
            instance = job.dst_instance if job.pull else job.src_instance
            raise TransferError(f"request {job.request_id}: {instance}'s pools are not this machine's")
        by_segment: dict[str, list[tuple[int, int, int]]] = {}
        for s_rank, s_heads, d_rank, d_heads in plan:
            peer = (src[s_rank] if job.pull else dst[d_rank])[1].segment
            by_segment.setdefault(peer, []).extend(block_writes(
                src[s_rank][1], dst[d_rank][1], layer, job.src_block_ids, job.dst_block_ids, s_heads, d_heads))
        flight = self._flights.setdefault(job.request_id, _Flight(time.perf_counter()))
        for segment, writes in by_segment.items():
            srcs, dsts, lengths = (list(column) for column in zip(*writes))
            if job.pull:  # local buffers first, the peer's addresses second, as for writes
                batch = self.engine.batch_transfer_async_read(segment, dsts, srcs, lengths)
            else:
                batch = self.engine.batch_transfer_async_write(segment, srcs, dsts, lengths)
            if batch in _NO_BATCH or batch < 0:
                peer = job.src_instance if job.pull else job.dst_instance
                raise MooncakeError(f"mooncake batch {'read from' if job.pull else 'write to'} {segment} ({peer}, "
                                    f"request {job.request_id}, layer {layer}) could not be submitted")
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
                flight.error = f"mooncake copy of layer {layer} failed or timed out (code {rc})"

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
            job.error = f"{flight.error}, {'from ' + job.src_instance if job.pull else 'to ' + job.dst_instance}"
            return TransferState.FAILED
        return TransferState.DONE

    def abort(self, job: TransferJob) -> None:
        self._flights.pop(job.request_id, None)  # what still settles for it is dropped
