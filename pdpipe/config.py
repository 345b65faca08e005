"""Configuration: frozen dataclasses, one per concern, validated on construction with messages that
name the field. The CLI is generated from their fields (see `pdpipe.cli_args`)."""
from __future__ import annotations

from dataclasses import dataclass, field, fields

DTYPES = ("float32", "bfloat16", "float16")  # what weights and KV may be
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2, "uint8": 1}  # uint8: an FP8 KV pool's bytes
KV_CACHE_DTYPES = ("auto", "fp8")  # auto: the model's dtype; fp8: e4m3 with a float32 scale a token and head
FP8_KV_SCALE_BYTES = 4  # each (token, KV head) row of an FP8 pool: head_dim e4m3 codes, then its float32 scale
QUANT_SCHEMES = ("wint8", "wint4", "fp8", "block_wise_fp8")  # weight quantization (pdpipe.quant)


def _positive(obj, *names: str) -> None:
    for name in names:
        if getattr(obj, name) < 1:
            raise ValueError(f"{name}: must be >= 1, got {getattr(obj, name)!r}")


@dataclass(frozen=True)
class CacheConfig:
    block_size: int = field(default=16, metadata={"help": "tokens per KV block"})
    num_blocks: int = field(default=0, metadata={"help": "KV blocks in the pool; 0 sizes the pool "
                                                        "from kv_cache_mb"})
    kv_cache_mb: int = field(default=256, metadata={"help": "memory for the KV pool when num_blocks is 0"})
    gpu_memory_utilization: float = field(default=0.0, metadata={
        "help": "on GPU, the share of the GPU's memory this engine may use in all (as in vLLM): the KV pool "
                "gets what the weights, a full step's activations and the CUDA graphs leave of it; 0: "
                "kv_cache_mb (num_blocks, when set, wins over both)"})
    host_kv_cache_mb: int = field(default=0, metadata={
        "help": "host memory under the prefix cache (an instance's, split over its ranks: tensor-parallel ones "
                "each hold their heads, data-parallel ones their own partition's blocks): "
                "cached blocks evicted from the device pool move there, and prompts whose prefix is there "
                "take it back instead of computing it (0: no host tier)"})
    kv_cache_dtype: str = field(default="auto", metadata={
        "help": "auto: KV in the model's dtype; fp8: e4m3 with a float32 scale per token and KV head (amax / "
                "448), the scales in the pool's one allocation beside their codes, so transfers and the host "
                "tier move them with the blocks: about half of bf16's bytes",
        "choices": KV_CACHE_DTYPES})
    prefix_caching: bool = field(default=True, metadata={
        "help": "keep the KV of full blocks after their requests end, found by the chained hash of their "
                "tokens, and reuse it for prompts that start the same (false: every prompt computed whole)"})

    def __post_init__(self):
        _positive(self, "block_size", "kv_cache_mb")
        if self.host_kv_cache_mb < 0:
            raise ValueError(f"host_kv_cache_mb: must be >= 0, got {self.host_kv_cache_mb}")
        if self.kv_cache_dtype not in KV_CACHE_DTYPES:
            raise ValueError(f"kv_cache_dtype: {self.kv_cache_dtype!r}; allowed: {', '.join(KV_CACHE_DTYPES)}")
        if self.num_blocks < 0:
            raise ValueError(f"num_blocks: must be >= 0, got {self.num_blocks}")
        if not 0.0 <= self.gpu_memory_utilization < 1.0:
            raise ValueError(f"gpu_memory_utilization: {self.gpu_memory_utilization}; allowed: 0 (off) or "
                             "above 0 and below 1")


@dataclass(frozen=True)
class SchedulerConfig:
    max_num_seqs: int = field(default=64, metadata={"help": "most sequences in one batch"})
    max_num_batched_tokens: int = field(default=2048, metadata={"help": "token budget of one step"})
    max_model_len: int = field(default=0, metadata={"help": "longest sequence (prompt + output); 0: "
                                                           "the model's limit, capped by the pool"})
    watermark_blocks: int = field(default=1, metadata={"help": "blocks kept free when admitting "
                                                              "new prompts, for running ones to grow"})
    max_prefill_tokens: int = field(default=0, metadata={"help": "most prompt tokens one step computes "
                                                                "(longer prompts go in chunks); 0: the "
                                                                "step's whole token budget"})

    def __post_init__(self):
        _positive(self, "max_num_seqs", "max_num_batched_tokens")
        for name in ("max_model_len", "watermark_blocks", "max_prefill_tokens"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}: must be >= 0, got {getattr(self, name)}")


