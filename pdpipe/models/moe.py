"""Routed experts in place of a decoder layer's MLP (ERNIE 4.5 MoE, Qwen3-MoE, Mixtral): the router,
the experts as the checkpoints name them, shared experts, and their split across the ranks of a
tensor-parallel instance (by width, or by id with expert parallelism; see parallel.py)."""
from __future__ import annotations

import torch
from torch import nn

from pdpipe import kernels
from pdpipe.kernels.reference import QuantStack

from .layers import Linear, QuantLinear, fused_linear
from .parallel import TensorParallel
from .spec import ModelSpec, MoeSpec


class Expert(nn.Module):
    """One expert's SiLU-gated MLP, its projections named as the checkpoint names them (gate, up, down:
    `gate_proj`/`up_proj`/`down_proj`, or Mixtral's `w1`/`w3`/`w2`)."""

    def __init__(self, hidden: int, inter: int, names: tuple[str, str, str], bias: bool = False):
        super().__init__()
        self.names = names
        for name, (i, o) in zip(names, ((hidden, inter), (hidden, inter), (inter, hidden))):
            self.add_module(name, Linear(i, o, bias=bias))
        self.gate_up: nn.Module | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gate_up is not None:
            return getattr(self, self.names[2])(kernels.silu_and_mul(self.gate_up(x)))
        gate, up, down = (getattr(self, n) for n in self.names)
        return down(nn.functional.silu(gate(x)) * up(x))

    def fuse(self) -> None:
        """gate and up as one GEMM (the shared experts on GPU)."""
        self.gate_up = fused_linear(getattr(self, self.names[0]), getattr(self, self.names[1]))
        delattr(self, self.names[0])
        delattr(self, self.names[1])


def quant_stack(parts: list[list[nn.Module]]) -> QuantStack:
    """Each expert's quantized projections (its gate and up rows joined, or its down), stacked for the fused
    kernel; refused, naming the setting, where they are not all quantized alike or a join would cut a cell."""
    if not all(isinstance(p, QuantLinear) for ps in parts for p in ps):
        raise ValueError("moe_quantization: some experts' projections are quantized and some not; the fused "
                         "expert kernels take them all one way (see quantization_ignore)")
    layers: list[list[QuantLinear]] = [[p for p in ps if isinstance(p, QuantLinear)] for ps in parts]
    first = layers[0][0]
    alike = all((p.scheme, p.cell, p.offset, tuple(p.scale.shape)) == (first.scheme, first.cell, first.offset,
                                                                      tuple(first.scale.shape))
                for ps in layers for p in ps)
    if not alike or (len(layers[0]) > 1 and (first.offset[0] or first.out_features % first.cell[0])):
        raise ValueError("moe_quantization: the experts' gate and up rows cannot share one scale grid (a block "
                         "cut by the split); use a row- or group-wise scheme for the experts (wint8, wint4, fp8)")
    codes = torch.stack([torch.cat([p.codes for p in ps]) for ps in layers])
    scale = torch.stack([torch.cat([p.scale for p in ps]) for ps in layers]).contiguous()
    n = sum(p.out_features for p in layers[0])
    return QuantStack(first.scheme, codes.contiguous(), scale, first.cell, first.offset,
                      (len(layers), n, first.in_features))


class Statics(nn.Module):
    """ERNIE's per-expert selection bias (`moe_statics.e_score_correction_bias`, float32)."""

    def __init__(self, num_experts: int):
        super().__init__()
        self.e_score_correction_bias = nn.Parameter(torch.zeros(1, num_experts, dtype=torch.float32))


def float32_weights(spec: ModelSpec) -> tuple[str, ...]:
    """Name suffixes of the weights kept in float32 whatever the model's dtype (ERNIE's router, as
    `transformers` keeps it)."""
    if spec.moe is None or not spec.moe.router_fp32:
        return ()
    return (f"{spec.moe.module}.gate.weight", "moe_statics.e_score_correction_bias")


