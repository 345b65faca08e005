"""Launched topologies under load, and the launcher's start-up and shutdown hygiene."""
import asyncio
import os
import signal
import subprocess
import sys
from pathlib import Path

import openai
import pytest
from conftest import make_llm, make_prompts
from pipeline_launch import free_port, launched, leak_free, make_launch_config, snapshot, wait_until

from pdpipe.launcher import Launcher, LaunchError, physical_cores
from pdpipe.messages import SamplingParams
from pdpipe.wire import RunPaths

MODEL = "llama"


async def stream_completion(client, prompt, max_tokens):
    stream = await client.completions.create(model=MODEL, prompt=prompt, max_tokens=max_tokens, temperature=0,
                                             stream=True, extra_body={"ignore_eos": True,
                                                                      "return_token_ids": True})
    tokens, finish = [], None
    async for chunk in stream:
        tokens += chunk.choices[0].model_extra["token_ids"]
        finish = chunk.choices[0].finish_reason or finish
    return tokens, finish


def colocated_greedy(model_dir, prompts, max_tokens) -> list[list[int]]:
    llm = make_llm(model_dir(MODEL))
    params = [SamplingParams(max_tokens=m, temperature=0.0, ignore_eos=True) for m in max_tokens]
    return [o.token_ids for o in llm.generate(prompts, params)]


def stream_all(port: int, prompts, max_tokens) -> list[tuple[list[int], str]]:
    """Every prompt streamed at once through the official async client: (tokens, finish) each."""
    async def run_all():
        client = openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0,
                                    timeout=120)
        return await asyncio.gather(*(stream_completion(client, p, m) for p, m in zip(prompts, max_tokens)))

    return asyncio.run(run_all())


def test_2p2d_under_32_concurrent_streams(model_dir):
    lengths = [1, 3, 8, 15, 17, 30, 44, 60] * 4
    prompts = make_prompts(384, lengths=lengths, seed=11)
    max_tokens = [4 + (i * 7) % 29 for i in range(len(prompts))]
    expected = colocated_greedy(model_dir, prompts, max_tokens)
    cfg = make_launch_config(model_dir(MODEL), ["prefill", "prefill", "decode", "decode"], num_blocks=96)
    with launched(cfg) as launcher:
        results = stream_all(cfg.api.port, prompts, max_tokens)
        for (tokens, finish), exp in zip(results, expected):
            assert tokens == exp and finish == "length"
        routed = {name: inst["routed"] for name, inst in snapshot(launcher)["instances"].items()}
        assert all(n > 0 for n in routed.values()), routed
        assert sum(routed[n] for n in ("prefill-0", "prefill-1")) == len(prompts)
        assert wait_until(lambda: leak_free(launcher), what="all blocks free")
        assert snapshot(launcher)["ended"] == {"FINISHED": len(prompts)}


def test_1p1d_conditional_with_a_small_decode_queues_and_never_preempts(model_dir):
    """Short prompts are computed on decode, long ones on prefill; decode has room for a few requests
    at a time, so the rest wait in the scheduler's admission queue (not in a retry loop), and decode,
    holding room for every admitted request's output, never preempts."""
    from pdpipe.config import InstanceConfig, RoutingConfig

    lengths = [2, 6, 12, 20, 33, 47, 58, 64] * 3
    prompts = make_prompts(384, lengths=lengths, seed=12)
    max_tokens = [6 + (i * 5) % 17 for i in range(len(prompts))]
    expected = colocated_greedy(model_dir, prompts, max_tokens)
    routing = RoutingConfig(local_prompt_tokens=16, local_step_tokens=16, local_on_backlog=True)
    cfg = make_launch_config(model_dir(MODEL), [], routing=routing,
                             instances=(InstanceConfig("prefill"), InstanceConfig("decode", num_blocks=24)))
    with launched(cfg) as launcher:
        results = stream_all(cfg.api.port, prompts, max_tokens)
        assert [tokens for tokens, _ in results] == expected
        assert wait_until(lambda: leak_free(launcher), what="all blocks free")
        snap = snapshot(launcher)
        assert snap["ended"] == {"FINISHED": len(prompts)}
        placed = snap["admission"]["prefill_decisions"]
        # the 9 short prompts on decode; of the long ones, the first goes to the idle prefill instance and
        # later ones to whichever is expected to finish them sooner
        assert placed["local"] >= 9 and placed["remote"] >= 1 and sum(placed.values()) == len(prompts)
        assert snap["instances"]["decode-0"]["stats"]["preemptions"] == 0


