"""Every struct that crosses a process boundary, in one place: tagged msgspec Structs, msgpack on the wire."""
from __future__ import annotations

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
        _check(0.0 < self.repetition_penalty <= 2.0, "repetition_penalty", self.repetition_penalty,
               "in (0, 2]")
        _check(-2.0 <= self.presence_penalty <= 2.0, "presence_penalty", self.presence_penalty, "[-2, 2]")
        _check(-2.0 <= self.frequency_penalty <= 2.0, "frequency_penalty", self.frequency_penalty,
               "[-2, 2]")
        _check(0 <= self.min_tokens <= self.max_tokens, "min_tokens", self.min_tokens,
               "0 to max_tokens")
        _check(self.logprobs is None or 0 <= self.logprobs <= 20, "logprobs", self.logprobs,
               "None or 0 to 20")
        _check(all(isinstance(s, str) and s for s in self.stop), "stop", self.stop,
               "a list of non-empty strings")
        _check(all(isinstance(t, int) and t >= 0 for t in self.stop_token_ids), "stop_token_ids",
               self.stop_token_ids, "a list of token ids >= 0")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def _check(ok: bool, field: str, value, allowed: str) -> None:
    if not ok:
        raise ValueError(f"{field}: {value!r} is out of range; allowed: {allowed}")


class TokenLogprob(msgspec.Struct, frozen=True, array_like=True):
    """The chosen token's log-probability under the model, and the most likely alternatives."""

    token_id: int
    logprob: float
    top: list[tuple[int, float]] = []


class EngineOutput(msgspec.Struct, frozen=True, kw_only=True, tag=True):
    """New tokens of one request from one engine step; `finish_reason` set on its last one."""

    request_id: str
    token_ids: list[int]
    logprobs: list[TokenLogprob] | None = None
    finish_reason: str | None = None  # "stop" | "length" | "abort" | "error"
    stop_reason: int | str | None = None  # the stop token id or stop string that ended it
    error: str | None = None
