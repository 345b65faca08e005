"""How much slower is a prefill that finds its GPU idle? The same 2048-token prompt is computed by the
8B-shaped engine back to back, then after the GPU idled for a while (as a lightly loaded prefill
instance's GPU does between requests); the SM clock is read through NVML just before each prompt.

    python benchmarks/idle_gpu_probe.py        (on a GPU machine; makes the 8B-shaped folder if needed)
"""
from __future__ import annotations

import statistics
import time
from dataclasses import replace
from pathlib import Path

import torch

CONFIG = Path(__file__).resolve().parent.parent / "launch" / "gpu-8b-1p1d.toml"
IDLE_S = (0.0, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0)


def main() -> None:
    import pynvml

    from pdpipe.config import load_launch_config
    from pdpipe.engine.engine import LLMEngine
    from pdpipe.messages import SamplingParams

    cfg = load_launch_config(str(CONFIG))
    engine = LLMEngine(replace(cfg.engine, device="cuda:0", cuda_graphs=False))
    engine.warm_up()
    pynvml.nvmlInit()
    gpu = pynvml.nvmlDeviceGetHandleByIndex(torch.cuda.current_device())
    prompt = torch.randint(0, engine.spec.vocab_size, (2048,), generator=torch.Generator().manual_seed(0)).tolist()
    params = SamplingParams(max_tokens=1, temperature=0.0)

    def prefill() -> tuple[float, int]:
        clock = pynvml.nvmlDeviceGetClockInfo(gpu, pynvml.NVML_CLOCK_SM)
        start = time.perf_counter()
        engine.add_request("probe", prompt, params)
        while engine.has_unfinished():
            engine.step()
        return (time.perf_counter() - start) * 1e3, clock

    print(f"{'idle before (ms)':>16} {'prefill ms (median of 5)':>25} {'SM MHz before':>14}")
    for idle in IDLE_S:
        runs = []
        for _ in range(5):
            prefill()  # the GPU busy right before the idle period
            time.sleep(idle)
            runs.append(prefill())
        ms = statistics.median(r[0] for r in runs)
        print(f"{idle * 1e3:>16.0f} {ms:>25.1f} {statistics.median(r[1] for r in runs):>14.0f}", flush=True)


if __name__ == "__main__":
    main()
