"""Entry point of every pipeline process: `python -m pdpipe.process ROLE NAME RUN_DIR`.

Each role's runner reads the run's resolved config from RUN_DIR/config.json, binds its inbox, tells
the launcher it is ready, and runs its loop (`pdpipe.loop`) until SIGTERM/SIGINT. A child dies with
its launcher, however the launcher dies.
"""
from __future__ import annotations

import importlib
import logging
import os
import signal
import sys

from pdpipe import envs

log = logging.getLogger("pdpipe")

# role → the module and function that run it (imported when the process starts: each role loads only
# what it needs; the front-end and the scheduler never load torch)
RUNNERS = {"prefill": "pdpipe.engine.process:run_engine", "decode": "pdpipe.engine.process:run_engine",
           "mixed": "pdpipe.engine.process:run_engine", "rank": "pdpipe.engine.process:run_rank",
           "transfer": "pdpipe.transfer.process:run_transfer", "scheduler": "pdpipe.scheduler.service:run_scheduler",
           "api": "pdpipe.api.server:run_api", "relay": "pdpipe.relay:run_relay"}


def runner(role: str):
    module, function = RUNNERS[role].split(":")
    return getattr(importlib.import_module(module), function)


def die_with_launcher() -> None:
    """SIGKILL to this process when its launcher dies, however it dies (Linux's parent-death signal), so
    that no process outlives its launch holding its port and pools."""
    launcher = os.environ.get("PDPIPE_LAUNCHER_PID")
    if not launcher or not sys.platform.startswith("linux"):
        return
    import ctypes

    # SIGKILL: with no launcher there is nobody to drain for, and a graceful stop could hang on a peer
    # that is gone (the next launch of the run cleans its sockets and pools)
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    if os.getppid() != int(launcher):  # it died before the signal was armed
        os._exit(1)


def main(argv: list[str] | None = None) -> int:
    import faulthandler

    die_with_launcher()
    role, name, run_dir = (argv or sys.argv[1:])[:3]
    logging.basicConfig(level=envs.log_level(), stream=sys.stderr,
                        format=f"%(asctime)s {name} %(levelname)s %(message)s")
    faulthandler.enable()  # a crash in native code (CUDA, Triton) still leaves its Python stack in the log
    faulthandler.register(signal.SIGUSR1, all_threads=True)  # a hang: every thread's stack, on demand
    if role in ("prefill", "decode", "mixed", "rank", "transfer"):  # their share of the cores (launcher.thread_budget)
        import torch

        log.info("%s: %d torch threads", name, torch.get_num_threads())
    try:
        runner(role)(role, name, run_dir)
    except Exception:
        log.exception("%s failed", name)
        return 1
    if "torch.distributed" in sys.modules and sys.modules["torch.distributed"].is_initialized():
        # a rank of a tensor-parallel instance: gloo's threads can abort the interpreter's teardown
        # ("terminate called without an active exception"), which would read as a crash
        logging.shutdown()
        os._exit(0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
