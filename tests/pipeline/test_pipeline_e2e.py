"""The launched 1P+1D pipeline through the official `openai` client: greedy output equals the
colocated engine and `transformers`; bad input gets its 4xx and the server keeps serving; client
disconnects and aborts leave every engine's blocks free; queues and trace show held requests."""
import json
import subprocess
import sys

import httpx
import openai
import pytest
from conftest import hf_greedy, make_llm, make_prompts
from pipeline_launch import launched, leak_free, make_launch_config, snapshot, wait_until

from pdpipe.inspect import control
from pdpipe.messages import SamplingParams

MODEL = "llama"


@pytest.fixture(scope="module")
def pipeline(model_dir):
    with launched(make_launch_config(model_dir(MODEL), ["prefill", "decode"])) as launcher:
        yield launcher


@pytest.fixture(scope="module")
def client(pipeline):
    return openai.OpenAI(base_url=f"http://127.0.0.1:{pipeline.cfg.api.port}/v1", api_key="none",
                         max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def colocated(model_dir):
    return make_llm(model_dir(MODEL))


def test_completions_equal_colocated_and_transformers(client, colocated, model_dir):
    prompts = make_prompts(384, lengths=(1, 6, 23, 41))
    expected_hf = hf_greedy(model_dir(MODEL), prompts, 12)
    expected = colocated.generate(prompts, SamplingParams(max_tokens=12, temperature=0.0, logprobs=0))
    for prompt, ref, (hf_tokens, hf_logprobs) in zip(prompts, expected, expected_hf):
        resp = client.completions.create(model=MODEL, prompt=prompt, max_tokens=12, temperature=0,
                                         logprobs=0, extra_body={"return_token_ids": True})
        choice = resp.choices[0]
        assert choice.model_extra["token_ids"] == ref.token_ids == hf_tokens
        assert choice.text == ref.text
        assert choice.logprobs.token_logprobs == pytest.approx(hf_logprobs, abs=1e-4)
        assert choice.finish_reason == ref.finish_reason
        assert resp.usage.prompt_tokens == len(prompt) and resp.usage.completion_tokens == len(ref.token_ids)


def test_streamed_completion_equals_unstreamed(client):
    kwargs = dict(model=MODEL, prompt="The cache moves from prefill to decode", max_tokens=16, temperature=0)
    whole = client.completions.create(**kwargs).choices[0]
    chunks = list(client.completions.create(stream=True, stream_options={"include_usage": True}, **kwargs))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole.text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == whole.finish_reason
    assert chunks[-1].usage.completion_tokens == 16 and not chunks[-1].choices


def test_chat_streaming_and_not_equal_colocated_chat(client, colocated):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is a KV cache?"}]
    ref = colocated.chat(messages, SamplingParams(max_tokens=14, temperature=0.0))[0]
    resp = client.chat.completions.create(model=MODEL, messages=messages, max_completion_tokens=14,
                                          temperature=0, logprobs=True, top_logprobs=2)
    assert resp.choices[0].message.content == ref.text and resp.choices[0].message.role == "assistant"
    assert len(resp.choices[0].logprobs.content) == len(ref.token_ids)
    assert all(len(c.top_logprobs) == 2 for c in resp.choices[0].logprobs.content)
    stream = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=14, temperature=0,
                                            stream=True)
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == ref.text
    assert chunks[-1].choices[0].finish_reason == ref.finish_reason


def test_stop_strings_and_seeded_sampling_over_the_pipeline(client, colocated):
    prompt = make_prompts(384, lengths=(9,))[0]
    kwargs = dict(model=MODEL, prompt=prompt, max_tokens=20, temperature=0, extra_body={"ignore_eos": True})
    free = client.completions.create(**kwargs).choices[0].text
    stop = free[5:8]
    cut = client.completions.create(stop=[stop], **kwargs)
    assert cut.choices[0].text == free[: free.index(stop)] and cut.choices[0].finish_reason == "stop"
    a, b = (client.completions.create(model=MODEL, prompt="Hello", max_tokens=12, temperature=1.0, seed=42)
            for _ in range(2))
    assert a.choices[0].text == b.choices[0].text
    ref = colocated.generate("Hello", SamplingParams(max_tokens=12, temperature=1.0, seed=42))[0]
    assert a.choices[0].text == ref.text


def test_models_health_and_metrics(pipeline, client):
    models = client.models.list()
    assert [m.id for m in models.data] == [MODEL]
    base = f"http://127.0.0.1:{pipeline.cfg.api.port}"
    assert httpx.get(f"{base}/health").json() == {"status": "ok"}
    text = httpx.get(f"{base}/metrics").text
    for name in ("pdpipe_time_to_first_token_seconds_count", "pdpipe_time_per_output_token_seconds_bucket",
                 "pdpipe_e2e_request_latency_seconds_sum", 'pdpipe_requests_in_state{state="DECODING"}',
                 'pdpipe_kv_blocks_free{instance="decode-0",role="decode"}', "pdpipe_kv_transfer_bytes_total",
                 "pdpipe_admission_queue_requests", 'pdpipe_prefill_placements_total{where="remote"}'):
        assert name in text
    moved = [line for line in text.splitlines() if line.startswith("pdpipe_kv_transfer_bytes_total")]
    assert float(moved[0].split()[-1]) > 0


