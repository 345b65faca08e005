"""Admission to decode instances: the queue requests wait in, and the room each decode instance has.

A request leaves the queue, oldest first, only when a decode instance has room for its prompt and its
output share (blocks) and a sequence slot (`max_num_seqs`, so decode stays within its captured batch
sizes and does not preempt while outputs stay within their room). Room is committed when the request
is dispatched and released when the decode instance has freed the request's blocks: at once when
decode itself finished it, on decode's `Freed` otherwise.

Blocks shared through the prefix cache are committed once per copy, not once per holder. A request's full
prompt blocks are committed by their hash: those the instance's cache holds when it is dispatched (by the
scheduler's index, settled at `Reserved` by what decode took) it shares, the rest it owns (their KV is
computed or moved for it: a copy of its own, which later requests share once it lands). A hash costs one block
per live owner, plus one while requests share it and the copy they share may be no live owner's (none
was live when they came, or an owner ended since: the cached copy of two owners is the one that landed
first). Replies are not hashed here: a later request sharing a live request's reply blocks counts them
twice, which errs towards less room, never more. Nothing is retried on a timer: the queue moves when a
request arrives, when room is released, and when a decode instance reports in.
"""
from __future__ import annotations

import bisect
from collections.abc import Sequence
from dataclasses import dataclass, field

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
    held: dict[bytes, list[int]] = field(default_factory=dict)  # prompt block hash → its holders (`_hold`)
    hashed: int = 0  # blocks the hashes cost: owners + orphan over `held`

    @property
    def shares(self) -> bool:
        """Whether requests here may share blocks: one pool (data-parallel partitions each cache their own),
        its size known."""
        return self.known and self.pool_blocks == self.num_blocks

    @property
    def known(self) -> bool:
        return self.num_blocks > 0

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // max(self.block_size, 1))

    def fits(self, num_tokens: int, need: int | None = None) -> bool:
        """Whether a request of `num_tokens` fits, committing `need` blocks (its whole room unless told: the
        blocks it shares with others are committed already)."""
        if self.blocked:
            return False
        if not self.known:  # not reported yet: let decode itself say (it refuses what does not fit)
            return self.seqs == 0
        whole = self.blocks_for(num_tokens)
        need = whole if need is None else need
        return (self.blocks + need <= self.num_blocks and whole <= self.pool_blocks
                and (not self.max_num_seqs or self.seqs < self.max_num_seqs))

    @property
    def free_blocks(self) -> int:
        return self.num_blocks - self.blocks


