"""`pdpipe bench serve` (also `python -m pdpipe.bench.serve`): sends a workload to an OpenAI-compatible
server at a rate or concurrency, streams every reply, and reports per-request records, percentiles,
throughput and goodput; given the launch's run dir, each request's TTFT split by pipeline stage."""
from __future__ import annotations

import asyncio
import time
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

import aiohttp
import msgspec
from tqdm import tqdm

from pdpipe import envs

from .arrivals import arrival_offsets, dispatch
from .client import ROUTES, RequestResult, auth_headers, request_body, stream_request
from .config import ServeConfig, parse_slos, recorded_settings
from .datasets import Prompt, load_prompts, mooncake_trace
from .metrics import request_record, summarize
from .report import write_json
from .sessions import Session, by_turn, make_sessions, run_sessions
from .traces import fetch_traces, summarize_splits, ttft_split

if TYPE_CHECKING:
    from pdpipe.config import ApiConfig

DEFAULT_BASE_URL = "http://127.0.0.1:8000"


def api_base_url(api) -> str:
    """The URL that reaches a launch's front-end (its `api` section) from this machine: a wildcard
    bind address ("0.0.0.0", "::", "") is reached on 127.0.0.1."""
    host = "127.0.0.1" if api.host in ("0.0.0.0", "::", "") else api.host
    return f"http://[{host}]:{api.port}" if ":" in host else f"http://{host}:{api.port}"


def client_api_key(given: str, api: ApiConfig | None = None) -> str:
    """The key the client sends: as given, else the launch's (its `api` section), else $OPENAI_API_KEY."""
    return given or (api.api_key if api is not None else "") or envs.openai_api_key()


def resolve_target(cfg: ServeConfig) -> ServeConfig:
    """Fills base_url, run_dir and api_key from --config (its api port and key, its run dir) where not
    given."""
    if not cfg.config:
        return replace(cfg, base_url=cfg.base_url or DEFAULT_BASE_URL, api_key=client_api_key(cfg.api_key))
    from pdpipe.config import load_launch_config

    launch = load_launch_config(cfg.config)
    return replace(cfg, base_url=cfg.base_url or api_base_url(launch.api),
                   run_dir=cfg.run_dir or launch.resolved_run_dir, api_key=client_api_key(cfg.api_key, launch.api))


async def served_model(session: aiohttp.ClientSession, base_url: str) -> str:
    async with session.get(base_url + "/v1/models") as resp:
        if resp.status == 401:
            raise RuntimeError(f"GET {base_url}/v1/models answered HTTP 401: give the server's key (--api-key, "
                               "or OPENAI_API_KEY)")
        if resp.status != 200:
            raise RuntimeError(f"GET {base_url}/v1/models answered HTTP {resp.status}")
        models = (await resp.json()).get("data") or []
    if not models:
        raise RuntimeError(f"GET {base_url}/v1/models lists no model")
    return models[0]["id"]


def client_session(cfg: ServeConfig, connections: int) -> aiohttp.ClientSession:
    # a connection per request in flight: the client must not queue requests the server should see
    return aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=cfg.load.max_concurrency or connections),
                                 timeout=aiohttp.ClientTimeout(total=cfg.request_timeout),
                                 headers=auth_headers(cfg.api_key))


async def send_all(cfg: ServeConfig, prompts: list[Prompt], offsets: list[float]) -> tuple[str, list, float]:
    """(model, results in prompt order, seconds from the first send to the last reply's end)."""
    async with client_session(cfg, len(prompts)) as session:
        model = cfg.model or await served_model(session, cfg.base_url)
        url = cfg.base_url + ROUTES[cfg.endpoint]
        bodies = [msgspec.json.encode(request_body(p, model, cfg.endpoint, cfg.workload, cfg.return_token_ids))
                  for p in prompts]
        with tqdm(total=len(prompts), disable=not cfg.progress, unit="req") as bar:

            async def send(i: int, prompt: Prompt) -> RequestResult:
                return await _send(session, url, bodies[i], prompt, i, bar)

            results, duration = await _timed(dispatch(prompts, offsets, cfg.load.max_concurrency, send))
    return model, results, duration


async def _send(session: aiohttp.ClientSession, url: str, body: bytes, prompt: Prompt, index: int,
                bar: tqdm) -> RequestResult:
    result = await stream_request(session, url, body, RequestResult(index, prompt.max_tokens, prompt.prompt_len))
    bar.update(1)
    return result


async def _timed(work) -> tuple:
    """What `work` returns, and how long it took."""
    start = time.perf_counter()
    return await work, time.perf_counter() - start


