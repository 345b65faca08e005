"""CPU KV pools in shared memory, and the transfer backend that copies blocks between them.

Each engine's pool is a file under /dev/shm mapped as one tensor; the transfer process maps every
pool once and moves a layer of a request's blocks with one gather/scatter per layer.
"""
from __future__ import annotations

import math
import time
from pathlib import Path

import torch

from pdpipe import kernels
from pdpipe.messages import PoolInfo
from pdpipe.transfer import GroupedBackend, TransferError, TransferJob, TransferState


def map_pool(path: Path | str, shape: list[int] | tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """The pool file at `path` (created zeroed if missing) as a tensor of `shape`."""
    flat = torch.from_file(str(path), shared=True, size=math.prod(shape), dtype=dtype)
    return flat.view(*shape)


class ShmTransfer(GroupedBackend):
    """Synchronous copies: a layer has landed when `send` returns."""

    def __init__(self) -> None:
        self.pools: dict[str, torch.Tensor] = {}

    def register_pool(self, pool: PoolInfo) -> None:
        # mapped again each time: a restarted engine may have made its file anew
        self.pools[pool.instance] = map_pool(pool.path, pool.shape, getattr(torch, pool.dtype))

    def _pool(self, instance: str, job: TransferJob) -> torch.Tensor:
        pool = self.pools.get(instance)
        if pool is None:
            raise TransferError(f"request {job.request_id}: no KV pool registered for {instance}")
        return pool

    def send_group(self, jobs: list[TransferJob], layer: int, count: int) -> None:
        """One copy per layer for all the jobs (same two pools)."""
        start = time.perf_counter()
        src = self._pool(jobs[0].src_instance, jobs[0])  # [layers, 2, blocks, block, heads, dim]
        dst = self._pool(jobs[0].dst_instance, jobs[0])
        src_ids = torch.tensor([b for j in jobs for b in j.src_block_ids], dtype=torch.long)
        dst_ids = torch.tensor([b for j in jobs for b in j.dst_block_ids], dtype=torch.long)
        kernels.copy_pool_blocks(src, src_ids, dst, dst_ids, layer, count)
        seconds = time.perf_counter() - start
        block_bytes = src[0, :, 0].numel() * src.element_size()  # K and V of one block, one layer
        for job in jobs:
            job.layers_sent.update(range(layer, layer + count))
            job.bytes_moved += len(job.src_block_ids) * block_bytes * count
            job.seconds += seconds

    def job_bytes(self, job: TransferJob) -> int:
        pool = self.pools.get(job.src_instance)
        if pool is None:
            return 0
        return len(job.src_block_ids) * pool[:, :, 0].numel() * pool.element_size()

    def poll(self, job: TransferJob) -> TransferState:
        return TransferState.DONE

    def abort(self, job: TransferJob) -> None:
        pass  # copies are synchronous: nothing is in flight
