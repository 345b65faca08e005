"""The OpenAI-compatible front-end: checks the API key (if any), validates and tokenizes requests, streams
SSE, detokenizes, applies stop strings, turns a client disconnect into an abort, and serves /metrics.
Starlette on uvicorn with uvloop; the scheduler and engines are reached through `Bridge`."""
from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass

import msgspec
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

from pdpipe.loop import ProcessBase
from pdpipe.messages import SamplingParams
from pdpipe.output import RequestTextState, TextDelta
from pdpipe.tokenizer import ChatTemplateError, Tokenizer

from .auth import ApiKeyMiddleware
from .bridge import Bridge, TokenStream
from .metrics import ApiMetrics
from .protocol import APIError, ChatCompletionRequest, CompletionRequest, parse_body, sampling_params

log = logging.getLogger("pdpipe")


@dataclass
class ApiContext:
    tokenizer: Tokenizer
    bridge: Bridge
    model_name: str
    max_model_len: int
    max_body_bytes: int
    metrics: ApiMetrics
    redis_error: str | None = None  # set while the cluster's Redis does not answer
    max_waiting: int = 0  # requests without a first token beyond which new ones get 429 (0: no bound)
    draining: bool = False  # shutting down: no new request
    max_waiting_prompt_tokens: int = 0

    def admit(self, prompt_tokens: int) -> None:
        """Refuses a request at once, before any stream starts, while too many wait for a first token."""
        waiting, tokens = len(self.bridge.waiting), self.bridge.waiting_tokens
        if (self.max_waiting and waiting >= self.max_waiting) or \
                (self.max_waiting_prompt_tokens and tokens + prompt_tokens > self.max_waiting_prompt_tokens):
            self.metrics.refused.inc()
            raise APIError(429, f"the server is overloaded: {waiting} requests ({tokens} prompt tokens) are "
                                "waiting for their first token; retry after the Retry-After seconds",
                           type_="overloaded", code="overloaded", headers={"Retry-After": "1"})

    def check_available(self) -> None:
        if self.draining:
            raise APIError(503, "the server is shutting down; retry on another replica or after restart",
                           type_="service_unavailable", code="shutting_down", headers={"Retry-After": "5"})
        if self.redis_error is not None:
            raise APIError(503, f"the cluster's Redis is unreachable ({self.redis_error}); requests cannot "
                                "reach the engines. Retry when it is back.", type_="service_unavailable",
                           code="redis_unavailable")


async def watch_redis(ctx: ApiContext, url: str, period: float = 0.5) -> None:
    """Keeps `ctx.redis_error` current: the front-end answers 503 while Redis is away, and serves again
    by itself when it returns."""
    import redis.asyncio as aioredis

    client = aioredis.Redis.from_url(url, socket_timeout=1.0, socket_connect_timeout=1.0)
    while True:
        try:
            await client.ping()
            if ctx.redis_error is not None:
                log.info("Redis is back; serving again")
            ctx.redis_error = None
        except Exception as exc:  # noqa: BLE001 — any failure to reach Redis is unavailability
            if ctx.redis_error is None:
                log.warning("Redis unreachable: %s", exc)
            ctx.redis_error = f"{url}: {exc.__class__.__name__}"
        await asyncio.sleep(period)


def _json(obj, status: int = 200) -> Response:
    return Response(msgspec.json.encode(obj), status_code=status, media_type="application/json")


def _error(exc: APIError) -> Response:
    response = _json(exc.body(), exc.status)
    response.headers.update(exc.headers)
    return response


def _failure(gen: Generation) -> APIError:
    assert gen.error is not None
    status = gen.status or 500
    type_ = {503: "service_unavailable", 504: "timeout", 400: "invalid_request_error"}.get(status, "server_error")
    return APIError(status, gen.error, type_=type_)


async def read_body(request: Request, limit: int) -> bytes:
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > limit:
        raise APIError(413, f"request body of {length} bytes exceeds the limit of {limit}", code="too_large")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise APIError(413, f"request body exceeds the limit of {limit} bytes", code="too_large")
    return bytes(body)


