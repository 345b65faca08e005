"""`pdpipe launch CONFIG`: starts one machine's processes, waits until each says it is ready, and on
SIGINT/SIGTERM (or any process dying) stops them all and removes the run's sockets and shared memory.

A process that fails to start is named with the end of its log, and nothing is left running."""
from __future__ import annotations

import logging
import os
import queue
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import msgspec
import zmq

from pdpipe.config import LaunchConfig
from pdpipe.messages import Ready
from pdpipe.wire import InboxThread, RunPaths

log = logging.getLogger("pdpipe")


class LaunchError(RuntimeError):
    """A process that did not start; the message names it and quotes its log."""


@dataclass
class Child:
    name: str
    role: str
    popen: subprocess.Popen
    log_path: Path
    ready: Ready | None = None


def _tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


@dataclass
class Launcher:
    cfg: LaunchConfig
    children: list[Child] = field(default_factory=list)

    def __post_init__(self):
        self.paths = RunPaths(self.cfg.resolved_run_dir)
        self._stopping = False

    def plan(self) -> list[tuple[str, str]]:
        """(role, name) of every process, in start order."""
        return self.cfg.local_processes()

    def start(self) -> None:
        from pdpipe.demo import resolve_model

        resolve_model(self.cfg.engine.model)  # make the demo model once, before the processes look for it
        run_dir = self.paths.run_dir
        if run_dir.exists():
            self._clean_leftovers()
        (run_dir / "logs").mkdir(parents=True, exist_ok=True)
        (run_dir / "config.json").write_bytes(msgspec.json.encode(self.cfg))
        ctx = zmq.Context()
        inbox = InboxThread(ctx, self.paths.inbox("launcher")).start()
        try:
            for role, name in self.plan():
                self._spawn(role, name)
            self._wait_ready(inbox.queue)
        except BaseException:
            self.stop()
            raise
        finally:
            inbox.stop()
            ctx.term()

    def _spawn(self, role: str, name: str) -> None:
        log_path = self.paths.log(name)
        env = dict(os.environ)
        inst = dict(self.cfg.named_instances()).get(name)
        if inst is not None and inst.gpus:
            env["CUDA_VISIBLE_DEVICES"] = ",".join(map(str, inst.gpus))
        with open(log_path, "wb") as logf:
            popen = subprocess.Popen([sys.executable, "-m", "pdpipe.process", role, name, str(self.paths.run_dir)],
                                     stdout=logf, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env)
        self.children.append(Child(name, role, popen, log_path))

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

    def wait(self) -> int:
        """Blocks until a signal or a process exiting; then stops everything. Returns an exit code."""
        stop = threading.Event()
        old = {s: signal.signal(s, lambda *_: stop.set()) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            while not stop.wait(0.5):
                dead = [c for c in self.children if c.popen.poll() is not None]
                if dead:
                    c = dead[0]
                    log.error("process %s exited with code %s; stopping the others. The end of %s:\n%s",
                              c.name, c.popen.returncode, c.log_path, _tail(c.log_path))
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
        for c in reversed(self.children):
            if c.popen.poll() is None:
                c.popen.terminate()
        deadline = time.monotonic() + timeout
        for c in self.children:
            try:
                c.popen.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.warning("process %s did not stop in %.0f s; killing it", c.name, timeout)
                c.popen.kill()
                c.popen.wait()
        self._clean_leftovers()

    def dump_stacks(self) -> None:
        """Every process writes its threads' stacks to its log (for a hang)."""
        for c in self.children:
            if c.popen.poll() is None:
                c.popen.send_signal(signal.SIGUSR1)

    def _clean_leftovers(self) -> None:
        for path in (*self.paths.socket_files(), *self.paths.pool_files()):
            path.unlink(missing_ok=True)
        shutil.rmtree(self.paths.run_dir / "pools", ignore_errors=True)

    def curl_line(self) -> str:
        host = "127.0.0.1" if self.cfg.api.host in ("0.0.0.0", "::") else self.cfg.api.host
        return (f"curl http://{host}:{self.cfg.api.port}/v1/completions -H 'Content-Type: application/json' "
                f"-d '{{\"model\": \"{self.model_name()}\", \"prompt\": \"Hello\", \"max_tokens\": 16}}'")

    def model_name(self) -> str:
        from pdpipe.demo import resolve_model

        return self.cfg.api.served_model_name or resolve_model(self.cfg.engine.model).name