BAD_REQUESTS = [
    ("/v1/completions", b"{not json", 400, None),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "max_tokens": "ten"}, 400, "max_tokens"),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "temperature": -1}, 400, "temperature"),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "top_p": 3}, 400, "top_p"),
    ("/v1/completions", {"model": "gpt-4", "prompt": "x"}, 404, "model"),
    ("/v1/completions", {"model": MODEL, "prompt": "word " * 2000}, 400, "prompt"),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "max_tokens": 5000}, 400, "max_tokens"),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "n": 3}, 400, "n"),
    ("/v1/completions", {"model": MODEL, "prompt": [1, 2, 99999]}, 400, "prompt"),
    ("/v1/completions", {"prompt": "x"}, 400, "model"),
    ("/v1/chat/completions", {"model": MODEL, "messages": []}, 400, "messages"),
    ("/v1/chat/completions", {"model": MODEL, "messages": [{"content": "hi"}]}, 400, "messages[0].role"),
    ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "hi"}],
                              "top_logprobs": 50, "logprobs": True}, 400, "top_logprobs"),
    ("/v1/chat/completions", {"model": MODEL, "messages": "hello"}, 400, "messages"),
    ("/v1/completions", {"model": MODEL, "prompt": "x" * 100_000}, 413, None),
    ("/v1/nothing", {"model": MODEL}, 404, None),
]


@pytest.mark.parametrize("path,body,status,param", BAD_REQUESTS)
def test_bad_input_gets_openai_error_and_server_keeps_serving(pipeline, client, path, body, status, param):
    base = f"http://127.0.0.1:{pipeline.cfg.api.port}"
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    resp = httpx.post(base + path, content=data, headers={"Content-Type": "application/json"})
    assert resp.status_code == status
    err = resp.json()["error"]
    assert err["message"] and err["type"]
    if param:
        assert err["param"] == param, err
    ok = client.completions.create(model=MODEL, prompt="still serving", max_tokens=3, temperature=0)
    assert ok.choices[0].finish_reason == "length"


def test_client_disconnect_mid_stream_aborts_and_frees(pipeline):
    base = f"http://127.0.0.1:{pipeline.cfg.api.port}"
    body = {"model": MODEL, "prompt": "a long answer please", "max_tokens": 600, "temperature": 0,
            "ignore_eos": True, "stream": True}
    with httpx.stream("POST", base + "/v1/completions", json=body, timeout=30) as resp:
        lines = resp.iter_lines()
        first = next(line for line in lines if line.startswith("data: "))
        rid = json.loads(first[6:])["id"]
    trace = wait_until(lambda: (t := control(str(pipeline.paths.run_dir), "trace", request_id=rid))["state"]
                       in ("ABORTED",) and t, what="the abort")
    assert ["ABORTED", "api", "client disconnected"] in [e[1:] for e in trace["events"]]
    assert wait_until(lambda: leak_free(pipeline), what="all blocks free")


def cli(*args):
    return subprocess.run([sys.executable, "-m", "pdpipe.cli", *args], capture_output=True, text=True, timeout=60)


def test_queues_and_trace_show_held_requests(pipeline):
    run_dir = str(pipeline.paths.run_dir)
    base = f"http://127.0.0.1:{pipeline.cfg.api.port}"
    body = {"model": MODEL, "prompt": [5, 6, 7, 8, 9, 10, 11, 12, 13], "max_tokens": 8, "temperature": 0,
            "stream": True, "ignore_eos": True, "return_token_ids": True}
    assert cli("pause", "decode-0", "--run-dir", run_dir).returncode == 0
    with httpx.stream("POST", base + "/v1/completions", json=body, timeout=30) as resp:
        lines = resp.iter_lines()
        first = json.loads(next(line for line in lines if line.startswith("data: "))[6:])
        rid = first["id"]  # the first token came from prefill although decode is paused
        wait_until(lambda: snapshot(pipeline)["states"]["TRANSFERRING"] == 1, what="TRANSFERRING")
        # the figures are each process's latest stats (five a second): wait for those after the pause
        queues = wait_until(lambda: all(x in (q := cli("queues", "--run-dir", run_dir)).stdout for x in (
            "api: open requests 1", "decode (paused)", "TRANSFERRING 1")) and q, what="the held request in queues")
        assert queues.returncode == 0, queues.stderr
        decode_row = next(line for line in queues.stdout.splitlines() if line.startswith("decode-0"))
        assert "TRANSFERRING:1" in decode_row
        held = cli("trace", rid, "--run-dir", run_dir).stdout
        assert "RESERVED" in held and "PREFILLING" in held and "layers 1-2/2 sent" in held and "DECODING" not in held
        assert cli("resume", "decode-0", "--run-dir", run_dir).returncode == 0
        rest = [json.loads(line[6:]) for line in lines if line.startswith("data: {")]
    assert rest[-1]["choices"][0]["finish_reason"] == "length"
    assert len(first["choices"][0]["token_ids"] + [t for r in rest for t in r["choices"][0]["token_ids"]]) == 8
    done = wait_until(lambda: "FINISHED" in (t := cli("trace", rid, "--run-dir", run_dir).stdout) and t,
                      what="FINISHED in the trace")
    assert "FINISHED" in done and "DECODING" in done
    order = [e[1] for e in control(run_dir, "trace", request_id=rid)["events"]]
    assert order.index("PREFILLING") < order.index("TRANSFERRING") < order.index("DECODING") \
        < order.index("FINISHED")
    assert wait_until(lambda: leak_free(pipeline), what="all blocks free")


