"""`pdpipe` command line: make-model, generate, launch, queues, trace, pause, resume, bench."""
from __future__ import annotations

import argparse
import sys
import time

from pdpipe.cli_args import add_dataclass_args, dataclass_from_args
from pdpipe.config import EngineConfig
from pdpipe.models.make_config import MakeModelConfig


def _make_model(args: argparse.Namespace) -> int:
    from pdpipe.models.make import make_model

    cfg = dataclass_from_args(MakeModelConfig, args)
    path = make_model(args.dir, cfg)
    print(f"wrote {cfg.arch} model to {path}")
    return 0


def _generate(args: argparse.Namespace) -> int:
    from dataclasses import asdict

    from pdpipe.llm import LLM
    from pdpipe.messages import SamplingParams

    cfg = dataclass_from_args(EngineConfig, args)
    llm = LLM(cfg.model, dtype=cfg.dtype, device=cfg.device, seed=cfg.seed,
              **asdict(cfg.cache), **asdict(cfg.scheduler))
    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature,
                            top_p=args.top_p, top_k=args.top_k, seed=args.sample_seed,
                            stop=args.stop or [])
    prompts = args.prompt or ["Hello, my name is", "The key value cache is"]
    start = time.perf_counter()
    if args.chat:
        outs = llm.chat([[{"role": "user", "content": p}] for p in prompts], params)
    else:
        outs = llm.generate(prompts, params)
    seconds = time.perf_counter() - start
    for prompt, out in zip(prompts, outs):
        print(f"--- {prompt!r}\n{out.text!r}  [{len(out.token_ids)} tokens, {out.finish_reason}]")
    tokens = sum(len(o.token_ids) for o in outs)
    print(f"{tokens} tokens in {seconds:.2f} s ({tokens / seconds:.1f} tokens/s) on {llm.engine.model_dir}")
    return 0


def _launch(args: argparse.Namespace) -> int:
    from pdpipe.config import load_launch_config
    from pdpipe.launcher import Launcher, LaunchError

    launcher = Launcher(load_launch_config(args.config))
    print(f"pdpipe: starting {len(launcher.plan())} processes; logs in {launcher.paths.run_dir / 'logs'}",
          flush=True)
    try:
        launcher.start()
    except LaunchError as exc:
        print(f"pdpipe: error: {exc}", file=sys.stderr)
        return 1
    print(f"pdpipe: ready. Try:\n  {launcher.curl_line()}\n"
          f"Inspect: pdpipe queues --run-dir {launcher.paths.run_dir}", flush=True)
    code = launcher.wait()
    print("pdpipe: stopped", flush=True)
    return code


def _run_dir(args: argparse.Namespace) -> str:
    """The launch to inspect: as given, else the one running on this machine."""
    if args.run_dir:
        return args.run_dir
    if args.config:
        from pdpipe.config import load_launch_config

        return load_launch_config(args.config).resolved_run_dir
    from pdpipe.wire import live_runs

    runs = live_runs()
    if len(runs) == 1:
        return str(runs[0])
    if not runs:
        raise RuntimeError("no launch is running on this machine; start one with `pdpipe launch CONFIG`, or "
                           "name a run directory with --run-dir")
    raise RuntimeError(f"{len(runs)} launches are running ({', '.join(map(str, runs))}); choose one with "
                       "--run-dir")


def _queues(args: argparse.Namespace) -> int:
    from pdpipe.inspect import control, format_queues

    run_dir = _run_dir(args)
    while True:
        text = format_queues(control(run_dir, "snapshot"))
        if not args.watch:
            print(text)
            return 0
        print("\033[2J\033[H" + text, flush=True)
        time.sleep(args.watch)


def _trace(args: argparse.Namespace) -> int:
    from pdpipe.inspect import control, format_trace

    print(format_trace(control(_run_dir(args), "trace", request_id=args.request_id)))
    return 0


def _pause(args: argparse.Namespace) -> int:
    from pdpipe.inspect import control

    control(_run_dir(args), args.command, instance=args.instance)
    print(f"{args.instance}: {args.command}d")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pdpipe", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    mk = sub.add_parser("make-model", help="write a randomly initialised model in Hugging Face format")
    mk.add_argument("dir", help="output folder")
    add_dataclass_args(mk, MakeModelConfig)
    mk.set_defaults(func=_make_model)

    gen = sub.add_parser("generate", help="offline generation on one colocated engine")
    gen.add_argument("--prompt", action="append", help="a prompt (repeat for a batch)")
    gen.add_argument("--chat", action="store_true", help="apply the chat template")
    gen.add_argument("--max-tokens", type=int, default=32)
    gen.add_argument("--temperature", type=float, default=0.0)
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--top-k", type=int, default=0)
    gen.add_argument("--sample-seed", type=int, default=None)
    gen.add_argument("--stop", action="append")
    add_dataclass_args(gen, EngineConfig)
    gen.set_defaults(func=_generate)

    launch = sub.add_parser("launch", help="start this machine's pipeline processes from a config file")
    launch.add_argument("config", help="TOML launch config (examples in launch/)")
    launch.set_defaults(func=_launch)

    def inspector(name: str, help_text: str, func):
        p = sub.add_parser(name, help=help_text)
        p.add_argument("--run-dir", default="", help="the launch's run directory")
        p.add_argument("--config", default="", help="or: the launch config it was started with")
        p.set_defaults(func=func)
        return p

    inspector("queues", "per process: queue depths, requests per state, blocks, transfers",
              _queues).add_argument("--watch", type=float, default=0, help="refresh every N seconds")
    inspector("trace", "one request's timeline across processes", _trace).add_argument("request_id")
    for name in ("pause", "resume"):
        inspector(name, f"{name} an engine instance (debugging)", _pause).add_argument("instance")

    from pdpipe.bench.cli import add_bench_commands

    add_bench_commands(sub.add_parser("bench", help="load generator (serve), layout comparison (compare), "
                                                    "plots (plot)"))
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, RuntimeError) as exc:  # config, model-folder, inspection errors: one line
        print(f"pdpipe: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