class Generation:
    """One request's run through the pipeline, as text deltas."""

    def __init__(self, ctx: ApiContext, prompt: list[int], params: SamplingParams, received: float,
                 cache_salt: str = ""):
        self.ctx, self.prompt, self.params, self.cache_salt = ctx, prompt, params, cache_salt
        self.received = received  # when the handler began: the request's arrival in its trace
        self.request_id = f"cmpl-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.state = RequestTextState(ctx.tokenizer, self.request_id, prompt, params)
        self.error: str | None = None
        self.status = 0  # with an error: its HTTP status (0: 500)
        self._stream: TokenStream | None = None
        self._started_at = 0.0
        self._first_at: float | None = None
        self._finished = self._closed = False

    async def start(self) -> None:
        """Hands the request to the pipeline; a streamed request does so before its response starts."""
        if self._stream is None:
            self._started_at = time.monotonic()
            self._stream = await self.ctx.bridge.submit(self.request_id, self.prompt, self.params, self.received,
                                                        self.cache_salt)

    async def deltas(self) -> AsyncIterator[TextDelta]:
        ctx = self.ctx
        await self.start()
        assert self._stream is not None
        try:
            while not self._finished:
                out = await self._stream.queue.get()
                if out.finish_reason == "error":
                    self.error, self.status = out.error or "the request failed", out.status
                    self._finished = True
                    break
                if out.token_ids and self._first_at is None:
                    self._first_at = time.monotonic()
                    ctx.metrics.ttft.observe(self._first_at - self._started_at)
                delta = self.state.update(out)
                self._finished = self.state.out.finished
                if self.state.stopped_by_text and out.finish_reason is None:
                    await ctx.bridge.abort(self.request_id, "stop")
                yield delta
        finally:
            await self.close()

    async def close(self) -> None:
        """Once, however the request ends: an unfinished one is aborted (the client went away, or the
        server is stopping), and the front-end forgets it."""
        if self._closed or self._stream is None:
            return
        self._closed = True
        if not self._finished:
            await self.ctx.bridge.abort(self.request_id, "client disconnected")
        self.ctx.bridge.forget(self.request_id)
        self.ctx.metrics.finished(self, self._started_at, self._first_at)

    def usage(self) -> dict:
        n = len(self.state.out.token_ids)
        return {"prompt_tokens": len(self.prompt), "completion_tokens": n, "total_tokens": len(self.prompt) + n,
                "prompt_tokens_details": {"cached_tokens": self.state.out.num_cached_tokens}}


class _ClosingStream(StreamingResponse):
    """A streamed response whose request is closed however the response ends, even when it ends
    before its body was ever iterated (the client left while the headers were going out)."""

    def __init__(self, gen: Generation, content, **kwargs):
        super().__init__(content, **kwargs)
        self._gen = gen

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self._gen.close()


def _token_text(tok: Tokenizer, token_id: int) -> str:
    return tok.decode([token_id], skip_special_tokens=False)


def completion_logprobs(tok: Tokenizer, delta: TextDelta) -> dict | None:
    if delta.logprobs is None:
        return None
    return {"tokens": [_token_text(tok, lp.token_id) for lp in delta.logprobs],
            "token_logprobs": [lp.logprob for lp in delta.logprobs],
            "top_logprobs": [{_token_text(tok, t): v for t, v in lp.top} for lp in delta.logprobs]}


def chat_logprobs(tok: Tokenizer, delta: TextDelta) -> dict | None:
    if delta.logprobs is None:
        return None

    def entry(token_id, logprob):
        text = _token_text(tok, token_id)
        return {"token": text, "logprob": logprob, "bytes": list(text.encode())}

    return {"content": [{**entry(lp.token_id, lp.logprob), "top_logprobs": [entry(t, v) for t, v in lp.top]}
                        for lp in delta.logprobs]}


def _worth_a_chunk(req, delta: TextDelta) -> bool:
    """A streamed chunk carries new text or the finish; with return_token_ids, new ids are worth one too."""
    return bool(delta.text or delta.finish_reason or (req.return_token_ids and delta.token_ids))


def _sse(obj) -> bytes:
    return b"data: " + msgspec.json.encode(obj) + b"\n\n"


