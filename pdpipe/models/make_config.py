"""The arguments of `pdpipe make-model`, apart from the code that makes the model (torch), so that the
command line parses without importing torch."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from pdpipe.config import DTYPES, QUANT_SCHEMES

CORPUS = Path(__file__).with_name("corpus.txt")  # the text the generated tokenizers are trained on

ARCH_NAMES = {
    "llama": "LlamaForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "mistral": "MistralForCausalLM",
    "ernie4_5": "Ernie4_5ForCausalLM",
    "ernie4_5_moe": "Ernie4_5_MoeForCausalLM",
    "qwen3_moe": "Qwen3MoeForCausalLM",
    "mixtral": "MixtralForCausalLM",
}
MOE_ARCHS = ("ernie4_5_moe", "qwen3_moe", "mixtral")


@dataclass(frozen=True)
class MakeModelConfig:
    arch: str = field(default="llama", metadata={"help": "architecture", "choices": tuple(ARCH_NAMES)})
    layers: int = field(default=2, metadata={"help": "number of decoder layers"})
    hidden: int = field(default=64, metadata={"help": "hidden size"})
    heads: int = field(default=4, metadata={"help": "attention heads"})
    kv_heads: int = field(default=2, metadata={"help": "key/value heads (GQA when fewer than heads)"})
    head_dim: int = field(default=0, metadata={"help": "head dimension; 0 means hidden / heads"})
    intermediate: int = field(default=0, metadata={"help": "MLP size; 0 means 2 * hidden"})
    vocab: int = field(default=512, metadata={"help": "vocabulary size, reserved tokens fill what "
                                                     "the corpus cannot"})
    max_position: int = field(default=4096, metadata={"help": "max_position_embeddings"})
    sliding_window: int = field(default=0, metadata={"help": "Mistral/Qwen sliding window; 0 is none"})
    bias: bool | None = field(default=None, metadata={"help": "force projection biases (ERNIE "
                                                              "use_bias, Llama attention/mlp bias)"})
    tie_embeddings: bool | None = field(default=None, metadata={"help": "tie lm_head to embeddings; "
                                                                        "default per architecture"})
    experts: int = field(default=8, metadata={"help": "MoE architectures: routed experts a layer"})
    top_k: int = field(default=2, metadata={"help": "MoE: experts a token goes to"})
    moe_intermediate: int = field(default=0, metadata={"help": "MoE: each expert's MLP size; 0 means hidden"})
    shared_experts: int = field(default=1, metadata={"help": "ERNIE MoE: shared experts (moe_num_shared_experts)"})
    first_moe_layer: int = field(default=1, metadata={
        "help": "MoE: layers before this one are dense (ERNIE moe_layer_start_index, Qwen3-MoE mlp_only_layers; "
                "Mixtral has none)"})
    norm_topk: bool = field(default=False, metadata={"help": "Qwen3-MoE: norm_topk_prob (renormalise the top-k "
                                                             "weights); ERNIE and Mixtral always do"})
    dtype: str = field(default="float32", metadata={"help": "weight dtype", "choices": DTYPES})
    shard_mb: int = field(default=0, metadata={"help": "split weights into shards of this many MiB"})
    weights: bool = field(default=True, metadata={"help": "write weights; without, load the folder "
                                                          "with load_format=dummy (large shapes)"})
    seed: int = field(default=0, metadata={"help": "random seed; same seed, same bytes"})
    quantization: str = field(default="", metadata={
        "help": "write the projections quantized, as checkpoints users have store them: wint8 / wint4 as "
                "compressed-tensors pack-quantized (int8 per channel; int4 in one group size for every "
                "projection, 128 if it divides every K, else 64, else per channel: online quantization picks "
                "it per tensor), fp8 as compressed-tensors float-quantized per channel, block_wise_fp8 as "
                "Hugging Face FP8 in 128 x 128 blocks",
        "choices": ("",) + QUANT_SCHEMES})

    def __post_init__(self):
        if self.arch not in ARCH_NAMES:
            raise ValueError(f"arch: {self.arch!r} is not supported; use one of {', '.join(ARCH_NAMES)}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype: {self.dtype!r} is not supported; use one of {', '.join(DTYPES)}")
        if self.quantization not in ("",) + QUANT_SCHEMES:
            raise ValueError(f"quantization: {self.quantization!r}; allowed: {', '.join(QUANT_SCHEMES)} (or empty)")
        if self.quantization and not self.weights:
            raise ValueError("quantization: needs weights (a folder without them has nothing to quantize)")
        for name in ("layers", "hidden", "heads", "kv_heads", "max_position"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: must be at least 1, got {getattr(self, name)}")
        if self.heads % self.kv_heads:
            raise ValueError(f"kv_heads: {self.kv_heads} must divide heads ({self.heads})")
        if not self.head_dim and self.hidden % self.heads:
            raise ValueError(f"hidden: {self.hidden} must be a multiple of heads ({self.heads}) "
                             "unless head_dim is given")
        if (self.head_dim or self.hidden // self.heads) % 2:
            raise ValueError("head_dim: must be even for rotary embeddings")
        if self.arch in MOE_ARCHS and not 1 <= self.top_k <= self.experts:
            raise ValueError(f"top_k: {self.top_k}; allowed: 1 to experts ({self.experts})")
        if self.vocab < 300:
            raise ValueError(f"vocab: must be at least 300 (256 bytes + special tokens), got {self.vocab}")