def test_mixed_topology_serves_the_same_tokens(model_dir):
    prompts = make_prompts(384, lengths=(5, 33), seed=2)
    expected = make_llm(model_dir(MODEL)).generate(prompts, SamplingParams(max_tokens=9, temperature=0.0,
                                                                           ignore_eos=True))
    with launched(make_launch_config(model_dir(MODEL), ["mixed"])) as launcher:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{launcher.cfg.api.port}/v1", api_key="none")
        for p, e in zip(prompts, expected):
            resp = client.completions.create(model=MODEL, prompt=p, max_tokens=9, temperature=0,
                                             extra_body={"ignore_eos": True, "return_token_ids": True})
            assert resp.choices[0].model_extra["token_ids"] == e.token_ids
        cores = physical_cores(os.sched_getaffinity(0))  # a lone engine takes every core (not the one this process has)
        assert f"mixed-0: {cores} torch threads" in launcher.paths.log("mixed-0").read_text()
        assert wait_until(lambda: leak_free(launcher), what="all blocks free")


def processes_of(run_dir: Path) -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmdline = (entry / "cmdline").read_bytes().decode(errors="replace")
            except OSError:
                continue
            if "pdpipe.process" in cmdline and str(run_dir) in cmdline:
                pids.append(int(entry.name))
    return pids


