"""The building blocks the decoder and the experts share: the Linear that may take the skinny GEMM, the
fusion of projections into one GEMM, RMSNorm (the residual add fused on GPU) and rotary embeddings."""
from __future__ import annotations

import math

import torch
from torch import nn

from pdpipe import kernels
from pdpipe.quant.weights import QuantizedWeight, dequantize

from .spec import RopeSpec


class Linear(nn.Linear):
    """nn.Linear through `kernels.linear` (a skinny Triton GEMM for decode-sized batches where faster)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return kernels.linear(x, self.weight, self.bias)


class QuantLinear(nn.Module):
    """A Linear whose weight is quantized (`pdpipe.quant.weights`): its codes and scales kept as they are,
    dequantized into the activations' dtype at use (exactly: code x scale in float32, then that dtype); on
    GPU, for a few rows, read by the weight-read Triton GEMM instead (`kernels.triton_quant`)."""

    codes: torch.Tensor
    scale: torch.Tensor
    bias: nn.Parameter | None

    def __init__(self, weight: QuantizedWeight, bias: torch.Tensor | None = None):
        super().__init__()
        self.scheme, self.shape, self.cell, self.offset = weight.scheme, weight.shape, weight.cell, weight.offset
        self.out_features, self.in_features = weight.shape
        self.register_buffer("codes", weight.codes.contiguous())  # a shard's columns are a strided view
        self.register_buffer("scale", weight.scale.contiguous())
        self.bias = nn.Parameter(bias, requires_grad=False) if bias is not None else None
        self.w8a8_scale: torch.Tensor | None  # a scale an output row: W8A8 for prompt-sized batches (see below)
        self.register_buffer("w8a8_scale", None, persistent=False)

    def channel_scales(self) -> torch.Tensor | None:
        """FP8 codes with one scale an output row (each row's K columns inside one scale cell): that scale
        for each of its rows, float32 [N]; None for any other weight."""
        (n, k), (bn, bk), (n_off, k_off) = self.shape, self.cell, self.offset
        if self.scheme != "fp8" or k_off + k > bk:
            return None
        rows = (torch.arange(n, device=self.scale.device) + n_off) // bn
        return self.scale[rows, k_off // bk].float().contiguous()

    @property
    def quantized(self) -> QuantizedWeight:
        return QuantizedWeight(self.scheme, self.codes, self.scale, self.shape, self.cell, self.offset)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.w8a8_scale is not None and kernels.fp8_w8a8_fits(x, self.codes):  # prompt-sized, FP8 x FP8
            return kernels.fp8_w8a8_linear(x, self.codes, self.w8a8_scale, self.bias)
        if kernels.quant_skinny_fits(x):  # decode-sized on GPU: the codes read once, upcast in registers
            return kernels.quant_skinny_linear(x, self.scheme, self.codes, self.scale, self.shape, self.cell,
                                               self.offset, self.bias)
        if kernels.use_triton(x):  # prefill on GPU: the weight dequantized in one pass, then cuBLAS
            weight = kernels.quant_dequantize(self.scheme, self.codes, self.scale, self.shape, self.cell, self.offset,
                                              x.dtype)
        else:
            weight = dequantize(self.quantized, x.dtype)
        return kernels.linear(x, weight, self.bias)


def use_fp8_activations(model: nn.Module) -> int:
    """`[engine] activation_quantization = "fp8"`: every projection with FP8 codes of a scale an output row
    takes W8A8 for prompt-sized batches (its activations quantized per token to e4m3, one FP8 GEMM); how
    many do. Call it after the projections are fused (a fused projection is a new QuantLinear)."""
    count = 0
    for module in model.modules():
        if isinstance(module, QuantLinear) and (scales := module.channel_scales()) is not None:
            module.w8a8_scale = scales
            count += 1
    if not count:
        raise ValueError("activation_quantization: fp8 needs FP8 weights of a scale per output channel "
                         "(quantization = fp8, or such a checkpoint); this model has no such projection")
    return count


class Stacked(nn.Module):
    """Projections side by side (their outputs concatenated): what fusing quantized projections gives
    where their scale grids cannot be joined (a block cut by a shard)."""

    def __init__(self, parts: list[nn.Module]):
        super().__init__()
        self.parts = nn.ModuleList(parts)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([p(x) for p in self.parts], dim=-1)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        """normalize(x); with `residual`, normalize(x + residual) and that sum, in one kernel on GPU."""
        out, new_residual = kernels.rms_norm(x, self.weight, self.eps, residual)
        return out if residual is None else (out, new_residual)


def rope_inv_freq(rope: RopeSpec, head_dim: int) -> torch.Tensor:
    inv_freq = 1.0 / (rope.theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    if rope.rope_type == "linear":
        return inv_freq / rope.factor
    if rope.rope_type != "llama3":
        return inv_freq
    old_len = rope.original_max_position_embeddings
    low_wavelen = old_len / rope.low_freq_factor
    high_wavelen = old_len / rope.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / rope.factor, inv_freq)
    smooth = (old_len / wavelen - rope.low_freq_factor) / (rope.high_freq_factor - rope.low_freq_factor)
    smoothed = (1 - smooth) * scaled / rope.factor + smooth * scaled
    medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
    return torch.where(medium, smoothed, scaled)


class Rotary(nn.Module):
    inv_freq: torch.Tensor

    def __init__(self, rope: RopeSpec, head_dim: int):
        super().__init__()
        self.interleaved = rope.interleaved
        self.register_buffer("inv_freq", rope_inv_freq(rope, head_dim), persistent=False)

    def cos_sin(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """float32 [num_tokens, head_dim], each frequency repeated for the dimension it pairs with."""
        freqs = positions[:, None].float() * self.inv_freq.float()  # [num_tokens, head_dim / 2]
        emb = freqs.repeat_interleave(2, dim=-1) if self.interleaved else torch.cat((freqs, freqs), dim=-1)
        return emb.cos(), emb.sin()


def fused_linear(*parts: nn.Module) -> nn.Module:
    """One GEMM for projections that read the same input: their weights stacked by output rows (quantized
    ones joined where their scale grids line up, else run side by side)."""
    if any(isinstance(p, QuantLinear) for p in parts):
        return _fused_quantized(parts)
    linears = [p for p in parts if isinstance(p, nn.Linear)]
    assert len(linears) == len(parts)
    first = linears[0]
    fused = Linear(first.in_features, sum(p.out_features for p in linears), bias=first.bias is not None,
                   device=first.weight.device, dtype=first.weight.dtype)
    with torch.no_grad():
        fused.weight.copy_(torch.cat([p.weight for p in linears]))
        if first.bias is not None:
            fused.bias.copy_(torch.cat([p.bias for p in linears if p.bias is not None]))
    return fused


def _fused_quantized(parts) -> nn.Module:
    if not all(isinstance(p, QuantLinear) for p in parts):
        return Stacked(list(parts))
    quantized: list[QuantLinear] = list(parts)
    first = quantized[0]
    joinable = all((p.scheme, p.cell, p.offset[1]) == (first.scheme, first.cell, first.offset[1])
                   and p.offset[0] == 0 and p.scale.shape[1] == first.scale.shape[1] for p in quantized) \
        and all(p.out_features % first.cell[0] == 0 for p in quantized[:-1])
    if not joinable:
        return Stacked(list(parts))
    parts = quantized
    shape = (sum(p.out_features for p in parts), first.in_features)
    weight = QuantizedWeight(first.scheme, torch.cat([p.codes for p in parts]), torch.cat([p.scale for p in parts]),
                             shape, first.cell, first.offset)
    bias = torch.cat([p.bias for p in parts]) if first.bias is not None else None
    return QuantLinear(weight, bias)
