"""ZeroMQ at the edge of each process: addresses derived from the run directory, a typed inbox
(PULL, bound by its owner) and outboxes (PUSH, connected to the peers' inboxes). Business code never
touches zmq; it gets messages from a queue and sends through `Outboxes.send(dest, msg)`."""
from __future__ import annotations

import asyncio
import contextlib
import fcntl
import hashlib
import logging
import os
import queue
import re
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

import msgspec
import zmq

from pdpipe.messages import ControlRequest, EngineOutput, Forward, Msg, decode, encode

log = logging.getLogger("pdpipe")


LIVE_DIR = Path(f"/tmp/pdpipe-live-{os.getuid()}")  # a link per running launch (this user's), to its run directory
SHM_DIR = Path("/dev/shm")  # CPU engines' KV pools: pdpipe-<run tag>-<process>.kv
PID_FILE = "launcher.pid"  # in the run directory: the launcher's pid, locked while it runs
_TAG = re.compile(r"[0-9a-f]{10}")
_REUSE_SLACK_S = 5.0  # a pid's process that started this long after the pid file was written is another one


def claim_run(run_dir: Path) -> BinaryIO:
    """Writes this process's pid into the run's pid file and locks it for as long as the returned file
    stays open: the kernel drops the lock however the process ends, so `launcher_of` tells a live
    launcher from a dead one without trusting the pid alone. BlockingIOError: another launcher holds it
    (`launcher_of` itself holds it for an instant: that is waited out)."""
    pid_file = open(Path(run_dir) / PID_FILE, "a+b")  # not emptied before the lock is ours
    deadline = time.monotonic() + 1.0
    while True:
        try:
            fcntl.flock(pid_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except BlockingIOError:
            if time.monotonic() > deadline:
                pid_file.close()
                raise
            time.sleep(0.01)
    pid_file.truncate(0)
    pid_file.write(str(os.getpid()).encode())
    pid_file.flush()
    return pid_file


def launcher_of(run_dir: Path) -> int | None:
    """The pid of the launcher running `run_dir`; None once it has ended. A launcher locks its pid file
    while it runs (`claim_run`); one that holds no lock (of an older pdpipe) counts while its pid names
    a live process that did not start after the file was written (a pid taken again is not it)."""
    try:
        with open(Path(run_dir) / PID_FILE, "rb") as pid_file:
            text = pid_file.read()
            try:
                fcntl.flock(pid_file, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                return int(text) if text.isdigit() else 0  # locked: a launcher runs (writing its pid, if 0)
            return _unlocked_launcher(pid_file, text)
    except OSError:
        return None


def _unlocked_launcher(pid_file: BinaryIO, text: bytes) -> int | None:
    """The pid an unlocked pid file names, if that process still runs and started before the file was
    written; None otherwise."""
    if not text.isdigit():
        return None
    pid, written_s_ago = int(text), time.time() - os.fstat(pid_file.fileno()).st_mtime
    age = _process_age(pid)
    return pid if age is not None and age + _REUSE_SLACK_S >= written_s_ago else None


@contextlib.contextmanager
def _held_if_ended(run_dir: Path) -> Iterator[bool]:
    """Whether the launch of `run_dir` has ended; while the block runs no launcher can claim the run
    (its pid file, where there is one, is held exclusively)."""
    try:
        pid_file = open(Path(run_dir) / PID_FILE, "rb")
    except OSError:
        yield True  # no pid file: no launcher runs there (one claims its pid file before anything else)
        return
    with pid_file:
        try:
            fcntl.flock(pid_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False  # a launcher holds it
            return
        yield _unlocked_launcher(pid_file, pid_file.read()) is None


def _process_age(pid: int) -> float | None:
    """Seconds since process `pid` started; None if there is none (or only its zombie)."""
    try:
        state, *fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        uptime = float(Path("/proc/uptime").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None
    return None if state == "Z" else uptime - int(fields[18]) / os.sysconf("SC_CLK_TCK")


def live_runs() -> list[Path]:
    """Run directories of the launches running on this machine (this user's)."""
    runs = []
    for link in sorted(LIVE_DIR.glob("*")):
        with contextlib.suppress(OSError):
            run_dir = link.readlink()
            if launcher_of(run_dir) is not None:
                runs.append(run_dir)
    return runs


def sweep_ended_runs(live_dir: Path = LIVE_DIR, shm_dir: Path = SHM_DIR) -> list[Path]:
    """Removes the shared-memory pools of this user's launches whose launcher has ended without
    cleaning up (killed), and their links; returns the pools removed. A pool is traced to its launch
    by the run tag in its name (a link in `live_dir` named after it leads to the run directory, whose
    pid file names the launcher): a pool that cannot be traced, or whose launcher runs, is kept."""
    removed = []
    for link in sorted(live_dir.glob("*")):
        try:
            run_dir = link.readlink()
        except OSError:
            continue
        if not _TAG.fullmatch(link.name) or RunPaths(run_dir).tag != link.name:
            continue
        with _held_if_ended(run_dir) as ended:
            if not ended or not link.is_symlink() or link.readlink() != run_dir:  # or a new launch took it
                continue
            for pool in sorted(shm_dir.glob(f"pdpipe-{link.name}-*.kv")):
                with contextlib.suppress(OSError):
                    pool.unlink()
                    removed.append(pool)
            with contextlib.suppress(OSError):
                link.unlink()
    return removed


class RunPaths:
    """Every name a run uses, derived from its run directory: sockets, logs, shared KV pools."""

    def __init__(self, run_dir: Path | str):
        self.run_dir = Path(run_dir)
        self.tag = hashlib.sha1(str(self.run_dir.resolve()).encode()).hexdigest()[:10]

    def inbox(self, name: str) -> str:
        return f"ipc://{self.run_dir / (name + '.sock')}"

    @property
    def control(self) -> str:
        return f"ipc://{self.run_dir / 'control.sock'}"

    @property
    def kv_events(self) -> str:
        """Where the scheduler publishes every engine's KV events (ZeroMQ PUB; kv_events)."""
        return f"ipc://{self.run_dir / 'kv-events.sock'}"

    @property
    def live_link(self) -> Path:
        return LIVE_DIR / self.tag

    def log(self, name: str) -> Path:
        return self.run_dir / "logs" / f"{name}.log"

    def pool(self, name: str) -> Path:
        return SHM_DIR / f"pdpipe-{self.tag}-{name}.kv"

    def socket_files(self) -> list[Path]:
        return sorted(self.run_dir.glob("*.sock"))

    def pool_files(self) -> list[Path]:
        return sorted(SHM_DIR.glob(f"pdpipe-{self.tag}-*.kv"))


SEND_HWM = 200_000  # messages queued for one peer before more are dropped (8 s of a busy decode's tokens)


class Outboxes:
    """PUSH sockets to peers' inboxes, connected on first use. Use from one thread.

    With `local` given (a machine in a cluster), a message for a name not on this machine goes to the
    machine's relay, which puts it on that name's Redis topic.

    A send never blocks: a peer that stopped reading (frozen, or dead and not yet back) has at most
    `hwm` messages queued for it, and what comes beyond is dropped and counted (`dropped`, logged).
    The requests those messages served fail by the heartbeat or their deadline, so memory stays
    bounded and no sender stalls behind one peer."""

    def __init__(self, ctx: zmq.Context, paths: RunPaths, local: set[str] | None = None, hwm: int = SEND_HWM):
        self.ctx, self.paths, self.local, self.hwm = ctx, paths, local, hwm
        self._socks: dict[str, zmq.Socket] = {}
        self.dropped: dict[str, int] = {}

    def send(self, dest: str, msg: Msg | EngineOutput) -> None:
        if self.local is not None and dest not in self.local:
            msg = Forward(dest=dest, payload=encode(msg))
            dest = "relay"
        self.send_raw(dest, encode(msg))

    def send_raw(self, dest: str, payload: bytes) -> None:
        sock = self._socks.get(dest)
        if sock is None:
            sock = self.ctx.socket(zmq.PUSH)
            sock.setsockopt(zmq.LINGER, 1000)
            sock.setsockopt(zmq.SNDHWM, self.hwm)
            sock.connect(self.paths.inbox(dest))
            self._socks[dest] = sock
        try:
            sock.send(payload, zmq.NOBLOCK, copy=False)
        except zmq.Again:
            n = self.dropped[dest] = self.dropped.get(dest, 0) + 1
            if n & (n - 1) == 0:  # the 1st, 2nd, 4th, 8th … drop
                log.error("%s is not reading its inbox (%d messages queued for it): %d dropped so far",
                          dest, self.hwm, n)

    def close(self) -> None:
        for sock in self._socks.values():
            sock.close()
        self._socks.clear()


class SenderThread:
    """Outboxes driven by a thread of their own. `send(dest, msg, after=fence)` returns at once; a
    message given a fence (anything with `.synchronize()`, such as a CUDA event) leaves once the fence
    has completed, and the messages given after it wait their turn, so every peer gets this process's
    messages in the order they were handed over. A prefill engine announces each layer this way while
    it goes on launching the next layers."""

    def __init__(self, ctx: zmq.Context, paths: RunPaths, local: set[str] | None = None):
        self._ctx, self._paths, self._local = ctx, paths, local
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="sender", daemon=True)
        self._thread.start()

    def send(self, dest: str, msg: Msg | EngineOutput, after=None) -> None:
        self._queue.put((dest, msg, after))

    def _run(self) -> None:
        out = Outboxes(self._ctx, self._paths, self._local)
        try:
            while (item := self._queue.get()) is not None:
                dest, msg, after = item
                try:
                    if after is not None:
                        after.synchronize()
                except Exception:  # noqa: BLE001 — the engine's own step reports the failure
                    log.exception("waiting before %s to %s failed", type(msg).__name__, dest)
                try:
                    out.send(dest, msg)
                except Exception:  # noqa: BLE001 — one bad message costs only itself
                    log.exception("sending %s to %s failed", type(msg).__name__, dest)
        finally:
            out.close()

    def close(self) -> None:
        """Sends what is queued, then stops."""
        self._queue.put(None)
        self._thread.join(timeout=10)


class ControlCall:
    """A control request (`pdpipe queues`, `trace`, pause/resume) waiting in a process's queue for its
    loop to answer it between messages."""

    def __init__(self, request: ControlRequest):
        self.request = request
        self.reply: dict | None = None
        self.abandoned = False  # no answer came in time: the loop must not carry it out any more
        self._done = threading.Event()

    def answer(self, reply: dict) -> None:
        self.reply = reply
        self._done.set()

    def wait(self, timeout: float) -> dict | None:
        return self.reply if self._done.wait(timeout) else None


class _SocketThread:
    """A socket bound on a thread of its own and served, a poll at a time, until `stop`."""

    kind = zmq.PULL
    thread_name = "socket"

    def __init__(self, ctx: zmq.Context, address: str):
        self._ctx, self._address = ctx, address
        self._stop = threading.Event()
        self._bound = threading.Event()
        self._thread = threading.Thread(target=self._run, name=self.thread_name, daemon=True)

    def start(self):
        self._thread.start()
        self._bound.wait()
        return self

    def _run(self) -> None:
        sock = self._ctx.socket(self.kind)
        sock.setsockopt(zmq.LINGER, 0)
        sock.bind(self._address)
        self._bound.set()
        while not self._stop.is_set():
            if sock.poll(100):
                self._serve(sock)
        sock.close()

    def _serve(self, sock: zmq.Socket) -> None:
        raise NotImplementedError

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2)


class ControlThread(_SocketThread):
    """Serves a process's control socket (REQ/REP) from a thread of its own: each request joins the
    process's queue as a ControlCall, and the reply goes back once the loop has answered it."""

    kind = zmq.REP
    thread_name = "control"

    def __init__(self, ctx: zmq.Context, address: str, into: queue.Queue, timeout: float = 5.0):
        super().__init__(ctx, address)
        self._into, self._timeout = into, timeout

    def _serve(self, sock: zmq.Socket) -> None:
        try:
            call = ControlCall(msgspec.json.decode(sock.recv(), type=ControlRequest))
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            sock.send(msgspec.json.encode({"error": f"bad control request: {exc}"}))
            return
        deadline = time.monotonic() + self._timeout
        reply = None
        try:
            self._into.put(call, timeout=self._timeout)
        except queue.Full:
            deadline = 0.0  # its queue is full: busy
        while reply is None and time.monotonic() < deadline and not self._stop.is_set():
            reply = call.wait(0.1)
        if reply is None:
            call.abandoned = True
            reply = {"error": f"no answer within {self._timeout:g} s (the process is busy)"}
        sock.send(msgspec.json.encode(reply))


class AsyncWires:
    """The front-end's ZeroMQ edge, for asyncio: its inbox, its outbox to the scheduler (the only peer
    it sends to), and control requests to the scheduler's control socket."""

    def __init__(self, paths: RunPaths, name: str = "api"):
        import zmq.asyncio

        self.paths = paths
        self.ctx = zmq.asyncio.Context()
        # sends never wait (a plain socket, NOBLOCK): a scheduler that stopped reading refuses, not hangs
        self._push: zmq.Socket = zmq.Context.shadow(self.ctx.underlying).socket(zmq.PUSH)
        self._push.setsockopt(zmq.LINGER, 0)
        self._push.setsockopt(zmq.SNDHWM, SEND_HWM)
        self._push.connect(paths.inbox("scheduler"))
        self._pull = self.ctx.socket(zmq.PULL)
        self._pull.setsockopt(zmq.LINGER, 0)
        self._pull.bind(paths.inbox(name))
        self._control_lock = asyncio.Lock()

    def send(self, msg: Msg) -> bool:
        """Queues `msg` for the scheduler without waiting; False when it cannot be (the scheduler has
        not read its inbox for SEND_HWM messages, or the front-end is closing)."""
        if self._push.closed:
            return False
        try:
            self._push.send(encode(msg), zmq.NOBLOCK)
        except zmq.Again:
            return False
        return True

    async def recv(self) -> Msg | EngineOutput | None:
        """The next message of the inbox; None for one that does not decode (logged)."""
        data = await self._pull.recv()
        try:
            return decode(data)
        except (msgspec.DecodeError, msgspec.ValidationError):
            log.exception("undecodable message on %s", self.paths.inbox("api"))
            return None

    async def control(self, request: ControlRequest, timeout: float) -> dict | None:
        """The scheduler's answer to a control request; None if none came within `timeout`."""
        async with self._control_lock:
            sock = self.ctx.socket(zmq.REQ)
            sock.setsockopt(zmq.LINGER, 0)
            sock.connect(self.paths.control)
            try:
                await sock.send(msgspec.json.encode(request))
                if await sock.poll(int(timeout * 1000)) == 0:
                    return None
                return msgspec.json.decode(await sock.recv())
            finally:
                sock.close()

    def close(self) -> None:
        self._push.close()
        self._pull.close()
        self.ctx.term()


class InboxThread(_SocketThread):
    """Receives this process's inbox on a thread of its own into `self.queue`, which holds at most
    SEND_HWM messages: a process that falls behind stops reading, and its senders' bounds apply."""

    kind = zmq.PULL
    thread_name = "inbox"

    def __init__(self, ctx: zmq.Context, address: str):
        super().__init__(ctx, address)
        self.queue: queue.Queue = queue.Queue(maxsize=SEND_HWM)

    def _serve(self, sock: zmq.Socket) -> None:
        while True:
            try:
                data = sock.recv(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            try:
                msg = decode(data.bytes)
            except (msgspec.DecodeError, msgspec.ValidationError):
                log.exception("undecodable message on %s", self._address)
                continue
            while not self._stop.is_set():
                try:
                    self.queue.put(msg, timeout=0.1)
                    break
                except queue.Full:
                    continue