def test_paused_prefill_holds_requests_in_reserved_and_abort_frees(pipeline):
    run_dir = str(pipeline.paths.run_dir)
    base = f"http://127.0.0.1:{pipeline.cfg.api.port}"
    cli("pause", "prefill-0", "--run-dir", run_dir)
    try:
        with httpx.stream("POST", base + "/v1/completions", timeout=30,
                          json={"model": MODEL, "prompt": "held", "max_tokens": 4, "stream": True}) as resp:
            assert resp.status_code == 200
            wait_until(lambda: snapshot(pipeline)["states"]["RESERVED"] == 1, what="RESERVED")
            assert "RESERVED 1" in cli("queues", "--run-dir", run_dir).stdout
    finally:
        cli("resume", "prefill-0", "--run-dir", run_dir)
    assert wait_until(lambda: leak_free(pipeline), what="all blocks free")


def test_usage_reports_the_prompt_tokens_served_from_the_cache(client):
    """A prompt sharing 5 blocks (80 tokens) with one before it: its usage says they were cached, streamed
    or not; another salt shares nothing; an empty salt is a 400 naming the field."""
    head = make_prompts(384, lengths=(80,), seed=31)[0]
    first, second, third = (head + tail for tail in make_prompts(384, lengths=(20, 20, 20), seed=32))
    kwargs = dict(model=MODEL, max_tokens=4, temperature=0, extra_body={"ignore_eos": True})
    assert client.completions.create(prompt=first, **kwargs).usage.prompt_tokens_details.cached_tokens == 0
    assert client.completions.create(prompt=second, **kwargs).usage.prompt_tokens_details.cached_tokens == 80
    chunks = list(client.completions.create(prompt=third, stream=True, stream_options={"include_usage": True},
                                            **kwargs))
    assert chunks[-1].usage.prompt_tokens_details.cached_tokens == 80
    salted = dict(kwargs, extra_body={"ignore_eos": True, "cache_salt": "tenant-b"})
    assert client.completions.create(prompt=second, **salted).usage.prompt_tokens_details.cached_tokens == 0
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(prompt=second, **dict(kwargs, extra_body={"cache_salt": ""}))
    assert err.value.body["param"] == "cache_salt"


def test_reset_prefix_cache_and_the_cache_counters(pipeline, client):
    """POST /reset_prefix_cache empties every engine's cache (a prompt seen before then hits nothing);
    /metrics counts the prompt tokens looked up and found, per instance, as counters that only grow."""
    base = f"http://127.0.0.1:{pipeline.cfg.api.port}"

    def counter(name: str) -> float:
        text = httpx.get(f"{base}/metrics").text
        assert f"# TYPE {name}_total counter" in text or f"# TYPE {name} counter" in text
        return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(f"{name}_total{{"))

    prompt = make_prompts(384, lengths=(70,), seed=33)[0]
    kwargs = dict(model=MODEL, prompt=prompt, max_tokens=3, temperature=0, extra_body={"ignore_eos": True})
    client.completions.create(**kwargs)
    queries, hits = counter("pdpipe_prefix_cache_queries_tokens"), counter("pdpipe_prefix_cache_hits_tokens")
    assert client.completions.create(**kwargs).usage.prompt_tokens_details.cached_tokens == 64
    wait_until(lambda: counter("pdpipe_prefix_cache_hits_tokens") >= hits + 64, what="the hit counted")
    assert counter("pdpipe_prefix_cache_queries_tokens") >= queries + 70
    reset = httpx.post(f"{base}/reset_prefix_cache", timeout=10)
    assert reset.status_code == 200 and set(reset.json()["instances"]) == {"prefill-0", "decode-0"}
    wait_until(lambda: all(i["stats"].get("cached_blocks") == 0 for n, i in snapshot(pipeline)["instances"].items()
                           if n in ("prefill-0", "decode-0")), what="every cache empty")
    assert client.completions.create(**kwargs).usage.prompt_tokens_details.cached_tokens == 0
    text = httpx.get(f"{base}/metrics").text
    assert "pdpipe_prefix_cache_blocks" in text and 'pdpipe_kv_transfer_blocks_total{kind="sent"}' in text
