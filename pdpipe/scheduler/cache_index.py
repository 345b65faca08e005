"""Which instance holds which cached blocks: the scheduler's global prefix-cache index, fed by the
engines' KV events (`kv_events`), so that it can route a request to where its prefix already is.

Keys are (instance, data-parallel rank): a data-parallel instance caches per rank, and a request's hit
on it is its best rank's. A block counts as held while any tier (medium: the device's, the host's) holds
it. An instance that goes down, or says all its blocks are cleared, is forgotten.
"""
from __future__ import annotations

from collections.abc import Sequence

from pdpipe.kv_events import AllBlocksCleared, BlockRemoved, BlockStored, KVEventBatch


class CacheIndex:
    def __init__(self) -> None:
        self._held: dict[tuple[str, int], dict[bytes, set[str]]] = {}  # → hash → the tiers holding it

    def apply(self, instance: str, batch: KVEventBatch) -> None:
        key = (instance, batch.data_parallel_rank or 0)
        held = self._held.setdefault(key, {})
        for event in batch.events:
            if isinstance(event, BlockStored):
                for h in event.block_hashes:
                    held.setdefault(h, set()).add(event.medium or "")
            elif isinstance(event, BlockRemoved):
                for h in event.block_hashes:
                    tiers = held.get(h)
                    if tiers is not None:
                        tiers.discard(event.medium or "")
                        if not tiers:
                            del held[h]
            elif isinstance(event, AllBlocksCleared):
                held.clear()

    def forget(self, instance: str) -> None:
        """`instance` went down or left: its cache is gone (a restarted engine starts empty)."""
        for key in [k for k in self._held if k[0] == instance]:
            del self._held[key]

    def hit_blocks(self, instance: str, hashes: Sequence[bytes], limit: int) -> int:
        """How many leading blocks of `hashes` (at most `limit`) `instance` holds, on its best rank."""
        best = 0
        for (name, _), held in self._held.items():
            if name != instance:
                continue
            n = 0
            for h in hashes[:limit]:
                if h not in held:
                    break
                n += 1
            best = max(best, n)
        return best

    def blocks(self, instance: str) -> int:
        return sum(len(held) for (name, _), held in self._held.items() if name == instance)
