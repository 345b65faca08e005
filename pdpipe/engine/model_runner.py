"""Runs the model on what the scheduler picked: turns block tables into slot indices and positions,
runs the forward pass (on GPU a captured CUDA graph for decode batches, and for batches of a few short
whole prompts), and returns the logits of the positions that sample.

`execute` (rank 0) plans the step as one of `layout`'s typed steps, hands it to the instance's other
ranks, and runs it; the other ranks `follow`, running every step they are handed with the same `run`.
Data-parallel attention (each rank its own sequences) is `data_parallel.DataParallelRunner`."""
from __future__ import annotations

import logging
import os

import torch

from pdpipe import kernels
from pdpipe.models.decoder import AttentionMetadata, CausalLM, prompt_attention_capturable
from pdpipe.models.layers import Linear, QuantLinear
from pdpipe.models.parallel import TensorParallel

from .graphs import DecodeGraphs, PrefillGraphs
from .host_tier import HostTier
from .kv_cache import KVCache
from .layout import DecodeReplay, Eager, Layout, PrefillReplay, Step, TierCopies, WarmGemms, block_slots, local_table
from .scheduler import SchedulerOutput
from .sequence import Sequence
from .sizing import device_fault

log = logging.getLogger("pdpipe")


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
        self.host_tier: HostTier | None = None  # engine.cache.host_kv_cache_mb

    # ---- start-up ----------------------------------------------------------------------------
    def warm_gemms(self, max_tokens: int, max_rows: int) -> None:
        """Runs each distinct projection of the model (every layer's: a MoE model's dense and routed
        layers differ) at every padded token count up to `max_tokens` and at every row count up to
        `max_rows` (decode batches), and the LM head at every row count up to `max_rows`, so that no
        live step is cuBLAS's first at its shape (see sizing.TOKEN_PAD) nor times the skinny GEMM (a
        first prompt step of 3 sequences once did, for a tied head: 0.6-0.8 s of TTFT). Projections run
        as the model runs them: decoder Linears through kernels.linear, a MoE router's gate through
        torch's. A data-parallel step's MoE layers see every rank's rows: counts beyond these there
        pay cuBLAS's first call (milliseconds). Rank 0 of a tensor-parallel instance has the other
        ranks do the same."""
        step = WarmGemms(max_tokens, max_rows)
        self._hand_over(step)
        self.run(step)

    def _warm_gemms(self, step: WarmGemms) -> None:
        head = self.model.head_weight
        linears: dict[tuple, torch.nn.Linear | QuantLinear] = {}
        for mod in self.model.model.modules():
            if isinstance(mod, torch.nn.Linear):
                linears[(tuple(mod.weight.shape), mod.weight.dtype, mod.bias is not None)] = mod
            elif isinstance(mod, QuantLinear):
                linears[(mod.shape, head.dtype, mod.bias is not None)] = mod
        with torch.inference_mode():
            for mod in linears.values():
                pad = self.pad_tokens
                counts = {*range(1, step.max_rows + 1), *range(pad, step.max_tokens + pad, pad)}
                if isinstance(mod, QuantLinear):  # its own path: the weight-read kernel tunes itself here,
                    x = torch.zeros(max(counts), mod.in_features, dtype=head.dtype, device=self.device)
                    for m in sorted(counts):  # before any graph is captured
                        mod(x[:m])
                    continue
                x = torch.zeros(max(counts), mod.in_features, dtype=mod.weight.dtype, device=self.device)
                run = kernels.linear if isinstance(mod, Linear) else torch.nn.functional.linear
                for m in sorted(counts):
                    run(x[:m], mod.weight, mod.bias)
            x = torch.zeros(step.max_rows, head.shape[1], dtype=head.dtype, device=self.device)
            for m in range(1, step.max_rows + 1):
                kernels.linear(x[:m], head)

    def capture_graphs(self, max_batch: int) -> None:
        kernels.enable_skinny()  # each projection's kernel is chosen by timing during the warm-up runs
        self.graphs = DecodeGraphs(self.model, self.kv_cache, self.max_model_len, max_batch)

    def capture_prefill_graphs(self, max_tokens: int, context: bool = False) -> None:
        """Steps of whole prompts up to `max_tokens` tokens replay CUDA graphs, where the model allows
        (prompt attention through varlen flash attention, no sliding window); with `context`, steps of
        chunks that start after cached tokens too (prefix caching)."""
        if prompt_attention_capturable(self.model):
            self.prefill_graphs = PrefillGraphs(self.model, self.kv_cache, max_tokens, self.max_model_len, context)

    # ---- a step ------------------------------------------------------------------------------
    def execute(self, out: SchedulerOutput, on_layer_done=None) -> tuple[torch.Tensor, list[Sequence]]:
        """Returns logits `[num_sampling_seqs, vocab]` float32 (on the model's device) and their sequences.
        `on_layer_done(layer)` is called once each layer's KV is written (layer-wise transfer)."""
        step, seqs = self.plan(out, on_layer_done)
        self._hand_over(step)
        return self.run(step, on_layer_done), seqs

    def plan(self, out: SchedulerOutput, on_layer_done=None) -> tuple[Step, list[Sequence]]:
        """The step to run, and the sampling sequences in the order of its logits: a decode graph's
        replay (a batch of one token a sequence, unless layers are announced as they are written), a
        prefill graph's (whole prompts that fit), else an eager step."""
        seqs = [c.seq for c in out.chunks if c.samples]
        graphs, prefills = self.graphs, self.prefill_graphs
        if graphs is not None and on_layer_done is None and all(c.num_tokens == 1 for c in out.chunks) \
                and len(out.chunks) <= graphs.max_batch:
            size, inputs = graphs.inputs(out)
            # a one-token chunk of a prompt that does not sample yet leaves its row out
            sampled = [i for i, c in enumerate(out.chunks) if c.samples] if len(seqs) < len(out.chunks) else None
            return DecodeReplay(size, inputs, len(out.chunks), sampled), seqs
        if prefills is not None and prefills.holds(out):
            size, packed = prefills.inputs(out)
            return PrefillReplay(size, packed, len(seqs)), seqs
        return Eager(self.layout(out)), seqs

    def run(self, step: Step, on_layer_done=None) -> torch.Tensor:
        """Runs a planned step (on rank 0, and on every rank it was handed to) and returns the logits of
        its sampled rows."""
        if isinstance(step, DecodeReplay):
            assert self.graphs is not None  # every rank captured the same graphs
            logits = self.graphs.replay(step.size, step.inputs)[: step.rows]
            return logits if step.sampled is None else logits[step.sampled]
        if isinstance(step, PrefillReplay):
            assert self.prefill_graphs is not None
            logits = self.prefill_graphs.replay(step.size, step.inputs)[: step.samples]
            if on_layer_done is not None:  # every layer's KV is written once the graph has run
                for layer in range(self.model.spec.num_layers):
                    on_layer_done(layer)
            return logits
        if isinstance(step, Eager):
            return self.forward(step.layout, on_layer_done)
        if isinstance(step, WarmGemms):
            self._warm_gemms(step)
            return torch.empty(0)
        if isinstance(step, TierCopies):
            assert self.host_tier is not None  # every rank has its share of the tier
            if step.sync:
                self.host_tier.sync()
            self.host_tier.run(step.copies, behind=step.behind)
            if step.settle:
                if self.kv_cache.data.is_cuda:
                    torch.cuda.current_stream().synchronize()
                    self.host_tier.settle()  # the copies written ahead too
                if self.tp is not None:
                    torch.distributed.barrier(group=self.tp.control if self.tp.control is not None else self.tp.group)
            return torch.empty(0)
        raise TypeError(f"{type(self).__name__} cannot run a {type(step).__name__} step")

    def copy_tier(self, copies: list[tuple[str, int, int]], settle: bool = False, sync: bool = False,
                  behind: bool = False) -> None:
        """Runs the host tier's copies on every rank (each its own heads), queued before what follows; with
        `settle`, returns once every rank's are done; `sync` first orders the copies written ahead before
        what follows; `behind`: these are copies written ahead, on the tier's side stream."""
        step = TierCopies(copies, settle, sync, behind)
        self._hand_over(step)
        self.run(step)

    def layout(self, out: SchedulerOutput, first_block: int = 0) -> Layout:
        """The step as plain lists (see Layout). `first_block`: the id of this pool's block 0 in the
        block manager's (data-parallel ranks)."""
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
        lay = Layout(ids, positions, slots, qsl, seq_lens, tables, rows, fresh=all(c.start == 0 for c in out.chunks))
        # decode batches keep one row per sequence (their kernels index rows by sequence)
        if not all(c.num_tokens == 1 for c in out.chunks):
            lay.pad_to(len(ids) + -len(ids) % self.pad_tokens)
        return lay

    def place(self, lay: Layout) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata]:
        """A layout's tensors on this rank's device, and the attention metadata."""
        tables = torch.zeros(len(lay.tables), max((len(t) for t in lay.tables), default=1), dtype=torch.int32)
        for i, table in enumerate(lay.tables):
            tables[i, : len(table)] = torch.tensor(table, dtype=torch.int32)
        dev, qsl, seq_lens = self.device, lay.qsl, lay.seq_lens
        meta = AttentionMetadata(slot_mapping=torch.tensor(lay.slots, dtype=torch.long, device=dev),
                                 block_tables=tables.to(dev), query_start_loc=qsl, seq_lens=seq_lens)
        if dev.type == "cuda":
            meta.query_start_loc_t = torch.tensor(qsl, dtype=torch.int32, device=dev)
            meta.seq_lens_t = torch.tensor(seq_lens, dtype=torch.int32, device=dev)
            meta.max_query_len = max((b - a for a, b in zip(qsl, qsl[1:])), default=0)
            meta.decode = meta.max_query_len == 1 and len(lay.ids) == len(seq_lens)  # no padding rows (a
            # data-parallel share padded to the others' count runs the extend kernel)
            meta.fresh = lay.fresh
            spec, longest = self.model.spec, max(seq_lens, default=1)
            meta.num_splits = kernels.decode_splits(longest, len(seq_lens), spec.num_kv_heads) if meta.decode \
                else kernels.extend_splits(len(lay.ids), meta.max_query_len, longest, spec.num_heads,
                                           spec.num_kv_heads)
        ids = torch.tensor(lay.ids, dtype=torch.long, device=dev)
        pos = torch.tensor(lay.pos, dtype=torch.long, device=dev)
        return ids, pos, meta

    def forward(self, lay: Layout, on_layer_done=None) -> torch.Tensor:
        """An eager step: the logits of its sampled rows (an empty tensor when none samples)."""
        ids, pos, meta = self.place(lay)
        hidden = self.model(ids, pos, self.kv_layers, meta, on_layer_done)
        if not lay.rows:
            return torch.empty(0)
        return self.model.logits(hidden[torch.tensor(lay.rows, device=self.device)])

    # ---- the other ranks ---------------------------------------------------------------------
    def _hand_over(self, step: Step | None) -> None:
        if self.tp is not None and self.tp.rank == 0:
            self.tp.broadcast(step)

    def follow(self) -> None:
        """A rank other than 0: runs every step rank 0 hands over, until it hands over None."""
        assert self.tp is not None and self.tp.rank > 0
        while (step := self.tp.broadcast(None)) is not None:
            try:
                self.run(step)
            except Exception as exc:  # noqa: BLE001 — rank 0 met the same failure: it re-runs or fails the request
                log.exception("rank %d: a step failed", self.tp.rank)
                if self.fatal(exc):
                    # rank 0 would wait in a collective for good; ending lets the launcher restart the group
                    os._exit(1)

    def fatal(self, exc: Exception) -> bool:
        """Whether a failure on a rank > 0 is its own (rank 0 did not meet it): a device fault, or memory."""
        return device_fault(exc) or isinstance(exc, torch.cuda.OutOfMemoryError)

    def stop_followers(self) -> None:
        if self.tp is not None and self.tp.rank == 0:
            try:
                self.tp.broadcast(None)
            except Exception as exc:  # noqa: BLE001 — a rank already gone: nothing to stop
                log.info("stopping the other ranks: %s", exc)
