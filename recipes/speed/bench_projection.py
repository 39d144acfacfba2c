#!/usr/bin/env python
"""Timings of hf_attrib's random projectors on the CPU.

For every kind (``normal``, ``rademacher``, ``sparse``), feature dimension ``d`` and output
dimension ``p``, projects ``n`` random gradient-like vectors ``[n, d] -> [n, p]`` with
``hf_attrib.func.projection.make_projector(d, p, kind)`` and reports:

* ``first call``: building the projector plus its first projection (the sparse map draws its
  bucket/sign tables then; the dense maps draw their ``d x p`` entries on every call),
* ``steady call``: the median of the following calls (same ``ensemble_id``),
* ``|Px|^2/|x|^2``: mean and spread of the squared-norm ratio over the ``n`` vectors, a sanity
  check that the map is a JL map (should be ~1 +- sqrt(2/p)).

    python recipes/speed/run.py projection          # d in {1e5, 2e6}, p in {512, 2048}
    python recipes/speed/run.py projection --dims 100000 --proj-dims 512 --kinds sparse

Writes ``results/projection-<date>.md`` (+ ``.json``).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

from report import Result

DESCRIPTION = ("hf_attrib's random projectors (normal, rademacher, sparse) on the CPU: first "
               "and steady call times and the JL norm ratio, for d in {1e5, 2e6}, p in "
               "{512, 2048}, n = 32")
KINDS = ("normal", "rademacher", "sparse")


def bench_one(kind: str, d: int, p: int, n: int, repeat: int, budget_s: float,
              seed: int = 0) -> dict:
    """Time one projector kind on ``n`` random ``[d]`` vectors projected to ``p``."""
    import torch

    from hf_attrib.func.projection import make_projector

    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=gen)
    t0 = time.perf_counter()
    projector = make_projector(d, p, kind)
    out = projector(x, ensemble_id=0)
    first = time.perf_counter() - t0
    steady = []
    while len(steady) < repeat and (sum(steady) + first) < budget_s:
        t0 = time.perf_counter()
        again = projector(x, ensemble_id=0)
        steady.append(time.perf_counter() - t0)
        if not torch.equal(again, out):
            raise AssertionError(f"{kind} projector is not deterministic for d={d}, p={p}")
    ratio = (out.pow(2).sum(1) / x.pow(2).sum(1)).tolist()
    return {
        "kind": kind, "d": d, "p": p, "n": n,
        "first_call_s": first,
        "steady_call_s": statistics.median(steady) if steady else None,
        "steady_runs": len(steady),
        "norm_ratio_mean": statistics.fmean(ratio),
        "norm_ratio_sd": statistics.pstdev(ratio),
        "out_shape": list(out.shape),
    }


def _fmt(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    return f"{seconds * 1e3:.1f} ms" if seconds < 1 else f"{seconds:.2f} s"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``run.py projection``."""
    parser.add_argument("--kinds", nargs="+", default=list(KINDS), choices=KINDS)
    parser.add_argument("--dims", nargs="+", type=int, default=[100_000, 2_000_000])
    parser.add_argument("--proj-dims", nargs="+", type=int, default=[512, 2048])
    parser.add_argument("--n", type=int, default=32, help="vectors projected per call")
    parser.add_argument("--repeat", type=int, default=3, help="steady-state calls (median)")
    parser.add_argument("--budget", type=float, default=30.0,
                        help="stop repeating a configuration once it has used this many seconds")
    parser.add_argument("--threads", type=int, default=2)


def run(args: argparse.Namespace) -> list[Result]:
    """Time every (d, p, kind); one ``Result``."""
    import torch

    torch.set_num_threads(args.threads)
    rows = []
    lines = ["| kind | d | p | n | first call (build + 1st) | steady call | |Px|^2/|x|^2 |",
             "|---|---|---|---|---|---|---|"]
    print(f"[projection] torch {torch.__version__}, {args.threads} threads, n={args.n}")
    for d in args.dims:
        for p in args.proj_dims:
            for kind in args.kinds:
                row = bench_one(kind, d, p, args.n, args.repeat, args.budget)
                rows.append(row)
                line = (f"| {kind} | {d:,} | {p} | {args.n} | {_fmt(row['first_call_s'])} | "
                        f"{_fmt(row['steady_call_s'])} | {row['norm_ratio_mean']:.3f} +- "
                        f"{row['norm_ratio_sd']:.3f} |")
                lines.append(line)
                print(line, flush=True)
    body = f"Threads: {args.threads}\n\n" + "\n".join(lines)
    return [Result("projection", "hf_attrib projector timings (CPU)", body,
                   {"threads": args.threads, "results": rows})]


if __name__ == "__main__":
    from run import run_as_script

    sys.exit(run_as_script("projection"))