@dataclass(frozen=True)
class EngineConfig:
    model: str = field(default="", metadata={"help": "model folder (Hugging Face format); empty: "
                                                     "the embedded demo model"})
    dtype: str = field(default="", metadata={"help": "weights and KV dtype; empty: config.json's",
                                             "choices": ("",) + DTYPES})
    device: str = field(default="cpu", metadata={"help": "torch device: cpu, or cuda (the process's GPU)"})
    load_format: str = field(default="safetensors", metadata={
        "help": "safetensors; or dummy: random weights of the config's shapes, for benchmarks",
        "choices": ("safetensors", "dummy")})
    cuda_graphs: bool = field(default=True, metadata={"help": "capture decode steps as CUDA graphs (GPU)"})
    prefill_graph_tokens: int = field(default=-1, metadata={
        "help": "capture steps of whole prompts up to this many tokens as CUDA graphs (GPU; 0: none; -1: "
                "512 for dense models, 2048 for mixture-of-experts ones, whose steps stay bound by launching "
                "their kernels up to ~2k tokens): short prompts are otherwise bound by those launches"})
    expert_parallel: bool = field(default=False, metadata={
        "help": "a mixture-of-experts model on an instance of tp > 1 ranks: split the experts by id (each "
                "rank holds num_experts / tp of them whole) instead of splitting every expert's width"})
    data_parallel_attention: bool = field(default=False, metadata={
        "help": "a mixture-of-experts model on an instance of tp > 1 ranks with expert_parallel: each rank "
                "holds the whole model but its experts and serves its own sequences (its own KV pool); only "
                "the MoE layers exchange tokens"})
    quantization: str = field(default="", metadata={
        "help": "weight-only quantization of the dense projections, online from the checkpoint's weights "
                "(round to nearest, symmetric): wint8 (int8 per output channel), wint4 (int4 in groups of 128 "
                "along K, else 64, else per channel), fp8 (e4m3 per output channel), block_wise_fp8 (e4m3 in "
                "128x128 blocks); empty: none. The embeddings, the LM head and the routers stay unquantized",
        "choices": ("",) + QUANT_SCHEMES})
    moe_quantization: str = field(default="", metadata={
        "help": "the routed experts' quantization; empty: the same as quantization (but wint4 on an ERNIE "
                "mixture-of-experts model means what FastDeploy makes of it: dense wint8, experts wint4)",
        "choices": ("",) + QUANT_SCHEMES})
    quantization_ignore: tuple[str, ...] = field(default=(), metadata={
        "help": "module name patterns (fnmatch, e.g. 'model.layers.0.*') left unquantized"})
    activation_quantization: str = field(default="", metadata={
        "help": "fp8: projections with FP8 weights of a scale per output channel (quantization = fp8, or such a "
                "checkpoint) multiply prompt-sized batches (over 64 rows) on FP8 tensor cores, their activations "
                "quantized per token to e4m3 (W8A8; prefill's FLOPs halved on GPUs with FP8 tensor cores); "
                "decode-sized ones stay weight-only. Empty: weight-only everywhere",
        "choices": ("", "fp8")})
    seed: int = field(default=0, metadata={"help": "seed for requests that give none"})
    cpu_threads: int = field(default=0, metadata={
        "help": "intra-op threads (torch, OpenMP, MKL) of each engine process a launch starts: 0: the "
                "launcher divides the physical cores it may run on among them (at least 1 each); N > 0: N each; -1: "
                "whatever the environment gives (torch's default: every core, for every process)"})
    cache: CacheConfig = field(default_factory=CacheConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)

    def __post_init__(self):
        if self.dtype not in ("",) + DTYPES:
            raise ValueError(f"dtype: {self.dtype!r} is not supported; use one of {', '.join(DTYPES)}")
        if self.load_format not in ("safetensors", "dummy"):
            raise ValueError(f"load_format: {self.load_format!r}; allowed: safetensors, dummy")
        if isinstance(self.quantization_ignore, str) or not all(isinstance(p, str) for p in self.quantization_ignore):
            raise ValueError(f"quantization_ignore: a list of module name patterns, got {self.quantization_ignore!r}")
        for name in ("quantization", "moe_quantization"):
            if getattr(self, name) not in ("",) + QUANT_SCHEMES:
                raise ValueError(f"{name}: {getattr(self, name)!r}; allowed: {', '.join(QUANT_SCHEMES)} "
                                 "(or empty: none)")
        if self.activation_quantization not in ("", "fp8"):
            raise ValueError(f"activation_quantization: {self.activation_quantization!r}; allowed: fp8 (or empty: "
                             "weight-only)")
        if self.activation_quantization and self.quantization not in ("", "fp8"):
            raise ValueError(f"activation_quantization: fp8 needs FP8 weights of a scale per output channel "
                             f"(quantization = fp8, or such a checkpoint); quantization is {self.quantization!r}")
        if self.data_parallel_attention and not self.expert_parallel:
            raise ValueError("data_parallel_attention: needs expert_parallel = true (the experts split by id; "
                             "every rank holds the rest whole)")
        if self.device != "cpu" and not self.device.startswith("cuda"):
            raise ValueError(f"device: {self.device!r}; allowed: cpu, cuda, cuda:N")
        if self.cpu_threads < -1:
            raise ValueError(f"cpu_threads: must be >= 0, or -1 (the environment's), got {self.cpu_threads}")
        if self.prefill_graph_tokens < -1:
            raise ValueError(f"prefill_graph_tokens: must be >= 0, or -1 (by the model), "
                             f"got {self.prefill_graph_tokens}")


