"""A step as the model runner lays it out, and the typed steps rank 0 of a tensor- or data-parallel
instance hands the other ranks (each rank then runs the same `ModelRunner.run`): plain lists and
arrays, no tensors, so a hand-over costs no GPU sync."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class Layout:
    """An eager step's inputs: token ids, positions and KV slots (padding rows: id 0, slot -1), prompt
    bounds (`qsl`), context lengths after the step, block tables, the rows whose logits are sampled,
    and whether every sequence is a whole prompt with no context before it."""

    ids: list[int]
    pos: list[int]
    slots: list[int]
    qsl: list[int]
    seq_lens: list[int]
    tables: list[list[int]]
    rows: list[int]
    fresh: bool

    def pad_to(self, tokens: int) -> None:
        """Rows in no sequence, writing nowhere, up to `tokens` rows."""
        pad = tokens - len(self.ids)
        self.ids += [0] * pad
        self.pos += [0] * pad
        self.slots += [-1] * pad


@dataclass
class Eager:
    """A step run eagerly."""

    layout: Layout


@dataclass
class DecodeReplay:
    """A decode batch replaying the decode graph of `size` rows; `sampled`: the rows whose logits are
    wanted (None: the first `rows`, every sequence samples)."""

    size: int
    inputs: dict[str, list]
    rows: int
    sampled: list[int] | None = None


@dataclass
class PrefillReplay:
    """A step of prompt chunks replaying the prefill graph of `size` tokens (graphs.pack_prompts' inputs);
    `samples` chunks sample."""

    size: int
    inputs: dict
    samples: int


@dataclass
class WarmGemms:
    """Every projection at every padded token count up to `max_tokens` and row count up to `max_rows`."""

    max_tokens: int
    max_rows: int


@dataclass
class EagerShares:
    """Data-parallel attention: each rank's layout of its own sequences, padded to one token count."""

    layouts: list[Layout]


@dataclass
class DecodeShares:
    """Data-parallel attention: every rank replays its decode graph of `size` rows on its inputs;
    `rows[r]` are the rows rank r samples."""

    size: int
    inputs: list[dict[str, list]]
    rows: list[list[int]]


@dataclass
class PrefillShares:
    """Data-parallel attention: every rank replays its prefill graph of `size` tokens on its inputs;
    `counts[r]` prompts of rank r sample."""

    size: int
    inputs: list[dict]
    counts: list[int]


@dataclass
class TierCopies:
    """Blocks between the device pool and the host tier (block_manager.take_copies' list), before a step."""

    copies: list[tuple[str, int, int]]
    settle: bool = False  # every rank waits for them, then all meet: another process writes those blocks next
    sync: bool = False  # first, the engine's stream waits for the copies written ahead (a block they touch is used)
    behind: bool = False  # copies written ahead (cached blocks to the host before they are evicted): a side stream


Step = Eager | DecodeReplay | PrefillReplay | WarmGemms | EagerShares | DecodeShares | PrefillShares | TierCopies


def local_table(block_table: list[int], first_block: int) -> list[int]:
    """A block table in the ids of the pool whose block 0 is `first_block` (a data-parallel rank's)."""
    return [b - first_block for b in block_table] if first_block else block_table


def block_slots(table: list[int], start: int, end: int, block_size: int) -> np.ndarray:
    """The KV slots of positions start .. end - 1 of a sequence with this block table, with numpy (a
    per-token Python loop took ~0.7 ms of a 2048-token step, with the GPU idle)."""
    here = np.arange(start, end)
    return np.asarray(table[: -(-end // block_size)], dtype=np.int64)[here // block_size] * block_size \
        + here % block_size
