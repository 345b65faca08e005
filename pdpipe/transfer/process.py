"""The transfer process: a machine's transfer backend (`machine.MachineTransfer`) under the transfer
worker, on the common loop; the backend refreshes its published pools between steps."""
from __future__ import annotations

from pdpipe.demo import resolve_model
from pdpipe.loop import ProcessBase, run_worker_loop
from pdpipe.models.spec import load_spec
from pdpipe.wire import InboxThread

from .machine import MachineTransfer
from .worker import TransferWorker


def run_transfer(role: str, name: str, run_dir: str) -> None:
    proc = ProcessBase(role, name, run_dir)
    spec = load_spec(resolve_model(proc.cfg.engine.model))
    backend = MachineTransfer.for_config(proc.cfg, proc.paths.run_dir / "pools")
    worker = TransferWorker(name, backend, spec.num_layers, proc.out.send, pool_lookup=backend.lookup,
                            copy_deadline=proc.cfg.deadlines.copy)
    inbox = InboxThread(proc.ctx, proc.paths.inbox(name)).start()
    proc.start_heartbeat()
    proc.ready()
    try:
        run_worker_loop(proc, inbox, worker, periodic=backend.refresh)
    finally:
        inbox.stop()
        proc.close()
