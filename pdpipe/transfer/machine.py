"""A machine's transfer backend: jobs between this machine's own pools go through the same-machine
backend (shared memory on CPU, CUDA IPC on GPU); jobs into a pool on another machine, and pulls from
one (a remote hit: decode's cached blocks read into a prefill pool of this machine), go through
Mooncake (`pdpipe.rdma`). Local pools are exposed to Mooncake and published in the registry as their
engines announce them, and re-published well within the TTL while this process lives."""
from __future__ import annotations

import logging
import time
from pathlib import Path

import msgspec
import torch

from pdpipe.messages import PoolInfo

from .base import TransferBackend, TransferError, TransferJob, TransferState, pool_instance

log = logging.getLogger("pdpipe")


def _local_backend(device: str) -> TransferBackend:
    if device.startswith("cuda"):
        from pdpipe.ipc.cuda_transfer import CudaIpcTransfer

        return CudaIpcTransfer()
    from pdpipe.ipc.shm import ShmTransfer

    return ShmTransfer()


def _pool_tensor(info: PoolInfo) -> torch.Tensor:
    """This process's view of a local engine's pool (for registering it with Mooncake)."""
    dtype = getattr(torch, info.dtype)
    if info.gpu >= 0:
        from pdpipe.ipc.cuda import open_pool, visible_ordinal

        return open_pool(info.ipc_handle, info.ipc_offset, tuple(info.shape), dtype, visible_ordinal(info.gpu))
    from pdpipe.ipc.shm import map_pool

    return map_pool(info.path, info.shape, dtype)


