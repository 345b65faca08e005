"""`pdpipe launch CONFIG`: starts one machine's processes, waits until each says it is ready, keeps
them running, and on SIGINT/SIGTERM stops them all and removes the run's sockets and shared memory:
the front-end first, which drains (see `api.drain_s`).

A process that fails to start is named with the end of its log, and nothing is left running. A process
that dies later is restarted (after a back-off that grows with each death in a minute) and the others
are told, so that the requests it held end with an error and it leaves routing until it is back; one
that dies `CRASH_LOOP` times in a minute stops the launch, named with the end of its log. Children end
when the launcher does, however it ends (a parent-death signal); the shared-memory pools of a launch
whose launcher was killed are removed by the next launch on the machine (`wire.sweep_ended_runs`).

The engine processes share the machine's physical cores (`thread_budget`, set through each child's
OMP_NUM_THREADS / MKL_NUM_THREADS): with torch's default every process would take every core, and on
CPU they would wait on each other's threads."""
from __future__ import annotations

import logging
import os
import queue
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

import msgspec
import zmq

from pdpipe.config import TP_STORE_ENV, LaunchConfig, tp_group_of
from pdpipe.messages import DropAll, ProcessDown, ProcessUp, Ready
from pdpipe.wire import PID_FILE, InboxThread, Outboxes, RunPaths, claim_run, launcher_of, sweep_ended_runs

log = logging.getLogger("pdpipe")


ENGINE_ROLES = ("prefill", "decode", "mixed")
BACKOFF_S = (0.2, 1.0, 2.0, 4.0, 8.0)  # before the 1st, 2nd, ... restart of a process within a minute
CRASH_LOOP = 5  # deaths of one process within CRASH_WINDOW_S that stop the launch
CRASH_WINDOW_S = 60.0
THREAD_ENV = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")  # what numeric libraries read


class LaunchError(RuntimeError):
    """A process that did not start (or keeps dying); the message names it and quotes its log."""


@dataclass
class Child:
    name: str
    role: str
    popen: subprocess.Popen
    log_path: Path
    ready: Ready | None = None
    deaths: list[float] = field(default_factory=list)  # when it died, within the crash window
    restart_at: float | None = None  # dead, restarting then
    restarts: int = 0
    ready_at: float = 0.0  # time.monotonic() of its last Ready


def _write_private(path: Path, data: bytes) -> None:
    """Writes a file only its owner can read (made anew: an older one keeps its mode)."""
    path.unlink(missing_ok=True)
    with open(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "wb") as f:
        f.write(data)


def physical_cores(cpus: set[int]) -> int:
    """The physical cores under these logical CPUs (SMT siblings count once), which is what torch's
    default thread count is; the number of CPUs where the topology cannot be read."""
    cores = set()
    for cpu in cpus:
        topology = Path(f"/sys/devices/system/cpu/cpu{cpu}/topology")
        try:
            cores.add(((topology / "physical_package_id").read_text(), (topology / "core_id").read_text()))
        except OSError:
            return len(cpus)
    return len(cores) or len(cpus)


