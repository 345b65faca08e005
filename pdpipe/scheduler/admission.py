"""Admission to decode instances: the queue requests wait in, and the room each decode instance has.

A request leaves the queue, oldest first, only when a decode instance has room for its prompt and its
output share (blocks) and a sequence slot (`max_num_seqs`, so decode stays within its captured batch
sizes and does not preempt while outputs stay within their room). Room is committed when the request
is dispatched and released when the decode instance has freed the request's blocks: at once when
decode itself finished it, on decode's `Freed` otherwise. Nothing is retried on a timer: the queue moves when a
request arrives, when room is released, and when a decode instance reports in.
"""
from __future__ import annotations

import bisect
from dataclasses import dataclass

from pdpipe.messages import InstanceStats


@dataclass
class DecodeRoom:
    num_blocks: int = 0  # 0: not reported yet
    pool_blocks: int = 0  # the most one request can take (one rank's pool with data-parallel attention); set
    # with num_blocks
    block_size: int = 0
    max_num_seqs: int = 0
    blocks: int = 0  # committed to requests dispatched here
    seqs: int = 0
    blocked: bool = False  # refused a reservation the ledger thought fitted: asked again after a release
    needs: int = 0  # ... or once it reports this many free blocks

    @property
    def known(self) -> bool:
        return self.num_blocks > 0

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // max(self.block_size, 1))

    def fits(self, num_tokens: int) -> bool:
        if self.blocked:
            return False
        if not self.known:  # not reported yet: let decode itself say (it refuses what does not fit)
            return self.seqs == 0
        need = self.blocks_for(num_tokens)
        return (self.blocks + need <= self.num_blocks and need <= self.pool_blocks
                and (not self.max_num_seqs or self.seqs < self.max_num_seqs))

    @property
    def free_blocks(self) -> int:
        return self.num_blocks - self.blocks


class DecodeLedger:
    """What the scheduler has committed on each decode instance."""

    def __init__(self) -> None:
        self.rooms: dict[str, DecodeRoom] = {}
        self.commitments: dict[str, tuple[str, int]] = {}  # request id → (decode, tokens)

    def _blocks(self, request_id: str) -> int:
        """A request's committed blocks: its whole room, blocks it shares with others (a decode-side prefix
        hit) counted for each holder — conservative, since a sharer that ends leaves them held."""
        decode, num_tokens = self.commitments[request_id]
        return self.room(decode).blocks_for(num_tokens)

    def room(self, decode: str) -> DecodeRoom:
        return self.rooms.setdefault(decode, DecodeRoom())

    def report(self, stats: InstanceStats) -> bool:
        """An instance's stats; True when it may take a request it could not take before (its size is
        known now, or it refused one and now reports the free blocks that one needed)."""
        room = self.room(stats.instance)
        free = stats.pool_free_blocks if stats.pool_blocks else stats.free_blocks  # in one pool
        opened = not room.known or (room.blocked and free >= room.needs)
        room.num_blocks, room.block_size = stats.num_blocks, stats.block_size or room.block_size or 1
        room.pool_blocks = stats.pool_blocks or stats.num_blocks
        room.max_num_seqs = stats.max_num_seqs
        room.blocks = sum(self._blocks(rid) for rid, (d, _) in self.commitments.items() if d == stats.instance)
        if opened:
            room.blocked = False
        return opened

    def commit(self, request_id: str, decode: str, num_tokens: int) -> None:
        room = self.room(decode)
        room.blocks += room.blocks_for(num_tokens)
        room.seqs += 1
        self.commitments[request_id] = (decode, num_tokens)

    def release(self, request_id: str, instance: str = "") -> str | None:
        """The request's room is free again (on `instance`, when given: another's word does not count);
        returns the instance it was on."""
        held = self.commitments.get(request_id)
        if held is None or (instance and held[0] != instance):
            return None
        decode = held[0]
        room = self.room(decode)
        room.blocks -= self._blocks(request_id)
        del self.commitments[request_id]
        room.seqs -= 1
        room.blocked = False
        return decode

    def refused(self, request_id: str) -> None:
        held = self.commitments.get(request_id)
        if held is not None and self.release(request_id):
            room = self.room(held[0])
            room.blocked, room.needs = True, room.blocks_for(held[1])

    def forget(self, decode: str) -> None:
        self.rooms.pop(decode, None)
        for rid in [r for r, (d, _) in self.commitments.items() if d == decode]:
            del self.commitments[rid]

    def never_fits(self, decodes: list[str], num_tokens: int) -> bool:
        rooms = [self.room(d) for d in decodes]
        return bool(rooms) and all(r.known and r.blocks_for(num_tokens) > r.pool_blocks for r in rooms)

    def best(self, decodes: list[str], num_tokens: int) -> str | None:
        """The decode instance with the most free room that fits `num_tokens`, or None."""
        fitting = [d for d in decodes if self.room(d).fits(num_tokens)]
        if not fitting:
            return None
        return max(fitting, key=lambda d: (self.room(d).free_blocks, -self.room(d).seqs))


class AdmissionQueue:
    """Requests waiting for decode room, in arrival order (FIFO; a refused request keeps its place)."""

    def __init__(self) -> None:
        self._entries: list[tuple[int, str]] = []  # (arrival number, request id), sorted
        self._numbers: dict[str, int] = {}

    def push(self, request_id: str, number: int) -> None:
        if request_id in self._numbers:
            raise ValueError(f"request {request_id!r} is already queued")
        self._numbers[request_id] = number
        bisect.insort(self._entries, (number, request_id))

    def head(self) -> str | None:
        return self._entries[0][1] if self._entries else None

    def remove(self, request_id: str) -> bool:
        number = self._numbers.pop(request_id, None)
        if number is None:
            return False
        self._entries.pop(bisect.bisect_left(self._entries, (number, request_id)))
        return True

    def __contains__(self, request_id: str) -> bool:
        return request_id in self._numbers

    def __len__(self) -> int:
        return len(self._entries)

    def __iter__(self):
        return (rid for _, rid in self._entries)
