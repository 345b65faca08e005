"""GPU awareness through NVML, on CPU: a fake `pynvml` stands in for the driver (the device runs the
real one). Peer access decides whether a same-machine prefill/decode pair may start; each engine's GPU
memory and utilisation reach `pdpipe queues` and /metrics."""
import sys
import types

import pytest
from pipeline_launch import make_launch_config

from pdpipe import gpus

LINKED = {0, 1}  # GPUs 0 and 1 reach each other; GPU 2 reaches neither


def _refuse(cap):
    raise TypeError(f"Don't know how to convert parameter 3 ({cap!r})")  # what ctypes says of a tuple


@pytest.fixture
def fake_nvml(monkeypatch):
    nv = types.SimpleNamespace(
        NVML_P2P_CAPS_INDEX_READ=(0,),  # as nvidia-ml-py defines it (a stray comma makes it a tuple)
        NVML_P2P_STATUS_OK=0, NVML_P2P_STATUS_NOT_SUPPORTED=5,
        nvmlInit=lambda: None,
        nvmlDeviceGetHandleByIndex=lambda i: i,
        nvmlDeviceGetP2PStatus=lambda a, b, cap: (0 if {a, b} <= LINKED else 5) if cap == 0 and type(cap) is int
        else _refuse(cap),
        nvmlDeviceGetMemoryInfo=lambda h: types.SimpleNamespace(used=(h + 1) * 3 * 2**29, total=80 * 2**30),
        nvmlDeviceGetUtilizationRates=lambda h: types.SimpleNamespace(gpu=37 + h),
    )
    monkeypatch.setitem(sys.modules, "pynvml", nv)
    monkeypatch.setattr(gpus, "_NVML", None)
    return nv


def test_peer_access_and_figures_come_from_nvml(fake_nvml):
    assert gpus.peer_access(0, 1) is True and gpus.peer_access(0, 2) is False
    assert gpus.figures(1) == gpus.GpuFigures(memory_used=3 * 2**30, memory_total=80 * 2**30, utilization=38)
    assert gpus.unreachable_pairs([("prefill-0", 0, "decode-0", 1), ("prefill-0", 0, "decode-1", 2)]) == \
        ["prefill-0 (GPU 0) and decode-1 (GPU 2)"]


def test_without_nvml_nothing_is_refused(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", None)  # import fails
    monkeypatch.setattr(gpus, "_NVML", None)
    assert gpus.peer_access(0, 2) is None and gpus.figures(0) is None
    assert gpus.unreachable_pairs([("prefill-0", 0, "decode-0", 2)]) == []


def test_a_pair_without_peer_access_is_refused_before_anything_starts(fake_nvml, model_dir):
    from dataclasses import replace

    from pdpipe.config import InstanceConfig
    from pdpipe.launcher import Launcher, LaunchError

    cfg = make_launch_config(model_dir("llama"), [], instances=(InstanceConfig("prefill", gpus=(0,)),
                                                                InstanceConfig("decode", gpus=(2,))))
    cfg = replace(cfg, engine=replace(cfg.engine, device="cuda"))
    launcher = Launcher(cfg)
    with pytest.raises(LaunchError, match=r"no peer access between prefill-0 \(GPU 0\) and decode-0 \(GPU 2\)"):
        launcher.start()
    assert not launcher.children


def test_gpu_figures_show_in_queues_and_metrics():
    from pdpipe.api.metrics import ApiMetrics
    from pdpipe.inspect import format_queues

    def stats(**gpu):
        return {"num_blocks": 10, "free_blocks": 10, "running": 0, "waiting": 0, "inbox": 0, **gpu}

    snap = {"states": {"QUEUED": 0}, "ended": {}, "down": {},
            "instances": {"decode-0": {"role": "decode", "requests": {}, "routed": 0, "stats_age_s": 0.1,
                                       "stats": stats(gpu_memory_used=3 * 2**30, gpu_memory_total=80 * 2**30,
                                                      gpu_utilization=37)},
                          "decode-1": {"role": "decode", "requests": {}, "routed": 0, "stats_age_s": 0.1,
                                       "stats": stats(gpu_utilization=-1)}}}
    rows = {line.split()[0]: line for line in format_queues(snap).splitlines()}
    assert rows["decode-0"].endswith("3.0/80 GiB 37%") and rows["decode-1"].endswith("-")
    text = ApiMetrics().render(snap)[0].decode()
    assert 'pdpipe_gpu_utilization_percent{instance="decode-0",role="decode"} 37.0' in text
    assert 'pdpipe_gpu_memory_used_bytes{instance="decode-0",role="decode"} 3.221225472e+09' in text
    assert 'pdpipe_gpu_utilization_percent{instance="decode-1"' not in text  # no GPU: no figure
