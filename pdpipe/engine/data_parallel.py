"""Data-parallel attention inside an instance (models/parallel.py): rank 0 schedules every rank's
sequences, a sequence living on the rank whose pool holds its blocks (the block manager's partitions),
and hands each step's shares over; every rank runs its share, padded to the same token count (each MoE
layer gathers all ranks' tokens), and rank 0 gathers the logits of the rows that sample."""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from .scheduler import SchedulerOutput

if TYPE_CHECKING:
    from .model_runner import ModelRunner
    from .sequence import Sequence


def shares(runner: ModelRunner, out: SchedulerOutput) -> tuple[list[dict], list[Sequence]]:
    """Each rank's layout of the step (its block ids its own pool's), padded to one token count, and
    the sampling sequences in the order of the logits `run_share` returns."""
    assert runner.tp is not None
    per_rank = runner.kv_cache.num_blocks
    chunks: list[list] = [[] for _ in range(runner.tp.size)]
    for chunk in out.chunks:
        chunks[chunk.seq.block_table[0] // per_rank].append(chunk)
    lays = [runner.layout(SchedulerOutput(chunks=mine), first_block=rank * per_rank)
            for rank, mine in enumerate(chunks)]
    tokens = max(len(lay["ids"]) for lay in lays)
    for lay in lays:  # rows in no sequence, writing nowhere
        pad = tokens - len(lay["ids"])
        lay["ids"] += [0] * pad
        lay["pos"] += [0] * pad
        lay["slots"] += [-1] * pad
    return lays, [c.seq for mine in chunks for c in mine if c.samples]


def run_share(runner: ModelRunner, lays: list[dict], on_layer_done=None) -> torch.Tensor:
    """This rank's share of the step; returns every rank's sampled rows' logits, rank 0's first
    ([rows, vocab] float32; what rank 0 samples from). The gather ends every step, sampling or not:
    once it is over every rank has written all its KV, and only then are the layers announced (a
    layer with no collective, a dense one, would otherwise be announced before the other ranks wrote
    it)."""
    assert runner.tp is not None
    lay = lays[runner.tp.rank]
    logits = runner._forward(*runner.place(lay))
    most = max(1, max(len(other["rows"]) for other in lays))
    padded = torch.zeros(most, runner.model.spec.vocab_size, dtype=torch.float32, device=runner.device)
    if lay["rows"]:
        padded[: len(lay["rows"])] = logits
    everyone = runner.tp.all_gather_rows(padded)
    if on_layer_done is not None:
        for layer in range(runner.model.spec.num_layers):
            on_layer_done(layer)
    return everyone[[rank * most + i for rank, other in enumerate(lays) for i in range(len(other["rows"]))]]
