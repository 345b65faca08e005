"""Owns which KV blocks are free. Blocks carry reference counts so a block can be shared; a block
returns to the free list when its last holder frees it. The engine's scheduler is its only user.

With data-parallel attention an instance's ranks each hold a pool of their own: the ids are split in
`partitions` equal runs (partition p: ids p·n .. p·n + n - 1, block `id - p·n` of rank p's pool), and a
sequence's blocks all come from one of them, the one with most free blocks when it is admitted."""
from __future__ import annotations

from collections import deque


class BlockError(RuntimeError):
    """A misuse of the block manager: freeing a free block, allocating more than is free."""


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, partitions: int = 1):
        if num_blocks < 1 or block_size < 1 or partitions < 1 or num_blocks % partitions:
            raise ValueError(f"num_blocks, block_size and partitions must be >= 1 and partitions must divide "
                             f"num_blocks, got {num_blocks}, {block_size}, {partitions}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.partition_size = num_blocks // partitions
        self._free: list[deque[int]] = [deque(range(p * self.partition_size, (p + 1) * self.partition_size))
                                        for p in range(partitions)]
        self._ref_counts = [0] * num_blocks

    @property
    def num_free_blocks(self) -> int:
        return sum(len(f) for f in self._free)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - self.num_free_blocks

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    @property
    def num_free_for_new_table(self) -> int:
        """The free blocks of the partition a new table gets (all free blocks, with one partition)."""
        return len(self._free[self._partition()])

    def partition_of(self, block_id: int) -> int:
        return block_id // self.partition_size

    def _partition(self, block_table: list[int] | None = None) -> int:
        """A table's partition; for a new one, the partition with most free blocks."""
        if block_table:
            return self.partition_of(block_table[0])
        return max(range(len(self._free)), key=lambda p: len(self._free[p]))

    def can_allocate(self, num_blocks: int) -> bool:
        """Whether a new table of `num_blocks` fits (in the partition a new table gets)."""
        return num_blocks <= len(self._free[self._partition()])

    def allocate(self, num_blocks: int, partition: int | None = None) -> list[int]:
        free = self._free[self._partition() if partition is None else partition]
        if num_blocks > len(free):
            raise BlockError(f"asked for {num_blocks} blocks, {len(free)} free")
        ids = [free.popleft() for _ in range(num_blocks)]
        for i in ids:
            self._ref_counts[i] = 1
        return ids

    def share(self, block_ids: list[int]) -> None:
        for i in block_ids:
            if self._ref_counts[i] < 1:
                raise BlockError(f"block {i} is free and cannot be shared")
            self._ref_counts[i] += 1

    def free(self, block_ids: list[int]) -> None:
        for i in block_ids:
            if self._ref_counts[i] < 1:
                raise BlockError(f"block {i} is already free")
            self._ref_counts[i] -= 1
            if self._ref_counts[i] == 0:
                self._free[self.partition_of(i)].append(i)

    def ensure_capacity(self, block_table: list[int], num_tokens: int) -> bool:
        """Grows `block_table` to hold `num_tokens`; False (and no change) if blocks run out."""
        extra = self.blocks_for(num_tokens) - len(block_table)
        if extra <= 0:
            return True
        partition = self._partition(block_table)
        if extra > len(self._free[partition]):
            return False
        block_table.extend(self.allocate(extra, partition))
        return True

    def all_free(self) -> bool:
        """The leak oracle: with no live request, every block is free."""
        return self.num_free_blocks == self.num_blocks and not any(self._ref_counts)
