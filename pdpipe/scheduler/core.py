"""The scheduler's logic: the table of live requests, routing, deadlines, and the one path by which
aborted and failed requests get every holder to free their blocks.

QUEUED → RESERVED (blocks held on D) → PREFILLING (on P) → TRANSFERRING (layer k of N)
       → DECODING (on D) → FINISHED | ABORTED | FAILED
A mixed instance runs QUEUED → PREFILLING → DECODING → FINISHED in one engine.
Requests wait in the admission queue (admission.py) until a decode instance has room; then the
scheduler sends the Reserve to the decode instance with the most room and the Prefill to the prefill
instance with the fewest prompt tokens outstanding, both at once (decode hands its block ids to the
transfer). With conditional disaggregation a prompt may instead be computed on its decode instance.
"""
from __future__ import annotations

import bisect
import itertools
import logging
import time
from collections import Counter, OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

import msgspec

from pdpipe.config import DeadlineConfig, RoutingConfig, transfer_name
from pdpipe.kv_events import decode_batch
from pdpipe.kv_hash import block_hashes, reusable_blocks
from pdpipe.messages import (
    AbortRequest,
    AbortTransfer,
    EngineOutput,
    Free,
    Freed,
    Handler,
    Heartbeat,
    InstanceStats,
    KVEvents,
    LendBlocks,
    LentBlocks,
    Msg,
    NewRequest,
    Prefill,
    ProcessDown,
    ProcessUp,
    Pulled,
    Reserve,
    Reserved,
    ReturnBlocks,
    State,
    StateEvent,
)

from .admission import AdmissionQueue, DecodeLedger
from .cache_index import CacheIndex
from .liveness import Liveness

log = logging.getLogger("pdpipe")

STATES = tuple(State)
ENDED = (State.FINISHED, State.ABORTED, State.FAILED)
STAGE = {state: i for i, state in enumerate(STATES[:5])}  # an ended state outranks them all
Send = Callable[[str, Msg | EngineOutput], None]


@dataclass(frozen=True)
class CacheKeys:
    """How the engines hash prompts (kv_hash): the root of a request's chain for a salt, and the block size."""

    root: Callable[[str], bytes]
    block_size: int


@dataclass
class RequestRecord:
    request: NewRequest
    state: State
    since: float
    number: int = 0  # arrival order: its place in the admission queue
    queued_at: float = 0.0  # when it last entered the admission queue
    prefill: str = ""
    decode: str = ""
    whole: str = ""  # the instance computing prompt and output: mixed, decode (local) or prefill (decode busy)
    reserving: str = ""  # decode instance asked, no answer yet
    prefill_done: bool = False
    prefill_tokens: int = 0  # what its prompt costs the instance computing it (uncached tokens)
    hashes: list[bytes] | None = None  # its prompt's block hashes, once routing by cache needed them
    pull_blocks: int = 0  # leading prompt blocks its prefill instance copies from its decode instance's cache
    pull_from: str = ""  # ... or from this instance's, which lends them (LendBlocks)
    events: list[tuple[float, str, str, str]] = field(default_factory=list)  # time, state, instance, detail

    @property
    def request_id(self) -> str:
        return self.request.request_id

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.request.prompt_token_ids)


