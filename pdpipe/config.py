"""Configuration: frozen dataclasses, one per concern, validated on construction with messages that
name the field. The CLI is generated from their fields (see `pdpipe.cli_args`)."""
from __future__ import annotations

from dataclasses import dataclass, field

from pdpipe.models.spec import DTYPES


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

    def __post_init__(self):
        _positive(self, "block_size", "kv_cache_mb")
        if self.num_blocks < 0:
            raise ValueError(f"num_blocks: must be >= 0, got {self.num_blocks}")


@dataclass(frozen=True)
class SchedulerConfig:
    max_num_seqs: int = field(default=64, metadata={"help": "most sequences in one batch"})
    max_num_batched_tokens: int = field(default=2048, metadata={"help": "token budget of one step"})
    max_model_len: int = field(default=0, metadata={"help": "longest sequence (prompt + output); 0: "
                                                           "the model's limit, capped by the pool"})
    watermark_blocks: int = field(default=1, metadata={"help": "blocks kept free when admitting "
                                                              "new prompts, for running ones to grow"})

    def __post_init__(self):
        _positive(self, "max_num_seqs", "max_num_batched_tokens")
        if self.max_model_len < 0 or self.watermark_blocks < 0:
            raise ValueError("max_model_len and watermark_blocks must be >= 0")


@dataclass(frozen=True)
class EngineConfig:
    model: str = field(default="", metadata={"help": "model folder (Hugging Face format); empty: "
                                                     "the embedded demo model"})
    dtype: str = field(default="", metadata={"help": "weights and KV dtype; empty: config.json's",
                                             "choices": ("",) + DTYPES})
    device: str = field(default="cpu", metadata={"help": "torch device"})
    seed: int = field(default=0, metadata={"help": "seed for requests that give none"})
    cache: CacheConfig = field(default_factory=CacheConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)

    def __post_init__(self):
        if self.dtype not in ("",) + DTYPES:
            raise ValueError(f"dtype: {self.dtype!r} is not supported; use one of {', '.join(DTYPES)}")
