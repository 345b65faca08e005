"""Runs the model on what the scheduler picked: turns block tables into slot indices and positions,
runs the forward pass, and returns the logits of the positions that sample."""
from __future__ import annotations

import torch

from pdpipe.models.decoder import AttentionMetadata, CausalLM

from .kv_cache import KVCache
from .scheduler import SchedulerOutput
from .sequence import Sequence


class ModelRunner:
    def __init__(self, model: CausalLM, kv_cache: KVCache):
        self.model = model
        self.kv_cache = kv_cache
        self.kv_layers = kv_cache.layers()
        self.device = next(model.parameters()).device

    def prepare(self, out: SchedulerOutput) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata,
                                                     list[int]]:
        bs = self.kv_cache.block_size
        input_ids, positions, slots, sample_rows = [], [], [], []
        query_start_loc, seq_lens = [0], []
        for chunk in out.chunks:
            seq, start, end = chunk.seq, chunk.start, chunk.start + chunk.num_tokens
            input_ids.extend(seq.token_ids[start:end])
            positions.extend(range(start, end))
            table = seq.block_table
            slots.extend(table[p // bs] * bs + p % bs for p in range(start, end))
            query_start_loc.append(query_start_loc[-1] + chunk.num_tokens)
            seq_lens.append(end)
            if chunk.samples:
                sample_rows.append(query_start_loc[-1] - 1)
        width = max(len(c.seq.block_table) for c in out.chunks)
        tables = torch.zeros(len(out.chunks), width, dtype=torch.int32)
        for i, chunk in enumerate(out.chunks):
            tables[i, : len(chunk.seq.block_table)] = torch.tensor(chunk.seq.block_table, dtype=torch.int32)
        meta = AttentionMetadata(
            slot_mapping=torch.tensor(slots, dtype=torch.long, device=self.device),
            block_tables=tables.to(self.device),
            query_start_loc=query_start_loc,
            seq_lens=seq_lens,
        )
        ids = torch.tensor(input_ids, dtype=torch.long, device=self.device)
        pos = torch.tensor(positions, dtype=torch.long, device=self.device)
        return ids, pos, meta, sample_rows

    def execute(self, out: SchedulerOutput, on_layer_done=None) -> tuple[torch.Tensor, list[Sequence]]:
        """Returns logits `[num_sampling_seqs, vocab]` float32 on CPU and the sequences they belong to."""
        ids, pos, meta, sample_rows = self.prepare(out)
        hidden = self.model(ids, pos, self.kv_layers, meta, on_layer_done)
        seqs = [c.seq for c in out.chunks if c.samples]
        if not sample_rows:
            return torch.empty(0), seqs
        logits = self.model.logits(hidden[torch.tensor(sample_rows, device=self.device)])
        return logits.cpu(), seqs
