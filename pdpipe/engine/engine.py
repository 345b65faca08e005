"""The engine core: a model replica, its paged KV pool and the continuous-batching step loop.

`step()` is schedule → run the model → sample → update, and returns the new tokens of every request
that got one; a request whose run raises ends with an "error" output, alone. Requests move
WAITING → RUNNING → FINISHED (stop, length, abort); preemption sends a
RUNNING request back to WAITING to be recomputed. No sockets here: the processes of the pipeline
feed it from their I/O edges, and tests drive it directly.
"""
from __future__ import annotations

import itertools
import logging
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch

from pdpipe.config import EngineConfig
from pdpipe.demo import resolve_model
from pdpipe.kv_hash import block_hashes, reusable_blocks, root_hash
from pdpipe.messages import EngineOutput, SamplingParams
from pdpipe.models.layers import use_fp8_activations
from pdpipe.models.loader import load_model
from pdpipe.models.parallel import TensorParallel
from pdpipe.models.spec import load_eos_token_ids
from pdpipe.quant import quant_plan

from .block_manager import BlockManager
from .data_parallel import DataParallelRunner
from .host_tier import HostTier
from .kv_cache import KVCache
from .model_runner import ModelRunner
from .sampler import Sampler
from .scheduler import Scheduler, SchedulerOutput
from .sequence import Sequence
from .sizing import (
    TOKEN_PAD,
    device_fault,
    kv_dtype_name,
    kv_room,
    pool_blocks,
    prefill_graph_limit,
    resolve_max_model_len,
)

log = logging.getLogger("pdpipe")


def _placed(config: EngineConfig, tp: TensorParallel | None) -> tuple[EngineConfig, TensorParallel | None]:
    """The config on one named device (all parts there), and the ranks with the parallelism it asks for."""
    if config.device.startswith("cuda"):
        if torch.device(config.device).index is None:
            config = replace(config, device=f"cuda:{torch.cuda.current_device()}")
        torch.cuda.set_device(torch.device(config.device))
    if tp is not None and config.expert_parallel:
        tp = replace(tp, expert_parallel=True)
    if tp is not None and config.data_parallel_attention:
        tp = replace(tp, data_parallel_attention=True)
    return config, tp


class RequestError(ValueError):
    """A request the engine cannot take, naming the field at fault."""


@dataclass
class Reservation:
    """Blocks held for a prompt whose KV comes from another engine, and room for its output."""

    blocks: list[int]
    cached: int  # its leading blocks whose KV this engine's prefix cache already held: nothing comes for them


