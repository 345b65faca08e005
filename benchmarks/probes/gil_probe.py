"""Does waiting for the GPU hold the GIL? A thread that only wakes every 0.5 ms runs beside a main
thread that queues ~95 ms of GPU work (60 bf16 GEMMs of 8192³ on an H200) and then waits for it in one
of the ways an engine step can (`.tolist()`, `.item()`, `.cpu()`, a stream or an event synchronize).
The longest gap between the thread's wake-ups while the main thread waits is how long the process's
other threads (a ZeroMQ inbox, a prefill's layer announcements) were held off.

Answer (one H200, torch 2.11.0+cu130, 2026-11-30): no. Every one of these waits releases the GIL;
during a ~96 ms wait the other thread was never held off more than 0.9 ms. An engine's inbox and
sender threads therefore run while its step waits for the GPU. Worth running again after a torch
upgrade, since the engine's threads rest on it.

    python benchmarks/probes/gil_probe.py        (on a GPU machine; or bash benchmarks/device_run.sh probe)
"""
from __future__ import annotations

import threading
import time

import torch


def main() -> None:
    x = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    ticks: list[float] = []
    stop = threading.Event()

    def ticker() -> None:
        while not stop.is_set():
            ticks.append(time.perf_counter())
            time.sleep(0.0005)

    waits = {
        "tolist": lambda y: y[0, :4].tolist(),
        "item": lambda y: y[0, 0].item(),
        "cpu": lambda y: y[0, :4].cpu(),
        "stream.synchronize": lambda y: torch.cuda.current_stream().synchronize(),
        "event.synchronize": lambda y: _event_sync(),
    }
    thread = threading.Thread(target=ticker, daemon=True)
    thread.start()
    print(f"{'wait':<20} {'wait ms':>8} {'longest gap ms':>15}")
    for _ in range(2):  # the first round warms up
        rows = []
        for name, wait in waits.items():
            torch.cuda.synchronize()
            y = x
            for _ in range(60):  # ~95 ms of matrix products on an H200, queued
                y = x @ x
            start = time.perf_counter()
            wait(y)
            end = time.perf_counter()
            inside = [start] + [t for t in list(ticks) if start <= t <= end] + [end]
            gap = max(b - a for a, b in zip(inside, inside[1:]))
            rows.append((name, (end - start) * 1e3, gap * 1e3))
    for name, wait_ms, gap_ms in rows:
        print(f"{name:<20} {wait_ms:>8.1f} {gap_ms:>15.1f}")
    stop.set()


def _event_sync() -> None:
    event = torch.cuda.Event()
    event.record()
    event.synchronize()


if __name__ == "__main__":
    main()
