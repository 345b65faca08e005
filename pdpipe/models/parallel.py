"""Tensor parallelism inside an instance: how a model's weights and heads are split across the ranks
of one instance, and the collectives its forward pass needs.

Each rank holds `heads / tp` query heads and the key/value heads they read: `kv_heads / tp` of them,
or, when the ranks outnumber the key/value heads, the one its query heads share (replicated across
the ranks that share it). q/k/v and gate/up are split by output rows (column-parallel), o_proj and
down_proj by input columns (row-parallel, summed across ranks by an all-reduce; their bias is added
once, by rank 0). Every expert of a mixture-of-experts layer is split the same way (its gate/up by
rows, its down by columns; the router replicated), one all-reduce after the experts' weighted sum
(tensor parallelism of the experts). With `expert_parallel` the experts are split by id instead: each
rank holds num_experts / tp of them whole and computes them for every token (the tokens are on every
rank: attention stays tensor-parallel), rank 0 adds the shared experts, and the same all-reduce sums
the ranks' parts. The embedding and the output projection are split by vocabulary rows: a token's
embedding comes from the rank that holds its row (the others add zeros), and the logits of every
rank's rows are gathered. `torch.distributed` carries the collectives (gloo on CPU, NCCL on GPU);
rank 0 hands each step's inputs to the others over gloo on both (small Python objects, no GPU sync).

With `data_parallel_attention` (and experts split by id) the ranks share only the experts: each holds
the whole model but its experts and computes its own sequences (its own KV pool), every MoE layer
gathers all ranks' tokens, runs this rank's experts on them and hands each rank back the sum of its
tokens' parts (all-gather, then reduce-scatter); each rank adds the shared experts of its own tokens.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, replace
from typing import Any

import torch

from .spec import ModelSpec


@dataclass(frozen=True)
class TensorParallel:
    rank: int
    size: int
    group: Any = None  # the torch.distributed process group of the instance's ranks
    control: Any = None  # a gloo group of the same ranks for `broadcast` (None: `group` is gloo already)
    expert_parallel: bool = False  # a MoE model's experts split by id across the ranks, not by width
    data_parallel_attention: bool = False  # each rank its own sequences; only the experts are split

    def __post_init__(self) -> None:
        if not 0 <= self.rank < self.size:
            raise ValueError(f"rank: {self.rank}; allowed: 0 to {self.size - 1} (tp = {self.size})")

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        if self.size > 1:
            torch.distributed.all_reduce(x, group=self.group)
        return x

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's `obj` on every rank (what rank 0 gives; the others give None)."""
        box = [obj]
        group = self.control if self.control is not None else self.group
        torch.distributed.broadcast_object_list(box, src=torch.distributed.get_global_rank(group, 0)
                                                if group is not None else 0, group=group)
        return box[0]

    def all_gather_rows(self, x: torch.Tensor) -> torch.Tensor:
        """Every rank's rows, rank 0's first (`x` the same shape on every rank)."""
        if self.size == 1:
            return x
        if x.is_cuda:
            out = torch.empty((self.size * x.shape[0], *x.shape[1:]), dtype=x.dtype, device=x.device)
            torch.distributed.all_gather_into_tensor(out, x.contiguous(), group=self.group)
            return out
        parts = [torch.empty_like(x) for _ in range(self.size)]
        torch.distributed.all_gather(parts, x.contiguous(), group=self.group)
        return torch.cat(parts)

    def reduce_scatter_rows(self, x: torch.Tensor) -> torch.Tensor:
        """The sum over the ranks of `x`'s rows, this rank's share of them (the inverse of
        all_gather_rows)."""
        if self.size == 1:
            return x
        rows = x.shape[0] // self.size
        if x.is_cuda:
            out = torch.empty((rows, *x.shape[1:]), dtype=x.dtype, device=x.device)
            torch.distributed.reduce_scatter_tensor(out, x.contiguous(), group=self.group)
            return out
        x = x.contiguous()
        torch.distributed.all_reduce(x, group=self.group)  # gloo has no reduce-scatter
        return x[self.rank * rows:(self.rank + 1) * rows]

    def gather_last(self, x: torch.Tensor) -> torch.Tensor:
        """Every rank's `x` side by side along the last dimension (the same shape on every rank)."""
        if self.size == 1:
            return x
        if x.is_cuda:  # one NCCL call into one buffer (capturable in a CUDA graph)
            parts = torch.empty((self.size, *x.shape), dtype=x.dtype, device=x.device)
            torch.distributed.all_gather_into_tensor(parts, x.contiguous(), group=self.group)
            return torch.cat(parts.unbind(0), dim=-1)
        parts_list = [torch.empty_like(x) for _ in range(self.size)]
        torch.distributed.all_gather(parts_list, x.contiguous(), group=self.group)
        return torch.cat(parts_list, dim=-1)


def join_group(rank: int, size: int, init_method: str, device: str) -> TensorParallel:
    """This process as rank `rank` of `size` (NCCL for the collectives on GPU, with a gloo group beside
    it for handing over steps; gloo alone on CPU). On GPU the process's device must be set first."""
    import torch.distributed as dist

    cuda = device.startswith("cuda")
    dist.init_process_group("nccl" if cuda else "gloo", init_method=init_method, rank=rank, world_size=size)
    control = dist.new_group(backend="gloo") if cuda else None
    return TensorParallel(rank, size, dist.group.WORLD, control)


