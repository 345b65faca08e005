"""The ZeroMQ edge: a SenderThread keeps each peer's messages in the order given and holds a fenced
message (and everything after it) until its fence completes. A run's names: the shared-memory pools
of a launch whose launcher was killed are swept, and nothing else."""
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import zmq
import zmq.asyncio

from pdpipe.messages import LayersReady, SamplingParams, decode
from pdpipe.wire import PID_FILE, RunPaths, SenderThread, claim_run, launcher_of, sweep_ended_runs


@pytest.fixture
def wired(tmp_path):
    """(the transfer's inbox socket, a SenderThread), torn down after the test."""
    ctx = zmq.Context()
    paths = RunPaths(tmp_path)
    inbox = ctx.socket(zmq.PULL)
    inbox.bind(paths.inbox("transfer"))
    sender = SenderThread(ctx, paths)
    yield inbox, sender
    sender.close()
    inbox.close()
    ctx.term()


class Gate:
    """A fence that completes when the test opens it."""

    def __init__(self):
        self.opened = threading.Event()
        self.waited = threading.Event()

    def synchronize(self):
        self.waited.set()
        self.opened.wait()


def test_sender_thread_holds_messages_behind_a_fence_and_keeps_order(wired):
    inbox, sender = wired
    gate = Gate()
    sender.send("transfer", LayersReady(request_ids=["a"], layer=0))
    sender.send("transfer", LayersReady(request_ids=["a"], layer=1), after=gate)
    sender.send("transfer", LayersReady(request_ids=["a"], layer=2))
    assert decode(inbox.recv()).layer == 0
    assert gate.waited.wait(10)
    assert inbox.poll(200) == 0  # layer 1 waits for its fence, and layer 2 behind it
    gate.opened.set()
    assert [decode(inbox.recv()).layer for _ in range(2)] == [1, 2]


def test_a_failing_fence_still_lets_the_message_go(wired):
    class Broken:
        def synchronize(self):
            raise RuntimeError("device lost")

    inbox, sender = wired
    sender.send("transfer", LayersReady(request_ids=["a"], layer=3), after=Broken())
    assert inbox.poll(10_000) and decode(inbox.recv()).layer == 3


def test_a_stream_stalled_on_a_lost_output_ends_and_its_request_is_aborted(tmp_path):
    """Outputs 1 and 2 came, output 0 never does (lost between machines): past the token-gap deadline
    the stream gets an error output and the scheduler an abort; a stream whose gap filled in time, and
    one merely waiting for its first token, are left alone."""
    import asyncio

    from pdpipe.api.bridge import Bridge
    from pdpipe.messages import AbortRequest, EngineOutput

    async def scenario():
        paths = RunPaths(tmp_path)
        scheduler = zmq.asyncio.Context.instance().socket(zmq.PULL)
        scheduler.bind(paths.inbox("scheduler"))
        bridge = Bridge(paths, token_gap=5.0)
        params = SamplingParams(max_tokens=8)
        lost, healed, quiet = [await bridge.submit(r, [1, 2], params, 0.0) for r in ("lost", "healed", "quiet")]
        for rid, stream in (("lost", lost), ("healed", healed)):
            stream.put(EngineOutput(request_id=rid, token_ids=[5], index=1))
            stream.put(EngineOutput(request_id=rid, token_ids=[6], index=2))
        healed.put(EngineOutput(request_id="healed", token_ids=[4], index=0))
        assert lost.gap_since is not None and healed.gap_since is None and quiet.gap_since is None
        await bridge.end_stalled()
        assert lost.queue.empty()  # within the deadline
        lost.gap_since -= 6.0
        await bridge.end_stalled()
        out = lost.queue.get_nowait()
        assert out.finish_reason == "error" and "output 0 never arrived" in out.error and out.status == 502
        assert set(bridge.streams) == {"healed", "quiet"} and healed.queue.qsize() == 3
        received = [decode(await scheduler.recv()) for _ in range(4)]
        assert [type(m).__name__ for m in received][-1] == "AbortRequest"
        assert isinstance(received[-1], AbortRequest) and received[-1].request_id == "lost"
        scheduler.close()
        bridge.close()

    asyncio.run(scenario())


def test_a_peer_that_stops_reading_costs_bounded_memory_and_never_blocks_the_sender(tmp_path):
    """The peer's inbox is bound but never read (a frozen process): sends go on at once, at most about
    `hwm` messages (plus what the socket buffers hold) wait for it, the rest are dropped and counted;
    when it reads again it gets what was kept, in order."""
    from pdpipe.messages import Heartbeat
    from pdpipe.wire import Outboxes

    ctx = zmq.Context()
    paths = RunPaths(tmp_path)
    inbox = ctx.socket(zmq.PULL)
    inbox.setsockopt(zmq.RCVHWM, 50)
    inbox.bind(paths.inbox("frozen"))
    out = Outboxes(ctx, paths, hwm=50)
    for i in range(20_000):  # a blocking send would hang here
        out.send("frozen", Heartbeat(instance=f"beat-{i}", role="decode"))
    got = []
    while inbox.poll(200):
        got.append(decode(inbox.recv()).instance)
    numbers = [int(name.split("-")[1]) for name in got]
    assert 0 < len(got) < 5_000 and numbers == sorted(numbers) and numbers[:50] == list(range(50))
    assert out.dropped["frozen"] == 20_000 - len(got)
    out.close()
    inbox.close()
    ctx.term()


