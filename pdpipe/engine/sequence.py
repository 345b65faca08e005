"""A request as the engine sees it: token ids, how far its KV has been computed, its blocks."""
from __future__ import annotations

import enum
from dataclasses import dataclass, field

import torch

from pdpipe.kv_hash import block_hashes
from pdpipe.messages import SamplingParams, TokenLogprob


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class Sequence:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    arrival: int = 0
    token_ids: list[int] = field(default_factory=list)  # prompt + output
    block_table: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0
    status: Status = Status.WAITING
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    generator: torch.Generator | None = None
    logprobs: list[TokenLogprob] = field(default_factory=list)
    num_preemptions: int = 0
    hold_kv: bool = False  # keep the blocks after finishing, until released (a prefill awaiting transfer)
    cache_root: bytes | None = None  # the parent of its first block's hash (kv_hash.root_hash); None: no caching
    known_hashes: list[bytes] = field(default_factory=list)  # of its full blocks, as far as computed
    num_registered: int = 0  # leading blocks of its table registered in the prefix cache
    num_cached_tokens: int = 0  # prompt tokens whose KV came from the prefix cache, not computed
    admitted: bool = False  # scheduled once already (a preempted one waits again)
    pull_blocks: int = 0  # leading prompt blocks to copy from the decode instance's cache (Prefill.pull_blocks)
    pull_from: str = ""  # ... or from this instance's, which lends them (Prefill.pull_from)
    pulling: tuple[int, int] | None = None  # (first block, count) being copied in: it waits, computing nothing
    num_pulled_tokens: int = 0  # of num_cached_tokens, those copied in

    def __post_init__(self):
        if not self.token_ids:
            self.token_ids = list(self.prompt_token_ids)
        if self.params.seed is not None and self.generator is None:
            self.generator = torch.Generator().manual_seed(self.params.seed)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - len(self.prompt_token_ids)

    def block_hashes(self, block_size: int) -> list[bytes]:
        """The hashes of its full blocks (prompt and output so far); [] without a cache root."""
        if self.cache_root is None:
            return []
        if len(self.known_hashes) < len(self.token_ids) // block_size:
            self.known_hashes = block_hashes(self.token_ids, block_size, self.cache_root, self.known_hashes)
        return self.known_hashes

    @property
    def is_finished(self) -> bool:
        return self.status is Status.FINISHED
