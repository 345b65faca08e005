"""Faults with real processes: `kill -9` one process of a running launch while streams run. Each stream
either completes or ends with an error event and `[DONE]`; streams that did not need the dead process
complete; the process is restarted and serves again; new requests succeed; nothing is left allocated.
Killing the launcher itself leaves no process behind."""
import json
import os
import signal
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path

import httpx
import pytest
from pipeline_launch import launched, leak_free, make_launch_config, snapshot, wait_until

from pdpipe.inspect import control
from pdpipe.launcher import Launcher

MODEL = "llama"
MAX_TOKENS = 120


@pytest.fixture(scope="module")
def pipeline(model_dir):
    cfg = make_launch_config(model_dir(MODEL), ["prefill", "decode", "decode"], num_blocks=512)
    with launched(cfg) as launcher:
        yield launcher


def stream(base: str, prompt: str, out: dict, max_tokens: int = MAX_TOKENS) -> None:
    """One streamed completion; records its id, tokens, error event and whether [DONE] came."""
    body = {"model": MODEL, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True,
            "stream": True, "stream_options": {"include_usage": True}}
    out.update(id=None, tokens=None, error=None, done=False, cut=None)
    try:
        with httpx.stream("POST", base + "/v1/completions", json=body, timeout=120) as resp:
            for line in resp.iter_lines():
                if not line.startswith("data: "):
                    continue
                if line == "data: [DONE]":
                    out["done"] = True
                    break
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    out["error"] = chunk["error"]["message"]
                    continue
                out["id"] = chunk["id"]
                if chunk.get("usage"):
                    out["tokens"] = chunk["usage"]["completion_tokens"]
    except httpx.HTTPError as exc:  # the connection itself was cut
        out["cut"] = repr(exc)


def start_streams(launcher, n: int, first: int, max_tokens: int = MAX_TOKENS
                  ) -> tuple[list[threading.Thread], list[dict]]:
    base = f"http://127.0.0.1:{launcher.cfg.api.port}"
    results = [{} for _ in range(n)]
    threads = [threading.Thread(target=stream, args=(base, f"story number {first + i} begins", results[i],
                                                     max_tokens), daemon=True) for i in range(n)]
    for t in threads:
        t.start()
    return threads, results


def child(launcher, name: str):
    return next(c for c in launcher.children if c.name == name)


def decode_of(launcher, rid: str) -> str:
    trace = control(str(launcher.paths.run_dir), "trace", request_id=rid)
    return next((e[2] for e in trace["events"] if e[1] == "DECODING"), "")


def serves(launcher) -> bool:
    base = f"http://127.0.0.1:{launcher.cfg.api.port}"
    body = {"model": MODEL, "prompt": "hello again", "max_tokens": 4, "temperature": 0, "ignore_eos": True}
    try:
        resp = httpx.post(base + "/v1/completions", json=body, timeout=60)
    except httpx.TransportError:  # the front-end itself is down
        return False
    return resp.status_code == 200 and resp.json()["usage"]["completion_tokens"] == 4


def kill_while_streaming(launcher, name: str, when: str, pause: str = "") -> list[dict]:
    """Starts 4 streams and, once they decode, 4 more; waits until `when` holds in the snapshot,
    kill -9s `name`, and waits for every stream to end; then the process must be back and the launch
    serving and leak-free."""
    before = child(launcher, name).restarts
    threads, results = start_streams(launcher, 4, 0)
    wait_until(lambda: sum(i["requests"].get("DECODING", 0) for i in snapshot(launcher)["instances"].values()) >= 2,
               what="streams decoding")
    if pause:  # holds the next requests where `when` can see them
        control(str(launcher.paths.run_dir), "pause", instance=pause)
    more, late = start_streams(launcher, 4, 4)
    threads, results = threads + more, results + late
    wait_until(lambda: eval_when(snapshot(launcher), when), what=when)
    os.kill(child(launcher, name).popen.pid, signal.SIGKILL)
    killed_at = time.monotonic()
    if name.startswith(("prefill", "decode")):  # while it restarts the service says it is degraded
        health = wait_until(lambda: (h := _health(launcher))["status"] == "degraded" and h, what="degraded")
        assert health["down"] == [name]
    wait_until(lambda: serves(launcher), timeout=60, what="a new request served")
    served_at = time.monotonic()
    wait_until(lambda: child(launcher, name).restarts == before + 1 and child(launcher, name).ready,
               timeout=60, what=f"{name} restarted")
    for t in threads:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in threads)
    wait_until(lambda: not snapshot(launcher).get("down"), timeout=30, what=f"{name} back in routing")
    assert serves(launcher)
    print(f"\n{name}: a new request served {served_at - killed_at:.2f} s after the kill; "
          f"the process ready again after {child(launcher, name).ready_at - killed_at:.2f} s")
    assert wait_until(lambda: leak_free(launcher), timeout=30, what="every block free")
    return results


