"""Each request's TTFT split by pipeline stage, from the scheduler's trace of it.

A trace is {"arrival": t, "events": [[time, state, instance, detail], ...]} in time order (see
`SchedulerCore.trace`); every time is time.time() on this machine, as is the client's send time.
Milestones on the path to the first token, in order:
  sent           the client sent the request
  arrival        the front-end received the request
  queued         the first QUEUED event (the scheduler took it)
  dispatched     the first dispatch: the QUEUED event whose detail says where the prompt went
                 ("reserve on D, prefill on P", "prefill on D itself", "prompt and output on P"); a
                 request refused by decode is dispatched again ("refused: ...", then "... (again)"),
                 but its prompt went to prefill the first time. Without one (a mixed instance takes
                 the prompt on arrival) it is `queued`.
  prefilling     the first PREFILLING
  prefill_end    the first TRANSFERRING "prefill end" after it (prefill engine), else the first
                 DECODING or FINISHED (a colocated engine)
  first_token    the client saw the first token
The path's stages run from each milestone to the next, so they sum to the client's TTFT. A stage's
end is taken no later than the next stage's start: each event is stamped by the process reporting it.

Off the path: the scheduler sends Reserve (to decode) and Prefill (to prefill) at the same moment,
so "reservation", dispatched → RESERVED (decode holds the request's blocks; including a refusal and
the wait for room after it), runs beside the prefill and may end after PREFILLING. It is present only
where a decode instance reserved, and is not part of the TTFT sum.
"""
from __future__ import annotations

from .metrics import distribution_ms

# stage name → (from milestone, to milestone); the path's stages sum to TTFT, the others run beside it
PATH_STAGES = {
    "client→api": ("sent", "arrival"),
    "api→scheduler": ("arrival", "queued"),
    "scheduler queue": ("queued", "dispatched"),
    "prefill queue": ("dispatched", "prefilling"),
    "prefill compute": ("prefilling", "prefill_end"),
    "first-token delivery": ("prefill_end", "first_token"),
}
OFF_PATH_STAGES = {"reservation": ("dispatched", "reserved")}
STAGES = {**PATH_STAGES, **OFF_PATH_STAGES}
PATH = ("sent", "arrival", "queued", "dispatched", "prefilling", "prefill_end", "first_token")
DISPATCHES = ("reserve on ", "prefill on ", "prompt and output on ")  # core.py's QUEUED details


def _first(events, start: int, match) -> int | None:
    return next((i for i in range(start, len(events)) if match(events[i])), None)


def trace_milestones(trace: dict) -> dict[str, float]:
    """The milestones present in a trace (see the module doc), by name → time."""
    events = trace.get("events") or []
    found: dict[str, float] = {}
    if trace.get("arrival"):
        found["arrival"] = trace["arrival"]
    queued = _first(events, 0, lambda e: e[1] == "QUEUED")
    if queued is not None:
        dispatched = _first(events, queued, lambda e: e[1] == "QUEUED" and str(e[3]).startswith(DISPATCHES))
        found["queued"] = events[queued][0]
        found["dispatched"] = events[queued if dispatched is None else dispatched][0]
    reserved = _first(events, 0, lambda e: e[1] == "RESERVED")
    if reserved is not None:
        found["reserved"] = events[reserved][0]
    prefilling = _first(events, 0, lambda e: e[1] == "PREFILLING")
    if prefilling is None:
        return found
    found["prefilling"] = events[prefilling][0]
    end = _first(events, prefilling, lambda e: e[1] == "TRANSFERRING" and e[3] == "prefill end")
    if end is None:
        end = _first(events, prefilling, lambda e: e[1] in ("DECODING", "FINISHED"))
    if end is not None:
        found["prefill_end"] = events[end][0]
    return found


def ttft_split(trace: dict, sent_at: float, first_token_at: float) -> dict[str, float]:
    """Seconds per stage from the client's send to its first token (both time.time()): the path's
    stages, which sum to TTFT where every milestone is there (a stage whose milestones are missing is
    left out), and the reservation beside them where decode reserved."""
    times = {"sent": sent_at, **trace_milestones(trace), "first_token": first_token_at}
    later = first_token_at
    for name in reversed(PATH):  # a stage ends no later than the next one starts
        if name in times:
            times[name] = later = min(times[name], later)
    split = {stage: times[end] - times[begin] for stage, (begin, end) in PATH_STAGES.items()
             if begin in times and end in times}
    split.update({stage: max(times[end] - times[begin], 0.0) for stage, (begin, end) in OFF_PATH_STAGES.items()
                  if begin in times and end in times})
    return split


def scheduler_request_id(stream_id: str) -> str:
    """The id the scheduler knows: the front-end streams chat chunks as chatcmpl-<hex> for cmpl-<hex>."""
    return "cmpl-" + stream_id[len("chatcmpl-"):] if stream_id.startswith("chatcmpl-") else stream_id


def fetch_traces(run_dir: str, stream_ids: list[str]) -> dict[str, dict]:
    """stream id → trace, for the requests the scheduler still remembers (its last 2000 ended ones)."""
    from pdpipe.inspect import InspectError, control

    traces = {}
    for sid in stream_ids:
        try:
            traces[sid] = control(run_dir, "trace", request_id=scheduler_request_id(sid))
        except InspectError as exc:
            if not str(exc).startswith("no request"):  # no scheduler there at all: say so
                raise
    return traces


def summarize_splits(splits: list[dict[str, float]]) -> dict[str, dict]:
    """Per stage: how many requests had it, and its distribution in ms."""
    out = {}
    for stage in STAGES:
        values = [s[stage] for s in splits if stage in s]
        if values:
            out[stage] = {"requests": len(values), **distribution_ms(values)}
    return out
