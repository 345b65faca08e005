"""`pdpipe bench`: the pure parts (percentiles, goodput, ITL/TPOT, arrivals, datasets) on hand-made
data, the client against a fake OpenAI server streaming hand-written SSE lines, the TTFT split on
hand-made traces, then `bench serve` against a launched 1P+1D pipeline (programmatic and from the
command line), and `bench compare` over two tiny launched layouts."""
import asyncio
import json
import math
import subprocess
import sys

import numpy as np
import pytest
from aiohttp import web
from fake_openai import fake_server
from pipeline_launch import free_port, launched, make_launch_config

from pdpipe.bench.arrivals import arrival_offsets, dispatch
from pdpipe.bench.cli import bench_main
from pdpipe.bench.client import DONE, RequestResult, parse_sse_line, take_chunk
from pdpipe.bench.compare import crossings, goodput_rate
from pdpipe.bench.config import LoadConfig, ServeConfig, WorkloadConfig, parse_range, parse_slos
from pdpipe.bench.datasets import Prompt, random_prompts, shared_prefix_prompts, sharegpt_prompts
from pdpipe.bench.metrics import distribution_ms, inter_token_latencies, latencies, percentile, summarize
from pdpipe.bench.report import format_split, format_summary
from pdpipe.bench.serve import api_base_url, run_serve, send_all
from pdpipe.bench.traces import PATH_STAGES, STAGES, scheduler_request_id, trace_milestones, ttft_split
from pdpipe.config import ApiConfig
from pdpipe.tokenizer import Tokenizer

MODEL = "llama"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


# ---- pure parts -------------------------------------------------------------------------------
def test_percentiles_interpolate_and_stay_ordered():
    values = list(range(1, 101))
    assert percentile(values, 50) == 50.5 and percentile(values, 99) == pytest.approx(99.01)
    assert math.isnan(percentile([], 50))
    dist = distribution_ms([0.001 * v for v in values])
    assert dist["mean"] == pytest.approx(50.5) and dist["p50"] <= dist["p90"] <= dist["p99"]
    assert distribution_ms([]) == {"mean": None, "p50": None, "p90": None, "p99": None}


def test_ranges_and_slos_parse_or_name_the_flag():
    assert parse_range("4:40", "input_len") == (4, 40) and parse_range("16", "x") == (16, 16)
    with pytest.raises(ValueError, match="input_len"):
        parse_range("40:4", "input_len")
    assert parse_slos(["ttft:600", "tpot:15"]) == {"ttft": 600.0, "tpot": 15.0}
    with pytest.raises(ValueError, match="slo"):
        parse_slos(["latency:5"])


def result(index, chunks, e2e, usage=None, ok=True):
    r = RequestResult(index, max_tokens=sum(n for _, n in chunks), prompt_tokens=10, chunks=list(chunks),
                      e2e=e2e, ok=ok, request_id=f"cmpl-{index}")
    r.usage_completion_tokens = usage
    return r


def test_itl_splits_a_multi_token_chunk_and_tpot_follows():
    r = result(0, [(0.100, 1), (0.140, 2), (0.200, 1), (0.230, 3)], e2e=0.240)
    lat = latencies(r)
    assert lat.ttft == 0.100 and r.output_tokens == 7
    assert lat.itls == pytest.approx([0.02, 0.02, 0.06, 0.01, 0.01, 0.01])
    assert sum(lat.itls) == pytest.approx(0.230 - 0.100)
    assert lat.tpot == pytest.approx((0.240 - 0.100) / 6)
    assert inter_token_latencies([(0.1, 3)]) == [0.0, 0.0]  # tokens that came with the first
    assert latencies(result(1, [(0.1, 1)], e2e=0.1)).tpot is None


