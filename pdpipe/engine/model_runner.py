"""Runs the model on what the scheduler picked: turns block tables into slot indices and positions,
runs the forward pass (on GPU a captured CUDA graph for decode batches, and for batches of a few short
whole prompts), and returns the logits of the positions that sample."""
from __future__ import annotations

import logging
import os

import numpy as np
import torch

from pdpipe.models.decoder import AttentionMetadata, CausalLM
from pdpipe.models.parallel import TensorParallel

from .data_parallel import graph_shares, prefill_graph_shares, replay_prefill_share, replay_share, run_share, shares
from .kv_cache import KVCache
from .scheduler import SchedulerOutput
from .sequence import Sequence


def decode_splits(max_seq_len: int, batch: int, kv_heads: int) -> int:
    from pdpipe.kernels import triton_ops

    return triton_ops.decode_splits(max_seq_len, batch, kv_heads) if triton_ops is not None else 1


# On GPU a step's token count is rounded up to a multiple of this with rows that write nowhere (slot -1)
# and belong to no sequence. cuBLAS pays ~3 ms the first time a GEMM runs at a row count it has not
# seen (H200, cuBLAS 13: one call in 3-6 at a random new count, 2-5 ms a new prompt length, and no
# sweep of other counts avoids it; benchmarks/RESULTS.md): with padding the counts are few enough for
# the warm-up to run them all.
TOKEN_PAD = 32
log = logging.getLogger("pdpipe")


def local_table(block_table: list[int], first_block: int) -> list[int]:
    """A block table in the ids of the pool whose block 0 is `first_block` (a data-parallel rank's)."""
    return [b - first_block for b in block_table] if first_block else block_table


