"""One parametrised pre-norm decoder for every supported family (Llama, Qwen2, Qwen3, Mistral, ERNIE 4.5,
and the mixture-of-experts ERNIE 4.5 MoE, Qwen3-MoE and Mixtral).

Module names follow the Hugging Face checkpoints (`model.layers.N.self_attn.q_proj`…), so a
checkpoint's state dict loads without renaming. The forward pass takes a flat batch of tokens from
many sequences and reads/writes their KV through the paged cache.
"""
from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from pdpipe import kernels

from .layers import Linear, RMSNorm, Rotary, fused_linear
from .moe import MoE
from .parallel import TensorParallel
from .spec import ModelSpec


@dataclass
class AttentionMetadata:
    """Where this step's tokens sit in the paged cache."""

    slot_mapping: torch.Tensor  # [num_tokens] int64; -1 for padding rows
    block_tables: torch.Tensor  # [num_seqs, max_blocks] int32
    query_start_loc: list[int]  # num_seqs + 1
    seq_lens: list[int]  # per sequence, context length after this step
    # device copies, for the GPU kernels (None on CPU)
    query_start_loc_t: torch.Tensor | None = None  # [num_seqs + 1] int32
    seq_lens_t: torch.Tensor | None = None  # [num_seqs] int32
    max_query_len: int = 0
    decode: bool = False  # every sequence has exactly one new token
    fresh: bool = False  # every sequence is a whole prompt with no context before it
    num_splits: int = 1  # attention's split of the context (decode or extend kernel's, which reads it)


_VARLEN: tuple | None = None  # (varlen_attn, extra kwargs) or () where torch lacks a usable one


def _varlen() -> tuple:
    """Torch's varlen flash attention (torch >= 2.10), imported on first use: its import costs seconds
    (it loads torch's compiler) that a CPU engine or the CLI should not pay."""
    global _VARLEN
    if _VARLEN is None:
        try:
            from torch.nn.attention.varlen import varlen_attn
        except ImportError:
            _VARLEN = ()
        else:
            args = set(inspect.signature(varlen_attn).parameters)
            # torch 2.9's had neither scale nor window_size: one call per prompt instead; 2.11 takes GQA
            # without being told
            _VARLEN = ((varlen_attn, {"enable_gqa": True} if "enable_gqa" in args else {})
                       if {"scale", "window_size"} <= args else ())
    return _VARLEN


# Never cuDNN for prompts: it builds a graph per new sequence length (~40 ms on H200, which doubled the
# first prefill of every new prompt length in service; benchmarks/RESULTS.md, "new prompt lengths").
_PROMPT_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


def _varlen_for(dtype: torch.dtype, head_dim: int) -> tuple:
    """Varlen flash attention where it takes these prompts (fp16/bf16, head dim <= 256), else ()."""
    return _varlen() if dtype in (torch.float16, torch.bfloat16) and head_dim <= 256 else ()


def _prompt_attention(q, k, v, meta: AttentionMetadata, scale: float) -> torch.Tensor:
    """Whole prompts attend only to themselves: flash attention over the packed batch (measured faster
    than the paged Triton kernel for this case, and than one call per prompt; benchmarks/RESULTS.md)."""
    varlen = _varlen_for(q.dtype, q.shape[-1])
    if varlen:
        attn, extra = varlen
        cu = meta.query_start_loc_t
        return attn(q, k, v, cu, cu, meta.max_query_len, meta.max_query_len, scale=scale, window_size=(-1, 0),
                    **extra)
    out = torch.empty_like(q)
    bounds = meta.query_start_loc
    with sdpa_kernel(_PROMPT_BACKENDS):
        for a, b in zip(bounds, bounds[1:]):
            o = nn.functional.scaled_dot_product_attention(
                q[a:b].transpose(0, 1)[None], k[a:b].transpose(0, 1)[None], v[a:b].transpose(0, 1)[None],
                is_causal=True, scale=scale, enable_gqa=True)
            out[a:b] = o[0].transpose(0, 1)
    return out


