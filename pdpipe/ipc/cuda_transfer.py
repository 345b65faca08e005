"""The same-machine GPU transfer backend: peer pools opened through CUDA IPC (once, cached), and per
layer (or per group of layers a short prompt announces together) one Triton kernel on the destination
GPU that gathers the request's scattered blocks from the source pool over NVLink (one launch for all the
requests a prefill step completed). The prefill engine
announces a layer only once its KV is written (see EngineWorker), so each copy is launched as its
layer is announced; a job is DONE only once its last copy has completed on the GPU."""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import torch

from pdpipe import kernels
from pdpipe.messages import PoolInfo
from pdpipe.transfer import GroupedBackend, TransferError, TransferJob, TransferState

from .cuda import open_pool, visible_ordinal

log = logging.getLogger("pdpipe")
SLOW_COPY_S = 5.0  # a copy still running after this long is reported (with what the GPU says of it)


@dataclass
class _Flight:
    """One request's copies. Requests a prefill step completed together share their launches: `group`
    names them, `src_ids`/`dst_ids` hold all of their blocks, and the events are shared."""
    group: tuple[str, ...]
    src_ids: torch.Tensor
    dst_ids: torch.Tensor
    start: torch.cuda.Event
    stream: torch.cuda.Stream
    end: torch.cuda.Event | None = None
    layers: list[int] = field(default_factory=list)
    last_launch: float = 0.0
    reported: bool = False


class CudaIpcTransfer(GroupedBackend):
    def __init__(self) -> None:
        self.pools: dict[str, PoolInfo] = {}
        self._streams: dict[int, torch.cuda.Stream] = {}
        self._flights: dict[str, _Flight] = {}
        self._views: dict[tuple[str, int], torch.Tensor] = {}  # (instance, device) → its pool, mapped

    def register_pool(self, pool: PoolInfo) -> None:
        if pool.gpu < 0 or not pool.ipc_handle:
            raise TransferError(f"{pool.instance}: its KV pool is not a GPU pool with an IPC handle")
        if self.pools.get(pool.instance) != pool:  # new, or the instance came back with another pool
            self._views = {key: view for key, view in self._views.items() if key[0] != pool.instance}
        self.pools[pool.instance] = pool

    def _info(self, instance: str, job: TransferJob) -> PoolInfo:
        info = self.pools.get(instance)
        if info is None:
            raise TransferError(f"request {job.request_id}: no GPU pool registered for {instance}")
        return info

    def _view(self, info: PoolInfo, device: int) -> torch.Tensor:
        """The pool as a tensor on `device`, made once (every launch needs both pools)."""
        view = self._views.get((info.instance, device))
        if view is None:
            view = self._views[info.instance, device] = open_pool(
                info.ipc_handle, info.ipc_offset, tuple(info.shape), getattr(torch, info.dtype), device)
        return view

    def send_group(self, jobs: list[TransferJob], layer: int, count: int) -> None:
        """One gather kernel for the layers of all the jobs (same two pools)."""
        src, dst = self._info(jobs[0].src_instance, jobs[0]), self._info(jobs[0].dst_instance, jobs[0])
        device = visible_ordinal(dst.gpu)
        key = tuple(job.request_id for job in jobs)
        with torch.cuda.device(device):
            if device not in self._streams:
                self._streams[device] = torch.cuda.Stream(device)
            stream = self._streams[device]
            first = self._flights.get(key[0])
            if first is not None and first.group == key:
                src_ids, dst_ids = first.src_ids, first.dst_ids
            else:  # the group's first layer (or the group changed: a request left it)
                src_ids = torch.tensor([b for j in jobs for b in j.src_block_ids], dtype=torch.int32, device=device)
                dst_ids = torch.tensor([b for j in jobs for b in j.dst_block_ids], dtype=torch.int32, device=device)
            start = None
            for job in jobs:
                flight = self._flights.get(job.request_id)
                if flight is None:
                    if start is None:
                        start = torch.cuda.Event(enable_timing=True)
                        start.record(stream)
                    flight = self._flights[job.request_id] = _Flight(key, src_ids, dst_ids, start, stream)
                flight.group, flight.src_ids, flight.dst_ids = key, src_ids, dst_ids
            with torch.cuda.stream(stream):
                kernels.copy_pool_blocks(self._view(src, device), src_ids, self._view(dst, device), dst_ids, layer,
                                         count)
            end = torch.cuda.Event(enable_timing=True)
            end.record(stream)
        now = time.monotonic()
        for job in jobs:
            flight = self._flights[job.request_id]
            flight.end, flight.last_launch = end, now
            flight.layers += range(layer, layer + count)
            job.layers_sent.update(range(layer, layer + count))
            job.bytes_moved += len(job.src_block_ids) * self._layer_block_bytes(src) * count

    @staticmethod
    def _layer_block_bytes(info: PoolInfo) -> int:
        per_block = 2 * info.shape[3] * info.shape[4] * info.shape[5]  # K and V of one block, one layer
        return per_block * getattr(torch, info.dtype).itemsize

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
