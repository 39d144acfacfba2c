#!/usr/bin/env python
"""The speed benchmarks' one runner: ``python recipes/speed/run.py BENCHMARK [options]``.

Each benchmark is a module beside this file (``bench_<name>.py``) with ``DESCRIPTION``,
``add_arguments(parser)`` and ``run(args) -> list[report.Result]``; this runner parses the
command line, runs it and writes every result as ``results/<case>-<date>.md`` (+ ``.json``)
with the header of ``report.py`` (date, machine, versions, command). ``python
recipes/speed/bench_<name>.py [options]`` is the same as ``run.py <name> [options]``.
Attribution methods are built by name from ``hf_attrib.algorithm.registry`` (see
``method_table.py``); see ``README.md`` here for what each benchmark measures.
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
# Measure the hf_attrib of this checkout, whatever an editable install elsewhere points to.
if (HERE.parents[1] / "hf_attrib").is_dir() and str(HERE.parents[1]) not in sys.path:
    sys.path.insert(0, str(HERE.parents[1]))
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

from report import machine, write_result  # noqa: E402

# benchmark name -> module
BENCHMARKS = {
    "methods": "bench_methods",
    "cg-accuracy": "bench_cg_accuracy",
    "projection": "bench_projection",
    "distributed": "bench_distributed",
    "gpt2-memory": "bench_gpt2_124m_memory",
    "retrain": "bench_retrain",
    "ekfac-fidelity": "bench_ekfac_fidelity",
    "featurize": "bench_featurize",
    "hessian-memory": "bench_hessian_memory",
}


def main(argv: list[str] | None = None) -> int:
    """Run one benchmark and write its results files; returns the exit status."""
    parser = argparse.ArgumentParser(
        prog="run.py", description=__doc__.split("\n\n")[0],
        epilog="benchmarks: " + ", ".join(BENCHMARKS) + " (BENCHMARK --help for its options)")
    commands = parser.add_subparsers(dest="benchmark", required=True, metavar="BENCHMARK")
    modules = {}
    for name, module_name in BENCHMARKS.items():
        module = importlib.import_module(module_name)
        modules[name] = module
        sub = commands.add_parser(name, help=module.DESCRIPTION, description=module.DESCRIPTION,
                                  formatter_class=argparse.RawDescriptionHelpFormatter)
        sub.add_argument("--out", type=Path, default=HERE / "results",
                         help="results folder (default: recipes/speed/results)")
        module.add_arguments(sub)
    args = parser.parse_args(argv)
    started, info = dt.datetime.now(), machine()  # the header describes the run's start
    for result in modules[args.benchmark].run(args):
        path = write_result(args.out, result, info, started)
        print(f"[{args.benchmark}] wrote {path}" + (
            f" and {path.with_suffix('.json').name}" if result.payload is not None else ""),
            flush=True)
    return 0


def run_as_script(benchmark: str) -> int:
    """``python bench_<name>.py ARGS``: the same as ``run.py <name> ARGS``."""
    return main([benchmark, *sys.argv[1:]])


if __name__ == "__main__":
    sys.exit(main())