def prompt_attention_capturable(model: CausalLM) -> bool:
    """Whether a step of whole prompts can be captured as a CUDA graph: one varlen flash-attention call
    for the batch (bf16/fp16, head dim <= 256, torch's varlen available) and no sliding window (those
    layers attend through the Triton extend kernel)."""
    spec, weight = model.spec, next(model.parameters())
    return (weight.is_cuda and kernels.triton_ops is not None and all(w is None for w in spec.sliding_windows)
            and bool(_varlen_for(weight.dtype, spec.head_dim)))


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
           meta: AttentionMetadata, scale: float, window: int | None) -> torch.Tensor:
    """Paged attention of this step's queries (`k`, `v`: this step's keys and values, already stored):
    Triton kernels on GPU, the torch reference elsewhere."""
    if len(meta.query_start_loc) == 1:  # no sequence at all: a data-parallel rank following a step
        return torch.zeros_like(q)
    if kernels.use_triton(q):
        ops = kernels.triton_ops
        if meta.decode:
            return ops.decode_attention(q, k_cache, v_cache, meta.block_tables, meta.seq_lens_t, scale, window,
                                        meta.num_splits)
        if meta.fresh and window is None and k_cache.dtype != torch.uint8:  # an FP8 pool's prompts read their
            return _prompt_attention(q, k, v, meta, scale)                  # stored rows, as later hits will
        return ops.extend_attention(q, k_cache, v_cache, meta.block_tables, meta.query_start_loc_t,
                                    meta.seq_lens_t, meta.max_query_len, scale, window, num_splits=meta.num_splits)
    return kernels.paged_attention(q, k_cache, v_cache, meta.block_tables, meta.query_start_loc, meta.seq_lens,
                                   scale, window)


class Attention(nn.Module):
    def __init__(self, spec: ModelSpec, sliding_window: int | None):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = spec.num_heads, spec.num_kv_heads, spec.head_dim
        self.scale = self.head_dim ** -0.5
        self.sliding_window = sliding_window
        q_size, kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        self.q_proj = Linear(spec.hidden_size, q_size, bias=spec.qkv_bias)
        self.k_proj = Linear(spec.hidden_size, kv_size, bias=spec.qkv_bias)
        self.v_proj = Linear(spec.hidden_size, kv_size, bias=spec.qkv_bias)
        self.o_proj = Linear(q_size, spec.hidden_size, bias=spec.o_bias)
        if spec.qk_norm:
            self.q_norm = RMSNorm(self.head_dim, spec.rms_norm_eps)
            self.k_norm = RMSNorm(self.head_dim, spec.rms_norm_eps)
        self.qk_norm = spec.qk_norm
        self.qkv_proj: nn.Module | None = None  # set by fuse(): one GEMM instead of three
        self.tp: TensorParallel | None = None  # set on a rank of a tensor-parallel instance

    def fuse(self) -> None:
        self.qkv_proj = fused_linear(self.q_proj, self.k_proj, self.v_proj)
        del self.q_proj, self.k_proj, self.v_proj

    def forward(self, x, rotary: Rotary, cos, sin, k_cache, v_cache, meta: AttentionMetadata):
        n = x.shape[0]
        if self.qkv_proj is not None:
            kv_size = self.num_kv_heads * self.head_dim
            q, k, v = self.qkv_proj(x).split([self.num_heads * self.head_dim, kv_size, kv_size], dim=-1)
        else:
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        q = q.reshape(n, self.num_heads, self.head_dim)
        k = k.reshape(n, self.num_kv_heads, self.head_dim)
        v = v.reshape(n, self.num_kv_heads, self.head_dim)
        norms = (self.q_norm.weight, self.k_norm.weight, self.q_norm.eps) if self.qk_norm else None
        q, k = kernels.rope_and_store(q, k, v, cos, sin, k_cache, v_cache, meta.slot_mapping, rotary.interleaved,
                                      norms)
        out = attend(q, k, v, k_cache, v_cache, meta, self.scale, self.sliding_window)
        out = self.o_proj(out.reshape(n, -1))
        return self.tp.all_reduce(out) if self.tp is not None else out


class MLP(nn.Module):
    def __init__(self, spec: ModelSpec):
        super().__init__()
        self.gate_proj = Linear(spec.hidden_size, spec.intermediate_size, bias=spec.mlp_bias)
        self.up_proj = Linear(spec.hidden_size, spec.intermediate_size, bias=spec.mlp_bias)
        self.down_proj = Linear(spec.intermediate_size, spec.hidden_size, bias=spec.mlp_bias)
        self.gate_up_proj: nn.Module | None = None
        self.tp: TensorParallel | None = None

    def fuse(self) -> None:
        self.gate_up_proj = fused_linear(self.gate_proj, self.up_proj)
        del self.gate_proj, self.up_proj

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gate_up_proj is not None:
            out = self.down_proj(kernels.silu_and_mul(self.gate_up_proj(x)))
        else:
            out = self.down_proj(nn.functional.silu(self.gate_proj(x)) * self.up_proj(x))
        return self.tp.all_reduce(out) if self.tp is not None else out