def eval_when(snap: dict, when: str) -> bool:
    instance, state = when.split(":")
    return snap["instances"].get(instance, {}).get("requests", {}).get(state, 0) >= 1


def ended_cleanly(r: dict) -> bool:
    return r["cut"] is None and r["done"] and (r["error"] is not None or r["tokens"] == MAX_TOKENS)


def test_a_dead_decode_engine_fails_only_its_streams_and_comes_back(pipeline):
    results = kill_while_streaming(pipeline, "decode-0", "decode-0:DECODING")
    assert all(ended_cleanly(r) for r in results), results
    on = {i: decode_of(pipeline, r["id"]) for i, r in enumerate(results) if r["id"]}
    survivors = [results[i] for i, d in on.items() if d == "decode-1"]
    assert survivors and all(r["tokens"] == MAX_TOKENS and r["error"] is None for r in survivors)
    failed = [r for r in results if r["error"]]
    assert failed and all("decode-0" in r["error"] for r in failed)
    # the restarted engine takes requests again
    wait_until(lambda: serves(pipeline) and snapshot(pipeline)["instances"]["decode-0"]["routed"] > 0,
               what="decode-0 routed to")


@pytest.mark.parametrize("name,when,pause", [("prefill-0", "prefill-0:RESERVED", "prefill-0"),
                                             ("transfer", "decode-0:DECODING", ""),
                                             ("scheduler", "decode-0:DECODING", "")])
def test_any_dead_process_ends_streams_cleanly_and_comes_back(pipeline, name, when, pause):
    results = kill_while_streaming(pipeline, name, when, pause)
    assert all(ended_cleanly(r) for r in results), results
    if name == "scheduler":  # what it knew is lost: its open streams end with an error (those that
        # reached the front-end after its death wait for the new one and complete)
        assert any(r["error"] for r in results)
        assert all("scheduler died" in r["error"] if r["error"] else r["tokens"] == MAX_TOKENS for r in results)
    else:  # requests already decoding did not need it
        assert any(r["tokens"] == MAX_TOKENS and r["error"] is None for r in results), results


def test_a_dead_api_is_restarted_and_its_requests_freed(pipeline):
    results = kill_while_streaming(pipeline, "api", "decode-0:DECODING")
    assert all(r["cut"] or r["done"] for r in results)  # its own connections cannot end any other way
    assert any(r["cut"] for r in results)


def test_queues_and_trace_find_the_running_launch_without_torch(pipeline):
    """`pdpipe queues` and `pdpipe trace` with no flags find the launch running on this machine, and the
    command line imports no torch (it took seconds a call)."""
    code = ("import sys; from pdpipe.cli import main; rc = main(sys.argv[1:]); "
            "assert 'torch' not in sys.modules, 'torch imported'; sys.exit(rc)")
    rid = completed_request_id(pipeline)
    queues = subprocess.run([sys.executable, "-c", code, "queues"], capture_output=True, text=True, timeout=60)
    assert queues.returncode == 0, queues.stderr
    assert {"prefill-0", "decode-0", "decode-1"} <= {line.split()[0] for line in queues.stdout.splitlines()[1:]}
    trace = subprocess.run([sys.executable, "-c", code, "trace", rid], capture_output=True, text=True, timeout=60)
    assert trace.returncode == 0 and trace.stdout.startswith(f"request {rid}") and "FINISHED" in trace.stdout, \
        trace.stderr


