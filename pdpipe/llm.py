"""The offline API: `LLM(model_dir).generate(prompts, SamplingParams)` and `LLM.chat(...)`."""
from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import replace
from typing import Any, cast

from pdpipe.config import CacheConfig, EngineConfig, SchedulerConfig
from pdpipe.engine.engine import LLMEngine
from pdpipe.messages import SamplingParams
from pdpipe.output import RequestOutput, RequestTextState
from pdpipe.tokenizer import Tokenizer

Prompt = str | list[int]


class LLM:
    """A colocated engine with its tokenizer. `model` is a Hugging Face–format folder; empty means the
    embedded demo model. Keyword arguments are fields of EngineConfig, CacheConfig or SchedulerConfig."""

    def __init__(self, model: str = "", **kwargs: Any):
        self.engine = LLMEngine(build_engine_config(model, **kwargs))
        self.tokenizer = Tokenizer(self.engine.model_dir)
        self._ids = itertools.count()

    def generate(self, prompts: Prompt | Sequence[Prompt], params: SamplingParams | Sequence[SamplingParams]
                 | None = None) -> list[RequestOutput]:
        """Runs every prompt (text, or a list of token ids) to completion, in continuous batches."""
        single = isinstance(prompts, str) or (prompts and isinstance(prompts[0], int))
        batch = cast(Sequence[Prompt], [prompts] if single else prompts)  # mypy cannot tell ids from prompts
        token_lists = [self.tokenizer.encode(p) if isinstance(p, str) else list(p) for p in batch]
        return self._run(token_lists, params)

    def chat(self, conversations: list[dict] | list[list[dict]],
             params: SamplingParams | Sequence[SamplingParams] | None = None,
             add_generation_prompt: bool = True) -> list[RequestOutput]:
        """Applies the model's chat template to each conversation (a list of role/content messages)."""
        if conversations and isinstance(conversations[0], dict):
            conversations = [conversations]
        token_lists = [self.tokenizer.encode_chat(c, add_generation_prompt) for c in conversations]
        return self._run(token_lists, params)

    def _run(self, token_lists: list[list[int]], params) -> list[RequestOutput]:
        params = params or SamplingParams()
        if isinstance(params, SamplingParams):
            params = [params] * len(token_lists)
        if len(params) != len(token_lists):
            raise ValueError(f"params: {len(params)} given for {len(token_lists)} prompts")
        states: dict[str, RequestTextState] = {}
        for ids, p in zip(token_lists, params):
            rid = str(next(self._ids))
            self.engine.add_request(rid, ids, p)
            states[rid] = RequestTextState(self.tokenizer, rid, ids, p)
        while self.engine.has_unfinished():
            for out in self.engine.step():
                state = states[out.request_id]
                state.update(out)
                if state.stopped_by_text and out.finish_reason is None:
                    self.engine.abort_request(out.request_id)
        return [s.out for s in states.values()]


def build_engine_config(model: str = "", **kwargs: Any) -> EngineConfig:
    """EngineConfig from flat keyword arguments, each routed to the dataclass that owns it."""
    parts: dict[str, Any] = {"cache": CacheConfig(), "scheduler": SchedulerConfig()}
    top: dict[str, Any] = {}
    for key, value in kwargs.items():
        owner = next((n for n, c in parts.items() if key in c.__dataclass_fields__), None)
        if owner:
            parts[owner] = replace(parts[owner], **{key: value})
        elif key in EngineConfig.__dataclass_fields__ and key not in parts:
            top[key] = value
        else:
            raise TypeError(f"{key}: not an engine, cache or scheduler setting")
    return EngineConfig(model=str(model or ""), **top, **parts)