class DecoderLayer(nn.Module):
    def __init__(self, spec: ModelSpec, layer_idx: int):
        super().__init__()
        self.self_attn = Attention(spec, spec.sliding_windows[layer_idx])
        routed = spec.moe is not None and spec.moe.layers[layer_idx]
        # the MLP or the experts, under the checkpoint's name for them (`mlp`, Mixtral's `block_sparse_moe`)
        self.ffn_name = spec.moe.module if routed and spec.moe is not None else "mlp"
        self.add_module(self.ffn_name, MoE(spec, spec.moe) if routed and spec.moe is not None else MLP(spec))
        self.input_layernorm = RMSNorm(spec.hidden_size, spec.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(spec.hidden_size, spec.rms_norm_eps)

    @property
    def ffn(self) -> MLP | MoE:
        return getattr(self, self.ffn_name)

    def forward(self, x, residual, rotary, cos, sin, k_cache, v_cache, meta):
        """(x, residual) → (x, residual): the residual adds ride in the norms (one kernel each on GPU)."""
        if residual is None:
            residual, x = x, self.input_layernorm(x)
        else:
            x, residual = self.input_layernorm(x, residual)
        x = self.self_attn(x, rotary, cos, sin, k_cache, v_cache, meta)
        x, residual = self.post_attention_layernorm(x, residual)
        return self.ffn(x), residual


class DecoderBody(nn.Module):
    def __init__(self, spec: ModelSpec, vocab_rows: int | None = None):
        super().__init__()
        self.embed_tokens = nn.Embedding(vocab_rows or spec.vocab_size, spec.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(spec, i) for i in range(spec.num_layers))
        self.norm = RMSNorm(spec.hidden_size, spec.rms_norm_eps)


class CausalLM(nn.Module):
    """`forward` runs the layers over a flat token batch; `logits` projects chosen hidden states."""

    def __init__(self, spec: ModelSpec, tp: TensorParallel | None = None):
        """With `tp`, one rank's share: `spec` is then the rank's (parallel.rank_spec), and the embedding
        and output projection hold this rank's vocabulary rows."""
        super().__init__()
        self.spec = spec
        data_parallel = tp is not None and tp.data_parallel_attention
        self.tp = None if data_parallel else tp  # with data-parallel attention only the experts are split
        rows = spec.vocab_size // self.tp.size if self.tp is not None else spec.vocab_size
        self.model = DecoderBody(spec, rows)
        self.rotary = Rotary(spec.rope, spec.head_dim)
        if not spec.tie_word_embeddings:
            self.lm_head = Linear(spec.hidden_size, rows, bias=False)
        if tp is not None:
            for layer in self.model.layers:
                assert isinstance(layer, DecoderLayer)
                if not data_parallel:
                    layer.self_attn.tp = layer.ffn.tp = tp
                elif isinstance(layer.ffn, MoE):
                    layer.ffn.tp = tp

    @torch.inference_mode()
    def forward(
        self,
        input_ids: torch.Tensor,  # [num_tokens] int64
        positions: torch.Tensor,  # [num_tokens] int64
        kv_layers: list[tuple[torch.Tensor, torch.Tensor]],  # per layer (k_cache, v_cache)
        meta: AttentionMetadata,
        on_layer_done: Callable[[int], None] | None = None,
    ) -> torch.Tensor:  # [num_tokens, hidden_size]
        x = self._embed(input_ids)
        cos, sin = self.rotary.cos_sin(positions)
        residual = None
        for i, layer in enumerate(self.model.layers):
            k_cache, v_cache = kv_layers[i]
            x, residual = layer(x, residual, self.rotary, cos, sin, k_cache, v_cache, meta)
            if on_layer_done is not None:
                on_layer_done(i)
        return self.model.norm(x, residual)[0]

    def _embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.tp is None:
            return self.model.embed_tokens(input_ids)
        rows = self.model.embed_tokens.num_embeddings
        local = input_ids - self.tp.rank * rows
        mine = (local >= 0) & (local < rows)
        x = self.model.embed_tokens(torch.where(mine, local, 0)) * mine[:, None]
        return self.tp.all_reduce(x)

    def fuse_projections(self) -> None:
        """q/k/v and gate/up as single GEMMs, and the experts stacked for the fused MoE kernel (GPU):
        fewer, larger reads of the weights."""
        for layer in self.model.layers:
            assert isinstance(layer, DecoderLayer)
            layer.self_attn.fuse()
            layer.ffn.fuse()
        if self.model.embed_tokens.weight.is_cuda:  # the unfused copies back to the driver: the KV pool is
            torch.cuda.empty_cache()                # a plain cudaMalloc, outside torch's cache

    @property
    def head_weight(self) -> torch.Tensor:
        """The LM head's weight: the embedding's where tied (this rank's vocabulary share)."""
        return self.model.embed_tokens.weight if self.spec.tie_word_embeddings else self.lm_head.weight

    @torch.inference_mode()
    def logits(self, hidden: torch.Tensor) -> torch.Tensor:  # [n, hidden] → [n, vocab] float32
        logits = kernels.linear(hidden, self.head_weight).float()
        return self.tp.gather_last(logits) if self.tp is not None else logits
