"""Data-parallel attention inside an instance (models/parallel.py): rank 0 schedules every rank's
sequences, a sequence living on the rank whose pool holds its blocks (the block manager's partitions),
and hands each step's shares over; every rank runs its share, padded to the same token count (each MoE
layer gathers all ranks' tokens), and rank 0 gathers the logits of the rows that sample. Decode steps
replay every rank's CUDA graph of one batch size (the largest share's), padded rows attending to
nothing, and steps of whole prompts every rank's prefill graph of one token count; other steps run
eagerly."""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from .scheduler import SchedulerOutput

if TYPE_CHECKING:
    from .model_runner import ModelRunner
    from .sequence import Sequence


def _by_rank(runner: ModelRunner, out: SchedulerOutput) -> list[list]:
    assert runner.tp is not None
    per_rank = runner.kv_cache.num_blocks
    chunks: list[list] = [[] for _ in range(runner.tp.size)]
    for chunk in out.chunks:
        chunks[chunk.seq.block_table[0] // per_rank].append(chunk)
    return chunks


def graph_shares(runner: ModelRunner, out: SchedulerOutput) -> tuple[int, list[dict], list[list[int]], list] | None:
    """A decode step as every rank's inputs to its graph of one size (the smallest holding the largest
    share), each rank's sampling rows and the sampling sequences in that order; None when the step is
    not for the graphs."""
    graphs = runner.graphs
    if graphs is None or not all(c.num_tokens == 1 for c in out.chunks):
        return None
    chunks = _by_rank(runner, out)
    most = max(len(mine) for mine in chunks)
    if most > graphs.max_batch:
        return None
    size, per_rank = graphs.size_for(max(most, 1)), runner.kv_cache.num_blocks
    inputs = [graphs.inputs(SchedulerOutput(chunks=mine), first_block=rank * per_rank, size=size)[1]
              for rank, mine in enumerate(chunks)]
    rows = [[i for i, c in enumerate(mine) if c.samples] for mine in chunks]
    return size, inputs, rows, [c.seq for mine in chunks for c in mine if c.samples]


def _gather_sampled(runner: ModelRunner, logits: torch.Tensor, rows: list[list[int]],
                    on_layer_done=None) -> torch.Tensor:
    """Every rank's `logits` (one row count on all) gathered: the rows each rank samples, rank 0's
    first. The gather ends every data-parallel step, sampling or not: once it is over every rank has
    written all its KV, and only then are the layers announced (a layer with no collective, a dense
    one, would otherwise be announced before the other ranks wrote it)."""
    assert runner.tp is not None
    everyone = runner.tp.all_gather_rows(logits)
    if on_layer_done is not None:
        for layer in range(runner.model.spec.num_layers):
            on_layer_done(layer)
    most = logits.shape[0]
    return everyone[[rank * most + i for rank, mine in enumerate(rows) for i in mine]]


def replay_share(runner: ModelRunner, size: int, inputs: list[dict], rows: list[list[int]]) -> torch.Tensor:
    """This rank's graph replayed on its inputs; every rank's sampling rows' logits, rank 0's first."""
    assert runner.tp is not None and runner.graphs is not None
    return _gather_sampled(runner, runner.graphs.replay(size, inputs[runner.tp.rank]), rows)


def prefill_graph_shares(runner: ModelRunner, out: SchedulerOutput) -> tuple[int, list[dict], list[int], list] | None:
    """A step of whole prompts as every rank's inputs to its prefill graph of one size (the smallest
    holding the largest share: a rank with fewer tokens, or none, replays padding rows for the MoE
    layers' collectives), how many logits each rank samples, and the sampling sequences in that order;
    None when a share does not fit the graphs."""
    prefills = runner.prefill_graphs
    if prefills is None:
        return None
    chunks = _by_rank(runner, out)
    if not all(prefills.holds(SchedulerOutput(chunks=mine)) for mine in chunks):
        return None
    size = prefills.size_for(max(1, max(sum(c.num_tokens for c in mine) for mine in chunks)))
    per_rank = runner.kv_cache.num_blocks
    packed = [prefills.inputs(SchedulerOutput(chunks=mine), first_block=rank * per_rank, size=size)[1]
              for rank, mine in enumerate(chunks)]
    counts = [sum(c.samples for c in mine) for mine in chunks]
    return size, packed, counts, [c.seq for mine in chunks for c in mine if c.samples]


def replay_prefill_share(runner: ModelRunner, size: int, packed: list[dict], counts: list[int],
                         on_layer_done=None) -> torch.Tensor:
    """This rank's prefill graph replayed on its inputs (its sampled rows first); every rank's sampled
    logits, rank 0's first."""
    assert runner.tp is not None and runner.prefill_graphs is not None
    logits = runner.prefill_graphs.replay(size, packed[runner.tp.rank])
    return _gather_sampled(runner, logits, [list(range(n)) for n in counts], on_layer_done)


def shares(runner: ModelRunner, out: SchedulerOutput) -> tuple[list[dict], list[Sequence]]:
    """Each rank's layout of the step (its block ids its own pool's), padded to one token count, and
    the sampling sequences in the order of the logits `run_share` returns."""
    per_rank = runner.kv_cache.num_blocks
    chunks = _by_rank(runner, out)
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
    ([rows, vocab] float32; what rank 0 samples from), as _gather_sampled."""
    assert runner.tp is not None
    lay = lays[runner.tp.rank]
    logits = runner._forward(*runner.place(lay))
    most = max(1, max(len(other["rows"]) for other in lays))
    padded = torch.zeros(most, runner.model.spec.vocab_size, dtype=torch.float32, device=runner.device)
    if lay["rows"]:
        padded[: len(lay["rows"])] = logits
    return _gather_sampled(runner, padded, [list(range(len(other["rows"]))) for other in lays], on_layer_done)
