"""Turns the last position's logits of each sequence into its next token.

Log-probabilities reported are the model's own (log-softmax of the raw logits, before penalties
and temperature), as vLLM reports them by default. Seeded requests draw from their own generator,
so their output does not depend on what else is in the batch.
"""
from __future__ import annotations

import torch

from pdpipe.messages import SamplingParams, TokenLogprob

from .scheduler import Sample
from .sequence import Sequence


def apply_penalties(logits: torch.Tensor, seq: Sequence) -> torch.Tensor:  # [vocab] float32
    p = seq.params
    if p.repetition_penalty != 1.0:
        seen = torch.tensor(sorted(set(seq.token_ids)), dtype=torch.long, device=logits.device)
        vals = logits[seen]
        logits[seen] = torch.where(vals > 0, vals / p.repetition_penalty, vals * p.repetition_penalty)
    if (p.presence_penalty or p.frequency_penalty) and seq.num_output_tokens:
        out = torch.tensor(seq.output_token_ids, dtype=torch.long, device=logits.device)
        counts = torch.bincount(out, minlength=logits.shape[0]).to(logits.dtype)
        logits -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0).to(logits.dtype)
    return logits


def filter_logits(logits: torch.Tensor, p: SamplingParams) -> torch.Tensor:  # [vocab] float32, tempered
    if p.top_k > 0 and p.top_k < logits.shape[0]:
        kth = torch.topk(logits, p.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if p.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        drop = (torch.cumsum(probs, dim=-1) - probs) > p.top_p
        logits = logits.masked_fill(torch.zeros_like(drop).scatter(0, order, drop), float("-inf"))
    if p.min_p > 0.0:
        probs = torch.softmax(logits, dim=-1)
        logits = logits.masked_fill(probs < p.min_p * probs.max(), float("-inf"))
    return logits


def _plain_greedy(seq: Sequence) -> bool:
    p = seq.params
    return (p.greedy and p.logprobs is None and p.repetition_penalty == 1.0 and not p.presence_penalty
            and not p.frequency_penalty and seq.num_output_tokens >= p.min_tokens)


class Sampler:
    def __init__(self, eos_token_ids: frozenset[int]):
        self.eos_token_ids = sorted(eos_token_ids)

    def __call__(self, logits: torch.Tensor, seqs: list[Sequence]) -> dict[Sequence, Sample]:
        # logits: [num_seqs, vocab] float32, row i for seqs[i]; on the GPU, greedy batches stay there
        if logits.is_cuda:
            if all(_plain_greedy(s) for s in seqs):
                return {s: Sample(t) for s, t in zip(seqs, logits.argmax(dim=-1).tolist())}
            logits = logits.cpu()
        raw_logprobs = None
        if any(s.params.logprobs is not None for s in seqs):
            raw_logprobs = torch.log_softmax(logits, dim=-1)
        samples = {}
        for i, seq in enumerate(seqs):
            token = self._pick(logits[i].clone(), seq)
            logprob = None
            if seq.params.logprobs is not None:
                assert raw_logprobs is not None
                logprob = self._logprob(raw_logprobs[i], token, seq.params.logprobs)
            samples[seq] = Sample(token, logprob)
        return samples

    def _pick(self, logits: torch.Tensor, seq: Sequence) -> int:
        p = seq.params
        logits = apply_penalties(logits, seq)
        if seq.num_output_tokens < p.min_tokens:
            banned = ([] if p.ignore_eos else self.eos_token_ids) + list(p.stop_token_ids)
            logits[torch.tensor(banned, dtype=torch.long)] = float("-inf")
        if p.greedy:
            return int(torch.argmax(logits))
        probs = torch.softmax(filter_logits(logits / p.temperature, p), dim=-1)
        return int(torch.multinomial(probs, 1, generator=seq.generator))

    @staticmethod
    def _logprob(logprobs: torch.Tensor, token: int, k: int) -> TokenLogprob:
        top = []
        if k:
            vals, ids = torch.topk(logprobs, k)
            top = list(zip(ids.tolist(), vals.tolist()))
        return TokenLogprob(token, float(logprobs[token]), top)
