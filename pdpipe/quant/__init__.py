"""Weight quantization: which projections of a model take which scheme, online, or how a checkpoint
quantized already stores them (`QuantPlan`, `CheckpointFormat`; torch-free: the scheduler hashes prompts
with the plan's name), and the weights themselves (`weights.py`: the online quantizer, the checkpoints'
tensors, and the one layout every scheme takes in memory)."""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from fnmatch import fnmatchcase
from pathlib import Path

from pdpipe.config import QUANT_SCHEMES as SCHEMES
from pdpipe.models.spec import load_spec

__all__ = ["SCHEMES", "CheckpointFormat", "QuantPlan", "checkpoint_format", "plan_for", "quant_plan"]

# the projections quantized: attention's, the MLPs' and the experts' (the routers, the embeddings and the
# LM head are not)
_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "w1", "w2", "w3")
_ROUTED = re.compile(r"\.experts\.\d+\.")


@dataclass(frozen=True)
class CheckpointFormat:
    """A checkpoint's own quantization (its config.json's `quantization_config`), as the loader reads it:
    the scheme its quantized weights take in memory, their scale cell (None: a row; (0, 0): the whole
    tensor) and how their codes are stored."""

    method: str  # "fp8" (Hugging Face's) | "compressed-tensors"
    scheme: str  # wint8 | wint4 | fp8 | block_wise_fp8
    cell: tuple[int, int] | None = None
    packed: bool = False  # compressed-tensors pack-quantized: codes in int32 words
    ignore: tuple[str, ...] = ()  # modules the checkpoint keeps unquantized

    @property
    def name(self) -> str:
        cell = "row" if self.cell is None else "tensor" if self.cell == (0, 0) else "x".join(map(str, self.cell))
        return f"{self.method}:{self.scheme}:{cell}"


@dataclass(frozen=True)
class QuantPlan:
    dense: str = ""  # the dense projections' scheme ("" none), quantized online
    moe: str = ""  # the routed experts'
    ignore: tuple[str, ...] = ()  # module name patterns left unquantized
    checkpoint: CheckpointFormat | None = None  # the weights come quantized: nothing is quantized online

    @property
    def name(self) -> str:
        """What the weights are, for the prefix cache's hash root and for pairing instances: "" unquantized."""
        if self.checkpoint is not None:
            return self.checkpoint.name
        if not self.dense and not self.moe:
            return ""
        return f"{self.dense or 'none'}/{self.moe or 'none'}" + (f"-{','.join(self.ignore)}" if self.ignore else "")

    def scheme_for(self, module: str) -> str:
        """The scheme the projection `module` (a module's dotted name) is quantized to online, "" when it
        stays as it is."""
        if self.checkpoint is not None or module.rpartition(".")[2] not in _PROJECTIONS \
                or any(fnmatchcase(module, p) for p in self.ignore):
            return ""
        return self.moe if _ROUTED.search(module + ".") else self.dense


def plan_for(engine, architecture: str = "", has_experts: bool = False) -> QuantPlan:
    """The plan an `EngineConfig` asks for on a model: the experts take moe_quantization, else the dense
    scheme, except that wint4 on an ERNIE mixture-of-experts model means, as in FastDeploy, dense wint8
    with wint4 experts."""
    dense, moe = engine.quantization, engine.moe_quantization or engine.quantization
    if dense == "wint4" and not engine.moe_quantization and has_experts and architecture.startswith("Ernie"):
        dense = "wint8"
    return QuantPlan(dense, moe if has_experts else "", tuple(engine.quantization_ignore))


def quant_plan(engine, model_dir: Path) -> QuantPlan:
    """`plan_for` the model in `model_dir`; a checkpoint quantized already is loaded as it is, and an
    `engine.quantization` that says otherwise is refused, naming both."""
    spec = load_spec(model_dir, engine.dtype or None)
    fmt = checkpoint_format(model_dir)
    if fmt is None:
        return plan_for(engine, spec.architecture, spec.moe is not None and any(spec.moe.layers))
    for name in ("quantization", "moe_quantization"):
        asked = getattr(engine, name)
        if asked and asked != fmt.scheme:
            raise ValueError(f"{name}: {asked!r}, but {model_dir}'s config.json has a quantization_config of its "
                             f"own ({fmt.method}, {fmt.scheme}); leave {name} empty to load it as it is")
    return QuantPlan(checkpoint=fmt)