def completed_request_id(launcher) -> str:
    resp = httpx.post(f"http://127.0.0.1:{launcher.cfg.api.port}/v1/completions",
                      json={"model": MODEL, "prompt": "once", "max_tokens": 3}, timeout=60)
    assert resp.status_code == 200
    return resp.json()["id"]


def test_killing_the_launcher_leaves_no_process_and_the_next_launch_sweeps_its_pools(tmp_path, model_dir):
    from pipeline_launch import free_port

    from pdpipe.wire import RunPaths, sweep_ended_runs

    config = tmp_path / "run.toml"
    config.write_text(f'name = "orphans"\nrun_dir = "{tmp_path / "run"}"\n[engine]\nmodel = "{model_dir(MODEL)}"\n'
                      f'[engine.cache]\nnum_blocks = 64\nblock_size = 8\n[api]\nport = {free_port()}\n'
                      '[[instances]]\nrole = "prefill"\n[[instances]]\nrole = "decode"\n')
    launcher = subprocess.Popen([sys.executable, "-m", "pdpipe.cli", "launch", str(config)],
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        for line in launcher.stdout:
            if "ready" in line:
                break
        children = [int(p) for p in os.listdir("/proc") if p.isdigit() and _parent(int(p)) == launcher.pid]
        assert len(children) >= 5
        paths = RunPaths(tmp_path / "run")
        assert sorted(p.name.split("-", 2)[2] for p in paths.pool_files()) == ["decode-0.kv", "prefill-0.kv"]
        launcher.kill()
        launcher.wait()
        wait_until(lambda: not any(_alive(pid) for pid in children), timeout=90, what="the children to exit")
        sweep_ended_runs()  # as the next launch on this machine does first: nobody was left to remove them
        assert paths.pool_files() == []
    finally:
        if launcher.poll() is None:
            launcher.kill()


def _parent(pid: int) -> int:
    try:
        return int(open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return -1


def _alive(pid: int) -> bool:
    try:
        state = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def test_each_engine_process_runs_its_share_of_the_cores(pipeline):
    """The launcher divides the cores among the engine processes (torch's default would give each of
    them every core); the others run one thread. Each torch process logs what torch took."""
    from pdpipe.launcher import physical_cores

    cores = physical_cores(os.sched_getaffinity(0))
    for name in ("prefill-0", "decode-0", "decode-1", "transfer"):
        expected = max(1, cores // 3) if name != "transfer" else 1
        assert f"{name}: {expected} torch threads" in pipeline.paths.log(name).read_text()


def test_a_second_launch_over_a_live_run_or_a_taken_port_is_refused_in_one_line(pipeline, model_dir):
    from pdpipe.launcher import Launcher, LaunchError

    with pytest.raises(LaunchError, match=r"a launch named 'test' is running \(launcher pid \d+"):
        Launcher(pipeline.cfg).start()
    assert serves(pipeline)  # nothing of the running launch was touched
    cfg = make_launch_config(model_dir(MODEL), ["mixed"])
    cfg = replace(cfg, api=replace(cfg.api, port=pipeline.cfg.api.port))
    with pytest.raises(LaunchError, match=f"api.port {pipeline.cfg.api.port} on .* is taken"):
        Launcher(cfg).start()



def test_overload_is_refused_at_once_with_429_and_every_accepted_request_completes(model_dir):
    """400 concurrent 1000-token prompts against a bound of 16 waiting for their first token: the excess
    is refused at once (429, Retry-After), every accepted request completes, and the processes' memory
    does not grow with the burst."""
    from concurrent.futures import ThreadPoolExecutor

    cfg = make_launch_config(model_dir(MODEL), ["prefill", "decode"], num_blocks=512)
    cfg = replace(cfg, api=replace(cfg.api, max_waiting=16))
    with launched(cfg) as launcher:
        base = f"http://127.0.0.1:{launcher.cfg.api.port}"
        # 64 tokens: a served request waits for compute that a refused one never sees (8 were served about as
        # fast as 400 clients on 2 cores get their refusals once the engines no longer fought over the cores)
        body = {"model": MODEL, "prompt": [1 + i % 400 for i in range(1000)], "max_tokens": 64, "ignore_eos": True,
                "temperature": 0}
        assert serves(launcher)

        def one(_):
            start = time.monotonic()
            r = httpx.post(base + "/v1/completions", json=body, timeout=300)
            return r.status_code, r.headers.get("retry-after"), r.json(), time.monotonic() - start

        with ThreadPoolExecutor(max_workers=16) as pool:  # the batches the burst brings, once: the allocators'
            assert {a[0] for a in pool.map(one, range(16))} == {200}  # caches for them are not what is measured
        assert wait_until(lambda: leak_free(launcher), what="every block free")
        before = {c.name: _rss_mb(c.popen.pid) for c in launcher.children}
        with ThreadPoolExecutor(max_workers=400) as pool:
            answers = list(pool.map(one, range(400)))
        refused = [a for a in answers if a[0] == 429]
        served = [a for a in answers if a[0] == 200]
        assert len(refused) + len(served) == 400 and refused and len(served) >= 16
        assert all(a[1] == "1" and a[2]["error"]["code"] == "overloaded" for a in refused)
        assert all(a[2]["usage"]["completion_tokens"] == 64 for a in served)
        # refused at once: without waiting for any compute (400 clients on this machine's cores still queue)
        waits = {"refused": statistics.median(a[3] for a in refused), "served": statistics.median(a[3] for a in served)}
        assert waits["refused"] < waits["served"] / 2, waits
        assert wait_until(lambda: leak_free(launcher), what="every block free")
        grown = {c.name: _rss_mb(c.popen.pid) - before[c.name] for c in launcher.children}
        print(f"\nRSS growth over the burst (MiB): {grown}; {len(served)} served, {len(refused)} refused; "
              f"median seconds to the answer: {waits}")
        assert max(grown.values()) < 150, grown  # MiB: what 400 queued prompts would cost is not kept


def _rss_mb(pid: int) -> float:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmRSS"))) / 1024


@pytest.mark.parametrize("drain_s", [120.0, 0.5])
def test_sigterm_drains_streams_in_flight_then_ends_the_rest_cleanly(model_dir, drain_s):
    """SIGTERM with streams running: new requests get 503 at once; the streams finish within the grace
    period, or end with an error event and [DONE] when it is short (600 tokens take about 0.6 s here, so
    the short period's streams ask for 3,000: they cannot end before it does)."""
    max_tokens = 600 if drain_s > 1 else 3000
    cfg = make_launch_config(model_dir(MODEL), ["prefill", "decode"], num_blocks=1024)
    cfg = replace(cfg, api=replace(cfg.api, drain_s=drain_s))
    launcher = Launcher(cfg)
    launcher.start()
    try:
        threads, results = start_streams(launcher, 4, 0, max_tokens)
        wait_until(lambda: snapshot(launcher)["states"]["DECODING"] >= 4, what="streams decoding")
        stopper = threading.Thread(target=launcher.stop)
        stopper.start()
        base = f"http://127.0.0.1:{cfg.api.port}"
        late = wait_until(lambda: (status := _status(base)) != 200 and status, timeout=10, what="a refusal")
        assert late == 503
        for t in threads:
            t.join(timeout=180)
        stopper.join(timeout=180)
        assert all(r["cut"] is None and r["done"] for r in results), results
        if drain_s > 1:
            assert all(r["tokens"] == max_tokens and r["error"] is None for r in results), results
        else:
            assert all(r["error"] and "shutting down" in r["error"] for r in results), results
        assert all(c.popen.poll() is not None for c in launcher.children)
    finally:
        launcher.stop()


def _status(base: str) -> int | None:
    try:
        return httpx.post(base + "/v1/completions", json={"model": MODEL, "prompt": "x", "max_tokens": 2},
                          timeout=5).status_code
    except httpx.TransportError:
        return None


def _health(launcher) -> dict:
    return httpx.get(f"http://127.0.0.1:{launcher.cfg.api.port}/health", timeout=10).json()


@pytest.mark.parametrize("frozen", ["decode-0", "decode-0.rank1"])
def test_a_frozen_decode_engine_is_routed_around_within_seconds_and_rejoins(model_dir, frozen):
    """SIGSTOP: the process lives, so no restart; its heartbeat stops, its streams end with an error
    within seconds, new requests go to the other decode instance; SIGCONT: it serves again. The same
    when the frozen process is the second rank of a tensor-parallel decode instance (its rank 0 waits
    in a collective, its own heartbeat going on)."""
    from pdpipe.config import DeadlineConfig, InstanceConfig

    tp = 2 if frozen.endswith("rank1") else 1
    cfg = make_launch_config(model_dir(MODEL), [], num_blocks=512, deadlines=DeadlineConfig(heartbeat=2.0),
                             instances=(InstanceConfig("prefill"), InstanceConfig("decode", tp=tp),
                                        InstanceConfig("decode")))
    with launched(cfg) as launcher:
        threads, results = start_streams(launcher, 6, 0)
        wait_until(lambda: eval_when(snapshot(launcher), "decode-0:DECODING"), what="decode-0 decoding")
        pid = child(launcher, frozen).popen.pid
        os.kill(pid, signal.SIGSTOP)
        frozen_at = time.monotonic()
        try:
            health = wait_until(lambda: (h := _health(launcher))["status"] == "degraded" and h, what="degraded")
            routed_around = time.monotonic() - frozen_at
            assert health["down"] == ["decode-0"]
            assert serves(launcher)
        finally:
            os.kill(pid, signal.SIGCONT)
        for t in threads:
            t.join(timeout=120)
        assert all(ended_cleanly(r) for r in results), results
        failed = [r for r in results if r["error"]]
        assert failed and all("decode-0 stopped reporting" in r["error"] for r in failed)
        assert any(r["error"] is None for r in results)
        wait_until(lambda: _health(launcher)["status"] == "ok", what="decode-0 back")
        print(f"\nfrozen {frozen} routed around after {routed_around:.2f} s (heartbeat deadline 2 s)")
        assert child(launcher, "decode-0").restarts == 0 and child(launcher, frozen).restarts == 0
        assert wait_until(lambda: leak_free(launcher), timeout=30, what="every block free")



def test_health_is_503_while_the_only_decode_instance_is_frozen_or_dead(model_dir):
    """1P+1D: /health answers 200 only while a decode instance serves; frozen (SIGSTOP, past the
    heartbeat deadline) or killed, the launch serves nothing to the end and says so with 503 (a
    readiness probe must fail), and 200 again once it is back."""
    from pdpipe.config import DeadlineConfig

    cfg = make_launch_config(model_dir(MODEL), ["prefill", "decode"], deadlines=DeadlineConfig(heartbeat=2.0))
    url = f"http://127.0.0.1:{cfg.api.port}/health"

    def status(code: int):
        return lambda: (r := httpx.get(url, timeout=10)).status_code == code and r

    with launched(cfg) as launcher:
        # ready (a loaded machine may miss one 2 s heartbeat here: then it says 503 until the next)
        assert wait_until(status(200), what="200 once ready").json() == {"status": "ok"}
        pid = child(launcher, "decode-0").popen.pid
        os.kill(pid, signal.SIGSTOP)
        try:
            frozen = wait_until(status(503), what="503 while decode-0 is frozen")
            assert "decode-0" in frozen.json()["error"]["message"]
        finally:
            os.kill(pid, signal.SIGCONT)
        wait_until(status(200), what="200 once decode-0 beats again")
        os.kill(child(launcher, "decode-0").popen.pid, signal.SIGKILL)
        dead = wait_until(status(503), what="503 while decode-0 restarts")
        assert "decode-0" in dead.json()["error"]["message"]
        assert wait_until(status(200), timeout=60, what="200 once decode-0 is back").json() == {"status": "ok"}
