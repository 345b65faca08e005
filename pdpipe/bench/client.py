"""The streaming OpenAI client: one request's body, its SSE stream read chunk by chunk, and what
arrived when. Token ids in each chunk (`return_token_ids`) count a token even when its text is
empty; without them a chunk with text (or reasoning text) counts one, and the final usage corrects
the total. Whatever goes wrong with one request lands in its result, never ends the run."""
from __future__ import annotations

import time
from contextlib import aclosing
from dataclasses import dataclass, field

import aiohttp
import msgspec

from .config import WorkloadConfig
from .datasets import Prompt

DONE = object()  # the `data: [DONE]` line
ROUTES = {"completions": "/v1/completions", "chat": "/v1/chat/completions"}
JSON_HEADERS = {"Content-Type": "application/json"}


def auth_headers(api_key: str) -> dict[str, str]:
    """What every request carries for a server that wants a key (none for one that does not)."""
    return {"Authorization": f"Bearer {api_key}"} if api_key else {}


@dataclass
class RequestResult:
    index: int
    max_tokens: int
    prompt_tokens: int | None
    sent_at: float = 0.0  # time.time() at send: comparable with the pipeline's trace times
    request_id: str = ""
    ok: bool = False
    status: int = 0
    error: str = ""
    chunks: list[tuple[float, int]] = field(default_factory=list)  # (seconds after send, tokens) per chunk
    usage_completion_tokens: int | None = None
    cached_tokens: int = 0  # usage.prompt_tokens_details.cached_tokens: prompt tokens the server reused
    ids_seen: bool = False  # the chunks carried token ids, so their count is exact
    token_ids: list[int] = field(default_factory=list)  # the output's, where the chunks carried them
    e2e: float = 0.0  # seconds from send to the end of the stream

    @property
    def output_tokens(self) -> int:
        counted = sum(n for _, n in self.chunks)
        if self.ids_seen or self.usage_completion_tokens is None:
            return counted
        return self.usage_completion_tokens


def request_body(prompt: Prompt, model: str, endpoint: str, workload: WorkloadConfig,
                 return_token_ids: bool) -> dict:
    body = {"model": model, "max_tokens": prompt.max_tokens, "temperature": workload.temperature,
            "stream": True, "stream_options": {"include_usage": True}}
    if endpoint == "chat":
        if not isinstance(prompt.prompt, str):
            raise ValueError("endpoint: chat needs text prompts (--dataset sharegpt); the random datasets "
                             "send token ids, which only /v1/completions takes")
        body["messages"] = [{"role": "user", "content": prompt.prompt}]
    else:
        body["prompt"] = prompt.prompt
    if workload.ignore_eos:
        body["ignore_eos"] = True
    if return_token_ids:
        body["return_token_ids"] = True
    return body


def parse_sse_line(line: bytes):
    """A chunk's JSON as a dict, DONE for the end marker, None for anything else (blank, comments)."""
    line = line.strip()
    if not line.startswith(b"data:"):
        return None
    payload = line[5:].strip()
    if payload == b"[DONE]":
        return DONE
    return msgspec.json.decode(payload)


def _has_text(choice: dict) -> bool:
    """A completion's text, or a chat delta's content or reasoning (a reasoning model streams its
    thinking as `reasoning_content`, or `reasoning`, with `content` null)."""
    if "text" in choice:
        return bool(choice["text"])
    delta = choice.get("delta") or {}
    return any(delta.get(key) for key in ("content", "reasoning_content", "reasoning"))


def chunk_tokens(chunk: dict) -> int:
    """Tokens a streamed chunk carries: its token ids when present, else one per choice with text."""
    count = 0
    for choice in chunk.get("choices") or []:
        if choice.get("token_ids") is not None:
            count += len(choice["token_ids"])
        else:
            count += _has_text(choice)
    return count


def take_chunk(result: RequestResult, chunk: dict, elapsed: float) -> None:
    if "error" in chunk:
        err = chunk["error"]
        result.error = err.get("message", str(err)) if isinstance(err, dict) else str(err)
        return
    result.request_id = result.request_id or chunk.get("id", "")
    usage = chunk.get("usage")
    if usage:
        result.usage_completion_tokens = usage.get("completion_tokens")
        result.prompt_tokens = usage.get("prompt_tokens", result.prompt_tokens)
        result.cached_tokens = (usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0
    tokens = chunk_tokens(chunk)
    result.ids_seen = result.ids_seen or any(c.get("token_ids") is not None for c in chunk.get("choices") or [])
    for choice in chunk.get("choices") or []:
        result.token_ids.extend(choice.get("token_ids") or [])
    if tokens:
        result.chunks.append((elapsed, tokens))


async def sse_lines(stream: aiohttp.StreamReader):
    """The stream's lines, however long. aiohttp's own line reader raises LineTooLong past its buffer
    (~512 KiB), which a first chunk carrying a long prompt's token ids (~75k tokens) exceeds."""
    head: list[bytes] = []  # the pieces of a line not ended yet
    async for data in stream.iter_any():
        *ended, rest = data.split(b"\n")
        for piece in ended:
            yield b"".join([*head, piece])
            head.clear()
        if rest:
            head.append(rest)
    if head:
        yield b"".join(head)


async def stream_request(session: aiohttp.ClientSession, url: str, body: bytes,
                         result: RequestResult) -> RequestResult:
    """Sends one request (its JSON body encoded beforehand: a 100k-token prompt takes milliseconds to
    encode, which must not count as TTFT) and reads its stream into `result`. Any failure lands in
    result.error: one request must not end the run and lose every other result."""
    result.sent_at = time.time()
    start = time.perf_counter()
    finished = False
    try:
        async with session.post(url, data=body, headers=JSON_HEADERS) as resp:
            result.status = resp.status
            if resp.status != 200:
                result.error = f"HTTP {resp.status}: {(await resp.text())[:500]}"
                return result
            async with aclosing(sse_lines(resp.content)) as lines:
                async for line in lines:
                    elapsed = time.perf_counter() - start  # before decoding: a long chunk takes a while
                    item = parse_sse_line(line)
                    if item is DONE:
                        finished = True
                        break
                    if item is not None:
                        take_chunk(result, item, elapsed)
    except Exception as exc:  # noqa: BLE001 — any failure lands in its result (CancelledError still cancels)
        result.error = f"{type(exc).__name__}: {exc}"[:500]
    finally:
        result.e2e = time.perf_counter() - start
    if not result.error and not finished:
        result.error = "the stream ended without data: [DONE]"
    result.ok = not result.error and bool(result.chunks)
    if not result.error and not result.ok:
        result.error = "no token arrived (no chunk carried text or token ids)"
    return result
