"""`pdpipe queues` and `pdpipe trace`: what the processes of a running launch really hold, read from
the scheduler's control socket."""
from __future__ import annotations

import msgspec
import zmq

from pdpipe.messages import ControlRequest
from pdpipe.wire import RunPaths


class InspectError(RuntimeError):
    pass


def control(run_dir: str, op: str, timeout: float = 3.0, **kwargs) -> dict:
    paths = RunPaths(run_dir)
    if not (paths.run_dir / "control.sock").exists():
        raise InspectError(f"no pipeline is running in {run_dir} (no control socket)")
    ctx: zmq.Context = zmq.Context.instance()
    sock = ctx.socket(zmq.REQ)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(paths.control)
    try:
        sock.send(msgspec.json.encode(ControlRequest(op=op, **kwargs)))
        if not sock.poll(int(timeout * 1000)):
            raise InspectError(f"the scheduler in {run_dir} did not answer within {timeout:g} s")
        reply = msgspec.json.decode(sock.recv())
    finally:
        sock.close()
    if isinstance(reply, dict) and "error" in reply:
        raise InspectError(reply["error"])
    return reply


def _row(cells, widths) -> str:
    return "  ".join(str(c).ljust(w) if i == 0 else str(c).rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))


STALE_S = 2.0  # stats come twice a second: older figures are marked


def format_queues(snap: dict) -> str:
    states = snap["states"]
    lines = ["requests: " + "  ".join(f"{s} {n}" for s, n in states.items())
             + "   ended: " + "  ".join(f"{s} {n}" for s, n in sorted(snap["ended"].items()))]
    head = ["process", "role", "inbox", "running", "waiting", "blocks used", "blocks free", "cached", "hit",
            "routed", "requests by state", "weights, KV", "gpu"]
    rows = [head]
    down = snap.get("down") or {}
    for name, inst in snap["instances"].items():
        st = inst["stats"] or {}
        used = st.get("num_blocks", 0) - st.get("free_blocks", 0)
        by_state = " ".join(f"{k}:{v}" for k, v in sorted(inst["requests"].items())) or "-"
        age = inst.get("stats_age_s")
        role = inst["role"] + (" (paused)" if st.get("paused") else "") + (" (down)" if name in down else "")
        if age is not None and age > STALE_S:  # the figures are its last words, not its state now
            role += f" (figures {age:.0f} s old)"
        gpu = (f"{st['gpu_memory_used'] / 2**30:.1f}/{st['gpu_memory_total'] / 2**30:.0f} GiB "
               f"{st['gpu_utilization']}%" if st.get("gpu_utilization", -1) >= 0 else "-")
        queried = st.get("prefix_query_tokens", 0)
        hit = f"{100 * st.get('prefix_hit_tokens', 0) / queried:.0f}%" if queried else "-"
        kinds = f"{st.get('weights') or 'unquantized'}, KV {st['kv_dtype']}" if st.get("kv_dtype") else "-"
        rows.append([name, role, st.get("inbox", "?"), st.get("running", "?"), st.get("waiting", "?"), used,
                     st.get("free_blocks", "?"), st.get("cached_blocks", "-"), hit, inst["routed"], by_state, kinds,
                     gpu])
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(head))]
    lines += [_row(r, widths) for r in rows]
    for name, x in sorted((snap.get("transfers") or {}).items()):
        secs = x.get("seconds_moving", 0.0)
        rate = x.get("bytes_moved", 0) / secs / 1e9 if secs else 0.0
        lines.append(f"{name}: inbox {x.get('inbox', 0)}  in flight {x.get('transfers_in_flight', 0)} "
                     f"({x.get('bytes_in_flight', 0)} bytes)  moved {x.get('bytes_moved', 0)} bytes in "
                     f"{secs:.3f} s ({rate:.2f} GB/s)")
    adm = snap.get("admission") or {}
    if adm:
        rooms = "  ".join(f"{name} {r['committed_blocks']}/{r['num_blocks'] or '?'} blocks, "
                          f"{r['requests']}/{r['max_num_seqs'] or '?'} requests"
                          + (" (refused; waits)" if r["blocked"] else "")
                          for name, r in sorted(adm.get("decode_room", {}).items()))
        decisions = "  ".join(f"{k} {v}" for k, v in sorted(adm.get("prefill_decisions", {}).items())) or "-"
        lines.append(f"admission queue: {adm['queued']} waiting, oldest {adm['oldest_wait_s'] * 1e3:.0f} ms   "
                     f"prompts computed: {decisions}")
        if rooms:
            lines.append(f"room committed: {rooms}")
    api = snap.get("api") or {}
    lines.append(f"api: open requests {api.get('running', '?')}   scheduler: live requests "
                 f"{sum(states.values())}")
    return "\n".join(lines)


def format_trace(trace: dict) -> str:
    events = trace["events"]
    t0 = trace["arrival"] if trace.get("arrival") else (events[0][0] if events else 0.0)
    lines = [f"request {trace['request_id']}  state {trace['state']}  prompt {trace['prompt_tokens']} tokens  "
             f"prefill {trace['prefill'] or '-'}  decode {trace['decode'] or '-'}"]
    prev = t0
    for when, state, instance, detail in events:
        lines.append(f"  +{(when - t0) * 1e3:9.2f} ms  (+{(when - prev) * 1e3:8.2f})  {state:<12} "
                     f"{instance:<10} {detail}")
        prev = when
    return "\n".join(lines)
