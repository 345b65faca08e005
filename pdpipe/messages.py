"""Every struct that crosses a process boundary, in one place: tagged msgspec Structs, msgpack on the wire."""
from __future__ import annotations

import enum

import msgspec


class SamplingParams(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """How to pick tokens and when to stop. Invalid values raise ValueError naming the field."""

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 (or -1): off
    min_p: float = 0.0
    seed: int | None = None
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    stop: list[str] = []
    stop_token_ids: list[int] = []
    ignore_eos: bool = False
    min_tokens: int = 0
    logprobs: int | None = None  # None: none; k: the chosen token's and the k most likely alternatives
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False

    def __post_init__(self):
        _check(self.max_tokens >= 1, "max_tokens", self.max_tokens, "an integer >= 1")
        _check(0.0 <= self.temperature <= 100.0, "temperature", self.temperature, "0 (greedy) to 100")
        _check(0.0 < self.top_p <= 1.0, "top_p", self.top_p, "in (0, 1]")
        _check(self.top_k >= -1, "top_k", self.top_k, "-1 or 0 (off), or a positive integer")
        _check(0.0 <= self.min_p <= 1.0, "min_p", self.min_p, "in [0, 1]")
        _check(0.01 <= self.repetition_penalty <= 2.0, "repetition_penalty", self.repetition_penalty,
               "from 0.01 to 2")
        _check(-2.0 <= self.presence_penalty <= 2.0, "presence_penalty", self.presence_penalty, "[-2, 2]")
        _check(-2.0 <= self.frequency_penalty <= 2.0, "frequency_penalty", self.frequency_penalty,
               "[-2, 2]")
        _check(0 <= self.min_tokens <= self.max_tokens, "min_tokens", self.min_tokens,
               "0 to max_tokens")
        _check(self.logprobs is None or 0 <= self.logprobs <= 20, "logprobs", self.logprobs,
               "None or 0 to 20")
        _check(all(isinstance(s, str) and s for s in self.stop), "stop", self.stop,
               "a list of non-empty strings")
        _check(len(self.stop) <= MAX_STOP_STRINGS and sum(len(s.encode()) for s in self.stop) <= MAX_STOP_BYTES,
               "stop", self.stop, f"at most {MAX_STOP_STRINGS} strings of {MAX_STOP_BYTES} bytes in all")
        _check(all(isinstance(t, int) and 0 <= t < INT32 for t in self.stop_token_ids)
               and len(self.stop_token_ids) <= MAX_STOP_STRINGS, "stop_token_ids", self.stop_token_ids,
               f"at most {MAX_STOP_STRINGS} token ids of the vocabulary")
        _check(self.max_tokens < INT32, "max_tokens", self.max_tokens, "an integer from 1 to 2**31 - 1")
        _check(self.top_k < INT32, "top_k", self.top_k, "-1 or 0 (off), or a positive integer below 2**31")
        _check(self.seed is None or -INT64 <= self.seed < INT64, "seed", self.seed,
               "an integer from -2**63 to 2**63 - 1")

    @property
    def greedy(self) -> bool:
        """Temperatures below 1e-5 are greedy, as in vLLM (dividing by one would overflow)."""
        return self.temperature < GREEDY_BELOW


MAX_STOP_STRINGS = 64  # stop strings a request may give (OpenAI allows 4), and stop token ids
MAX_STOP_BYTES = 16384  # their total size: matching them costs the front-end work at every token
INT32, INT64 = 2 ** 31, 2 ** 63
GREEDY_BELOW = 1e-5  # temperatures below this sample greedily


def _check(ok: bool, field: str, value, allowed: str) -> None:
    if not ok:
        shown = repr(value)
        shown = shown if len(shown) <= 120 else shown[:100] + f"... ({len(shown)} characters)"
        raise ValueError(f"{field}: {shown} is out of range; allowed: {allowed}")


class TokenLogprob(msgspec.Struct, frozen=True, array_like=True):
    """The chosen token's log-probability under the model, and the most likely alternatives."""

    token_id: int
    logprob: float
    top: list[tuple[int, float]] = []


class EngineOutput(msgspec.Struct, frozen=True, kw_only=True, tag=True):
    """New tokens of one request from one engine step; `finish_reason` set on its last one."""

    request_id: str
    token_ids: list[int]
    index: int = 0  # position of token_ids[0] among the request's output tokens
    logprobs: list[TokenLogprob] | None = None
    finish_reason: str | None = None  # "stop" | "length" | "abort" | "error"
    stop_reason: int | str | None = None  # the stop token id or stop string that ended it
    error: str | None = None
    status: int = 0  # with an error: the HTTP status it means (503 an instance died, 504 a deadline); 0: 500
    cached_tokens: int = 0  # with its first token: prompt tokens whose KV came from a prefix cache, not computed


# ---- the pipeline's wire messages (prefill/decode disaggregation) --------------------------------
# Every struct is tagged with its class name, so each process decodes its inbox as one union.


class Msg(msgspec.Struct, frozen=True, kw_only=True, tag=True):
    """Base of every wire message."""


class NewRequest(Msg, frozen=True):  # api → scheduler
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    arrival: float
    cache_salt: str = ""  # requests share cached KV only under the same salt


class AbortRequest(Msg, frozen=True):  # api → scheduler: client gone, or a stop string matched
    request_id: str
    reason: str = "abort"


class Reserve(Msg, frozen=True):  # scheduler → decode: hold blocks for this prompt's KV and its output
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    transfer: str  # the transfer process that writes the prompt's KV: it gets the block ids
    num_tokens: int = 0  # tokens of room to hold: the prompt and the output share (0: the prompt only)
    cache_salt: str = ""


class Reserved(Msg, frozen=True):  # decode → scheduler; block_ids None when they were not free
    request_id: str
    instance: str
    block_ids: list[int] | None
    free_blocks: int
    cached_blocks: int = 0  # leading prompt blocks whose KV decode's prefix cache held: they do not move


class DecodeBlocks(Msg, frozen=True):  # decode → transfer: where the prompt's KV goes (the job may not exist yet)
    request_id: str
    instance: str
    block_ids: list[int]  # for the prompt's blocks after the first `skip`
    pool: str = ""  # a data-parallel rank's pool ("instance@rank"; the ids then its own); empty: the instance's
    skip: int = 0  # leading prompt blocks decode already holds (its prefix cache): not moved
    held_ids: list[int] = []  # ... their ids (in `pool`): a prefill instance may copy them instead of computing


class Prefill(Msg, frozen=True):  # scheduler → prefill (decode_instance named; its blocks reach the transfer
    # from decode), or scheduler → mixed or decode instance (decode_instance empty: the prompt is computed there)
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    decode_instance: str = ""
    cache_salt: str = ""
    pull_blocks: int = 0  # leading prompt blocks the decode instance reserving for it caches: copied from there
    # (by the transfer, once decode's blocks are known) instead of computed, where this instance lacks them
    pull_from: str = ""  # ... or, named, another prefill instance that caches them (it lends them: LendBlocks)


class PullStart(Msg, frozen=True):  # prefill → transfer: copy decode's cached prompt blocks into these
    request_id: str
    instance: str
    block_ids: list[int]  # for prompt blocks first … first+len-1
    first: int
    pool: str = ""  # as DecodeBlocks.pool
    source: str = ""  # the prefill instance lending the blocks (Prefill.pull_from); empty: the decode instance


class LendBlocks(Msg, frozen=True):  # scheduler → a prefill instance caching a prompt's leading blocks that
    # another one (on `transfer`'s machine) computes: it holds up to `blocks` of them until ReturnBlocks
    request_id: str
    prompt_token_ids: list[int]
    blocks: int
    transfer: str  # the transfer that copies them: it gets their ids (LentBlocks)
    cache_salt: str = ""


class LentBlocks(Msg, frozen=True):  # lending prefill instance → transfer (or the scheduler, for a dead lender)
    request_id: str
    instance: str
    held_ids: list[int]  # its ids of the prompt's leading blocks, held until ReturnBlocks (empty: none)
    pool: str = ""  # as DecodeBlocks.pool


class ReturnBlocks(Msg, frozen=True):  # transfer (or the scheduler, for a dead transfer) → lending instance
    request_id: str


class Pulled(Msg, frozen=True):  # transfer (or the scheduler, for a dead transfer) → prefill
    request_id: str
    blocks: int  # leading blocks of the PullStart that hold decode's KV now (0: none; the prefill computes them)


class TransferStart(Msg, frozen=True):  # prefill → transfer: these blocks will move, layer by layer
    request_id: str
    src_instance: str
    src_block_ids: list[int]
    dst_instance: str  # its blocks come from decode itself (DecodeBlocks)
    src_pool: str = ""  # as DecodeBlocks.pool


class LayersReady(Msg, frozen=True):  # prefill → transfer: layers layer-count+1 … layer of these requests are final
    request_ids: list[str]
    layer: int
    count: int = 1


class PrefillDone(Msg, frozen=True):  # prefill → transfer: every layer written; the first token
    request_id: str
    first_token: int
    first_logprob: TokenLogprob | None = None


class KVLanded(Msg, frozen=True):  # transfer → decode: all layers are in the reserved blocks
    request_id: str
    first_token: int
    first_logprob: TokenLogprob | None = None


class TransferDone(Msg, frozen=True):  # transfer → prefill: the source blocks may be freed
    request_id: str


class Free(Msg, frozen=True):  # scheduler → engine (through transfer for decode): drop the request, free its blocks
    request_id: str
    reason: str = "abort"


class Freed(Msg, frozen=True):  # engine → scheduler: an ended request's blocks are free here (its room can be reused)
    request_id: str
    instance: str


class AbortTransfer(Msg, frozen=True):  # scheduler → transfer: stop moving, then pass Free to the decode instance
    request_id: str
    decode_instance: str
    reason: str = "abort"


class Handler:
    """A process's logic as a handler table: a message of type T goes to the method `_on_T`."""

    name = "process"

    def handle(self, msg: Msg | EngineOutput) -> None:
        handler = getattr(self, "_on_" + type(msg).__name__, None)
        if handler is None:
            raise TypeError(f"{self.name} cannot handle {type(msg).__name__}")
        handler(msg)


class State(enum.StrEnum):
    """A request's lifecycle: the first five in the order a request moves through them (a prompt
    computed on its decode instance skips RESERVED and TRANSFERRING), then the three ends."""

    QUEUED = "QUEUED"
    RESERVED = "RESERVED"
    PREFILLING = "PREFILLING"
    TRANSFERRING = "TRANSFERRING"
    DECODING = "DECODING"
    FINISHED = "FINISHED"
    ABORTED = "ABORTED"
    FAILED = "FAILED"


class StateEvent(Msg, frozen=True):  # any process → scheduler: a request changed state (also the trace)
    request_id: str
    state: State  # a sender may give the name as a plain string: it encodes the same
    instance: str
    time: float
    detail: str = ""


class InstanceStats(Msg, frozen=True):  # every process → scheduler, a few times a second
    instance: str
    role: str
    time: float
    weights: str = ""  # an engine's weight quantization (QuantPlan.name; "" none) and what its KV is
    kv_dtype: str = ""
    num_blocks: int = 0
    free_blocks: int = 0
    pool_blocks: int = 0  # data-parallel attention: one rank's pool, what one request's KV can take,
    pool_free_blocks: int = 0  # and the most free in one of them (pool_blocks 0: num_blocks, free_blocks)
    running: int = 0
    waiting: int = 0
    inbox: int = 0
    queued_prompt_tokens: int = 0
    transfers_in_flight: int = 0
    bytes_in_flight: int = 0
    bytes_moved: int = 0
    seconds_moving: float = 0.0
    paused: bool = False
    block_size: int = 0
    max_num_seqs: int = 0
    preemptions: int = 0  # running requests sent back to be recomputed, since start
    step_seconds: float = 0.0  # recent mean of a busy step
    prefill_tokens_per_s: float = 0.0  # recent prompt tokens computed per second of stepping
    busy_seconds: float = 0.0  # time spent stepping, since start
    prompt_tokens: int = 0  # prompt tokens computed, since start
    gpu_memory_used: int = 0  # bytes on its GPU (NVML; all processes'), 0 without a GPU
    gpu_memory_total: int = 0
    gpu_utilization: int = -1  # percent; -1 without a GPU
    cached_blocks: int = 0  # blocks the prefix cache holds (in use or free: free_blocks counts those free)
    prefix_query_tokens: int = 0  # prompt tokens looked up in the prefix cache, since start
    prefix_hit_tokens: int = 0  # of them, found there (their KV reused, not computed)
    prefix_hit_tokens_host: int = 0  # of the hits, those found in the host tier (copied back, not computed)
    prefix_hit_tokens_remote: int = 0  # of the hits, those copied from the decode instance's cache (a pull)
    host_blocks: int = 0  # the host tier's blocks (0: none)
    host_cached_blocks: int = 0
    host_bytes_out: int = 0  # KV copied device → host tier, since start
    host_bytes_in: int = 0  # and back
    blocks_sent: int = 0  # transfer: prompt blocks moved prefill → decode, since start
    blocks_skipped: int = 0  # transfer: prompt blocks not moved, decode's prefix cache holding them
    blocks_pulled: int = 0  # transfer: cached prompt blocks copied decode → prefill instead of computed


class Ready(Msg, frozen=True):  # every process → launcher, once it can serve
    instance: str
    pid: int


class PoolInfo(Msg, frozen=True):  # engine → transfer (through the run directory): where its KV pool lives
    instance: str
    path: str  # CPU: the shared-memory file
    shape: list[int]
    dtype: str
    kv_dtype: str = ""  # what the KV is (the model's dtype, fp8_e4m3); `dtype` is its storage's
    weights: str = ""  # the weights' quantization (QuantPlan.name; "" none): KV of other weights is not this KV
    gpu: int = -1  # GPU: physical device id, IPC handle of the pool and its offset in the allocation
    ipc_handle: bytes = b""
    ipc_offset: int = 0
    segment: str = ""  # across machines: the Mooncake segment ("host:port") that registered it
    base_addr: int = 0  # ... and the pool's address there
    machine: str = ""
    pid: int = 0  # the engine process that made it: a restarted engine's pool is another, at the same path
    rank: int = 0  # a tensor-parallel instance has a pool per rank, holding these key/value heads
    kv_heads: list[int] = []  # (the whole model's head ids; empty: all of them, in order)
    tp: int = 1  # ... of its `tp` ranks, all from one start of the group (`group`)
    group: str = ""
    data_parallel: bool = False  # data-parallel attention: each rank's pool holds every head of its own
    # sequences; the transfer registers it as the one-rank pool "instance@rank"


class Forward(Msg, frozen=True):  # a local process → its machine's relay: deliver to a process on another machine
    dest: str
    payload: bytes


class Pause(Msg, frozen=True):  # debugging: an engine stops stepping and taking KV until resumed
    paused: bool


class Shutdown(Msg, frozen=True):
    reason: str = ""


class KVEvents(Msg, frozen=True):  # engine → scheduler: its prefix cache's changes, as kv_events.KVEventBatch
    instance: str  # payloads (msgpack), one a data-parallel rank with changes; the scheduler indexes and
    batches: list[bytes]  # republishes them


class ResetPrefixCache(Msg, frozen=True):  # scheduler → engines (POST /reset_prefix_cache): forget every cached block
    pass


class ProcessDown(Msg, frozen=True):  # launcher → scheduler (and api): a local process died; it is being restarted
    name: str
    role: str
    detail: str = ""


class ProcessUp(Msg, frozen=True):  # launcher → scheduler: a restarted process is ready again
    name: str
    role: str


class Heartbeat(Msg, frozen=True):  # engine, transfer → scheduler, from a thread of their own: alive and not frozen
    instance: str
    role: str


class DropAll(Msg, frozen=True):  # launcher → engines, transfer: the scheduler died; every request it knew is gone
    reason: str


class ControlRequest(msgspec.Struct, frozen=True, kw_only=True):  # pdpipe CLI / api → scheduler (REQ/REP)
    op: str  # "snapshot" | "trace" | "pause" | "resume" | "reset_prefix_cache"
    request_id: str = ""
    instance: str = ""


Message = (NewRequest | AbortRequest | Reserve | Reserved | DecodeBlocks | Prefill | PullStart | Pulled
           | LendBlocks | LentBlocks | ReturnBlocks
           | TransferStart | LayersReady
           | PrefillDone | KVLanded | TransferDone | Free | Freed | AbortTransfer | StateEvent | InstanceStats
           | Ready | PoolInfo | Forward | Pause | Shutdown | ProcessDown | ProcessUp | DropAll | Heartbeat
           | ResetPrefixCache | KVEvents
           | EngineOutput)

_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(Message)


def encode(msg: Msg | EngineOutput) -> bytes:
    return _encoder.encode(msg)


def decode(data: bytes) -> Msg | EngineOutput:
    return _decoder.decode(data)


# ---- what Redis holds across machines (pdpipe/cluster.py) -----------------------------------------


class Envelope(msgspec.Struct, array_like=True):
    """A message on a process's Redis topic."""

    expires: float  # wall-clock time after which the message is dropped unread
    payload: bytes  # an encoded pdpipe message


class InstanceEntry(msgspec.Struct, frozen=True):
    """A live instance in the registry, refreshed by its machine's relay."""

    name: str
    role: str  # prefill | decode | mixed
    machine: str
    time: float
    free_blocks: int = 0
    num_blocks: int = 0
    running: int = 0
