"""A launched 1P+1D serving quantized weights (int4, quantized online in each engine process) with an FP8
KV cache: the OpenAI completions equal the colocated engine's with the same settings, the FP8 rows cross
through the transfer process, and every block is free after."""
from dataclasses import replace

import openai
from conftest import make_llm, make_prompts
from pipeline_launch import launched, leak_free, make_launch_config, snapshot, wait_until

from pdpipe.messages import SamplingParams

MODEL = "llama"


def test_1p1d_serves_int4_weights_with_an_fp8_kv_cache_as_the_colocated_engine(model_dir):
    prompts = make_prompts(384, lengths=(5, 33), seed=2)
    llm = make_llm(model_dir(MODEL), quantization="wint4", kv_cache_dtype="fp8")
    expected = llm.generate(prompts, SamplingParams(max_tokens=9, temperature=0.0, ignore_eos=True))
    cfg = make_launch_config(model_dir(MODEL), ["prefill", "decode"])
    cfg = replace(cfg, engine=replace(cfg.engine, quantization="wint4",
                                      cache=replace(cfg.engine.cache, kv_cache_dtype="fp8")))
    with launched(cfg) as launcher:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{cfg.api.port}/v1", api_key="none")
        for p, e in zip(prompts, expected):
            resp = client.completions.create(model=MODEL, prompt=p, max_tokens=9, temperature=0,
                                             extra_body={"ignore_eos": True, "return_token_ids": True})
            assert resp.choices[0].model_extra["token_ids"] == e.token_ids
        assert wait_until(lambda: snapshot(launcher)["transfers"]["transfer"]["bytes_moved"] > 0,
                          what="the FP8 rows crossed")
        assert wait_until(lambda: leak_free(launcher), what="all blocks free")
