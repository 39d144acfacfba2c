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

    python recipes/speed/bench_projection.py                      # d in {1e5, 2e6}, p in {512, 2048}
    python recipes/speed/bench_projection.py --dims 100000 --proj-dims 512 --kinds sparse
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import statistics
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
# Measure the hf_attrib of this checkout, whatever an editable install elsewhere points to.
if (HERE.parents[1] / "hf_attrib").is_dir():
    sys.path.insert(0, str(HERE.parents[1]))

from hf_attrib.func.projection import make_projector  # noqa: E402

KINDS = ("normal", "rademacher", "sparse")


def bench_one(kind: str, d: int, p: int, n: int, repeat: int, budget_s: float,
              seed: int = 0) -> dict:
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kinds", nargs="+", default=list(KINDS), choices=KINDS)
    parser.add_argument("--dims", nargs="+", type=int, default=[100_000, 2_000_000])
    parser.add_argument("--proj-dims", nargs="+", type=int, default=[512, 2048])
    parser.add_argument("--n", type=int, default=32, help="vectors projected per call")
    parser.add_argument("--repeat", type=int, default=3, help="steady-state calls (median)")
    parser.add_argument("--budget", type=float, default=30.0,
                        help="stop repeating a configuration once it has used this many seconds")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=HERE / "results")
    args = parser.parse_args(argv)

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
    table = "\n".join(lines)
    cmdline = " ".join([Path(sys.executable).as_posix(), *sys.argv])
    text = (f"# hf_attrib projector timings (CPU)\n\nCommand: `{cmdline}`  \n"
            f"Date: {_dt.datetime.now().isoformat(timespec='seconds')}; torch {torch.__version__}"
            f", {args.threads} threads\n\n{table}\n")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "projection.md").write_text(text)
    (args.out / "projection.json").write_text(json.dumps(
        {"command": cmdline, "threads": args.threads, "results": rows}, indent=1))
    print(f"\n[projection] wrote {args.out / 'projection.md'} and projection.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
