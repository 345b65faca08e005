"""The one interface every KV transfer backend implements, and a fake for tests.

A job moves a request's blocks from a source pool to a destination pool, layer by layer:
`send(job, layer)` starts moving one layer, `poll(job)` says where the job stands, and `abort(job)`
drops it. The worker aborts a job only once `poll` no longer says PENDING (copies in flight finish
first, without blocking the process), and only then lets the destination free its blocks.
"""
from __future__ import annotations

import enum
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any

from pdpipe.config import DTYPE_BYTES
from pdpipe.messages import PoolInfo


def rank_pool(instance: str, rank: int) -> str:
    """The name a rank's pool of a data-parallel instance is registered under (instance names hold no '@')."""
    return f"{instance}@{rank}"


def pool_instance(pool: str) -> str:
    """The instance a registered pool belongs to."""
    return pool.partition("@")[0]


class TransferState(enum.Enum):
    PENDING = "pending"  # layers sent and not yet landed
    DONE = "done"  # every layer sent so far has landed
    FAILED = "failed"


class TransferError(RuntimeError):
    """A transfer that cannot go on, naming the peer and the operation."""


@dataclass
class TransferJob:
    request_id: str
    src_instance: str
    src_block_ids: list[int]
    dst_instance: str
    dst_block_ids: list[int]
    layers_sent: set[int] = field(default_factory=set)
    bytes_moved: int = 0
    seconds: float = 0.0
    error: str = ""
    first_layer_at: float = 0.0  # when its first and its latest layers were handed to the backend
    last_layer_at: float = 0.0
    layers_ready: set[int] = field(default_factory=set)  # computed on prefill, waiting for dst_block_ids
    # the pools the blocks are in, as registered: the instance, or for a rank of data-parallel attention
    # `instance@rank` (the block ids then that pool's own)
    src_pool: str = ""
    dst_pool: str = ""
    dst_known: bool = False  # decode's blocks are known (none at all where its cache held the whole prompt)
    skipped: int = 0  # leading prompt blocks decode held already: not moved
    pull: bool = False  # the other way: another instance's cached prompt blocks into a prefill's (a remote hit)

    def __post_init__(self) -> None:
        self.src_pool = self.src_pool or self.src_instance
        self.dst_pool = self.dst_pool or self.dst_instance
        self.dst_known = self.dst_known or bool(self.dst_block_ids)

    @property
    def has_destination(self) -> bool:
        return self.dst_known

    @property
    def moves_nothing(self) -> bool:
        """Decode's cache held every block of the prompt: no copy, the job lands once prefill is done."""
        return self.dst_known and not self.src_block_ids


def head_copy_plan(src: dict[int, list[int]], dst: dict[int, list[int]]) -> list[tuple[int, slice, int, slice]]:
    """How KV moves between instances of different tensor parallelism: `src` and `dst` give each rank's
    key/value heads (the model's head ids, in pool order). Returns (source rank, head positions there,
    destination rank, head positions there) runs that give every destination rank exactly the heads it
    holds, each read once, from the first source rank holding it; contiguous heads go together."""
    owner: dict[int, tuple[int, int]] = {}
    for rank in sorted(src):
        for pos, head in enumerate(src[rank]):
            owner.setdefault(head, (rank, pos))
    plan: list[tuple[int, slice, int, slice]] = []
    for d_rank in sorted(dst):
        for d_pos, head in enumerate(dst[d_rank]):
            if head not in owner:
                raise TransferError(f"key/value head {head} is held by no rank of the source instance")
            s_rank, s_pos = owner[head]
            if plan and plan[-1][0] == s_rank and plan[-1][2] == d_rank and plan[-1][1].stop == s_pos \
                    and plan[-1][3].stop == d_pos:
                last = plan[-1]
                plan[-1] = (s_rank, slice(last[1].start, s_pos + 1), d_rank, slice(last[3].start, d_pos + 1))
            else:
                plan.append((s_rank, slice(s_pos, s_pos + 1), d_rank, slice(d_pos, d_pos + 1)))
    return plan


