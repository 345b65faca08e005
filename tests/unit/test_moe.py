"""The mixture-of-experts parts on their own: the fused kernel's token sort (plain torch, so CI runs
it) and the config fields each MoE architecture honours or refuses by name."""
import json

import pytest
import torch

from pdpipe.kernels.reference import moe_align
from pdpipe.models.spec import ModelLoadError, spec_from_config


@pytest.mark.parametrize("tokens,experts,top_k,first,held,block", [
    (1, 128, 8, 0, 128, 16), (37, 8, 2, 0, 8, 16), (200, 16, 4, 8, 8, 16), (0, 4, 2, 0, 4, 16), (64, 8, 2, 0, 8, 64)])
def test_moe_align_groups_each_experts_pairs_in_padded_blocks(tokens, experts, top_k, first, held, block):
    """Every pair of a held expert appears once, in a block of its expert; runs padded with the sentinel
    to a multiple of the block; blocks past the last run name no expert; pairs of experts another rank
    holds (expert parallelism) appear nowhere."""
    gen = torch.Generator().manual_seed(tokens + experts)
    ids = torch.stack([torch.randperm(experts, generator=gen)[:top_k] for _ in range(tokens)]) if tokens \
        else torch.zeros(0, top_k, dtype=torch.long)
    sorted_pairs, block_expert, pairs = moe_align(ids, held, first, block)
    assert pairs == tokens * top_k and sorted_pairs.numel() == pairs + held * (block - 1)
    flat = ids.flatten() - first
    mine = [p for p in range(pairs) if 0 <= flat[p] < held]
    real = sorted_pairs[sorted_pairs < pairs].tolist()
    assert sorted(real) == mine  # each once, no other
    for b in range(block_expert.numel()):
        chunk = sorted_pairs[b * block:(b + 1) * block]
        chunk = chunk[chunk < pairs]
        if block_expert[b] < held:
            assert all(flat[p] == block_expert[b] for p in chunk.tolist())
        else:
            assert chunk.numel() == 0
    runs = [int((flat[mine] == e).sum()) for e in range(held)] if mine else [0] * held
    assert int((block_expert < held).sum()) == sum(-(-n // block) for n in runs)


def _config(arch: str, **extra) -> dict:
    base = {"architectures": [arch], "vocab_size": 512, "hidden_size": 64, "intermediate_size": 128,
            "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2}
    return json.loads(json.dumps({**base, **extra}))


def test_moe_fields_are_read_as_transformers_reads_them():
    ernie = spec_from_config(_config("Ernie4_5_MoeForCausalLM", moe_num_experts=16, moe_k=4, moe_intermediate_size=32,
                                     moe_layer_start_index=1, moe_layer_end_index=2, moe_layer_interval=1,
                                     moe_num_shared_experts=2)).moe
    assert ernie.layers == (False, True, True, False) and ernie.top_k == 4 and ernie.shared_experts == 2
    assert ernie.selection_bias and ernie.router_fp32 and ernie.renormalize
    qwen = spec_from_config(_config("Qwen3MoeForCausalLM", num_experts=8, num_experts_per_tok=2,
                                    moe_intermediate_size=32, mlp_only_layers=[0], decoder_sparse_step=2)).moe
    assert qwen.layers == (False, True, False, True) and not qwen.renormalize
    saved = spec_from_config(_config("Qwen3MoeForCausalLM", num_local_experts=8, num_experts_per_tok=2))
    assert saved.moe.num_experts == 8  # transformers 5 writes num_experts down as num_local_experts
    mixtral = spec_from_config(_config("MixtralForCausalLM", num_local_experts=4, num_experts_per_tok=2)).moe
    assert mixtral.layers == (True,) * 4 and mixtral.module == "block_sparse_moe" and mixtral.intermediate_size == 128


@pytest.mark.parametrize("arch,extra,field", [
    ("MixtralForCausalLM", {"num_local_experts": 4, "num_experts_per_tok": 5}, "num_experts_per_tok"),
    ("Qwen3MoeForCausalLM", {"num_experts": 8, "decoder_sparse_step": 0}, "decoder_sparse_step"),
    ("Ernie4_5_MoeForCausalLM", {"moe_layer_interval": 0}, "moe_layer_interval"),
    ("Ernie4_5_MoeForCausalLM", {"moe_num_experts": 8, "moe_k": 0, "moe_layer_end_index": 3}, "moe_k"),
])
def test_moe_fields_out_of_range_are_refused_by_name(arch, extra, field):
    with pytest.raises(ModelLoadError, match=field):
        spec_from_config(_config(arch, **extra))
