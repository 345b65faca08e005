"""What a Hugging Face `config.json` says about a model, reduced to the switches pdpipe's one decoder needs.

Llama, Qwen2, Qwen3, Mistral and ERNIE 4.5 are the same pre-norm decoder with a handful of differences:
which projections carry a bias, whether q/k get an RMSNorm per head, how RoPE pairs dimensions, and
the defaults a config may leave out. Their mixture-of-experts kin (ERNIE 4.5 MoE, Qwen3-MoE, Mixtral)
replace the MLP of some or all layers by routed experts (`MoeSpec`), each with its routing rules.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pdpipe.config import DTYPES


class ModelLoadError(ValueError):
    """A model folder that pdpipe cannot load, with the reason and what would be accepted."""


@dataclass(frozen=True)
class ArchTraits:
    model_type: str
    qkv_bias_key: str | None  # config key that switches the q/k/v bias, None: never
    o_bias_key: str | None
    mlp_bias_key: str | None
    qkv_bias_default: bool = False
    qk_norm: bool = False
    rope_interleaved: bool = False  # ERNIE pairs (0,1),(2,3)…; the rest pair i with i + d/2
    sliding_window_style: str = "none"  # "none" | "all" (Mistral) | "upper_layers" (Qwen)
    defaults: dict[str, Any] = field(default_factory=dict)


ARCHITECTURES: dict[str, ArchTraits] = {
    "LlamaForCausalLM": ArchTraits(
        "llama", "attention_bias", "attention_bias", "mlp_bias",
        defaults=dict(rope_theta=10000.0, rms_norm_eps=1e-6, tie_word_embeddings=False,
                      max_position_embeddings=2048),
    ),
    "Qwen2ForCausalLM": ArchTraits(
        "qwen2", None, None, None, qkv_bias_default=True, sliding_window_style="upper_layers",
        defaults=dict(rope_theta=10000.0, rms_norm_eps=1e-6, tie_word_embeddings=False,
                      max_position_embeddings=32768, sliding_window=4096, use_sliding_window=False,
                      max_window_layers=28),
    ),
    "Qwen3ForCausalLM": ArchTraits(
        "qwen3", "attention_bias", "attention_bias", None, qk_norm=True,
        sliding_window_style="upper_layers",
        defaults=dict(rope_theta=10000.0, rms_norm_eps=1e-6, tie_word_embeddings=False, head_dim=128,
                      max_position_embeddings=32768, sliding_window=4096, use_sliding_window=False,
                      max_window_layers=28),
    ),
    "MistralForCausalLM": ArchTraits(
        "mistral", None, None, None, sliding_window_style="all",
        defaults=dict(rope_theta=10000.0, rms_norm_eps=1e-6, tie_word_embeddings=False,
                      max_position_embeddings=4096 * 32, sliding_window=4096),
    ),
    "Ernie4_5ForCausalLM": ArchTraits(
        "ernie4_5", "use_bias", "use_bias", "use_bias", rope_interleaved=True,
        defaults=dict(rope_theta=500000.0, rms_norm_eps=1e-5, tie_word_embeddings=True, head_dim=128,
                      max_position_embeddings=131072),
    ),
    "Ernie4_5_MoeForCausalLM": ArchTraits(
        "ernie4_5_moe", "use_bias", "use_bias", "use_bias", rope_interleaved=True,
        defaults=dict(rope_theta=500000.0, rms_norm_eps=1e-5, tie_word_embeddings=True,
                      max_position_embeddings=131072),
    ),
    "Qwen3MoeForCausalLM": ArchTraits(
        "qwen3_moe", "attention_bias", "attention_bias", None, qk_norm=True, sliding_window_style="upper_layers",
        defaults=dict(rope_theta=10000.0, rms_norm_eps=1e-6, tie_word_embeddings=False,
                      max_position_embeddings=32768, sliding_window=4096, use_sliding_window=False,
                      max_window_layers=28),
    ),
    "MixtralForCausalLM": ArchTraits(
        "mixtral", None, None, None, sliding_window_style="all",
        defaults=dict(rope_theta=1000000.0, rms_norm_eps=1e-5, tie_word_embeddings=False,
                      max_position_embeddings=131072, sliding_window=None),
    ),
}

SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")
_DTYPE_ALIASES = {"fp32": "float32", "float": "float32", "bf16": "bfloat16", "fp16": "float16",
                  "half": "float16"}


@dataclass(frozen=True)
class RopeSpec:
    theta: float
    rope_type: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192
    interleaved: bool = False


@dataclass(frozen=True)
class MoeSpec:
    """The routed experts of a mixture-of-experts model, as `transformers` computes them: a router
    (the `gate`, [experts, hidden]) scores every expert by softmax, each token goes to its `top_k`,
    and their outputs are summed weighted by those scores."""

    num_experts: int
    top_k: int
    intermediate_size: int  # each expert's MLP width
    layers: tuple[bool, ...]  # per layer: routed experts (True) or the dense MLP of `intermediate_size`
    renormalize: bool  # the top-k weights divided by their sum
    selection_bias: bool = False  # ERNIE: experts picked by softmax + e_score_correction_bias, weighted without it
    norm_min: float = 0.0  # ERNIE: that sum clamped to at least this
    shared_experts: int = 0  # ERNIE: a dense MLP `shared_experts` × intermediate_size wide, added unweighted
    router_fp32: bool = False  # ERNIE: the router's weights and scores kept in float32
    module: str = "mlp"  # checkpoint names: layers.N.<module>.gate.weight, <module>.experts.E.<names>
    names: tuple[str, str, str] = ("gate_proj", "up_proj", "down_proj")
    first_expert: int = 0  # expert parallelism: a rank holds experts first_expert .. + held_experts - 1
    held_experts: int = 0  # (0: all of them)


@dataclass(frozen=True)
class ModelSpec:
    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope: RopeSpec
    qkv_bias: bool
    o_bias: bool
    mlp_bias: bool
    qk_norm: bool
    tie_word_embeddings: bool
    max_position_embeddings: int
    sliding_windows: tuple[int | None, ...]  # one per layer; None is full attention
    dtype: str
    bos_token_id: int | None
    eos_token_ids: tuple[int, ...]
    moe: MoeSpec | None = None

    @property
    def kv_bytes_per_token(self) -> int:
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * dtype_size(self.dtype)


def dtype_size(dtype: str) -> int:
    return 4 if dtype == "float32" else 2


def normalize_dtype(value: str) -> str:
    name = str(value).replace("torch.", "")
    name = _DTYPE_ALIASES.get(name, name)
    if name not in DTYPES:
        raise ValueError(f"dtype: {value!r} is not supported; use one of {', '.join(DTYPES)}")
    return name


def _required(config: dict, key: str, path: Path) -> Any:
    if key not in config:
        raise ModelLoadError(f"{path}: config.json lacks the required field {key!r}")
    return config[key]


def _eos_ids(value: Any) -> tuple[int, ...]:
    if value is None:
        return ()
    if isinstance(value, int):
        return (value,)
    return tuple(int(v) for v in value)


def _rope_spec(config: dict, traits: ArchTraits, path: Path) -> RopeSpec:
    params = dict(config.get("rope_parameters") or config.get("rope_scaling") or {})
    theta = params.get("rope_theta", config.get("rope_theta", traits.defaults["rope_theta"]))
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ModelLoadError(
            f"{path}: rope type {rope_type!r} is not supported; supported: {', '.join(SUPPORTED_ROPE_TYPES)}")
    if config.get("partial_rotary_factor", params.get("partial_rotary_factor", 1.0)) != 1.0:
        raise ModelLoadError(f"{path}: partial_rotary_factor other than 1.0 is not supported")
    return RopeSpec(
        theta=float(theta),
        rope_type=rope_type,
        factor=float(params.get("factor", 1.0)),
        low_freq_factor=float(params.get("low_freq_factor", 1.0)),
        high_freq_factor=float(params.get("high_freq_factor", 4.0)),
        original_max_position_embeddings=int(params.get(
            "original_max_position_embeddings", config.get("max_position_embeddings", 8192))),
        interleaved=traits.rope_interleaved,
    )


def _sliding_windows(config: dict, traits: ArchTraits, num_layers: int) -> tuple[int | None, ...]:
    window = config.get("sliding_window", traits.defaults.get("sliding_window"))
    if traits.sliding_window_style == "none" or window is None:
        return (None,) * num_layers
    layer_types = config.get("layer_types")
    if layer_types:
        return tuple(window if t == "sliding_attention" else None for t in layer_types)
    if traits.sliding_window_style == "all":
        return (int(window),) * num_layers
    if not config.get("use_sliding_window", False):
        return (None,) * num_layers
    first = config.get("max_window_layers", traits.defaults["max_window_layers"])
    return tuple(int(window) if i >= first else None for i in range(num_layers))


def _first(config: dict, keys: tuple[str, ...], default: Any, path: Path) -> Any:
    for key in keys:
        if key in config and config[key] is not None:
            return config[key]
    if default is None:
        raise ModelLoadError(f"{path}: config.json lacks the required field {keys[0]!r}")
    return default


def _moe_spec(config: dict, arch: str, num_layers: int, path: Path) -> MoeSpec | None:
    """The routed experts of the MoE architectures, each field read as `transformers` reads it."""
    if arch == "MixtralForCausalLM":
        moe = MoeSpec(num_experts=int(_first(config, ("num_local_experts",), 8, path)),
                      top_k=int(_first(config, ("num_experts_per_tok",), 2, path)),
                      intermediate_size=int(_required(config, "intermediate_size", path)),
                      layers=(True,) * num_layers, renormalize=True, module="block_sparse_moe",
                      names=("w1", "w3", "w2"))
    elif arch == "Qwen3MoeForCausalLM":
        experts = int(_first(config, ("num_experts", "num_local_experts"), 128, path))
        step = int(config.get("decoder_sparse_step", 1))
        if step < 1:
            raise ModelLoadError(f"{path}: decoder_sparse_step {step}; allowed: 1 or more")
        dense = set(config.get("mlp_only_layers") or [])
        moe = MoeSpec(num_experts=experts, top_k=int(_first(config, ("num_experts_per_tok",), 8, path)),
                      intermediate_size=int(_first(config, ("moe_intermediate_size",), 768, path)),
                      layers=tuple(i not in dense and experts > 0 and (i + 1) % step == 0 for i in range(num_layers)),
                      renormalize=bool(config.get("norm_topk_prob", False)))
    elif arch == "Ernie4_5_MoeForCausalLM":
        interval = int(config.get("moe_layer_interval", 1))
        if interval < 1:
            raise ModelLoadError(f"{path}: moe_layer_interval {interval}; allowed: 1 or more")
        start, end = int(config.get("moe_layer_start_index", 1)), int(config.get("moe_layer_end_index", 27))
        moe = MoeSpec(num_experts=int(_first(config, ("moe_num_experts", "num_experts"), 64, path)),
                      top_k=int(_first(config, ("moe_k", "num_experts_per_tok"), 6, path)),
                      intermediate_size=int(_first(config, ("moe_intermediate_size",), 1536, path)),
                      layers=tuple((i + 1) % interval == 0 and start <= i <= end for i in range(num_layers)),
                      renormalize=True, selection_bias=True, norm_min=float(config.get("moe_norm_min", 1e-12)),
                      shared_experts=int(config.get("moe_num_shared_experts", 2)), router_fp32=True)
    else:
        return None
    if not any(moe.layers):
        return moe  # every layer dense: a plain decoder, with the MoE model's names
    if not 1 <= moe.top_k <= moe.num_experts:
        raise ModelLoadError(f"{path}: {moe.top_k} experts per token of {moe.num_experts}; allowed: 1 to "
                             f"{moe.num_experts} (num_experts_per_tok / moe_k)")
    if moe.intermediate_size < 1 or moe.shared_experts < 0:
        raise ModelLoadError(f"{path}: moe_intermediate_size must be >= 1 and moe_num_shared_experts >= 0")
    return moe


def _flag(config: dict, key: str | None, default: bool) -> bool:
    return bool(config.get(key, default)) if key else default


def spec_from_config(config: dict, path: Path | str = "<config>", dtype: str | None = None) -> ModelSpec:
    """Builds a ModelSpec from a parsed config.json, naming the field at fault on any error."""
    path = Path(path)
    archs = config.get("architectures") or []
    supported = [a for a in archs if a in ARCHITECTURES]
    if not supported:
        raise ModelLoadError(
            f"{path}: architecture {archs or 'missing'} is not supported; "
            f"supported: {', '.join(ARCHITECTURES)}")
    arch = supported[0]
    traits = ARCHITECTURES[arch]
    d = traits.defaults
    hidden = int(_required(config, "hidden_size", path))
    heads = int(_required(config, "num_attention_heads", path))
    num_layers = int(_required(config, "num_hidden_layers", path))
    act = config.get("hidden_act", "silu")
    if act != "silu":
        raise ModelLoadError(f"{path}: hidden_act {act!r} is not supported; supported: silu")
    head_dim = config["head_dim"] if "head_dim" in config else d.get("head_dim")
    head_dim = int(head_dim or hidden // heads)
    kv_heads = int(config.get("num_key_value_heads") or heads)
    if heads % kv_heads:
        raise ModelLoadError(f"{path}: num_attention_heads {heads} is not a multiple of "
                             f"num_key_value_heads {kv_heads}")
    return ModelSpec(
        architecture=arch,
        vocab_size=int(_required(config, "vocab_size", path)),
        hidden_size=hidden,
        intermediate_size=int(_required(config, "intermediate_size", path)),
        num_layers=num_layers,
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=head_dim,
        rms_norm_eps=float(config.get("rms_norm_eps", d["rms_norm_eps"])),
        rope=_rope_spec(config, traits, path),
        qkv_bias=_flag(config, traits.qkv_bias_key, traits.qkv_bias_default),
        o_bias=_flag(config, traits.o_bias_key, False),
        mlp_bias=_flag(config, traits.mlp_bias_key, False),
        qk_norm=traits.qk_norm,
        tie_word_embeddings=bool(config.get("tie_word_embeddings", d["tie_word_embeddings"])),
        max_position_embeddings=int(config.get("max_position_embeddings", d["max_position_embeddings"])),
        sliding_windows=_sliding_windows(config, traits, num_layers),
        dtype=normalize_dtype(dtype or config.get("torch_dtype") or config.get("dtype") or "float32"),
        bos_token_id=config.get("bos_token_id"),
        eos_token_ids=_eos_ids(config.get("eos_token_id")),
        moe=_moe_spec(config, arch, num_layers, path),
    )


def load_spec(model_dir: Path | str, dtype: str | None = None) -> ModelSpec:
    path = Path(model_dir) / "config.json"
    if not Path(model_dir).is_dir():
        raise ModelLoadError(f"{model_dir}: not a directory; a model is a folder holding config.json, "
                             "*.safetensors and tokenizer.json")
    if not path.is_file():
        raise ModelLoadError(f"{model_dir}: config.json is missing")
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ModelLoadError(f"{path}: not valid JSON ({exc})") from None
    return spec_from_config(config, path, dtype)


def load_eos_token_ids(model_dir: Path | str) -> frozenset[int]:
    """EOS ids from config.json and generation_config.json together, as `transformers` does."""
    ids: set[int] = set()
    for name in ("config.json", "generation_config.json"):
        path = Path(model_dir) / name
        if path.is_file():
            try:
                ids.update(_eos_ids(json.loads(path.read_text()).get("eos_token_id")))
            except json.JSONDecodeError as exc:
                raise ModelLoadError(f"{path}: not valid JSON ({exc})") from None
    return frozenset(ids)
