"""Loads a Hugging Face–format folder into the decoder, with errors that say what is wrong."""
from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from pdpipe.quant import QuantPlan, checkpoint_format
from pdpipe.quant.weights import QuantizedWeight, gather_checkpoint, keep_as_stored, quantize

from .decoder import CausalLM
from .layers import QuantLinear, Rotary
from .moe import float32_weights
from .parallel import EXPERT_NAME, TensorParallel, rank_spec, shard_state_dict
from .spec import ModelLoadError, ModelSpec, load_spec

_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def weight_files(model_dir: Path) -> list[Path]:
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text()).get("weight_map")
        if not weight_map:
            raise ModelLoadError(f"{index}: has no weight_map")
        files = [model_dir / name for name in sorted(set(weight_map.values()))]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise ModelLoadError(f"{index}: names shards that are missing: {', '.join(missing)}")
        return files
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        found = ", ".join(sorted(p.name for p in model_dir.iterdir())) or "nothing"
        raise ModelLoadError(f"{model_dir}: no *.safetensors weights (found: {found}); "
                             "pdpipe loads safetensors checkpoints only")
    return files


def read_tensors(model_dir: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """Every tensor of the checkpoint, one at a time, as stored (on the CPU)."""
    for path in weight_files(model_dir):
        try:
            with safe_open(path, framework="pt") as f:
                for name in f.keys():  # noqa: SIM118 — safe_open is no dict
                    if not name.endswith(_IGNORED_SUFFIXES):
                        yield name, f.get_tensor(name)
        except (SafetensorError, OSError) as exc:
            raise ModelLoadError(f"{path}: cannot read safetensors file ({exc})") from None


def read_state_dict(model_dir: Path, dtype: torch.dtype, keep_fp32: tuple[str, ...] = ()) -> dict[str, torch.Tensor]:
    """Every tensor in `dtype`, but those whose names end with one of `keep_fp32` in float32."""
    return {name: t.to(torch.float32 if keep_fp32 and name.endswith(keep_fp32) else dtype)
            for name, t in read_tensors(model_dir)}


def check_state_dict(model: CausalLM, state: dict[str, torch.Tensor], model_dir: Path) -> None:
    expected = {name: p.shape for name, p in model.named_parameters()}
    if model.spec.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    missing = sorted(set(expected) - set(state))
    if missing:
        raise ModelLoadError(f"{model_dir}: weights missing for {len(missing)} tensors, e.g. "
                             f"{', '.join(missing[:4])} ({model.spec.architecture})")
    unexpected = sorted(set(state) - set(expected))
    if unexpected:
        raise ModelLoadError(f"{model_dir}: unexpected tensors for {model.spec.architecture}: "
                             f"{', '.join(unexpected[:4])}")
    for name, shape in expected.items():
        if state[name].shape != shape:
            raise ModelLoadError(f"{model_dir}: tensor {name} has shape {tuple(state[name].shape)}, "
                                 f"config.json implies {tuple(shape)}")


LOAD_FORMATS = ("safetensors", "dummy")


def dummy_model(spec: ModelSpec, device: str | torch.device, seed: int = 0,
                tp: TensorParallel | None = None, quant: QuantPlan | None = None) -> CausalLM:
    """Random weights of the real shapes (a rank's, with `tp`), made on `device` (no files read): for
    benchmarks. With `quant`, each projection is made and quantized in turn (its bf16 weights freed before
    the next is made), so the model never exists in bf16 whole."""
    from .make import init_param_

    default = torch.get_default_dtype()
    torch.set_default_dtype(getattr(torch, spec.dtype))  # built in its dtype: no float32 copy of 8B weights
    try:
        with torch.device("meta" if quant is not None else device):
            model = CausalLM(rank_spec(spec, tp) if tp else spec, tp)
    finally:
        torch.set_default_dtype(default)
    gen = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        if quant is None:
            for name, p in model.named_parameters():
                init_param_(name, p, gen)
            return model.eval()
        for module_name, module in list(model.named_modules()):
            for pname, p in list(module.named_parameters(recurse=False)):
                full = f"{module_name}.{pname}" if module_name else pname
                real = init_param_(full, torch.empty(p.shape, dtype=p.dtype, device=device), gen)
                setattr(module, pname, torch.nn.Parameter(real, requires_grad=False))
            scheme = quant.scheme_for(module_name) if isinstance(module, nn.Linear) else ""
            if scheme:
                install(model, module_name, quantize(module.weight, scheme))
                module.weight = None  # the list above still holds the replaced Linear: its bf16 weight goes now
    model.rotary = Rotary(spec.rope, spec.head_dim).to(device)
    return model.eval()


def load_model(model_dir: Path | str, dtype: str | None = None, device: str | torch.device = "cpu",
               load_format: str = "safetensors", tp: TensorParallel | None = None,
               quant: QuantPlan | None = None) -> CausalLM:
    """Builds the decoder for `model_dir` and loads its weights onto `device`; with `tp`, this rank's
    share of them (see parallel.py); with `quant`, its projections quantized whole, then shared out.
    Tensors are read one at a time and each goes to `device`, is quantized and split before the next is
    read: what is held is the model as it ends up, and one tensor."""
    model_dir = Path(model_dir)
    spec: ModelSpec = load_spec(model_dir, dtype)
    if quant is None and (fmt := checkpoint_format(model_dir)) is not None:
        quant = QuantPlan(checkpoint=fmt)  # a checkpoint quantized already is loaded as it is
    if load_format == "dummy":  # random weights, quantized online (as a checkpoint's scheme says, if it says)
        ckpt = quant.checkpoint if quant is not None else None
        plan = QuantPlan(ckpt.scheme, ckpt.scheme, ckpt.ignore) if ckpt is not None else quant
        return dummy_model(spec, device, tp=tp, quant=plan if plan is not None and plan.name else None)
    if load_format != "safetensors":
        raise ValueError(f"load_format: {load_format!r}; allowed: {', '.join(LOAD_FORMATS)}")
    with torch.device("meta"):
        model = CausalLM(rank_spec(spec, tp) if tp else spec, tp)
    fmt = quant.checkpoint if quant is not None else None
    state: dict[str, Any] = {}
    stored: dict[str, torch.Tensor] = {}  # a quantized checkpoint's codes and scales, gathered once all are read
    keep_fp32 = float32_weights(spec)
    for name, tensor in read_tensors(model_dir):
        if fmt is not None and keep_as_stored(name, tensor):
            stored[name] = tensor
            continue
        t: Any = tensor.to(device=device, dtype=torch.float32 if keep_fp32 and name.endswith(keep_fp32)
                           else getattr(torch, spec.dtype))
        scheme = quant.scheme_for(name.removesuffix(".weight")) if quant and name.endswith(".weight") else ""
        if scheme and tp is not None and tp.expert_parallel and EXPERT_NAME.search(name):
            state |= {n: quantize(w, scheme) for n, w in shard_state_dict({name: t}, spec, tp).items()}
            continue  # a whole expert, kept or not: quantized only where kept
        if scheme:
            t = quantize(t, scheme)  # whole, before it is split
        state |= shard_state_dict({name: t}, spec, tp) if tp is not None else {name: t}
    if fmt is not None:  # gathered and split on the CPU, then each of this rank's pieces moved to the device
        stored = gather_checkpoint(stored, fmt)
        mine = shard_state_dict(stored, spec, tp) if tp is not None else stored
        state |= {n: w.to(device) for n, w in mine.items()}
    check_state_dict(model, state, model_dir)
    quantized = {n: w for n, w in state.items() if isinstance(w, QuantizedWeight)}
    model.load_state_dict({n: t for n, t in state.items() if n not in quantized}, strict=False, assign=True)
    for name, weight in quantized.items():
        install(model, name.removesuffix(".weight"), weight)
    model.rotary = Rotary(spec.rope, spec.head_dim)
    return model.to(device).eval()


def install(model: nn.Module, module: str, weight: QuantizedWeight) -> None:
    """The Linear `module` of `model` becomes a QuantLinear of `weight` (its bias kept)."""
    parent, _, child = module.rpartition(".")
    old = model.get_submodule(module)
    assert isinstance(old, nn.Linear)
    setattr(model.get_submodule(parent) if parent else model, child, QuantLinear(weight, old.bias))