@dataclass(frozen=True)
class DeadlineConfig:
    """Seconds a request may stay in each state before the scheduler fails it and frees its blocks."""

    queued: float = field(default=120.0, metadata={"help": "waiting for decode blocks"})
    reserved: float = field(default=60.0, metadata={"help": "blocks held, prefill not started"})
    prefilling: float = field(default=120.0, metadata={"help": "prompt being computed"})
    transferring: float = field(default=60.0, metadata={"help": "KV moving to decode"})
    decoding: float = field(default=1800.0, metadata={"help": "tokens being generated"})
    heartbeat: float = field(default=5.0, metadata={
        "help": "an engine or transfer whose heartbeat (twice a second, from a thread of its own) stops "
                "this long is routed around and its requests fail; it rejoins when it beats again"})
    copy: float = field(default=30.0, metadata={
        "help": "KV copies handed to the transfer backend must land within this, or their request fails "
                "(and an aborted request's copies that never settle stop holding decode's blocks)"})
    token_gap: float = field(default=10.0, metadata={
        "help": "a stream whose next token has not come this long while later ones wait (a message lost "
                "between machines) ends with an error, and its request is aborted"})

    def __post_init__(self):
        for f in fields(self):
            if getattr(self, f.name) <= 0:
                raise ValueError(f"deadlines.{f.name}: must be > 0 seconds, got {getattr(self, f.name)}")


DISAGGREGATION = ("always", "conditional")


