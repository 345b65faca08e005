"""Two machines (network namespaces joined by veth) serving through Redis: prefill on host A, decode on
host B, KV moved by Mooncake over TCP between the hosts' addresses; failures of host B and of Redis."""
import asyncio
import os
import shutil

import httpx
import openai
import pytest
from cluster_hosts import RedisServer, RemoteLauncher, machine_config, second_host
from conftest import make_llm, make_prompts
from pipeline_launch import snapshot, wait_until

from pdpipe.cluster import Registry
from pdpipe.config import load_launch_config
from pdpipe.launcher import Launcher
from pdpipe.messages import SamplingParams
from pdpipe.wire import sweep_ended_runs

MODEL = "llama"
pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="network namespaces need root")


def live_names(redis_url: str) -> set[str]:
    return set(Registry(redis_url, "default", 3.0).live_instances())


def decoded_elsewhere(launcher, names: set[str]):
    return names <= set(snapshot(launcher)["instances"])


def complete(port: int, prompt, max_tokens: int = 10, timeout: float = 60) -> httpx.Response:
    return httpx.post(f"http://127.0.0.1:{port}/v1/completions", timeout=timeout, json={
        "model": MODEL, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True,
        "return_token_ids": True})


@pytest.fixture
def hosts(model_dir, tmp_path):
    """A: Redis + front-end + prefill (and optionally more); B: the rest. Yields a small namespace."""
    with second_host() as (ns, addr_a, addr_b):
        redis_server = RedisServer(["127.0.0.1", addr_a]).start()
        started = []

        def launch(roles_a, roles_b, ttl=3.0, model=MODEL, routing=()):
            cfg_a = machine_config(tmp_path / "a.toml", model=str(model_dir(model)),
                                   redis_url=redis_server.url(addr_a), machine="a", host=addr_a, roles=roles_a,
                                   frontend=True, ttl=ttl, routing=routing)
            cfg_b = machine_config(tmp_path / "b.toml", model=str(model_dir(model)),
                                   redis_url=redis_server.url(addr_a), machine="b", host=addr_b, roles=roles_b,
                                   frontend=False, ttl=ttl, routing=routing)
            a = Launcher(load_launch_config(str(cfg_a)))
            a.start()
            started.append(a)
            b = RemoteLauncher(ns, cfg_b)
            started.append(b)
            kinds = [r.partition(":")[0] for r in roles_b]
            expected = {f"b-{r}-{i}" for r in set(kinds) for i in range(kinds.count(r))}
            wait_until(lambda: decoded_elsewhere(a, expected), what="host B's instances in the registry")
            return a, b

        class Hosts:
            pass

        h = Hosts()
        h.launch, h.redis, h.addr_a, h.addr_b = launch, redis_server, addr_a, addr_b
        try:
            yield h
        finally:
            for x in reversed(started):
                x.stop()
            sweep_ended_runs()  # a killed host B's pools, as the next launch would
            redis_server.remove()
            for machine in ("a", "b"):
                shutil.rmtree(f"/tmp/pdp-{machine}-{os.getpid()}", ignore_errors=True)


def test_prefill_on_a_decode_on_b_equals_single_machine(hosts, model_dir):
    a, b = hosts.launch(["prefill"], ["decode"])
    prompts = make_prompts(384, lengths=(1, 9, 30, 57), seed=21)
    expected = make_llm(model_dir(MODEL)).generate(
        prompts, SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True))
    port = a.cfg.api.port
    for p, e in zip(prompts, expected):
        resp = complete(port, p, 12)
        assert resp.status_code == 200, resp.text
        assert resp.json()["choices"][0]["token_ids"] == e.token_ids
    snap = snapshot(a)
    assert snap["instances"]["b-decode-0"]["machine"] == "b"
    registry = Registry(hosts.redis.url(hosts.addr_a), "default", 3.0)
    entry = wait_until(lambda: (e := registry.live_instances()["b-decode-0"]).num_blocks == 128 and e,
                       what="the load of b-decode-0 in its registry entry")
    assert (entry.role, entry.machine) == ("decode", "b")
    pool = Registry(hosts.redis.url(hosts.addr_a), "default", 3.0).pool("b-decode-0")
    assert pool.segment.startswith(hosts.addr_b + ":") and pool.shape[2] == 128
    # the transfer's figures come with its stats, five times a second
    assert wait_until(lambda: snapshot(a)["transfers"]["transfer-a"]["bytes_moved"] > 0,
                      what="the KV crossed from host A to host B")
    assert wait_until(lambda: all_free(a), what="all blocks free on both hosts")