def check_pair(src: PoolInfo, dst: PoolInfo, src_heads: set[int], dst_heads: set[int]) -> None:
    """What two instances' pools must agree on before KV moves between them; the first difference is
    an error naming it."""
    fields = (("KV cache dtype", src.kv_dtype or src.dtype, dst.kv_dtype or dst.dtype),
              ("layers", src.shape[0], dst.shape[0]), ("block size", src.shape[3], dst.shape[3]),
              ("head dim", src.shape[5], dst.shape[5]), ("dtype", src.dtype, dst.dtype),
              ("weight quantization", src.weights or "none", dst.weights or "none"),
              ("key/value heads", sorted(src_heads), sorted(dst_heads)))
    for what, a, b in fields:
        if a != b:
            raise TransferError(f"{src.instance} and {dst.instance} cannot exchange KV: {what} {a} against {b}")


class TransferBackend(ABC):
    @abstractmethod
    def register_pool(self, pool: PoolInfo) -> None:
        """Makes an engine's KV pool addressable (opened once, cached)."""

    @abstractmethod
    def send(self, job: TransferJob, layer: int) -> None:
        """Starts moving `layer` of the job's blocks."""

    def send_batch(self, jobs: list[TransferJob], layer: int, count: int = 1) -> None:
        """Starts moving layers layer … layer+count-1 of every job (the requests one prefill step
        completed): backends that can do it in one launch or one batched call per pair of pools
        override this."""
        for i in range(layer, layer + count):
            for job in jobs:
                self.send(job, i)

    @abstractmethod
    def poll(self, job: TransferJob) -> TransferState:
        ...

    @abstractmethod
    def abort(self, job: TransferJob) -> None:
        ...

    def finished(self, job: TransferJob) -> None:  # noqa: B027 — optional: most backends keep nothing
        """The job landed and was reported; the backend may drop what it kept for it."""

    def job_bytes(self, job: TransferJob) -> int:
        """Bytes the whole job moves (all layers), where the backend knows the pools."""
        return 0


class GroupedBackend(TransferBackend):
    """A backend that moves the jobs between the same two pools together (one launch or one copy per
    layer): it implements `send_group`, and single jobs are groups of one."""

    def send(self, job: TransferJob, layer: int) -> None:
        self.send_group([job], layer, 1)

    def send_batch(self, jobs: list[TransferJob], layer: int, count: int = 1) -> None:
        groups: dict[tuple[str, str], list[TransferJob]] = {}
        for job in jobs:
            groups.setdefault((job.src_pool, job.dst_pool), []).append(job)
        for group in groups.values():
            self.send_group(group, layer, count)

    @abstractmethod
    def send_group(self, jobs: list[TransferJob], layer: int, count: int) -> None:
        """Starts moving layers layer … layer+count-1 of jobs that share their source pool and their
        destination pool."""


Run = tuple[int, "slice | None", int, "slice | None"]  # (source rank, its heads, destination rank, its heads)