async def _wait_disconnect(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


class OpenAIRoutes:
    def __init__(self, ctx: ApiContext):
        self.ctx = ctx

    def _check_model(self, model: str) -> None:
        if model != self.ctx.model_name:
            raise APIError(404, f"model: {model!r} does not exist; this server serves "
                                f"{self.ctx.model_name!r}", "model", code="model_not_found")

    def _max_tokens(self, asked: int | None, prompt: list[int], param: str, field: str) -> int:
        limit = self.ctx.max_model_len
        if len(prompt) >= limit:
            raise APIError(400, f"{param}: {len(prompt)} tokens, but this model's context is {limit} "
                                "tokens", param, code="context_length_exceeded")
        if asked is None:
            return limit - len(prompt)
        if asked < 1:
            raise APIError(400, f"{field}: must be >= 1, got {asked}", field)
        if len(prompt) + asked > limit:
            raise APIError(400, f"{field}: prompt ({len(prompt)} tokens) + {field} ({asked}) exceeds this "
                                f"model's context of {limit} tokens", field, code="context_length_exceeded")
        return asked

    def _checked(self, params: SamplingParams) -> SamplingParams:
        vocab = self.ctx.tokenizer.vocab_size
        if any(t >= vocab for t in params.stop_token_ids):
            raise APIError(400, f"stop_token_ids: token ids must be in [0, {vocab})", "stop_token_ids")
        return params

    def _prompt_ids(self, prompt) -> list[int]:
        if isinstance(prompt, str):
            ids = self.ctx.tokenizer.encode(prompt)
        elif prompt and set(map(type, prompt)) == {int}:  # C-speed checks: prompts run to 100k+ tokens
            ids = list(prompt)
        elif len(prompt) == 1 and isinstance(prompt[0], (str, list)):
            return self._prompt_ids(prompt[0])
        else:
            raise APIError(400, "prompt: give one string or one list of token ids (batches are not "
                                "supported)", "prompt")
        vocab = self.ctx.tokenizer.vocab_size
        if not ids:
            raise APIError(400, "prompt: is empty", "prompt")
        if min(ids) < 0 or max(ids) >= vocab:
            raise APIError(400, f"prompt: token ids must be in [0, {vocab})", "prompt")
        return ids

    async def _read(self, request: Request, cls: type):
        """The request's body as `cls`, once the service can take it and the model is this one's."""
        self.ctx.check_available()
        req = parse_body(await read_body(request, self.ctx.max_body_bytes), cls)
        self._check_model(req.model)
        return req

    async def completions(self, request: Request) -> Response:
        received = time.time()
        try:
            req = await self._read(request, CompletionRequest)
            if req.echo:
                raise APIError(400, "echo: not supported", "echo")
            prompt = await asyncio.to_thread(self._prompt_ids, req.prompt)  # a long prompt stalls no one
            params = self._checked(sampling_params(
                req, self._max_tokens(req.max_tokens, prompt, "prompt", "max_tokens"), req.logprobs))
            self.ctx.admit(len(prompt))
        except APIError as exc:
            return _error(exc)
        except ClientDisconnect:
            return Response(status_code=499)
        gen = Generation(self.ctx, prompt, params, received, req.cache_salt or "")
        head = {"id": gen.request_id, "object": "text_completion", "created": gen.created,
                "model": self.ctx.model_name}

        def choice(delta: TextDelta) -> dict:
            c = {"index": 0, "text": delta.text, "logprobs": completion_logprobs(self.ctx.tokenizer, delta),
                 "finish_reason": delta.finish_reason}
            return {**c, "token_ids": delta.token_ids} if req.return_token_ids else c

        if req.stream:
            return await self._stream(gen, req, head, lambda d: [choice(d)] if _worth_a_chunk(req, d) else None)
        return await self._complete(request, gen, head, lambda text, d: [{**choice(d), "text": text}])

    async def chat(self, request: Request) -> Response:
        received = time.time()
        try:
            req = await self._read(request, ChatCompletionRequest)
            try:
                prompt = await asyncio.to_thread(self.ctx.tokenizer.encode_chat, req.messages)
            except ChatTemplateError as exc:
                raise APIError(400, str(exc), str(exc).split(":", 1)[0]) from None
            asked = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
            field = "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens"
            logprobs = (req.top_logprobs or 0) if req.logprobs else None
            params = self._checked(sampling_params(req, self._max_tokens(asked, prompt, "messages", field),
                                                   logprobs))
            self.ctx.admit(len(prompt))
        except APIError as exc:
            return _error(exc)
        except ClientDisconnect:
            return Response(status_code=499)
        gen = Generation(self.ctx, prompt, params, received, req.cache_salt or "")
        head = {"id": gen.request_id.replace("cmpl-", "chatcmpl-"), "object": "chat.completion.chunk",
                "created": gen.created, "model": self.ctx.model_name}
        tok = self.ctx.tokenizer
        sent_role: list[bool] = []

        def chunk(delta: TextDelta):
            if not (_worth_a_chunk(req, delta) or not sent_role):
                return None
            body = {"content": delta.text}
            if not sent_role:
                body["role"] = "assistant"
                sent_role.append(True)
            c = {"index": 0, "delta": body, "logprobs": chat_logprobs(tok, delta),
                 "finish_reason": delta.finish_reason}
            return [{**c, "token_ids": delta.token_ids} if req.return_token_ids else c]

        if req.stream:
            return await self._stream(gen, req, head, chunk)

        def full(text: str, delta: TextDelta) -> list[dict]:
            c = {"index": 0, "message": {"role": "assistant", "content": text},
                 "logprobs": chat_logprobs(tok, delta), "finish_reason": delta.finish_reason}
            return [{**c, "token_ids": delta.token_ids} if req.return_token_ids else c]

        return await self._complete(request, gen, {**head, "object": "chat.completion"}, full)

    async def _stream(self, gen: Generation, req, head: dict, make_choices) -> StreamingResponse:
        include_usage = bool(req.stream_options and req.stream_options.include_usage)

        async def events():
            async for delta in gen.deltas():
                choices = make_choices(delta)
                if choices is not None:
                    yield _sse({**head, "choices": choices})
            if gen.error:
                yield _sse(_failure(gen).body())
            elif include_usage:
                yield _sse({**head, "choices": [], "usage": gen.usage()})
            yield b"data: [DONE]\n\n"

        await gen.start()  # the prefill need not wait for the response to start
        return _ClosingStream(gen, events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    async def _complete(self, request: Request, gen: Generation, head: dict, make_choices) -> Response:
        async def run():
            async for _ in gen.deltas():
                pass

        task = asyncio.ensure_future(run())
        gone = asyncio.ensure_future(_wait_disconnect(request))
        await asyncio.wait([task, gone], return_when=asyncio.FIRST_COMPLETED)
        gone.cancel()
        if not task.done():
            task.cancel()  # the client left: gen.deltas() aborts the request on its way out
            await asyncio.gather(task, return_exceptions=True)
            return Response(status_code=499)
        task.result()
        if gen.error:
            return _error(_failure(gen))
        out = gen.state.out
        final = TextDelta(out.text, out.token_ids, out.logprobs if out.logprobs is not None else None,
                          out.finish_reason, out.stop_reason)
        body = {**head, "object": head["object"].replace(".chunk", ""), "choices": make_choices(out.text, final),
                "usage": gen.usage()}
        return _json(body)

    async def models(self, request: Request) -> Response:
        return _json({"object": "list", "data": [{"id": self.ctx.model_name, "object": "model",
                                                   "created": 0, "owned_by": "pdpipe",
                                                   "max_model_len": self.ctx.max_model_len}]})

    async def health(self, request: Request) -> Response:
        try:
            self.ctx.check_available()
        except APIError as exc:
            return _error(exc)
        snap = await self.ctx.bridge.control("snapshot", timeout=1.0)
        if snap is None:
            return _json(APIError(503, "the scheduler does not answer", type_="server_error").body(), 503)
        down = sorted(snap["down"])
        if not snap["serving"]:  # a decode instance alone still serves: prompts go local
            starting = sorted(n for n, inst in snap["instances"].items()
                              if inst["role"] in ("decode", "mixed") and not inst["ready"] and n not in down)
            why = (f"instances down: {', '.join(down)}" if down else "") + ("; " if down and starting else "") \
                + (f"not ready yet: {', '.join(starting)}" if starting else "")
            return _json(APIError(503, f"no decode or mixed instance serves now ({why or 'none configured'})",
                                  type_="service_unavailable").body(), 503)
        return _json({"status": "degraded", "down": down} if down else {"status": "ok"})

    async def reset_prefix_cache(self, request: Request) -> Response:
        """Every engine forgets its cached blocks (vLLM's endpoint; benchmarks start cold with it)."""
        reply = await self.ctx.bridge.control("reset_prefix_cache", timeout=2.0)
        if reply is None or "error" in reply:
            detail = reply["error"] if reply else "the scheduler does not answer"
            return _error(APIError(503, f"cannot reset the prefix cache: {detail}", type_="service_unavailable"))
        return _json({"status": "ok", "instances": reply["instances"]})

    async def metrics(self, request: Request) -> Response:
        snap = await self.ctx.bridge.control("snapshot", timeout=1.0)
        body, content_type = self.ctx.metrics.render(snap)
        return Response(body, media_type=content_type)


def build_app(ctx: ApiContext, api_key: str = "") -> Starlette:
    """The front-end's app; with `api_key`, every route but /health and /metrics needs it."""
    routes = OpenAIRoutes(ctx)

    async def not_found(request: Request, exc) -> Response:
        return _error(APIError(404, f"{request.url.path}: no such route", code="not_found"))

    async def bad_method(request: Request, exc) -> Response:
        return _error(APIError(405, f"{request.method} {request.url.path}: method not allowed"))

    return Starlette(routes=[
        Route("/v1/completions", routes.completions, methods=["POST"]),
        Route("/v1/chat/completions", routes.chat, methods=["POST"]),
        Route("/v1/models", routes.models, methods=["GET"]),
        Route("/health", routes.health, methods=["GET"]),
        Route("/reset_prefix_cache", routes.reset_prefix_cache, methods=["POST"]),
        Route("/metrics", routes.metrics, methods=["GET"]),
    ], exception_handlers={404: not_found, 405: bad_method},
        middleware=[Middleware(ApiKeyMiddleware, api_key=api_key)] if api_key else [])


def _uvicorn_server():
    import contextlib

    import uvicorn

    class Server(uvicorn.Server):
        @contextlib.contextmanager
        def capture_signals(self):  # the process's own handlers stay: SIGTERM starts a drain
            yield

    return Server


def serve_api(proc) -> None:
    import uvicorn
    import uvloop

    from pdpipe.demo import resolve_model
    from pdpipe.engine.sizing import pool_blocks, resolve_max_model_len
    from pdpipe.models.spec import load_spec

    cfg = proc.cfg
    model_dir = resolve_model(cfg.engine.model)
    spec = load_spec(model_dir, cfg.engine.dtype or None)
    max_len = min([resolve_max_model_len(spec, cfg.engine, inst.num_blocks or pool_blocks(spec, cfg.engine))
                   for _, inst in cfg.named_instances()]
                  or [resolve_max_model_len(spec, cfg.engine, pool_blocks(spec, cfg.engine))])

    _Server = _uvicorn_server()

    async def main() -> None:
        bridge = Bridge(proc.paths, token_gap=cfg.deadlines.token_gap)
        ctx = ApiContext(Tokenizer(model_dir), bridge, cfg.api.served_model_name or model_dir.name,
                         max_len, cfg.api.max_body_bytes, ApiMetrics(), max_waiting=cfg.api.max_waiting,
                         max_waiting_prompt_tokens=cfg.api.max_waiting_prompt_tokens)
        server = _Server(uvicorn.Config(build_app(ctx, cfg.api.api_key), host=cfg.api.host, port=cfg.api.port,
                                        log_level="warning", lifespan="on", timeout_graceful_shutdown=2))
        ctx.bridge.start()
        if cfg.cluster.redis_url:
            asyncio.ensure_future(watch_redis(ctx, cfg.cluster.redis_url))
        serving = asyncio.ensure_future(server.serve())
        while not server.started and not serving.done():
            await asyncio.sleep(0.01)
        if serving.done():
            serving.result()
            raise RuntimeError(f"api: could not listen on {cfg.api.host}:{cfg.api.port}")
        proc.ready()
        deadline = None
        while not serving.done():
            if proc.stop.is_set() and deadline is None:  # drain: no new request; those in flight finish
                ctx.draining, deadline = True, time.monotonic() + cfg.api.drain_s
                log.info("api: draining %d requests (at most %g s)", len(ctx.bridge.streams), cfg.api.drain_s)
            if deadline is not None and not server.should_exit and \
                    (not ctx.bridge.streams or time.monotonic() > deadline):
                if ctx.bridge.streams:
                    ctx.bridge.fail_all("the server is shutting down; the request was not finished", status=503)
                    await asyncio.sleep(0.3)  # the streams send their error event and [DONE]
                server.should_exit = True
            await asyncio.wait([serving], timeout=0.1)
        ctx.bridge.close()

    uvloop.run(main())


def run_api(role: str, name: str, run_dir: str) -> None:
    """The front-end's process: its loop is asyncio's (uvicorn), its wires `api/bridge.py`'s."""
    proc = ProcessBase(role, name, run_dir)
    try:
        serve_api(proc)
    finally:
        proc.close()
