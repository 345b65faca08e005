"""The `pdpipe bench` subcommands' flags (generated from the config dataclasses) and handlers. Light
to import: `pdpipe` builds these parsers on every run; the benchmark modules load when one runs."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from pdpipe.cli_args import add_dataclass_args, dataclass_from_args

from .config import CompareConfig, ServeConfig


def _add_slo(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--slo", nargs="*", default=[], metavar="METRIC:MS",
                        help="service-level objectives for goodput, in ms, e.g. ttft:600 tpot:15 e2e:5000")


def _serve(args: argparse.Namespace) -> int:
    from .report import format_summary
    from .serve import run_serve

    cfg = dataclass_from_args(ServeConfig, args, slo=tuple(args.slo))
    result = run_serve(cfg)
    print(format_summary(result))
    if cfg.result_file:
        print(f"result: {cfg.result_file}")
    return 0 if result["summary"]["completed"] else 1


def _compare(args: argparse.Namespace) -> int:
    from .compare import run_compare
    from .plot import plot_or_explain
    from .report import format_compare

    cfg = dataclass_from_args(CompareConfig, args, slo=tuple(args.slo), configs=tuple(args.configs))
    result = run_compare(cfg)
    print(format_compare(result))
    print(f"result: {Path(cfg.out) / 'compare.json'}")
    print(plot_or_explain(result, Path(cfg.out)))
    return 0


def _plot(args: argparse.Namespace) -> int:
    from .plot import plot_compare

    path = Path(args.compare_json)
    paths = plot_compare(json.loads(path.read_text()), Path(args.out) if args.out else path.parent)
    print("plots: " + " ".join(map(str, paths)))
    return 0


def _one_line_errors(handler):
    """A setting, a server that does not answer, or a missing plot library: one line, exit code 2."""
    def run(args: argparse.Namespace) -> int:
        try:
            return handler(args)
        except (ValueError, RuntimeError, OSError, ImportError) as exc:
            print(f"pdpipe bench {args.bench_command}: error: {exc}", file=sys.stderr)
            return 2
    return run


def add_bench_commands(bench: argparse.ArgumentParser) -> None:
    sub = bench.add_subparsers(dest="bench_command", required=True)
    serve = sub.add_parser("serve", help="load an OpenAI-compatible server: latencies, throughput, goodput")
    add_dataclass_args(serve, ServeConfig, skip=("slo",))
    _add_slo(serve)
    serve.set_defaults(func=_one_line_errors(_serve))

    compare = sub.add_parser("compare", help="launch each config in turn and sweep request rates")
    compare.add_argument("configs", nargs="+", help="launch configs (TOML), one layout each")
    add_dataclass_args(compare, CompareConfig, skip=("slo", "configs"))
    _add_slo(compare)
    compare.set_defaults(func=_one_line_errors(_compare))

    plot = sub.add_parser("plot", help="the PNG plots of a compare.json")
    plot.add_argument("compare_json", help="a compare.json written by `pdpipe bench compare`")
    plot.add_argument("--out", default="", help="folder for the PNGs; default: the JSON's folder")
    plot.set_defaults(func=_one_line_errors(_plot))


def bench_main(argv: list[str]) -> int:
    """`pdpipe bench ...` on its own (`python -m pdpipe.bench`)."""
    parser = argparse.ArgumentParser(prog="pdpipe bench", description=__doc__)
    add_bench_commands(parser)
    args = parser.parse_args(argv)
    return args.func(args)