class DecodeLedger:
    """What the scheduler has committed on each decode instance."""

    def __init__(self) -> None:
        self.rooms: dict[str, DecodeRoom] = {}
        self.commitments: dict[str, tuple[str, int]] = {}  # request id → (decode, tokens)
        self.prompts: dict[str, tuple[list[bytes], int]] = {}  # request id → (its full prompt blocks' hashes,
        # how many leading ones it shares)

    def _unhashed(self, request_id: str) -> int:
        """A request's committed blocks beyond its hashed prompt blocks: its partial block and output room."""
        decode, num_tokens = self.commitments[request_id]
        return max(0, self.room(decode).blocks_for(num_tokens) - len(self.prompts[request_id][0]))

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
        room.blocks = room.hashed + sum(self._unhashed(rid) for rid, (d, _) in self.commitments.items()
                                        if d == stats.instance)
        if opened:
            room.blocked = False
        return opened

    def commit(self, request_id: str, decode: str, num_tokens: int, hashes: Sequence[bytes] = (),
               shared: int = 0, block_size: int = 0) -> None:
        """Commits room for `num_tokens` on `decode`; `hashes` are the request's full prompt blocks' (of
        `block_size` tokens), the first `shared` of them in `decode`'s cache (none shared where the instance
        has partitions or other blocks, or its size is not known yet)."""
        room = self.room(decode)
        if not room.shares or block_size != room.block_size:
            hashes, shared = (), 0
        self.commitments[request_id] = (decode, num_tokens)
        self.prompts[request_id] = (list(hashes), min(shared, len(hashes)))
        room.blocks += self._unhashed(request_id) + self._hold(room, hashes[:shared], sharing=True, sign=1) \
            + self._hold(room, hashes[shared:], sharing=False, sign=1)
        room.seqs += 1

    def cost(self, decode: str, num_tokens: int, hashes: Sequence[bytes] = (), shared: int = 0,
             block_size: int = 0) -> int:
        """The blocks `commit` with these arguments would add to `decode`'s committed ones."""
        room = self.room(decode)
        if not room.shares or block_size != room.block_size:
            return room.blocks_for(num_tokens)
        shared = min(shared, len(hashes))
        new = 0
        for h in hashes[:shared]:
            entry = room.held.get(h)
            new += entry is None or (not entry[2] and (not entry[0] or entry[3]))
        return max(0, room.blocks_for(num_tokens) - len(hashes)) + len(hashes) - shared + new

    def settle(self, request_id: str, shared: int) -> None:
        """Decode took `shared` leading prompt blocks from its cache (the index may have been behind)."""
        held = self.commitments.get(request_id)
        if held is None:
            return
        room = self.room(held[0])
        hashes, was = self.prompts[request_id]
        shared = min(shared, len(hashes))
        if shared < was:  # evicted meanwhile: a copy of its own
            moved = hashes[shared:was]
            room.blocks += self._hold(room, moved, sharing=True, sign=-1) \
                + self._hold(room, moved, sharing=False, sign=1)
        elif shared > was:  # there before the index heard of it
            moved = hashes[was:shared]
            room.blocks += self._hold(room, moved, sharing=False, sign=-1, copied=False) \
                + self._hold(room, moved, sharing=True, sign=1)
        self.prompts[request_id] = (hashes, shared)

    @staticmethod
    def _hold(room: DecodeRoom, hashes: Sequence[bytes], sharing: bool, sign: int, copied: bool = True) -> int:
        """Adds (sign 1) or drops (-1) one holder, an owner or a sharer, of each of `hashes`; returns the
        change in the blocks they cost. An owner dropped with `copied` off never had a copy of its own."""
        change = 0
        for h in hashes:
            entry = room.held.setdefault(h, [0, 0, 0, 0])  # owners, sharers, orphan, stale
            before = entry[0] + entry[2]
            if sharing:
                entry[1] += sign
                if sign > 0 and (not entry[0] or entry[3]):  # the cached copy may be no live owner's
                    entry[2] = 1
                elif not entry[1]:
                    entry[2] = 0
            else:
                entry[0] += sign
                if sign < 0 and copied and entry[1]:  # the sharers may hold this owner's copy
                    entry[2] = 1
                if sign < 0 and copied:  # its copy, if the one cached, stays there for later sharers
                    entry[3] = int(entry[0] > 0)
                elif not entry[0]:
                    entry[3] = 0
            change += entry[0] + entry[2] - before
            if entry[:3] == [0, 0, 0]:
                del room.held[h]
        room.hashed += change
        return change

    def release(self, request_id: str, instance: str = "") -> str | None:
        """The request's room is free again (on `instance`, when given: another's word does not count);
        returns the instance it was on."""
        held = self.commitments.get(request_id)
        if held is None or (instance and held[0] != instance):
            return None
        decode = held[0]
        room = self.room(decode)
        hashes, shared = self.prompts[request_id]
        room.blocks -= self._unhashed(request_id)
        room.blocks += self._hold(room, hashes[:shared], sharing=True, sign=-1) \
            + self._hold(room, hashes[shared:], sharing=False, sign=-1)
        del self.commitments[request_id], self.prompts[request_id]
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
            del self.commitments[rid], self.prompts[rid]

    def never_fits(self, decodes: list[str], num_tokens: int) -> bool:
        rooms = [self.room(d) for d in decodes]
        return bool(rooms) and all(r.known and r.blocks_for(num_tokens) > r.pool_blocks for r in rooms)

    def best(self, decodes: list[str], num_tokens: int, needs: dict[str, int] | None = None) -> str | None:
        """The decode instance with the most free room that fits `num_tokens` (committing `needs[d]` blocks
        on `d`, when given), or None."""
        fitting = [d for d in decodes if self.room(d).fits(num_tokens, needs[d] if needs else None)]
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
