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
from pdpipe.transfer.base import RankedBackend, TransferJob, TransferState


def map_pool(path: Path | str, shape: list[int] | tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """The pool file at `path` (created zeroed if missing) as a tensor of `shape`."""
    flat = torch.from_file(str(path), shared=True, size=math.prod(shape), dtype=dtype)
    return flat.view(*shape)


class ShmTransfer(RankedBackend):
    """Synchronous copies: a layer has landed when `send` returns. An instance of several ranks has a
    pool per rank, each holding its key/value heads; KV between instances of different tensor
    parallelism moves head range by head range (`RankedBackend.copy_plan`)."""

    def open(self, pool: PoolInfo) -> torch.Tensor:
        # mapped again each time: a restarted engine may have made its file anew
        return map_pool(pool.path, pool.shape, getattr(torch, pool.dtype))

    def send_group(self, jobs: list[TransferJob], layer: int, count: int) -> None:
        """One copy per layer (per head range between ranks) for all the jobs (same two instances)."""
        start = time.perf_counter()
        src, dst, plan = self.copy_plan(jobs[0])
        src_ids = torch.tensor([b for j in jobs for b in j.src_block_ids], dtype=torch.long)
        dst_ids = torch.tensor([b for j in jobs for b in j.dst_block_ids], dtype=torch.long)
        for s_rank, s_heads, d_rank, d_heads in plan:
            kernels.copy_pool_blocks(src[s_rank][0], src_ids, dst[d_rank][0], dst_ids, layer, count, s_heads, d_heads)
        seconds = time.perf_counter() - start
        for job in jobs:
            job.layers_sent.update(range(layer, layer + count))
            job.bytes_moved += len(job.src_block_ids) * self.block_bytes(dst) * count
            job.seconds += seconds

    def poll(self, job: TransferJob) -> TransferState:
        return TransferState.DONE

    def abort(self, job: TransferJob) -> None:
        pass  # copies are synchronous: nothing is in flight