def test_a_scheduler_that_stopped_reading_gets_new_requests_refused_not_hung(tmp_path, monkeypatch):
    """The front-end never waits on the scheduler's inbox: once it holds the bound, a new request is
    refused with 503 at once (the handler used to hang), and nothing of it stays open."""
    import asyncio

    from pdpipe import wire
    from pdpipe.api.bridge import Bridge
    from pdpipe.api.protocol import APIError

    monkeypatch.setattr(wire, "SEND_HWM", 5)

    async def scenario():
        bridge = Bridge(RunPaths(tmp_path))  # no scheduler reads its inbox
        params = SamplingParams(max_tokens=4)
        with pytest.raises(APIError) as refused:
            for i in range(100):
                await asyncio.wait_for(bridge.submit(f"r{i}", [1, 2], params, 0.0), timeout=1)
        kept = len(bridge.streams)
        assert refused.value.status == 503
        assert "scheduler" in str(refused.value.body())
        assert 5 <= kept < 100
        assert "r" + str(kept) not in bridge.streams
        bridge.close()

    asyncio.run(scenario())


def _ended_pid() -> int:
    """The pid of a process that has come and gone (waited for)."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_a_launch_sweeps_the_pools_of_killed_launchers_and_nothing_else(tmp_path):
    """Pools are traced to their launch by the run tag in their name (a live link named after it leads
    to the run directory and its pid file): those of a launcher that is gone (its pid ended, or taken by
    a later process, or its run directory deleted) are removed with their link; those of a live launcher
    (one holding its pid file's lock, or an unlocked pid file naming a process that started before it
    was written), those that cannot be traced and unrelated files stay."""
    live_dir, shm_dir = tmp_path / "live", tmp_path / "shm"
    live_dir.mkdir()
    shm_dir.mkdir()
    reused = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE)

    def run(name: str, pid: int | None, written_s_ago: float = 0.0) -> tuple[Path, list[Path]]:
        run_dir = tmp_path / name
        run_dir.mkdir()
        if pid is not None:
            (run_dir / PID_FILE).write_text(str(pid))
            os.utime(run_dir / PID_FILE, (time.time() - written_s_ago,) * 2)
        tag = RunPaths(run_dir).tag
        (live_dir / tag).symlink_to(run_dir)
        pools = [shm_dir / f"pdpipe-{tag}-{process}.kv" for process in ("prefill-0", "decode-0.rank1")]
        for pool in pools:
            pool.write_bytes(bytes(64))
        return run_dir, pools

    try:
        _, killed = run("killed", _ended_pid())
        _, taken = run("taken", reused.pid, written_s_ago=3600)  # its pid now names a newer process
        gone_dir, gone = run("gone", os.getpid())
        for path in gone_dir.iterdir():
            path.unlink()
        gone_dir.rmdir()
        _, older = run("older", os.getpid())  # this process started before the file: an unlocked launcher
        locked_dir, locked = run("locked", None)
        claim = claim_run(locked_dir)
        os.utime(locked_dir / PID_FILE, (time.time() - 3600,) * 2)  # the lock alone says it runs
        untraced = shm_dir / "pdpipe-0123456789-decode-0.kv"
        unrelated = [shm_dir / "PostgreSQL.1234", shm_dir / "pdpipe-notes.kv", untraced]
        for path in unrelated:
            path.write_bytes(b"x")

        assert launcher_of(locked_dir) == os.getpid() and launcher_of(tmp_path / "older") == os.getpid()
        swept = sweep_ended_runs(live_dir, shm_dir)
        assert sorted(swept) == sorted(killed + taken + gone)
        assert not any(p.exists() for p in killed + taken + gone)
        assert all(p.exists() for p in older + locked + unrelated)
        assert sorted(link.name for link in live_dir.iterdir()) == sorted(
            RunPaths(tmp_path / name).tag for name in ("older", "locked"))
        claim.close()  # the launcher ends: its pool goes with the next sweep
        (tmp_path / "older" / PID_FILE).write_text(str(_ended_pid()))
        assert sorted(sweep_ended_runs(live_dir, shm_dir)) == sorted(older + locked)
        assert all(p.exists() for p in unrelated)
    finally:
        reused.communicate(b"")
