"""What loading with online quantization holds at its peak, and how long it takes, against loading bf16.

A Llama-shaped bf16 checkpoint (random weights, ~0.7B parameters by default) is loaded by a fresh process
per scheme (`pdpipe.models.loader.load_model` on the CPU): the peak of its resident anonymous memory above
what it held before loading (sampled every 2 ms; the checkpoint's memory-mapped pages are the page
cache's, not counted), against the model as loaded (parameters and buffers; bf16 ones stay views of the
mapped file) and one bf16 decoder layer; and the load's wall time. The loader reads, quantizes and keeps
one tensor at a time, so the peak should be the quantized model plus about one tensor (goal, stated for
the GPU: quantized size + one bf16 layer + 2 GiB; load time no worse than bf16's).

    python benchmarks/quant_load.py [--hidden 2048 --layers 12 --intermediate 5632] [--json OUT.json]
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from datetime import date
from pathlib import Path

from pdpipe.models.make import make_model
from pdpipe.models.make_config import MakeModelConfig

PROBE = r"""
import json, sys, threading, time
import torch
from pdpipe.models.loader import load_model
from pdpipe.quant import QuantPlan
torch.set_num_threads(2)

def anon():  # resident anonymous memory (what the process allocated; not the checkpoint's mapped pages)
    for line in open("/proc/self/status"):
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) * 1024

peak, done = [anon()], threading.Event()
def sample():
    while not done.is_set():
        peak[0] = max(peak[0], anon())
        time.sleep(0.002)
before = anon()
thread = threading.Thread(target=sample)
thread.start()
t0 = time.perf_counter()
model = load_model(sys.argv[1], quant=QuantPlan(sys.argv[2]) if sys.argv[2] else None)
seconds = time.perf_counter() - t0
done.set()
thread.join()
held = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
layer = sum(p.numel() * 2 for p in model.model.layers[0].parameters()) if not sys.argv[2] else 0
print(json.dumps({"seconds": seconds, "peak_above_start": max(peak[0], anon()) - before, "model_bytes": held,
                  "layer_bf16": layer}))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--intermediate", type=int, default=5632)
    parser.add_argument("--dir", default="/tmp/pdpipe-models/quant-load")
    parser.add_argument("--json", default="")
    args = parser.parse_args()
    folder = Path(args.dir)
    if not (folder / "config.json").is_file():
        make_model(folder, MakeModelConfig(arch="llama", hidden=args.hidden, heads=16, kv_heads=4,
                                           intermediate=args.intermediate, layers=args.layers, vocab=32000,
                                           dtype="bfloat16"))
    rows = {}
    for scheme in ("", "wint8", "wint4", "fp8", "block_wise_fp8"):
        out = subprocess.run([sys.executable, "-c", PROBE, str(folder), scheme], check=True, capture_output=True,
                             text=True).stdout
        rows[scheme or "bf16"] = json.loads(out.strip().splitlines()[-1])
    layer = rows["bf16"]["layer_bf16"]
    gib = 2**30
    for name, r in rows.items():
        over = r["peak_above_start"] - r["model_bytes"]
        print(f"{name}: loaded in {r['seconds']:.2f} s; holds {r['model_bytes'] / gib:.2f} GiB; peak above start "
              f"{r['peak_above_start'] / gib:.2f} GiB ({over / gib:+.2f} GiB beyond the model; one bf16 layer "
              f"{layer / gib:.2f} GiB)")
    if args.json:
        Path(args.json).write_text(json.dumps({"date": str(date.today()), "device": "cpu", "shape": vars(args),
                                               "layer_bf16_bytes": layer, "schemes": rows}, indent=1))


if __name__ == "__main__":
    main()
