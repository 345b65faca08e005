"""Factories shared by the tests: generated models per architecture, engines over them, the
`transformers` reference run on the same folder, and the leak oracle."""
from __future__ import annotations

import functools
import os
from pathlib import Path

import pytest
import torch

from pdpipe.launcher import THREAD_ENV
from pdpipe.llm import LLM
from pdpipe.models.make import MakeModelConfig, make_model

ARCHS = ("llama", "qwen2", "qwen3", "mistral", "ernie4_5", "ernie4_5_moe", "qwen3_moe", "mixtral")

# Tiny, but each exercises its family's switches: tied embeddings (llama, ernie), q/k/v bias (qwen2),
# q/k norm (qwen3), sliding window (mistral), o/mlp bias and interleaved rope (ernie), routed experts
# (the MoE three).
TEST_MODELS = {
    "llama": MakeModelConfig(arch="llama", tie_embeddings=True, seed=1),
    "qwen2": MakeModelConfig(arch="qwen2", seed=2),
    "qwen3": MakeModelConfig(arch="qwen3", head_dim=32, seed=3),
    "mistral": MakeModelConfig(arch="mistral", sliding_window=24, kv_heads=1, seed=4),
    "ernie4_5": MakeModelConfig(arch="ernie4_5", bias=True, seed=5),
    # mixture of experts: ERNIE's first layer dense, its selection bias and a shared expert; Qwen3-MoE's
    # top-k weights not renormalised (its default) and a dense first layer; Mixtral's every layer routed
    "ernie4_5_moe": MakeModelConfig(arch="ernie4_5_moe", layers=3, experts=16, top_k=2, shared_experts=1, seed=6),
    "qwen3_moe": MakeModelConfig(arch="qwen3_moe", layers=3, head_dim=32, experts=8, top_k=2, seed=7),
    "mixtral": MakeModelConfig(arch="mixtral", experts=8, top_k=2, seed=8),
}


def pytest_configure(config):
    """One intra-op thread for the test process and the processes it spawns (tensor-parallel ranks, the
    command line), unless the environment says otherwise: the test models are too small for more, and
    torch's default (a thread on every core, spinning between ops) cost tests/test_pipeline_logic.py
    24 s of CPU instead of 7 on 2 cores. Launched pipelines get the launcher's budget whatever this says."""
    for name in THREAD_ENV:
        os.environ.setdefault(name, "1")
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory):
    """model_dir(arch) → a generated model folder, made once per session."""
    root = tmp_path_factory.mktemp("models")

    @functools.cache
    def make(arch: str) -> Path:
        return make_model(root / arch, TEST_MODELS[arch])

    return make


def make_llm(model: Path, **kwargs) -> LLM:
    kwargs.setdefault("block_size", 16)
    kwargs.setdefault("num_blocks", 64)
    return LLM(str(model), **kwargs)


def make_prompts(vocab_size: int, lengths=(1, 2, 5, 16, 17, 33, 50, 70), seed: int = 0) -> list[list[int]]:
    """Token-id prompts of the given lengths (some span several 16-token blocks, one is a single token)."""
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab_size, (n,), generator=gen).tolist() for n in lengths]


@functools.cache
def _hf_model(model: Path, dtype: torch.dtype):
    import transformers

    return transformers.AutoModelForCausalLM.from_pretrained(model, dtype=dtype).eval()


def hf_greedy(model: Path, prompts: list[list[int]], max_new_tokens: int,
              dtype: torch.dtype = torch.float32) -> list[tuple[list[int], list[float]]]:
    """`transformers` greedy generate, one prompt at a time (no padding): tokens and their logprobs."""
    hf = _hf_model(model, dtype)
    results = []
    for prompt in prompts:
        ids = torch.tensor([prompt])
        with torch.no_grad():
            out = hf.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                              max_new_tokens=max_new_tokens, output_logits=True,
                              return_dict_in_generate=True)
        tokens = out.sequences[0, len(prompt):].tolist()
        logprobs = [torch.log_softmax(step[0].float(), -1)[t].item() for step, t in zip(out.logits, tokens)]
        results.append((tokens, logprobs))
    return results


def engine_tokens(engine, prompts: list[list[int]], params) -> list[list[int]]:
    """Each prompt's output tokens from an LLMEngine, the prompts queued together and run to the end."""
    for i, prompt in enumerate(prompts):
        engine.add_request(str(i), prompt, params)
    tokens: dict[str, list[int]] = {str(i): [] for i in range(len(prompts))}
    while engine.has_unfinished():
        for out in engine.step():
            tokens[out.request_id].extend(out.token_ids)
    return list(tokens.values())


def assert_leak_free(llm_or_engine) -> None:
    engine = getattr(llm_or_engine, "engine", llm_or_engine)
    assert engine.leak_free(), (
        f"leak: {engine.blocks.num_used_blocks} blocks used, held={list(engine.scheduler.held)}, "
        f"live={engine.has_unfinished()}")


def causal_prompt_reference(q, k, v, bounds: list[int], scale: float) -> torch.Tensor:
    """Each packed prompt attends causally to itself alone, written out in float64 (GQA: each key/value
    head serves a group of query heads)."""
    out = torch.empty(q.shape, dtype=torch.float64)
    group = q.shape[1] // k.shape[1]
    for a, b in zip(bounds, bounds[1:]):
        qs = q[a:b].double().cpu().transpose(0, 1)  # [heads, n, dim]
        ks = k[a:b].double().cpu().transpose(0, 1).repeat_interleave(group, 0)
        vs = v[a:b].double().cpu().transpose(0, 1).repeat_interleave(group, 0)
        scores = (qs @ ks.transpose(1, 2)) * scale
        scores.masked_fill_(torch.ones(b - a, b - a, dtype=torch.bool).triu(1), float("-inf"))
        out[a:b] = (scores.softmax(-1) @ vs).transpose(0, 1)
    return out