@dataclass(frozen=True)
class RoutingConfig:
    """How the scheduler admits requests to decode instances and where their prompts are computed."""

    disaggregation: str = field(default="conditional", metadata={
        "help": "always: every prompt on a prefill instance; conditional: short prompts, or prompts whose "
                "wait for a prefill instance would exceed their cost on the decode instance, are "
                "computed on the decode instance itself", "choices": DISAGGREGATION})
    local_prompt_tokens: int = field(default=128, metadata={
        "help": "conditional: prompts up to this many tokens are computed on their decode instance"})
    local_on_backlog: bool = field(default=False, metadata={
        "help": "conditional: also compute a longer prompt on decode when the prefill queue's expected "
                "wait exceeds its cost there (better time to first token, worse inter-token latency: "
                "see benchmarks/RESULTS.md)"})
    local_step_tokens: int = field(default=256, metadata={
        "help": "most prompt tokens a decode instance computes in one step (protects its running "
                "requests' inter-token latency)"})
    decode_busy_ms: float = field(default=0.0, metadata={
        "help": "when every decode instance's recent step takes longer than this (ms), a new request runs "
                "whole (prompt and output) on a prefill instance, as on a colocated engine; prefill "
                "instances then capture decode graphs too (0: never)"})
    reserve_output_share: float = field(default=1.0, metadata={
        "help": "share of max_tokens a decode reservation holds beyond the prompt (1: all of it, so "
                "decode does not preempt)"})
    cache_aware: bool = field(default=True, metadata={
        "help": "route by the engines' prefix caches: a request goes to the decode instance holding most of its "
                "prompt (unless that instance is far busier than the rest), its prompt to the prefill instance "
                "with the least to compute before it, and a follow-up whose uncached suffix is at most "
                "local_prompt_tokens is computed on the decode instance holding its history"})
    cache_min_tokens: int = field(default=256, metadata={
        "help": "cache_aware: a decode instance is chosen for its cache only where it holds at least this many "
                "of the prompt's tokens (a shorter shared prefix is cheap to recompute: the load is balanced)"})
    remote_hits: bool = field(default=True, metadata={
        "help": "cache_aware: where the decode instance reserving for a request (or another engine, which lends "
                "them) caches at least pull_min_tokens more of its prompt than the prefill instance computing it, "
                "the transfer copies those blocks to the prefill instance (across machines: Mooncake reads) instead "
                "of it computing them"})
    pull_min_tokens: int = field(default=64, metadata={
        "help": "remote_hits: the least a copy must bring (a copy of 64 tokens of 8B-shaped KV takes ~10 us on "
                "one GPU, ~0.3 ms over RDMA, against ~3 ms to compute them; below this the round trip is not "
                "worth it)"})
    kv_events_endpoint: str = field(default="", metadata={
        "help": "also publish every engine's KV events (vLLM's KVEventBatch, ZeroMQ PUB) at this tcp address, "
                "e.g. tcp://*:5557, for external routers (always published at ipc://<run dir>/kv-events.sock)"})
    reserve_output_max: int = field(default=1024, metadata={
        "help": "most output tokens a reservation holds: clients that leave max_tokens unset are given the "
                "whole context, and holding all of it would admit few requests; a longer output grows "
                "into free blocks (and decode preempts only when none are left)"})

    def __post_init__(self):
        if self.disaggregation not in DISAGGREGATION:
            raise ValueError(f"routing.disaggregation: {self.disaggregation!r}; allowed: {', '.join(DISAGGREGATION)}")
        if not 0.0 <= self.reserve_output_share <= 1.0:
            raise ValueError(f"routing.reserve_output_share: {self.reserve_output_share}; allowed: 0 to 1")
        for name in ("local_prompt_tokens", "reserve_output_max", "decode_busy_ms", "cache_min_tokens"):
            if getattr(self, name) < 0:
                raise ValueError(f"routing.{name}: must be >= 0, got {getattr(self, name)}")
        if self.local_step_tokens < 1:
            raise ValueError(f"routing.local_step_tokens: must be >= 1, got {self.local_step_tokens}")
        if self.kv_events_endpoint and not self.kv_events_endpoint.startswith("tcp://"):
            raise ValueError(f"routing.kv_events_endpoint: {self.kv_events_endpoint!r}; give a tcp:// address, "
                             "e.g. tcp://*:5557")

    def output_room(self, max_tokens: int) -> int:
        """Output tokens a reservation holds on decode for a request asking for `max_tokens`."""
        return min(int(max_tokens * self.reserve_output_share + 0.999), self.reserve_output_max)


ROLES = ("prefill", "decode", "mixed")


@dataclass(frozen=True)
class InstanceConfig:
    role: str = field(default="mixed", metadata={"help": "prefill | decode | mixed"})
    name: str = field(default="", metadata={"help": "empty: role-N"})
    num_blocks: int = field(default=0, metadata={"help": "KV blocks of this instance; 0: engine's"})
    gpus: tuple[int, ...] = field(default=(), metadata={"help": "physical GPU ids (empty: CPU)"})
    tp: int = field(default=1, metadata={"help": "tensor-parallel ranks: one process each, joined by "
                                                 "torch.distributed (gloo on CPU, NCCL on GPU: gpus names "
                                                 "one GPU a rank)"})
    expert_parallel: bool | None = field(default=None, metadata={
        "help": "a MoE model on this instance's ranks: experts split by id (true) or by width (false); "
                "unset: engine.expert_parallel (prefill and decode may differ)"})
    data_parallel_attention: bool | None = field(default=None, metadata={
        "help": "a MoE model on this instance's ranks: attention data-parallel (each rank its own "
                "sequences) with the experts split by id; unset: engine.data_parallel_attention"})

    def __post_init__(self):
        if self.role not in ROLES:
            raise ValueError(f"instances.role: {self.role!r}; allowed: {', '.join(ROLES)}")
        if self.tp < 1:
            raise ValueError(f"instances.tp: {self.tp}; allowed: 1 or more")
        if "@" in self.name or "." in self.name:
            raise ValueError(f"instances.name: {self.name!r}; '@' and '.' are kept for ranks' pools and processes")



