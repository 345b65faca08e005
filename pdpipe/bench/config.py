"""The benchmarks' settings, one frozen dataclass per concern; the CLI flags are generated from them."""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

DATASETS = ("random", "shared-prefix", "sharegpt", "multi-turn", "mooncake-trace")
ENDPOINTS = ("completions", "chat")
SLO_METRICS = ("ttft", "tpot", "e2e")


def parse_range(text: str, what: str) -> tuple[int, int]:
    """'4:40' → (4, 40); '16' → (16, 16). Bounds are inclusive."""
    parts = text.split(":")
    try:
        low, high = (int(parts[0]), int(parts[-1])) if len(parts) <= 2 else (0, 0)
    except ValueError:
        low = high = 0
    if low < 1 or high < low:
        raise ValueError(f"{what}: expected N or MIN:MAX with 1 <= MIN <= MAX, got {text!r}")
    return low, high


def parse_slos(items: tuple[str, ...] | list[str]) -> dict[str, float]:
    """('ttft:600', 'tpot:15') → {'ttft': 600.0, 'tpot': 15.0}, in milliseconds."""
    slos = {}
    for item in items:
        name, _, value = item.partition(":")
        if name not in SLO_METRICS or not value:
            raise ValueError(f"slo: expected METRIC:MS with METRIC in {', '.join(SLO_METRICS)}, got {item!r}")
        slos[name] = float(value)
        if not slos[name] > 0:
            raise ValueError(f"slo: {item!r} must be a positive number of milliseconds")
    return slos


@dataclass(frozen=True)
class WorkloadConfig:
    """What is sent: the same workload (and seed) gives the same prompts and arrival times."""
    dataset: str = field(default="random", metadata={"help": "prompt source", "choices": DATASETS})
    num_prompts: int = field(default=100, metadata={"help": "requests to send"})
    input_len: str = field(default="1024", metadata={
        "help": "prompt tokens, N or MIN:MAX (uniform); for shared-prefix, the suffix after the prefix"})
    output_len: str = field(default="", metadata={
        "help": "max_tokens, N or MIN:MAX (uniform); random datasets default to 128; for sharegpt a cap "
                "on the reference reply's length (its MAX)"})
    vocab_size: int = field(default=500, metadata={
        "help": "random token ids are drawn from [10, vocab_size); pass the served model's vocabulary "
                "(the demo model's is 512)"})
    num_prefixes: int = field(default=4, metadata={
        "help": "shared-prefix: distinct prefixes; multi-turn: distinct system prompts (sessions take them in turn)"})
    prefix_len: int = field(default=256, metadata={
        "help": "shared-prefix: tokens in each prefix; multi-turn: in each system prompt"})
    turns: int = field(default=4, metadata={
        "help": "multi-turn: turns a session (num_prompts counts sessions, request_rate their arrivals; a "
                "turn's prompt is the previous prompt, its reply's token ids and input_len new tokens)"})
    think_time: float = field(default=1.0, metadata={"help": "multi-turn: seconds between a reply and the next turn"})
    dataset_path: str = field(default="", metadata={
        "help": "sharegpt: the JSON file; mooncake-trace: the JSONL trace (timestamp ms, input_length, "
                "output_length, hash_ids); nothing is downloaded"})
    seed: int = field(default=0, metadata={"help": "seeds the prompts and the arrival times"})
    ignore_eos: bool = field(default=False, metadata={"help": "generate exactly max_tokens (vLLM's extra)"})
    temperature: float = field(default=0.0, metadata={"help": "sampling temperature sent with each request"})

    def __post_init__(self):
        if self.num_prompts < 1:
            raise ValueError(f"num_prompts: must be >= 1, got {self.num_prompts}")
        parse_range(self.input_len, "input_len")
        if self.output_len:
            parse_range(self.output_len, "output_len")
        if self.dataset in ("sharegpt", "mooncake-trace") and not self.dataset_path:
            raise ValueError(f"dataset_path: required with --dataset {self.dataset}")
        if self.vocab_size <= 10:
            raise ValueError(f"vocab_size: must be > 10, got {self.vocab_size}")
        if self.turns < 1 or self.think_time < 0:
            raise ValueError(f"turns: must be >= 1 and think_time >= 0, got {self.turns} and {self.think_time}")


