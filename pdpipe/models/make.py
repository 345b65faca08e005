"""`pdpipe make-model`: a randomly initialised model of a supported architecture, in exactly the
Hugging Face format (loadable by `transformers`), with a byte-level BPE tokenizer trained on the
corpus shipped beside this file and a chat template. The same arguments give the same bytes.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import asdict
from pathlib import Path

import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from .decoder import CausalLM
from .make_config import ARCH_NAMES, CORPUS, MOE_ARCHS, MakeModelConfig
from .spec import ModelSpec, spec_from_config

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def train_tokenizer(vocab_size: int) -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS.read_text(encoding="utf-8").splitlines(keepends=True), trainer)
    missing = vocab_size - tok.get_vocab_size()
    if missing > 0:
        tok.add_special_tokens([f"<|reserved_{i}|>" for i in range(missing)])
    return tok


def hf_config(cfg: MakeModelConfig, vocab_size: int, ids: dict[str, int | None]) -> dict:
    head_dim = cfg.head_dim or cfg.hidden // cfg.heads
    ernie = cfg.arch in ("ernie4_5", "ernie4_5_moe")
    tie = cfg.tie_embeddings if cfg.tie_embeddings is not None else ernie
    config = {
        "architectures": [ARCH_NAMES[cfg.arch]],
        "model_type": cfg.arch,
        "vocab_size": vocab_size,
        "hidden_size": cfg.hidden,
        "intermediate_size": cfg.intermediate or 2 * cfg.hidden,
        "num_hidden_layers": cfg.layers,
        "num_attention_heads": cfg.heads,
        "num_key_value_heads": cfg.kv_heads,
        "head_dim": head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": cfg.max_position,
        "rms_norm_eps": 1e-5 if ernie else 1e-6,
        "rope_theta": 500000.0 if cfg.arch == "llama" or ernie else 1000000.0,
        "tie_word_embeddings": tie,
        "initializer_range": 0.02,
        "bos_token_id": ids["<|endoftext|>"],
        "eos_token_id": ids["<|im_end|>"],
        "pad_token_id": ids["<|endoftext|>"],
        "torch_dtype": cfg.dtype,
        "use_cache": True,
    }
    bias = bool(cfg.bias)
    if cfg.arch == "llama":
        config.update(attention_bias=bias, mlp_bias=bias, rope_scaling={
            "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": max(1, cfg.max_position // 8)})
    elif cfg.arch in ("qwen2", "qwen3"):
        config.update(use_sliding_window=bool(cfg.sliding_window), sliding_window=cfg.sliding_window or None,
                      max_window_layers=0)
        if cfg.arch == "qwen3":
            config.update(attention_bias=bias)
    elif cfg.arch == "mistral":
        config.update(sliding_window=cfg.sliding_window or None)
    elif ernie:
        config.update(use_bias=bias)
    if cfg.arch in MOE_ARCHS:
        config.update(moe_config(cfg))
    return config


def moe_config(cfg: MakeModelConfig) -> dict:
    """The routed experts' fields, under each architecture's own names."""
    inter = cfg.moe_intermediate or cfg.hidden
    if cfg.arch == "mixtral":
        return {"num_local_experts": cfg.experts, "num_experts_per_tok": cfg.top_k, "intermediate_size": inter,
                "sliding_window": cfg.sliding_window or None}
    if cfg.arch == "qwen3_moe":
        return {"num_experts": cfg.experts, "num_experts_per_tok": cfg.top_k, "moe_intermediate_size": inter,
                "norm_topk_prob": cfg.norm_topk, "decoder_sparse_step": 1,
                "mlp_only_layers": list(range(min(cfg.first_moe_layer, cfg.layers))), "attention_bias": bool(cfg.bias),
                "use_sliding_window": False, "sliding_window": None, "max_window_layers": cfg.layers}
    return {"moe_num_experts": cfg.experts, "moe_k": cfg.top_k, "moe_intermediate_size": inter,
            "moe_num_shared_experts": cfg.shared_experts, "moe_layer_start_index": cfg.first_moe_layer,
            "moe_layer_end_index": cfg.layers - 1, "moe_layer_interval": 1, "moe_norm_min": 1e-12}


def init_param_(name: str, t: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Fills one parameter in place, scaled so activations stay O(1) and the next-token distribution
    is peaked, as a trained model's is."""
    if name.endswith("norm.weight"):
        return t.normal_(1.0, 0.1, generator=gen)
    if name.endswith((".bias", "e_score_correction_bias")):
        return t.normal_(0.0, 0.05, generator=gen)
    if name == "model.embed_tokens.weight":
        return t.normal_(0.0, 0.5, generator=gen)
    if name == "lm_head.weight":
        return t.normal_(0.0, 3.0 / t.shape[1] ** 0.5, generator=gen)
    return t.normal_(0.0, 1.0 / t.shape[1] ** 0.5, generator=gen)