class RankedBackend(GroupedBackend):
    """A same-machine backend whose instances may have a pool a rank (tensor parallelism), each holding
    its key/value heads: `pools[instance][rank]` is (what the backend keeps of the pool, its PoolInfo).
    `copy_plan` says which head ranges move between which ranks' pools; a pair of instances is checked
    for what must match once, at its first copy."""

    def __init__(self) -> None:
        self.pools: dict[str, dict[int, tuple[Any, PoolInfo]]] = {}
        self._checked: set[tuple[str, str]] = set()

    @abstractmethod
    def open(self, pool: PoolInfo) -> Any:
        """What the backend keeps of a pool (opened again when re-registered: a restarted engine)."""

    def register_pool(self, pool: PoolInfo) -> None:
        self.pools.setdefault(pool.instance, {})[pool.rank] = (self.open(pool), pool)
        self._checked = {pair for pair in self._checked if pool.instance not in pair}

    def forget(self, instance: str, rank: int) -> None:
        """A rank the instance no longer has (it came back with a smaller tp)."""
        self.pools.get(instance, {}).pop(rank, None)
        self._checked = {pair for pair in self._checked if instance not in pair}

    def ranks(self, instance: str, job: TransferJob) -> dict[int, tuple[Any, PoolInfo]]:
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
    def heads(ranks: dict[int, tuple[Any, PoolInfo]]) -> dict[int, list[int]]:
        return {r: info.kv_heads or list(range(info.shape[4])) for r, (_, info) in ranks.items()}

    def copy_plan(self, job: TransferJob) -> tuple[dict, dict, list[Run]]:
        """The job's source and destination ranks, and the runs of heads between them: one run of whole
        blocks between two single pools of the same heads, else `head_copy_plan`'s."""
        src, dst = self.ranks(job.src_pool, job), self.ranks(job.dst_pool, job)
        src_heads, dst_heads = self.heads(src), self.heads(dst)
        pair = (job.src_pool, job.dst_pool)
        if pair not in self._checked:
            check_pair(src[0][1], dst[0][1], {h for hs in src_heads.values() for h in hs},
                       {h for hs in dst_heads.values() for h in hs})
            self._checked.add(pair)
        if len(src) == 1 and len(dst) == 1 and src_heads == dst_heads:
            return src, dst, [(0, None, 0, None)]
        return src, dst, list(head_copy_plan(src_heads, dst_heads))

    @staticmethod
    def block_bytes(ranks: dict[int, tuple[Any, PoolInfo]]) -> int:
        """K and V of one block of one layer, over the instance's ranks."""
        return sum(2 * info.shape[3] * info.shape[4] * info.shape[5] * DTYPE_BYTES[info.dtype]
                   for _, info in ranks.values())

    def job_bytes(self, job: TransferJob) -> int:
        ranks = self.pools.get(job.dst_pool) or self.pools.get(job.src_pool)
        if not ranks:
            return 0
        return len(job.src_block_ids) * self.block_bytes(ranks) * ranks[min(ranks)][1].shape[0]


class FakeTransfer(TransferBackend):
    """Moves nothing; completes at once, fails for request ids in `fail`, stays PENDING for those in
    `in_flight` (copies still running), and refuses to start the layers in `refuse` (a TransferError)."""

    def __init__(self, fail: set[str] | None = None, refuse: set[int] | None = None):
        self.fail = fail if fail is not None else set()
        self.refuse = refuse if refuse is not None else set()
        self.pools: dict[str, dict[int, tuple[None, PoolInfo]]] = {}  # as a RankedBackend keeps them
        self.sent: list[tuple[str, int]] = []
        self.batches: list[tuple[list[str], int]] = []  # (request ids, layer) of each send_batch, by layer
        self.aborted: list[str] = []
        self.in_flight: set[str] = set()

    def register_pool(self, pool: PoolInfo) -> None:
        self.pools.setdefault(pool.instance, {})[pool.rank] = (None, pool)

    def forget(self, instance: str, rank: int) -> None:
        self.pools.get(instance, {}).pop(rank, None)

    def send(self, job: TransferJob, layer: int) -> None:
        if layer in self.refuse:
            raise TransferError(f"peer refused layer {layer}")
        self.sent.append((job.request_id, layer))
        job.layers_sent.add(layer)

    def send_batch(self, jobs: list[TransferJob], layer: int, count: int = 1) -> None:
        self.batches += [([j.request_id for j in jobs], i) for i in range(layer, layer + count)]
        super().send_batch(jobs, layer, count)

    def poll(self, job: TransferJob) -> TransferState:
        if job.request_id in self.fail:
            job.error = f"fake failure moving {job.request_id} to {job.dst_instance}"
            return TransferState.FAILED
        return TransferState.PENDING if job.request_id in self.in_flight else TransferState.DONE

    def abort(self, job: TransferJob) -> None:
        self.aborted.append(job.request_id)
