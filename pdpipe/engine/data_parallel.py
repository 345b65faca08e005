"""Data-parallel attention inside an instance (models/parallel.py): rank 0 schedules every rank's
sequences, a sequence living on the rank whose pool holds its blocks (the block manager's partitions),
and hands each step's shares over; every rank runs its share, padded to the same token count (each MoE
layer gathers all ranks' tokens), and rank 0 gathers the logits of the rows that sample. Decode steps
replay every rank's CUDA graph of one batch size (the largest share's), padded rows attending to
nothing, and steps of whole prompts every rank's prefill graph of one token count; other steps run
eagerly. Each rank runs the host tier's copies of its own partition."""
from __future__ import annotations

import dataclasses

import torch

from .layout import DecodeShares, EagerShares, PrefillShares, Step, TierCopies
from .model_runner import ModelRunner
from .scheduler import SchedulerOutput
from .sequence import Sequence


class DataParallelRunner(ModelRunner):
    """A rank of an instance with data-parallel attention: its own sequences, its own KV pool (the block
    manager's partition `rank`; block ids there start at rank × pool size)."""

    def plan(self, out: SchedulerOutput, on_layer_done=None) -> tuple[Step, list[Sequence]]:
        """Decode steps replay every rank's graph (unless layers are announced as they are written),
        steps of whole prompts every rank's prefill graph, others run eagerly; the sampling sequences
        come rank by rank, in the order of the gathered logits."""
        chunks = self._by_rank(out)
        seqs = [c.seq for mine in chunks for c in mine if c.samples]
        step: Step | None = self._decode_shares(chunks) if on_layer_done is None else None
        step = step or self._prefill_shares(chunks) or self._eager_shares(chunks)
        return step, seqs

    def run(self, step: Step, on_layer_done=None) -> torch.Tensor:
        """This rank's share of the step; every rank's sampled rows' logits, rank 0's first ([rows, vocab]
        float32; what rank 0 samples from)."""
        assert self.tp is not None
        rank = self.tp.rank
        if isinstance(step, DecodeShares):
            assert self.graphs is not None
            return self._gather_sampled(self.graphs.replay(step.size, step.inputs[rank]), step.rows)
        if isinstance(step, PrefillShares):
            assert self.prefill_graphs is not None
            logits = self.prefill_graphs.replay(step.size, step.inputs[rank])
            return self._gather_sampled(logits, [list(range(n)) for n in step.counts], on_layer_done)
        if isinstance(step, EagerShares):
            lay = step.layouts[rank]
            logits = self.forward(lay)
            most = max(1, max(len(other.rows) for other in step.layouts))
            padded = torch.zeros(most, self.model.spec.vocab_size, dtype=torch.float32, device=self.device)
            if lay.rows:
                padded[: len(lay.rows)] = logits
            return self._gather_sampled(padded, [list(range(len(other.rows))) for other in step.layouts],
                                        on_layer_done)
        if isinstance(step, TierCopies):
            return super().run(dataclasses.replace(step, copies=self._my_copies(step.copies)), on_layer_done)
        return super().run(step, on_layer_done)

    def _my_copies(self, copies: list[tuple[str, int, int]]) -> list[tuple[str, int, int]]:
        """The host tier's copies of this rank's partition, in its own pool's and host tier's ids (a
        partition's device blocks go to its own host blocks only)."""
        assert self.tp is not None and self.host_tier is not None
        n, h, rank = self.kv_cache.num_blocks, self.host_tier.data.shape[0], self.tp.rank
        mine = []
        for kind, src, dst in copies:
            device, host = (src, dst) if kind == "out" else (dst, src)
            if device // n == rank:
                device, host = device - rank * n, host - rank * h
                mine.append((kind, device, host) if kind == "out" else (kind, host, device))
        return mine

    def fatal(self, exc: Exception) -> bool:
        return True  # the ranks run other sequences: any failure may be this rank's alone

    def _by_rank(self, out: SchedulerOutput) -> list[list]:
        assert self.tp is not None
        per_rank = self.kv_cache.num_blocks
        chunks: list[list] = [[] for _ in range(self.tp.size)]
        for chunk in out.chunks:
            chunks[chunk.seq.block_table[0] // per_rank].append(chunk)
        return chunks

    def _decode_shares(self, chunks: list[list]) -> DecodeShares | None:
        """A decode step as every rank's inputs to its graph of one size (the smallest holding the largest
        share) and each rank's sampling rows; None when the step is not for the graphs."""
        graphs = self.graphs
        if graphs is None or not all(c.num_tokens == 1 for mine in chunks for c in mine):
            return None
        most = max(len(mine) for mine in chunks)
        if most > graphs.max_batch:
            return None
        size, per_rank = graphs.size_for(max(most, 1)), self.kv_cache.num_blocks
        inputs = [graphs.inputs(SchedulerOutput(chunks=mine), first_block=rank * per_rank, size=size)[1]
                  for rank, mine in enumerate(chunks)]
        return DecodeShares(size, inputs, [[i for i, c in enumerate(mine) if c.samples] for mine in chunks])

    def _prefill_shares(self, chunks: list[list]) -> PrefillShares | None:
        """A step of whole prompts as every rank's inputs to its prefill graph of one size (the smallest
        holding the largest share: a rank with fewer tokens, or none, replays padding rows for the MoE
        layers' collectives) and how many logits each rank samples; None when a share does not fit."""
        prefills = self.prefill_graphs
        if prefills is None or not all(prefills.holds(SchedulerOutput(chunks=mine)) for mine in chunks):
            return None
        size = prefills.size_for(max(1, max(sum(c.num_tokens for c in mine) for mine in chunks)))
        per_rank = self.kv_cache.num_blocks
        packed = [prefills.inputs(SchedulerOutput(chunks=mine), first_block=rank * per_rank, size=size)[1]
                  for rank, mine in enumerate(chunks)]
        return PrefillShares(size, packed, [sum(c.samples for c in mine) for mine in chunks])

    def _eager_shares(self, chunks: list[list]) -> EagerShares:
        """Each rank's layout of the step (its block ids its own pool's), padded to one token count."""
        per_rank = self.kv_cache.num_blocks
        lays = [self.layout(SchedulerOutput(chunks=mine), first_block=rank * per_rank)
                for rank, mine in enumerate(chunks)]
        tokens = max(len(lay.ids) for lay in lays)
        for lay in lays:
            lay.pad_to(tokens)
        return EagerShares(lays)

    def _gather_sampled(self, logits: torch.Tensor, rows: list[list[int]], on_layer_done=None) -> torch.Tensor:
        """Every rank's `logits` (one row count on all) gathered: the rows each rank samples, rank 0's
        first. The gather ends every data-parallel step, sampling or not: once it is over every rank has
        written all its KV, and only then are the layers announced (a layer with no collective, a dense
        one, would otherwise be announced before the other ranks wrote it)."""
        assert self.tp is not None
        everyone = self.tp.all_gather_rows(logits)
        if on_layer_done is not None:
            for layer in range(self.model.spec.num_layers):
                on_layer_done(layer)
        most = logits.shape[0]
        return everyone[[rank * most + i for rank, mine in enumerate(rows) for i in mine]]