class MachineTransfer(TransferBackend):
    def __init__(self, local: TransferBackend, pools_dir: Path, remote=None, registry=None, machine: str = ""):
        self.local, self.remote, self.registry, self.machine = local, remote, registry, machine
        self.pools_dir = pools_dir
        self.local_names: set[str] = set()
        # each published pool, by (instance, rank): as published, and as its engine announced it
        self._published: dict[tuple[str, int], PoolInfo] = {}
        self._exposed: dict[tuple[str, int], PoolInfo] = {}
        self._job_pools: dict[str, tuple[PoolInfo, ...]] = {}  # the remote pools each job writes into
        self._next_publish = 0.0

    @classmethod
    def for_config(cls, cfg, pools_dir: Path) -> MachineTransfer:
        local = _local_backend(cfg.engine.device)
        cluster = cfg.cluster
        if not cluster.redis_url:
            return cls(local, pools_dir)
        from pdpipe.cluster import Registry
        from pdpipe.rdma.mooncake import MooncakeTransfer

        remote = MooncakeTransfer(cluster.advertise_host, cluster.protocol, cluster.nics)
        return cls(local, pools_dir, remote, Registry(cluster.redis_url, cluster.name, cluster.ttl),
                   cluster.machine)

    # ---- pools -------------------------------------------------------------------------------------
    def lookup(self, instance: str) -> PoolInfo | None:
        """A pool by the name jobs give it: an instance's (rank 0's), or a data-parallel rank's
        ("instance@rank": as this machine's engine wrote it down, or as its machine published it)."""
        base, _, rank = instance.partition("@")
        path = self.pools_dir / (f"{base}.rank{rank}.json" if rank not in ("", "0") else f"{base}.json")
        if path.is_file():
            info = msgspec.json.decode(path.read_bytes(), type=PoolInfo)
            if not rank or info.data_parallel:
                return info
        if self.registry is not None:
            return self.registry.pool(instance)
        return None

    def register_pool(self, pool: PoolInfo) -> None:
        if pool.segment and pool.instance not in self.local_names:  # another machine's, published
            self.remote.register_pool(pool)
            return
        self.local.register_pool(pool)
        self.local_names |= {pool.instance, pool_instance(pool.instance)}  # a data-parallel rank's: its instance's too
        ranks = [pool]
        if pool.tp > 1 and pool.rank == 0:  # its other ranks too, as they last wrote themselves down
            for rank in range(1, pool.tp):
                path = self.pools_dir / f"{pool.instance}.rank{rank}.json"
                if path.is_file():
                    ranks.append(msgspec.json.decode(path.read_bytes(), type=PoolInfo))
                    self.local.register_pool(ranks[-1])
        for info in ranks if self.remote is not None else []:
            key = (info.instance, info.rank)
            if self._exposed.get(key) != info:  # new, or its engine restarted
                published = self.remote.expose(info, _pool_tensor(info))
                self._exposed[key] = info
                self._published[key] = msgspec.structs.replace(published, machine=self.machine)
                self._next_publish = 0.0
        self.refresh()

    def refresh(self) -> None:
        """Keeps this machine's pools published, and the other machines' pools it writes into as they
        are published now (a restarted engine's pool lives elsewhere); called a few times a second."""
        if self.registry is None or time.monotonic() < self._next_publish:
            return
        try:
            for info in self._published.values():
                self.registry.publish_pool(info)
            for name, ranks in list(self.remote.pools.items()):
                if name in self.local_names:
                    continue
                for rank, (_, known) in list(ranks.items()):
                    now = self.registry.pool(name, rank)
                    if now is not None and now != known:
                        log.info("transfer: %s's pool (rank %d) was published anew (%s); writing there now", name,
                                 rank, now.segment)
                        self.remote.register_pool(now)
                    if now is not None and rank == 0:  # back with fewer ranks: the others are gone
                        for gone in [r for r in ranks if r >= now.tp]:
                            self.remote.forget(name, gone)
            self._next_publish = time.monotonic() + self.registry.ttl / 3
        except Exception as exc:  # noqa: BLE001 — Redis away: try again on the next call
            log.warning("transfer: cannot publish or refresh pools: %s", exc)

    def _remote_pools(self, instance: str, job: TransferJob) -> tuple[PoolInfo, ...]:
        """Another machine's instance's pools, every rank's: looked up in the registry while any is
        missing (a rank may publish after its rank 0)."""
        known = self.remote.pools.get(instance) or {}
        if 0 not in known:
            info = self.lookup(instance)
            if info is None:
                raise TransferError(f"request {job.request_id}: no published pool for {instance}")
            self.remote.register_pool(info)
            known = self.remote.pools[instance]
        for rank in range(known[0][1].tp):
            if rank not in known:
                other = self.registry.pool(instance, rank) if self.registry is not None else None
                if other is None:
                    raise TransferError(f"request {job.request_id}: rank {rank} of {instance} has published no pool")
                self.remote.register_pool(other)
        return tuple(info for _, (_, info) in sorted(self.remote.pools[instance].items()))

    # ---- jobs ----------------------------------------------------------------------------------------
    @staticmethod
    def _far(job: TransferJob) -> tuple[str, str]:
        """The pool (and its instance) a job may find on another machine: the one written into, or read
        from for a pull (which fills a pool of this machine's from decode's cache)."""
        return (job.src_pool, job.src_instance) if job.pull else (job.dst_pool, job.dst_instance)

    def _for(self, job: TransferJob) -> TransferBackend:
        pool, instance = self._far(job)
        if pool in self.local_names:
            return self.local
        if self.remote is None:
            raise TransferError(f"request {job.request_id}: {instance} is on another machine and "
                                "this machine has no cross-machine transfer (cluster.redis_url unset)")
        pools = self._remote_pools(pool, job)
        if self._job_pools.setdefault(job.request_id, pools) != pools:  # its blocks were in the old pool
            raise TransferError(f"request {job.request_id}: {instance}'s pool was replaced (its engine "
                                "restarted)")
        return self.remote

    def send(self, job: TransferJob, layer: int) -> None:
        self._for(job).send(job, layer)

    def send_batch(self, jobs: list[TransferJob], layer: int, count: int = 1) -> None:
        by_backend: dict[int, tuple[TransferBackend, list[TransferJob]]] = {}
        for job in jobs:
            backend = self._for(job)
            by_backend.setdefault(id(backend), (backend, []))[1].append(job)
        for backend, group in by_backend.values():
            backend.send_batch(group, layer, count)

    def poll(self, job: TransferJob) -> TransferState:
        return self._for(job).poll(job)

    def abort(self, job: TransferJob) -> None:
        backend = self.local if self._far(job)[0] in self.local_names else self.remote
        if backend is not None:
            backend.abort(job)
        self._job_pools.pop(job.request_id, None)

    def finished(self, job: TransferJob) -> None:
        self._for(job).finished(job)
        self._job_pools.pop(job.request_id, None)

    def job_bytes(self, job: TransferJob) -> int:
        try:
            return self._for(job).job_bytes(job)
        except TransferError:
            return 0
