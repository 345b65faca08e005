"""From engine tokens to user text: incremental detokenization, stop strings, and holding back text
that could still turn into a stop string. The offline `LLM` uses it, and so does the API front-end."""
from __future__ import annotations

from dataclasses import dataclass, field

from pdpipe.messages import EngineOutput, SamplingParams, TokenLogprob
from pdpipe.tokenizer import Tokenizer


@dataclass
class RequestOutput:
    request_id: str
    prompt_token_ids: list[int]
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None  # "stop" | "length" | "abort" | "error"
    stop_reason: int | str | None = None
    logprobs: list[TokenLogprob] | None = None
    num_cached_tokens: int = 0  # prompt tokens whose KV came from a prefix cache

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class TextDelta:
    text: str
    token_ids: list[int]
    logprobs: list[TokenLogprob] | None
    finish_reason: str | None
    stop_reason: int | str | None


class RequestTextState:
    """One request's text. `update` returns what may be shown now; `stopped_by_text` tells the caller
    to abort the request in its engine, since only text reveals a stop string."""

    def __init__(self, tokenizer: Tokenizer, request_id: str, prompt_ids: list[int],
                 params: SamplingParams):
        self.params = params
        self.detok = tokenizer.detokenizer(prompt_ids, params.skip_special_tokens)
        self.out = RequestOutput(request_id, list(prompt_ids),
                                 logprobs=[] if params.logprobs is not None else None)
        self._emitted = 0
        self._max_stop = max((len(s) for s in params.stop), default=0)
        self.stopped_by_text = False

    def update(self, engine_out: EngineOutput) -> TextDelta:
        out = self.out
        out.num_cached_tokens = max(out.num_cached_tokens, engine_out.cached_tokens)
        start_tokens = len(out.token_ids)
        last = len(engine_out.token_ids) - 1
        for i, token in enumerate(engine_out.token_ids):
            out.token_ids.append(token)
            if engine_out.logprobs is not None and out.logprobs is not None:
                out.logprobs.append(engine_out.logprobs[i])
            if out.finished:
                continue
            if i == last and engine_out.finish_reason == "stop":
                continue  # the EOS / stop token itself is not text
            self._append_text(self.detok.step(token))
        if not out.finished and engine_out.finish_reason is not None:
            self._append_text(self.detok.flush())
            if not out.finished:
                out.finish_reason, out.stop_reason = engine_out.finish_reason, engine_out.stop_reason
        release = len(out.text) if out.finished else len(out.text) - self._holdback()
        delta = out.text[self._emitted:release]
        self._emitted = max(self._emitted, release)
        new_logprobs = out.logprobs[start_tokens:] if out.logprobs is not None else None
        return TextDelta(delta, out.token_ids[start_tokens:], new_logprobs, out.finish_reason,
                         out.stop_reason)

    def _append_text(self, piece: str) -> None:
        if not piece:
            return
        out = self.out
        search_from = max(0, len(out.text) - self._max_stop + 1)
        out.text += piece
        hits = [(out.text.find(s, search_from), s) for s in self.params.stop]
        hits = [(i, s) for i, s in hits if i >= 0]
        if hits:
            idx, stop = min(hits)
            keep = idx + (len(stop) if self.params.include_stop_str_in_output else 0)
            out.text = out.text[:keep]
            out.finish_reason, out.stop_reason = "stop", stop
            self.stopped_by_text = True

    def _holdback(self) -> int:
        text = self.out.text
        for k in range(min(self._max_stop - 1, len(text)), 0, -1):
            if any(s.startswith(text[-k:]) for s in self.params.stop):
                return k
        return 0
