"""The API key check (`api.api_key`): every route but /health and /metrics needs `Authorization:
Bearer <key>`. It runs as ASGI middleware in front of the routes, so a refused request has had none
of its body read, nothing tokenized, and never reaches the scheduler."""
from __future__ import annotations

import hmac

import msgspec
from starlette.responses import Response
from starlette.types import ASGIApp, Receive, Scope, Send

from .protocol import APIError

OPEN_PATHS = frozenset({"/health", "/metrics"})  # probes and scrapers carry no key (as in vLLM)


def key_refusal(headers: list[tuple[bytes, bytes]], key: bytes) -> APIError | None:
    """The 401 for a request whose first Authorization header is not `Bearer <key>`; None if it is."""
    value = next((v for name, v in headers if name.lower() == b"authorization"), None)
    if value is None:
        message = "no API key: send it in an Authorization header using Bearer auth (Authorization: Bearer KEY)"
    else:
        scheme, _, token = value.strip().partition(b" ")
        if scheme.lower() != b"bearer":
            message = "the Authorization header's scheme is not Bearer (Authorization: Bearer KEY)"
        elif hmac.compare_digest(token.strip(), key):
            return None
        else:
            message = "incorrect API key provided"
    return APIError(401, message, code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})


class ApiKeyMiddleware:
    def __init__(self, app: ASGIApp, api_key: str):
        self.app, self.key = app, api_key.encode("ascii")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        refusal = None
        if scope["type"] == "http" and scope["path"] not in OPEN_PATHS:
            refusal = key_refusal(scope["headers"], self.key)
        if refusal is None:
            await self.app(scope, receive, send)
            return
        response = Response(msgspec.json.encode(refusal.body()), status_code=refusal.status,
                            headers=refusal.headers, media_type="application/json")
        await response(scope, receive, send)