def block_slots(table: list[int], start: int, end: int, block_size: int) -> np.ndarray:
    """The KV slots of positions start .. end - 1 of a sequence with this block table, with numpy (a
    per-token Python loop took ~0.7 ms of a 2048-token step, with the GPU idle)."""
    here = np.arange(start, end)
    return np.asarray(table[: -(-end // block_size)], dtype=np.int64)[here // block_size] * block_size \
        + here % block_size


class ModelRunner:
    """With `tp` (a rank of a tensor-parallel instance), rank 0 runs `execute` and hands each step's
    inputs to the other ranks, which run the same forward pass in `follow`."""

    def __init__(self, model: CausalLM, kv_cache: KVCache, max_model_len: int, pad_tokens: int = 1,
                 tp: TensorParallel | None = None):
        self.model = model
        self.tp = tp if tp is not None and tp.size > 1 else None
        self.kv_cache = kv_cache
        self.kv_layers = kv_cache.layers()
        self.device = next(model.parameters()).device
        self.max_model_len = max_model_len
        self.pad_tokens = pad_tokens
        self.graphs: DecodeGraphs | None = None
        self.prefill_graphs: PrefillGraphs | None = None

    def warm_gemms(self, max_tokens: int, max_rows: int) -> None:
        """Runs each distinct projection of the model (every layer's: a MoE model's dense and routed
        layers differ) at every padded token count up to `max_tokens` and at every row count up to
        `max_rows` (decode batches), and the LM head at every row count up to `max_rows`, so that no
        live step is cuBLAS's first at its shape (see TOKEN_PAD) nor times the skinny GEMM (a first
        prompt step of 3 sequences once did, for a tied head: 0.6-0.8 s of TTFT). Projections run as
        the model runs them: decoder Linears through kernels.linear, a MoE router's gate through
        torch's. A data-parallel step's MoE layers see every rank's rows: counts beyond these there
        pay cuBLAS's first call (milliseconds). Rank 0 of a tensor-parallel instance has the other
        ranks do the same."""
        from pdpipe import kernels
        from pdpipe.models.decoder import Linear

        if self.tp is not None and self.tp.rank == 0:
            self._hand_over(("warm_gemms", max_tokens, max_rows))

        linears = {(tuple(m.weight.shape), m.weight.dtype, m.bias is not None): m for m in self.model.model.modules()
                   if isinstance(m, torch.nn.Linear)}
        head = self.model.head_weight
        with torch.inference_mode():
            for mod in linears.values():
                pad = self.pad_tokens
                counts = {*range(1, max_rows + 1), *range(pad, max_tokens + pad, pad)}
                x = torch.zeros(max(counts), mod.weight.shape[1], dtype=mod.weight.dtype, device=self.device)
                run = kernels.linear if isinstance(mod, Linear) else torch.nn.functional.linear
                for m in sorted(counts):
                    run(x[:m], mod.weight, mod.bias)
            x = torch.zeros(max_rows, head.shape[1], dtype=head.dtype, device=self.device)
            for m in range(1, max_rows + 1):
                kernels.linear(x[:m], head)

    def capture_graphs(self, max_batch: int) -> None:
        from pdpipe import kernels

        kernels.enable_skinny()  # each projection's kernel is chosen by timing during the warm-up runs
        self.graphs = DecodeGraphs(self, max_batch)

    def capture_prefill_graphs(self, max_tokens: int) -> None:
        """Steps of whole prompts up to `max_tokens` tokens replay CUDA graphs, where the model allows
        (prompt attention through varlen flash attention, no sliding window)."""
        from pdpipe.models.decoder import prompt_attention_capturable

        if prompt_attention_capturable(self.model):
            self.prefill_graphs = PrefillGraphs(self, max_tokens)

    def layout(self, out: SchedulerOutput, first_block: int = 0) -> dict:
        """The step as plain lists (what rank 0 hands the other ranks of a tensor-parallel instance):
        token ids, positions, KV slots, prompt bounds, context lengths, block tables, sampled rows.
        `first_block`: the id of this pool's block 0 in the block manager's (data-parallel ranks)."""
        bs = self.kv_cache.block_size
        ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        rows: list[int] = []
        qsl, seq_lens, tables = [0], [], []
        for chunk in out.chunks:
            seq, start, end = chunk.seq, chunk.start, chunk.start + chunk.num_tokens
            ids.extend(seq.token_ids[start:end])
            positions.extend(range(start, end))
            table = local_table(seq.block_table, first_block)
            tables.append(table)
            if chunk.num_tokens > 32:  # a prompt's chunk
                slots.extend(block_slots(table, start, end, bs).tolist())
            else:
                slots.extend(table[p // bs] * bs + p % bs for p in range(start, end))
            qsl.append(qsl[-1] + chunk.num_tokens)
            seq_lens.append(end)
            if chunk.samples:
                rows.append(qsl[-1] - 1)
        # decode batches keep one row per sequence (their kernels index rows by sequence)
        pad = 0 if all(c.num_tokens == 1 for c in out.chunks) else -len(ids) % self.pad_tokens
        return {"ids": ids + [0] * pad, "pos": positions + [0] * pad, "slots": slots + [-1] * pad,
                "qsl": qsl, "seq_lens": seq_lens, "tables": tables, "rows": rows,
                "fresh": all(c.start == 0 for c in out.chunks)}

    def place(self, lay: dict) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata, list[int]]:
        """A layout's tensors on this rank's device, and the attention metadata."""
        tables = torch.zeros(len(lay["tables"]), max((len(t) for t in lay["tables"]), default=1), dtype=torch.int32)
        for i, table in enumerate(lay["tables"]):
            tables[i, : len(table)] = torch.tensor(table, dtype=torch.int32)
        dev, qsl, seq_lens = self.device, lay["qsl"], lay["seq_lens"]
        meta = AttentionMetadata(slot_mapping=torch.tensor(lay["slots"], dtype=torch.long, device=dev),
                                 block_tables=tables.to(dev), query_start_loc=qsl, seq_lens=seq_lens)
        if dev.type == "cuda":
            meta.query_start_loc_t = torch.tensor(qsl, dtype=torch.int32, device=dev)
            meta.seq_lens_t = torch.tensor(seq_lens, dtype=torch.int32, device=dev)
            meta.max_query_len = max((b - a for a, b in zip(qsl, qsl[1:])), default=0)
            meta.decode = meta.max_query_len == 1 and len(lay["ids"]) == len(seq_lens)  # no padding rows (a
            # data-parallel share padded to the others' count runs the extend kernel)
            meta.fresh = lay["fresh"]
            meta.num_splits = decode_splits(max(seq_lens, default=1), len(seq_lens), self.model.spec.num_kv_heads)
        ids = torch.tensor(lay["ids"], dtype=torch.long, device=dev)
        pos = torch.tensor(lay["pos"], dtype=torch.long, device=dev)
        return ids, pos, meta, lay["rows"]

    def execute(self, out: SchedulerOutput, on_layer_done=None) -> tuple[torch.Tensor, list[Sequence]]:
        """Returns logits `[num_sampling_seqs, vocab]` float32 (on the model's device) and their sequences.
        With other ranks, each hears first what to run: ("decode" | "prefill", graph size, inputs) to
        replay the same graph, or ("eager", layout)."""
        if self.tp is not None and self.tp.data_parallel_attention:  # each rank its own sequences
            return self._execute_shares(out, on_layer_done)
        seqs = [c.seq for c in out.chunks if c.samples]
        all_decode = all(c.num_tokens == 1 for c in out.chunks)
        graphs, prefills = self.graphs, self.prefill_graphs
        if graphs is not None and on_layer_done is None and all_decode and len(out.chunks) <= graphs.max_batch:
            size, inputs = graphs.inputs(out)
            self._hand_over(("decode", size, inputs))
            logits = graphs.replay(size, inputs)[: len(out.chunks)]
            if len(seqs) < len(out.chunks):  # a one-token chunk of a prompt that does not sample yet
                logits = logits[[i for i, c in enumerate(out.chunks) if c.samples]]
            return logits, seqs
        if prefills is not None and prefills.holds(out):
            size, packed = prefills.inputs(out)
            self._hand_over(("prefill", size, packed))
            logits = prefills.replay(size, packed)[: len(seqs)]
            if on_layer_done is not None:  # every layer's KV is written once the graph has run
                for layer in range(self.model.spec.num_layers):
                    on_layer_done(layer)
            return logits, seqs
        lay = self.layout(out)
        self._hand_over(("eager", lay))
        return self._forward(*self.place(lay), on_layer_done), seqs

    def _execute_shares(self, out: SchedulerOutput, on_layer_done) -> tuple[torch.Tensor, list[Sequence]]:
        """A data-parallel step (data_parallel.py): decode steps replay every rank's graph, others run
        eagerly; rank 0 gets every rank's sampled logits."""
        graphed = graph_shares(self, out) if on_layer_done is None else None
        if graphed is not None:
            size, rank_inputs, rows, seqs = graphed
            self._hand_over(("data_graph", size, rank_inputs, rows))
            return replay_share(self, size, rank_inputs, rows), seqs
        prompts = prefill_graph_shares(self, out)
        if prompts is not None:
            size, packed, counts, seqs = prompts
            self._hand_over(("data_prefill", size, packed, counts))
            return replay_prefill_share(self, size, packed, counts, on_layer_done), seqs
        lays, seqs = shares(self, out)
        self._hand_over(("data", lays))
        return run_share(self, lays, on_layer_done), seqs

    def _hand_over(self, step: tuple) -> None:
        if self.tp is not None:
            self.tp.broadcast(step)

    def _forward(self, ids, pos, meta, sample_rows: list[int], on_layer_done=None) -> torch.Tensor:
        hidden = self.model(ids, pos, self.kv_layers, meta, on_layer_done)
        if not sample_rows:
            return torch.empty(0)
        return self.model.logits(hidden[torch.tensor(sample_rows, device=self.device)])

    def follow(self) -> None:
        """A rank other than 0: runs every step rank 0 hands over, until it hands over None."""
        assert self.tp is not None and self.tp.rank > 0
        while (step := self.tp.broadcast(None)) is not None:
            kind, *args = step
            try:
                if kind == "decode":
                    self.graphs.replay(*args)  # type: ignore[union-attr]  # rank 0 captured the same
                elif kind == "prefill":
                    self.prefill_graphs.replay(*args)  # type: ignore[union-attr]
                elif kind == "warm_gemms":
                    self.warm_gemms(*args)
                elif kind == "data":
                    run_share(self, *args)
                elif kind == "data_graph":
                    replay_share(self, *args)
                elif kind == "data_prefill":
                    replay_prefill_share(self, *args)
                else:
                    self._forward(*self.place(*args))
            except Exception as exc:  # noqa: BLE001 — rank 0 met the same failure: it re-runs or fails the request
                from .engine import device_fault

                log.exception("rank %d: a step failed", self.tp.rank)
                if device_fault(exc) or isinstance(exc, torch.cuda.OutOfMemoryError) \
                        or self.tp.data_parallel_attention:
                    # this rank's own failure (with data-parallel attention any failure is: the ranks run
                    # other sequences): rank 0 would wait in a collective for good; ending lets the
                    # launcher restart the group
                    os._exit(1)

    def stop_followers(self) -> None:
        if self.tp is not None and self.tp.rank == 0:
            try:
                self.tp.broadcast(None)
            except Exception as exc:  # noqa: BLE001 — a rank already gone: nothing to stop
                log.info("stopping the other ranks: %s", exc)


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


class DecodeGraphs:
    """The decode step captured as one CUDA graph per batch size; a batch replays the smallest graph
    that holds it, padded with rows that write nowhere (slot -1) and attend to nothing (length 0)."""

    def __init__(self, runner: ModelRunner, max_batch: int):
        self.runner = runner
        self.max_batch = max_batch
        model, dev = runner.model, runner.device
        max_blocks = -(-runner.max_model_len // runner.kv_cache.block_size)
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
                num_splits=decode_splits(runner.max_model_len, bs, model.spec.num_kv_heads))

            def step(bs=bs, meta=meta):
                return model.logits(model(self.ids[:bs], self.pos[:bs], runner.kv_layers, meta))

            self.graphs[bs] = capture(step, pool)
        torch.cuda.synchronize()

    def size_for(self, n: int) -> int:
        return min(b for b in self.graphs if b >= n)

    def inputs(self, out: SchedulerOutput, first_block: int = 0, size: int = 0) -> tuple[int, dict[str, list]]:
        """The graph size that holds this batch (or `size`), and its inputs as lists (padding rows write
        nowhere). `first_block`: as in ModelRunner.layout."""
        n = len(out.chunks)
        bs = size or self.size_for(n)
        block = self.runner.kv_cache.block_size
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


def fill(graphs, inputs: dict[str, list] | dict[str, np.ndarray], exclude: tuple[str, ...] = ()) -> None:
    """Copies each input (a list or an array) into the graph's static tensor of that name (its first
    entries)."""
    for name, values in inputs.items():
        if name not in exclude:
            target = getattr(graphs, name)
            target[: len(values)].copy_(torch.as_tensor(values, dtype=target.dtype), non_blocking=True)


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
                 first_block: int = 0) -> dict[str, np.ndarray]:
    """A step of whole prompts laid out for a prefill graph of `size` tokens and `max_seqs` prompts:
    token ids, positions and KV slots, padded with rows in no prompt that write nowhere (slot -1); the
    prompts' bounds (`cu`, padded with empty prompts); the rows whose logits are sampled (`rows`,
    padded with row 0). `first_block`: as in ModelRunner.layout."""
    ids = np.zeros(size, dtype=np.int64)
    pos = np.zeros(size, dtype=np.int64)
    slots = np.full(size, -1, dtype=np.int64)
    cu = np.zeros(max_seqs + 1, dtype=np.int32)
    rows = np.zeros(max_seqs, dtype=np.int64)
    assert len(chunks) <= max_seqs, (len(chunks), max_seqs)
    start, sampled = 0, 0
    for i, chunk in enumerate(chunks):
        n = chunk.num_tokens
        assert start + n <= size, (size, start + n)
        ids[start: start + n] = chunk.seq.token_ids[:n]
        pos[start: start + n] = np.arange(n)
        slots[start: start + n] = block_slots(local_table(chunk.seq.block_table, first_block), 0, n, block_size)
        start += n
        cu[i + 1:] = start  # the empty prompts after the last end where it ends
        if chunk.samples:
            rows[sampled] = start - 1
            sampled += 1
    return {"ids": ids, "pos": pos, "slots": slots, "cu": cu, "rows": rows}


class PrefillGraphs:
    """Steps of whole prompts (no context before them, what a prefill instance mostly computes) of up
    to `max_tokens` tokens in at most MAX_SEQS prompts, captured as one CUDA graph per padded token
    count. Such a step of short prompts is bound by the host launching ~15 kernels a layer (a 320-token
    prompt of the 8B shape took 13-25 ms eagerly on H200, varying with the host: benchmarks/RESULTS.md);
    a replay is one launch. The prompts attend through one varlen flash-attention call whose bounds
    are read from the device, its grid sized for the graph's whole token count."""

    MAX_SEQS = 16

    def __init__(self, runner: ModelRunner, max_tokens: int):
        self.runner = runner
        self.sizes = prefill_graph_sizes(max_tokens)
        model, dev, most = runner.model, runner.device, self.sizes[-1]
        self.ids = torch.zeros(most, dtype=torch.long, device=dev)
        self.pos = torch.zeros(most, dtype=torch.long, device=dev)
        self.slots = torch.full((most,), -1, dtype=torch.long, device=dev)
        self.cu = torch.zeros(self.MAX_SEQS + 1, dtype=torch.int32, device=dev)
        self.rows = torch.zeros(self.MAX_SEQS, dtype=torch.long, device=dev)
        no_tables = torch.zeros(self.MAX_SEQS, 1, dtype=torch.int32, device=dev)  # prompt attention reads none
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        pool = torch.cuda.graph_pool_handle()
        for size in reversed(self.sizes):
            meta = AttentionMetadata(slot_mapping=self.slots[:size], block_tables=no_tables, query_start_loc=[],
                                     seq_lens=[], query_start_loc_t=self.cu, max_query_len=size, fresh=True)

            def step(size=size, meta=meta):
                return model.logits(model(self.ids[:size], self.pos[:size], runner.kv_layers, meta)[self.rows])

            self.graphs[size] = capture(step, pool)
        torch.cuda.synchronize()

    def holds(self, out: SchedulerOutput) -> bool:
        return (len(out.chunks) <= self.MAX_SEQS and out.num_tokens <= self.sizes[-1]
                and all(c.start == 0 for c in out.chunks))

    def size_for(self, tokens: int) -> int:
        return next(s for s in self.sizes if s >= tokens)

    def inputs(self, out: SchedulerOutput, first_block: int = 0, size: int = 0) -> tuple[int, dict[str, np.ndarray]]:
        """The graph size that holds this step (or `size`) and its inputs. `first_block`: as in
        ModelRunner.layout."""
        size = size or self.size_for(out.num_tokens)
        return size, pack_prompts(out.chunks, self.runner.kv_cache.block_size, size, self.MAX_SEQS, first_block)

    def replay(self, size: int, inputs: dict[str, np.ndarray]) -> torch.Tensor:
        fill(self, inputs)
        graph, logits = self.graphs[size]
        graph.replay()
        return logits
