"""Offline CPU throughput of the colocated engine on the demo model (or --model): prefill and decode
tokens per second for a batch of prompts. No goal yet: a baseline for the CPU reference path; GPU speed
has its own benchmarks.

    python benchmarks/cpu_throughput.py [--batch 1 8 32] [--prompt-len 128] [--output-len 64]
Figures in benchmarks/RESULTS.md, "CPU throughput of the colocated engine".
"""
from __future__ import annotations

import argparse
import platform
import time

import torch

from pdpipe.llm import LLM
from pdpipe.messages import SamplingParams


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="", help="model folder; empty: the demo model")
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--output-len", type=int, default=64)
    args = parser.parse_args()

    llm = LLM(args.model, num_blocks=4096)
    vocab = llm.engine.spec.vocab_size
    gen = torch.Generator().manual_seed(0)
    print(f"model {llm.engine.model_dir.name}  {llm.engine.spec.architecture}  "
          f"cpu {platform.processor() or platform.machine()} threads {torch.get_num_threads()}")
    print(f"{'batch':>5} {'prefill tok/s':>14} {'decode tok/s':>13} {'total s':>8}")
    for batch in args.batch:
        prompts = [torch.randint(3, vocab, (args.prompt_len,), generator=gen).tolist() for _ in range(batch)]
        start = time.perf_counter()
        llm.generate(prompts, SamplingParams(max_tokens=1, temperature=0.0))
        prefill_s = time.perf_counter() - start
        start = time.perf_counter()
        outs = llm.generate(prompts, SamplingParams(max_tokens=args.output_len, temperature=0.0,
                                                    ignore_eos=True))
        total_s = time.perf_counter() - start
        decode_tokens = sum(len(o.token_ids) - 1 for o in outs)
        print(f"{batch:>5} {batch * args.prompt_len / prefill_s:>14.0f} "
              f"{decode_tokens / max(total_s - prefill_s, 1e-9):>13.0f} {total_s:>8.2f}")


if __name__ == "__main__":
    main()
