"""When each request is sent: Poisson or gamma arrivals at a rate, optionally under a concurrency cap."""
from __future__ import annotations

import asyncio
import math
from collections.abc import Awaitable, Callable, Sequence
from typing import TypeVar

import numpy as np

T = TypeVar("T")


def arrival_offsets(num: int, rate: float, burstiness: float = 1.0, seed: int = 0) -> list[float]:
    """Send times in seconds after the start; the first request goes at 0. Inter-arrival times are
    gamma(shape=burstiness) with mean 1/rate, which is Poisson at burstiness 1."""
    if math.isinf(rate):
        return [0.0] * num
    rng = np.random.default_rng(seed)
    gaps = rng.gamma(shape=burstiness, scale=1.0 / (rate * burstiness), size=max(num - 1, 0))
    return [0.0, *np.cumsum(gaps).tolist()][:num]


async def dispatch(items: Sequence[T], offsets: Sequence[float], max_concurrency: int,
                   send: Callable[[int, T], Awaitable]) -> list:
    """Calls send(i, item) at each offset (a request that arrives while `max_concurrency` are in
    flight waits for one to end); returns their results in item order."""
    loop = asyncio.get_running_loop()
    start = loop.time()
    slots = asyncio.Semaphore(max_concurrency) if max_concurrency else None

    async def one(i: int, item: T, offset: float):
        delay = start + offset - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        if slots is None:
            return await send(i, item)
        async with slots:
            return await send(i, item)

    return await asyncio.gather(*(one(i, item, off) for i, (item, off) in enumerate(zip(items, offsets))))
