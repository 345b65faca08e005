"""Launched pipelines on GPUs against the one-GPU engine: 1P+1D on two GPUs (bf16 and fp32, and
`transformers` in fp32), 1P+1D on one GPU (a remote prefix hit; int4 weights with an FP8 KV cache), a TP2
mixed instance on two GPUs, and 1P+1D of different tensor parallelism on two and four GPUs, KV moving by
head range through CUDA IPC.

Run on a GPU machine: python -m pytest -m gpu tests/gpu
"""
import json
import urllib.error
import urllib.request

import pytest
import torch
from conftest import make_llm, make_prompts

from pdpipe.messages import SamplingParams

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU")]


def _complete(port, prompt, max_tokens):
    body = json.dumps({"model": "llama", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
                       "ignore_eos": True, "return_token_ids": True}).encode()
    req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/completions", data=body,
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=120) as resp:
            return json.loads(resp.read())["choices"][0]["token_ids"]
    except urllib.error.HTTPError as exc:
        raise AssertionError(f"HTTP {exc.code}: {exc.read().decode(errors='replace')}") from None


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_1p1d_on_two_gpus_equals_colocated_gpu_engine(model_dir, monkeypatch, dtype):
    """bf16 and fp32: the pipeline's greedy tokens equal the colocated GPU engine's; in fp32 they also
    equal transformers' on the same generated model."""
    from dataclasses import replace

    from conftest import hf_greedy
    from pipeline_launch import launched, leak_free, make_launch_config, wait_until

    from pdpipe.config import InstanceConfig

    prompts = make_prompts(384, lengths=(1, 16, 47, 130), seed=6)
    colocated = make_llm(model_dir("llama"), device="cuda", dtype=dtype)
    expected = [colocated.generate([p], SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True))[0].token_ids
                for p in prompts]  # one at a time, as the pipeline gets them below
    del colocated
    torch.cuda.empty_cache()
    if dtype == "float32":  # transformers stops at EOS, the engine was told to ignore it: compare its length
        for (tokens, _), exp in zip(hf_greedy(model_dir("llama"), prompts, 20), expected):
            assert tokens and tokens == exp[:len(tokens)]
    monkeypatch.setenv("PDPIPE_LOG_LEVEL", "DEBUG")  # the processes log every message they handle
    cfg = make_launch_config(model_dir("llama"), ["prefill", "decode"])
    from pdpipe.config import DeadlineConfig

    cfg = replace(cfg, engine=replace(cfg.engine, device="cuda", dtype=dtype),
                  deadlines=DeadlineConfig(transferring=15, decoding=60),
                  instances=(InstanceConfig("prefill", gpus=(0,)), InstanceConfig("decode", gpus=(1,))))
    with launched(cfg) as launcher:
        try:
            for p, exp in zip(prompts, expected):
                assert _complete(cfg.api.port, p, 20) == exp
            assert wait_until(lambda: leak_free(launcher), what="all blocks free")
        except AssertionError:
            from pdpipe.inspect import control, format_queues

            print(format_queues(control(str(launcher.paths.run_dir), "snapshot")))
            print("exit codes:", {c.name: c.popen.poll() for c in launcher.children})
            dumps = {c.name: c.log_path.read_text().count("most recent call first") for c in launcher.children}
            launcher.dump_stacks()
            wait_until(lambda: all(c.log_path.read_text().count("most recent call first") > dumps[c.name]
                                   for c in launcher.children if c.popen.poll() is None), timeout=15,
                       what="fresh stack dumps")
            for c in launcher.children:
                if c.role == "transfer":
                    print(c.log_path.read_text()[-6000:])
            raise


