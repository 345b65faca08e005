"""The transfer process's logic: moves each request's KV from its prefill pool to the blocks reserved
on its decode instance, layer by layer as the prefill engine finishes them.

TransferStart opens a job; LayersReady moves that layer of the named jobs; once every layer has landed
and PrefillDone brought the first token, decode gets KVLanded and prefill TransferDone. The decode
blocks come from decode (DecodeBlocks), which reserves them while the prefill engine already computes
(either may come first): layers finished before they are known wait, then move in one batch. The
scheduler hears of a job twice (its first layers sent, and its landing with how long the layers
took), not once a layer: under load its inbox carries requests, not layers. A pull goes the other way,
before the prompt is computed: the prefill instance names the blocks it waits to have filled (PullStart),
decode's DecodeBlocks name the cached blocks that hold that KV (held by its reservation, so nothing evicts
them), and all layers of those are copied at once; Pulled tells the prefill instance how many came (0 when
the copy failed or the request ended: it computes them itself). A pull may instead copy from another prefill
instance's cache (PullStart.source): that one holds the blocks it names (LentBlocks) until this process
returns them (ReturnBlocks), once the copy has settled or was given up. AbortTransfer stops a
job and then passes Free to the decode instance, so decode frees its blocks only after nothing can
write into them any more; the request id is kept (a tombstone), so a start, layer or block message
that arrives after its abort moves nothing. States reported: TRANSFERRING (first layers, landing),
FAILED.
"""
from __future__ import annotations

import logging
import time
from collections.abc import Callable

import msgspec

from pdpipe.messages import (
    AbortTransfer,
    DecodeBlocks,
    DropAll,
    EngineOutput,
    Free,
    Handler,
    InstanceStats,
    KVLanded,
    LayersReady,
    LentBlocks,
    Msg,
    PoolInfo,
    PrefillDone,
    Pulled,
    PullStart,
    ReturnBlocks,
    State,
    StateEvent,
    TransferDone,
    TransferStart,
)
from pdpipe.tombstones import Tombstones

from .base import TransferBackend, TransferError, TransferJob, TransferState, rank_pool

Send = Callable[[str, Msg | EngineOutput], None]
log = logging.getLogger("pdpipe")


