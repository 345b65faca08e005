"""Owns which KV blocks are free. Blocks carry reference counts so a block can be shared; a block
returns to the free list when its last holder frees it. The engine's scheduler is its only user."""
from __future__ import annotations

from collections import deque


class BlockError(RuntimeError):
    """A misuse of the block manager: freeing a free block, allocating more than is free."""


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int):
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"num_blocks and block_size must be >= 1, got {num_blocks}, {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self._free: deque[int] = deque(range(num_blocks))
        self._ref_counts = [0] * num_blocks

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - len(self._free)

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def can_allocate(self, num_blocks: int) -> bool:
        return num_blocks <= len(self._free)

    def allocate(self, num_blocks: int) -> list[int]:
        if not self.can_allocate(num_blocks):
            raise BlockError(f"asked for {num_blocks} blocks, {len(self._free)} free")
        ids = [self._free.popleft() for _ in range(num_blocks)]
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
                self._free.append(i)

    def ensure_capacity(self, block_table: list[int], num_tokens: int) -> bool:
        """Grows `block_table` to hold `num_tokens`; False (and no change) if blocks run out."""
        extra = self.blocks_for(num_tokens) - len(block_table)
        if extra <= 0:
            return True
        if not self.can_allocate(extra):
            return False
        block_table.extend(self.allocate(extra))
        return True

    def all_free(self) -> bool:
        """The leak oracle: with no live request, every block is free."""
        return len(self._free) == self.num_blocks and not any(self._ref_counts)
