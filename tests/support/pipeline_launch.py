"""Launching real pipelines (every process, real sockets) for end-to-end tests."""
from __future__ import annotations

import shutil
import socket
import tempfile
import time
from contextlib import contextmanager

from pdpipe.config import ApiConfig, CacheConfig, EngineConfig, InstanceConfig, LaunchConfig, RoutingConfig
from pdpipe.inspect import control
from pdpipe.launcher import Launcher


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_launch_config(model, roles: list[str], num_blocks: int = 128, **kwargs) -> LaunchConfig:
    """A launch of the tiny test model. Every prompt goes through a prefill instance unless the test asks
    for `routing` of its own (the test prompts are short: conditional disaggregation would keep them
    on decode)."""
    run_dir = tempfile.mkdtemp(prefix="pdp-", dir="/tmp")
    kwargs.setdefault("routing", RoutingConfig(disaggregation="always"))
    kwargs.setdefault("instances", tuple(InstanceConfig(role) for role in roles))
    return LaunchConfig(
        name="test", run_dir=run_dir, ready_timeout=120,
        engine=EngineConfig(model=str(model), cache=CacheConfig(block_size=8, num_blocks=num_blocks)),
        api=ApiConfig(port=free_port(), max_body_bytes=64 * 1024), **kwargs)


@contextmanager
def launched(cfg: LaunchConfig):
    """A running pipeline; its run directory (logs) is removed afterwards unless the test failed, and
    none of its shared-memory pools stays."""
    launcher = Launcher(cfg)
    launcher.start()
    try:
        yield launcher
    except BaseException:
        launcher.stop()
        raise
    launcher.stop()
    assert launcher.paths.pool_files() == [], "the launch left shared memory behind"
    shutil.rmtree(launcher.paths.run_dir, ignore_errors=True)


def wait_until(condition, timeout: float = 30.0, what: str = "condition"):
    """Polls an observable condition until it holds (the pipeline settles asynchronously)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def snapshot(launcher) -> dict:
    return control(str(launcher.paths.run_dir), "snapshot")


def leak_free(launcher) -> bool:
    """The leak oracle across processes: nothing live, every engine's blocks all free."""
    snap = snapshot(launcher)
    if any(snap["states"].values()):
        return False
    for inst in snap["instances"].values():
        st = inst["stats"]
        if not st or st["free_blocks"] != st["num_blocks"] or st["running"] or st["waiting"]:
            return False
    return not any(x.get("transfers_in_flight", 0) for x in (snap.get("transfers") or {}).values())
