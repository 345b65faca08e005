"""`pdpipe bench compare CONFIG [CONFIG ...]`: launches each config in turn (the previous one fully
stopped first), sweeps request rates with the same workload and seed, and reports per layout the
latency percentiles, throughput, SLO attainment and goodput, and the rates where the layouts cross.

Goodput follows DistServe: the highest request rate the layout serves with at least
`slo_attainment` of its requests within every SLO. A sweep measures it as the highest swept rate up
to which every swept rate attains that (a lucky pass above a rate that missed does not count)."""
from __future__ import annotations

import itertools
from pathlib import Path

from .config import CompareConfig, LoadConfig, ServeConfig, parse_slos, recorded_settings
from .report import write_json

# metric → (what is compared, True when higher is better)
CROSSING_METRICS = {"slo_attainment": (lambda p: p["attainment"], True),
                    "ttft_p99": (lambda p: p["ttft_ms"]["p99"], False)}


def goodput_rate(points: list[dict], target: float) -> float | None:
    best = None
    for point in sorted(points, key=lambda p: p["rate"]):
        if point["attainment"] < target:
            break
        best = point["rate"]
    return best


def _leaders(a: list[dict], b: list[dict], value, higher_better: bool) -> list[tuple[float, int]]:
    """(rate, +1 when a leads, −1 when b leads) at the rates both swept; ties and gaps left out."""
    b_at = {p["rate"]: p for p in b}
    out = []
    for p in a:
        q = b_at.get(p["rate"])
        va, vb = (value(p), value(q)) if q is not None else (None, None)
        if va is None or vb is None or va == vb:
            continue
        out.append((p["rate"], 1 if (va > vb) == higher_better else -1))
    return out


def crossings(layouts: dict[str, list[dict]]) -> list[dict]:
    """Where, between two swept rates, one layout overtakes another on a metric."""
    found = []
    for (name_a, a), (name_b, b) in itertools.combinations(layouts.items(), 2):
        for metric, (value, higher_better) in CROSSING_METRICS.items():
            leaders = _leaders(a, b, value, higher_better)
            for (r0, lead0), (r1, lead1) in zip(leaders, leaders[1:]):
                if lead0 != lead1:
                    names = {1: name_a, -1: name_b}
                    found.append({"metric": metric, "layouts": [name_a, name_b], "between": [r0, r1],
                                  "before": names[lead0], "after": names[lead1]})
    return found


def sweep_point(rate: float, serve_result: dict) -> dict:
    s = serve_result["summary"]
    split = serve_result.get("ttft_split") or {}
    return {"rate": rate, **{k: s[k] for k in ("ttft_ms", "tpot_ms", "itl_ms", "e2e_ms", "request_throughput",
                                               "output_throughput", "completed", "failed", "duration_s")},
            "attainment": s["goodput"]["attainment"], "goodput_requests_per_s": s["goodput"]["requests_per_s"],
            "ttft_split_p50_ms": {stage: d["p50"] for stage, d in split.get("stages_ms", {}).items()}}


def serve_config(name: str, launch, cfg: CompareConfig, rate: float, out: Path) -> ServeConfig:
    """One rate of the sweep against a launched config: its port, its run dir, its key (unless --api-key)."""
    from .serve import api_base_url, client_api_key

    return ServeConfig(workload=cfg.workload, load=LoadConfig(rate, cfg.burstiness, cfg.max_concurrency),
                       base_url=api_base_url(launch.api), run_dir=launch.resolved_run_dir,
                       api_key=client_api_key(cfg.api_key, launch.api), slo=cfg.slo, progress=cfg.progress,
                       result_file=str(out / "serve" / f"{name}-rate{rate:g}.json"))


def reset_prefix_cache(cfg: ServeConfig) -> None:
    """POST /reset_prefix_cache on the launched server."""
    import urllib.request

    from .client import auth_headers

    request = urllib.request.Request(cfg.base_url + "/reset_prefix_cache", method="POST",
                                     headers=auth_headers(cfg.api_key))
    urllib.request.urlopen(request, timeout=10).close()


def run_layout(name: str, launch, cfg: CompareConfig, out: Path) -> list[dict]:
    """Launches one config, sweeps the rates against it, stops it; the sweep's points."""
    from pdpipe.launcher import Launcher

    from .serve import run_serve

    launcher = Launcher(launch)
    points = []
    try:
        launcher.start()
        for rate in cfg.rates:
            serve = serve_config(name, launch, cfg, rate, out)
            reset_prefix_cache(serve)  # each rate starts cold: the same workload would hit the last rate's KV
            point = sweep_point(rate, run_serve(serve))
            print(f"{name}: {rate:g} req/s: {point['completed']} done, {point['failed']} failed, "
                  f"TTFT p50 {point['ttft_ms']['p50'] or 0:.1f} ms, SLOs met {point['attainment'] * 100:.0f} %",
                  flush=True)
            points.append(point)
        # what the pipeline itself saw (queues, placements, blocks), next to the client's figures
        from pdpipe.inspect import control

        write_json(out / "serve" / f"{name}-snapshot.json", control(launch.resolved_run_dir, "snapshot"))
    finally:
        launcher.stop()  # fully stopped (sockets removed) before the next layout starts
    return points


def layout_names(names: list[str]) -> list[str]:
    """The configs' names, numbered where two are alike."""
    return [n if names.count(n) == 1 else f"{n}-{i}" for i, n in enumerate(names)]


def run_compare(cfg: CompareConfig) -> dict:
    """Runs every layout; writes and returns compare.json's content (plots are made by the caller)."""
    from pdpipe.config import load_launch_config

    if not cfg.configs:
        raise ValueError("configs: give at least one launch config")
    launches = [load_launch_config(path) for path in cfg.configs]  # every config checked before any launch
    out = Path(cfg.out)
    layouts: dict[str, dict] = {}
    for path, launch, name in zip(cfg.configs, launches, layout_names([x.name for x in launches])):
        print(f"{name}: launching {path}", flush=True)
        points = run_layout(name, launch, cfg, out)
        layouts[name] = {"config_path": path, "points": points,
                         "goodput_rate": goodput_rate(points, cfg.slo_attainment)}
    result = {"config": recorded_settings(cfg), "slo_ms": parse_slos(cfg.slo), "slo_attainment": cfg.slo_attainment,
              "rates": list(cfg.rates), "layouts": layouts,
              "crossings": crossings({n: lay["points"] for n, lay in layouts.items()})}
    write_json(out / "compare.json", result)
    return result