def _one_gpu_completions(model, prompts, max_tokens: int, **fields) -> list[list[int]]:
    """Each prompt's greedy tokens from a one-GPU fp32 engine (with `fields` of its config), one prompt at a
    time (as the pipeline gets them in these tests); the GPU freed after."""
    one = make_llm(model, device="cuda", dtype="float32", **fields)
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    expected = [one.generate([p], params)[0].token_ids for p in prompts]
    del one
    torch.cuda.empty_cache()
    return expected


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_launched_tp2_mixed_instance_on_two_gpus_answers_as_one_gpu(model_dir):
    """`pdpipe launch` of one mixed instance with gpus = [0, 1] (two rank processes, NCCL): the OpenAI
    completions equal the one-GPU engine's, fp32 greedy; every block free after."""
    from dataclasses import replace

    from pipeline_launch import launched, leak_free, make_launch_config, wait_until

    from pdpipe.config import InstanceConfig

    prompts = make_prompts(384, lengths=(1, 16, 47, 130), seed=6)
    expected = _one_gpu_completions(model_dir("llama"), prompts, 12)
    cfg = make_launch_config(model_dir("llama"), ["mixed"])
    cfg = replace(cfg, engine=replace(cfg.engine, device="cuda", dtype="float32"),
                  instances=(InstanceConfig("mixed", gpus=(0, 1), tp=2),))
    with launched(cfg) as launcher:
        for p, exp in zip(prompts, expected):
            assert _complete(cfg.api.port, p, 12) == exp
        assert wait_until(lambda: leak_free(launcher), what="all blocks free")


def test_launched_1p1d_on_one_gpu_reuses_and_copies_cached_kv_as_if_computed(model_dir):
    """Prefill and decode share GPU 0 (two processes, two pools, KV through CUDA IPC on one device). Turn 2
    resends turn 1's prompt and reply: the prefill instance holds the prompt, decode the reply too, so the
    transfer copies the reply's full block from decode's pool into prefill's (a remote hit) and prefill
    computes only the rest. fp32 greedy tokens equal the one-GPU engine's, computing everything."""
    from dataclasses import replace

    from pipeline_launch import launched, leak_free, make_launch_config, snapshot, wait_until

    from pdpipe.config import InstanceConfig, RoutingConfig

    first = make_prompts(384, lengths=(40,), seed=21)[0]
    reply = _one_gpu_completions(model_dir("llama"), [first], 12)[0]
    second = first + reply + make_prompts(384, lengths=(9,), seed=22)[0]
    expected = _one_gpu_completions(model_dir("llama"), [second], 12)[0]
    cfg = make_launch_config(model_dir("llama"), ["prefill", "decode"],
                             routing=RoutingConfig(disaggregation="always", cache_min_tokens=8, pull_min_tokens=8))
    cfg = replace(cfg, engine=replace(cfg.engine, device="cuda", dtype="float32"),
                  instances=(InstanceConfig("prefill", gpus=(0,)), InstanceConfig("decode", gpus=(0,))))
    with launched(cfg) as launcher:
        assert _complete(cfg.api.port, first, 12) == reply
        assert _complete(cfg.api.port, second, 12) == expected
        assert wait_until(lambda: leak_free(launcher), what="all blocks free")
        transfers = snapshot(launcher)["transfers"].values()
        assert sum(t["blocks_pulled"] for t in transfers) == 1  # blocks of 8: the reply's 6th block


