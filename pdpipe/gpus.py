"""What NVML (nvidia-ml-py) says of this machine's GPUs: whether two of them have peer access (the
launcher checks a same-machine prefill/decode pair before it starts them), and a GPU's memory and
utilisation (each engine reports its own in its stats: /metrics and `pdpipe queues`). GPU ids are
physical, as NVML and the launch config number them (CUDA_VISIBLE_DEVICES does not apply to NVML).
Without NVML (no driver, or the package missing) every answer is None."""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

log = logging.getLogger("pdpipe")
_NVML: Any = None  # the initialised module, False once it failed


def nvml() -> Any:
    global _NVML
    if _NVML is None:
        try:
            import pynvml

            pynvml.nvmlInit()
            _NVML = pynvml
        except Exception as exc:  # noqa: BLE001 — no driver, no library: the caller says it cannot tell
            log.info("NVML is not available (%s)", exc)
            _NVML = False
    return _NVML or None


def peer_access(a: int, b: int) -> bool | None:
    """Whether GPU `a` can read GPU `b`'s memory directly (NVLink or PCIe P2P); None if NVML cannot say."""
    nv = nvml()
    if nv is None:
        return None
    read = nv.NVML_P2P_CAPS_INDEX_READ
    read = read[0] if isinstance(read, tuple) else read  # nvidia-ml-py defines it as `0,` (a tuple)
    try:
        status = nv.nvmlDeviceGetP2PStatus(nv.nvmlDeviceGetHandleByIndex(a), nv.nvmlDeviceGetHandleByIndex(b), read)
    except Exception as exc:  # noqa: BLE001 — an NVML error (a lost GPU, MIG): cannot say
        log.warning("NVML: peer access of GPUs %d and %d: %s", a, b, exc)
        return None
    return status == nv.NVML_P2P_STATUS_OK


@dataclass(frozen=True)
class GpuFigures:
    memory_used: int  # bytes
    memory_total: int
    utilization: int  # percent of the last sample period with a kernel running


def figures(gpu: int) -> GpuFigures | None:
    nv = nvml()
    if nv is None:
        return None
    try:
        handle = nv.nvmlDeviceGetHandleByIndex(gpu)
        memory = nv.nvmlDeviceGetMemoryInfo(handle)
        return GpuFigures(int(memory.used), int(memory.total), int(nv.nvmlDeviceGetUtilizationRates(handle).gpu))
    except Exception:  # noqa: BLE001 — an NVML error (utilisation is not reported under MIG): no figures
        return None


def unreachable_pairs(pairs: list[tuple[str, int, str, int]]) -> list[str]:
    """Of (prefill instance, its GPU, decode instance, its GPU) pairs on one machine, those whose GPUs
    have no peer access, each as a line saying so (pairs NVML cannot judge are let through)."""
    return [f"{p} (GPU {a}) and {d} (GPU {b})" for p, a, d, b in pairs
            if a != b and peer_access(a, b) is False]