@dataclass(frozen=True)
class ApiConfig:
    host: str = field(default="127.0.0.1", metadata={"help": "address the HTTP front-end listens on"})
    port: int = field(default=8000, metadata={"help": "HTTP port"})
    served_model_name: str = field(default="", metadata={"help": "model name clients send; empty: the "
                                                                 "model folder's name"})
    max_body_bytes: int = field(default=4 << 20, metadata={"help": "largest request body accepted"})
    max_waiting: int = field(default=512, metadata={
        "help": "requests waiting for their first token beyond which a new one is refused at once with 429 "
                "and Retry-After (0: no limit)"})
    max_waiting_prompt_tokens: int = field(default=0, metadata={
        "help": "the same bound on their prompt tokens (0: no limit)"})
    drain_s: float = field(default=30.0, metadata={
        "help": "on SIGTERM/SIGINT the front-end takes no new request and gives those in flight this long "
                "to finish; then their streams end with an error event and [DONE]"})
    api_key: str = field(default="", repr=False, metadata={
        "help": "every route but /health and /metrics needs 'Authorization: Bearer <api_key>' (else 401); "
                "empty: no key"})

    def __post_init__(self):
        if not 0 <= self.port < 65536:
            raise ValueError(f"api.port: {self.port} is not a TCP port")
        if not isinstance(self.api_key, str) or not all("!" <= c <= "~" for c in self.api_key):
            raise ValueError("api.api_key: must be a string of printable ASCII characters without whitespace "
                             "(empty: no key)")
        for name in ("max_waiting", "max_waiting_prompt_tokens", "drain_s"):
            if getattr(self, name) < 0:
                raise ValueError(f"api.{name}: {getattr(self, name)}; allowed: 0 (no limit) or a positive count")


@dataclass(frozen=True)
class ClusterConfig:
    """Across machines: where the registry and topics live, and how KV moves between machines."""

    redis_url: str = field(default="", metadata={"help": "Redis (>= 6.2) shared by every machine; empty: "
                                                        "a single machine, no Redis"})
    name: str = field(default="default", metadata={"help": "cluster name: machines sharing the Redis and the "
                                                           "name serve together"})
    machine: str = field(default="", metadata={"help": "this machine's name, unique in the cluster"})
    frontend: bool = field(default=True, metadata={"help": "run the API front-end and scheduler here"})
    advertise_host: str = field(default="127.0.0.1", metadata={"help": "address peers reach this machine's "
                                                                        "KV transfer on"})
    protocol: str = field(default="tcp", metadata={"help": "Mooncake protocol: rdma (with NICs) or tcp"})
    nics: str = field(default="", metadata={"help": "RDMA devices for Mooncake, comma-separated (e.g. "
                                                    "mlx5_0,mlx5_1); empty with tcp"})
    ttl: float = field(default=6.0, metadata={"help": "seconds a registry entry or topic outlives its "
                                                      "last heartbeat or message"})

    def __post_init__(self):
        if self.protocol not in ("tcp", "rdma"):
            raise ValueError(f"cluster.protocol: {self.protocol!r}; allowed: tcp, rdma")
        if self.redis_url and not self.redis_url.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError(f"cluster.redis_url: {self.redis_url!r} is not a redis:// URL")
        if self.redis_url and not self.machine:
            raise ValueError("cluster.machine: required with cluster.redis_url (names this machine)")
        if self.ttl <= 0:
            raise ValueError(f"cluster.ttl: must be > 0, got {self.ttl}")


TP_STORE_ENV = "PDPIPE_TP_STORE"  # the launcher names a fresh rendezvous file each time a group starts


def tp_group_of(name: str) -> tuple[str, int]:
    """(instance, rank) of a process name: "mixed-0" is rank 0 of mixed-0, "mixed-0.rank1" its rank 1."""
    instance, _, rank = name.partition(".rank")
    return instance, int(rank or 0)


def transfer_name(machine: str) -> str:
    """The transfer process of a machine ("transfer" on a single machine)."""
    return f"transfer-{machine}" if machine else "transfer"