def thread_budget(cfg: LaunchConfig, cores: int) -> dict[str, int]:
    """Intra-op threads of each process the launch starts, by name, on a machine of `cores` usable
    physical cores. The engine processes (every rank) run the model: `engine.cpu_threads` each, or with 0 an
    equal share of the cores (on GPU, that share caps their host-side work). The transfer's torch work
    is block copies, bound by memory, and the other processes run no numeric code: one thread each.
    With `cpu_threads = -1` nothing is set (torch's default takes every core in every process)."""
    if cfg.engine.cpu_threads < 0:
        return {}
    processes = cfg.local_processes()
    engines = [name for role, name in processes if role in (*ENGINE_ROLES, "rank")]
    share = cfg.engine.cpu_threads or max(1, cores // max(1, len(engines)))
    return {name: share if name in engines else 1 for _, name in processes}


def _tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


@dataclass
class Launcher:
    cfg: LaunchConfig
    children: list[Child] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.paths = RunPaths(self.cfg.resolved_run_dir)
        self._stopping = False
        self._ctx: zmq.Context | None = None
        self._inbox: InboxThread | None = None
        self._out: Outboxes | None = None
        self._tp_starts: dict[str, int] = {}  # how many times each tensor-parallel group was started
        self._halt = threading.Event()  # the supervisor stops
        self.fatal: str | None = None  # why the supervisor gave up (a crash loop)
        self._supervisor: threading.Thread | None = None
        self._claim: BinaryIO | None = None  # the run's pid file, locked while this launch runs
        cpus = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else set(range(os.cpu_count() or 1))
        self.threads = thread_budget(self.cfg, physical_cores(cpus))

    def plan(self) -> list[tuple[str, str]]:
        """(role, name) of every process, in start order."""
        return self.cfg.local_processes()

    def start(self) -> None:
        from pdpipe.demo import resolve_model

        run_dir = self.paths.run_dir
        self._refuse_live_run()
        if any(role == "api" for role, _ in self.plan()):
            self._check_port()
        self._check_peer_access()
        resolve_model(self.cfg.engine.model)  # make the demo model once, before the processes look for it
        (run_dir / "logs").mkdir(parents=True, exist_ok=True)
        try:  # the run is this launch's before anything in it is wiped or written
            self._claim = claim_run(run_dir)
        except BlockingIOError:
            raise LaunchError(f"a launch named {self.cfg.name!r} is starting in {run_dir}; give this one "
                              "another name") from None
        swept = sweep_ended_runs()
        if swept:
            log.warning("removed %d KV pools of launches whose launcher was killed: %s", len(swept),
                        " ".join(p.name for p in swept))
        self._clean_leftovers()
        _write_private(run_dir / "config.json", msgspec.json.encode(self.cfg))  # it may hold api.api_key
        self.paths.live_link.parent.mkdir(exist_ok=True)  # so that `pdpipe queues` finds this launch
        self.paths.live_link.unlink(missing_ok=True)
        self.paths.live_link.symlink_to(run_dir.resolve())
        self._ctx = zmq.Context()
        self._inbox = InboxThread(self._ctx, self.paths.inbox("launcher")).start()
        local = {n for _, n in self.plan()} | {"launcher"} if self.cfg.cluster.redis_url else None
        self._out = Outboxes(self._ctx, self.paths, local)
        try:
            for role, name in self.plan():
                self._spawn(role, name)
            self._wait_ready(self._inbox.queue)
        except BaseException:
            self.stop()
            raise
        self._supervisor = threading.Thread(target=self._supervise, name="supervisor", daemon=True)
        self._supervisor.start()

    def _refuse_live_run(self) -> None:
        """A launch of the same name still running keeps its run directory: say so, wipe nothing."""
        pid = launcher_of(self.paths.run_dir)
        if pid is not None:  # 0: it is writing its pid
            raise LaunchError(f"a launch named {self.cfg.name!r} is running (launcher pid {pid}, run directory "
                              f"{self.paths.run_dir}); {f'stop it (kill {pid})' if pid else 'stop it'} or give "
                              "this one another name")

    def _check_peer_access(self) -> None:
        """KV moves between this machine's GPUs by peer copies: a prefill/decode pair whose GPUs cannot
        reach each other (NVML) is refused before anything starts."""
        if not self.cfg.engine.device.startswith("cuda"):
            return
        from pdpipe import gpus

        named = self.cfg.named_instances()
        pairs = [(p, a, d, b) for p, pi in named if pi.role == "prefill" for d, di in named if di.role == "decode"
                 for a in pi.gpus for b in di.gpus]
        blocked = gpus.unreachable_pairs(pairs)
        if blocked:
            raise LaunchError(f"no peer access between {'; '.join(blocked)} (NVML): KV moves between a prefill "
                              "and a decode instance of one machine by GPU peer copies, and pdpipe does not stage "
                              "it through host memory. Put each pair on GPUs joined by NVLink or PCIe P2P "
                              "(`nvidia-smi topo -p2p r` shows which), or run the instances mixed.")

    def _check_port(self) -> None:
        import socket

        host, port = self.cfg.api.host, self.cfg.api.port
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind((host, port))
            except OSError as exc:
                raise LaunchError(f"api.port {port} on {host} is taken ({exc.strerror}): another server or "
                                  "launch is using it; stop that or set api.port") from None

    def _spawn(self, role: str, name: str, again: bool = False) -> subprocess.Popen:
        log_path = self.paths.log(name)
        env = dict(os.environ, PDPIPE_LAUNCHER_PID=str(os.getpid()))
        instance, rank = tp_group_of(name)
        inst = dict(self.cfg.named_instances()).get(instance)
        if name in self.threads:
            env.update(dict.fromkeys(THREAD_ENV, str(self.threads[name])))
        if inst is not None and inst.gpus:
            env["CUDA_VISIBLE_DEVICES"] = ",".join(map(str, inst.gpus))  # rank r runs on cuda:r of them
        if inst is not None and inst.tp > 1:  # every rank of one start of the group meets at one fresh file
            self._tp_starts[instance] = self._tp_starts.get(instance, 0) + (rank == 0)
            store = f"tp-{instance}-{os.getpid()}-{self._tp_starts[instance]}.store"  # this launch's, this start's
            env[TP_STORE_ENV] = str(self.paths.run_dir / store)
        with open(log_path, "ab" if again else "wb") as logf:
            if again:
                logf.write(f"\n==== pdpipe: restarting {name} ====\n".encode())
                logf.flush()
            # a session of its own: a terminal's Ctrl-C reaches the launcher alone, which then stops the
            # children in order (the front-end drains first)
            popen = subprocess.Popen([sys.executable, "-m", "pdpipe.process", role, name, str(self.paths.run_dir)],
                                     stdout=logf, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                                     start_new_session=True)
        if not again:
            self.children.append(Child(name, role, popen, log_path))
        return popen

    def _wait_ready(self, inbox: queue.Queue) -> None:
        deadline = time.monotonic() + self.cfg.ready_timeout
        by_name = {c.name: c for c in self.children}
        while any(c.ready is None for c in self.children):
            for c in self.children:
                if c.ready is None and c.popen.poll() is not None:
                    raise LaunchError(f"process {c.name} ({c.role}) exited with code {c.popen.returncode} "
                                      f"before it was ready; the end of {c.log_path}:\n{_tail(c.log_path)}")
            if time.monotonic() > deadline:
                late = [c.name for c in self.children if c.ready is None]
                raise LaunchError(f"not ready within {self.cfg.ready_timeout:g} s: {', '.join(late)}")
            try:
                msg = inbox.get(timeout=0.1)
            except queue.Empty:
                continue
            if isinstance(msg, Ready) and msg.instance in by_name:
                by_name[msg.instance].ready = msg

    # ---- supervision -------------------------------------------------------------------------
    def _supervise(self) -> None:
        """Restarts dead children and tells the others (see the module's docstring)."""
        by_name = {c.name: c for c in self.children}
        assert self._inbox is not None
        while not self._halt.wait(0.05):
            now = time.monotonic()
            for c in self.children:
                if c.restart_at is None and c.popen.poll() is not None:
                    if self._died(c, now):
                        return
                elif c.restart_at is not None and now >= c.restart_at:
                    c.popen, c.ready, c.restart_at = self._spawn(c.role, c.name, again=True), None, None
                    c.restarts += 1
            while True:
                try:
                    msg = self._inbox.queue.get_nowait()
                except queue.Empty:
                    break
                child = by_name.get(getattr(msg, "instance", ""))
                if isinstance(msg, Ready) and child is not None and child.ready is None and child.restart_at is None:
                    child.ready, child.ready_at = msg, time.monotonic()
                    log.warning("process %s is back (pid %d, restart %d)", child.name, msg.pid, child.restarts)
                    if child.role in (*ENGINE_ROLES, "transfer"):
                        self._send("scheduler", ProcessUp(name=child.name, role=child.role))

    def _died(self, c: Child, now: float) -> bool:
        """Records a death; schedules the restart and tells the others, or gives up on a crash loop."""
        c.deaths = [t for t in c.deaths if now - t < CRASH_WINDOW_S] + [now]
        code = c.popen.returncode
        if len(c.deaths) >= CRASH_LOOP:
            self.fatal = (f"process {c.name} ({c.role}) died {len(c.deaths)} times within {CRASH_WINDOW_S:g} s "
                          f"(last exit code {code}); stopping. The end of {c.log_path}:\n{_tail(c.log_path)}")
            log.error("%s", self.fatal)
            self._halt.set()
            return True
        delay = BACKOFF_S[min(len(c.deaths), len(BACKOFF_S)) - 1]
        c.restart_at, c.ready = now + delay, None
        log.warning("process %s (%s) exited with code %s; restarting it in %.1f s. The end of %s:\n%s",
                    c.name, c.role, code, delay, c.log_path, _tail(c.log_path, 8))
        detail = f"exit code {code}" if code is not None and code >= 0 else f"signal {-code}"
        self._restart_group(c, detail)
        if c.role == "scheduler":  # what it knew is lost: engines drop every request, the api fails its own
            for other in self.children:
                if other.role in (*ENGINE_ROLES, "transfer"):
                    self._send(other.name, DropAll(reason=f"scheduler died ({detail})"))
            if any(x.role == "api" for x in self.children):
                self._send("api", ProcessDown(name=c.name, role=c.role, detail=detail))
        elif c.role in (*ENGINE_ROLES, "transfer", "api"):
            self._send("scheduler", ProcessDown(name=c.name, role=c.role, detail=detail))
        return False

    def _restart_group(self, dead: Child, detail: str) -> None:
        """The ranks of a tensor-parallel instance live and die together: when one dies, the others are
        killed (they would wait in a collective for good) and the group starts again as one, rank 0
        first, at a fresh rendezvous."""
        instance, _ = tp_group_of(dead.name)
        inst = dict(self.cfg.named_instances()).get(instance)
        if inst is None or inst.tp == 1:
            return
        for other in self.children:
            if other is not dead and tp_group_of(other.name)[0] == instance and other.restart_at is None:
                if other.popen.poll() is None:
                    other.popen.kill()
                    other.popen.wait()
                other.restart_at, other.ready = dead.restart_at, None
        if dead.role == "rank":  # rank 0 went down with it: the scheduler must route around the instance
            self._send("scheduler", ProcessDown(name=instance, role=inst.role, detail=f"{dead.name}: {detail}"))

    def _send(self, dest: str, msg) -> None:
        assert self._out is not None
        try:
            self._out.send(dest, msg)
        except zmq.ZMQError as exc:
            log.warning("could not tell %s that %s: %s", dest, type(msg).__name__, exc)

    def wait(self) -> int:
        """Blocks until a signal, or until a process keeps dying; then stops everything. Returns an exit
        code (1 after a crash loop)."""
        stop = threading.Event()
        old = {s: signal.signal(s, lambda *_: stop.set()) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            while not stop.wait(0.2):
                if self.fatal is not None:
                    return 1
            return 0
        finally:
            for s, handler in old.items():
                signal.signal(s, handler)
            self.stop()

    def stop(self, timeout: float = 10.0) -> None:
        if self._stopping:
            return
        self._stopping = True
        self._halt.set()
        if self._supervisor is not None and self._supervisor is not threading.current_thread():
            self._supervisor.join(timeout=2)
        # the front-end first: it drains (no new request; those in flight finish within api.drain_s, the
        # rest end with an error event) while the engines still serve them
        fronts = [c for c in self.children if c.role == "api" and c.popen.poll() is None]
        for c in fronts:
            c.popen.terminate()
        for c in fronts:
            try:
                c.popen.wait(self.cfg.api.drain_s + timeout)
            except subprocess.TimeoutExpired:
                log.warning("the api did not stop in %.0f s; killing it", self.cfg.api.drain_s + timeout)
                c.popen.kill()
        # ranks > 0 of a tensor-parallel instance are stopped by their rank 0 (so that it never waits on a
        # dead peer): they are told last, when whatever is left of them has to go
        for c in reversed(self.children):
            if c.popen.poll() is None and c.role != "rank":
                c.popen.terminate()
        deadline = time.monotonic() + timeout
        for c in self.children:
            if c.role != "rank":
                continue
            try:
                c.popen.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                c.popen.terminate()
        for c in self.children:
            try:
                c.popen.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.warning("process %s did not stop in %.0f s; killing it", c.name, timeout)
                c.popen.kill()
                c.popen.wait()
        if self._inbox is not None:
            self._inbox.stop()
        if self._out is not None:
            self._out.close()
        if self._ctx is not None:
            self._ctx.term()
        self._clean_leftovers()
        if self._claim is not None:  # the link and the pid file go while the run is still this launch's
            self.paths.live_link.unlink(missing_ok=True)
            (self.paths.run_dir / PID_FILE).unlink(missing_ok=True)
            self._claim.close()

    def dump_stacks(self) -> None:
        """Every process writes its threads' stacks to its log (for a hang)."""
        for c in self.children:
            if c.popen.poll() is None:
                c.popen.send_signal(signal.SIGUSR1)

    def _clean_leftovers(self) -> None:
        for path in (*self.paths.socket_files(), *self.paths.pool_files(), *self.paths.run_dir.glob("tp-*.store")):
            path.unlink(missing_ok=True)
        shutil.rmtree(self.paths.run_dir / "pools", ignore_errors=True)

    def curl_line(self) -> str:
        host = "127.0.0.1" if self.cfg.api.host in ("0.0.0.0", "::") else self.cfg.api.host
        key = self.cfg.api.api_key  # the config's own key: the line is one that works
        auth = f" -H {shlex.quote('Authorization: Bearer ' + key)}" if key else ""
        return (f"curl http://{host}:{self.cfg.api.port}/v1/completions -H 'Content-Type: application/json'{auth} "
                f"-d '{{\"model\": \"{self.model_name()}\", \"prompt\": \"Hello\", \"max_tokens\": 16}}'")

    def model_name(self) -> str:
        from pdpipe.demo import resolve_model

        return self.cfg.api.served_model_name or resolve_model(self.cfg.engine.model).name
