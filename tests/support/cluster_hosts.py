"""Two machines on one box for cluster tests: this network namespace is host A (Redis, front-end),
a second namespace joined by a veth pair is host B. Each host runs its own launcher."""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

from pipeline_launch import free_port


def sh(*args: str) -> None:
    subprocess.run(args, check=True, capture_output=True, text=True)


@contextmanager
def second_host():
    """Yields (namespace, host A address, host B address)."""
    tag = f"{os.getpid() % 10000}"
    ns, veth_a, veth_b = f"pdpb{tag}", f"pdpa{tag}", f"pdpv{tag}"
    subnet = f"10.{77 + os.getpid() % 100}.{os.getpid() % 200}"
    a, b = f"{subnet}.1", f"{subnet}.2"
    sh("ip", "netns", "add", ns)
    try:
        sh("ip", "link", "add", veth_a, "type", "veth", "peer", "name", veth_b)
        sh("ip", "link", "set", veth_b, "netns", ns)
        sh("ip", "addr", "add", f"{a}/24", "dev", veth_a)
        sh("ip", "link", "set", veth_a, "up")
        sh("ip", "netns", "exec", ns, "ip", "addr", "add", f"{b}/24", "dev", veth_b)
        sh("ip", "netns", "exec", ns, "ip", "link", "set", veth_b, "up")
        sh("ip", "netns", "exec", ns, "ip", "link", "set", "lo", "up")
        yield ns, a, b
    finally:
        subprocess.run(["ip", "netns", "pids", ns], capture_output=True)
        for pid in subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True).stdout.split():
            try:
                os.kill(int(pid), signal.SIGKILL)
            except ProcessLookupError:
                pass
        subprocess.run(["ip", "link", "del", veth_a], capture_output=True)
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)


class RedisServer:
    """A redis-server of the test's own, on host A's addresses; stop() and start() again on the same port."""

    def __init__(self, bind: list[str]):
        self.port = free_port()
        self.bind = bind
        self.dir = tempfile.mkdtemp(prefix="pdp-redis-")
        self.proc: subprocess.Popen | None = None

    def start(self) -> RedisServer:
        self.proc = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", *self.bind, "--save", "", "--appendonly", "no",
             "--protected-mode", "no", "--dir", self.dir], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        import redis

        while time.monotonic() < deadline:
            try:
                redis.Redis(host=self.bind[0], port=self.port, socket_timeout=0.5).ping()
                return self
            except redis.RedisError:
                time.sleep(0.05)
        raise RuntimeError("redis-server did not start")

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def remove(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)

    def url(self, host: str) -> str:
        return f"redis://{host}:{self.port}/0"


def machine_config(path: Path, *, model: str, redis_url: str, machine: str, host: str, roles: list[str],
                   frontend: bool, port: int = 0, num_blocks: int = 128, ttl: float = 3.0,
                   routing: tuple[str, ...] = ()) -> Path:
    lines = [f'name = "{machine}"', f'run_dir = "/tmp/pdp-{machine}-{os.getpid()}"', "ready_timeout = 60",
             "[engine]", f'model = "{model}"', "[engine.cache]", "block_size = 8", f"num_blocks = {num_blocks}",
             "[deadlines]", "transferring = 20", "decoding = 60",
             "[routing]", 'disaggregation = "always"', *routing,  # the short test prompts would stay on decode
             "[cluster]", f'redis_url = "{redis_url}"', f'machine = "{machine}"', f"frontend = {str(frontend).lower()}",
             f'advertise_host = "{host}"', f"ttl = {ttl}", "[api]", f"port = {port or free_port()}"]
    for role in roles:  # "decode", "decode:2" for a tensor-parallel instance of two ranks, "decode:2:dp" for
        name, _, tp = role.partition(":")  # two data-parallel ranks (a MoE model's experts split by id)
        tp, _, dp = tp.partition(":")
        lines += ["[[instances]]", f'role = "{name}"'] + ([f"tp = {tp}"] if tp else []) + (
            ["expert_parallel = true", "data_parallel_attention = true"] if dp else [])
    path.write_text("\n".join(lines) + "\n")
    return path


class RemoteLauncher:
    """`pdpipe launch` in host B's namespace."""

    def __init__(self, ns: str, config: Path):
        self.proc = subprocess.Popen(["ip", "netns", "exec", ns, sys.executable, "-m", "pdpipe.cli", "launch",
                                      str(config)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                     start_new_session=True)
        self.output = []
        for line in self.proc.stdout:
            self.output.append(line)
            if "ready" in line and line.startswith("pdpipe: ready"):
                return
        raise RuntimeError("host B's launcher did not become ready:\n" + "".join(self.output))

    def kill(self) -> None:
        """Host B dies: every process of its launcher at once, no clean-up."""
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.kill()
