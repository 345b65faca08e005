"""The pipeline's process logic wired together in one process, messages delivered from in-memory
queues: the same scheduler, engine workers and transfer worker the processes run, minus sockets."""
from __future__ import annotations

from collections import deque
from dataclasses import replace

from pdpipe.config import CacheConfig, DeadlineConfig, EngineConfig, RoutingConfig, SchedulerConfig
from pdpipe.engine.engine import LLMEngine
from pdpipe.engine.worker import EngineWorker
from pdpipe.ipc.shm import ShmTransfer
from pdpipe.messages import EngineOutput, NewRequest, PoolInfo, SamplingParams
from pdpipe.scheduler.core import CacheKeys, SchedulerCore
from pdpipe.transfer.base import TransferBackend
from pdpipe.transfer.worker import TransferWorker


class TensorPools(ShmTransfer):
    """The shared-memory backend over the engines' own pool tensors (all in this process)."""

    def __init__(self, engines: dict[str, LLMEngine]):
        super().__init__()
        self.pools = {name: {0: (e.kv_cache.data, PoolInfo(
            instance=name, path="", shape=list(e.kv_cache.data.shape), kv_dtype=e.kv_dtype,
            dtype=str(e.kv_cache.data.dtype).removeprefix("torch.")))} for name, e in engines.items()}


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class LocalPipeline:
    def __init__(self, model, roles: dict[str, str], num_blocks: int = 64, block_size: int = 8,
                 max_num_batched_tokens: int = 2048, deadlines: DeadlineConfig = DeadlineConfig(),
                 backend: TransferBackend | None = None,
                 routing: RoutingConfig = RoutingConfig(disaggregation="always"), prefix_caching: bool = True,
                 kv_cache_dtype: str = "auto"):
        self.clock = Clock()
        self.queues: dict[str, deque] = {name: deque() for name in [*roles, "scheduler", "transfer", "api"]}
        cache = CacheConfig(block_size=block_size, num_blocks=num_blocks, prefix_caching=prefix_caching,
                            kv_cache_dtype=kv_cache_dtype)
        cfg = EngineConfig(model=str(model), cache=cache,
                           scheduler=SchedulerConfig(max_num_batched_tokens=max_num_batched_tokens))
        local = replace(cfg, scheduler=replace(cfg.scheduler, max_prefill_tokens=routing.local_step_tokens))
        self.engines = {name: LLMEngine(local if role == "decode" else cfg) for name, role in roles.items()}
        self.workers = {name: EngineWorker(name, role, self.engines[name], self.send, self.clock)
                        for name, role in roles.items()}
        first = next(iter(self.engines.values()))
        keys = CacheKeys(first.cache_root, block_size) if prefix_caching else None
        self.scheduler = SchedulerCore(roles, deadlines, self.send, self.clock, routing=routing, cache=keys)
        for worker in self.workers.values():  # as each engine process does when it starts
            self.scheduler.handle(worker.stats())
        spec = next(iter(self.engines.values())).spec
        self.backend = backend or TensorPools(self.engines)
        self.transfer = TransferWorker("transfer", self.backend, spec.num_layers, self.send, self.clock)
        self.outputs: dict[str, list[EngineOutput]] = {}

    def send(self, dest: str, msg) -> None:
        self.queues[dest].append(msg)

    def submit(self, request_id: str, prompt: list[int], params: SamplingParams, cache_salt: str = "") -> None:
        self.send("scheduler", NewRequest(request_id=request_id, prompt_token_ids=prompt, params=params,
                                          arrival=self.clock(), cache_salt=cache_salt))

    def cached_tokens(self, request_id: str) -> int:
        return max((o.cached_tokens for o in self.outputs.get(request_id, [])), default=0)

    def deliver(self, only: str | None = None) -> int:
        """Hands every queued message to its process (or to `only`); returns how many."""
        n = 0
        for name, q in self.queues.items():
            if only is not None and name != only:
                continue
            while q:
                msg = q.popleft()
                n += 1
                if name == "api":
                    self.outputs.setdefault(msg.request_id, []).append(msg)
                elif name == "scheduler":
                    self.scheduler.handle(msg)
                elif name == "transfer":
                    self.transfer.handle(msg)
                else:
                    self.workers[name].handle(msg)
        return n

    def step(self, name: str) -> None:
        if self.workers[name].has_work():
            self.workers[name].step()

    def run(self, max_rounds: int = 10000) -> None:
        """Delivers and steps until nothing moves."""
        for _ in range(max_rounds):
            moved = self.deliver()
            busy = [n for n, w in self.workers.items() if w.has_work()]
            for name in busy:
                self.workers[name].step()
            if not moved and not busy:
                return
        raise AssertionError("the pipeline did not settle")

    def tokens(self, request_id: str) -> list[int]:
        outs = sorted(self.outputs.get(request_id, []), key=lambda o: o.index)
        return [t for o in outs for t in o.token_ids]

    def finish_reason(self, request_id: str) -> str | None:
        return next((o.finish_reason for o in self.outputs.get(request_id, []) if o.finish_reason), None)

    def state(self, request_id: str) -> str:
        rec = self.scheduler.live.get(request_id) or self.scheduler.recent.get(request_id)
        return rec.state if rec is not None else ""

    def leak_free(self) -> bool:
        """The leak oracle, widened to every book the processes keep: nothing live, every block free,
        no room committed in the scheduler's ledger, no prompt tokens outstanding, no transfer state
        and no request state left in any worker."""
        sched, xfer = self.scheduler, self.transfer
        books = [sched.live, list(sched.queue), sched.ledger.commitments, +sched.outstanding_tokens,
                 [r for r in sched.ledger.rooms.values() if r.blocks or r.seqs],
                 xfer.jobs, xfer._first, xfer._draining, xfer._blocks, xfer.pulls, xfer._pull_waiting, xfer._lent]
        for w in self.workers.values():
            books += [w._pending, w._prefills, w._deferred, w._started, w.queued_prompt_tokens,
                      w.engine.scheduler.pull_holds, w.engine.scheduler.pulls]
        return not any(books) and all(e.leak_free() for e in self.engines.values())
