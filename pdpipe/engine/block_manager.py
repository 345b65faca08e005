"""Owns which KV blocks are free, and which hold KV worth keeping. Blocks carry reference counts so a
block can be shared; a block returns to the free pool when its last holder frees it. The engine's
scheduler is its only user.

Prefix cache: a full block whose KV is computed is registered under its chained hash (`kv_hash`). When
its last holder frees it, it stays cached — free, but found by its hash — until a new allocation needs
room and evicts it, least recently freed first, and of one request's blocks its last first (the prefix
outlives its tail). Blocks holding nothing worth keeping are handed out before any cached one. Cached
free blocks count as free: for admission, in the stats, and for the leak oracle.

Host tier (`host_blocks`): a cached block evicted from the device goes to a host block first (its KV
copied there: a copy the engine runs, in order before anything writes into the device block again), and
a prompt whose cached prefix continues on the host takes those blocks back (copied into its new device
blocks, in order before its step reads them). The host tier evicts least recently used, and what it
evicts is gone. Copies are queued here (`take_copies`) for the engine to run. Ahead of need
(`write_ahead`), the cached blocks next in line for eviction are copied to the host while they stay cached
on the device (`take_ahead`: copies the engine runs beside its next steps), so that evicting them later
costs no copy; a block such a copy may still touch — a device block taken for new KV, a host block
restored from or written again — makes the engine wait for those copies first (`take_sync`).

With data-parallel attention an instance's ranks each hold a pool of their own: the ids are split in
`partitions` equal runs (partition p: ids p·n .. p·n + n - 1, block `id - p·n` of rank p's pool), and a
sequence's blocks all come from one of them: the one holding its longest cached prefix (on the device, else
in its host tier), else the one with most free blocks when it is admitted. Each partition caches its own
blocks and has a host tier of its own (host ids split the same way: rank p copies between its pool and its
host blocks)."""
from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Sequence
from itertools import islice

from pdpipe.kv_events import AllBlocksCleared, BlockRemoved, BlockStored, KVEvent

MEDIUM_HOST = "CPU"  # vLLM's name for the host-memory tier in KV events


