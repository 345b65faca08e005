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
from pdpipe.transfer import GroupedBackend, TransferError, TransferJob, TransferState, check_pair, head_copy_plan


def map_pool(path: Path | str, shape: list[int] | tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """The pool file at `path` (created zeroed if missing) as a tensor of `shape`."""
    flat = torch.from_file(str(path), shared=True, size=math.prod(shape), dtype=dtype)
    return flat.view(*shape)


class ShmTransfer(GroupedBackend):
    """Synchronous copies: a layer has landed when `send` returns. An instance of several ranks has a
    pool per rank, each holding its key/value heads; KV between instances of different tensor
    parallelism moves head range by head range (`head_copy_plan`)."""

    def __init__(self) -> None:
        self.pools: dict[str, dict[int, tuple[torch.Tensor, PoolInfo]]] = {}
        self._checked: set[tuple[str, str]] = set()

    def register_pool(self, pool: PoolInfo) -> None:
        # mapped again each time: a restarted engine may have made its file anew
        self.pools.setdefault(pool.instance, {})[pool.rank] = (
            map_pool(pool.path, pool.shape, getattr(torch, pool.dtype)), pool)
        self._checked = {pair for pair in self._checked if pool.instance not in pair}

    def _ranks(self, instance: str, job: TransferJob) -> dict[int, tuple[torch.Tensor, PoolInfo]]:
        """Every rank's pool of `instance`, all from one start of its group (else the job fails: copying
        some ranks' heads only would decode from stale KV)."""
        ranks = self.pools.get(instance)
        if not ranks:
            raise TransferError(f"request {job.request_id}: no KV pool registered for {instance}")
        first = ranks[min(ranks)][1]
        if sorted(ranks) != list(range(first.tp)) or len({info.group for _, info in ranks.values()}) > 1:
            have = ", ".join(f"{r} ({info.group or 'no group'})" for r, (_, info) in sorted(ranks.items()))
            raise TransferError(f"request {job.request_id}: {instance}'s {first.tp} rank pools are not all known "
                                f"from one start (have ranks {have})")
        return ranks

    @staticmethod
    def _heads(ranks: dict[int, tuple[torch.Tensor, PoolInfo]]) -> dict[int, list[int]]:
        return {r: info.kv_heads or list(range(pool.shape[4])) for r, (pool, info) in ranks.items()}

    def send_group(self, jobs: list[TransferJob], layer: int, count: int) -> None:
        """One copy per layer (per head range between ranks) for all the jobs (same two instances)."""
        start = time.perf_counter()
        src = self._ranks(jobs[0].src_instance, jobs[0])  # [layers, 2, blocks, block, heads, dim] per rank
        dst = self._ranks(jobs[0].dst_instance, jobs[0])
        src_heads, dst_heads = self._heads(src), self._heads(dst)
        pair = (jobs[0].src_instance, jobs[0].dst_instance)
        if pair not in self._checked:
            check_pair(src[0][1], dst[0][1], {h for hs in src_heads.values() for h in hs},
                       {h for hs in dst_heads.values() for h in hs})
            self._checked.add(pair)
        src_ids = torch.tensor([b for j in jobs for b in j.src_block_ids], dtype=torch.long)
        dst_ids = torch.tensor([b for j in jobs for b in j.dst_block_ids], dtype=torch.long)
        if len(src) == 1 and len(dst) == 1 and src_heads == dst_heads:
            kernels.copy_pool_blocks(src[0][0], src_ids, dst[0][0], dst_ids, layer, count)
        else:
            for s_rank, s_heads, d_rank, d_heads in head_copy_plan(src_heads, dst_heads):
                kernels.copy_pool_blocks(src[s_rank][0][..., s_heads, :], src_ids, dst[d_rank][0][..., d_heads, :],
                                         dst_ids, layer, count)
        seconds = time.perf_counter() - start
        block_bytes = sum(pool[0, :, 0].numel() * pool.element_size() for pool, _ in dst.values())
        for job in jobs:
            job.layers_sent.update(range(layer, layer + count))
            job.bytes_moved += len(job.src_block_ids) * block_bytes * count
            job.seconds += seconds

    def job_bytes(self, job: TransferJob) -> int:
        ranks = self.pools.get(job.dst_instance) or self.pools.get(job.src_instance)
        if not ranks:
            return 0
        return len(job.src_block_ids) * sum(pool[:, :, 0].numel() * pool.element_size() for pool, _ in ranks.values())

    def poll(self, job: TransferJob) -> TransferState:
        return TransferState.DONE

    def abort(self, job: TransferJob) -> None:
        pass  # copies are synchronous: nothing is in flight
