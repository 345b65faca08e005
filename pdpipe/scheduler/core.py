"""The scheduler's logic: the table of live requests, routing, deadlines, and the one path by which
aborted and failed requests get every holder to free their blocks.

QUEUED → RESERVED (blocks held on D) → PREFILLING (on P) → TRANSFERRING (layer k of N)
       → DECODING (on D) → FINISHED | ABORTED | FAILED
A mixed instance runs QUEUED → PREFILLING → DECODING → FINISHED in one engine.
Decode instances are picked by free blocks (then fewest running), prefill instances by queued prompt
tokens, both at once: the Reserve names the prefill instance, and decode passes the Prefill on to it
as soon as the blocks are held. A decode instance that cannot reserve is skipped and the request
stays queued until one can.
"""
from __future__ import annotations

import bisect
import time
from collections import Counter, OrderedDict
from dataclasses import dataclass, field
from typing import Callable

import msgspec

from pdpipe.config import DeadlineConfig, transfer_name
from pdpipe.messages import (
    AbortRequest,
    AbortTransfer,
    EngineOutput,
    Free,
    InstanceStats,
    Msg,
    NewRequest,
    Prefill,
    Reserve,
    Reserved,
    StateEvent,
)

STATES = ("QUEUED", "RESERVED", "PREFILLING", "TRANSFERRING", "DECODING", "FINISHED", "ABORTED", "FAILED")
ENDED = ("FINISHED", "ABORTED", "FAILED")
STAGE = {state: i for i, state in enumerate(STATES[:5])}  # an ended state outranks them all
Send = Callable[[str, Msg | EngineOutput], None]


@dataclass
class RequestRecord:
    request: NewRequest
    state: str
    since: float
    prefill: str = ""
    decode: str = ""
    mixed: str = ""
    reserving: str = ""  # decode instance asked, no answer yet
    tried: set[str] = field(default_factory=set)
    retry_at: float = 0.0
    prefill_done: bool = False
    events: list[tuple[float, str, str, str]] = field(default_factory=list)  # time, state, instance, detail

    @property
    def request_id(self) -> str:
        return self.request.request_id


