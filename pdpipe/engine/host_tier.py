"""The host-memory tier's copies (`engine.cache.host_kv_cache_mb`): a pool of blocks in (pinned, on GPU
hosts) host memory, one block a contiguous run of all its layers' keys and values, so a block moves in
one copy whatever the layer count. The block manager decides what moves (`take_copies`); the copies run
here, queued on the engine's stream in the order given, so a device block is copied out before a later
step writes into it, and copied back before a later step reads it: the host thread never waits.

Copies written ahead (`behind`: cached blocks copied out before anything evicts them, so that an eviction
then costs no copy) run on a side stream once what the engine's stream has queued is done, beside its
next steps; `sync` has the engine's stream wait for them, which the engine asks for before a step that
uses a block they touch.

Copies go in batches: a device block is a strided view (its layers lie apart), so a copy a block would
first gather it on the device and then move 2 MiB (the 8B shape) at a time, a fraction of the link's
bandwidth. Instead the blocks of a batch are gathered (out) or scattered (in) on the device in one
indexed copy through a staging buffer of at most `STAGING_BYTES`, and each run of consecutive host
blocks crosses the link as one copy."""
from __future__ import annotations

import torch

from .kv_cache import KVCache

STAGING_BYTES = 64 << 20  # a batch's device staging buffer, at most (between steps: activations are free)


class HostTier:
    def __init__(self, kv_cache: KVCache, num_blocks: int, staging_bytes: int = STAGING_BYTES):
        self.staging_bytes = staging_bytes
        self.kv = kv_cache.data  # [layers, 2, blocks, block_size, kv_heads, head_dim]
        shape = (num_blocks, self.kv.shape[0], 2, *self.kv.shape[3:])
        self.data = torch.zeros(shape, dtype=self.kv.dtype, pin_memory=self.kv.is_cuda)
        self.side = torch.cuda.Stream(self.kv.device) if self.kv.is_cuda else None
        self.written_ahead: torch.cuda.Event | None = None  # the side stream's last copies

    @property
    def block_bytes(self) -> int:
        return self.data[0].numel() * self.data.element_size()

    def sync(self) -> None:
        """What the engine's stream runs next waits for the copies written ahead (on CPU they are done)."""
        if self.written_ahead is not None:
            torch.cuda.current_stream(self.kv.device).wait_event(self.written_ahead)
            self.written_ahead = None

    def settle(self) -> None:
        """Returns once the copies written ahead are done (another process uses the blocks next)."""
        if self.side is not None:
            self.side.synchronize()

    def run(self, copies: list[tuple[str, int, int]], behind: bool = False) -> None:
        """("out", device block, host block) copies a block to the host, ("in", host block, device
        block) back; as if one by one in order (a batch never holds two copies of one block, so the
        order within it does not matter). `behind`: on the side stream, after what the engine's stream
        has queued (the blocks' KV may still be being written)."""
        if behind and self.side is not None and copies:
            self.side.wait_stream(torch.cuda.current_stream(self.kv.device))
            with torch.cuda.stream(self.side):
                self._run(copies)
                self.written_ahead = self.side.record_event()
            return
        self._run(copies)

    def _run(self, copies: list[tuple[str, int, int]]) -> None:
        most = max(1, self.staging_bytes // self.block_bytes)
        batch: list[tuple[str, int, int]] = []
        seen: set[tuple[str, int]] = set()
        for kind, src, dst in copies:
            device, host = (src, dst) if kind == "out" else (dst, src)
            if batch and (kind != batch[0][0] or ("d", device) in seen or ("h", host) in seen or len(batch) == most):
                self._batch(batch)
                batch, seen = [], set()
            batch.append((kind, device, host))
            seen.update((("d", device), ("h", host)))
        if batch:
            self._batch(batch)

    def _batch(self, batch: list[tuple[str, int, int]]) -> None:
        """Copies of one direction, no block twice: gathered or scattered on the device in one indexed copy,
        each run of consecutive host blocks across the link in one copy."""
        batch = sorted(batch, key=lambda c: c[2])  # by host block: consecutive ones form runs
        kind = batch[0][0]
        device = torch.tensor([d for _, d, _ in batch], device=self.kv.device)
        if kind == "out":
            staging = self.kv.index_select(2, device).movedim(2, 0).contiguous()  # [n, layers, 2, block_size, …]
            for first, start, n in _runs([h for _, _, h in batch]):
                self.data[first:first + n].copy_(staging[start:start + n], non_blocking=True)
        else:
            staging = torch.empty((len(batch), *self.data.shape[1:]), dtype=self.kv.dtype, device=self.kv.device)
            for first, start, n in _runs([h for _, _, h in batch]):
                staging[start:start + n].copy_(self.data[first:first + n], non_blocking=True)
            self.kv.index_copy_(2, device, staging.movedim(0, 2))


def _runs(ids: list[int]) -> list[tuple[int, int, int]]:
    """Runs of consecutive ids in a sorted list: (first id, its position, length)."""
    runs: list[tuple[int, int, int]] = []
    for pos, i in enumerate(ids):
        if runs and runs[-1][0] + runs[-1][2] == i:
            first, start, n = runs[-1]
            runs[-1] = (first, start, n + 1)
        else:
            runs.append((i, pos, 1))
    return runs
