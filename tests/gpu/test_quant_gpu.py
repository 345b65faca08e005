"""Quantized weights on a GPU: the engine (CUDA graphs, fused projections) on online-quantized weights
generates what it does on a folder of their dequantized weights (fp32, greedy); an FP8 KV cache is refused
on GPU naming the setting until the attention kernels read FP8 rows.

Run on a GPU machine: python -m pytest -m gpu tests/gpu
"""
import pytest
import torch
from conftest import engine_tokens, make_prompts

from pdpipe.config import CacheConfig, EngineConfig
from pdpipe.messages import SamplingParams
from pdpipe.quant import QuantPlan
from pdpipe.quant.weights import dequantized_copy

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU")]


def greedy(model, **fields) -> list[list[int]]:
    from pdpipe.engine.engine import LLMEngine

    engine = LLMEngine(EngineConfig(model=str(model), device="cuda", dtype="float32",
                                    cache=CacheConfig(block_size=16, num_blocks=64), **fields))
    tokens = engine_tokens(engine, make_prompts(384, lengths=(3, 40, 130), seed=5),
                           SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True))
    del engine
    torch.cuda.empty_cache()
    return tokens


@pytest.mark.parametrize("scheme", ["wint8", "wint4", "fp8", "block_wise_fp8"])
def test_the_quantized_engine_on_a_gpu_generates_what_the_dequantized_folder_does(model_dir, tmp_path, scheme):
    model = model_dir("llama")
    assert greedy(model, quantization=scheme) == greedy(dequantized_copy(model, QuantPlan(scheme), tmp_path / "deq"))


def test_an_fp8_kv_cache_is_refused_on_gpu_naming_the_setting(model_dir):
    from pdpipe.engine.engine import LLMEngine

    with pytest.raises(ValueError, match="kv_cache_dtype: 'fp8' runs on CPU so far"):
        LLMEngine(EngineConfig(model=str(model_dir("llama")), device="cuda",
                               cache=CacheConfig(block_size=16, num_blocks=64, kv_cache_dtype="fp8")))
