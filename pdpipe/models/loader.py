"""Loads a Hugging Face–format folder into the decoder, with errors that say what is wrong."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from pdpipe.quant import QuantPlan, checkpoint_format
from pdpipe.quant.weights import QuantizedWeight, gather_checkpoint, keep_as_stored, quantize

from .decoder import CausalLM
from .layers import QuantLinear, Rotary
from .moe import float32_weights
from .parallel import TensorParallel, rank_spec, shard_state_dict
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


def read_state_dict(model_dir: Path, dtype: torch.dtype, keep_fp32: tuple[str, ...] = (),
                    quantized: bool = False) -> dict[str, torch.Tensor]:
    """Every tensor in `dtype`, but those whose names end with one of `keep_fp32` in float32 (and, of a
    `quantized` checkpoint, the codes and scales as stored)."""
    state: dict[str, torch.Tensor] = {}
    for path in weight_files(model_dir):
        try:
            tensors = load_file(path)
        except (SafetensorError, OSError) as exc:
            raise ModelLoadError(f"{path}: cannot read safetensors file ({exc})") from None
        for name, tensor in tensors.items():
            if name.endswith(_IGNORED_SUFFIXES):
                continue
            if quantized and keep_as_stored(name, tensor):
                state[name] = tensor
            else:
                state[name] = tensor.to(torch.float32 if keep_fp32 and name.endswith(keep_fp32) else dtype)
    return state


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
                tp: TensorParallel | None = None) -> CausalLM:
    """Random weights of the real shapes (a rank's, with `tp`), made on `device` (no files read): for
    benchmarks."""
    from .make import init_param_

    default = torch.get_default_dtype()
    torch.set_default_dtype(getattr(torch, spec.dtype))  # built in its dtype: no float32 copy of 8B weights
    try:
        with torch.device(device):
            model = CausalLM(rank_spec(spec, tp) if tp else spec, tp)
    finally:
        torch.set_default_dtype(default)
    gen = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            init_param_(name, p, gen)
    return model.eval()


def load_model(model_dir: Path | str, dtype: str | None = None, device: str | torch.device = "cpu",
               load_format: str = "safetensors", tp: TensorParallel | None = None,
               quant: QuantPlan | None = None) -> CausalLM:
    """Builds the decoder for `model_dir` and loads its weights onto `device`; with `tp`, this rank's
    share of them (see parallel.py); with `quant`, its projections quantized whole, then shared out."""
    model_dir = Path(model_dir)
    spec: ModelSpec = load_spec(model_dir, dtype)
    if quant is None and (fmt := checkpoint_format(model_dir)) is not None:
        quant = QuantPlan(checkpoint=fmt)  # a checkpoint quantized already is loaded as it is
    if load_format == "dummy":  # random weights, quantized online (as a checkpoint's scheme says, if it says)
        ckpt = quant.checkpoint if quant is not None else None
        plan = QuantPlan(ckpt.scheme, ckpt.scheme, ckpt.ignore) if ckpt is not None else quant
        return quantize_model(dummy_model(spec, device, tp=tp), plan)
    if load_format != "safetensors":
        raise ValueError(f"load_format: {load_format!r}; allowed: {', '.join(LOAD_FORMATS)}")
    torch_dtype = getattr(torch, spec.dtype)
    with torch.device("meta"):
        model = CausalLM(rank_spec(spec, tp) if tp else spec, tp)
    fmt = quant.checkpoint if quant is not None else None
    state: dict[str, Any] = read_state_dict(model_dir, torch_dtype, float32_weights(spec), quantized=fmt is not None)
    if fmt is not None:
        state = gather_checkpoint(state, fmt)
    for name in list(state):
        scheme = quant.scheme_for(name.removesuffix(".weight")) if quant and name.endswith(".weight") else ""
        if scheme:
            state[name] = quantize(state[name], scheme)
    if tp is not None:
        state = shard_state_dict(state, spec, tp)
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


def quantize_model(model: CausalLM, quant: QuantPlan | None) -> CausalLM:
    """Every projection of a built model the plan names, quantized in place, one at a time (weights made
    on their device, dummy ones: a tensor-parallel rank quantizes its own share)."""
    if quant is None:
        return model
    for name, module in list(model.named_modules()):
        scheme = quant.scheme_for(name) if isinstance(module, nn.Linear) else ""
        if scheme:
            install(model, name, quantize(module.weight, scheme))
            del module
    return model
