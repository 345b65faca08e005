"""The same-machine GPU transfer backend: peer pools opened through CUDA IPC (once, cached), and per
layer one Triton kernel on the destination GPU that gathers the request's scattered blocks from the
source pool over NVLink. The prefill engine announces a layer only once its KV is written (see
EngineWorker), so each copy is launched as its layer is announced; a job is DONE only once its last
copy has completed on the GPU."""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import torch

from pdpipe import kernels
from pdpipe.messages import PoolInfo
from pdpipe.transfer import TransferBackend, TransferError, TransferJob, TransferState

from .cuda import open_pool, visible_ordinal

log = logging.getLogger("pdpipe")
SLOW_COPY_S = 5.0  # a copy still running after this long is reported (with what the GPU says of it)


@dataclass
class _Flight:
    src_ids: torch.Tensor
    dst_ids: torch.Tensor
    start: torch.cuda.Event
    stream: torch.cuda.Stream
    end: torch.cuda.Event | None = None
    layers: list[int] = field(default_factory=list)
    last_launch: float = 0.0
    reported: bool = False


class CudaIpcTransfer(TransferBackend):
    def __init__(self):
        self.pools: dict[str, PoolInfo] = {}
        self._streams: dict[int, torch.cuda.Stream] = {}
        self._flights: dict[str, _Flight] = {}

    def register_pool(self, pool: PoolInfo) -> None:
        if pool.gpu < 0 or not pool.ipc_handle:
            raise TransferError(f"{pool.instance}: its KV pool is not a GPU pool with an IPC handle")
        self.pools[pool.instance] = pool

    def _info(self, instance: str, job: TransferJob) -> PoolInfo:
        info = self.pools.get(instance)
        if info is None:
            raise TransferError(f"request {job.request_id}: no GPU pool registered for {instance}")
        return info

    def _view(self, info: PoolInfo, device: int) -> torch.Tensor:
        return open_pool(info.ipc_handle, info.ipc_offset, tuple(info.shape), getattr(torch, info.dtype), device)

    def send(self, job: TransferJob, layer: int) -> None:
        src, dst = self._info(job.src_instance, job), self._info(job.dst_instance, job)
        device = visible_ordinal(dst.gpu)
        with torch.cuda.device(device):
            if device not in self._streams:
                self._streams[device] = torch.cuda.Stream(device)
            stream = self._streams[device]
            flight = self._flights.get(job.request_id)
            if flight is None:
                flight = _Flight(torch.tensor(job.src_block_ids, dtype=torch.int32, device=device),
                                 torch.tensor(job.dst_block_ids, dtype=torch.int32, device=device),
                                 torch.cuda.Event(enable_timing=True), stream)
                flight.start.record(stream)
                self._flights[job.request_id] = flight
            with torch.cuda.stream(stream):
                kernels.copy_pool_blocks(self._view(src, device), flight.src_ids, self._view(dst, device),
                                         flight.dst_ids, layer, 1)
            flight.end = torch.cuda.Event(enable_timing=True)
            flight.end.record(stream)
        flight.last_launch = time.monotonic()
        flight.layers.append(layer)
        job.layers_sent.add(layer)
        job.bytes_moved += len(job.src_block_ids) * self._layer_block_bytes(src)

    @staticmethod
    def _layer_block_bytes(info: PoolInfo) -> int:
        per_block = 2 * info.shape[3] * info.shape[4] * info.shape[5]  # K and V of one block, one layer
        return per_block * torch.empty(0, dtype=getattr(torch, info.dtype)).element_size()

    def poll(self, job: TransferJob) -> TransferState:
        flight = self._flights.get(job.request_id)
        if flight is None or flight.end is None:
            return TransferState.DONE
        if not flight.end.query():
            if not flight.reported and time.monotonic() - flight.last_launch > SLOW_COPY_S:
                flight.reported = True
                log.warning("%s: copies of layers %s still running %.1f s after the last launch (first copy "
                            "started: %s, stream idle: %s)", job.request_id, flight.layers,
                            time.monotonic() - flight.last_launch, flight.start.query(), flight.stream.query())
            return TransferState.PENDING
        job.seconds = flight.start.elapsed_time(flight.end) / 1e3
        return TransferState.DONE

    def abort(self, job: TransferJob) -> None:
        # the worker aborts a job only once poll() no longer says PENDING: nothing is writing any more
        self._flights.pop(job.request_id, None)

    def finished(self, job: TransferJob) -> None:
        self._flights.pop(job.request_id, None)

    def job_bytes(self, job: TransferJob) -> int:
        info = self.pools.get(job.src_instance)
        return len(job.src_block_ids) * self._layer_block_bytes(info) * info.shape[0] if info else 0