def check_splittable(spec: ModelSpec, tp: int, expert_parallel: bool = False,
                     data_parallel_attention: bool = False) -> None:
    """Refuses a TP size the model cannot be split by, naming the dimension."""
    if tp < 1:
        raise ValueError(f"tp: {tp}; allowed: 1 or more")
    if data_parallel_attention:
        if spec.moe is None or not any(spec.moe.layers):
            raise ValueError("data_parallel_attention: the model has no routed experts to split; run a dense "
                             "model's replicas as separate instances")
        if not expert_parallel:
            raise ValueError("data_parallel_attention: needs expert_parallel = true (the experts split by id)")
        if spec.moe.num_experts % tp:
            raise ValueError(f"tp: {tp} does not divide the model's num_experts ({spec.moe.num_experts})")
        return
    sizes = [("num_attention_heads", spec.num_heads), ("intermediate_size", spec.intermediate_size),
             ("vocab_size", spec.vocab_size)]
    if spec.moe is not None and any(spec.moe.layers):
        sizes.append(("num_experts", spec.moe.num_experts) if expert_parallel
                     else ("moe_intermediate_size", spec.moe.intermediate_size))
    for name, value in sizes:
        if value % tp:
            raise ValueError(f"tp: {tp} does not divide the model's {name} ({value})")
    kv = spec.num_kv_heads
    if (kv >= tp and kv % tp) or (kv < tp and tp % kv):
        raise ValueError(f"tp: {tp} and the model's num_key_value_heads ({kv}): one must divide the other")


def kv_heads_of(rank: int, tp: int, num_heads: int, num_kv_heads: int) -> range:
    """The key/value heads rank `rank` holds: its share, or the one its query heads read."""
    if num_kv_heads >= tp:
        per = num_kv_heads // tp
        return range(rank * per, (rank + 1) * per)
    first_q = rank * (num_heads // tp)
    head = first_q // (num_heads // num_kv_heads)
    return range(head, head + 1)


def rank_spec(spec: ModelSpec, par: TensorParallel) -> ModelSpec:
    """The shapes one rank builds: its heads, key/value heads and MLP share, and its experts' (each
    expert's width, or with expert parallelism its whole experts; with data-parallel attention only
    the experts are split)."""
    tp = par.size
    check_splittable(spec, tp, par.expert_parallel, par.data_parallel_attention)
    moe = spec.moe
    if moe is not None and par.expert_parallel:
        held = moe.num_experts // tp
        moe = replace(moe, first_expert=par.rank * held, held_experts=held)
    elif moe is not None:
        moe = replace(moe, intermediate_size=moe.intermediate_size // tp)
    if par.data_parallel_attention:
        return replace(spec, moe=moe)
    return replace(spec, num_heads=spec.num_heads // tp, num_kv_heads=max(1, spec.num_kv_heads // tp),
                   intermediate_size=spec.intermediate_size // tp, moe=moe)


EXPERT_NAME = re.compile(r"\.experts\.(\d+)\.")


def shard_state_dict(state: dict[str, torch.Tensor], spec: ModelSpec, par: TensorParallel) -> dict[str, torch.Tensor]:
    """This rank's slice of every tensor of a whole checkpoint (`spec` is the whole model's). MLP and
    expert projections are split by their own widths (dense, expert and shared-expert widths differ)."""
    r, tp, d = par.rank, par.size, spec.head_dim
    q_rows = slice(r * spec.num_heads // tp * d, (r + 1) * spec.num_heads // tp * d)
    kv = kv_heads_of(r, tp, spec.num_heads, spec.num_kv_heads)
    kv_rows = slice(kv.start * d, kv.stop * d)
    vocab = slice(r * spec.vocab_size // tp, (r + 1) * spec.vocab_size // tp)
    mine = lambda n: slice(r * n // tp, (r + 1) * n // tp)  # noqa: E731 — this rank's share of n
    held = spec.moe.num_experts // tp if spec.moe is not None else 0
    out = {}
    for name, t in state.items():
        expert = EXPERT_NAME.search(name)
        if par.expert_parallel and (expert or ".shared_experts." in name):
            if expert:  # whole experts, this rank's by id, numbered from 0 here
                index = int(expert.group(1)) - r * held
                if not 0 <= index < held:
                    continue
                name = f"{name[:expert.start()]}.experts.{index}.{name[expert.end():]}"
            out[name] = t.clone()  # shared experts whole: rank 0 adds them (each rank its tokens' with DP)
            continue
        if par.data_parallel_attention:  # the rest whole on every rank
            out[name] = t
            continue
        if name.endswith(("q_proj.weight", "q_proj.bias")):
            t = t[q_rows]
        elif name.endswith(("k_proj.weight", "k_proj.bias", "v_proj.weight", "v_proj.bias")):
            t = t[kv_rows]
        elif name.endswith("o_proj.weight"):
            t = t[:, q_rows]
        elif name.endswith(("gate_proj.weight", "gate_proj.bias", "up_proj.weight", "up_proj.bias", "w1.weight",
                            "w3.weight")):
            t = t[mine(t.shape[0])]
        elif name.endswith(("down_proj.weight", "w2.weight")):
            t = t[:, mine(t.shape[1])]
        elif name.endswith(("o_proj.bias", "down_proj.bias")) and r:
            t = torch.zeros_like(t)  # added once, after the sum
        elif name in ("model.embed_tokens.weight", "lm_head.weight"):
            t = t[vocab]
        out[name] = t.clone()  # its own storage: the whole tensor is not kept alive behind a view
    return out