def test_launch_cli_and_sigint_leave_nothing_behind(model_dir, tmp_path):
    port = free_port()
    run_dir = Path("/tmp") / f"pdp-cli-{os.getpid()}"
    config = tmp_path / "pd.toml"
    config.write_text(f'name = "clitest"\nrun_dir = "{run_dir}"\n[engine]\nmodel = "{model_dir(MODEL)}"\n'
                      f'[engine.cache]\nnum_blocks = 64\n[api]\nport = {port}\napi_key = "sk-cli"\n'
                      '[[instances]]\nrole = "prefill"\n[[instances]]\nrole = "decode"\n')
    proc = subprocess.Popen([sys.executable, "-m", "pdpipe.cli", "launch", str(config)], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        lines = []
        for line in proc.stdout:
            lines.append(line)
            if line.startswith("  curl "):
                break
        curl = lines[-1].strip()
        assert curl.startswith(f"curl http://127.0.0.1:{port}/v1/completions"), "".join(lines)
        paths = RunPaths(run_dir)
        assert len(processes_of(run_dir)) == 5 and paths.pool_files() and paths.socket_files()
        out = subprocess.run(curl, shell=True, capture_output=True, text=True, timeout=60)
        assert '"finish_reason"' in out.stdout, out.stdout + out.stderr  # the line carries the key
        keyless = subprocess.run(curl.replace("-H 'Authorization: Bearer sk-cli'", ""), shell=True,
                                 capture_output=True, text=True, timeout=60)
        assert '"invalid_api_key"' in keyless.stdout, keyless.stdout + keyless.stderr
        assert (run_dir / "config.json").stat().st_mode & 0o077 == 0  # the key is the user's alone
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    assert processes_of(run_dir) == []
    assert paths.socket_files() == [] and paths.pool_files() == []
    assert list(run_dir.glob("*.sock")) == []


def test_a_process_that_fails_to_start_is_named_and_nothing_stays(model_dir, tmp_path):
    cfg = make_launch_config(model_dir(MODEL), ["prefill", "decode"])
    broken = tmp_path / "broken-model"
    broken.mkdir()
    (broken / "config.json").write_text('{"architectures": ["GPT2LMHeadModel"]}')
    from dataclasses import replace

    cfg = replace(cfg, engine=replace(cfg.engine, model=str(broken)))
    launcher = Launcher(cfg)
    with pytest.raises(LaunchError, match=r"process (prefill-0|decode-0|transfer|api) .* exited with code 1") as err:
        launcher.start()
    assert "GPT2LMHeadModel" in str(err.value) and "supported: LlamaForCausalLM" in str(err.value)
    assert processes_of(launcher.paths.run_dir) == []
    assert launcher.paths.socket_files() == [] and launcher.paths.pool_files() == []


def test_bad_launch_configs_name_the_field(tmp_path):
    from pdpipe.config import load_launch_config

    cases = {
        'nme = "x"': "nme: unknown setting",
        '[[instances]]\nrole = "prefil"': "instances.role: 'prefil'",
        '[[instances]]\nrole = "prefill"': "prefill and decode instances come together",
        '[api]\nport = 70000': "api.port: 70000",
        '[engine.cache]\nblock_size = 0': "block_size: must be >= 1",
        'name = ': "not valid TOML",
        '[[instances]]\ntp = 0': "instances.tp: 0",
        '[engine]\ndevice = "cuda"\n[[instances]]\ntp = 2\ngpus = [0]': "tp = 2, so it names 2 GPU ids",
        '[engine]\ncpu_threads = -2': "cpu_threads: must be >= 0, or -1",
    }
    for i, (text, message) in enumerate(cases.items()):
        path = tmp_path / f"c{i}.toml"
        path.write_text(text)
        with pytest.raises(ValueError, match=message):
            load_launch_config(str(path))


def test_the_launcher_divides_the_cores_among_the_engine_processes():
    """Each engine process (every rank) gets an equal share of the cores, at least one; the transfer,
    scheduler and front-end one each; a positive cpu_threads is every engine's, -1 sets nothing."""
    from dataclasses import replace

    from pdpipe.config import EngineConfig, InstanceConfig, LaunchConfig
    from pdpipe.launcher import thread_budget

    def budget(cores: int, *instances: InstanceConfig, cpu_threads: int = 0) -> dict[str, int]:
        return thread_budget(LaunchConfig(instances=instances, engine=EngineConfig(cpu_threads=cpu_threads)), cores)

    one_each = {"scheduler": 1, "transfer": 1, "api": 1}
    pd = (InstanceConfig("prefill"), InstanceConfig("decode"))
    assert budget(2, *pd) == {**one_each, "prefill-0": 1, "decode-0": 1}
    assert budget(16, *pd) == {**one_each, "prefill-0": 8, "decode-0": 8}
    assert budget(2, *pd, InstanceConfig("decode")) == {**one_each, "prefill-0": 1, "decode-0": 1, "decode-1": 1}
    assert budget(16, InstanceConfig("prefill"), InstanceConfig("decode", tp=2), InstanceConfig("decode")) == {
        **one_each, "prefill-0": 4, "decode-0": 4, "decode-0.rank1": 4, "decode-1": 4}
    assert budget(7, InstanceConfig("mixed"), InstanceConfig("mixed")) == {
        "scheduler": 1, "api": 1, "mixed-0": 3, "mixed-1": 3}
    assert budget(2, *pd, cpu_threads=3) == {**one_each, "prefill-0": 3, "decode-0": 3}
    assert budget(2, *pd, cpu_threads=-1) == {}
    cfg = LaunchConfig(instances=pd)
    launcher = Launcher(replace(cfg, engine=replace(cfg.engine, cpu_threads=2)))
    assert launcher.threads == {**one_each, "prefill-0": 2, "decode-0": 2}
    cpus = os.sched_getaffinity(0)  # the cores shared are physical ones (torch's default counts those)
    assert 1 <= physical_cores(cpus) <= len(cpus) and physical_cores({10**6, 10**6 + 1}) == 2  # unknown: CPUs


def test_example_launch_configs_parse():
    from pathlib import Path

    from pdpipe.config import load_launch_config

    configs = sorted(Path(__file__).parents[2].glob("launch/*.toml"))
    assert len(configs) >= 5
    for path in configs:
        cfg = load_launch_config(str(path))
        assert cfg.local_processes(), path


def test_a_busy_decode_sends_whole_requests_to_the_prefill_instance(model_dir):
    """routing.decode_busy_ms far below any real step: once decode has stepped, requests run whole on
    the prefill instance (prompt and output there), with the same tokens, and every block comes back."""
    from pdpipe.config import RoutingConfig

    prompts = make_prompts(384, lengths=[5, 17, 30, 44] * 3, seed=13)
    max_tokens = [5 + (i * 3) % 11 for i in range(len(prompts))]
    expected = colocated_greedy(model_dir, prompts, max_tokens)
    cfg = make_launch_config(model_dir(MODEL), ["prefill", "decode"],
                             routing=RoutingConfig(disaggregation="always", decode_busy_ms=0.001))
    with launched(cfg) as launcher:
        first = stream_all(cfg.api.port, prompts[:1], max_tokens[:1])  # decode steps: now it reports busy
        wait_until(lambda: (snapshot(launcher)["instances"]["decode-0"]["stats"] or {}).get("step_seconds"),
                   what="decode's step time in its stats")
        results = first + stream_all(cfg.api.port, prompts[1:], max_tokens[1:])
        assert [tokens for tokens, _ in results] == expected
        assert wait_until(lambda: leak_free(launcher), what="all blocks free")
        placed = snapshot(launcher)["admission"]["prefill_decisions"]
        assert placed == {"remote": 1, "whole": len(prompts) - 1}
