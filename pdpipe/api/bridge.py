"""The front-end's side of the wires: requests out to the scheduler, token streams in from the
engines (reordered by index, since the first token comes from prefill and the rest from decode),
and control queries to the scheduler."""
from __future__ import annotations

import asyncio
import logging
import time

from pdpipe.api.protocol import APIError
from pdpipe.messages import (
    AbortRequest,
    ControlRequest,
    EngineOutput,
    InstanceStats,
    NewRequest,
    ProcessDown,
    SamplingParams,
)
from pdpipe.wire import AsyncWires, RunPaths

log = logging.getLogger("pdpipe")


class TokenStream:
    """One request's outputs in order. Error outputs (token-less) pass at once. `gap_since` is when
    outputs started waiting for a missing earlier one (None while none waits)."""

    def __init__(self, clock=time.monotonic) -> None:
        self.queue: asyncio.Queue[EngineOutput] = asyncio.Queue()
        self._next = 0
        self._early: dict[int, EngineOutput] = {}
        self.clock = clock
        self.gap_since: float | None = None

    def put(self, out: EngineOutput) -> None:
        if not out.token_ids or out.index == self._next:
            before = self._next
            self._emit(out)
            while self._next in self._early:
                self._emit(self._early.pop(self._next))
            if not self._early:
                self.gap_since = None
            elif self._next != before:  # progress: what waits now waits for a new gap, timed from now
                self.gap_since = self.clock()
        elif out.index > self._next:
            self._early[out.index] = out
            if self.gap_since is None:
                self.gap_since = self.clock()

    @property
    def missing(self) -> int:
        """The index of the output the stream waits for."""
        return self._next

    def _emit(self, out: EngineOutput) -> None:
        self._next = out.index + len(out.token_ids) if out.token_ids else self._next
        self.queue.put_nowait(out)


class Bridge:
    def __init__(self, paths: RunPaths, name: str = "api", token_gap: float = 10.0):
        self.paths, self.token_gap = paths, token_gap
        self.wires = AsyncWires(paths, name)
        self.streams: dict[str, TokenStream] = {}
        self.waiting: dict[str, int] = {}  # requests with no token yet → their prompt tokens
        self.waiting_tokens = 0
        self._tasks: list[asyncio.Task] = []

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(self._read()), loop.create_task(self.report())]

    async def _read(self) -> None:
        while True:
            msg = await self.wires.recv()
            if isinstance(msg, ProcessDown):  # the scheduler died: what it knew of our requests is gone
                self.fail_all(f"{msg.name} died ({msg.detail}); the request was lost, retry it")
                continue
            stream = self.streams.get(getattr(msg, "request_id", ""))
            if isinstance(msg, EngineOutput) and stream is not None:
                if msg.token_ids or msg.finish_reason is not None:
                    self._not_waiting(msg.request_id)
                stream.put(msg)

    def _not_waiting(self, request_id: str) -> None:
        self.waiting_tokens -= self.waiting.pop(request_id, 0)

    def fail_all(self, reason: str, status: int = 503) -> None:
        """Ends every open stream with an error (its client sees an error event, then [DONE])."""
        for rid, stream in list(self.streams.items()):
            stream.put(EngineOutput(request_id=rid, token_ids=[], finish_reason="error", error=reason,
                                    status=status))

    async def submit(self, request_id: str, prompt: list[int], params: SamplingParams,
                     arrival: float, cache_salt: str = "") -> TokenStream:
        stream = self.streams[request_id] = TokenStream()
        self.waiting[request_id] = len(prompt)
        self.waiting_tokens += len(prompt)
        if not self.wires.send(NewRequest(request_id=request_id, prompt_token_ids=prompt, params=params,
                                          arrival=arrival, cache_salt=cache_salt)):
            self.forget(request_id)
            raise APIError(503, "the scheduler is not taking requests (its inbox is full); retry shortly",
                           type_="service_unavailable", code="scheduler_unavailable", headers={"Retry-After": "1"})
        return stream

    async def abort(self, request_id: str, reason: str) -> None:
        self.streams.pop(request_id, None)
        self._not_waiting(request_id)
        self.wires.send(AbortRequest(request_id=request_id, reason=reason))

    async def report(self, period: float = 0.5) -> None:
        """Tells the scheduler how many requests this front-end has open (for `pdpipe queues`), and
        ends the streams stalled on a lost output."""
        while True:
            self.wires.send(InstanceStats(instance="api", role="api", time=time.time(), running=len(self.streams)))
            await self.end_stalled()
            await asyncio.sleep(period)

    async def end_stalled(self) -> None:
        """A stream whose later outputs have waited `token_gap` seconds for a missing one (lost between
        machines) ends with an error, and its request is aborted: it would never go on."""
        now = time.monotonic()
        for rid, stream in list(self.streams.items()):
            if stream.gap_since is not None and now - stream.gap_since > self.token_gap:
                reason = f"output {stream.missing} never arrived ({self.token_gap:g} s); the request was stopped"
                log.warning("api: %s: %s", rid, reason)
                stream.put(EngineOutput(request_id=rid, token_ids=[], finish_reason="error", error=reason,
                                        status=502))
                await self.abort(rid, reason)

    def forget(self, request_id: str) -> None:
        self.streams.pop(request_id, None)
        self._not_waiting(request_id)

    async def control(self, op: str, timeout: float = 2.0, **kwargs) -> dict | None:
        """A control query to the scheduler; None if it does not answer within `timeout`."""
        return await self.wires.control(ControlRequest(op=op, **kwargs), timeout)

    def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        self.wires.close()