class SchedulerCore(Handler):
    name = "scheduler"

    def __init__(self, instances: dict[str, str], deadlines: DeadlineConfig, send: Send, clock=time.time,
                 history: int = 2000, machines: dict[str, str] | None = None,
                 routing: RoutingConfig = RoutingConfig(), cache: CacheKeys | None = None,
                 publish: Callable[[str, bytes], None] | None = None):
        """`cache`: how prompts hash, for routing by the engines' caches (None: not routed by cache);
        `publish(instance, payload)`: republishes each engine's KV event batches (external routers)."""
        self.roles = dict(instances)  # instance name → role (prefill | decode | mixed)
        self.machines = dict(machines or {})  # instance name → machine ("" on a single machine)
        self.deadlines, self.routing = deadlines, routing
        self.send, self.clock = send, clock
        self.live: dict[str, RequestRecord] = {}
        self.recent: OrderedDict[str, RequestRecord] = OrderedDict()
        self.history = history
        self.stats: dict[str, InstanceStats] = {}
        self.routed: Counter[str] = Counter()
        self.outstanding_tokens: Counter[str] = Counter()  # prompt tokens sent to each instance, not done
        self.ended: Counter[str] = Counter()
        self.queue = AdmissionQueue()
        self.ledger = DecodeLedger()
        self.decisions: Counter[str] = Counter()  # where prompts were computed: remote, local
        self.liveness = Liveness(deadlines.heartbeat, clock)  # who beats, who is down or frozen, who is ready
        self.index = CacheIndex()  # which instance caches which blocks (the engines' KV events)
        self.liveness.listeners.append(self.index.forget)
        self.cache = cache if routing.cache_aware else None
        self.publish = publish
        self._numbers = itertools.count()
        self._unpaired: set[tuple[str, str]] = set()  # (prefill, decode) pairs told apart once, in the log

    def of_role(self, role: str) -> list[str]:
        return [n for n, r in self.roles.items() if r == role]

    def transfer_of(self, instance: str) -> str:
        return transfer_name(self.machines.get(instance, ""))

    def update_instances(self, live: dict[str, tuple[str, str]],
                         why: str = "no heartbeat within the TTL") -> None:
        """The registry's view (name → (role, machine)). Requests on an instance that is gone fail now,
        and every surviving holder frees their blocks."""
        gone = set(self.roles) - set(live)
        dead_machines = {self.machines.get(n, "") for n in gone} - {m for _, m in live.values()}
        for rec in list(self.live.values()):
            # once decoding, a request no longer needs the instance that computed its prompt
            prefill = rec.prefill if STAGE.get(rec.state, len(STAGE)) < STAGE[State.DECODING] else ""
            lost = gone & {prefill, rec.decode, rec.whole, rec.reserving}
            if lost:
                self._end(rec, State.FAILED, "scheduler", f"instance {', '.join(sorted(lost))} is gone ({why})")
                decode = rec.decode or rec.reserving
                if decode and decode not in gone and self.machines.get(rec.prefill) in dead_machines:
                    # the transfer that would free decode's blocks died with its machine; nothing can
                    # write into them any more, so decode frees them now
                    self.send(decode, Free(request_id=rec.request_id, reason="prefill machine gone"))
            elif rec.pull_from in gone:  # its lender: the transfer copies nothing (and forgets the lend)
                self.send(self.transfer_of(rec.prefill), LentBlocks(request_id=rec.request_id, instance=rec.pull_from,
                                                                    held_ids=[]))
        for name in gone:
            self.stats.pop(name, None)
            self.ledger.forget(name)
            self.liveness.left(name)
        self.roles = {n: role for n, (role, _) in live.items()}
        self.machines = {n: machine for n, (_, machine) in live.items()}
        self._pump()

    def _on_ProcessDown(self, msg: ProcessDown) -> None:
        """The launcher saw a local process die (it restarts it)."""
        self._out(msg.name, msg.role, f"{msg.name} died: {msg.detail}" if msg.detail else f"{msg.name} died")

    def _out(self, name: str, role: str, why: str, frozen: bool = False) -> None:
        """`name` is out, dead or `frozen` (silent): an engine leaves routing until it is back; every
        request that needed it, or the dead transfer's copies, fails now and each surviving holder frees;
        a dead front-end's requests have no client left, so they are aborted."""
        if role == "api":
            for rec in list(self.live.values()):
                self._end(rec, State.ABORTED, "scheduler", why)
        elif role == "transfer":
            self.liveness.went_down(name, role, "", frozen)  # meanwhile prompts are computed on their decode instance
            for rec in list(self.live.values()):
                if rec.pull_blocks and self.transfer_of(rec.prefill) == name:
                    if not rec.prefill_done:  # no pull into its prefill instance's blocks will come: computed there
                        self.send(rec.prefill, Pulled(request_id=rec.request_id, blocks=0))
                    if rec.pull_from:  # ... nor read the lender's (which the dead transfer may never have returned)
                        self.send(rec.pull_from, ReturnBlocks(request_id=rec.request_id))
            for rec in list(self.live.values()):
                decode = rec.decode or rec.reserving
                if rec.prefill and decode and self.transfer_of(rec.prefill) == name \
                        and STAGE.get(rec.state, len(STAGE)) < STAGE[State.DECODING]:
                    self._end(rec, State.FAILED, "scheduler", why)
                    # no process writes into decode's blocks any more: decode frees them now
                    self.send(decode, Free(request_id=rec.request_id, reason=why))
        elif name in self.roles:
            self.liveness.went_down(name, self.roles[name], self.machines.get(name, ""), frozen)
            live = {n: (r, self.machines.get(n, "")) for n, r in self.roles.items() if n != name}
            self.update_instances(live, why=why)
        elif not frozen and self.liveness.is_frozen(name):  # frozen, then died: the launcher brings it back
            was = self.liveness.down[name]
            self.liveness.went_down(name, was.role, was.machine)

    def _on_ProcessUp(self, msg: ProcessUp) -> None:
        """A restarted engine or transfer is ready."""
        self._back(msg.name)

    def _back(self, name: str) -> None:
        """`name` is back (restarted, or beating again after a freeze): an engine rejoins routing (its
        stats restore its room); a transfer takes prompts for prefill instances again."""
        was = self.liveness.came_up(name)
        if was is not None and was.role != "transfer":
            self.roles[name], self.machines[name] = was.role, was.machine
        self._pump()

    def _heard(self, name: str) -> None:
        """`name` is a process, or a rank > 0 of an instance ("decode-0.rank1"), which speaks for it."""
        back = self.liveness.beat(name)
        if back is not None:
            self._back(back)

    def _role_of(self, instance: str) -> str:
        stats = self.stats.get(instance)
        return stats.role if stats else self.roles.get(instance, "")

    # ---- messages ----------------------------------------------------------------------------
    def _on_AbortRequest(self, msg: AbortRequest) -> None:
        rec = self.live.get(msg.request_id)
        if rec is not None:  # a stop string is a normal finish that only the front-end can see
            state = State.FINISHED if msg.reason == "stop" else State.ABORTED
            self._end(rec, state, "api", "stop string" if msg.reason == "stop" else msg.reason)

    def _on_Freed(self, msg: Freed) -> None:
        if self.ledger.release(msg.request_id, msg.instance):
            self._pump()

    def _on_KVEvents(self, msg: KVEvents) -> None:
        if self.liveness.is_down(msg.instance):
            return  # the last words of an instance whose cache is forgotten
        for payload in msg.batches:
            self.index.apply(msg.instance, decode_batch(payload))
            if self.publish is not None:
                self.publish(msg.instance, payload)

    def _on_Heartbeat(self, msg: Heartbeat) -> None:
        self._heard(msg.instance)

    def _on_InstanceStats(self, msg: InstanceStats) -> None:
        if msg.instance in self.liveness.heard:  # stats count as a beat from a process that beats
            self._heard(msg.instance)
        if not self.liveness.report(msg.instance):
            return  # the last words of a dead instance, or a restarted one not yet ready
        self.stats[msg.instance] = msg
        if self.roles.get(msg.instance) in ("decode", "prefill") and self.ledger.report(msg):
            self._pump()

    def _on_NewRequest(self, msg: NewRequest) -> None:
        rec = RequestRecord(msg, State.QUEUED, self.clock(), number=next(self._numbers))
        self.live[msg.request_id] = rec
        self._record(rec, State.QUEUED, "api", "")
        if self.of_role("decode"):
            self._enqueue(rec)
        elif self.of_role("mixed"):
            rec.whole = min(self.of_role("mixed"), key=lambda m: self._prefill_load(m, rec))
            self._send_prefill(rec, rec.whole)
        else:
            self._end(rec, State.FAILED, "scheduler", "no decode or mixed instance is serving")

    def _enqueue(self, rec: RequestRecord) -> None:
        rec.queued_at = self.clock()
        self.queue.push(rec.request_id, rec.number)
        self._pump()

    def _pump(self) -> None:
        """Dispatches queued requests, oldest first, while an instance has room for the oldest."""
        while (rid := self.queue.head()) is not None:
            rec = self.live[rid]
            room = self._room_tokens(rec)
            decodes = self.of_role("decode")
            decode = self._best_decode(rec, decodes, room)
            whole = self._whole_on_prefill(rec, room, decode)
            if decode is None and whole is None:
                if self.ledger.never_fits(decodes, room):  # it would hold up the queue for good
                    self._end(rec, State.FAILED, "scheduler", f"needs room for {room} tokens of KV; no decode "
                              "instance has that many (lower max_tokens or routing.reserve_output_share)")
                    continue
                return
            self.queue.remove(rid)
            if whole is not None:
                busy = f"decode busy: steps over {self.routing.decode_busy_ms:g} ms"
                self._place_whole(rec, whole, room, busy if decode else "no room on decode")
                continue
            assert decode is not None  # whole is None, and with both None the loop returned
            if rec.prefill:  # refused by a decode instance earlier: its prompt is computed or computing
                self._reserve(rec, decode, room, "again")
            else:
                local, why = self._prefill_locally(rec, decode)
                if local:
                    self._place_whole(rec, decode, room, why)
                else:
                    self._reserve(rec, decode, room, why)

    def _place_whole(self, rec: RequestRecord, instance: str, room: int, why: str) -> None:
        """The request runs whole on `instance`, prompt and output, as on a colocated engine: its decode
        instance (conditional disaggregation) or a prefill instance (decode busy)."""
        rec.whole = instance
        self._commit(rec, instance, room, computes_last=True)
        on_decode = self.roles.get(instance) == "decode"
        self.decisions["local" if on_decode else "whole"] += 1
        where = f"prefill on {instance} itself" if on_decode else f"prompt and output on {instance}"
        self._record(rec, State.QUEUED, "scheduler", f"{where} ({why})")
        self._send_prefill(rec, instance)

    def _whole_on_prefill(self, rec: RequestRecord, room: int, decode: str | None) -> str | None:
        """A prefill instance to run the request whole when every decode instance is busy (its recent
        steps longer than routing.decode_busy_ms) or has no room; None otherwise."""
        limit = self.routing.decode_busy_ms
        if not limit or rec.prefill:
            return None
        if decode is not None:
            s = self.stats.get(decode)
            if s is None or s.step_seconds * 1e3 <= limit:
                return None
        prefills = [p for p in self.of_role("prefill") if self._fits(rec, p, room)]
        return min(prefills, key=lambda p: self._prefill_load(p, rec)) if prefills else None

    def _room_tokens(self, rec: RequestRecord) -> int:
        return rec.num_prompt_tokens + self.routing.output_room(rec.request.params.max_tokens)

    def _prefill_locally(self, rec: RequestRecord, decode: str) -> tuple[bool, str]:
        """Conditional disaggregation: compute the prompt on its decode instance when it is short, or
        when the prefill queue's expected wait exceeds the prompt's cost on the decode instance."""
        if not self.of_role("prefill"):
            return True, "no prefill instance"
        prefills = self._pairing(decode)
        if not prefills:
            return True, f"no prefill instance computes KV {decode} can take (its weights or KV dtype differ)"
        if self.liveness.is_down(self.transfer_of(decode)):
            return True, f"{self.transfer_of(decode)} is restarting"
        n = rec.num_prompt_tokens
        if self.routing.disaggregation == "always":
            return False, "always disaggregated"
        if n <= self.routing.local_prompt_tokens:
            return True, f"{n} tokens <= {self.routing.local_prompt_tokens}"
        held = self._hit_tokens(rec, decode, computes_last=True)
        if held and n - held <= self.routing.local_prompt_tokens:  # a follow-up turn: decode holds its history
            return True, f"{decode} holds {held} of its {n} tokens: {n - held} to compute <= " \
                         f"{self.routing.local_prompt_tokens}"
        if not self.routing.local_on_backlog:
            return False, ""
        prefill = min(prefills, key=lambda p: self._prefill_load(p, rec))
        wait = self._queue_seconds(prefill)
        local = self._local_prefill_seconds(decode, n)
        if local < wait:
            return True, f"{prefill}'s queue: {wait * 1e3:.0f} ms; here: {local * 1e3:.0f} ms"
        return False, f"{prefill}'s queue: {wait * 1e3:.0f} ms" if wait else ""

    def _pairing(self, decode: str) -> list[str]:
        """The prefill instances whose KV `decode` can take: the same weight quantization and KV dtype (by
        their stats; an instance not heard from yet is taken to match). A pair that differs is logged once;
        its prompts are computed on the decode instance instead of failing at their first copy."""
        def kinds(name: str) -> tuple[str, str] | None:
            s = self.stats.get(name)
            return (s.weights, s.kv_dtype) if s is not None and s.kv_dtype else None

        mine = kinds(decode)
        pairs = []
        for prefill in self.of_role("prefill"):
            theirs = kinds(prefill)
            if mine is None or theirs is None or mine == theirs:
                pairs.append(prefill)
            elif (prefill, decode) not in self._unpaired:
                self._unpaired.add((prefill, decode))
                log.error("scheduler: %s (weights %s, KV %s) and %s (weights %s, KV %s) cannot exchange KV: %s's "
                          "prompts are computed elsewhere", prefill, theirs[0] or "unquantized", theirs[1], decode,
                          mine[0] or "unquantized", mine[1], decode)
        return pairs

    def _queue_seconds(self, prefill: str) -> float:
        """Expected wait before `prefill` starts a new prompt: the prompt tokens it has not finished, at
        its recent rate (0 while it has no rate yet: an idle instance is never judged slow)."""
        s = self.stats.get(prefill)
        rate = s.prefill_tokens_per_s if s else 0.0
        return self.outstanding_tokens[prefill] / rate if rate else 0.0

    def _local_prefill_seconds(self, decode: str, n: int) -> float:
        """Expected time for `decode` to compute a prompt of `n` tokens after those it already has, at
        `local_step_tokens` a step of its recent step time."""
        s = self.stats.get(decode)
        if not s or not s.step_seconds:
            return float("inf")
        rate = self.routing.local_step_tokens / s.step_seconds
        return (self.outstanding_tokens[decode] + n) / rate

    def _reserve(self, rec: RequestRecord, decode: str, room: int, why: str) -> None:
        """Asks `decode` to hold the request's room and, at the same time, a prefill instance to compute
        its prompt: the ledger has committed the room, so the prompt's KV has somewhere to go, and the
        reservation is off the path to the first token (decode sends the block ids to the transfer)."""
        r = rec.request
        rec.reserving = decode
        self._commit(rec, decode, room, computes_last=False)
        first = not rec.prefill
        if first:
            held = self._held(rec)
            rec.prefill = min(self._pairing(decode), key=lambda p: (  # a tie: the one copying least
                self._prefill_load(p, rec, decode, held), -held[p]))
            self.decisions["remote"] += 1
        self._record(rec, State.QUEUED, "scheduler", f"reserve on {decode}, prefill on {rec.prefill}"
                     + (f" ({why})" if why else ""))
        self.send(decode, Reserve(request_id=r.request_id, prompt_token_ids=r.prompt_token_ids, params=r.params,
                                  transfer=self.transfer_of(rec.prefill), num_tokens=room, cache_salt=r.cache_salt))
        if first:
            source, rec.pull_blocks = self._pull_source(held, decode, rec.prefill)
            if source not in ("", decode):  # another instance lends them for the copy
                rec.pull_from = source
                self.send(source, LendBlocks(request_id=r.request_id, prompt_token_ids=r.prompt_token_ids,
                                             blocks=rec.pull_blocks, transfer=self.transfer_of(rec.prefill),
                                             cache_salt=r.cache_salt))
            self._send_prefill(rec, rec.prefill, decode)

    def _commit(self, rec: RequestRecord, instance: str, room: int, computes_last: bool) -> None:
        """Commits `room` tokens on `instance`, its prompt blocks by hash so that those its cache holds count
        once however many requests share them (not by hash when not routing by cache)."""
        self.ledger.commit(rec.request_id, instance, room, *self._shares(rec, instance, computes_last))

    def _shares(self, rec: RequestRecord, instance: str, computes_last: bool) -> tuple[list[bytes], int, int]:
        """The ledger's view of `rec`'s prompt on `instance`: its block hashes, how many leading ones the
        instance's cache holds, the block size."""
        if self.cache is None:
            return [], 0, 0
        hit = self._hit_tokens(rec, instance, computes_last)
        return rec.hashes or [], hit // self.cache.block_size, self.cache.block_size

    def _need(self, rec: RequestRecord, instance: str, room: int) -> int:
        """The blocks committing `room` tokens of `rec` on `instance` adds (as if it computed its last prompt
        token there: the larger of the two ways it may go)."""
        return self.ledger.cost(instance, room, *self._shares(rec, instance, computes_last=True))

    def _fits(self, rec: RequestRecord, instance: str, room: int) -> bool:
        return self.ledger.room(instance).fits(room, self._need(rec, instance, room))

    def _held(self, rec: RequestRecord) -> dict[str, int]:
        """Leading prompt tokens of `rec` each engine's cache holds that an instance computing the prompt
        reuses (by the KV events), looked up once for all the choices one routing makes."""
        return {n: self._hit_tokens(rec, n, computes_last=True) for n in self.roles}

    def _pull_source(self, held: dict[str, int], decode: str, prefill: str) -> tuple[str, int]:
        """The instance whose cache `prefill` copies leading prompt blocks from rather than computing them
        (a remote hit), and how many: of `decode` (its reservation holds them) and every other engine (which
        would lend them), the one caching most (`held`, see _held), `decode` on a tie, where that is at least
        routing.pull_min_tokens more than `prefill` holds; ("", 0) for none. On one machine a device copy;
        across machines the transfer of prefill's machine reads them."""
        if self.cache is None or not self.routing.remote_hits:
            return "", 0
        enough = held[prefill] + max(1, self.routing.pull_min_tokens)
        best, most = "", 0
        for source in [decode, *(n for n in held if n not in (decode, prefill))]:
            if held[source] >= enough and held[source] > most:
                best, most = source, held[source]
        return best, most // self.cache.block_size

    def _prefill_load(self, name: str, rec: RequestRecord, decode: str = "", held: dict[str, int] | None = None
                      ) -> int:
        """Prompt tokens `name` computes before `rec`'s is done: those it has not finished and the part
        of `rec`'s neither its cache holds nor it would copy (given `decode` and `held`, see _held) from
        another's (a remote hit)."""
        own = held[name] if held is not None else self._hit_tokens(rec, name, computes_last=True)
        if decode and held is not None and self.cache is not None:
            own = max(own, self._pull_source(held, decode, name)[1] * self.cache.block_size)
        return self.outstanding_tokens[name] + rec.num_prompt_tokens - own

    def _hit_tokens(self, rec: RequestRecord, instance: str, computes_last: bool) -> int:
        """Leading prompt tokens of `rec` whose KV `instance`'s cache holds (by its KV events) and it may
        reuse (one computing the prompt keeps its last token to compute); 0 when not routing by cache."""
        if self.cache is None:
            return 0
        bs = self.cache.block_size
        if rec.hashes is None:
            rec.hashes = block_hashes(rec.request.prompt_token_ids, bs, self.cache.root(rec.request.cache_salt))
        return bs * self.index.hit_blocks(instance, rec.hashes, reusable_blocks(rec.num_prompt_tokens, bs,
                                                                                computes_last))

    def _best_decode(self, rec: RequestRecord, decodes: list[str], room: int) -> str | None:
        """The decode instance to hold the request: of those with room, the one whose cache holds most of
        its prompt (its KV need not move, nor its blocks be taken), unless that one runs far more requests
        than the least busy (by over 64, and 1.5 times: one hot prefix must not pile every request onto one
        instance), and only for a hit of at least routing.cache_min_tokens; else the one with most room."""
        needs = {d: self._need(rec, d, room) for d in decodes}
        fallback = self.ledger.best(decodes, room, needs)
        if fallback is None or self.cache is None:
            return fallback
        fitting = [d for d in decodes if self.ledger.room(d).fits(room, needs[d])]
        hits = {d: self._hit_tokens(rec, d, computes_last=False) for d in fitting}
        best = max(fitting, key=lambda d: (hits[d], self.ledger.room(d).free_blocks, -self.ledger.room(d).seqs))
        busiest, idlest = self.ledger.room(best).seqs, min(self.ledger.room(d).seqs for d in fitting)
        if hits[best] < max(1, self.routing.cache_min_tokens) or (busiest - idlest > 64 and busiest > 1.5 * idlest):
            return fallback
        return best

    def _send_prefill(self, rec: RequestRecord, instance: str, decode: str = "") -> None:
        """The prompt to `instance`: for `decode` to continue, or (none named) to run whole there."""
        self.routed[instance] += 1
        pulled = rec.pull_blocks * self.cache.block_size if self.cache is not None else 0
        rec.prefill_tokens = rec.num_prompt_tokens - max(self._hit_tokens(rec, instance, computes_last=True), pulled)
        self.outstanding_tokens[instance] += rec.prefill_tokens
        r = rec.request
        self.send(instance, Prefill(request_id=r.request_id, prompt_token_ids=r.prompt_token_ids, params=r.params,
                                    decode_instance=decode, cache_salt=r.cache_salt, pull_blocks=rec.pull_blocks,
                                    pull_from=rec.pull_from))

    def _on_Reserved(self, msg: Reserved) -> None:
        rec = self.live.get(msg.request_id)
        if rec is None or rec.reserving != msg.instance:
            return  # ended meanwhile: its end sent the transfer an abort, which frees decode's blocks
        rec.reserving = ""
        if msg.block_ids is None:  # decode had less room than the ledger thought: back in the queue
            self.ledger.refused(rec.request_id)
            self._record(rec, State.QUEUED, msg.instance, f"refused: {msg.free_blocks} blocks free")
            self._enqueue(rec)
            return
        rec.decode = msg.instance
        self.ledger.settle(rec.request_id, msg.cached_blocks)
        self.routed[msg.instance] += 1
        held = f", {msg.cached_blocks} of them cached there (not moved)" if msg.cached_blocks else ""
        self._record(rec, State.RESERVED, msg.instance, f"{len(msg.block_ids)} blocks{held}")

    def _on_StateEvent(self, msg: StateEvent) -> None:
        rec = self.live.get(msg.request_id)
        if rec is None:
            rec = self.recent.get(msg.request_id)
            if rec is not None:  # late news of an ended request: keep it in the trace
                rec.events.append((msg.time, msg.state, msg.instance, msg.detail))
            return
        if msg.state not in (State.QUEUED, State.RESERVED, State.PREFILLING):
            self._prefill_finished(rec)
        if msg.state in ENDED:
            self._end(rec, msg.state, msg.instance, msg.detail, msg.time)
        else:
            self._record(rec, msg.state, msg.instance, msg.detail, msg.time)

    def _prefill_finished(self, rec: RequestRecord) -> None:
        name = rec.prefill or rec.whole
        if name and not rec.prefill_done:
            self.outstanding_tokens[name] -= rec.prefill_tokens
            rec.prefill_done = True

    def _record(self, rec: RequestRecord, state: State, instance: str, detail: str,
                when: float | None = None) -> None:
        when = when or self.clock()
        bisect.insort(rec.events, (when, state, instance, detail), key=lambda e: e[0])  # senders may cross
        if STAGE.get(state, len(STAGE)) > STAGE.get(rec.state, -1):  # states only move forward
            # deadlines run on this clock: the event's time may come from another machine's
            rec.state, rec.since = state, self.clock()

    # ---- the one way out: finish, abort or fail ---------------------------------------------
    def _end(self, rec: RequestRecord, state: State, instance: str, detail: str, when: float | None = None) -> None:
        self._record(rec, state, instance, detail, when)
        self._prefill_finished(rec)
        self.queue.remove(rec.request_id)
        del self.live[rec.request_id]
        self.recent[rec.request_id] = rec
        while len(self.recent) > self.history:
            self.recent.popitem(last=False)
        self.ended[state] += 1
        rid = rec.request_id
        if state == State.FAILED:
            status = _failure_status(detail) if instance == "scheduler" else 0
            self.send("api", EngineOutput(request_id=rid, token_ids=[], finish_reason="error",
                                          error=detail or "failed", status=status))
        # Every holder frees, except one that reported the finish itself. Decode blocks are freed
        # through the transfer process, after it has stopped writing into them.
        if state != State.FINISHED or instance == "api":
            for holder in {rec.prefill, rec.whole} - {""}:
                self.send(holder, Free(request_id=rid, reason=detail or state.lower()))
        decode = rec.decode or rec.reserving
        if (decode or rec.prefill) and (state != State.FINISHED or instance != decode):
            # the transfer process that writes into the decode blocks (the prefill machine's) drops the
            # job, then frees decode's blocks
            self.send(self.transfer_of(rec.prefill or decode),
                      AbortTransfer(request_id=rid, decode_instance=decode, reason=detail or state.lower()))
        # Its room on decode is free once decode has freed its blocks: now if decode finished it,
        # else when decode says `Freed` (the Free above reaches it after the transfer stopped).
        if state == State.FINISHED and instance in (rec.decode, rec.whole) and self.ledger.release(rid):
            self._pump()

    def tick(self) -> None:
        """Fails requests past their state's deadline, and routes around a process that stopped
        reporting (frozen: alive to the launcher, but it serves nothing)."""
        now = self.clock()
        for instance, role, detail in self.liveness.newly_silent(self._role_of):
            self._out(instance, role, f"{instance} stopped reporting: {detail}", frozen=True)
        for rec in list(self.live.values()):
            deadline = getattr(self.deadlines, rec.state.lower(), None)
            if deadline is not None and now - rec.since > deadline:
                self._end(rec, State.FAILED, "scheduler",
                          f"deadline: {rec.state} for more than {deadline:g} s")

    # ---- inspection --------------------------------------------------------------------------
    def snapshot(self) -> dict:
        states = Counter(r.state for r in self.live.values())
        per_instance: dict[str, Counter] = {n: Counter() for n in self.roles}
        for r in self.live.values():
            for name in {r.prefill, r.decode, r.whole, r.reserving} - {""}:
                per_instance.setdefault(name, Counter())[r.state] += 1
        now, down, reported = self.clock(), self.liveness.down, self.liveness.reported
        return {
            "time": now,
            "states": {s: states.get(s, 0) for s in STATES[:5]},
            "ended": dict(self.ended),
            "instances": {name: {"role": role, "machine": self.machines.get(name, ""),
                                 "requests": dict(per_instance.get(name, {})),
                                 "routed": self.routed[name],
                                 "ready": self.liveness.ready(name),
                                 "stats": _stats_dict(self.stats.get(name)),
                                 "stats_age_s": now - reported[name] if name in reported else None}
                          for name, role in {**self.roles, **{n: d.role for n, d in down.items()
                                                              if d.role != "transfer"}}.items()},
            "transfers": {n: _stats_dict(st) for n, st in self.stats.items() if st.role == "transfer"},
            "api": _stats_dict(self.stats.get("api")),
            "admission": self._admission_snapshot(),
            "down": {name: d.role for name, d in down.items()},  # dead (being restarted) or frozen
            # what /health asks: instances that take requests to the end now (reported since they came up)
            "serving": sorted(n for n, r in self.roles.items() if r in ("decode", "mixed") and self.liveness.ready(n)),
        }

    def _admission_snapshot(self) -> dict:
        head = self.queue.head()
        now = self.clock()
        return {"queued": len(self.queue),
                "oldest_wait_s": now - self.live[head].queued_at if head else 0.0,
                "prefill_decisions": dict(self.decisions),
                "decode_room": {name: {"committed_blocks": room.blocks, "num_blocks": room.num_blocks,
                                       "requests": room.seqs, "max_num_seqs": room.max_num_seqs,
                                       "blocked": room.blocked}
                                for name, room in self.ledger.rooms.items() if name in self.roles}}

    def trace(self, request_id: str) -> dict | None:
        rec = self.live.get(request_id) or self.recent.get(request_id)
        if rec is None:
            return None
        return {"request_id": request_id, "state": rec.state, "prompt_tokens": len(rec.request.prompt_token_ids),
                "prefill": rec.prefill or rec.whole, "decode": rec.decode or rec.whole,
                "arrival": rec.request.arrival,
                "events": [list(e) for e in sorted(rec.events, key=lambda e: e[0])]}


def _failure_status(detail: str) -> int:
    """The HTTP status of a request the scheduler failed: a deadline is a timeout, a request no decode
    instance could ever hold the client's to fix, anything else an instance that is not there."""
    if detail.startswith("deadline"):
        return 504
    return 400 if detail.startswith("needs room") else 503


def _stats_dict(stats: InstanceStats | None) -> dict:
    return msgspec.structs.asdict(stats) if stats is not None else {}
