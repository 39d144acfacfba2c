"""The ``hf-attrib`` command.

    hf-attrib attribute --model ID_OR_DIR --task causal-lm --train DATASET --test DATASET
        --method trak [--layers last:2] [--out scores.safetensors] [--top-k 5]
    hf-attrib bench list
    hf-attrib bench ground-truth digits-lr --kind lds|loo [--models a:b] [--shard i/n]
    hf-attrib bench run digits-lr [--methods if-cg,trak-10] [--out DIR] [--device cpu] [--smoke]
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

__all__ = ["main"]


def _bench_list(_: argparse.Namespace) -> int:
    from hf_attrib.benchmark.settings import SETTINGS

    print(f"{'setting':28} {'metrics':12} {'train/test':11} description")
    for s in SETTINGS.values():
        print(f"{s.name.replace('_', '-'):28} {','.join(s.metrics):12} "
              f"{f'{s.n_train}/{s.n_test}':11} {s.description}"
              f"{' [offline]' if s.offline else ''}")
    return 0


def _bench_run(args: argparse.Namespace) -> int:
    from hf_attrib.benchmark.runner import results_markdown, run_benchmark
    from hf_attrib.benchmark.settings import get_setting

    setting = get_setting(args.setting)
    methods = [m.strip() for m in args.methods.split(",")] if args.methods else None
    out = args.out or f"bench-out/{setting.name}"
    results = run_benchmark(setting, methods=methods, out_dir=out, device=args.device,
                            smoke=args.smoke, data_dir=args.data_dir,
                            loo_examples=args.loo_examples, search=args.search,
                            progress=not args.no_progress)
    print(results_markdown(results))
    print(f"results written to {out}/results.json and {out}/results.md")
    return 0


def _parse_shard(text: str | None) -> tuple[int, int] | None:
    if text is None:
        return None
    try:
        index, count = (int(v) for v in text.split("/"))
    except ValueError:
        raise ValueError(f"--shard must look like i/n (e.g. 0/4), got {text!r}.") from None
    if not 0 <= index < count:
        raise ValueError(f"--shard {text}: need 0 <= i < n.")
    return index, count


def _bench_ground_truth(args: argparse.Namespace) -> int:
    from hf_attrib.benchmark.runner import build_ground_truth, prepare

    prep = prepare(args.setting, args.data_dir, smoke=args.smoke)
    if args.block_size:
        prep.block_size = args.block_size
    out = args.out or f"bench-out/{prep.setting.name}"
    results = build_ground_truth(prep, f"{out}/ground_truth", args.kind, models=args.models,
                                 shard=_parse_shard(args.shard),
                                 loo_examples=args.loo_examples, progress=not args.no_progress)
    for result in results.values() if isinstance(results, dict) else [results]:
        print(f"{result.kind}: trained blocks {result.trained}, already on disk "
              f"{result.skipped} ({result.directory})")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``hf-attrib``."""
    parser = argparse.ArgumentParser(prog="hf-attrib", description="Data attribution benchmarks.")
    commands = parser.add_subparsers(dest="command", required=True)
    bench = commands.add_parser("bench", help="benchmark settings, ground truth and runs")
    bench_cmds = bench.add_subparsers(dest="bench_command", required=True)
    bench_cmds.add_parser("list", help="list the benchmark settings").set_defaults(
        func=_bench_list)
    gt = bench_cmds.add_parser("ground-truth", help="train (or resume) ground-truth models")
    gt.add_argument("setting")
    gt.add_argument("--kind", choices=("lds", "loo"), default="lds")
    gt.add_argument("--models", help="model ids a:b (only the blocks covering them)")
    gt.add_argument("--shard", help="i/n: take every n-th block starting at block i")
    gt.add_argument("--out", help="output folder (default: bench-out/SETTING)")
    gt.add_argument("--data-dir", help="local copy of the source data")
    gt.add_argument("--loo-examples", type=int, help="leave out only the first N examples")
    gt.add_argument("--block-size", type=int,
                    help="models trained (and saved) together; default: fit ~64 MB")
    gt.add_argument("--smoke", action="store_true", help="tiny sizes (pipeline check)")
    gt.add_argument("--no-progress", action="store_true")
    gt.set_defaults(func=_bench_ground_truth)
    run = bench_cmds.add_parser("run", help="build ground truth, run methods, print results")
    run.add_argument("setting", help="setting name, e.g. digits-lr (see `bench list`)")
    run.add_argument("--methods", help="comma-separated methods (default: all)")
    run.add_argument("--out", help="output folder (default: bench-out/SETTING)")
    run.add_argument("--device", default="cpu")
    run.add_argument("--smoke", action="store_true", help="tiny sizes: checks the pipeline")
    run.add_argument("--data-dir", help="local copy of the source data")
    run.add_argument("--loo-examples", type=int, help="leave out only the first N examples")
    run.add_argument("--search", action="store_true",
                     help="hyperparameter search of the paper's Appendix C.1; best per metric")
    run.add_argument("--no-progress", action="store_true")
    run.set_defaults(func=_bench_run)
    from hf_attrib.integrations.cli_attribute import add_attribute_parser

    add_attribute_parser(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``hf-attrib`` console script."""
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (KeyError, ValueError, FileNotFoundError, NotImplementedError) as err:
        message = err.args[0] if isinstance(err, KeyError) and err.args else err
        print(f"hf-attrib: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