async def send_sessions(cfg: ServeConfig, sessions: list[Session], offsets: list[float]) -> tuple[str, list, float]:
    """(model, the turns in send order, seconds from the first send to the last reply's end)."""
    if cfg.endpoint != "completions" or not cfg.return_token_ids:
        raise ValueError("dataset: multi-turn sends token ids and echoes the replies' token ids: it needs "
                         "--endpoint completions and --return-token-ids")
    async with client_session(cfg, len(sessions)) as session:
        model = cfg.model or await served_model(session, cfg.base_url)
        url = cfg.base_url + ROUTES[cfg.endpoint]
        with tqdm(total=len(sessions) * cfg.workload.turns, disable=not cfg.progress, unit="req") as bar:

            async def send(prompt: Prompt) -> RequestResult:
                body = msgspec.json.encode(request_body(prompt, model, cfg.endpoint, cfg.workload, True))
                return await _send(session, url, body, prompt, 0, bar)

            turns, duration = await _timed(run_sessions(sessions, offsets, cfg.workload.think_time, send))
    return model, turns, duration


def launch_figures(run_dir: str) -> dict:
    """What the launch's scheduler says now: KV bytes moved prefill → decode, blocks sent and skipped,
    and the blocks its engines' pools hold and their block size (for the cache oracle)."""
    from pdpipe.inspect import control

    snap = control(run_dir, "snapshot")
    xfers = (snap.get("transfers") or {}).values()
    engines = [i["stats"] for i in snap["instances"].values() if i["role"] in ("prefill", "decode", "mixed")
               and i["stats"]]
    return {"kv_bytes_moved": sum(x.get("bytes_moved", 0) for x in xfers),
            "kv_blocks_sent": sum(x.get("blocks_sent", 0) for x in xfers),
            "kv_blocks_skipped": sum(x.get("blocks_skipped", 0) for x in xfers),
            "cache_blocks": sum(s.get("num_blocks", 0) for s in engines),
            "block_size": max((s.get("block_size", 0) for s in engines), default=0)}


def split_from_traces(run_dir: str, results: list[RequestResult], records: list[dict]) -> dict:
    """Adds each traced request's split to its record; returns the per-stage summary."""
    done = [(r, rec) for r, rec in zip(results, records) if r.ok]
    traces = fetch_traces(run_dir, [r.request_id for r, _ in done])
    splits = []
    for result, record in done:
        trace = traces.get(result.request_id)
        if trace is not None:
            split = ttft_split(trace, result.sent_at, result.sent_at + result.chunks[0][0])
            record["ttft_split_ms"] = {stage: s * 1e3 for stage, s in split.items()}
            splits.append(split)
    return {"run_dir": run_dir, "traced": len(splits),
            "untraced": [r.request_id for r, _ in done if r.request_id not in traces],
            "stages_ms": summarize_splits(splits)}


def run_serve(cfg: ServeConfig) -> dict:
    """Runs the benchmark; returns the result that --result-file holds."""
    cfg = resolve_target(cfg)
    slos = parse_slos(cfg.slo)
    started = datetime.now(UTC).isoformat(timespec="seconds")
    multi_turn = None
    if cfg.workload.dataset == "multi-turn":
        sessions = make_sessions(cfg.workload)
        offsets = arrival_offsets(len(sessions), cfg.load.request_rate, cfg.load.burstiness, cfg.workload.seed)
        before = launch_figures(cfg.run_dir) if cfg.run_dir else None
        model, turns, duration = asyncio.run(send_sessions(cfg, sessions, offsets))
        results = [t.result for t in turns]
        after = launch_figures(cfg.run_dir) if cfg.run_dir else {}
        multi_turn = by_turn(turns, after.get("block_size") or 16, after.get("cache_blocks", 0))
        if before is not None:
            multi_turn.update({k: after[k] - before[k] for k in ("kv_bytes_moved", "kv_blocks_sent",
                                                                  "kv_blocks_skipped")})
    else:
        if cfg.workload.dataset == "mooncake-trace":  # sent at the trace's own times
            prompts, offsets = mooncake_trace(cfg.workload)
        else:
            prompts = load_prompts(cfg.workload)
            offsets = arrival_offsets(len(prompts), cfg.load.request_rate, cfg.load.burstiness, cfg.workload.seed)
        model, results, duration = asyncio.run(send_all(cfg, prompts, offsets))
    records = [request_record(r, slos) for r in results]
    if multi_turn is not None:  # which session and turn each request was
        for record, turn in zip(records, turns):
            record.update(session=turn.session, turn=turn.number)
    result = {"date": started, "base_url": cfg.base_url, "endpoint": cfg.endpoint, "model": model,
              "config": recorded_settings(cfg), "summary": summarize(results, duration, slos), "ttft_split": None,
              "requests": records}
    if multi_turn is not None:
        result["multi_turn"] = multi_turn
    if cfg.run_dir:
        result["ttft_split"] = split_from_traces(cfg.run_dir, results, records)
    if cfg.result_file:
        write_json(Path(cfg.result_file), result)
    return result