class BlockError(RuntimeError):
    """A misuse of the block manager: freeing a free block, allocating more than is free."""


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, partitions: int = 1, caching: bool = True,
                 host_blocks: int = 0):
        if num_blocks < 1 or block_size < 1 or partitions < 1 or num_blocks % partitions:
            raise ValueError(f"num_blocks, block_size and partitions must be >= 1 and partitions must divide "
                             f"num_blocks, got {num_blocks}, {block_size}, {partitions}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.partition_size = num_blocks // partitions
        self.caching = caching
        self._free: list[deque[int]] = [deque(range(p * self.partition_size, (p + 1) * self.partition_size))
                                        for p in range(partitions)]
        self._evictable: list[OrderedDict[int, None]] = [OrderedDict() for _ in range(partitions)]  # first out first
        self._by_hash: list[dict[bytes, int]] = [{} for _ in range(partitions)]
        self._hash_of: list[bytes | None] = [None] * num_blocks
        self._ref_counts = [0] * num_blocks
        self.record_events = False  # an engine process takes them (take_events) for the scheduler's index
        self.num_evictions = 0  # cached blocks taken for new allocations, since start
        if host_blocks % partitions:
            raise ValueError(f"host_blocks: {host_blocks} does not split into {partitions} equal partitions")
        self.host_blocks = host_blocks if caching else 0
        self.host_partition_size = self.host_blocks // partitions  # partition p: host ids p·h .. p·h + h - 1
        h = self.host_partition_size
        self._host_free: list[deque[int]] = [deque(range(p * h, (p + 1) * h)) for p in range(partitions)]
        # least recently used first, a partition's device blocks going to its own host blocks
        self._host_by_hash: list[OrderedDict[bytes, int]] = [OrderedDict() for _ in range(partitions)]
        self._copies: list[tuple[str, int, int]] = []  # ("out", device, host) | ("in", host, device), in order
        self._ahead: list[tuple[str, int, int]] = []  # ("out", device, host) written ahead, until taken
        self._ahead_device: set[int] = set()  # blocks copies written ahead may still read, since the last sync
        self._ahead_host: set[int] = set()  # ... and host blocks they may still write
        self._must_sync = False
        self.host_blocks_out = self.host_blocks_in = 0  # blocks copied to and from the host tier, since start
        self.host_blocks_ahead = 0  # of those copied out, the ones written ahead of their eviction
        self._events: list[tuple[int, KVEvent]] = []  # (partition, event), in order, until taken

    # ---- counts --------------------------------------------------------------------------------
    @property
    def num_free_blocks(self) -> int:
        """Blocks no request holds: empty ones and cached ones that a new allocation may evict."""
        return sum(self._free_in(p) for p in range(len(self._free)))

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - self.num_free_blocks

    @property
    def num_cached_blocks(self) -> int:
        """Blocks holding a registered hash, held by a request or not."""
        return sum(len(index) for index in self._by_hash)

    @property
    def num_evictable_blocks(self) -> int:
        """Cached blocks no request holds."""
        return sum(len(e) for e in self._evictable)

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def _free_in(self, partition: int) -> int:
        return len(self._free[partition]) + len(self._evictable[partition])

    @property
    def num_free_for_new_table(self) -> int:
        """The free blocks of the partition a new table gets (all free blocks, with one partition)."""
        return self._free_in(self._partition())

    def partition_of(self, block_id: int) -> int:
        return block_id // self.partition_size

    def _partition(self, block_table: list[int] | None = None) -> int:
        """A table's partition; for a new one, the partition with most free blocks."""
        if block_table:
            return self.partition_of(block_table[0])
        return max(range(len(self._free)), key=self._free_in)

    # ---- allocation ------------------------------------------------------------------------------
    def can_allocate(self, num_blocks: int, cached: Sequence[int] = (), partition: int | None = None) -> bool:
        """Whether a new table of `num_blocks` new blocks fits beside the `cached` blocks it takes (in their
        partition, else `partition`, else the one a new table gets): those no request holds come out of the
        free ones."""
        if cached:
            partition = self.partition_of(cached[0])
        elif partition is None:
            partition = self._partition()
        taken = sum(1 for b in cached if self._ref_counts[b] == 0)
        return num_blocks + taken <= self._free_in(partition)

    def allocate(self, num_blocks: int, partition: int | None = None) -> list[int]:
        p = self._partition() if partition is None else partition
        if num_blocks > self._free_in(p):
            raise BlockError(f"asked for {num_blocks} blocks, {self._free_in(p)} free")
        ids = [self._take(p) for _ in range(num_blocks)]
        for i in ids:
            self._ref_counts[i] = 1
        return ids

    def _take(self, partition: int) -> int:
        """A free block of `partition`: an empty one, else the cached one evicted first (its hash goes)."""
        if self._free[partition]:
            block = self._free[partition].popleft()
            self._must_sync |= block in self._ahead_device  # (emptied by a reset while its copy ran)
            return block
        block, _ = self._evictable[partition].popitem(last=False)
        self._to_host(block)
        self._forget(block)
        self.num_evictions += 1
        self._must_sync |= block in self._ahead_device
        return block

    def _to_host(self, block: int, ahead: bool = False) -> None:
        """A cached device block about to be reused (or, `ahead`, next in line) keeps its KV in the host tier
        (if it has one and the block is not there already): a host block is taken, the least recently used
        evicted if need be."""
        block_hash = self._hash_of[block]
        if not self.host_blocks or block_hash is None:
            return
        p = self.partition_of(block)
        index, free = self._host_by_hash[p], self._host_free[p]
        if block_hash in index:
            index.move_to_end(block_hash)
            return
        if not free:
            gone, host = index.popitem(last=False)
            free.append(host)
            self._event(p, BlockRemoved([gone], medium=MEDIUM_HOST))
        host = free.popleft()
        index[block_hash] = host
        if ahead:
            self.host_blocks_ahead += 1
            self._ahead.append(("out", block, host))
            self._ahead_device.add(block)
            self._ahead_host.add(host)
        else:
            self._must_sync |= host in self._ahead_host
            self._copies.append(("out", block, host))
        self.host_blocks_out += 1
        self._event(p, BlockStored([block_hash], None, [], self.block_size, medium=MEDIUM_HOST))

    @property
    def num_host_cached_blocks(self) -> int:
        return sum(len(index) for index in self._host_by_hash)

    def match_host(self, hashes: Sequence[bytes], limit: int, partition: int = 0) -> list[int]:
        """The host blocks of `partition` holding `hashes[:limit]`'s leading run (the part of a prefix
        beyond what the device cache holds), each touched as used now."""
        found: list[int] = []
        if not self.host_blocks:
            return found
        index = self._host_by_hash[partition]
        for h in hashes[:limit]:
            host = index.get(h)
            if host is None:
                break
            index.move_to_end(h)
            found.append(host)
        return found

    def host_partition(self, hashes: Sequence[bytes], limit: int, need: int) -> int | None:
        """For a prompt no device partition caches: the partition whose host tier holds the longest leading
        run of `hashes[:limit]` and that has `need` free blocks (None: no host hit fits one)."""
        best, most = None, 0
        for p in range(len(self._free) if self.host_blocks else 0):
            run = 0
            for h in hashes[:limit]:
                if h not in self._host_by_hash[p]:
                    break
                run += 1
            if run > most and self._free_in(p) >= need:
                best, most = p, run
        return best

    def restore(self, host_ids: Sequence[int], device_ids: Sequence[int]) -> None:
        """The host blocks' KV goes back into these (held) device blocks (a copy queued for the engine)."""
        self._copies += [("in", h, d) for h, d in zip(host_ids, device_ids)]
        self.host_blocks_in += len(host_ids)
        self._must_sync |= not self._ahead_host.isdisjoint(host_ids)

    def write_ahead(self, target: int) -> None:
        """Copies to the host the cached blocks next in line for eviction that it lacks, so that each
        partition has `target` blocks it can hand out without copying (empty ones first)."""
        if not self.host_blocks:
            return
        for p, evictable in enumerate(self._evictable):
            for block in list(islice(evictable, max(0, target - len(self._free[p])))):
                self._to_host(block, ahead=True)

    def take_ahead(self) -> list[tuple[str, int, int]]:
        """The copies written ahead since the last call (for the engine's side stream)."""
        copies, self._ahead = self._ahead, []
        return copies

    def take_sync(self) -> bool:
        """Whether what was allocated, restored or copied since the last call touches a block that copies
        written ahead may still read or write: the engine's stream must wait for them first. Afterwards
        nothing earlier is in flight."""
        must, self._must_sync = self._must_sync, False
        if must:
            self._ahead_device.clear()
            self._ahead_host.clear()
        return must

    def take_copies(self) -> list[tuple[str, int, int]]:
        """The host tier's copies queued since the last call, in the order they must run."""
        copies, self._copies = self._copies, []
        return copies

    def _event(self, partition: int, event: KVEvent) -> None:
        if self.record_events:
            self._events.append((partition, event))

    def share(self, block_ids: Sequence[int]) -> None:
        """Another holder of blocks in use, or of cached blocks no request holds (a prefix-cache hit)."""
        for i in block_ids:
            if self._ref_counts[i] < 1 and i not in self._evictable[self.partition_of(i)]:
                raise BlockError(f"block {i} is free and cannot be shared")
        for i in block_ids:
            if self._ref_counts[i] == 0:
                del self._evictable[self.partition_of(i)][i]
            self._ref_counts[i] += 1

    def free(self, block_ids: Sequence[int]) -> None:
        """One holder lets go of a table. Blocks no one holds any more return to the free pool; cached ones
        stay findable, the table's last blocks first in line for eviction."""
        for i in block_ids:
            if self._ref_counts[i] < 1:
                raise BlockError(f"block {i} is already free")
        for i in reversed(block_ids):
            self._ref_counts[i] -= 1
            if self._ref_counts[i] == 0:
                if self._hash_of[i] is not None:
                    self._evictable[self.partition_of(i)][i] = None
                else:
                    self._free[self.partition_of(i)].append(i)

    def ensure_capacity(self, block_table: list[int], num_tokens: int) -> bool:
        """Grows `block_table` to hold `num_tokens`; False (and no change) if blocks run out."""
        extra = self.blocks_for(num_tokens) - len(block_table)
        if extra <= 0:
            return True
        partition = self._partition(block_table)
        if extra > self._free_in(partition):
            return False
        block_table.extend(self.allocate(extra, partition))
        return True

    # ---- the prefix cache --------------------------------------------------------------------------
    def match(self, hashes: Sequence[bytes], limit: int) -> list[int]:
        """The cached blocks holding the longest prefix of `hashes` (at most `limit` blocks), in the one
        partition that holds the most of it (ties: the one with most free blocks); [] without caching."""
        if not self.caching or not hashes or limit <= 0:
            return []
        best: list[int] = []
        for p in sorted(range(len(self._free)), key=self._free_in, reverse=True):
            found = []
            for h in hashes[:limit]:
                block = self._by_hash[p].get(h)
                if block is None:
                    break
                found.append(block)
            if len(found) > len(best):
                best = found
        return best

    def register(self, block: int, block_hash: bytes, parent: bytes | None = None,
                 token_ids: Sequence[int] = ()) -> None:
        """`block` (held) now holds the KV its hash names (`parent`: the previous block's hash, None for a
        first block; `token_ids`: the block's tokens, for the event). A block already cached under that hash
        stays the one found (two requests that computed one prefix at once: the later copy is freed as
        usual)."""
        if not self.caching or self._hash_of[block] is not None:
            return
        p = self.partition_of(block)
        if block_hash in self._by_hash[p]:
            return
        self._by_hash[p][block_hash] = block
        self._hash_of[block] = block_hash
        if not self.record_events:
            return
        last = self._events[-1] if self._events else None
        if last and last[0] == p and isinstance(last[1], BlockStored) and last[1].block_hashes[-1] == parent:
            last[1].block_hashes.append(block_hash)  # the next block of the same chain: one event
            last[1].token_ids.extend(token_ids)
        else:
            self._events.append((p, BlockStored([block_hash], parent, list(token_ids), self.block_size)))

    def _forget(self, block: int) -> None:
        block_hash = self._hash_of[block]
        if block_hash is not None:
            p = self.partition_of(block)
            del self._by_hash[p][block_hash]
            self._hash_of[block] = None
            if not self.record_events:
                return
            last = self._events[-1] if self._events else None
            if last and last[0] == p and isinstance(last[1], BlockRemoved):
                last[1].block_hashes.append(block_hash)
            else:
                self._events.append((p, BlockRemoved([block_hash])))

    def take_events(self) -> list[tuple[int, KVEvent]]:
        """The cache's changes since the last call, (partition, event) in order."""
        events, self._events = self._events, []
        return events

    def reset_cache(self) -> int:
        """Forgets every cached block (held ones are kept by their requests, but no longer found), in both
        tiers; returns how many device blocks were cached."""
        cached = self.num_cached_blocks
        for free, index in zip(self._host_free, self._host_by_hash):
            free.extend(index.values())
            index.clear()
        for p, evictable in enumerate(self._evictable):
            self._free[p].extend(evictable)
            evictable.clear()
            self._by_hash[p].clear()
            if self.caching and self.record_events:
                self._events.append((p, AllBlocksCleared()))
        self._hash_of = [None] * self.num_blocks
        return cached

    def all_free(self) -> bool:
        """The leak oracle: with no live request, every block is free (cached ones no request holds are)."""
        return self.num_free_blocks == self.num_blocks and not any(self._ref_counts)