class MoE(nn.Module):
    """Routed experts in place of the MLP. The router (`gate`) scores experts by softmax in float32;
    each token goes to its top-k, weighted by its scores (renormalised where the model does, see
    MoeSpec); shared experts (ERNIE) add their output unweighted. Unfused (CPU) a loop over the experts
    that received tokens, as `transformers` computes it; fused (GPU) `kernels.fused_moe`: two grouped
    GEMMs over the tokens sorted by expert, no host sync (CUDA graphs capture it)."""

    def __init__(self, spec: ModelSpec, moe: MoeSpec):
        super().__init__()
        self.moe = moe
        self.gate = nn.Linear(spec.hidden_size, moe.num_experts, bias=False,
                              dtype=torch.float32 if moe.router_fp32 else None)
        if moe.selection_bias:
            self.moe_statics = Statics(moe.num_experts)
        self.held = range(moe.first_expert, moe.first_expert + (moe.held_experts or moe.num_experts))
        self.experts = nn.ModuleList(Expert(spec.hidden_size, moe.intermediate_size, moe.names) for _ in self.held)
        if moe.shared_experts:
            self.shared_experts = Expert(spec.hidden_size, moe.intermediate_size * moe.shared_experts,
                                         ("gate_proj", "up_proj", "down_proj"), bias=spec.mlp_bias)
        self.tp: TensorParallel | None = None
        # set by fuse(): every expert's gate/up rows, and its down (QuantStacks where the experts are quantized)
        self.w13: torch.Tensor | QuantStack | None = None
        self.w2: torch.Tensor | QuantStack | None = None

    def fuse(self) -> None:
        """The experts' weights stacked ([experts, 2 · inter, hidden] and [experts, hidden, inter]) for
        the fused kernel, which runs them all in two grouped GEMMs (GPU)."""
        gate, up, down = self.moe.names
        experts = [e for e in self.experts if isinstance(e, Expert)]
        if any(isinstance(getattr(e, n), QuantLinear) for e in experts for n in (gate, up, down)):
            self.w13 = quant_stack([[getattr(e, gate), getattr(e, up)] for e in experts])
            self.w2 = quant_stack([[getattr(e, down)] for e in experts])
        else:
            with torch.no_grad():
                self.w13 = torch.stack([torch.cat([getattr(e, gate).weight, getattr(e, up).weight]) for e in experts])
                self.w2 = torch.stack([getattr(e, down).weight for e in experts])
        self.experts = nn.ModuleList()  # the stacked copies are the only ones now
        if self.moe.shared_experts:
            self.shared_experts.fuse()

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(weights [tokens, top_k] float32, expert ids [tokens, top_k]): see kernels.moe_router."""
        moe = self.moe
        bias = self.moe_statics.e_score_correction_bias if moe.selection_bias else None
        return kernels.moe_router(x, self.gate.weight, bias, moe.top_k, moe.renormalize, moe.norm_min,
                                  moe.router_fp32)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.tp is not None and self.tp.data_parallel_attention:  # every rank's tokens through our experts
            out = self.tp.reduce_scatter_rows(self._routed(self.tp.all_gather_rows(x)))
            return out + self.shared_experts(x) if self.moe.shared_experts else out
        shared = None
        if self.moe.shared_experts and (self.tp is None or not self.tp.expert_parallel or self.tp.rank == 0):
            shared = self.shared_experts(x)
        out = self._routed(x, shared)
        return self.tp.all_reduce(out) if self.tp is not None else out

    def _routed(self, x: torch.Tensor, add: torch.Tensor | None = None) -> torch.Tensor:
        """The routed experts' weighted sum (of the experts this rank holds), plus `add`."""
        weights, ids = self.route(x)
        if self.w13 is not None and self.w2 is not None:  # the sum and the add in one kernel on GPU
            return kernels.fused_moe(x, self.w13, self.w2, weights, ids, self.held.start, add)
        out = self._experts_loop(x, weights, ids)
        return out + add if add is not None else out

    def _experts_loop(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        out = torch.zeros_like(x)
        for e in ids.unique().tolist():
            if e not in self.held:  # expert parallelism: another rank's
                continue
            rows, slot = (ids == e).nonzero(as_tuple=True)
            y = self.experts[e - self.held.start](x[rows])
            out.index_add_(0, rows, (y.float() * weights[rows, slot, None]).to(x.dtype))
        return out