class LLMEngine:
    def __init__(self, config: EngineConfig, pool_path: str | None = None, tp: TensorParallel | None = None):
        """`pool_path`: back the KV pool with this shared-memory file, so a transfer process can map it.
        `tp`: this engine is one rank of a tensor-parallel instance (its share of the model and of the
        KV heads; rank 0 schedules and samples, the others `runner.follow()`)."""
        config, tp = _placed(config, tp)
        self.config, self.tp = config, tp
        self.data_parallel = tp is not None and tp.data_parallel_attention and tp.size > 1
        self.model_dir = resolve_model(config.model)
        cuda = config.device.startswith("cuda")
        memory_at_start = torch.cuda.mem_get_info() if self._sized_from_gpu() else None  # (free, total)
        self.quant = quant_plan(config, self.model_dir)
        self.model = load_model(self.model_dir, config.dtype or None, config.device, config.load_format, tp=tp,
                                quant=self.quant)
        self.spec = self.model.spec
        self.kv_dtype = kv_dtype_name(self.spec, config.cache.kv_cache_dtype)  # as hashed and paired
        hd = self.spec.head_dim
        if cuda and (hd & (hd - 1) or hd < 16):
            raise ValueError(f"head_dim: {hd}; the GPU attention kernels take powers of two from 16 "
                             "(64, 128, ...); run this model on device=cpu")
        if cuda:
            self.model.fuse_projections()  # before the step is profiled: the fused experts' buffers count
        if config.activation_quantization:
            use_fp8_activations(self.model)  # after fusing: a fused projection is a new module
        num_blocks = self._pool_blocks(memory_at_start)
        self.max_model_len = resolve_max_model_len(self.spec, config, num_blocks)
        self.eos_token_ids = load_eos_token_ids(self.model_dir)
        self.kv_cache = self._make_pool(num_blocks, pool_path)
        ranks = tp.size if self.data_parallel and tp is not None else 1  # a pool a rank, all scheduled here
        host_blocks = self._host_blocks()  # each data-parallel rank a tier of its own, of this many
        self.blocks = BlockManager(num_blocks * ranks, config.cache.block_size, partitions=ranks,
                                   caching=config.cache.prefix_caching, host_blocks=host_blocks * ranks)
        self.scheduler = Scheduler(config.scheduler, self.blocks, self.max_model_len, self.eos_token_ids)
        runner = DataParallelRunner if self.data_parallel else ModelRunner
        self.runner = runner(self.model, self.kv_cache, self.max_model_len, pad_tokens=TOKEN_PAD if cuda else 1,
                             tp=tp)
        if self.blocks.host_blocks:
            self.runner.host_tier = HostTier(self.kv_cache, self.blocks.host_partition_size)
        if cuda:  # every rank of an instance captures the same graphs (their collectives inside; routed
            # experts run fused, without host syncs)
            if config.cuda_graphs:
                self.runner.capture_graphs(config.scheduler.max_num_seqs)
            prefill_graph_tokens = prefill_graph_limit(config, self.spec, ranks)
            if prefill_graph_tokens:
                self.runner.capture_prefill_graphs(prefill_graph_tokens, context=config.cache.prefix_caching)
        self.sampler = Sampler(self.eos_token_ids)
        self._arrivals = itertools.count()
        self._reserved: dict[str, list[int]] = {}
        self._lent: dict[str, list[int]] = {}  # cached blocks held for another instance to copy (`lend`)
        torch.manual_seed(config.seed)

    def _host_blocks(self) -> int:
        """Blocks of a rank's host tier: host_kv_cache_mb over the instance's ranks, each holding its heads
        of every block (tensor parallel) or whole blocks of its own pool's (data-parallel attention)."""
        mb = self.config.cache.host_kv_cache_mb
        if not mb or not self.config.cache.prefix_caching:
            return 0
        ranks = self.tp.size if self.tp is not None else 1
        kv = self.kv_cache.data  # [layers, 2, blocks, block_size, this rank's kv heads, head_dim]
        per_block = kv[:, :, 0].numel() * kv.element_size()
        return max(1, mb * 2**20 // ranks // per_block)

    def _sized_from_gpu(self) -> bool:
        cache = self.config.cache
        return self.config.device.startswith("cuda") and cache.gpu_memory_utilization > 0 and not cache.num_blocks

    def _pool_blocks(self, memory_at_start: tuple[int, int] | None) -> int:
        """The pool's blocks: as configured, or what gpu_memory_utilization leaves once the weights are
        loaded and a full step profiled; every rank of an instance the same (rank 0's block ids index
        them all), the fewest any rank has room for."""
        gpu_room = None
        if memory_at_start is not None:
            free_at_start, total = memory_at_start
            step_peak = self._step_peak(self.tp)
            gpu_room = kv_room(self.config.cache.gpu_memory_utilization, total, free_at_start,
                               torch.cuda.mem_get_info()[0], step_peak)
        num_blocks = pool_blocks(self.spec, self.config, gpu_room)
        if memory_at_start is not None and self.tp is not None:
            import torch.distributed as dist

            agreed = torch.tensor([num_blocks])
            group = self.tp.control if self.tp.control is not None else self.tp.group
            dist.all_reduce(agreed, op=dist.ReduceOp.MIN, group=group)
            num_blocks = int(agreed.item())
        return num_blocks

    def _make_pool(self, num_blocks: int, pool_path: str | None) -> KVCache:
        """The KV pool: on GPU a plain cudaMalloc (exportable through CUDA IPC: `gpu_pool`), on CPU a
        shared-memory file at `pool_path` (a transfer process maps it) or plain memory."""
        kv_dtype = self.config.cache.kv_cache_dtype
        shape = KVCache.shape(self.spec, num_blocks, self.config.cache.block_size, kv_dtype)
        dtype, device = getattr(torch, self.spec.dtype), self.config.device
        if kv_dtype == "fp8":
            dtype = torch.uint8  # codes and scales, byte for byte
        buffer, self.gpu_pool = None, None
        if device.startswith("cuda"):
            from pdpipe.ipc.cuda import CudaPool

            self.gpu_pool = CudaPool(shape, dtype, torch.device(device).index)
            buffer = self.gpu_pool.tensor
        elif pool_path:
            from pdpipe.ipc.shm import map_pool

            buffer = map_pool(pool_path, shape, dtype)
        return KVCache(self.spec, num_blocks, self.config.cache.block_size, dtype, device, buffer, kv_dtype)

    def _step_peak(self, tp: TensorParallel | None) -> int:
        """Memory a full step (max_num_batched_tokens of one prompt, logits for max_num_seqs rows) needs
        beyond what is allocated now: one such forward pass, writing no KV (every slot -1; a one-block
        throw-away cache, which every block-table entry names). Every rank of a tensor-parallel instance
        runs it at once (its collectives)."""
        from pdpipe.models.decoder import AttentionMetadata

        n = self.config.scheduler.max_num_batched_tokens
        dev = torch.device(self.config.device)
        cache = KVCache(self.spec, 1, self.config.cache.block_size, getattr(torch, self.spec.dtype), self.config.device,
                        kv_cache_dtype=self.config.cache.kv_cache_dtype)
        pages = -(-n // self.config.cache.block_size)  # every entry block 0: sliding-window layers read pages
        meta = AttentionMetadata(slot_mapping=torch.full((n,), -1, dtype=torch.long, device=dev),
                                 block_tables=torch.zeros(1, pages, dtype=torch.int32, device=dev),
                                 query_start_loc=[0, n], seq_lens=[n],
                                 query_start_loc_t=torch.tensor([0, n], dtype=torch.int32, device=dev),
                                 seq_lens_t=torch.tensor([n], dtype=torch.int32, device=dev), max_query_len=n,
                                 fresh=True)
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        hidden = self.model(torch.zeros(n, dtype=torch.long, device=dev), torch.arange(n, device=dev), cache.layers(),
                            meta)
        rows = min(n, self.config.scheduler.max_num_seqs)
        self.model.logits(hidden[:rows])
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - before
        del hidden, cache
        torch.cuda.empty_cache()
        return peak

    def add_request(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                    hold_kv: bool = False, cache_salt: str = "", pull_blocks: int = 0, pull_from: str = "") -> None:
        """Queues a request. With `hold_kv` its blocks outlive it until `release_kv` (prefill → transfer).
        Its prompt's blocks are looked up in the prefix cache under `cache_salt` (requests with different
        salts never share). `pull_blocks`: leading prompt blocks the decode instance (or `pull_from`)
        caches, copied here (`Scheduler.pulled`) instead of computed where this cache lacks them."""
        if not prompt_token_ids:
            raise RequestError("prompt: is empty; give at least one token")
        if len(prompt_token_ids) >= self.max_model_len:
            raise RequestError(f"prompt: {len(prompt_token_ids)} tokens; the limit is "
                               f"{self.max_model_len - 1} (max_model_len {self.max_model_len})")
        bad_stop = [t for t in params.stop_token_ids if not 0 <= t < self.spec.vocab_size]
        if bad_stop:
            raise RequestError(f"stop_token_ids: token id {bad_stop[0]} is outside the vocabulary "
                               f"[0, {self.spec.vocab_size})")
        bad = [t for t in prompt_token_ids if not 0 <= t < self.spec.vocab_size]
        if bad:
            raise RequestError(f"prompt: token id {bad[0]} is outside the vocabulary "
                               f"[0, {self.spec.vocab_size})")
        if self.scheduler.find(request_id) is not None:
            raise RequestError(f"request_id: {request_id!r} is already running")
        seq = Sequence(request_id, list(prompt_token_ids), params, arrival=next(self._arrivals),
                       hold_kv=hold_kv, cache_root=self.cache_root(cache_salt),
                       pull_blocks=min(max(pull_blocks, 0), reusable_blocks(len(prompt_token_ids),
                                                                          self.blocks.block_size, computes_last=True)),
                       pull_from=pull_from if pull_blocks > 0 else "")
        self.scheduler.add(seq)

    def cache_root(self, cache_salt: str = "") -> bytes | None:
        """The root of a request's block hashes here (None with prefix caching off): the model, its weights'
        quantization and KV dtype, and the request's salt."""
        if not self.blocks.caching:
            return None
        return root_hash(self.model_dir.name, self.quant.name, kv_dtype=self.kv_dtype, cache_salt=cache_salt)

    def _copy_tier(self, settle: bool = False) -> None:
        """Runs the host tier's queued copies (evicted blocks out, restored prefixes in) on every rank, ahead
        of whatever next writes or reads those blocks on its stream; with `settle`, until they are done on
        every rank (what writes next is another process). A copy that fails leaves the cache's word on
        those blocks untrue: the cache is emptied, and the failure raised."""
        copies, sync = self.blocks.take_copies(), self.blocks.take_sync()
        if copies or sync:
            self._run_copies(copies, settle=settle, sync=sync)

    def _run_copies(self, copies: list[tuple[str, int, int]], settle: bool = False, sync: bool = False,
                    behind: bool = False) -> None:
        """The host tier's copies on every rank (see ModelRunner.copy_tier). A copy that fails leaves the
        cache's word on those blocks untrue: the cache is emptied, and the failure raised."""
        try:
            self.runner.copy_tier(copies, settle, sync, behind)
        except BaseException:
            self.reset_prefix_cache()
            raise

    def reset_prefix_cache(self) -> int:
        """Forgets every cached block (POST /reset_prefix_cache); returns how many there were."""
        return self.blocks.reset_cache()

    def kv_blocks(self, request_id: str) -> list[int]:
        """Blocks holding a request's KV: a live one's, or a finished one's held for transfer."""
        if request_id in self.scheduler.held:
            return list(self.scheduler.held[request_id])
        seq = self.scheduler.find(request_id)
        if seq is None:
            raise KeyError(f"request {request_id!r} holds no blocks here")
        return list(seq.block_table)

    def release_kv(self, request_id: str) -> bool:
        return self.scheduler.release_held(request_id)

    def reserve(self, request_id: str, num_tokens: int, prompt_token_ids: list[int] | tuple[()] = (),
                cache_salt: str = "") -> Reservation | None:
        """Blocks for `num_tokens` of KV (a prompt computed elsewhere, and room for its output); None when
        they are not free. The prompt's leading blocks already in the prefix cache are taken from it
        (`cached_blocks` says how many): their KV need not come."""
        if request_id in self._reserved or self.scheduler.find(request_id) is not None:
            raise RequestError(f"request_id: {request_id!r} already holds blocks here")
        root = self.cache_root(cache_salt) if prompt_token_ids else None
        hit: list[int] = []
        if root is not None:
            bs = self.blocks.block_size
            hit = self.blocks.match(block_hashes(prompt_token_ids, bs, root),
                                    reusable_blocks(len(prompt_token_ids), bs, computes_last=False))
        if hit and not self.blocks.can_allocate(self.blocks.blocks_for(num_tokens) - len(hit), hit):
            hit = []  # the partition holding it is full: the KV comes whole, into one with room
        need = self.blocks.blocks_for(num_tokens) - len(hit)
        if not self.blocks.can_allocate(need, hit):
            return None
        self.blocks.share(hit)
        self._reserved[request_id] = hit + self.blocks.allocate(need, self.blocks.partition_of(hit[0]) if hit else None)
        self._copy_tier(settle=True)  # another process (the transfer) writes these blocks next
        return Reservation(list(self._reserved[request_id]), len(hit))

    def lend(self, request_id: str, prompt_token_ids: list[int], num_blocks: int, cache_salt: str = "") -> list[int]:
        """Holds the cached blocks of the prompt's leading `num_blocks` (fewer where the cache holds fewer)
        for another instance to copy, until `give_back`; returns their ids (in one partition)."""
        if request_id in self._lent:  # asked again: the same blocks, held once
            return list(self._lent[request_id])
        root = self.cache_root(cache_salt)
        if root is None or num_blocks <= 0:
            return []
        bs = self.blocks.block_size
        hit = self.blocks.match(block_hashes(prompt_token_ids, bs, root),
                                min(num_blocks, reusable_blocks(len(prompt_token_ids), bs, computes_last=True)))
        if hit:  # none held: nothing to give back either
            self.blocks.share(hit)
            self._lent[request_id] = hit
            self._copy_tier(settle=True)  # another process (the transfer) reads these blocks next
        return list(hit)

    def give_back(self, request_id: str) -> bool:
        """Ends a `lend`: its blocks are this cache's alone again."""
        blocks = self._lent.pop(request_id, None)
        if blocks:
            self.blocks.free(blocks)
        return blocks is not None

    @property
    def lent(self) -> list[str]:
        return list(self._lent)

    @property
    def reserved(self) -> list[str]:
        """Requests holding reserved blocks whose KV has not arrived."""
        return list(self._reserved)

    def cancel_reservation(self, request_id: str) -> bool:
        blocks = self._reserved.pop(request_id, None)
        if blocks is not None:
            self.blocks.free(blocks)
        return blocks is not None

    def add_prefilled(self, request_id: str, prompt_token_ids: list[int], first_token: int,
                      params: SamplingParams, first_logprob=None, cache_salt: str = "") -> EngineOutput | None:
        """Continues a request whose prompt KV landed in its reserved blocks, from its first token; the
        prompt's full blocks enter the prefix cache (a later turn computed here reuses them).

        Returns an output when the first token already ends it (then the blocks are freed)."""
        blocks = self._reserved.pop(request_id)
        seq = Sequence(request_id, list(prompt_token_ids), params, arrival=next(self._arrivals),
                       token_ids=list(prompt_token_ids) + [first_token], block_table=blocks,
                       num_computed_tokens=len(prompt_token_ids), cache_root=self.cache_root(cache_salt))
        if first_logprob is not None:
            seq.logprobs.append(first_logprob)
        self.scheduler.add_running(seq)
        self.scheduler.check_stop(seq, first_token)
        return self._output(seq, []) if seq.is_finished else None

    def abort_request(self, request_id: str) -> EngineOutput | None:
        seq = self.scheduler.find(request_id)
        if seq is None:
            return None
        self.scheduler.finish(seq, "abort")
        return EngineOutput(request_id=request_id, token_ids=[], finish_reason="abort")

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    def step(self, on_schedule: Callable[[SchedulerOutput], Callable[[int], None] | None] | None = None
             ) -> list[EngineOutput]:
        """One schedule → forward → sample → update. `on_schedule` sees the batch before it runs and
        may return what to call as each layer's KV is written (layer-wise transfer); a batch that
        needs no such call may replay a captured CUDA graph."""
        sched = self.scheduler.schedule()
        self._copy_tier(settle=bool(self.scheduler.pulls))  # a pull's blocks: the transfer writes them next
        outputs = [self._output(seq, []) for seq in sched.finished]
        if not sched.chunks:
            return outputs
        drawn = {c.seq: c.seq.generator.get_state() for c in sched.chunks  # only a failure uses them
                 if c.samples and c.seq.generator is not None and not c.seq.params.greedy}
        try:
            samples = self._forward_and_sample(sched, on_schedule)
        except Exception as exc:  # noqa: BLE001 — the request at fault fails alone, found below
            if device_fault(exc) or self.data_parallel:
                # with data-parallel attention the other ranks ran other sequences and may sit in a
                # collective: the group restarts (the launcher), as after a device fault
                raise
            log.warning("a step of %d requests failed (%s: %s); running them one at a time",
                        len(sched.chunks), type(exc).__name__, exc)
            sched, samples, failed = self._one_at_a_time(sched, on_schedule, drawn)
            outputs += failed
        outputs += [self._output(seq, [samples[seq].token_id]) for seq in self.scheduler.update(sched, samples)]
        self._write_ahead()
        return outputs

    def _write_ahead(self) -> None:
        """Copies the cached blocks next in line for eviction to the host tier beside the next steps (a side
        stream), so that a step's worth of blocks can be taken without copying any first — at most a quarter
        of the pool, and of the host tier (what it holds twice, on both, it holds in place of others)."""
        if not self.blocks.host_blocks:
            return
        self.blocks.write_ahead(min(self.blocks.blocks_for(self.config.scheduler.max_num_batched_tokens),
                                    self.blocks.partition_size // 4, self.blocks.host_partition_size // 4))
        copies = self.blocks.take_ahead()
        if copies:
            self._run_copies(copies, behind=True)

    def _one_at_a_time(self, sched: SchedulerOutput, on_schedule, drawn: dict) -> tuple[SchedulerOutput, dict, list]:
        """A batch that raised runs again one request at a time: one whose run still raises fails
        alone, the others get this step's token. Nothing was committed (only `update` moves a sequence
        on, and KV rewritten at the same slots is the same), and seeded draws start over."""
        for seq, state in drawn.items():
            seq.generator.set_state(state)
        kept, samples, failed = [], {}, []
        for chunk in sched.chunks:
            try:
                samples.update(self._forward_and_sample(SchedulerOutput(chunks=[chunk]), on_schedule))
                kept.append(chunk)
            except Exception as exc:  # noqa: BLE001 — this request's own failure
                if device_fault(exc):
                    raise
                failed.append(self._failed(chunk.seq, exc))
        return SchedulerOutput(chunks=kept), samples, failed

    def _failed(self, seq: Sequence, exc: Exception) -> EngineOutput:
        log.error("request %s failed its step", seq.request_id, exc_info=exc)
        self.scheduler.finish(seq, "abort")
        return EngineOutput(request_id=seq.request_id, token_ids=[], index=seq.num_output_tokens,
                            finish_reason="error", error=f"{type(exc).__name__}: {exc}")

    def _forward_and_sample(self, sched: SchedulerOutput, on_schedule) -> dict:
        on_layer_done = on_schedule(sched) if on_schedule is not None else None
        logits, seqs = self.runner.execute(sched, on_layer_done)
        return self.sampler(logits, seqs) if seqs else {}

    @staticmethod
    def _output(seq: Sequence, token_ids: list[int]) -> EngineOutput:
        logprobs = [seq.logprobs[-1]] if token_ids and seq.params.logprobs is not None else None
        index = seq.num_output_tokens - len(token_ids)
        return EngineOutput(request_id=seq.request_id, token_ids=token_ids, index=index, logprobs=logprobs,
                            finish_reason=seq.finish_reason, stop_reason=seq.stop_reason,
                            cached_tokens=seq.num_cached_tokens if index == 0 and token_ids else 0)

    def warm_up(self) -> None:
        """Runs a few throw-away requests so that the kernels live requests need are compiled now, not
        on a user's request (Triton compiles each kernel once per class of shapes, a second or more
        each): prompts alone and together, a prompt continued from a chunk (long and short remainder),
        and decode steps; on GPU first every projection at every padded token count (cuBLAS's first
        call at a shape costs milliseconds). Leaves every block free."""
        budget = min(self.config.scheduler.max_num_batched_tokens, self.max_model_len - 1)
        if self.runner.pad_tokens > 1:
            self.runner.warm_gemms(self.config.scheduler.max_num_batched_tokens, self.config.scheduler.max_num_seqs)
        gen = torch.Generator().manual_seed(0)

        def prompt(n: int) -> list[int]:
            return torch.randint(0, self.spec.vocab_size, (max(1, min(n, self.max_model_len - 3)),),
                                 generator=gen).tolist()

        params = SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True)
        # single prompts and batches of each length class Triton specialises on (1, multiples of 16, the
        # rest); the last two rounds continue their second prompt from a chunk
        rounds = [[1], [5], [16], [300], [2048], [7, 16, 100], [64, 96], [budget - 40, 300], [budget - 40, 50]]
        for r, lengths in enumerate(rounds):
            if self.blocks.blocks_for(sum(lengths) + 3 * len(lengths)) > self.blocks.partition_size:
                continue  # a small pool: that round does not fit
            for i, n in enumerate(lengths):
                self.add_request(f"warm-up-{r}-{i}", prompt(n), params)
            while self.has_unfinished():
                self.step()
        self.reset_prefix_cache()  # the throw-away prompts' KV is nobody's prefix

    def leak_free(self) -> bool:
        """The leak oracle: no live request and every block free."""
        sched = self.scheduler
        return (not sched.waiting and not sched.running and not sched.held and not sched.pull_holds
                and not self._reserved and not self._lent and self.blocks.all_free())