def test_a_token_with_empty_text_still_counts():
    r = RequestResult(0, max_tokens=3, prompt_tokens=4)
    head = {"id": "cmpl-abc", "object": "text_completion"}
    for when, text, ids in ((0.1, "a", [7]), (0.2, "", [8]), (0.3, "b", [9])):
        take_chunk(r, {**head, "choices": [{"index": 0, "text": text, "token_ids": ids}]}, when)
    take_chunk(r, {**head, "choices": [], "usage": {"prompt_tokens": 4, "completion_tokens": 3}}, 0.31)
    assert r.request_id == "cmpl-abc" and r.output_tokens == 3 and len(r.chunks) == 3
    plain = RequestResult(1, max_tokens=3, prompt_tokens=None)  # a server without token ids
    for when, text in ((0.1, "a"), (0.2, ""), (0.3, "b")):
        take_chunk(plain, {"choices": [{"index": 0, "text": text}]}, when)
    assert len(plain.chunks) == 2 and plain.output_tokens == 2
    take_chunk(plain, {"choices": [], "usage": {"prompt_tokens": 4, "completion_tokens": 3}}, 0.31)
    assert plain.output_tokens == 3 and plain.prompt_tokens == 4  # usage corrects the total
    chat = RequestResult(2, max_tokens=1, prompt_tokens=None)
    take_chunk(chat, {"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]}, 0.05)
    take_chunk(chat, {"choices": [{"index": 0, "delta": {"content": "x"}}]}, 0.1)
    assert chat.chunks == [(0.1, 1)]


def test_without_token_ids_itl_is_per_chunk_and_usage_gives_the_total():
    r = RequestResult(0, max_tokens=4, prompt_tokens=None)  # a server that sends token_ids: null
    for when, text in ((0.1, "a"), (0.2, "bc"), (0.4, "d")):
        take_chunk(r, {"choices": [{"index": 0, "text": text, "token_ids": None}]}, when)
    take_chunk(r, {"choices": [], "usage": {"prompt_tokens": 4, "completion_tokens": 4}}, 0.41)
    r.e2e = 0.42
    assert not r.ids_seen and r.output_tokens == 4  # the usage's count, not the 3 chunks
    lat = latencies(r)
    assert lat.itls == pytest.approx([0.1, 0.2]) and lat.tpot == pytest.approx((0.42 - 0.1) / 3)


def test_reasoning_deltas_carry_tokens():
    r = RequestResult(0, max_tokens=3, prompt_tokens=None)
    take_chunk(r, {"choices": [{"index": 0, "delta": {"role": "assistant", "content": None}}]}, 0.05)
    take_chunk(r, {"choices": [{"index": 0, "delta": {"content": None, "reasoning_content": "hm"}}]}, 0.1)
    take_chunk(r, {"choices": [{"index": 0, "delta": {"content": None, "reasoning": "so"}}]}, 0.2)
    take_chunk(r, {"choices": [{"index": 0, "delta": {"content": "x"}}]}, 0.3)
    assert r.chunks == [(0.1, 1), (0.2, 1), (0.3, 1)]


def test_sse_lines():
    assert parse_sse_line(b'data: {"id": "x"}\n') == {"id": "x"}
    assert parse_sse_line(b"data: [DONE]\n") is DONE
    assert parse_sse_line(b"\n") is None and parse_sse_line(b": keep-alive\n") is None


def test_summary_counts_goodput_over_every_request():
    results = [result(0, [(0.1, 1), (0.2, 1)], 0.2), result(1, [(0.5, 1), (0.6, 1)], 0.6),
               result(2, [(0.1, 1), (0.9, 1)], 0.9), RequestResult(3, 2, 10, error="HTTP 500: x")]
    s = summarize(results, duration=2.0, slos_ms={"ttft": 300, "tpot": 500})
    assert (s["completed"], s["failed"], s["total_output_tokens"]) == (3, 1, 6)
    assert s["request_throughput"] == 1.5 and s["output_throughput"] == 3.0
    assert s["goodput"]["met"] == 1 and s["goodput"]["requests_per_s"] == 0.5  # 1 too slow, 2 TPOT 800 ms
    assert s["goodput"]["attainment"] == 0.25


def point(rate, attainment, ttft_p99=100.0):
    return {"rate": rate, "attainment": attainment, "ttft_ms": {"p99": ttft_p99}}


def test_goodput_is_the_highest_rate_up_to_which_the_slo_attainment_holds():
    sweep = [point(1, 1.0), point(2, 0.95), point(4, 0.9), point(8, 0.7), point(16, 0.92)]
    assert goodput_rate(sweep, 0.9) == 4  # 16 passing after 8 missed does not count
    assert goodput_rate(sweep, 0.99) == 1
    assert goodput_rate([point(1, 0.5)], 0.9) is None


def test_crossings_name_the_rates_where_the_leader_changes():
    pd = [point(1, 0.9, 300), point(2, 0.9, 310), point(4, 0.85, 320)]
    mixed = [point(1, 1.0, 100), point(2, 0.7, 400), point(4, 0.2, 900)]
    found = crossings({"pd": pd, "mixed": mixed})
    assert {"metric": "slo_attainment", "layouts": ["pd", "mixed"], "between": [1, 2], "before": "mixed",
            "after": "pd"} in found
    assert any(c["metric"] == "ttft_p99" and c["between"] == [1, 2] for c in found)
    assert crossings({"a": pd, "b": pd}) == []


def test_poisson_and_gamma_arrivals_have_the_asked_rate():
    gaps = np.diff(arrival_offsets(4001, rate=10.0, seed=1))
    assert gaps.mean() == pytest.approx(0.1, rel=0.05) and gaps.std() / gaps.mean() == pytest.approx(1, rel=0.1)
    bursty = np.diff(arrival_offsets(4001, rate=10.0, burstiness=0.25, seed=1))
    assert bursty.mean() == pytest.approx(0.1, rel=0.1) and bursty.std() / bursty.mean() > 1.7  # CV 2
    assert arrival_offsets(5, math.inf) == [0.0] * 5
    assert arrival_offsets(3, 1.0, seed=7) == arrival_offsets(3, 1.0, seed=7)


def test_the_concurrency_cap_is_honoured():
    in_flight, peak = [0], [0]

    async def send(i, item):
        in_flight[0] += 1
        peak[0] = max(peak[0], in_flight[0])
        for _ in range(3):  # let the others run
            await asyncio.sleep(0)
        in_flight[0] -= 1
        return item * 2

    out = asyncio.run(dispatch(list(range(10)), [0.0] * 10, 3, send))
    assert out == [i * 2 for i in range(10)] and peak[0] == 3


def test_random_and_shared_prefix_datasets_have_exact_lengths():
    cfg = WorkloadConfig(num_prompts=50, input_len="4:40", output_len="4:12", vocab_size=100, seed=2)
    prompts = random_prompts(cfg)
    assert all(4 <= p.prompt_len <= 40 and 4 <= p.max_tokens <= 12 for p in prompts)
    assert all(10 <= t < 100 for p in prompts for t in p.prompt)
    assert random_prompts(cfg) == prompts
    shared = shared_prefix_prompts(WorkloadConfig(dataset="shared-prefix", num_prompts=6, input_len="3",
                                                  prefix_len=8, num_prefixes=2, vocab_size=100))
    assert [p.prompt[:8] for p in shared[:2]] == [p.prompt[:8] for p in shared[2:4]]
    assert shared[0].prompt[:8] != shared[1].prompt[:8] and all(p.prompt_len == 11 for p in shared)


def test_sharegpt_loader(tmp_path):
    path = tmp_path / "sharegpt.json"
    path.write_text(json.dumps([
        {"id": "a", "conversations": [{"from": "human", "value": "Hi there"}, {"from": "gpt", "value": "x" * 40}]},
        {"id": "b", "conversations": [{"from": "gpt", "value": "no question first"}]},
        {"id": "c", "conversations": [{"from": "system", "value": "s"}, {"from": "human", "value": "Why?"},
                                      {"from": "gpt", "value": "y" * 4000}]},
    ]))
    prompts = sharegpt_prompts(WorkloadConfig(dataset="sharegpt", dataset_path=str(path), num_prompts=4))
    assert {p.prompt: p.max_tokens for p in prompts} == {"Hi there": 10, "Why?": 1000}
    assert len(prompts) == 4 and prompts[0].prompt_len is None
    capped = sharegpt_prompts(WorkloadConfig(dataset="sharegpt", dataset_path=str(path), num_prompts=2,
                                             output_len="64"))
    assert {p.prompt: p.max_tokens for p in capped} == {"Hi there": 10, "Why?": 64}


# ---- against a fake OpenAI server: hand-written SSE lines ---------------------------------------
LONG_PROMPT = 100_000  # token ids in the first chunk: ~750 KB on one line, past aiohttp's 512 KiB
DONE_LINE = b"data: [DONE]\n\n"


def sse(obj: dict) -> bytes:
    return b"data: " + json.dumps(obj).encode() + b"\n\n"


def text_chunk(ids: list[int], **extra) -> bytes:
    return sse({"id": "cmpl-fake", "object": "text_completion",
                "choices": [{"index": 0, "text": "t", "token_ids": ids, **extra}]})


def delta_chunk(**delta) -> bytes:
    return sse({"id": "chatcmpl-fake", "object": "chat.completion.chunk", "choices": [{"index": 0, "delta": delta}]})


def usage_chunk(completion_tokens: int, prompt_tokens: int = 4) -> bytes:
    return sse({"id": "cmpl-fake", "choices": [],
                "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens}})


# prompt → what the fake server streams for it; None: it closes the connection there, mid-line
REPLIES = {
    "plain": [text_chunk([5]), text_chunk([6, 7]), usage_chunk(3), DONE_LINE],
    "long": [text_chunk([5], prompt_token_ids=list(range(1000, 1000 + LONG_PROMPT))), text_chunk([6]),
             text_chunk([7]), usage_chunk(3, LONG_PROMPT), DONE_LINE],
    "cut": [text_chunk([5]), b'data: {"id": "cmpl-fake", "choi', None],
    "garbled": [text_chunk([5]), b"data: [1, 2]\n\n", DONE_LINE],  # JSON, but not an object
    # a reasoning model that spends max_tokens thinking (content null); this server ignores return_token_ids
    "reasoning": [delta_chunk(role="assistant", content=None), delta_chunk(content=None, reasoning_content="hm"),
                  delta_chunk(content=None, reasoning="so"), delta_chunk(content=None, reasoning_content="..."),
                  usage_chunk(3), DONE_LINE],
    "silent": [delta_chunk(role="assistant", content=""), usage_chunk(5), DONE_LINE],
}


async def fake_openai(request: web.Request) -> web.StreamResponse:
    body = await request.json()
    prompt = body["prompt"] if "prompt" in body else body["messages"][-1]["content"]
    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await resp.prepare(request)
    for piece in REPLIES[prompt]:
        if piece is None:
            request.transport.close()
            return resp
        await resp.write(piece)
    return resp


def run_fake(prompts: list[str], endpoint: str = "completions") -> tuple[list[RequestResult], float]:
    """`bench serve`'s sending half against the fake server, every prompt at once."""
    async def run():
        async with fake_server({("POST", "/v1/completions"): fake_openai,
                                ("POST", "/v1/chat/completions"): fake_openai}) as url:
            cfg = ServeConfig(base_url=url, endpoint=endpoint, model="fake", progress=False)
            _, results, duration = await send_all(cfg, [Prompt(p, max_tokens=3) for p in prompts],
                                                  [0.0] * len(prompts))
        return results, duration

    return asyncio.run(run())


def test_a_first_chunk_longer_than_aiohttps_line_limit_is_read():
    (long, plain), _ = run_fake(["long", "plain"])
    assert long.ok, long.error
    assert long.output_tokens == 3 and long.prompt_tokens == LONG_PROMPT and [n for _, n in long.chunks] == [1, 1, 1]
    assert plain.ok and plain.output_tokens == 3 and plain.request_id == "cmpl-fake"


def test_a_broken_stream_fails_its_own_request_only():
    results, duration = run_fake(["plain", "cut", "garbled", "plain"])
    assert [r.ok for r in results] == [True, False, False, True], [r.error for r in results]
    assert results[1].error and "AttributeError" in results[2].error
    s = summarize(results, duration, {})
    assert (s["completed"], s["failed"], s["total_output_tokens"]) == (2, 2, 6)


def test_a_reasoning_stream_counts_its_tokens():
    (reasoning,), duration = run_fake(["reasoning"], endpoint="chat")
    assert reasoning.ok and len(reasoning.chunks) == 3 and reasoning.output_tokens == 3
    s = summarize([reasoning], duration, {})
    assert s["completed"] == 1 and s["ttft_ms"]["p50"] > 0 and len(latencies(reasoning).itls) == 2


def test_a_stream_whose_usage_counts_tokens_that_never_arrived_fails():
    (plain, silent), duration = run_fake(["plain", "silent"], endpoint="chat")
    assert not silent.ok and silent.error.startswith("no token arrived"), silent
    s = summarize([plain, silent], duration, {})
    assert (s["completed"], s["failed"]) == (1, 1)


def test_a_wildcard_api_host_is_reached_on_loopback():
    assert api_base_url(ApiConfig(host="0.0.0.0", port=8001)) == "http://127.0.0.1:8001"
    assert api_base_url(ApiConfig(host="::", port=8001)) == "http://127.0.0.1:8001"
    assert api_base_url(ApiConfig(host="10.0.0.2", port=80)) == "http://10.0.0.2:80"
    assert api_base_url(ApiConfig(host="::1", port=80)) == "http://[::1]:80"


# ---- TTFT by stage ------------------------------------------------------------------------------
# Reserve and Prefill leave the scheduler together: decode's RESERVED may come after PREFILLING
PD_TRACE = {"arrival": 10.000, "events": [
    [10.001, "QUEUED", "api", ""], [10.002, "QUEUED", "scheduler", "reserve on decode-0, prefill on prefill-0"],
    [10.004, "PREFILLING", "prefill-0", ""], [10.005, "RESERVED", "decode-0", "2 blocks"],
    [10.006, "TRANSFERRING", "transfer", "layers 1-2/2 sent"], [10.010, "TRANSFERRING", "prefill-0", "prefill end"],
    [10.020, "DECODING", "decode-0", ""], [10.050, "FINISHED", "decode-0", "length, 8 tokens"]]}


def path_sum(split: dict) -> float:
    return sum(v for stage, v in split.items() if stage in PATH_STAGES)


def test_the_reservation_is_off_the_path_to_the_first_token():
    assert trace_milestones(PD_TRACE) == {"arrival": 10.000, "queued": 10.001, "dispatched": 10.002,
                                          "reserved": 10.005, "prefilling": 10.004, "prefill_end": 10.010}
    split = ttft_split(PD_TRACE, sent_at=9.999, first_token_at=10.012)
    assert split == pytest.approx({"client→api": 0.001, "api→scheduler": 0.001, "scheduler queue": 0.001,
                                   "prefill queue": 0.002, "prefill compute": 0.006,
                                   "first-token delivery": 0.002, "reservation": 0.003})
    assert path_sum(split) == pytest.approx(10.012 - 9.999)


def test_a_refused_request_waits_from_its_first_dispatch():
    trace = {"arrival": 1.0, "events": [
        [1.001, "QUEUED", "api", ""], [1.003, "QUEUED", "scheduler", "reserve on decode-0, prefill on prefill-0"],
        [1.004, "PREFILLING", "prefill-0", ""], [1.005, "QUEUED", "decode-0", "refused: 2 blocks free"],
        [1.008, "TRANSFERRING", "prefill-0", "prefill end"],
        [1.009, "QUEUED", "scheduler", "reserve on decode-1, prefill on prefill-0 (again)"],
        [1.010, "RESERVED", "decode-1", "2 blocks"]]}
    split = ttft_split(trace, sent_at=1.0, first_token_at=1.012)
    assert split == pytest.approx({"client→api": 0.0, "api→scheduler": 0.001, "scheduler queue": 0.002,
                                   "prefill queue": 0.001, "prefill compute": 0.004,
                                   "first-token delivery": 0.004, "reservation": 0.007})
    assert path_sum(split) == pytest.approx(0.012)


def test_requests_run_whole_on_one_engine_have_no_reservation():
    local = {"arrival": 5.0, "events": [
        [5.001, "QUEUED", "api", ""], [5.050, "QUEUED", "scheduler", "prefill on decode-0 itself (9 tokens <= 128)"],
        [5.060, "PREFILLING", "decode-0", ""], [5.080, "DECODING", "decode-0", ""]]}
    split = ttft_split(local, sent_at=4.999, first_token_at=5.081)
    assert "reservation" not in split and path_sum(split) == pytest.approx(0.082)
    assert split["scheduler queue"] == pytest.approx(0.049) and split["prefill queue"] == pytest.approx(0.010)
    assert split["prefill compute"] == pytest.approx(0.020)
    mixed = {"arrival": 5.0, "events": [[5.001, "QUEUED", "api", ""], [5.010, "PREFILLING", "mixed-0", ""],
                                        [5.030, "DECODING", "mixed-0", ""]]}  # sent on arrival: no dispatch
    split = ttft_split(mixed, sent_at=4.999, first_token_at=5.031)
    assert split["scheduler queue"] == 0.0 and split["prefill queue"] == pytest.approx(0.009)
    assert scheduler_request_id("chatcmpl-ab12") == "cmpl-ab12" == scheduler_request_id("cmpl-ab12")


def test_the_printed_split_sets_the_reservation_apart():
    stages = {stage: {"requests": 1, "mean": 1.0, "p50": 1.0, "p90": 1.0} for stage in STAGES}
    lines = format_split({"traced": 1, "untraced": [], "stages_ms": stages})
    apart = next(i for i, line in enumerate(lines) if line.startswith("off the path"))
    assert [line.split()[0] for line in lines[apart + 1:]] == ["reservation"]
    assert all(not line.startswith("reservation") for line in lines[:apart])


# ---- against launched pipelines ---------------------------------------------------------------
@pytest.fixture(scope="module")
def pipeline(model_dir):
    with launched(make_launch_config(model_dir(MODEL), ["prefill", "decode"])) as launcher:
        yield launcher


@pytest.fixture(scope="module")
def vocab(model_dir):
    return Tokenizer(model_dir(MODEL)).vocab_size


def small_workload(vocab: int, num_prompts: int = 12, seed: int = 3) -> WorkloadConfig:
    return WorkloadConfig(num_prompts=num_prompts, input_len="4:40", output_len="4:12", vocab_size=vocab,
                          ignore_eos=True, seed=seed)


def assert_accounted(res: dict, num_prompts: int) -> None:
    s = res["summary"]
    assert s["completed"] + s["failed"] == num_prompts == len(res["requests"])
    ids = [r["request_id"] for r in res["requests"]]
    assert len(set(ids)) == num_prompts and all(ids)
    assert sorted(r["index"] for r in res["requests"]) == list(range(num_prompts))


def test_serve_accounts_for_every_request_and_splits_ttft(pipeline, vocab):
    cfg = ServeConfig(workload=small_workload(vocab), load=LoadConfig(request_rate=20.0),
                      base_url=f"http://127.0.0.1:{pipeline.cfg.api.port}", run_dir=str(pipeline.paths.run_dir),
                      slo=("ttft:60000", "tpot:60000"), progress=False)
    res = run_serve(cfg)
    s = res["summary"]
    assert_accounted(res, 12)
    assert s["failed"] == 0, [r["error"] for r in res["requests"]]
    for key in ("ttft_ms", "tpot_ms", "itl_ms", "e2e_ms"):
        assert 0 <= s[key]["p50"] <= s[key]["p90"] <= s[key]["p99"], key
    for r in res["requests"]:
        assert r["output_tokens"] == r["max_tokens"] and len(r["itl_ms"]) == r["output_tokens"] - 1
        assert 4 <= r["prompt_tokens"] <= 40 and r["ttft_ms"] <= r["e2e_ms"]
    assert s["total_output_tokens"] == sum(r["max_tokens"] for r in res["requests"])
    assert s["request_throughput"] == pytest.approx(12 / s["duration_s"])
    assert s["output_throughput"] == pytest.approx(s["total_output_tokens"] / s["duration_s"])
    assert s["goodput"]["attainment"] == 1.0
    split = res["ttft_split"]
    assert split["traced"] == 12 and not split["untraced"]
    for r in res["requests"]:
        parts = r["ttft_split_ms"]
        assert set(parts) == set(STAGES)  # every prompt goes to the prefill instance: decode reserves
        assert all(v >= 0 for v in parts.values())
        assert sum(parts[stage] for stage in PATH_STAGES) == pytest.approx(r["ttft_ms"], abs=0.01)
    assert set(split["stages_ms"]) == set(STAGES)


def test_serve_from_the_command_line_writes_its_result(pipeline, vocab, tmp_path):
    out = tmp_path / "serve.json"
    proc = subprocess.run(
        [sys.executable, "-m", "pdpipe.bench", "serve", "--base-url", f"http://127.0.0.1:{pipeline.cfg.api.port}",
         "--num-prompts", "6", "--input-len", "8:16", "--output-len", "5", "--vocab-size", str(vocab),
         "--ignore-eos", "--max-concurrency", "2", "--slo", "ttft:60000", "--no-progress",
         "--run-dir", str(pipeline.paths.run_dir), "--result-file", str(out)],
        capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "Successful requests:" in proc.stdout and "TTFT by stage" in proc.stdout
    assert "off the path to the first token" in proc.stdout
    res = json.loads(out.read_text())
    assert_accounted(res, 6)
    assert res["config"]["load"]["max_concurrency"] == 2 and res["summary"]["total_output_tokens"] == 30
    assert res["model"] and res["ttft_split"]["traced"] == 6


def write_layout(path, name, model, roles, run_dir) -> str:
    instances = "".join(f'\n[[instances]]\nrole = "{role}"\n' for role in roles)
    path.write_text(f'name = "{name}"\nrun_dir = "{run_dir}"\nready_timeout = 120\n'
                    f'[engine]\nmodel = "{model}"\n[engine.cache]\nblock_size = 8\nnum_blocks = 128\n'
                    f'[api]\nport = {free_port()}\n{instances}')
    return str(path)


def test_compare_two_layouts_writes_goodput_and_plots(model_dir, vocab, tmp_path):
    model = model_dir(MODEL)
    configs = (write_layout(tmp_path / "pd.toml", "pd", model, ["prefill", "decode"], tmp_path / "run-pd"),
               write_layout(tmp_path / "mixed.toml", "mixed", model, ["mixed"], tmp_path / "run-mixed"))
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, "-m", "pdpipe.cli", "bench", "compare", *configs, "--request-rates", "5,20",
         "--num-prompts", "6", "--input-len", "4:40", "--output-len", "4:12", "--vocab-size", str(vocab),
         "--ignore-eos", "--seed", "3", "--slo", "ttft:60000", "--out", str(out)],
        capture_output=True, text=True, timeout=280)
    assert proc.returncode == 0, proc.stderr
    assert "goodput pd: 20 req/s" in proc.stdout and "goodput mixed: 20 req/s" in proc.stdout
    res = json.loads((out / "compare.json").read_text())
    assert set(res["layouts"]) == {"pd", "mixed"} and res["slo_ms"] == {"ttft": 60000.0}
    for layout in res["layouts"].values():
        assert [p["rate"] for p in layout["points"]] == [5.0, 20.0] and layout["goodput_rate"] == 20.0
        assert all(p["completed"] == 6 and p["ttft_ms"]["p50"] <= p["ttft_ms"]["p99"] for p in layout["points"])
        assert all(p["ttft_split_p50_ms"] for p in layout["points"])
    assert set(res["layouts"]["pd"]["points"][0]["ttft_split_p50_ms"]) <= set(STAGES)
    assert len(list((out / "serve").glob("*-rate*.json"))) == 4  # every request of every run, kept
    for name in ("ttft", "tpot", "itl", "attainment"):
        png = (out / f"{name}.png").read_bytes()
        assert png.startswith(PNG_MAGIC) and len(png) > 1000
    again = tmp_path / "replotted"
    assert bench_main(["plot", str(out / "compare.json"), "--out", str(again)]) == 0
    assert (again / "attainment.png").read_bytes().startswith(PNG_MAGIC)


# ---- multi-turn sessions -----------------------------------------------------------------------------
def test_sessions_are_seeded_and_share_system_prompts_in_turn():
    from pdpipe.bench.sessions import make_sessions

    cfg = WorkloadConfig(dataset="multi-turn", num_prompts=5, num_prefixes=2, prefix_len=30, input_len="4:9",
                         output_len="3", turns=3, vocab_size=100)
    sessions = make_sessions(cfg)
    assert make_sessions(cfg) == sessions and len(sessions) == 5
    assert sessions[0].system == sessions[2].system != sessions[1].system and len(sessions[0].system) == 30
    assert all(len(s.user_turns) == 3 and all(4 <= len(u) <= 9 for u in s.user_turns) for s in sessions)


def test_the_cache_oracles_reuse_earlier_prompts_and_replies():
    """Turn 2 of a session reuses turn 1's prompt and reply (full blocks, its last token computed); an
    LRU of 2 blocks keeps only the most recent."""
    from pdpipe.bench.client import RequestResult
    from pdpipe.bench.sessions import Turn, oracle_hits

    def turn(prompt: list[int], reply: list[int]) -> Turn:
        result = RequestResult(0, len(reply), len(prompt))
        result.token_ids = reply
        return Turn(0, 1, prompt, result)

    first = turn(list(range(10)), [50, 51, 52, 53, 54, 55])  # blocks of 4: prompt+reply hold 4 full blocks
    second = turn(list(range(10)) + [50, 51, 52, 53, 54, 55, 60], [70])  # 17 tokens: 4 blocks reusable
    other = turn([99] * 9, [1])
    assert oracle_hits([first, second, other], 4) == [0, 16, 0]
    assert oracle_hits([first, other, second], 4, capacity=2) == [0, 0, 0]  # `other` pushed the prefix out
    assert oracle_hits([first, second], 4, capacity=4) == [0, 16]


def test_multi_turn_sessions_against_a_launched_pipeline(pipeline, vocab):
    """Three sessions of three turns over a shared 64-token system prompt: later turns report the tokens the
    server reused (at least the system prompt's full blocks), never more than an infinite cache could."""
    cfg = ServeConfig(base_url=f"http://127.0.0.1:{pipeline.cfg.api.port}", run_dir=str(pipeline.paths.run_dir),
                      progress=False, workload=WorkloadConfig(
                          dataset="multi-turn", num_prompts=3, num_prefixes=1, prefix_len=64, input_len="8:12",
                          output_len="6", turns=3, think_time=0.0, vocab_size=vocab, ignore_eos=True))
    res = run_serve(cfg)
    assert res["summary"]["completed"] == 9 and res["summary"]["failed"] == 0
    turns = res["multi_turn"]["turns"]
    assert set(turns) == {"1", "2", "3", "all"} and turns["3"]["requests"] == 3
    for number in ("2", "3"):
        t = turns[number]
        assert t["cached_tokens"] >= 3 * 64 and t["cached_tokens"] <= t["oracle_infinite_tokens"]
        assert t["oracle_lru_tokens"] <= t["oracle_infinite_tokens"]
    assert res["multi_turn"]["cache_blocks"] > 0 and res["multi_turn"]["kv_blocks_sent"] >= 0
    assert "Multi-turn: by turn" in format_summary(res)


def test_a_mooncake_trace_shares_prefixes_where_its_hash_ids_do(tmp_path):
    from pdpipe.bench.datasets import MOONCAKE_BLOCK, mooncake_trace

    lines = [{"timestamp": 1000, "input_length": 1100, "output_length": 5, "hash_ids": [7, 8, 9]},
             {"timestamp": 1500, "input_length": 600, "output_length": 3, "hash_ids": [7, 10]},
             {"timestamp": 2600, "input_length": 1300, "output_length": 2, "hash_ids": [7, 8]}]
    path = tmp_path / "trace.jsonl"
    path.write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    cfg = WorkloadConfig(dataset="mooncake-trace", dataset_path=str(path), num_prompts=10, vocab_size=300)
    prompts, offsets = mooncake_trace(cfg)
    assert offsets == [0.0, 0.5, 1.6] and [p.max_tokens for p in prompts] == [5, 3, 2]
    assert [len(p.prompt) for p in prompts] == [1100, 600, 1300]
    a, b, c = (p.prompt for p in prompts)
    block = MOONCAKE_BLOCK
    assert a[:block] == b[:block] == c[:block] and a[block:2 * block] == c[block:2 * block]
    assert b[block:] != a[block:2 * block][:len(b) - block] and c[2 * block:] != a[2 * block:2 * block + 276]
    assert mooncake_trace(cfg)[0] == prompts  # seeded
    path.write_text('{"timestamp": 1, "input_length": 5}\n')
    with pytest.raises(ValueError, match=r"trace.jsonl:1 is not a Mooncake trace line"):
        mooncake_trace(cfg)
