"""How much slower is a prefill that finds its machine idle? The same prompt is computed by the
8B-shaped engine back to back, then after an idle while (as a lightly loaded prefill instance idles
between requests): with the process asleep (CPU and GPU idle), or spinning on the CPU (GPU idle
only); and asleep with the prefill instance's per-layer announcements on (an event recorded per
group of layers, a sender thread waiting on it and sending to an inbox nobody reads). The SM clock
is read through NVML just before each prompt, and the time `runner.execute` takes apart from the
whole step. Then bare work after the same gaps: 600 tiny kernels, and 224 GEMMs of a short prompt.

    python benchmarks/idle_gpu_probe.py [--tokens 2048,320]   (GPU machine, the 8B-shaped folder)
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
    import argparse

    import pynvml

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", default="2048,320")
    parser.add_argument("--idle", default=",".join(str(x) for x in IDLE_S), help="idle times, seconds")
    parser.add_argument("--modes", default="sleep,spin,announce", help="of sleep, spin, announce, keepalive2, "
                        "keepalive20 (asleep but a tiny kernel every 2 or 20 ms)")
    args = parser.parse_args()

    from pdpipe.config import load_launch_config
    from pdpipe.engine.engine import LLMEngine
    from pdpipe.messages import SamplingParams

    cfg = load_launch_config(str(CONFIG))
    engine = LLMEngine(replace(cfg.engine, device="cuda:0", cuda_graphs=False))
    engine.warm_up()
    pynvml.nvmlInit()
    gpu = pynvml.nvmlDeviceGetHandleByIndex(torch.cuda.current_device())
    params = SamplingParams(max_tokens=1, temperature=0.0)
    launch_ms: list[float] = []
    execute = engine.runner.execute

    def timed_execute(*a, **k):
        start = time.perf_counter()
        result = execute(*a, **k)
        launch_ms.append((time.perf_counter() - start) * 1e3)
        return result

    engine.runner.execute = timed_execute

    import tempfile

    import zmq

    from pdpipe.engine.worker import LAYER_MESSAGE_TOKENS
    from pdpipe.messages import LayersReady
    from pdpipe.wire import RunPaths, SenderThread

    sender = SenderThread(zmq.Context.instance(), RunPaths(tempfile.mkdtemp()))
    announce = False

    def on_schedule(sched):
        tokens = sum(c.num_tokens for c in sched.chunks)
        pending = [0]

        def on_layer(layer: int) -> None:
            pending[0] += 1
            if layer < engine.spec.num_layers - 1 and tokens * pending[0] < LAYER_MESSAGE_TOKENS:
                return
            event = torch.cuda.Event()
            event.record()
            sender.send("nobody", LayersReady(request_ids=["probe"], layer=layer, count=pending[0]), after=event)
            pending[0] = 0

        return on_layer if announce else None

    def prefill(prompt) -> tuple[float, int, float]:
        clock = pynvml.nvmlDeviceGetClockInfo(gpu, pynvml.NVML_CLOCK_SM)
        start = time.perf_counter()
        engine.add_request("probe", prompt, params)
        while engine.has_unfinished():
            engine.step(on_schedule)
        return (time.perf_counter() - start) * 1e3, clock, launch_ms[-1]

    def spin(seconds: float) -> None:
        end = time.perf_counter() + seconds
        while time.perf_counter() < end:
            pass

    tiny = torch.zeros(1, device="cuda")

    def keepalive(every: float):
        def wait(seconds: float) -> None:
            end = time.perf_counter() + seconds
            while (left := end - time.perf_counter()) > 0:
                tiny.add_(1)
                time.sleep(min(every, left))
        return wait

    waits = {"sleep": time.sleep, "spin": spin, "announce": time.sleep, "keepalive2": keepalive(0.002),
             "keepalive20": keepalive(0.02)}

    for n in (int(x) for x in args.tokens.split(",")):
        prompt = torch.randint(0, engine.spec.vocab_size, (n,), generator=torch.Generator().manual_seed(n)).tolist()
        print(f"--- {n}-token prompt")
        print(f"{'idle before (ms)':>16} {'how':>8} {'prefill ms (median of 5)':>25} {'of it launching':>16} "
              f"{'SM MHz before':>14}")
        for idle in (float(x) for x in args.idle.split(",")):
            for how in args.modes.split(","):
                wait = waits[how]
                announce = how == "announce"
                runs = []
                for _ in range(5):
                    prefill(prompt)  # the machine busy right before the idle period
                    wait(idle)
                    runs.append(prefill(prompt))
                print(f"{idle * 1e3:>16.0f} {how:>8} {statistics.median(r[0] for r in runs):>25.1f} "
                      f"{statistics.median(r[2] for r in runs):>16.1f} {statistics.median(r[1] for r in runs):>14.0f}",
                      flush=True)

    # The same idle gaps before bare work: 600 tiny kernels (launch-bound), and the 8B shape's seven
    # projections of 32 layers at 320 rows (GPU-bound).
    x = torch.zeros(1024, device="cuda")
    a = torch.randn(320, 4096, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(4096, 4096, device="cuda", dtype=torch.bfloat16)

    def launches() -> None:
        for _ in range(600):
            x.add_(1)

    def gemms() -> None:
        for _ in range(32 * 7):
            torch.mm(a, w)

    for name, work in (("600 tiny kernels", launches), ("224 GEMMs 320x4096x4096", gemms)):
        print(f"--- {name}: idle ms, host ms to enqueue, ms until done (medians of 7)")
        for idle in (0.0, 0.05, 0.25, 1.0):
            enq, done = [], []
            for _ in range(7):
                work()
                torch.cuda.synchronize()
                time.sleep(idle)
                start = time.perf_counter()
                work()
                enq.append((time.perf_counter() - start) * 1e3)
                torch.cuda.synchronize()
                done.append((time.perf_counter() - start) * 1e3)
            print(f"{idle * 1e3:>8.0f} {statistics.median(enq):>8.2f} {statistics.median(done):>8.2f}", flush=True)


if __name__ == "__main__":
    main()