@dataclass(frozen=True)
class LaunchConfig:
    """One machine's processes: the model, the instances and their roles, the front-end."""

    name: str = "default"
    run_dir: str = ""  # empty: /tmp/pdpipe-<name>
    ready_timeout: float = 180.0
    engine: EngineConfig = field(default_factory=EngineConfig)
    api: ApiConfig = field(default_factory=ApiConfig)
    deadlines: DeadlineConfig = field(default_factory=DeadlineConfig)
    routing: RoutingConfig = field(default_factory=RoutingConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    instances: tuple[InstanceConfig, ...] = (InstanceConfig("prefill"), InstanceConfig("decode"))

    def __post_init__(self):
        roles = [i.role for i in self.instances]
        if not roles and not self.cluster.redis_url:
            raise ValueError("instances: at least one instance is needed")
        if ("prefill" in roles) != ("decode" in roles) and not self.cluster.redis_url:
            raise ValueError("instances: prefill and decode instances come together (or use mixed)")
        names = [n for n, _ in self.named_instances()]
        if len(set(names)) != len(names):
            raise ValueError(f"instances.name: duplicate names in {names}")
        if self.engine.device.startswith("cuda"):
            missing = [n for n, inst in self.named_instances() if not inst.gpus]
            if missing:
                raise ValueError(f"instances.gpus: engine.device is {self.engine.device!r}, so every instance "
                                 f"names its GPU ids; missing for {', '.join(missing)}")
        for name, inst in self.named_instances():
            data_parallel = (self.engine.data_parallel_attention if inst.data_parallel_attention is None
                             else inst.data_parallel_attention)
            expert_parallel = self.engine.expert_parallel if inst.expert_parallel is None else inst.expert_parallel
            if data_parallel and not expert_parallel:
                raise ValueError(f"instances.data_parallel_attention: {name} needs expert_parallel = true (the "
                                 "experts split by id)")
        if self.engine.device.startswith("cuda"):
            for name, inst in self.named_instances():
                if inst.tp > 1 and len(inst.gpus) != inst.tp:
                    raise ValueError(f"instances.gpus: {name} has tp = {inst.tp}, so it names {inst.tp} GPU ids "
                                     f"(one a rank), not {list(inst.gpus)}")

    def named_instances(self) -> list[tuple[str, InstanceConfig]]:
        counts: dict[str, int] = {}
        out = []
        prefix = f"{self.cluster.machine}-" if self.cluster.machine else ""
        for inst in self.instances:
            n = counts.get(inst.role, 0)
            counts[inst.role] = n + 1
            out.append((inst.name or f"{prefix}{inst.role}-{n}", inst))
        return out

    def local_processes(self) -> list[tuple[str, str]]:
        """(role, name) of every process this machine runs, in start order."""
        engines = []
        for name, inst in self.named_instances():  # a tensor-parallel instance's other ranks follow it
            engines += [(inst.role, name)] + [("rank", f"{name}.rank{r}") for r in range(1, inst.tp)]
        front = [("scheduler", "scheduler")] if self.cluster.frontend else []
        relay = [("relay", "relay")] if self.cluster.redis_url else []
        transfer = [("transfer", transfer_name(self.cluster.machine))] if any(  # ranks need none of their own
            r in ("prefill", "decode") for r, _ in engines) else []
        api = [("api", "api")] if self.cluster.frontend else []
        return [*front, *relay, *transfer, *engines, *api]

    @property
    def resolved_run_dir(self) -> str:
        return self.run_dir or f"/tmp/pdpipe-{self.name}"


def config_from_dict(cls, data: dict, where: str = ""):
    """Builds a (nested) config dataclass from parsed TOML/JSON; an unknown key is an error naming it."""
    import dataclasses
    import typing

    if not isinstance(data, dict):
        raise ValueError(f"{where or cls.__name__}: expected a table, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    values = {}
    for key, value in data.items():
        path = f"{where}.{key}" if where else key
        if key not in fields:
            raise ValueError(f"{path}: unknown setting; known: {', '.join(fields)}")
        hint = hints[key]
        if dataclasses.is_dataclass(hint):
            value = config_from_dict(hint, value, path)
        elif key == "instances":
            value = tuple(config_from_dict(InstanceConfig, v, f"{path}[{i}]") for i, v in enumerate(value))
        elif isinstance(value, list):
            value = tuple(value)
        values[key] = value
    try:
        return cls(**values)
    except TypeError as exc:
        raise ValueError(f"{where or cls.__name__}: {exc}") from None


def load_launch_config(path: str) -> LaunchConfig:
    import tomllib

    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except FileNotFoundError:
        raise ValueError(f"{path}: no such config file") from None
    except tomllib.TOMLDecodeError as exc:
        raise ValueError(f"{path}: not valid TOML ({exc})") from None
    return config_from_dict(LaunchConfig, data)