def test_prefill_on_a_reads_the_history_decode_on_b_caches(hosts, model_dir):
    """A remote hit across machines. Turn 2 resends turn 1's prompt (40 tokens, 5 blocks of 8: prefill on A
    caches them) and reply (decoded on B, whose cache holds 6 blocks of prompt and reply): A's transfer
    reads the 6th block out of B's pool (Mooncake reads over TCP) into prefill's instead of it being
    computed, and sends B only the blocks it lacks. Tokens equal one machine's without any cache."""
    a, b = hosts.launch(["prefill"], ["decode"], routing=("cache_min_tokens = 8", "pull_min_tokens = 8"))
    first = make_prompts(384, lengths=(40,), seed=21)[0]
    llm = make_llm(model_dir(MODEL))
    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    reply = llm.generate([first], params)[0].token_ids
    second = first + reply + make_prompts(384, lengths=(9,), seed=22)[0]
    expected = llm.generate([second], params)[0].token_ids
    answers = []
    for prompt in (first, second):
        resp = complete(a.cfg.api.port, prompt, 12)
        assert resp.status_code == 200, resp.text
        answers.append((resp.json()["choices"][0]["token_ids"],
                        resp.json()["usage"]["prompt_tokens_details"]["cached_tokens"]))
    assert answers == [(reply, 0), (expected, 48)]
    transfer = wait_until(lambda: (t := snapshot(a)["transfers"]["transfer-a"])["blocks_pulled"] and t,
                          what="the pull counted in transfer-a's stats")
    assert transfer["blocks_pulled"] == 1 and transfer["blocks_sent"] == 5 + 2
    assert wait_until(lambda: all_free(a), what="all blocks free on both hosts")


def test_tensor_parallel_prefill_on_a_decode_on_b(hosts, model_dir):
    """Prefill of two ranks (gloo) on host A, decode of one on host B: each rank's pool is published,
    and each block's heads cross from the rank that holds them into B's pool (Mooncake over TCP);
    the completions equal one machine's, and every block of every rank is free after."""
    a, b = hosts.launch(["prefill:2"], ["decode"])
    prompts = make_prompts(384, lengths=(3, 30, 57), seed=22)
    expected = make_llm(model_dir(MODEL)).generate(
        prompts, SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True))
    registry = Registry(hosts.redis.url(hosts.addr_a), "default", 3.0)
    assert wait_until(lambda: registry.pool("a-prefill-0", 1) is not None, what="rank 1's pool published")
    for p, e in zip(prompts, expected):
        resp = complete(a.cfg.api.port, p, 8)
        assert resp.status_code == 200, resp.text
        assert resp.json()["choices"][0]["token_ids"] == e.token_ids
    assert wait_until(lambda: all_free(a), what="all blocks free on both hosts")


def test_data_parallel_prefill_on_a_decode_on_b(hosts, model_dir):
    """A MoE model, prefill of two data-parallel ranks on host A, decode of two on host B: each rank's
    pool is published as its own ("instance@rank"), and each request's KV crosses from the prefill rank
    that holds it into the decode rank that reserved it (Mooncake over TCP); concurrent requests spread
    over the ranks; the completions equal one machine's, every block free after."""
    from concurrent.futures import ThreadPoolExecutor

    a, b = hosts.launch(["prefill:2:dp"], ["decode:2:dp"], model="ernie4_5_moe")
    prompts = make_prompts(384, lengths=(3, 30, 57, 12), seed=23)
    expected = make_llm(model_dir("ernie4_5_moe")).generate(
        prompts, SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True))
    registry = Registry(hosts.redis.url(hosts.addr_a), "default", 3.0)
    assert wait_until(lambda: registry.pool("b-decode-0@1") is not None, what="decode rank 1's pool published")

    def answer(prompt):
        resp = httpx.post(f"http://127.0.0.1:{a.cfg.api.port}/v1/completions", timeout=60, json={
            "model": "ernie4_5_moe", "prompt": prompt, "max_tokens": 8, "temperature": 0, "ignore_eos": True,
            "return_token_ids": True})
        assert resp.status_code == 200, resp.text
        return resp.json()["choices"][0]["token_ids"]

    with ThreadPoolExecutor(4) as pool:
        assert list(pool.map(answer, prompts * 2)) == [e.token_ids for e in expected] * 2
    assert wait_until(lambda: all_free(a), what="all blocks free on both hosts")