def random_weights(spec: ModelSpec, seed: int) -> dict[str, torch.Tensor]:
    with torch.device("meta"):
        shapes = {name: p.shape for name, p in CausalLM(spec).named_parameters()}
    gen = torch.Generator().manual_seed(seed)
    return {name: init_param_(name, torch.empty(shape), gen).to(getattr(torch, spec.dtype)).contiguous()
            for name, shape in shapes.items()}


def quantize_state(state: dict[str, torch.Tensor], scheme: str) -> dict:
    """The projections of `state` replaced, in place, by their quantized tensors as a checkpoint users have
    stores them (pdpipe.quant.weights.write_format); returns the config.json quantization_config."""
    from pdpipe.quant import QuantPlan
    from pdpipe.quant.weights import checkpoint_tensors, quantize, write_format

    plan = QuantPlan(scheme, scheme)
    names = [n for n in state if n.endswith(".weight") and plan.scheme_for(n.removesuffix(".weight"))]
    config, cell = write_format(scheme, [state[n].shape[1] for n in names])
    for name in names:
        weight = state.pop(name)
        qw = quantize(weight, scheme, cell or (1, weight.shape[1]))
        state |= checkpoint_tensors(name.removesuffix(".weight"), qw, config)
    return config


def save_weights(state: dict[str, torch.Tensor], out: Path, shard_mb: int) -> None:
    if shard_mb <= 0:
        save_file(state, out / "model.safetensors", metadata={"format": "pt"})
        return
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, tensor in state.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > shard_mb * 2**20:
            shards.append({})
            size = 0
        shards[-1][name] = tensor
        size += nbytes
    weight_map = {}
    for i, shard in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, out / fname, metadata={"format": "pt"})
        weight_map.update({name: fname for name in shard})
    total = sum(t.numel() * t.element_size() for t in state.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def _write_json(path: Path, obj: dict) -> None:
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


def make_model(out_dir: Path | str, cfg: MakeModelConfig = MakeModelConfig(), overwrite: bool = True) -> Path:
    """Writes the model folder (atomically: built beside `out_dir`, then renamed) and returns it.

    With `overwrite=False` an existing folder is kept, so concurrent makers of one model agree."""
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        tok = train_tokenizer(cfg.vocab)
        ids = {t: tok.token_to_id(t) for t in SPECIAL_TOKENS}
        config = hf_config(cfg, tok.get_vocab_size(), ids)
        spec = spec_from_config(config)
        state = random_weights(spec, cfg.seed) if cfg.weights else {}
        if cfg.quantization:
            config["quantization_config"] = quantize_state(state, cfg.quantization)
        tok.save(str(tmp / "tokenizer.json"))
        _write_json(tmp / "config.json", config)
        _write_json(tmp / "tokenizer_config.json", {
            "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": None,
            "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>", "add_bos_token": False,
            "model_max_length": cfg.max_position, "chat_template": CHAT_TEMPLATE})
        _write_json(tmp / "generation_config.json", {
            "bos_token_id": ids["<|endoftext|>"], "pad_token_id": ids["<|endoftext|>"],
            "eos_token_id": [ids["<|im_end|>"], ids["<|endoftext|>"]]})
        _write_json(tmp / "pdpipe_make_model.json", asdict(cfg))
        if cfg.weights:
            save_weights(state, tmp, cfg.shard_mb)
        if out_dir.exists() and overwrite:
            shutil.rmtree(out_dir)
        try:
            os.rename(tmp, out_dir)
        except OSError:
            if overwrite or not (out_dir / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir
