"""A tiny HTTP server for the bench client's tests: the handlers a test gives, on a free local port."""
from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

from aiohttp import web


@contextlib.asynccontextmanager
async def fake_server(routes: dict[tuple[str, str], object]) -> AsyncIterator[str]:
    """Serves `routes` ((method, path) → aiohttp handler) while the block runs; yields its base URL."""
    app = web.Application()
    for (method, path), handler in routes.items():
        app.router.add_route(method, path, handler)  # type: ignore[arg-type]
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    try:
        yield f"http://127.0.0.1:{runner.addresses[0][1]}"
    finally:
        await runner.cleanup()
