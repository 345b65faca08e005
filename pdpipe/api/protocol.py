"""OpenAI request bodies as msgspec structs, their checks, and the error format clients expect.

Unknown fields are ignored (clients send many); known ones are type-checked, and a value out of range
is a 400 that names the field (`param`)."""
from __future__ import annotations

import re
from typing import Any

import msgspec

from pdpipe.messages import SamplingParams


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None,
                 type_: str = "invalid_request_error", code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.type, self.code = status, message, param, type_, code
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class StreamOptions(msgspec.Struct):
    include_usage: bool = False


class _Common(msgspec.Struct, kw_only=True):
    model: str
    temperature: float | None = None
    top_p: float | None = None
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    user: str | None = None
    # beyond OpenAI, as vLLM accepts them
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    ignore_eos: bool = False
    min_tokens: int = 0
    stop_token_ids: list[int] | None = None
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    return_token_ids: bool = False  # add each choice's generated token ids
    cache_salt: str | None = None  # requests share cached KV only under the same salt (as in vLLM)


class CompletionRequest(_Common, kw_only=True):
    prompt: str | list[Any]
    max_tokens: int | None = 16
    logprobs: int | None = None
    echo: bool = False


class ChatCompletionRequest(_Common, kw_only=True):
    messages: list[Any]
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None


_AT = re.compile(r"at `\$\.([A-Za-z_]+)|missing required field `([A-Za-z_]+)`")


def parse_body(body: bytes, cls: type) -> Any:
    try:
        return msgspec.json.decode(body, type=cls)
    except msgspec.ValidationError as exc:
        m = _AT.search(str(exc))
        raise APIError(400, f"invalid request: {exc}", (m.group(1) or m.group(2)) if m else None) from None
    except msgspec.DecodeError as exc:
        raise APIError(400, f"malformed JSON body: {exc}") from None
    except RecursionError:
        raise APIError(400, "malformed JSON body: nested too deeply") from None


def sampling_params(req: CompletionRequest | ChatCompletionRequest, max_tokens: int,
                    logprobs: int | None) -> SamplingParams:
    if req.n != 1:
        raise APIError(400, f"n: {req.n} is not supported; pdpipe returns one choice (n=1)", "n")
    if req.cache_salt is not None and not req.cache_salt:
        raise APIError(400, "cache_salt: must be a non-empty string when given", "cache_salt")
    stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
    values: dict[str, Any] = dict(
        max_tokens=max_tokens, temperature=1.0 if req.temperature is None else req.temperature,
        top_p=1.0 if req.top_p is None else req.top_p, top_k=req.top_k or 0, min_p=req.min_p or 0.0,
        seed=req.seed, repetition_penalty=req.repetition_penalty or 1.0,
        presence_penalty=req.presence_penalty, frequency_penalty=req.frequency_penalty, stop=stop,
        stop_token_ids=list(req.stop_token_ids or []), ignore_eos=req.ignore_eos, min_tokens=req.min_tokens,
        logprobs=logprobs, skip_special_tokens=req.skip_special_tokens,
        include_stop_str_in_output=req.include_stop_str_in_output)
    try:
        return SamplingParams(**values)
    except ValueError as exc:
        field = str(exc).split(":", 1)[0]
        api_name = {"logprobs": "top_logprobs" if isinstance(req, ChatCompletionRequest) else "logprobs"}
        raise APIError(400, str(exc), api_name.get(field, field)) from None
