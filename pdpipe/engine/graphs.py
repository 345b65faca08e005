"""CUDA graphs of a model over its KV cache: decode steps captured per batch size (`DecodeGraphs`), and
steps of a few whole prompts captured per padded token count (`PrefillGraphs`). A replay is one launch
where the step would be bound by the host launching ~15 kernels a layer. Each class owns its static
input tensors and lays out a step into them (`inputs`), so the same inputs can be handed to the other
ranks of an instance, which replay the same graphs."""
from __future__ import annotations

import numpy as np
import torch

from pdpipe import kernels
from pdpipe.models.decoder import AttentionMetadata, CausalLM

from .kv_cache import KVCache
from .layout import block_slots, local_table
from .scheduler import SchedulerOutput
from .sizing import TOKEN_PAD


def capture(step, pool) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
    """`step()` captured as a CUDA graph (after two runs on a side stream, as capture needs), with the
    tensor it returns, which each replay overwrites."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            step()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=pool):
        out = step()
    return graph, out


def graph_batch_sizes(max_batch: int) -> list[int]:
    sizes = [b for b in (1, 2, 4, 8) if b < max_batch]
    sizes += list(range(16, max_batch, 16))
    return sorted(set(sizes + [max_batch]))


def fill(graphs, inputs: dict[str, list] | dict[str, np.ndarray], exclude: tuple[str, ...] = ()) -> None:
    """Copies each input (a list or an array) into the graph's static tensor of that name (its first
    entries)."""
    for name, values in inputs.items():
        if name not in exclude:
            target = getattr(graphs, name)
            target[: len(values)].copy_(torch.as_tensor(values, dtype=target.dtype), non_blocking=True)


class DecodeGraphs:
    """The decode step captured as one CUDA graph per batch size; a batch replays the smallest graph
    that holds it, padded with rows that write nowhere (slot -1) and attend to nothing (length 0)."""

    def __init__(self, model: CausalLM, kv_cache: KVCache, max_model_len: int, max_batch: int):
        self.max_batch = max_batch
        self.block_size = kv_cache.block_size
        dev, kv_layers = kv_cache.data.device, kv_cache.layers()
        max_blocks = -(-max_model_len // self.block_size)
        self.ids = torch.zeros(max_batch, dtype=torch.long, device=dev)
        self.pos = torch.zeros(max_batch, dtype=torch.long, device=dev)
        self.slots = torch.full((max_batch,), -1, dtype=torch.long, device=dev)
        self.tables = torch.zeros(max_batch, max_blocks, dtype=torch.int32, device=dev)
        self.lens = torch.zeros(max_batch, dtype=torch.int32, device=dev)
        self.qsl = torch.arange(max_batch + 1, dtype=torch.int32, device=dev)
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        pool = torch.cuda.graph_pool_handle()
        for bs in reversed(graph_batch_sizes(max_batch)):
            meta = AttentionMetadata(
                slot_mapping=self.slots[:bs], block_tables=self.tables[:bs], query_start_loc=[], seq_lens=[],
                query_start_loc_t=self.qsl[: bs + 1], seq_lens_t=self.lens[:bs], max_query_len=1, decode=True,
                num_splits=kernels.decode_splits(max_model_len, bs, model.spec.num_kv_heads))

            def step(bs=bs, meta=meta):
                return model.logits(model(self.ids[:bs], self.pos[:bs], kv_layers, meta))

            self.graphs[bs] = capture(step, pool)
        torch.cuda.synchronize()

    def size_for(self, n: int) -> int:
        return min(b for b in self.graphs if b >= n)

    def inputs(self, out: SchedulerOutput, first_block: int = 0, size: int = 0) -> tuple[int, dict[str, list]]:
        """The graph size that holds this batch (or `size`), and its inputs as lists (padding rows write
        nowhere). `first_block`: as in layout.local_table."""
        n = len(out.chunks)
        bs = size or self.size_for(n)
        block = self.block_size
        ids, pos, slots, lens, tables = [], [], [], [], []
        for chunk in out.chunks:
            seq, p = chunk.seq, chunk.start
            table = local_table(seq.block_table, first_block)
            ids.append(seq.token_ids[p])
            pos.append(p)
            slots.append(table[p // block] * block + p % block)
            lens.append(p + 1)
            tables.append(table)
        pad = bs - n
        return bs, {"ids": ids + [0] * pad, "pos": pos + [0] * pad, "slots": slots + [-1] * pad,
                    "lens": lens + [0] * pad, "tables": tables}

    def replay(self, bs: int, inputs: dict[str, list]) -> torch.Tensor:
        tables = torch.zeros(bs, self.tables.shape[1], dtype=torch.int32)
        for i, table in enumerate(inputs["tables"]):
            tables[i, : len(table)] = torch.tensor(table, dtype=torch.int32)
        fill(self, inputs, exclude=("tables",))
        self.tables[:bs].copy_(tables, non_blocking=True)
        graph, logits = self.graphs[bs]
        graph.replay()
        return logits


def prefill_graph_sizes(max_tokens: int, pad: int = TOKEN_PAD) -> list[int]:
    """Token counts a prefill graph is captured at: multiples of `pad` up to 256 tokens, of 2 × `pad` up
    to 512, of 4 × `pad` up to 2048, then steps of an eighth of a power of two (a step replays the
    smallest that holds it: padding costs at most a quarter of a step, an eighth beyond 1024 tokens),
    and `max_tokens` rounded up to a multiple of `pad`."""
    sizes, size = [], pad
    while size < max_tokens:
        sizes.append(size)
        size += pad if size < 256 else 2 * pad if size < 512 else max(4 * pad, 1 << (size.bit_length() - 4))
    return [*sizes, -(-max_tokens // pad) * pad]


def pack_prompts(chunks: list, block_size: int, size: int, max_seqs: int,
                 first_block: int = 0, context: bool = False) -> dict:
    """A step of prompt chunks laid out for a prefill graph of `size` tokens and `max_seqs` prompts:
    token ids, positions and KV slots, padded with rows in no prompt that write nowhere (slot -1); the
    chunks' bounds (`cu`, padded with empty chunks); the rows whose logits are sampled (`rows`, padded
    with row 0). With `context` (chunks that start after cached or earlier-computed tokens, which they
    attend to) also each chunk's length after it (`lens`) and block table (`tables`, as lists).
    `first_block`: as in layout.local_table."""
    ids = np.zeros(size, dtype=np.int64)
    pos = np.zeros(size, dtype=np.int64)
    slots = np.full(size, -1, dtype=np.int64)
    cu = np.zeros(max_seqs + 1, dtype=np.int32)
    rows = np.zeros(max_seqs, dtype=np.int64)
    lens = np.zeros(max_seqs, dtype=np.int32)
    tables = []
    assert len(chunks) <= max_seqs, (len(chunks), max_seqs)
    start, sampled = 0, 0
    for i, chunk in enumerate(chunks):
        n, first = chunk.num_tokens, chunk.start
        assert start + n <= size, (size, start + n)
        table = local_table(chunk.seq.block_table, first_block)
        ids[start: start + n] = chunk.seq.token_ids[first:first + n]
        pos[start: start + n] = np.arange(first, first + n)
        slots[start: start + n] = block_slots(table, first, first + n, block_size)
        start += n
        cu[i + 1:] = start  # the empty chunks after the last end where it ends
        lens[i] = first + n
        tables.append(table)
        if chunk.samples:
            rows[sampled] = start - 1
            sampled += 1
    packed: dict = {"ids": ids, "pos": pos, "slots": slots, "cu": cu, "rows": rows}
    return {**packed, "lens": lens, "tables": tables} if context else packed


class PrefillGraphs:
    """Steps of up to MAX_SEQS prompt chunks of up to `max_tokens` tokens in all, captured as one CUDA graph
    per padded token count. Such a step of short prompts is bound by the host launching ~15 kernels a
    layer (a 320-token prompt of the 8B shape took 13-25 ms eagerly on H200, varying with the host:
    benchmarks/RESULTS.md); a replay is one launch. Whole prompts (no context before them, what a prefill
    instance mostly computes) attend through one varlen flash-attention call whose bounds are read from
    the device, its grid sized for the graph's whole token count. With `context`, a second graph per count
    takes chunks that start after tokens already in the cache (a prefix-cache hit, an earlier chunk) and
    attend to them through the paged extend kernel, its grid the graph's whole token count a chunk."""

    MAX_SEQS = 16

    def __init__(self, model: CausalLM, kv_cache: KVCache, max_tokens: int, max_model_len: int = 0,
                 context: bool = False):
        self.block_size = kv_cache.block_size
        self.sizes = prefill_graph_sizes(max_tokens)
        dev, kv_layers, most, spec = kv_cache.data.device, kv_cache.layers(), self.sizes[-1], model.spec
        self.ids = torch.zeros(most, dtype=torch.long, device=dev)
        self.pos = torch.zeros(most, dtype=torch.long, device=dev)
        self.slots = torch.full((most,), -1, dtype=torch.long, device=dev)
        self.cu = torch.zeros(self.MAX_SEQS + 1, dtype=torch.int32, device=dev)
        self.rows = torch.zeros(self.MAX_SEQS, dtype=torch.long, device=dev)
        self.lens = torch.zeros(self.MAX_SEQS, dtype=torch.int32, device=dev)
        self.tables = torch.zeros(self.MAX_SEQS, max(1, -(-max_model_len // self.block_size)), dtype=torch.int32,
                                  device=dev)
        no_tables = torch.zeros(self.MAX_SEQS, 1, dtype=torch.int32, device=dev)  # prompt attention reads none
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.context_graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        pool = torch.cuda.graph_pool_handle()
        for size in reversed(self.sizes):
            variants = [(self.graphs, AttentionMetadata(
                slot_mapping=self.slots[:size], block_tables=no_tables, query_start_loc=[], seq_lens=[],
                query_start_loc_t=self.cu, max_query_len=size, fresh=True))]
            if context:
                variants.append((self.context_graphs, AttentionMetadata(
                    slot_mapping=self.slots[:size], block_tables=self.tables, query_start_loc=[], seq_lens=[],
                    query_start_loc_t=self.cu, seq_lens_t=self.lens, max_query_len=size,
                    num_splits=kernels.extend_splits(size, size, max_model_len, spec.num_heads,
                                                     spec.num_kv_heads))))
            for graphs, meta in variants:

                def step(size=size, meta=meta):
                    return model.logits(model(self.ids[:size], self.pos[:size], kv_layers, meta)[self.rows])

                graphs[size] = capture(step, pool)
        torch.cuda.synchronize()

    def holds(self, out: SchedulerOutput) -> bool:
        """Whether the step fits a graph: whole prompts; or, where those were captured, prompt chunks after
        context (beside decodes, but not decodes alone: those are the decode graphs')."""
        if len(out.chunks) > self.MAX_SEQS or out.num_tokens > self.sizes[-1]:
            return False
        if all(c.start == 0 for c in out.chunks):
            return True
        return bool(self.context_graphs) and any(c.start < c.seq.num_prompt_tokens for c in out.chunks)

    def size_for(self, tokens: int) -> int:
        return next(s for s in self.sizes if s >= tokens)

    def inputs(self, out: SchedulerOutput, first_block: int = 0, size: int = 0) -> tuple[int, dict]:
        """The graph size that holds this step (or `size`) and its inputs (with `lens` and `tables` where a
        chunk starts after context). `first_block`: as in layout.local_table."""
        size = size or self.size_for(out.num_tokens)
        context = any(c.start > 0 for c in out.chunks)
        return size, pack_prompts(out.chunks, self.block_size, size, self.MAX_SEQS, first_block, context)

    def replay(self, size: int, inputs: dict) -> torch.Tensor:
        if "tables" in inputs:
            tables = torch.zeros(self.MAX_SEQS, self.tables.shape[1], dtype=torch.int32)
            for i, table in enumerate(inputs["tables"]):
                tables[i, : len(table)] = torch.tensor(table, dtype=torch.int32)
            self.tables.copy_(tables, non_blocking=True)
            fill(self, inputs, exclude=("tables",))
            graph, logits = self.context_graphs[size]
        else:
            fill(self, inputs)
            graph, logits = self.graphs[size]
        graph.replay()
        return logits