class TransferWorker(Handler):
    def __init__(self, name: str, backend: TransferBackend, num_layers: int, send: Send, clock=time.time,
                 pool_lookup: Callable[[str], PoolInfo | None] | None = None, copy_deadline: float = 30.0):
        self.name, self.backend, self.num_layers, self.send, self.clock = name, backend, num_layers, send, clock
        self.pool_lookup = pool_lookup
        self.copy_deadline = copy_deadline  # copies handed to the backend must land within this
        self._pools: set[str] = set()
        self.jobs: dict[str, TransferJob] = {}
        self._first: dict[str, PrefillDone] = {}
        self._draining: dict[str, tuple[TransferJob, AbortTransfer, float]] = {}  # aborted, copies running
        self._failed: dict[str, TransferJob] = {}  # failed and reported: the scheduler's abort comes next
        self._blocks: dict[str, DecodeBlocks] = {}  # decode's blocks that came before their TransferStart
        self._pull_waiting: dict[str, PullStart] = {}  # pulls whose source blocks are not known yet
        self._lent: dict[str, LentBlocks] = {}  # blocks a prefill instance lends a pull, until given back
        self._settled = Tombstones()  # pulls answered, or with nothing to copy: a lend that comes later goes back
        self.pulls: dict[str, TransferJob] = {}  # pulls copying
        self._tombstones = Tombstones()  # aborted: late messages move nothing
        self.bytes_moved = 0
        self.seconds_moving = 0.0
        self.blocks_sent = 0  # prompt blocks handed to the backend, since start
        self.blocks_skipped = 0  # prompt blocks decode held already, not moved
        self.blocks_pulled = 0  # cached prompt blocks copied decode → prefill instead of computed

    def handle(self, msg: Msg | EngineOutput) -> None:
        log.debug("%s: %s %s", self.name, type(msg).__name__,
                  getattr(msg, "request_id", None) or getattr(msg, "layer", ""))
        if getattr(msg, "request_id", None) not in self._tombstones or isinstance(msg, AbortTransfer):
            super().handle(msg)  # else the request was aborted before this message arrived
        elif isinstance(msg, PullStart):  # ... but a prefill instance waits for its answer to free the blocks
            self.send(msg.instance, Pulled(request_id=msg.request_id, blocks=0))
        elif isinstance(msg, LentBlocks) and msg.held_ids:  # ... and a lender holds its blocks until told
            self.send(msg.instance, ReturnBlocks(request_id=msg.request_id))
        self.poll()

    def _on_PoolInfo(self, msg: PoolInfo) -> None:
        self._register(msg)

    def _on_DropAll(self, msg: DropAll) -> None:
        """The scheduler died: every job goes, decode frees their blocks."""
        decodes = {rid: "" for rid in (*self._pull_waiting, *self._lent)}
        decodes |= {rid: job.src_instance for rid, job in self.pulls.items()}
        decodes |= {rid: blocks.instance for rid, blocks in self._blocks.items()}
        decodes |= {rid: job.dst_instance for rid, job in (*self.jobs.items(), *self._failed.items())}
        for rid, decode in decodes.items():
            self._abort(AbortTransfer(request_id=rid, decode_instance=decode, reason=msg.reason))

    def _on_AbortTransfer(self, msg: AbortTransfer) -> None:
        self._abort(msg)

    def _on_TransferStart(self, msg: TransferStart) -> None:
        if msg.request_id not in self.jobs:  # a step that ran again announces its prompts again
            self._start(msg)

    def _on_DecodeBlocks(self, msg: DecodeBlocks) -> None:
        if msg.request_id in self.jobs:
            self._destination(self.jobs[msg.request_id], msg)
        else:
            self._blocks[msg.request_id] = msg
            pull = self._pull_waiting.get(msg.request_id)
            if pull is not None and not pull.source:
                del self._pull_waiting[msg.request_id]
                self._pull(pull, msg)

    def _on_LentBlocks(self, msg: LentBlocks) -> None:
        """A lender's blocks, or none: it held none, or (from the scheduler) it is gone. Messages from the
        lender, the scheduler and the prefill instance come in any order: a lend that comes after its pull
        was answered goes back at once; a word of none leaves a copy already reading the blocks alone."""
        rid = msg.request_id
        if rid in self._settled:
            if msg.held_ids:
                self.send(msg.instance, ReturnBlocks(request_id=rid))
            return
        if not msg.held_ids:
            if rid in self.pulls:  # a copy reads the lent blocks: it settles on its own
                return
            self._give_back(rid)  # lent here, no copy reads them yet: they go back
            self._settled.add(rid)
            waiting = self._pull_waiting.pop(rid, None)
            if waiting is not None:
                self.send(waiting.instance, Pulled(request_id=rid, blocks=0))
            return
        self._lent[rid] = msg
        pull = self._pull_waiting.get(rid)
        if pull is not None and pull.source == msg.instance:
            del self._pull_waiting[rid]
            self._pull(pull, msg)

    def _on_PullStart(self, msg: PullStart) -> None:
        if msg.source and msg.request_id in self._settled:  # the lender lends nothing
            self.send(msg.instance, Pulled(request_id=msg.request_id, blocks=0))
            return
        blocks = self._lent.get(msg.request_id) if msg.source else self._blocks.get(msg.request_id)
        if blocks is None or blocks.instance != (msg.source or blocks.instance):
            self._pull_waiting[msg.request_id] = msg
        else:
            self._pull(msg, blocks)

    def _pull(self, msg: PullStart, blocks: DecodeBlocks | LentBlocks) -> None:
        """Copies the cached blocks for prompt blocks first … into the prefill instance's, every layer at
        once (they are complete): decode's (those its reservation holds) or a lender's; none when that cache
        does not reach them."""
        held = len(blocks.held_ids) - msg.first
        if isinstance(blocks, DecodeBlocks):
            held = min(held, blocks.skip - msg.first)
        count = min(len(msg.block_ids), held)
        if count <= 0:
            self.send(msg.instance, Pulled(request_id=msg.request_id, blocks=0))
            self._give_back(msg.request_id)
            self._settled.add(msg.request_id)
            return
        job = TransferJob(msg.request_id, blocks.instance, blocks.held_ids[msg.first:msg.first + count], msg.instance,
                          list(msg.block_ids[:count]), src_pool=blocks.pool, dst_pool=msg.pool, pull=True)
        self._know_pool(job.src_pool)
        self._know_pool(job.dst_pool)
        self.pulls[msg.request_id] = job
        try:
            self.backend.send_batch([job], 0, self.num_layers)
        except Exception as exc:  # noqa: BLE001 — this pull's failure: the prefill computes those blocks
            job.error = str(exc) if isinstance(exc, TransferError) else f"{type(exc).__name__}: {exc}"
        job.first_layer_at = job.last_layer_at = self.clock()

    def _on_LayersReady(self, msg: LayersReady) -> None:
        jobs = [self.jobs[rid] for rid in msg.request_ids if rid in self.jobs]
        for job in jobs:
            if not job.has_destination:
                job.layers_ready.update(range(msg.layer - msg.count + 1, msg.layer + 1))
        self._send_layers([j for j in jobs if j.has_destination], msg.layer - msg.count + 1, msg.count)

    def _on_PrefillDone(self, msg: PrefillDone) -> None:
        if msg.request_id in self.jobs:
            self._first[msg.request_id] = msg

    def _know_pool(self, instance: str) -> None:
        """Registers `instance`'s pool the first time a job names it (across machines: from Redis)."""
        info = self.pool_lookup(instance) if self.pool_lookup and instance not in self._pools else None
        if info is not None:
            self._register(info)

    def _start(self, msg: TransferStart) -> None:
        self._know_pool(msg.src_pool or msg.src_instance)  # decode's: when its blocks say which pool
        job = self.jobs[msg.request_id] = TransferJob(msg.request_id, msg.src_instance, list(msg.src_block_ids),
                                                      msg.dst_instance, [], src_pool=msg.src_pool)
        early = self._blocks.pop(msg.request_id, None)
        if early is not None:
            self._destination(job, early)

    def _destination(self, job: TransferJob, msg: DecodeBlocks) -> None:
        """Decode's blocks are known: the layers computed meanwhile move now, in one batch."""
        self._know_pool(msg.pool or msg.instance)
        job.dst_instance, job.dst_pool, job.dst_block_ids = msg.instance, msg.pool or msg.instance, list(msg.block_ids)
        job.src_block_ids, job.skipped, job.dst_known = job.src_block_ids[msg.skip:], msg.skip, True
        self.blocks_sent += len(job.src_block_ids)
        self.blocks_skipped += msg.skip
        if job.moves_nothing:
            job.layers_sent.update(range(self.num_layers))
            job.first_layer_at = job.last_layer_at = self.clock()
            self._event(job.request_id, State.TRANSFERRING, f"decode holds all {msg.skip} blocks: nothing moves")
        if job.layers_ready:
            last = max(job.layers_ready)
            self._send_layers([job], 0, last + 1)  # layers finish in order: 0 … last are all ready
            job.layers_ready.clear()

    def _abort(self, msg: AbortTransfer) -> None:
        rid = msg.request_id
        self._tombstones.add(rid)
        job = self.jobs.pop(rid, None) or self._failed.pop(rid, None) or self.pulls.pop(rid, None)
        self._first.pop(rid, None)
        self._blocks.pop(rid, None)
        waiting = self._pull_waiting.pop(rid, None)
        if waiting is not None:
            self.send(waiting.instance, Pulled(request_id=rid, blocks=0))
        if job is not None and self._in_flight(job):
            self._draining[rid] = (job, msg, self.clock())  # decode frees its blocks once nothing writes them
        else:
            self._aborted(job, msg)

    def _aborted(self, job: TransferJob | None, msg: AbortTransfer) -> None:
        if job is not None:
            try:
                self.backend.abort(job)
            except Exception:  # noqa: BLE001 — decode must still free its blocks
                log.exception("%s: aborting %s", self.name, job.request_id)
            if job.pull:  # nothing writes into the prefill instance's blocks any more
                self.send(job.dst_instance, Pulled(request_id=job.request_id, blocks=0))
        self._give_back(msg.request_id)  # nothing reads a lender's blocks any more
        if msg.decode_instance:
            self.send(msg.decode_instance, Free(request_id=msg.request_id, reason=msg.reason))

    def _register(self, pool: PoolInfo) -> None:
        self._pools.add(pool.instance)
        if pool.data_parallel:  # each rank's pool on its own, whole heads: the backends see one-rank pools
            pool = msgspec.structs.replace(pool, instance=rank_pool(pool.instance, pool.rank), rank=0, tp=1,
                                           kv_heads=[], data_parallel=False)
            self._pools.add(pool.instance)
        self.backend.register_pool(pool)

    def _send_layers(self, jobs: list[TransferJob], first: int, count: int) -> None:
        """One batched send for the layers; if it fails, job by job and layer by layer, so the error
        lands on its own job."""
        jobs = [job for job in jobs if not job.moves_nothing]
        if not jobs:
            return
        layers = range(first, first + count)
        try:
            self.backend.send_batch(jobs, first, count)
        except Exception:  # noqa: BLE001 — found job by job below; the error lands on its own job
            for job in jobs:
                for layer in layers:
                    if layer in job.layers_sent or job.error:
                        continue
                    try:
                        self.backend.send(job, layer)
                    except Exception as exc:  # noqa: BLE001 — this job's failure, not the process's
                        job.error = str(exc) if isinstance(exc, TransferError) else f"{type(exc).__name__}: {exc}"
        what = f"layer {first + 1}" if count == 1 else f"layers {first + 1}-{first + count}"
        now = self.clock()
        for job in jobs:
            if job.layers_sent.issuperset(layers):
                job.last_layer_at = now
                if not job.first_layer_at:
                    job.first_layer_at = now
                    self._event(job.request_id, State.TRANSFERRING, f"{what}/{self.num_layers} sent")

    def poll(self) -> None:
        """Finishes the jobs whose every layer landed, and fails those the backend gave up on or whose
        copies did not land within `copy_deadline`. An aborted job's copies that never settle are
        given up after the same deadline: decode frees its blocks anyway (logged), not never."""
        now = self.clock()
        for rid, (job, msg, since) in list(self._draining.items()):
            settled = not self._in_flight(job)
            if settled or now - since > self.copy_deadline:
                if not settled:
                    log.error("%s: %s's copies did not settle within %g s of its abort; freeing its decode "
                              "blocks anyway", self.name, rid, self.copy_deadline)
                del self._draining[rid]
                self._aborted(job, msg)
        for job in list(self.pulls.values()):
            state = self._state(job)
            settled = state is TransferState.DONE or (state is TransferState.FAILED and not self._in_flight(job))
            if not settled and now - job.last_layer_at > self.copy_deadline:
                job.error = job.error or f"copies did not land within {self.copy_deadline:g} s"
                log.error("%s: %s's pull did not settle within %g s; its blocks go back to the prefill instance",
                          self.name, job.request_id, self.copy_deadline)
                settled, state = True, TransferState.FAILED
            if settled:
                self._pulled(job, state)
        for rid, job in list(self.jobs.items()):
            state = self._state(job)
            if state is TransferState.PENDING and job.last_layer_at and now - job.last_layer_at > self.copy_deadline:
                job.error = f"copies did not land within {self.copy_deadline:g} s"
                state = TransferState.FAILED
            if state is TransferState.FAILED:
                self._fail(job)
            elif state is TransferState.DONE and self._ready(rid, job):
                self._finish(job, self._first.pop(rid))

    def _state(self, job: TransferJob) -> TransferState:
        """Where the job stands; a backend that raises fails this job alone."""
        if job.error:
            return TransferState.FAILED
        if not job.has_destination:  # decode's blocks (and so the pool they are in) not known yet
            return TransferState.PENDING
        if job.moves_nothing:
            return TransferState.DONE
        try:
            return self.backend.poll(job)
        except Exception as exc:  # noqa: BLE001 — the job's failure, not the process's
            job.error = f"{type(exc).__name__}: {exc}"
            return TransferState.FAILED

    def _in_flight(self, job: TransferJob) -> bool:
        """Copies of the job still writing (a failed job's earlier layers may still be landing)."""
        if job.moves_nothing:
            return False
        try:
            return self.backend.poll(job) is TransferState.PENDING
        except Exception:  # noqa: BLE001 — a backend that cannot say has nothing it can finish
            return False

    def _finish(self, job: TransferJob, first: PrefillDone) -> None:
        del self.jobs[job.request_id]
        self.backend.finished(job)
        self.bytes_moved += job.bytes_moved
        self.seconds_moving += job.seconds
        self.send(job.dst_instance, KVLanded(request_id=job.request_id, first_token=first.first_token,
                                             first_logprob=first.first_logprob))
        self.send(job.src_instance, TransferDone(request_id=job.request_id))
        log.debug("%s: %d blocks %s → %s, %d bytes in %.3f ms", job.request_id, len(job.src_block_ids),
                  job.src_instance, job.dst_instance, job.bytes_moved, job.seconds * 1e3)
        self._event(job.request_id, State.TRANSFERRING,
                    f"landed {job.bytes_moved} bytes in {job.seconds * 1e3:.2f} ms; layers sent over "
                    f"{(job.last_layer_at - job.first_layer_at) * 1e3:.2f} ms")

    def _pulled(self, job: TransferJob, state: TransferState) -> None:
        """A pull settled (or was given up past its deadline): the prefill instance computes what did not
        come (of a failed pull, whatever layers it copied count for nothing)."""
        del self.pulls[job.request_id]
        got = len(job.dst_block_ids) if state is TransferState.DONE else 0
        if state is TransferState.DONE:
            self.backend.finished(job)
            self.blocks_pulled += got
        else:
            log.warning("%s: copying %d cached blocks from %s failed (%s): computed instead", job.request_id,
                        len(job.dst_block_ids), job.src_instance, job.error or "backend failure")
            try:
                self.backend.abort(job)
            except Exception:  # noqa: BLE001 — the prefill computes them either way
                log.exception("%s: aborting the pull of %s", self.name, job.request_id)
        self.send(job.dst_instance, Pulled(request_id=job.request_id, blocks=got))
        self._give_back(job.request_id)
        self._settled.add(job.request_id)

    def _give_back(self, request_id: str) -> None:
        """Returns the blocks a prefill instance lent for the request's pull (none: nothing to say)."""
        lent = self._lent.pop(request_id, None)
        if lent is not None and lent.held_ids:
            self.send(lent.instance, ReturnBlocks(request_id=request_id))

    def _fail(self, job: TransferJob) -> None:
        """Reports the failure; the job stays known until the scheduler's abort comes, which frees
        decode's blocks once nothing of the job still writes into them (see `_abort`)."""
        log.warning("%s: transfer failed: %s", job.request_id, job.error or "backend failure")
        del self.jobs[job.request_id]
        self._first.pop(job.request_id, None)
        self._failed[job.request_id] = job
        self._event(job.request_id, State.FAILED, f"KV transfer failed: {job.error or 'backend failure'}")

    def _event(self, rid: str, state: State, detail: str) -> None:
        self.send("scheduler", StateEvent(request_id=rid, state=state, instance=self.name,
                                          time=self.clock(), detail=detail))

    def has_work(self) -> bool:
        """Copies still running, or a job whose outcome is known but not yet reported: `step` must run
        (a job whose copies end between two messages is finished by `step`, not by a message)."""
        if self._draining or self.pulls:
            return True
        for rid, job in self.jobs.items():  # one waiting for decode's blocks waits for a message
            if job.has_destination and (self._state(job) is not TransferState.DONE or self._ready(rid, job)):
                return True
        return False

    def _ready(self, rid: str, job: TransferJob) -> bool:
        return rid in self._first and len(job.layers_sent) == self.num_layers

    def stats(self, inbox_depth: int = 0) -> InstanceStats:
        return InstanceStats(instance=self.name, role="transfer", time=self.clock(), inbox=inbox_depth,
                             transfers_in_flight=len(self.jobs),
                             bytes_in_flight=sum(self.backend.job_bytes(j) - j.bytes_moved
                                                 for j in self.jobs.values()),
                             bytes_moved=self.bytes_moved, seconds_moving=self.seconds_moving,
                             blocks_sent=self.blocks_sent, blocks_skipped=self.blocks_skipped,
                             blocks_pulled=self.blocks_pulled)

    def step(self) -> None:
        self.poll()
