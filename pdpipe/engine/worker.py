"""One engine instance of the pipeline — prefill, decode or mixed — behind in-memory queues.

prefill: takes `Prefill`, computes the prompt with its KV held (`hold_kv`), tells the transfer which
  blocks will move and signals each finished layer, sends the first token to `api` at once and to
  the transfer (`PrefillDone`); frees the blocks on `TransferDone`. States: PREFILLING → TRANSFERRING.
  A prompt whose prefix the decode instance (or another prefill instance: `Prefill.pull_from`) caches
  (`Prefill.pull_blocks`) first has those blocks copied in by the transfer (`PullStart`, `Pulled`) and
  computes the rest. The other way, it lends its cached blocks to another's pull (`LendBlocks`: held
  until the transfer's `ReturnBlocks`).
decode: answers `Reserve` with blocks for the prompt and room for its output (the prompt's block ids go
  to the transfer, `DecodeBlocks`), continues a request on `KVLanded` from its first token, and
  streams tokens to `api`; a `Prefill` the scheduler sends it directly is a prompt it
  computes itself (conditional disaggregation). States: (PREFILLING →) DECODING → FINISHED; `Freed`
  tells the scheduler an ended request's room is free again.
mixed: both in one engine (colocated), the baseline. States: PREFILLING → DECODING → FINISHED.
`Free` drops a request wherever it is here. No sockets: `send(dest, msg)` is given.
"""
from __future__ import annotations

import logging
import time
from collections.abc import Callable

from msgspec.structs import replace

from pdpipe import gpus, kernels
from pdpipe.gpus import GpuFigures
from pdpipe.kv_events import KVEventBatch, encode_batch
from pdpipe.messages import (
    DecodeBlocks,
    DropAll,
    EngineOutput,
    Free,
    Freed,
    Handler,
    InstanceStats,
    KVEvents,
    KVLanded,
    LayersReady,
    LendBlocks,
    LentBlocks,
    Msg,
    Pause,
    Prefill,
    PrefillDone,
    Pulled,
    PullStart,
    Reserve,
    Reserved,
    ResetPrefixCache,
    ReturnBlocks,
    State,
    StateEvent,
    TransferDone,
    TransferStart,
)
from pdpipe.tombstones import Tombstones

from .engine import LLMEngine
from .scheduler import SchedulerOutput, finish_for
from .sizing import device_fault

log = logging.getLogger("pdpipe")
Send = Callable[[str, Msg | EngineOutput], None]
API, SCHEDULER, TRANSFER = "api", "scheduler", "transfer"
# A prefill step announces its finished layers in messages of at least this many prompt tokens ×
# layers. Each message costs the prefill's host ~70 µs (a CUDA event, and the sender thread taking the
# GIL from the thread launching kernels), which a short prompt's launch-bound prefill pays in full:
# 128 tokens went from 8.9 to 11.2 ms with a message per layer (2× H200, Llama-3.1-8B shape). From
# 2048-token prompts up every layer has its own message; a short prompt's last group copies after the
# prefill, 2048 token-layers (8 MB of 8B-shape KV, ~25 µs over NVLink).
LAYER_MESSAGE_TOKENS = 2048
SLOW_STEP_S = 0.25  # a step this long is logged: on a GPU even 8k prompt tokens take ~0.2 s


class EngineWorker(Handler):
    def __init__(self, name: str, role: str, engine: LLMEngine, send: Send, clock=time.time,
                 transfer: str = TRANSFER, layer_message_tokens: int = LAYER_MESSAGE_TOKENS):
        if role not in ("prefill", "decode", "mixed"):
            raise ValueError(f"role: {role!r}; allowed: prefill, decode, mixed")
        self.name, self.role, self.engine, self.send, self.clock = name, role, engine, send, clock
        self.transfer = transfer  # this machine's transfer process
        self.layer_message_tokens = layer_message_tokens
        self.paused = False
        self._deferred: list[KVLanded] = []  # landed while paused
        self._pending: dict[str, Reserve] = {}  # decode: reserved, KV not landed yet
        self._prefills: dict[str, Prefill] = {}  # prefill: running, with their original params
        self._tombstones = Tombstones()  # freed ids whose late messages to drop
        self._started: set[str] = set()
        self._final_chunks: list[str] = []  # prefill: requests whose prompt completes in this step
        self._final_tokens = 0  # their prompt tokens
        self._unannounced = 0  # layers of this step written but not yet announced
        self.queued_prompt_tokens = 0
        self.meter = StepMeter()
        self._gpu: tuple[float, GpuFigures | None] = (0.0, None)  # (when read, what NVML said)
        self._step_prompt_tokens = 0
        self._variants = kernels.compiled_variants()  # after the warm-up: what a slow step compiled shows
        # prefill on GPU: a layer is announced only once its KV is written: its message goes with a CUDA
        # event recorded after the layer, and `send` (a SenderThread's) lets it leave once the event has
        # completed. The transfer's copy of layer k then runs while the GPU computes layers k+1…, and
        # this thread never waits for the GPU.
        self._fence_layers = role == "prefill" and engine.kv_cache.data.is_cuda
        engine.blocks.record_events = engine.blocks.caching  # for the scheduler's cache index
        engine.reset_prefix_cache()  # says AllBlocksCleared first: a restarted engine starts empty

    # ---- inbox -----------------------------------------------------------------------------
    def handle(self, msg: Msg | EngineOutput) -> None:
        log.debug("%s: %s %s", self.name, type(msg).__name__, getattr(msg, "request_id", ""))
        super().handle(msg)

    def _on_ResetPrefixCache(self, msg: ResetPrefixCache) -> None:
        log.info("%s: prefix cache reset (%d blocks)", self.name, self.engine.reset_prefix_cache())

    def _on_Pause(self, msg: Pause) -> None:
        self.paused = msg.paused
        if not self.paused:
            for landed in self._deferred:
                self._on_KVLanded(landed)
            self._deferred.clear()

    def _hands_over(self, msg: Prefill) -> bool:
        """A prompt computed here for a decode instance (the rest run whole here: prompt and output)."""
        return self.role == "prefill" and bool(msg.decode_instance)

    def _on_Prefill(self, msg: Prefill) -> None:
        if msg.request_id in self._tombstones:
            return
        handover = self._hands_over(msg)
        params = replace(msg.params, max_tokens=1, min_tokens=0) if handover else msg.params
        self.engine.add_request(msg.request_id, msg.prompt_token_ids, params, hold_kv=handover,
                                cache_salt=msg.cache_salt, pull_blocks=msg.pull_blocks if handover else 0,
                                pull_from=msg.pull_from if handover else "")
        self._prefills[msg.request_id] = msg
        self.queued_prompt_tokens += len(msg.prompt_token_ids)

    def _on_Reserve(self, msg: Reserve) -> None:
        held = None
        prompt_len = len(msg.prompt_token_ids)
        if msg.request_id not in self._tombstones:
            held = self.engine.reserve(msg.request_id, max(msg.num_tokens, prompt_len), msg.prompt_token_ids,
                                       msg.cache_salt)
        if held is not None:
            self._pending[msg.request_id] = msg
            # the prompt's blocks to the transfer that writes them (the rest is room for the output), but
            # for those whose KV the prefix cache held here; the prefill engine got the prompt from the
            # scheduler at the same time as this Reserve
            pool, ids = self._in_pool(held.blocks[:self.engine.blocks.blocks_for(prompt_len)])
            self.send(msg.transfer, DecodeBlocks(request_id=msg.request_id, instance=self.name,
                                                 block_ids=ids[held.cached:], pool=pool, skip=held.cached,
                                                 held_ids=ids[:held.cached]))
        self.send(SCHEDULER, Reserved(request_id=msg.request_id, instance=self.name,
                                      block_ids=held.blocks if held else None,
                                      free_blocks=self.engine.blocks.num_free_blocks,
                                      cached_blocks=held.cached if held else 0))

    def _on_KVLanded(self, msg: KVLanded) -> None:
        reserve = self._pending.pop(msg.request_id, None)
        if reserve is None:
            return  # freed meanwhile
        if self.paused:
            self._pending[msg.request_id] = reserve
            self._deferred.append(msg)
            return
        self._event(msg.request_id, State.DECODING)
        ended = self.engine.add_prefilled(msg.request_id, reserve.prompt_token_ids, msg.first_token,
                                          reserve.params, msg.first_logprob, reserve.cache_salt)
        if ended is not None:
            self._deliver([ended])

    def _on_TransferDone(self, msg: TransferDone) -> None:
        self.engine.release_kv(msg.request_id)

    def _on_LendBlocks(self, msg: LendBlocks) -> None:
        pool, ids = self._in_pool(self.engine.lend(msg.request_id, msg.prompt_token_ids, msg.blocks, msg.cache_salt))
        self.send(msg.transfer, LentBlocks(request_id=msg.request_id, instance=self.name, held_ids=ids, pool=pool))

    def _on_ReturnBlocks(self, msg: ReturnBlocks) -> None:
        self.engine.give_back(msg.request_id)

    def _on_Pulled(self, msg: Pulled) -> None:
        self.engine.scheduler.pulled(msg.request_id, msg.blocks)  # it computes the rest at the next step

    def _send_pulls(self) -> None:
        """Asks the transfer to copy in the cached blocks of the prompts admitted to wait for them; one that
        needs none of a lender's (its own cache holds them) says so, an empty pull: the lender's go back."""
        for seq in self.engine.scheduler.take_pulls():
            first, count = seq.pulling or (0, 0)
            pool, ids = self._in_pool(seq.block_table[first:first + count])
            self.send(self.transfer, PullStart(request_id=seq.request_id, instance=self.name, block_ids=ids,
                                               first=first, pool=pool, source=seq.pull_from))

    def _on_Free(self, msg: Free) -> None:
        rid = msg.request_id
        self._tombstones.add(rid)
        self._pending.pop(rid, None)
        self._deferred = [d for d in self._deferred if d.request_id != rid]
        prefill = self._prefills.pop(rid, None)
        if prefill is not None:
            self.queued_prompt_tokens -= len(prefill.prompt_token_ids)
        self.engine.cancel_reservation(rid)
        self.engine.abort_request(rid)
        self.engine.release_kv(rid)
        self._started.discard(rid)
        if self.role != "mixed":  # the scheduler's ledger holds room for it here until this
            self.send(SCHEDULER, Freed(request_id=rid, instance=self.name))

    def _on_DropAll(self, msg: DropAll) -> None:
        """The scheduler died: no request it knew can be finished or freed by it, so every request here
        (running, queued, reserved, or KV held for a transfer) ends and frees its blocks."""
        sched = self.engine.scheduler
        rids = {*(s.request_id for s in [*sched.running, *sched.waiting]), *sched.held, *self.engine.reserved,
                *self._pending, *self._prefills}
        for rid in rids:
            self._on_Free(Free(request_id=rid, reason=msg.reason))
        for rid in self.engine.lent:  # the transfer drops its pulls too: nothing reads them any more
            self.engine.give_back(rid)

    # ---- step loop ---------------------------------------------------------------------------
    def has_work(self) -> bool:
        return not self.paused and self.engine.has_unfinished()

    def step(self) -> None:
        start = time.perf_counter()
        self._step_prompt_tokens = 0
        try:
            outputs = self.engine.step(self._on_schedule)
        except Exception as exc:  # noqa: BLE001 — fail this engine's requests; keep serving
            log.exception("%s: a step failed", self.name)
            self.fail_all(f"{self.name}: {exc.__class__.__name__}: {exc}")
            if device_fault(exc) or self.engine.data_parallel:
                # the GPU is unusable, or (data-parallel attention) the other ranks may sit in this step's
                # collectives: the process ends, and its launcher starts the group anew
                raise
            return
        seconds = time.perf_counter() - start
        self.meter.add(seconds, self._step_prompt_tokens)
        if seconds > SLOW_STEP_S:
            sched = self.engine.scheduler
            variants = kernels.compiled_variants()
            compiled = sorted(name for name, n in variants.items() if n > self._variants.get(name, 0))
            self._variants = variants
            log.info("%s: a step took %.0f ms (%d prompt tokens; %d running, %d waiting)%s", self.name,
                     seconds * 1e3, self._step_prompt_tokens, len(sched.running), len(sched.waiting),
                     f"; new Triton kernel variants since the last slow step (a compile costs a second or "
                     f"more): {', '.join(compiled)}" if compiled else "")
        self._send_pulls()
        self._deliver(outputs)
        self._send_kv_events()

    def _send_kv_events(self) -> None:
        """The prefix cache's changes since the last call, to the scheduler (one batch a rank)."""
        events = self.engine.blocks.take_events()
        if not events:
            return
        by_rank: dict[int, list] = {}
        for rank, event in events:
            by_rank.setdefault(rank, []).append(event)
        now = self.clock()
        self.send(SCHEDULER, KVEvents(instance=self.name, batches=[
            encode_batch(KVEventBatch(now, batch, rank if self.engine.data_parallel else None))
            for rank, batch in by_rank.items()]))

    def fail_all(self, reason: str) -> None:
        """A step blew up: every request this engine runs or queues fails with `reason` (the scheduler
        then frees them everywhere); the engine itself goes on serving."""
        sched = self.engine.scheduler
        for seq in [*sched.running, *sched.waiting]:
            self.engine.abort_request(seq.request_id)
            self._fail_one(seq.request_id, reason)

    def _fail_one(self, rid: str, reason: str) -> None:
        """One request failed here: its blocks go, and the scheduler ends it everywhere."""
        self.engine.release_kv(rid)
        prefill = self._prefills.pop(rid, None)
        if prefill is not None:
            self.queued_prompt_tokens -= len(prefill.prompt_token_ids)
        self._started.discard(rid)
        self._event(rid, State.FAILED, detail=reason)

    def _on_schedule(self, sched: SchedulerOutput):
        """Announces prefills starting and, on a prefill instance, the transfers of prompts this batch
        finishes; returns the per-layer announcer when there are any (else decode steps of whole
        requests replay their CUDA graphs)."""
        now = self.clock()
        self._step_prompt_tokens = sum(c.num_tokens for c in sched.chunks if c.start < c.seq.num_prompt_tokens)
        for chunk in sched.chunks:
            rid = chunk.seq.request_id
            if rid in self._prefills and rid not in self._started:
                self._started.add(rid)
                cached, pulled = chunk.seq.num_cached_tokens, chunk.seq.num_pulled_tokens
                lender = f"{chunk.seq.pull_from}'s" if chunk.seq.pull_from else "the decode instance's"
                copied = f" ({pulled} copied from {lender})" if pulled else ""
                self._event(rid, State.PREFILLING, now=now,
                            detail=f"{cached} of {chunk.seq.num_prompt_tokens} prompt tokens from the prefix "
                                   f"cache{copied}" if cached else "")
        self._final_chunks = [c.seq.request_id for c in sched.chunks if c.samples and c.seq.request_id
                              in self._prefills and self._hands_over(self._prefills[c.seq.request_id])]
        self._final_tokens = sum(len(self._prefills[rid].prompt_token_ids) for rid in self._final_chunks)
        self._unannounced = 0
        if self.role != "prefill" or not self._final_chunks:
            return None
        for rid in self._final_chunks:
            p = self._prefills[rid]
            pool, ids = self._in_pool(self.engine.kv_blocks(rid))
            self.send(self.transfer, TransferStart(request_id=rid, src_instance=self.name, src_block_ids=ids,
                                                   dst_instance=p.decode_instance, src_pool=pool))
        return self._on_layer

    def _in_pool(self, block_ids: list[int]) -> tuple[str, list[int]]:
        """The pool a request's blocks are in, for the transfer, and their ids there: with data-parallel
        attention one rank's ("name@rank"), else the instance's ("")."""
        blocks = self.engine.blocks
        if not self.engine.data_parallel or not block_ids:
            return "", block_ids
        from pdpipe.transfer.base import rank_pool

        rank = blocks.partition_of(block_ids[0])
        return rank_pool(self.name, rank), [b - rank * blocks.partition_size for b in block_ids]

    def _on_layer(self, layer: int) -> None:
        self._unannounced += 1
        last = layer == self.engine.spec.num_layers - 1
        if not last and self._final_tokens * self._unannounced < self.layer_message_tokens:
            return
        msg = LayersReady(request_ids=self._final_chunks, layer=layer, count=self._unannounced)
        self._unannounced = 0
        if self._fence_layers:
            import torch

            event = torch.cuda.Event()
            event.record()
            self.send(self.transfer, msg, after=event)  # type: ignore[call-arg]  # a SenderThread's send
        else:
            self.send(self.transfer, msg)

    def _deliver(self, outputs: list[EngineOutput]) -> None:
        for out in outputs:
            rid = out.request_id
            if out.finish_reason == "error":  # its own step failed (the engine already freed it)
                self._fail_one(rid, f"{self.name}: {out.error}")
                continue
            prefill = self._prefills.pop(rid, None)
            if prefill is not None:
                self.queued_prompt_tokens -= len(prefill.prompt_token_ids)
                self._started.discard(rid)
                if self._hands_over(prefill):
                    out = self._first_token(prefill, out)
                elif out.finish_reason is None:
                    self._event(rid, State.DECODING)
            self.send(API, out)
            if out.finish_reason is not None:
                self._event(rid, State.FINISHED, detail=f"{out.finish_reason}, {out.index + len(out.token_ids)} tokens")

    def _first_token(self, prefill: Prefill, out: EngineOutput) -> EngineOutput:
        """Judges the first token by the request's own params (the engine ran it with max_tokens=1)."""
        rid, token = prefill.request_id, out.token_ids[0]
        ended = finish_for(prefill.params, token, 1, len(prefill.prompt_token_ids) + 1,
                           self.engine.max_model_len, self.engine.eos_token_ids)
        if ended is not None:
            self.engine.release_kv(rid)
            return replace(out, finish_reason=ended[0], stop_reason=ended[1])
        logprob = out.logprobs[0] if out.logprobs else None
        self.send(self.transfer, PrefillDone(request_id=rid, first_token=token, first_logprob=logprob))
        self._event(rid, State.TRANSFERRING, detail="prefill end")
        return replace(out, finish_reason=None, stop_reason=None)

    def _event(self, rid: str, state: State, detail: str = "", now: float | None = None) -> None:
        self.send(SCHEDULER, StateEvent(request_id=rid, state=state, instance=self.name,
                                        time=now or self.clock(), detail=detail))

    def _gpu_figures(self) -> GpuFigures | None:
        """This engine's GPU memory and utilisation, read from NVML at most once a second."""
        if not self.engine.kv_cache.data.is_cuda:
            return None
        now = time.monotonic()
        if now - self._gpu[0] >= 1.0:
            from pdpipe.ipc.cuda import physical_gpu

            self._gpu = (now, gpus.figures(physical_gpu(self.engine.kv_cache.data.device.index or 0)))
        return self._gpu[1]

    def stats(self, inbox_depth: int = 0) -> InstanceStats:
        self._send_kv_events()  # what changed outside a step (a landed prompt's blocks, a reset)
        sched = self.engine.scheduler
        gpu = self._gpu_figures()
        return InstanceStats(instance=self.name, role=self.role, time=self.clock(), weights=self.engine.quant.name,
                             kv_dtype=self.engine.kv_dtype,
                             gpu_memory_used=gpu.memory_used if gpu else 0,
                             gpu_memory_total=gpu.memory_total if gpu else 0,
                             gpu_utilization=gpu.utilization if gpu else -1,
                             num_blocks=self.engine.blocks.num_blocks,
                             free_blocks=self.engine.blocks.num_free_blocks,
                             pool_blocks=self.engine.blocks.partition_size,
                             pool_free_blocks=self.engine.blocks.num_free_for_new_table,
                             running=len(sched.running), waiting=len(sched.waiting) + len(self._deferred),
                             inbox=inbox_depth, queued_prompt_tokens=self.queued_prompt_tokens,
                             paused=self.paused, block_size=self.engine.blocks.block_size,
                             max_num_seqs=self.engine.config.scheduler.max_num_seqs,
                             preemptions=sched.num_preemptions,
                             step_seconds=self.meter.step_seconds,
                             prefill_tokens_per_s=self.meter.prefill_tokens_per_s,
                             busy_seconds=self.meter.busy_seconds, prompt_tokens=self.meter.prompt_tokens,
                             cached_blocks=self.engine.blocks.num_cached_blocks,
                             prefix_query_tokens=sched.prefix_query_tokens, prefix_hit_tokens=sched.prefix_hit_tokens,
                             prefix_hit_tokens_host=sched.prefix_hit_tokens_host,
                             prefix_hit_tokens_remote=sched.prefix_hit_tokens_remote, **self._host_figures())

    def _host_figures(self) -> dict[str, int]:
        blocks, tier = self.engine.blocks, self.engine.runner.host_tier
        if tier is None:
            return {}
        return {"host_blocks": blocks.host_blocks, "host_cached_blocks": blocks.num_host_cached_blocks,
                "host_bytes_out": blocks.host_blocks_out * tier.block_bytes,
                "host_bytes_in": blocks.host_blocks_in * tier.block_bytes}


class StepMeter:
    """Recent step times and prompt throughput (exponential means): the scheduler's estimates of how
    long a prompt waits on each instance."""

    def __init__(self, weight: float = 0.1):
        self.weight = weight
        self.step_seconds = 0.0
        self._prompt_tokens = self._prompt_seconds = 0.0
        self.busy_seconds, self.prompt_tokens = 0.0, 0

    def add(self, seconds: float, prompt_tokens: int) -> None:
        self.busy_seconds += seconds
        self.prompt_tokens += prompt_tokens
        w = self.weight
        self.step_seconds = seconds if not self.step_seconds else (1 - w) * self.step_seconds + w * seconds
        if prompt_tokens:
            if not self._prompt_seconds:
                self._prompt_tokens, self._prompt_seconds = prompt_tokens, seconds
            else:
                self._prompt_tokens = (1 - w) * self._prompt_tokens + w * prompt_tokens
                self._prompt_seconds = (1 - w) * self._prompt_seconds + w * seconds

    @property
    def prefill_tokens_per_s(self) -> float:
        return self._prompt_tokens / self._prompt_seconds if self._prompt_seconds else 0.0
