"""Multi-turn sessions (`--dataset multi-turn`): what prefix caching is for. Sessions arrive at the request
rate (Poisson, or gamma with --burstiness); each sends `turns` requests one after another, each the
previous prompt, the reply's token ids as they came back, and `input_len` new tokens, `think_time` after
the reply ended. Groups of sessions share a system prompt (`num_prefixes` of `prefix_len` tokens).

Besides the usual figures it reports, by turn number, time to first token and the prompt tokens the
server said it reused (`usage.prompt_tokens_details.cached_tokens`), and two offline oracles over the
same requests in the order they were sent: an infinite cache, and an LRU of `cache_blocks` blocks (the
served instances' pools, when the launch is given) — what a cache holding every block of every earlier
prompt and reply could have reused (full blocks; the last token of a prompt is always computed).
"""
from __future__ import annotations

import asyncio
import math
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np

from pdpipe.kv_hash import block_hashes, reusable_blocks, root_hash

from .client import RequestResult
from .config import WorkloadConfig, parse_range
from .datasets import DEFAULT_OUTPUT_LEN, FIRST_TOKEN_ID, Prompt

ORACLE_ROOT = root_hash("bench-oracle")  # any root: the oracles compare token sequences with each other


@dataclass
class Session:
    system: list[int]
    user_turns: list[list[int]]  # each turn's new tokens
    max_tokens: list[int]


def make_sessions(cfg: WorkloadConfig) -> list[Session]:
    rng = np.random.default_rng(cfg.seed)
    systems = [rng.integers(FIRST_TOKEN_ID, cfg.vocab_size, size=cfg.prefix_len).tolist()
               for _ in range(cfg.num_prefixes)]
    low, high = parse_range(cfg.input_len, "input_len")
    out_low, out_high = parse_range(cfg.output_len or DEFAULT_OUTPUT_LEN, "output_len")
    sessions = []
    for i in range(cfg.num_prompts):
        users = [rng.integers(FIRST_TOKEN_ID, cfg.vocab_size, size=int(rng.integers(low, high + 1))).tolist()
                 for _ in range(cfg.turns)]
        outputs = rng.integers(out_low, out_high + 1, size=cfg.turns).tolist()
        sessions.append(Session(systems[i % cfg.num_prefixes], users, outputs))
    return sessions


@dataclass
class Turn:
    session: int
    number: int  # 1-based
    prompt: list[int]
    result: RequestResult


async def run_sessions(sessions: list[Session], offsets: list[float], think_time: float, send) -> list[Turn]:
    """Runs every session from its offset; `send(prompt: Prompt) -> RequestResult` sends one request.
    Returns the turns in the order they were sent."""
    loop = asyncio.get_running_loop()
    start, turns = loop.time(), []

    async def one(i: int, session: Session, offset: float) -> None:
        await asyncio.sleep(max(0.0, start + offset - loop.time()))
        history = list(session.system)
        for k, (user, max_tokens) in enumerate(zip(session.user_turns, session.max_tokens)):
            prompt = history + user
            turn = Turn(i, k + 1, prompt, RequestResult(0, max_tokens, len(prompt)))
            turns.append(turn)
            turn.result = await send(Prompt(prompt, max_tokens))
            if not turn.result.ok:
                return  # the session cannot go on without its reply
            history = prompt + turn.result.token_ids
            if k + 1 < len(session.user_turns):
                await asyncio.sleep(think_time)

    await asyncio.gather(*(one(i, s, off) for i, (s, off) in enumerate(zip(sessions, offsets))))
    for index, turn in enumerate(turns):
        turn.result.index = index
    return turns


def oracle_hits(turns: list[Turn], block_size: int, capacity: float = math.inf) -> list[int]:
    """Prompt tokens an LRU cache of `capacity` blocks (inf: every block ever seen) could have served
    each turn, in send order: the longest prefix of its full blocks held, then its prompt's and reply's
    blocks are (the most recent)."""
    lru: OrderedDict[bytes, None] = OrderedDict()
    hits = []
    for turn in turns:
        prompt = turn.prompt
        hashes = block_hashes(prompt, block_size, ORACLE_ROOT)
        limit, n = reusable_blocks(len(prompt), block_size, computes_last=True), 0
        while n < min(limit, len(hashes)) and hashes[n] in lru:
            n += 1
        hits.append(n * block_size)
        for h in block_hashes(prompt + turn.result.token_ids, block_size, ORACLE_ROOT, hashes):
            lru[h] = None
            lru.move_to_end(h)
        while len(lru) > capacity:
            lru.popitem(last=False)
    return hits


def by_turn(turns: list[Turn], block_size: int, cache_blocks: int = 0) -> dict:
    """The multi-turn report: per turn number, TTFT percentiles and the reused share of prompt tokens,
    measured and as the oracles have it."""
    infinite = oracle_hits(turns, block_size)
    lru = oracle_hits(turns, block_size, cache_blocks) if cache_blocks else None
    report: dict = {"block_size": block_size, "cache_blocks": cache_blocks, "turns": {}}
    numbers = sorted({t.number for t in turns})
    for number in [*numbers, "all"]:
        picked = [i for i, t in enumerate(turns) if (number == "all" or t.number == number) and t.result.ok]
        prompt = sum(len(turns[i].prompt) for i in picked)
        ttfts = [turns[i].result.chunks[0][0] * 1e3 for i in picked if turns[i].result.chunks]
        reused = {"cached": sum(turns[i].result.cached_tokens for i in picked),
                  "oracle_infinite": sum(infinite[i] for i in picked)}
        if lru is not None:
            reused["oracle_lru"] = sum(lru[i] for i in picked)
        entry: dict = {"requests": len(picked), "prompt_tokens": prompt,
                       "ttft_ms_p50": float(np.percentile(ttfts, 50)) if ttfts else None,
                       "ttft_ms_p90": float(np.percentile(ttfts, 90)) if ttfts else None}
        for key, tokens in reused.items():
            entry[f"{key}_tokens"], entry[f"{key}_share"] = tokens, tokens / prompt if prompt else 0.0
        report["turns"][str(number)] = entry
    return report
