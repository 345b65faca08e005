"""Loading: `transformers`-saved checkpoints (sharded and not), pdpipe-generated ones, dtypes, and
clear errors for folders pdpipe cannot load."""
import hashlib
import json
import shutil

import pytest
import torch
from conftest import assert_leak_free, hf_greedy, make_llm, make_prompts
from safetensors.torch import load_file, save_file

from pdpipe.messages import SamplingParams
from pdpipe.models.loader import load_model
from pdpipe.models.make import MakeModelConfig, make_model
from pdpipe.models.spec import ModelLoadError
from pdpipe.tokenizer import Tokenizer

GREEDY = SamplingParams(max_tokens=8, temperature=0.0, logprobs=0)


def hf_saved(tmp_path, model_dir, config_cls, shard: str | None, **config):
    import transformers

    torch.manual_seed(0)
    cfg = getattr(transformers, config_cls)(vocab_size=384, hidden_size=64, intermediate_size=96,
                                            num_hidden_layers=2, num_attention_heads=4,
                                            num_key_value_heads=2, **config)
    model = transformers.AutoModelForCausalLM.from_config(cfg)
    out = tmp_path / config_cls
    model.save_pretrained(out, **({"max_shard_size": shard} if shard else {}))
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(model_dir("llama") / name, out / name)
    return out


@pytest.mark.parametrize("config_cls,shard,extra", [
    ("LlamaConfig", "60KB", {"rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                              "high_freq_factor": 4.0,
                                              "original_max_position_embeddings": 256}}),
    ("Qwen3Config", None, {"head_dim": 16}),
])
def test_transformers_saved_checkpoint_matches_transformers(tmp_path, model_dir, config_cls, shard, extra):
    folder = hf_saved(tmp_path, model_dir, config_cls, shard, **extra)
    assert (folder / "model.safetensors.index.json").exists() == bool(shard)
    prompts = make_prompts(384, lengths=(1, 7, 30))
    expected = hf_greedy(folder, prompts, 8)
    llm = make_llm(folder)
    for out, (tokens, logprobs) in zip(llm.generate(prompts, GREEDY), expected):
        assert out.token_ids == tokens
        assert max(abs(a.logprob - b) for a, b in zip(out.logprobs, logprobs)) < 1e-4
    assert_leak_free(llm)


def test_make_model_is_deterministic_for_a_seed(tmp_path):
    cfg = MakeModelConfig(arch="qwen2", seed=7, shard_mb=0)
    a, b = make_model(tmp_path / "a", cfg), make_model(tmp_path / "b", cfg)
    c = make_model(tmp_path / "c", MakeModelConfig(arch="qwen2", seed=8))
    digest = lambda p, f: hashlib.sha256((p / f).read_bytes()).hexdigest()  # noqa: E731
    for name in ("model.safetensors", "tokenizer.json", "config.json", "tokenizer_config.json"):
        assert digest(a, name) == digest(b, name)
    assert digest(a, "model.safetensors") != digest(c, "model.safetensors")
    assert digest(a, "tokenizer.json") == digest(c, "tokenizer.json")


def test_sharded_generated_model_loads_like_single_file(tmp_path):
    cfg = MakeModelConfig(arch="mistral", hidden=256, seed=3)
    single = make_model(tmp_path / "single", cfg)
    sharded = make_model(tmp_path / "sharded", MakeModelConfig(arch="mistral", hidden=256, seed=3, shard_mb=1))
    assert len(list(sharded.glob("*.safetensors"))) > 1
    a, b = load_model(single), load_model(sharded)
    for (name, p), (_, q) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(p, q), name


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_tracks_float32(model_dir, dtype):
    prompts = make_prompts(384, lengths=(5, 20))
    ref = make_llm(model_dir("qwen2")).generate(prompts, SamplingParams(max_tokens=1, temperature=0, logprobs=0))
    llm = make_llm(model_dir("qwen2"), dtype=dtype)
    assert llm.engine.kv_cache.data.dtype == getattr(torch, dtype)
    outs = llm.generate(prompts, SamplingParams(max_tokens=4, temperature=0, logprobs=0))
    for out, r in zip(outs, ref):
        assert len(out.token_ids) == 4
        assert abs(out.logprobs[0].logprob - r.logprobs[0].logprob) < 0.1
    assert_leak_free(llm)


def broken_copy(src, dst, edit):
    shutil.copytree(src, dst)
    edit(dst)
    return dst


def _edit_config(**changes):
    def edit(d):
        cfg = json.loads((d / "config.json").read_text())
        cfg.update(changes)
        (d / "config.json").write_text(json.dumps(cfg))
    return edit


def _drop_tensor(d):
    state = load_file(d / "model.safetensors")
    state.pop("model.layers.1.mlp.up_proj.weight")
    save_file(state, d / "model.safetensors")


@pytest.mark.parametrize("edit,message", [
    (lambda d: (d / "config.json").unlink(), "config.json is missing"),
    (lambda d: (d / "config.json").write_text("{not json"), "not valid JSON"),
    (_edit_config(architectures=["GPT2LMHeadModel"]), "not supported; supported: LlamaForCausalLM"),
    (_edit_config(rope_scaling={"rope_type": "yarn", "factor": 4.0}), "rope type 'yarn' is not supported"),
    (_edit_config(hidden_act="gelu"), "hidden_act 'gelu'"),
    (_edit_config(intermediate_size=100), r"mlp.gate_proj.weight has shape \(128, 64\)"),
    (lambda d: (d / "model.safetensors").unlink(), r"no \*.safetensors weights"),
    (lambda d: (d / "model.safetensors").write_bytes(b"garbage"), "cannot read safetensors"),
    (_drop_tensor, "weights missing for 1 tensors, e.g. model.layers.1.mlp.up_proj.weight"),
])
def test_bad_folders_fail_with_a_clear_message(tmp_path, model_dir, edit, message):
    folder = broken_copy(model_dir("llama"), tmp_path / "broken", edit)
    with pytest.raises(ModelLoadError, match=message):
        load_model(folder)


def test_missing_folder_and_tokenizer(tmp_path, model_dir):
    with pytest.raises(ModelLoadError, match="not a directory"):
        load_model(tmp_path / "nowhere")
    folder = broken_copy(model_dir("llama"), tmp_path / "notok", lambda d: (d / "tokenizer.json").unlink())
    with pytest.raises(ModelLoadError, match="tokenizer.json is missing"):
        Tokenizer(folder)