def all_free(launcher) -> bool:
    snap = snapshot(launcher)
    if any(snap["states"].values()):
        return False
    return all(i["stats"] and i["stats"]["free_blocks"] == i["stats"]["num_blocks"]
               for i in snap["instances"].values())


def test_2p2d_across_hosts_under_concurrent_load(hosts, model_dir):
    a, b = hosts.launch(["prefill", "decode"], ["prefill", "decode"])
    prompts = make_prompts(384, lengths=[3, 17, 40, 8] * 4, seed=5)
    expected = [o.token_ids for o in make_llm(model_dir(MODEL)).generate(
        prompts, SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True))]

    async def run():
        client = openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{a.cfg.api.port}/v1", api_key="x", max_retries=0,
                                    timeout=120)
        return await asyncio.gather(*(client.completions.create(
            model=MODEL, prompt=p, max_tokens=10, temperature=0,
            extra_body={"ignore_eos": True, "return_token_ids": True}) for p in prompts))

    results = asyncio.run(run())
    assert [r.choices[0].model_extra["token_ids"] for r in results] == expected
    routed = {n: i["routed"] for n, i in snapshot(a)["instances"].items()}
    assert all(routed[n] > 0 for n in ("a-prefill-0", "b-prefill-0", "a-decode-0", "b-decode-0")), routed
    assert wait_until(lambda: all_free(a), what="all blocks free on both hosts")


def test_host_b_dies_requests_fail_cleanly_and_service_goes_on(hosts, model_dir):
    a, b = hosts.launch(["prefill", "decode"], ["decode"])
    port = a.cfg.api.port
    url = hosts.redis.url(hosts.addr_a)

    async def long_streams():
        client = openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x", max_retries=0, timeout=60)

        async def one(p):
            try:
                stream = await client.completions.create(model=MODEL, prompt=p, max_tokens=400, temperature=0,
                                                         stream=True, extra_body={"ignore_eos": True})
                async for chunk in stream:
                    if chunk.choices and chunk.choices[0].finish_reason:
                        return chunk.choices[0].finish_reason
                return "error"  # the stream ended with an error event
            except openai.APIError as exc:
                return f"error: {exc}"

        tasks = [asyncio.ensure_future(one(p)) for p in make_prompts(384, lengths=[5, 9, 13, 21], seed=8)]
        await asyncio.sleep(0)
        wait = asyncio.get_running_loop().run_in_executor(
            None, lambda: wait_until(lambda: snapshot(a)["instances"]["b-decode-0"]["requests"].get("DECODING"),
                                     what="a request decoding on host B"))
        await wait
        b.kill()
        return await asyncio.gather(*tasks)

    outcomes = asyncio.run(long_streams())
    assert wait_until(lambda: not any(n.startswith("b-") for n in live_names(url)), timeout=15,
                      what="host B gone from the registry")
    assert any(o.startswith("error") for o in outcomes), outcomes  # those on B failed, with a reason
    assert all(o in ("length",) or o.startswith("error") for o in outcomes)
    after = complete(port, make_prompts(384, lengths=(7,), seed=3)[0], 6)
    assert after.status_code == 200 and len(after.json()["choices"][0]["token_ids"]) == 6
    assert wait_until(lambda: all_free(a), what="the survivors' blocks all free")
    trace_states = snapshot(a)["ended"]
    assert trace_states.get("FAILED", 0) >= 1


def test_redis_down_gives_503_and_service_resumes(hosts):
    a, b = hosts.launch(["prefill"], ["decode"])
    port = a.cfg.api.port
    prompt = make_prompts(384, lengths=(6,), seed=4)[0]
    assert complete(port, prompt, 4).status_code == 200
    hosts.redis.stop()

    def probe(status):
        try:
            r = complete(port, prompt, 4, timeout=5)
        except httpx.TimeoutException:  # accepted just before the front-end saw Redis go: ends by deadline
            return None
        return r if r.status_code == status else None

    down = wait_until(lambda: probe(503), timeout=20, what="503 while Redis is down")
    err = down.json()["error"]
    assert "Redis" in err["message"] and err["code"] == "redis_unavailable"
    assert httpx.get(f"http://127.0.0.1:{port}/health").status_code == 503
    hosts.redis.start()
    back = wait_until(lambda: probe(200), timeout=40, what="service back after Redis returns")
    assert len(back.json()["choices"][0]["token_ids"]) == 4
