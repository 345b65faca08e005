"""The host-memory tier's copies (`engine.cache.host_kv_cache_mb`): a pool of blocks in (pinned, on GPU
hosts) host memory, one block a contiguous run of all its layers' keys and values, so a block moves in
one copy whatever the layer count. The block manager decides what moves (`take_copies`); the copies run
here, queued on the engine's stream in the order given, so a device block is copied out before a later
step writes into it, and copied back before a later step reads it: the host thread never waits."""
from __future__ import annotations

import torch

from .kv_cache import KVCache


class HostTier:
    def __init__(self, kv_cache: KVCache, num_blocks: int):
        self.kv = kv_cache.data  # [layers, 2, blocks, block_size, kv_heads, head_dim]
        shape = (num_blocks, self.kv.shape[0], 2, *self.kv.shape[3:])
        self.data = torch.zeros(shape, dtype=self.kv.dtype, pin_memory=self.kv.is_cuda)

    @property
    def block_bytes(self) -> int:
        return self.data[0].numel() * self.data.element_size()

    def run(self, copies: list[tuple[str, int, int]]) -> None:
        """("out", device block, host block) copies a block to the host, ("in", host block, device
        block) back; in order."""
        for kind, src, dst in copies:
            if kind == "out":
                self.data[dst].copy_(self.kv[:, :, src], non_blocking=True)
            else:
                self.kv[:, :, dst].copy_(self.data[src], non_blocking=True)