@dataclass(frozen=True)
class LoadConfig:
    """How requests arrive."""
    request_rate: float = field(default=math.inf, metadata={"help": "requests/s; inf sends all at once"})
    burstiness: float = field(default=1.0, metadata={
        "help": "gamma shape of the inter-arrival times: 1 is Poisson, below 1 burstier, above steadier"})
    max_concurrency: int = field(default=0, metadata={"help": "at most this many requests in flight; 0: no cap"})

    def __post_init__(self):
        if not self.request_rate > 0:
            raise ValueError(f"request_rate: must be > 0 (inf for all at once), got {self.request_rate}")
        if not self.burstiness > 0:
            raise ValueError(f"burstiness: must be > 0, got {self.burstiness}")
        if self.max_concurrency < 0:
            raise ValueError(f"max_concurrency: must be >= 0, got {self.max_concurrency}")


@dataclass(frozen=True)
class ServeConfig:
    """`pdpipe bench serve`: one workload at one arrival process against a running server."""
    workload: WorkloadConfig = WorkloadConfig()
    load: LoadConfig = LoadConfig()
    base_url: str = field(default="", metadata={
        "help": "the server; empty: the --config's api port, else http://127.0.0.1:8000"})
    endpoint: str = field(default="completions", metadata={"help": "OpenAI route", "choices": ENDPOINTS})
    model: str = field(default="", metadata={"help": "model name; empty: the first of GET /v1/models"})
    slo: tuple[str, ...] = ()  # METRIC:MS items; a flag of its own (nargs), see pdpipe.bench.serve
    return_token_ids: bool = field(default=True, metadata={
        "help": "ask for each chunk's token ids (counts tokens whose text is empty)"})
    request_timeout: float = field(default=600.0, metadata={"help": "seconds before a request is abandoned"})
    result_file: str = field(default="", metadata={"help": "write the JSON result here"})
    run_dir: str = field(default="", metadata={
        "help": "the launch's run dir: split each request's TTFT by stage from the scheduler's traces"})
    config: str = field(default="", metadata={"help": "or: the launch config (its run dir and api port)"})
    api_key: str = field(default="", repr=False, metadata={
        "help": "sent as 'Authorization: Bearer KEY'; empty: the --config's api.api_key, else $OPENAI_API_KEY"})
    progress: bool = field(default=True, metadata={"help": "show a progress bar"})

    def __post_init__(self):
        parse_slos(self.slo)
        if self.request_timeout <= 0:
            raise ValueError(f"request_timeout: must be > 0, got {self.request_timeout}")


@dataclass(frozen=True)
class CompareConfig:
    """`pdpipe bench compare`: each launch config in turn, swept over request rates."""
    configs: tuple[str, ...] = ()  # positional
    workload: WorkloadConfig = WorkloadConfig()
    request_rates: str = field(default="1,2,4,8", metadata={"help": "comma-separated requests/s to sweep"})
    burstiness: float = field(default=1.0, metadata={"help": "as for serve"})
    max_concurrency: int = field(default=0, metadata={"help": "as for serve; 0: no cap"})
    slo: tuple[str, ...] = ()
    slo_attainment: float = field(default=0.9, metadata={
        "help": "goodput is the highest rate up to which this fraction of requests meets every SLO"})
    out: str = field(default="bench-compare", metadata={"help": "folder for compare.json and the plots"})
    api_key: str = field(default="", repr=False, metadata={
        "help": "sent as 'Authorization: Bearer KEY'; empty: each config's api.api_key, else $OPENAI_API_KEY"})
    progress: bool = field(default=False, metadata={"help": "a progress bar per rate"})

    def __post_init__(self):
        rates = self.rates
        if not rates or any(not r > 0 for r in rates) or list(rates) != sorted(set(rates)):
            raise ValueError(f"request_rates: expected increasing positive numbers, got {self.request_rates!r}")
        parse_slos(self.slo)
        if not 0 < self.slo_attainment <= 1:
            raise ValueError(f"slo_attainment: must be in (0, 1], got {self.slo_attainment}")

    @property
    def rates(self) -> tuple[float, ...]:
        try:
            return tuple(float(r) for r in self.request_rates.split(",") if r.strip())
        except ValueError:
            raise ValueError(f"request_rates: not numbers: {self.request_rates!r}") from None


def recorded_settings(cfg: ServeConfig | CompareConfig) -> dict:
    """The settings as a result file keeps them: whether a key was sent, not the key."""
    return {**asdict(cfg), "api_key": "(set)" if cfg.api_key else ""}
