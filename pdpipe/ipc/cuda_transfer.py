"""The same-machine GPU transfer backend: peer pools opened through CUDA IPC (once, cached), and per
layer (or per group of layers a short prompt announces together) one Triton kernel on the destination
GPU that gathers the request's scattered blocks from the source pool over NVLink (one launch for all the
requests a prefill step completed; between instances of different tensor parallelism one a run of
heads of `head_copy_plan`, each on its destination rank's GPU). The prefill engine
announces a layer only once its KV is written (see EngineWorker), so each copy is launched as its
layer is announced; a job is DONE only once its last copy has completed on the GPU."""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import torch

from pdpipe import kernels
from pdpipe.messages import PoolInfo
from pdpipe.transfer.base import RankedBackend, TransferError, TransferJob, TransferState

from .cuda import open_pool, visible_ordinal

log = logging.getLogger("pdpipe")
SLOW_COPY_S = 5.0  # a copy still running after this long is reported (with what the GPU says of it)


@dataclass
class _Flight:
    """One request's copies. Requests a prefill step completed together share their launches: `group`
    names them, `ids` holds all of their blocks (per GPU that runs copies), and the events are shared.
    An instance of several ranks is written by a copy per head range, on the GPU of the destination
    rank: the request has landed once the last launch on every GPU it used has completed."""
    group: tuple[str, ...]
    ids: dict[int, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)  # GPU → (source, dest)
    starts: dict[int, torch.cuda.Event] = field(default_factory=dict)
    ends: dict[int, torch.cuda.Event] = field(default_factory=dict)
    streams: dict[int, torch.cuda.Stream] = field(default_factory=dict)
    layers: list[int] = field(default_factory=list)
    last_launch: float = 0.0
    reported: bool = False


class CudaIpcTransfer(RankedBackend):
    def __init__(self) -> None:
        super().__init__()
        self._streams: dict[int, torch.cuda.Stream] = {}
        self._flights: dict[str, _Flight] = {}
        self._views: dict[tuple[str, int, int], torch.Tensor] = {}  # (instance, rank, GPU) → its pool, mapped

    def open(self, pool: PoolInfo) -> None:
        """Nothing yet: a pool is mapped on each GPU that copies from or into it, at its first copy."""
        if pool.gpu < 0 or not pool.ipc_handle:
            raise TransferError(f"{pool.instance}: its KV pool is not a GPU pool with an IPC handle")
        known = self.pools.get(pool.instance, {}).get(pool.rank)
        if known is None or known[1] != pool:  # new, or the instance came back with another pool
            self._views = {key: view for key, view in self._views.items() if key[:2] != (pool.instance, pool.rank)}

    def _view(self, info: PoolInfo, device: int) -> torch.Tensor:
        """The pool as a tensor on `device`, made once (every launch needs both pools)."""
        view = self._views.get((info.instance, info.rank, device))
        if view is None:
            view = self._views[info.instance, info.rank, device] = open_pool(
                info.ipc_handle, info.ipc_offset, tuple(info.shape), getattr(torch, info.dtype), device)
        return view

    def send_group(self, jobs: list[TransferJob], layer: int, count: int) -> None:
        """One gather kernel a head range (one in all, between instances of one pool each) for the
        layers of all the jobs (same two instances), on the destination rank's GPU."""
        src, dst, plan = self.copy_plan(jobs[0])
        key = tuple(job.request_id for job in jobs)
        first = self._flights.get(key[0])
        ids = first.ids if first is not None and first.group == key else {}  # else the group's first layer,
        flights = []                                                          # or a request left the group
        for job in jobs:
            flight = self._flights.setdefault(job.request_id, _Flight(key))
            flight.group, flight.ids = key, ids
            flights.append(flight)
        used: list[int] = []
        for s_rank, s_heads, d_rank, d_heads in plan:
            device = visible_ordinal(dst[d_rank][1].gpu)
            with torch.cuda.device(device):
                stream = self._streams.get(device)
                if stream is None:
                    stream = self._streams[device] = torch.cuda.Stream(device)
                if device not in ids:
                    ids[device] = (torch.tensor([b for j in jobs for b in j.src_block_ids], dtype=torch.int32,
                                                device=device),
                                   torch.tensor([b for j in jobs for b in j.dst_block_ids], dtype=torch.int32,
                                                device=device))
                if any(device not in f.starts for f in flights):
                    start = torch.cuda.Event(enable_timing=True)
                    start.record(stream)
                    for f in flights:
                        f.starts.setdefault(device, start)
                        f.streams[device] = stream
                with torch.cuda.stream(stream):
                    kernels.copy_pool_blocks(self._view(src[s_rank][1], device), ids[device][0],
                                             self._view(dst[d_rank][1], device), ids[device][1], layer, count,
                                             s_heads, d_heads)
            if device not in used:
                used.append(device)
        for device in used:
            with torch.cuda.device(device):
                end = torch.cuda.Event(enable_timing=True)
                end.record(self._streams[device])
            for f in flights:
                f.ends[device] = end
        now = time.monotonic()
        for job, flight in zip(jobs, flights):
            flight.last_launch = now
            flight.layers += range(layer, layer + count)
            job.layers_sent.update(range(layer, layer + count))
            job.bytes_moved += len(job.src_block_ids) * self.block_bytes(dst) * count

    def poll(self, job: TransferJob) -> TransferState:
        flight = self._flights.get(job.request_id)
        if flight is None or not flight.ends:
            return TransferState.DONE
        if not all(end.query() for end in flight.ends.values()):
            if not flight.reported and time.monotonic() - flight.last_launch > SLOW_COPY_S:
                flight.reported = True
                log.warning("%s: copies of layers %s still running %.1f s after the last launch (first copies "
                            "started: %s, streams idle: %s)", job.request_id, flight.layers,
                            time.monotonic() - flight.last_launch, [e.query() for e in flight.starts.values()],
                            [s.query() for s in flight.streams.values()])
            return TransferState.PENDING
        job.seconds = max(flight.starts[d].elapsed_time(end) for d, end in flight.ends.items()) / 1e3
        return TransferState.DONE

    def abort(self, job: TransferJob) -> None:
        # the worker aborts a job only once poll() no longer says PENDING: nothing is writing any more
        self._flights.pop(job.request_id, None)

    def finished(self, job: TransferJob) -> None:
        self._flights.pop(job.request_id, None)