class SchedulerCore:
    def __init__(self, instances: dict[str, str], deadlines: DeadlineConfig, send: Send, clock=time.time,
                 history: int = 2000, machines: dict[str, str] | None = None):
        self.roles = dict(instances)  # instance name → role (prefill | decode | mixed)
        self.machines = dict(machines or {})  # instance name → machine ("" on a single machine)
        self.deadlines = deadlines
        self.send, self.clock = send, clock
        self.live: dict[str, RequestRecord] = {}
        self.recent: OrderedDict[str, RequestRecord] = OrderedDict()
        self.history = history
        self.stats: dict[str, InstanceStats] = {}
        self.routed: Counter[str] = Counter()
        self.outstanding_tokens: Counter[str] = Counter()  # prompt tokens sent to each prefill, not done
        self.ended: Counter[str] = Counter()

    def of_role(self, role: str) -> list[str]:
        return [n for n, r in self.roles.items() if r == role]

    def transfer_of(self, instance: str) -> str:
        return transfer_name(self.machines.get(instance, ""))

    def update_instances(self, live: dict[str, tuple[str, str]]) -> None:
        """The registry's view (name → (role, machine)). Requests on an instance that is gone fail now,
        and every surviving holder frees their blocks."""
        gone = set(self.roles) - set(live)
        for rec in list(self.live.values()):
            lost = gone & {rec.prefill, rec.decode, rec.mixed, rec.reserving}
            if lost:
                self._end(rec, "FAILED", "scheduler",
                          f"instance {', '.join(sorted(lost))} is gone (no heartbeat within the TTL)")
        for name in gone:
            self.stats.pop(name, None)
        self.roles = {n: role for n, (role, _) in live.items()}
        self.machines = {n: machine for n, (_, machine) in live.items()}

    # ---- messages ----------------------------------------------------------------------------
    def handle(self, msg: Msg) -> None:
        if isinstance(msg, NewRequest):
            rec = RequestRecord(msg, "QUEUED", self.clock())
            self.live[msg.request_id] = rec
            self._record(rec, "QUEUED", "api", "")
            self._dispatch(rec)
        elif isinstance(msg, AbortRequest):
            rec = self.live.get(msg.request_id)
            if rec is not None:  # a stop string is a normal finish that only the front-end can see
                state = "FINISHED" if msg.reason == "stop" else "ABORTED"
                self._end(rec, state, "api", "stop string" if msg.reason == "stop" else msg.reason)
        elif isinstance(msg, Reserved):
            self._on_reserved(msg)
        elif isinstance(msg, StateEvent):
            self._on_event(msg)
        elif isinstance(msg, InstanceStats):
            self.stats[msg.instance] = msg
        else:
            raise TypeError(f"scheduler cannot handle {type(msg).__name__}")

    def _dispatch(self, rec: RequestRecord) -> None:
        decodes = [d for d in self.of_role("decode") if d not in rec.tried]
        if self.of_role("decode") and self.of_role("prefill"):
            if decodes:
                decode = max(decodes, key=self._decode_score)
                rec.reserving = decode
                rec.tried.add(decode)
                # the prefill engine is chosen now: decode sends it the Prefill as soon as it has blocks
                rec.prefill = min(self.of_role("prefill"), key=self._prefill_load)
                self.outstanding_tokens[rec.prefill] += len(rec.request.prompt_token_ids)
                self.send(decode, Reserve(request_id=rec.request_id,
                                          prompt_token_ids=rec.request.prompt_token_ids,
                                          params=rec.request.params, prefill_instance=rec.prefill))
            return
        mixed = self.of_role("mixed")
        if mixed:
            rec.mixed = min(mixed, key=self._prefill_load)
            self._send_prefill(rec, rec.mixed, "", [])

    def _decode_score(self, name: str) -> tuple[int, int]:
        s = self.stats.get(name)
        reserving = sum(1 for r in self.live.values() if r.reserving == name)
        return ((s.free_blocks if s else 0) - reserving, -(s.running if s else 0))

    def _prefill_load(self, name: str) -> int:
        return self.outstanding_tokens[name]

    def _send_prefill(self, rec: RequestRecord, prefill: str, decode: str, blocks: list[int]) -> None:
        self.routed[prefill] += 1
        self.outstanding_tokens[prefill] += len(rec.request.prompt_token_ids)
        r = rec.request
        self.send(prefill, Prefill(request_id=r.request_id, prompt_token_ids=r.prompt_token_ids,
                                   params=r.params, decode_instance=decode, decode_block_ids=blocks))

    def _on_reserved(self, msg: Reserved) -> None:
        rec = self.live.get(msg.request_id)
        if rec is None or rec.reserving != msg.instance:
            if msg.block_ids is not None:  # the request ended meanwhile: give the blocks back
                self.send(self.transfer_of(msg.instance),
                          AbortTransfer(request_id=msg.request_id, decode_instance=msg.instance))
                if rec is None and msg.prefill_instance:  # and drop the Prefill decode passed on
                    self.send(msg.prefill_instance, Free(request_id=msg.request_id, reason="ended"))
            return
        rec.reserving = ""
        if msg.block_ids is None:
            self.outstanding_tokens[rec.prefill] -= len(rec.request.prompt_token_ids)
            rec.prefill = ""
            self._dispatch(rec)  # next decode instance, if any is left untried
            if not rec.reserving:
                rec.retry_at = self.clock() + 0.05
            return
        rec.decode = msg.instance
        self.routed[msg.instance] += 1
        self.routed[rec.prefill] += 1
        self._record(rec, "RESERVED", msg.instance, f"{len(msg.block_ids)} blocks")

    def _on_event(self, msg: StateEvent) -> None:
        rec = self.live.get(msg.request_id)
        if rec is None:
            rec = self.recent.get(msg.request_id)
            if rec is not None:  # late news of an ended request: keep it in the trace
                rec.events.append((msg.time, msg.state, msg.instance, msg.detail))
            return
        if msg.state not in ("QUEUED", "RESERVED", "PREFILLING"):
            self._prefill_finished(rec)
        if msg.state in ENDED:
            self._end(rec, msg.state, msg.instance, msg.detail, msg.time)
        else:
            self._record(rec, msg.state, msg.instance, msg.detail, msg.time)

    def _prefill_finished(self, rec: RequestRecord) -> None:
        name = rec.prefill or rec.mixed
        if name and not rec.prefill_done:
            self.outstanding_tokens[name] -= len(rec.request.prompt_token_ids)
            rec.prefill_done = True

    def _record(self, rec: RequestRecord, state: str, instance: str, detail: str,
                when: float | None = None) -> None:
        when = when or self.clock()
        bisect.insort(rec.events, (when, state, instance, detail), key=lambda e: e[0])  # senders may cross
        if STAGE.get(state, len(STAGE)) > STAGE.get(rec.state, -1):  # states only move forward
            rec.state, rec.since = state, when

    # ---- the one way out: finish, abort or fail ---------------------------------------------
    def _end(self, rec: RequestRecord, state: str, instance: str, detail: str, when: float | None = None) -> None:
        self._record(rec, state, instance, detail, when)
        self._prefill_finished(rec)
        del self.live[rec.request_id]
        self.recent[rec.request_id] = rec
        while len(self.recent) > self.history:
            self.recent.popitem(last=False)
        self.ended[state] += 1
        rid = rec.request_id
        if state == "FAILED":
            self.send("api", EngineOutput(request_id=rid, token_ids=[], finish_reason="error",
                                          error=detail or "failed"))
        # Every holder frees, except one that reported the finish itself. Decode blocks are freed
        # through the transfer process, after it has stopped writing into them.
        if state != "FINISHED" or instance == "api":
            for holder in {rec.prefill, rec.mixed} - {""}:
                self.send(holder, Free(request_id=rid, reason=detail or state.lower()))
        decode = rec.decode or rec.reserving
        if decode and (state != "FINISHED" or instance != decode):
            # the transfer process that writes into the decode blocks: the prefill machine's
            self.send(self.transfer_of(rec.prefill or decode),
                      AbortTransfer(request_id=rid, decode_instance=decode, reason=detail or state.lower()))

    def tick(self) -> None:
        """Fails requests past their state's deadline; retries queued requests."""
        now = self.clock()
        for rec in list(self.live.values()):
            limit = getattr(self.deadlines, rec.state.lower(), None)
            if limit is not None and now - rec.since > limit:
                self._end(rec, "FAILED", "scheduler",
                          f"deadline: {rec.state} for more than {limit:g} s")
            elif rec.state == "QUEUED" and not rec.reserving and not rec.mixed and now >= rec.retry_at:
                rec.tried.clear()
                self._dispatch(rec)

    # ---- inspection --------------------------------------------------------------------------
    def snapshot(self) -> dict:
        states = Counter(r.state for r in self.live.values())
        per_instance: dict[str, Counter] = {n: Counter() for n in self.roles}
        for r in self.live.values():
            for name in {r.prefill, r.decode, r.mixed, r.reserving} - {""}:
                per_instance.setdefault(name, Counter())[r.state] += 1
        return {
            "time": self.clock(),
            "states": {s: states.get(s, 0) for s in STATES[:5]},
            "ended": dict(self.ended),
            "instances": {name: {"role": role, "machine": self.machines.get(name, ""),
                                 "requests": dict(per_instance[name]),
                                 "routed": self.routed[name],
                                 "stats": _stats_dict(self.stats.get(name))}
                          for name, role in self.roles.items()},
            "transfers": {n: _stats_dict(st) for n, st in self.stats.items() if st.role == "transfer"},
            "api": _stats_dict(self.stats.get("api")),
        }

    def trace(self, request_id: str) -> dict | None:
        rec = self.live.get(request_id) or self.recent.get(request_id)
        if rec is None:
            return None
        return {"request_id": request_id, "state": rec.state, "prompt_tokens": len(rec.request.prompt_token_ids),
                "prefill": rec.prefill or rec.mixed, "decode": rec.decode or rec.mixed,
                "arrival": rec.request.arrival,
                "events": [list(e) for e in sorted(rec.events, key=lambda e: e[0])]}


def _stats_dict(stats: InstanceStats | None) -> dict:
    return msgspec.structs.asdict(stats) if stats is not None else {}