def checkpoint_format(model_dir: Path) -> CheckpointFormat | None:
    """The checkpoint's quantization_config as the loader reads it (None: unquantized); a method, format or
    field the loader does not support is refused, naming it (never loaded as if it were unquantized)."""
    path = Path(model_dir) / "config.json"
    config = json.loads(path.read_text()) if path.is_file() else {}
    qc = config.get("quantization_config")
    if not qc:
        return None
    method = qc.get("quant_method")
    if method == "fp8":
        return _hf_fp8(qc)
    if method == "compressed-tensors":
        return _compressed_tensors(qc)
    raise ValueError(f"quantization_config.quant_method: {method!r} is not supported; supported: fp8 (Hugging "
                     "Face's FP8), compressed-tensors (float-quantized, int-quantized, naive-quantized, "
                     "pack-quantized)")


def _refuse(field: str, value, allowed: str) -> ValueError:
    return ValueError(f"quantization_config.{field}: {value!r} is not supported; supported: {allowed}")


def _hf_fp8(qc: dict) -> CheckpointFormat:
    """Hugging Face's FP8 (DeepSeek-V3, Qwen3-*-FP8): e4m3 weights, `weight_scale_inv` the multiplier of
    each 128 x 128 block (`weight_block_size`) or of the whole tensor."""
    if qc.get("fmt", "e4m3") != "e4m3":
        raise _refuse("fmt", qc.get("fmt"), "e4m3")
    block = qc.get("weight_block_size")
    if block is not None and (len(block) != 2 or min(block) < 1):
        raise _refuse("weight_block_size", block, "two sizes, e.g. [128, 128]")
    cell = (int(block[0]), int(block[1])) if block else (0, 0)
    return CheckpointFormat("fp8", "block_wise_fp8" if block else "fp8", cell,
                            ignore=tuple(qc.get("modules_to_not_convert") or ()))


_CT_FORMATS = ("float-quantized", "int-quantized", "naive-quantized", "pack-quantized")


def _compressed_tensors(qc: dict) -> CheckpointFormat:
    """compressed-tensors: one config group of symmetric weights, int (4 or 8 bits) or float (8 bits, e4m3),
    by channel, group, block or tensor. Activations stay in the engine's dtype (weight-only: where the
    checkpoint asks for dynamic FP8 activations they are not quantized)."""
    fmt = qc.get("format")
    if fmt not in _CT_FORMATS:
        raise _refuse("format", fmt, ", ".join(_CT_FORMATS))
    if qc.get("kv_cache_scheme"):
        raise _refuse("kv_cache_scheme", qc["kv_cache_scheme"], "none (an FP8 KV cache is the engine's choice)")
    groups = qc.get("config_groups") or {}
    if len(groups) != 1:
        raise _refuse("config_groups", sorted(groups), "exactly one group")
    (name, group), = groups.items()
    w = group.get("weights") or {}
    kind, bits, strategy = w.get("type"), w.get("num_bits"), w.get("strategy")
    if (kind, bits) not in (("int", 4), ("int", 8), ("float", 8)):
        raise _refuse(f"config_groups.{name}.weights", f"{kind} of {bits} bits", "int of 4 or 8 bits, float of 8")
    if not w.get("symmetric", True):
        raise _refuse(f"config_groups.{name}.weights.symmetric", False, "true (no zero points)")
    acts = group.get("input_activations")
    if acts and not acts.get("dynamic", False):
        raise _refuse(f"config_groups.{name}.input_activations", "static scales", "dynamic or none")
    if strategy == "channel":
        cell: tuple[int, int] | None = None
    elif strategy == "group":
        cell = (1, int(w["group_size"]))
    elif strategy == "block":
        cell = tuple(int(b) for b in w["block_structure"])  # type: ignore[assignment]
    elif strategy == "tensor":
        cell = (0, 0)
    else:
        raise _refuse(f"config_groups.{name}.weights.strategy", strategy, "channel, group, block, tensor")
    scheme = "wint4" if bits == 4 else "wint8" if kind == "int" else "block_wise_fp8" if strategy == "block" else "fp8"
    if fmt == "pack-quantized" and kind != "int":
        raise _refuse("format", fmt, "pack-quantized for int weights only")
    if bits == 4 and fmt != "pack-quantized":
        raise _refuse("format", fmt, "pack-quantized for 4-bit weights")
    return CheckpointFormat("compressed-tensors", scheme, cell, packed=fmt == "pack-quantized",
                            ignore=tuple(qc.get("ignore") or ()))