def test_launched_1p1d_on_one_gpu_serves_int4_weights_with_an_fp8_kv_cache_as_one_engine(model_dir):
    """Prefill and decode on GPU 0 with wint4 weights (quantized online in each engine process, CUDA graphs)
    and an FP8 KV cache: every prompt computed by prefill, its FP8 rows and scales moved to decode through
    CUDA IPC; fp32 greedy tokens equal the one-GPU engine's with the same settings; every block free after."""
    from dataclasses import replace

    from pipeline_launch import launched, leak_free, make_launch_config, snapshot, wait_until

    from pdpipe.config import InstanceConfig

    prompts = make_prompts(384, lengths=(1, 16, 47, 130), seed=31)
    expected = _one_gpu_completions(model_dir("llama"), prompts, 12, quantization="wint4", kv_cache_dtype="fp8")
    cfg = make_launch_config(model_dir("llama"), ["prefill", "decode"])  # every prompt computed by prefill
    cfg = replace(cfg, engine=replace(cfg.engine, device="cuda", dtype="float32", quantization="wint4",
                                      cache=replace(cfg.engine.cache, kv_cache_dtype="fp8")),
                  instances=(InstanceConfig("prefill", gpus=(0,)), InstanceConfig("decode", gpus=(0,))))
    with launched(cfg) as launcher:
        for p, exp in zip(prompts, expected):
            assert _complete(cfg.api.port, p, 12) == exp
        assert wait_until(lambda: sum(t["bytes_moved"] for t in snapshot(launcher)["transfers"].values()) > 0,
                          what="the FP8 rows crossed")
        assert wait_until(lambda: leak_free(launcher), what="all blocks free")


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
@pytest.mark.parametrize("prefill_tp,decode_tp", [(2, 1), (1, 2)])
def test_launched_1p1d_of_different_tp_on_two_gpus_equals_one_gpu(model_dir, prefill_tp, decode_tp):
    """1P+1D where one side is split over both GPUs (NCCL) and the other runs on one of them: KV moves
    between ranks' pools by head range through CUDA IPC; the completions equal the one-GPU engine's
    (fp32 greedy), and every block of every rank is free after."""
    from dataclasses import replace

    from pipeline_launch import launched, leak_free, make_launch_config, wait_until

    from pdpipe.config import InstanceConfig

    prompts = make_prompts(384, lengths=(1, 16, 47, 130), seed=8)
    expected = _one_gpu_completions(model_dir("llama"), prompts, 12)
    gpus = {1: (0,), 2: (0, 1)}
    cfg = make_launch_config(model_dir("llama"), ["prefill", "decode"])
    cfg = replace(cfg, engine=replace(cfg.engine, device="cuda", dtype="float32"),
                  instances=(InstanceConfig("prefill", gpus=gpus[prefill_tp], tp=prefill_tp),
                             InstanceConfig("decode", gpus=gpus[decode_tp] if decode_tp == 2 else (1,), tp=decode_tp)))
    with launched(cfg) as launcher:
        for p, exp in zip(prompts, expected):
            assert _complete(cfg.api.port, p, 12) == exp
        assert wait_until(lambda: leak_free(launcher), what="all blocks free")


@pytest.mark.skipif(torch.cuda.device_count() < 4, reason="needs four GPUs")
@pytest.mark.parametrize("prefill,decode", [((0, 1), (2, 3)), ((0, 1), (2,)), ((0,), (1, 2))])
def test_launched_1p1d_on_four_gpus_equals_one_gpu(model_dir, prefill, decode):
    """1P(TP2)+1D(TP2) on GPUs 0-1 and 2-3, and TP2 → TP1 / TP1 → TP2 on three GPUs (no GPU shared
    between the instances): KV moves by head range between the ranks' pools; the completions equal the
    one-GPU engine's (fp32 greedy), every block free after."""
    from dataclasses import replace

    from pipeline_launch import launched, leak_free, make_launch_config, wait_until

    from pdpipe.config import InstanceConfig

    prompts = make_prompts(384, lengths=(1, 16, 47, 130), seed=8)
    expected = _one_gpu_completions(model_dir("llama"), prompts, 12)
    cfg = make_launch_config(model_dir("llama"), ["prefill", "decode"])
    cfg = replace(cfg, engine=replace(cfg.engine, device="cuda", dtype="float32"),
                  instances=(InstanceConfig("prefill", gpus=prefill, tp=len(prefill)),
                             InstanceConfig("decode", gpus=decode, tp=len(decode))))
    with launched(cfg) as launcher:
        for p, exp in zip(prompts, expected):
            assert _complete(cfg.api.port, p, 12) == exp
        assert wait_until(lambda: leak_free(launcher), what="all blocks free")
