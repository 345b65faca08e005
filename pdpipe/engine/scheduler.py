"""Continuous batching over a paged KV pool.

Each step: running sequences first, oldest first (a decode is one token; a prompt that did not fit
last step's token budget continues in chunks); then waiting prompts join while the budget, the
sequence limit and the free blocks allow; `max_prefill_tokens` caps the prompt tokens of one step (a
decode instance computing prompts itself keeps its running requests' steps short). A prompt is
admitted only when blocks for all of its tokens are free. When a running sequence needs a block and
none is free, the newest running sequence is preempted: its blocks are freed and it waits to be
recomputed, so the oldest always makes progress and no request is ever corrupted or dropped.

A prompt whose leading blocks the decode instance caches (`Sequence.pull_blocks`, a remote hit) is admitted
with blocks for all of it and then waits, computing nothing, while the transfer copies those blocks in
(`pulls`, then `pulled`); it is never preempted meanwhile, and if it ends its blocks are kept until the copy
has settled (`pull_holds`): nothing frees a block something still writes into.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from pdpipe.config import SchedulerConfig
from pdpipe.kv_hash import reusable_blocks
from pdpipe.messages import SamplingParams, TokenLogprob

from .block_manager import BlockManager
from .sequence import Sequence, Status


@dataclass
class ScheduledChunk:
    seq: Sequence
    start: int  # position of the first token computed this step
    num_tokens: int

    @property
    def samples(self) -> bool:
        return self.start + self.num_tokens == self.seq.num_tokens


@dataclass
class SchedulerOutput:
    chunks: list[ScheduledChunk] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)
    finished: list[Sequence] = field(default_factory=list)  # ended while scheduling

    @property
    def num_tokens(self) -> int:
        return sum(c.num_tokens for c in self.chunks)


@dataclass
class Sample:
    token_id: int
    logprob: TokenLogprob | None = None


class Scheduler:
    def __init__(self, config: SchedulerConfig, blocks: BlockManager, max_model_len: int,
                 eos_token_ids: frozenset[int]):
        self.config = config
        self.blocks = blocks
        self.max_model_len = max_model_len
        self.eos_token_ids = eos_token_ids
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0
        self.held: dict[str, list[int]] = {}  # finished requests whose KV is still wanted
        self.prefix_query_tokens = 0  # prompt tokens looked up in the prefix cache (first admissions)
        self.prefix_hit_tokens = 0  # of them, found there
        self.prefix_hit_tokens_host = 0  # of those, found in the host tier
        self.prefix_hit_tokens_remote = 0  # of those, copied from the decode instance's cache (pulled)
        self.pulls: list[Sequence] = []  # started copying in, not yet told to the transfer (`take_pulls`)
        self.pull_holds: dict[str, list[int]] = {}  # ended while copying in: their blocks, until the copy settles

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def add_running(self, seq: Sequence) -> None:
        """A sequence whose prompt KV is already in its blocks (computed by another engine): cached now."""
        seq.status = Status.RUNNING
        self.running.append(seq)
        self.register_computed(seq)

    def release_held(self, request_id: str) -> bool:
        blocks = self.held.pop(request_id, None)
        if blocks is not None:
            self.blocks.free(blocks)
        return blocks is not None

    def has_unfinished(self) -> bool:
        """Whether a step would do anything: a sequence waiting, or one running that is not copying in."""
        return bool(self.waiting or any(seq.pulling is None for seq in self.running))

    def take_pulls(self) -> list[Sequence]:
        pulls, self.pulls = self.pulls, []
        return pulls

    def pulled(self, request_id: str, num_blocks: int) -> bool:
        """The copy into a sequence's blocks has settled: its first `num_blocks` blocks hold the decode
        instance's KV (the rest of the prompt is computed here). Returns whether anything was waiting on it."""
        held = self.pull_holds.pop(request_id, None)
        if held is not None:  # it ended meanwhile
            self.blocks.free(held)
            return True
        seq = self.find(request_id)
        if seq is None or seq.pulling is None:
            return False
        first, count = seq.pulling
        got = min(max(num_blocks, 0), count)
        seq.pulling = None
        seq.num_computed_tokens = (first + got) * self.blocks.block_size
        self.register_computed(seq)
        seq.num_cached_tokens = seq.num_computed_tokens
        seq.num_pulled_tokens = got * self.blocks.block_size
        if seq.cache_root is not None:
            self.prefix_hit_tokens += got * self.blocks.block_size
            self.prefix_hit_tokens_remote += got * self.blocks.block_size
        return True

    def find(self, request_id: str) -> Sequence | None:
        for seq in (*self.running, *self.waiting):
            if seq.request_id == request_id:
                return seq
        return None

    def finish(self, seq: Sequence, reason: str, stop_reason: int | str | None = None) -> None:
        """Ends `seq` wherever it is and frees its blocks."""
        if seq.status is Status.RUNNING:
            self.running.remove(seq)
        elif seq.status is Status.WAITING:
            self.waiting.remove(seq)
        if seq.hold_kv and seq.block_table and reason != "abort":
            self.held[seq.request_id] = seq.block_table
            seq.block_table = []
        if seq.pulling is not None:  # the transfer may still write into its blocks
            self.pull_holds[seq.request_id] = seq.block_table
            seq.block_table, seq.pulling = [], None
        self._release(seq)
        seq.status, seq.finish_reason, seq.stop_reason = Status.FINISHED, reason, stop_reason

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        cfg = self.config
        budget, prompt_budget = self._schedule_running(out, cfg.max_num_batched_tokens,
                                                       cfg.max_prefill_tokens or cfg.max_num_batched_tokens)
        if not out.preempted:
            self._admit_waiting(out, min(budget, prompt_budget))
        return out

    def _schedule_running(self, out: SchedulerOutput, budget: int, prompt_budget: int) -> tuple[int, int]:
        """Running sequences, oldest first: a decode token each, and the next chunk of a prompt that did
        not fit an earlier step (within `prompt_budget`, the prompt tokens a step may compute)."""
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            if seq.pulling is not None:  # waits for its copy
                i += 1
                continue
            left = seq.num_tokens - seq.num_computed_tokens
            prompt = left > 1 or seq.num_computed_tokens < seq.num_prompt_tokens  # not one decode token
            n = min(left, budget, prompt_budget) if prompt else min(left, budget)
            if n <= 0:  # a prompt chunk that waits for the next step's prompt budget
                i += 1
                continue
            if not self._make_room(seq, i, n, out):  # seq gave way (or ended): running[i] is the next one now
                continue
            out.chunks.append(ScheduledChunk(seq, seq.num_computed_tokens, n))
            budget -= n
            if prompt:
                prompt_budget -= n
            i += 1
        return budget, prompt_budget

    def _make_room(self, seq: Sequence, i: int, n: int, out: SchedulerOutput) -> bool:
        """Blocks for seq's next n tokens (seq is running[i]), preempting the newest sequences of its
        pool, seq itself the last: whether seq has them (if not, it was preempted, or, alone in its
        pool, ended with "length"; either way it left `running`)."""
        while not self.blocks.ensure_capacity(seq.block_table, seq.num_computed_tokens + n):
            mates = self._sharing_pool(seq)
            copying = [j for j in mates if self.running[j].pulling is not None]  # their blocks are being written
            if mates == [i]:  # alone in its pool: cannot happen while max_model_len fits the pool
                self.finish(seq, "length")
                out.finished.append(seq)
                return False
            mates = [j for j in mates if j not in copying] or [i]
            victim = self.running.pop(mates[-1])  # the newest: seq itself, or one after it
            self._preempt(victim)
            out.preempted.append(victim)
            if victim is seq:
                return False
        return True

    def _sharing_pool(self, seq: Sequence) -> list[int]:
        """Indices in `running` of the sequences whose blocks come from seq's pool (every one, but with
        data-parallel attention only those on seq's rank: preempting another rank's frees nothing here)."""
        part = self.blocks.partition_of(seq.block_table[0]) if seq.block_table else None
        return [j for j, s in enumerate(self.running)
                if part is None or (s.block_table and self.blocks.partition_of(s.block_table[0]) == part)]

    def _admit_waiting(self, out: SchedulerOutput, budget: int) -> None:
        """Waiting prompts join, oldest first, while blocks are free for the part of each that the prefix
        cache does not hold (a hit is computed from where it ends)."""
        bs = self.blocks.block_size
        while self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
            seq = self.waiting[0]
            hashes, limit = seq.block_hashes(bs), reusable_blocks(seq.num_tokens, bs, computes_last=True)
            hit = self.blocks.match(hashes, limit)
            reserve = self.config.watermark_blocks if self.running else 0
            if hit and not self.blocks.can_allocate(self.blocks.blocks_for(seq.num_tokens) - len(hit) + reserve, hit):
                hit = []  # the partition holding it is full: computed afresh in one with room
            need = self.blocks.blocks_for(seq.num_tokens) - len(hit)
            part = (self.blocks.partition_of(hit[0]) if hit  # else where the host tier holds it, if any
                    else self.blocks.host_partition(hashes, limit, need + reserve))
            if not self.blocks.can_allocate(need + reserve, hit, part):
                break
            self.waiting.popleft()
            self.blocks.share(hit)
            new = self.blocks.allocate(need, part)
            where = self.blocks.partition_of(new[0]) if new else 0
            host = self.blocks.match_host(hashes[len(hit):], limit - len(hit), where)  # the prefix's rest, on the host
            self.blocks.restore(host, new)
            seq.block_table = hit + new
            seq.num_registered = len(hit)
            seq.num_computed_tokens = (len(hit) + len(host)) * bs
            self.register_computed(seq)  # the restored blocks: their KV is back before anything reads it
            first = not seq.admitted  # its first admission (a preempted one recomputes from its own blocks)
            if first:
                seq.admitted = True
                seq.num_cached_tokens = seq.num_computed_tokens
                if seq.cache_root is not None:
                    self.prefix_query_tokens += seq.num_prompt_tokens
                    self.prefix_hit_tokens += seq.num_cached_tokens
                    self.prefix_hit_tokens_host += len(host) * bs
            seq.status = Status.RUNNING
            self.running.append(seq)
            have = len(hit) + len(host)
            if first and seq.pull_blocks > have:  # the decode instance's cache has more: copied in first
                seq.pulling = (have, seq.pull_blocks - have)
                self.pulls.append(seq)
                continue
            if first and seq.pull_from:  # another instance holds blocks lent for it: it copies none
                self.pulls.append(seq)
            n = min(seq.num_tokens - seq.num_computed_tokens, budget)
            out.chunks.append(ScheduledChunk(seq, seq.num_computed_tokens, n))
            budget -= n

    def register_computed(self, seq: Sequence) -> None:
        """The prefix cache takes the full blocks whose KV `seq` has computed (or received) so far."""
        full = seq.num_computed_tokens // self.blocks.block_size
        if seq.num_registered >= full or seq.cache_root is None:
            return
        bs = self.blocks.block_size
        hashes = seq.block_hashes(bs)
        for i in range(seq.num_registered, full):
            self.blocks.register(seq.block_table[i], hashes[i], hashes[i - 1] if i else None,
                                 seq.token_ids[i * bs:(i + 1) * bs])
        seq.num_registered = full

    def _preempt(self, seq: Sequence) -> None:
        self._release(seq)
        seq.status = Status.WAITING
        seq.num_computed_tokens = seq.num_registered = 0
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(seq)

    def _release(self, seq: Sequence) -> None:
        if seq.block_table:
            self.blocks.free(seq.block_table)
            seq.block_table = []

    def update(self, out: SchedulerOutput, samples: dict[Sequence, Sample]) -> list[Sequence]:
        """Applies a step's results; returns the sequences that got a token (finished or not)."""
        touched = []
        for chunk in out.chunks:
            seq = chunk.seq
            if seq.is_finished:  # aborted between schedule and update
                continue
            seq.num_computed_tokens += chunk.num_tokens
            self.register_computed(seq)
            sample = samples.get(seq)
            if sample is None:
                continue
            seq.token_ids.append(sample.token_id)
            if sample.logprob is not None:
                seq.logprobs.append(sample.logprob)
            self.check_stop(seq, sample.token_id)
            touched.append(seq)
        return touched

    def check_stop(self, seq: Sequence, token: int) -> None:
        ended = finish_for(seq.params, token, seq.num_output_tokens, seq.num_tokens, self.max_model_len,
                           self.eos_token_ids)
        if ended is not None:
            self.finish(seq, *ended)


def finish_for(params: SamplingParams, token: int, num_output_tokens: int, num_tokens: int,
               max_model_len: int, eos_token_ids: frozenset[int]) -> tuple[str, int | None] | None:
    """(finish_reason, stop_reason) if `token`, the request's newest, ends it; else None."""
    if num_output_tokens >= params.min_tokens:
        if token in params.stop_token_ids:
            return "stop", token
        if not params.ignore_eos and token in eos_token_ids:
            return "stop", None
    if num_output_tokens >= params.max_tokens or num_tokens >= max_model_len:
        return "length", None
    return None
