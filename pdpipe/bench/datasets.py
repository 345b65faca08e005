"""Prompts for the load generator. Random datasets are token-id lists, so a prompt's length is exact
and no tokenizer is needed; ShareGPT prompts are text that the server tokenizes."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .config import WorkloadConfig, parse_range

DEFAULT_OUTPUT_LEN = "128"
FIRST_TOKEN_ID = 10  # below it sit the special tokens of small vocabularies (pdpipe's generated models)
CHARS_PER_TOKEN = 4  # ShareGPT reply length → max_tokens: ~4 characters a token for English BPE


@dataclass(frozen=True)
class Prompt:
    prompt: list[int] | str
    max_tokens: int

    @property
    def prompt_len(self) -> int | None:
        """Known for token ids; for text, the server's usage tells."""
        return len(self.prompt) if isinstance(self.prompt, list) else None


def _lengths(rng: np.random.Generator, spec: str, what: str, n: int) -> list[int]:
    low, high = parse_range(spec, what)
    return rng.integers(low, high + 1, size=n).tolist()


def _token_ids(rng: np.random.Generator, vocab_size: int, n: int) -> list[int]:
    return rng.integers(FIRST_TOKEN_ID, vocab_size, size=n).tolist()


def random_prompts(cfg: WorkloadConfig) -> list[Prompt]:
    rng = np.random.default_rng(cfg.seed)
    inputs = _lengths(rng, cfg.input_len, "input_len", cfg.num_prompts)
    outputs = _lengths(rng, cfg.output_len or DEFAULT_OUTPUT_LEN, "output_len", cfg.num_prompts)
    return [Prompt(_token_ids(rng, cfg.vocab_size, n_in), n_out) for n_in, n_out in zip(inputs, outputs)]


def shared_prefix_prompts(cfg: WorkloadConfig) -> list[Prompt]:
    """Prompt i starts with prefix i mod num_prefixes, then a random suffix of input_len tokens."""
    rng = np.random.default_rng(cfg.seed)
    prefixes = [_token_ids(rng, cfg.vocab_size, cfg.prefix_len) for _ in range(cfg.num_prefixes)]
    suffixes = _lengths(rng, cfg.input_len, "input_len", cfg.num_prompts)
    outputs = _lengths(rng, cfg.output_len or DEFAULT_OUTPUT_LEN, "output_len", cfg.num_prompts)
    return [Prompt(prefixes[i % cfg.num_prefixes] + _token_ids(rng, cfg.vocab_size, n_in), n_out)
            for i, (n_in, n_out) in enumerate(zip(suffixes, outputs))]


def sharegpt_pairs(path: str | Path) -> list[tuple[str, str]]:
    """(first human turn, the gpt reply after it) of every conversation that has both."""
    data = json.loads(Path(path).read_text())
    if not isinstance(data, list):
        raise ValueError(f"dataset_path: {path} is not a ShareGPT file (a JSON list of conversations)")
    pairs = []
    for entry in data:
        turns = (entry.get("conversations") or []) if isinstance(entry, dict) else []
        for asked, answered in zip(turns, turns[1:]):
            if asked.get("from") == "human" and answered.get("from") == "gpt" and asked.get("value"):
                pairs.append((asked["value"], answered.get("value") or ""))
                break
    return pairs


def sharegpt_prompts(cfg: WorkloadConfig) -> list[Prompt]:
    """Conversations in a seeded order (reused in turn when there are fewer than num_prompts); the
    reference reply's length in characters / 4 sets max_tokens, capped by --output-len's MAX."""
    pairs = sharegpt_pairs(cfg.dataset_path)
    if not pairs:
        raise ValueError(f"dataset_path: {cfg.dataset_path} has no conversation with a human turn answered "
                         "by a gpt turn")
    order = np.random.default_rng(cfg.seed).permutation(len(pairs)).tolist()
    cap = parse_range(cfg.output_len, "output_len")[1] if cfg.output_len else None
    prompts = []
    for i in range(cfg.num_prompts):
        text, reply = pairs[order[i % len(pairs)]]
        max_tokens = max(1, round(len(reply) / CHARS_PER_TOKEN))
        prompts.append(Prompt(text, min(max_tokens, cap) if cap else max_tokens))
    return prompts


MOONCAKE_BLOCK = 512  # tokens a hash id of a Mooncake trace stands for


def mooncake_trace(cfg: WorkloadConfig) -> tuple[list[Prompt], list[float]]:
    """A Mooncake-format trace (one JSON object a line: `timestamp` in ms, `input_length`,
    `output_length`, `hash_ids`) as prompts and send times (seconds after its first): each hash id
    stands for 512 synthetic token ids, the same for the same id, so requests share prefixes exactly
    where the trace's requests did; the first `num_prompts` requests."""
    prompts: list[Prompt] = []
    times: list[float] = []
    blocks: dict[int, list[int]] = {}
    path = Path(cfg.dataset_path)
    with path.open() as f:
        for number, line in enumerate(f, 1):
            if len(prompts) == cfg.num_prompts:
                break
            if not line.strip():
                continue
            try:
                entry = json.loads(line)
                n, out, ids, at = (int(entry["input_length"]), int(entry["output_length"]),
                                   [int(h) for h in entry["hash_ids"]], float(entry["timestamp"]))
            except (ValueError, KeyError, TypeError) as exc:
                raise ValueError(f"dataset_path: {path}:{number} is not a Mooncake trace line (timestamp, "
                                 f"input_length, output_length, hash_ids): {exc}") from None
            tokens: list[int] = []
            for h in ids:
                if h not in blocks:
                    blocks[h] = _token_ids(np.random.default_rng([cfg.seed, h]), cfg.vocab_size, MOONCAKE_BLOCK)
                tokens += blocks[h]
            if len(tokens) < n:  # the tail the trace did not hash: this request's own
                own = np.random.default_rng([cfg.seed, 1 << 40, number])
                tokens += _token_ids(own, cfg.vocab_size, n - len(tokens))
            prompts.append(Prompt(tokens[:max(n, 1)], max(out, 1)))
            times.append(at / 1e3)
    if not prompts:
        raise ValueError(f"dataset_path: {path} holds no trace line")
    return prompts, [t - times[0] for t in times]


def load_prompts(cfg: WorkloadConfig) -> list[Prompt]:
    loaders = {"random": random_prompts, "shared-prefix": shared_prefix_prompts, "sharegpt": sharegpt_prompts,
               "mooncake-trace": lambda c: mooncake_trace(c)[0]}
    return loaders[cfg.dataset](cfg)
