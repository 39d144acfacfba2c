#!/usr/bin/env python
"""Peak memory of ``IFAttributorExplicit``'s Hessian: before and after the in-place build.

An MLP ``64 -> hidden... -> 10`` (the digits MLP: hidden 128, 64, 17,226 parameters) on
``--n`` random digits-shaped examples; ``cache()`` builds the float64 ``d x d`` Hessian and
its eigendecomposition. Each route runs in a fresh process, which reports its resident set
(RSS) before ``cache()`` (model, data, torch) and its peak RSS (``ru_maxrss``) after it:

* ``old``: the build as it was (a copy below, ``_old_prepare``): rows chunk by chunk, then
  ``torch.cat``, a gathered copy, ``(H + H^T) / 2`` and ``torch.linalg.eigh``;
* ``fast``: today's ``IFAttributorExplicit`` with ``max_hessian_bytes`` = 2 matrices: rows
  written into one preallocated matrix, symmetrised in place, LAPACK ``dsyevr`` on the
  matrix's own memory (a second matrix for the eigenvectors);
* ``in-place``: the same with ``max_hessian_bytes`` = 1 matrix: ``dsyev``, eigenvectors
  overwrite the matrix.

The figure is ``(peak - before) / matrix bytes``: extra memory per byte of Hessian.

    python recipes/speed/run.py hessian-memory                # digits MLP, 17,226 parameters
    python recipes/speed/run.py hessian-memory --hidden 48 32 # 5,018 parameters, ~1 min

Writes ``results/hessian-memory-<d>-<date>.md`` (+ ``.json``).
"""

from __future__ import annotations

import argparse
import itertools
import json
import subprocess
import sys
from pathlib import Path

from report import Result

DESCRIPTION = ("peak RSS of IFAttributorExplicit's Hessian build + eigendecomposition on an MLP "
               "(digits MLP, 17,226 parameters by default): the old build vs in place")
ROUTES = ("old", "fast", "in-place")


def _rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def _old_prepare(attributor, fns):
    """The explicit Hessian as ``IFAttributorExplicit._prepare`` built it before (a copy)."""
    import torch

    from hf_attrib.func.solvers import check_finite_solution

    d = fns.dim
    matvec = attributor._hessian_matvec(fns)
    blocks = [torch.zeros(0, d, dtype=torch.float64)]
    for start in range(0, d, attributor.rhs_chunk_size):
        stop = min(start + attributor.rhs_chunk_size, d)
        basis = torch.zeros(stop - start, d, dtype=fns.theta.dtype)
        basis[:, start:stop] = torch.eye(stop - start, dtype=fns.theta.dtype)
        blocks.append(matvec(basis).double())
    own_columns = torch.cat(blocks)
    del blocks
    hessian = own_columns.new_zeros((d, d))  # gather_rows with one process
    hessian[torch.arange(d)] = own_columns
    check_finite_solution(hessian, "IFAttributorExplicit's Hessian", "")
    hessian = (hessian + hessian.T) / 2
    return torch.linalg.eigh(hessian)


def child(route: str, hidden: list[int], n: int, threads: int) -> dict:
    """One route in this process: RSS before ``cache()``, peak after, the top eigenvalue."""
    import resource
    import time

    import torch
    from torch import nn
    from torch.utils.data import DataLoader, TensorDataset

    from hf_attrib.algorithm import IFAttributorExplicit
    from hf_attrib.task import AttributionTask

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    sizes = [64, *hidden, 10]
    layers: list[nn.Module] = []
    for a, b in itertools.pairwise(sizes):
        layers += [nn.Linear(a, b), nn.ReLU()]
    model = nn.Sequential(*layers[:-1]).eval()

    def loss(params, batch):
        x, y = batch
        return nn.functional.cross_entropy(torch.func.functional_call(model, params, x), y)

    g = torch.Generator().manual_seed(1)
    data = TensorDataset(torch.rand(n, 64, generator=g) * 16, torch.randint(0, 10, (n,),
                                                                             generator=g))
    loader = DataLoader(data, batch_size=250)
    task = AttributionTask(loss_func=loss, model=model, checkpoints=model.state_dict())
    d = sum(p.numel() for p in model.parameters())
    matrix = d * d * 8
    budget = {"old": 4 * matrix, "fast": 2 * matrix, "in-place": matrix}[route]
    attributor = IFAttributorExplicit(task, regularization=0.01, max_hessian_bytes=budget)
    if route == "old":
        attributor._prepare = lambda fns, _loader, _feats: _old_prepare(attributor, fns)
    before = _rss_bytes()
    t0 = time.perf_counter()
    attributor.cache(loader)
    seconds = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    values = attributor._states[0][0] if hasattr(attributor, "_states") else None
    top = float(values.max()) if values is not None else None
    return {"route": route, "params": d, "matrix_bytes": matrix, "rss_before": before,
            "peak_rss": peak, "extra_over_matrix": (peak - before) / matrix,
            "peak_over_matrix": peak / matrix, "seconds": seconds, "top_eigenvalue": top}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``run.py hessian-memory``."""
    parser.add_argument("--hidden", nargs="+", type=int, default=[128, 64],
                        help="hidden widths of the MLP (128 64: the digits MLP, 17,226 params)")
    parser.add_argument("--n", type=int, default=1000, help="training examples of the Hessian")
    parser.add_argument("--routes", nargs="+", default=list(ROUTES), choices=ROUTES)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--child", choices=ROUTES, help=argparse.SUPPRESS)


def _gb(x: float) -> str:
    return f"{x / 1e9:.2f} GB"


def run(args: argparse.Namespace) -> list[Result]:
    """Every route in its own process; one ``Result``."""
    rows = []
    for route in args.routes:
        cmd = [sys.executable, str(Path(__file__).resolve()), "--child", route,
               "--hidden", *map(str, args.hidden), "--n", str(args.n),
               "--threads", str(args.threads)]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True)
        row = json.loads(out.stdout.strip().splitlines()[-1])
        rows.append(row)
        print(f"[hessian-memory] {route}: d={row['params']:,} matrix {_gb(row['matrix_bytes'])} "
              f"before {_gb(row['rss_before'])} peak {_gb(row['peak_rss'])} "
              f"(extra {row['extra_over_matrix']:.2f}x the matrix) {row['seconds']:.1f} s",
              flush=True)
    d = rows[0]["params"]
    lines = [f"MLP 64-{'-'.join(map(str, args.hidden))}-10, {d:,} parameters, float64 Hessian "
             f"{_gb(rows[0]['matrix_bytes'])}, {args.n} random examples, {args.threads} threads",
             "", "| route | RSS before cache | peak RSS | (peak - before) / matrix | "
             "peak / matrix | cache time |", "|---|---|---|---|---|---|"]
    lines += [f"| {r['route']} | {_gb(r['rss_before'])} | {_gb(r['peak_rss'])} | "
              f"{r['extra_over_matrix']:.2f}x | {r['peak_over_matrix']:.2f}x | "
              f"{r['seconds']:.1f} s |" for r in rows]
    return [Result(f"hessian-memory-{d}", "IFAttributorExplicit: peak memory of the Hessian",
                   "\n".join(lines), {"hidden": args.hidden, "n": args.n, "results": rows})]


if __name__ == "__main__":
    if "--child" in sys.argv:
        parser = argparse.ArgumentParser()
        add_arguments(parser)
        a = parser.parse_args()
        print(json.dumps(child(a.child, a.hidden, a.n, a.threads)))
        sys.exit(0)
    from run import run_as_script

    sys.exit(run_as_script("hessian-memory"))
