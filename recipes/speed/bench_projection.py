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

Then, for the dense kinds, a side by side of the two generators of the dense map, interleaved
(new, old, new, old, ...; medians): ``new`` is today's ``DenseProjector`` (entries hashed from
counters with int64 tensor ops on the features' device), ``old`` the generator it replaced
(``_old_dense_project`` below, a copy: 1024-row units drawn on the CPU with a seeded
``torch.Generator`` (mt19937) and copied to the features' device). ``--device cuda`` times both
on a GPU (where the old one's CPU draw + copy was the bottleneck).

    python recipes/speed/run.py projection          # d in {1e5, 2e6}, p in {512, 2048}
    python recipes/speed/run.py projection --dims 100000 --proj-dims 512 --kinds sparse
    python recipes/speed/run.py projection --compare-only --dims 100000 500000

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


def _old_dense_project(x, p: int, seed: int, ensemble_id: int, kind: str,
                       block_rows: int = 16_384):
    """The dense projection as it was before the on-device generator (a copy, for the side by
    side): rows of the map drawn in units of 1024 from a CPU ``torch.Generator`` seeded per
    unit, then copied to ``x``'s device."""
    import torch

    seed_rows = 1024
    d = x.shape[1]

    def unit(u: int, rows: int):
        block_seed = (seed * 1_000_003 + ensemble_id * 10_007 + u * 97 + 12345) % (2**63 - 1)
        gen = torch.Generator().manual_seed(block_seed)
        if kind == "normal":
            return torch.randn(rows, p, generator=gen)
        bits = torch.randint(0, 2, (rows, p), generator=gen, dtype=torch.int8)
        return bits.to(torch.float32).mul_(2).sub_(1)

    out = torch.zeros(x.shape[0], p, dtype=torch.float32, device=x.device)
    for start in range(0, d, block_rows):
        stop = min(start + block_rows, d)
        parts = []
        for u in range(start // seed_rows, (stop - 1) // seed_rows + 1):
            lo = u * seed_rows
            mat = unit(u, min(seed_rows, d - lo))
            parts.append(mat[max(start - lo, 0):stop - lo])
        mat = (parts[0] if len(parts) == 1 else torch.cat(parts)).to(x.device)
        out.addmm_(x[:, start:stop].to(torch.float32), mat)
    return out.div_(p**0.5).to(x.dtype)


def compare_dense(kind: str, d: int, p: int, n: int, repeat: int, budget_s: float,
                  device: str = "cpu", seed: int = 0) -> dict:
    """Old vs new dense generator on the same input, interleaved; medians of ``repeat``."""
    import torch

    from hf_attrib.func.projection import DenseProjector

    def sync() -> None:
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=gen).to(device)
    new = DenseProjector(d, p, kind=kind)
    calls = {"new": lambda: new(x, ensemble_id=0),
             "old": lambda: _old_dense_project(x, p, 0, 0, kind)}
    times: dict[str, list[float]] = {"new": [], "old": []}
    ratios = {}
    spent = 0.0
    for r in range(repeat):
        for name, call in calls.items():
            sync()
            t0 = time.perf_counter()
            out = call()
            sync()
            times[name].append(time.perf_counter() - t0)
            spent += times[name][-1]
            if r == 0:
                ratio = (out.float().pow(2).sum(1) / x.pow(2).sum(1)).cpu()
                ratios[name] = (float(ratio.mean()), float(ratio.std()))
        if spent > budget_s:
            break
    new_s, old_s = statistics.median(times["new"]), statistics.median(times["old"])
    return {"kind": kind, "d": d, "p": p, "n": n, "device": device, "runs": len(times["new"]),
            "new_s": new_s, "old_s": old_s, "speedup": old_s / new_s,
            "new_times_s": times["new"], "old_times_s": times["old"],
            "new_ns_per_entry": new_s * 1e9 / (d * p), "old_ns_per_entry": old_s * 1e9 / (d * p),
            "norm_ratio_new": ratios["new"], "norm_ratio_old": ratios["old"]}


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
    parser.add_argument("--device", default="cpu",
                        help="device of the old-vs-new dense comparison (cpu, cuda)")
    parser.add_argument("--compare-only", action="store_true",
                        help="only the old-vs-new dense generator comparison")
    parser.add_argument("--no-compare", action="store_true",
                        help="skip the old-vs-new dense generator comparison")


def run(args: argparse.Namespace) -> list[Result]:
    """Time every (d, p, kind), then old vs new dense generator; one ``Result``."""
    import torch

    torch.set_num_threads(args.threads)
    rows, compared = [], []
    lines = ["| kind | d | p | n | first call (build + 1st) | steady call | |Px|^2/|x|^2 |",
             "|---|---|---|---|---|---|---|"]
    print(f"[projection] torch {torch.__version__}, {args.threads} threads, n={args.n}")
    for d in args.dims if not args.compare_only else []:
        for p in args.proj_dims:
            for kind in args.kinds:
                row = bench_one(kind, d, p, args.n, args.repeat, args.budget)
                rows.append(row)
                line = (f"| {kind} | {d:,} | {p} | {args.n} | {_fmt(row['first_call_s'])} | "
                        f"{_fmt(row['steady_call_s'])} | {row['norm_ratio_mean']:.3f} +- "
                        f"{row['norm_ratio_sd']:.3f} |")
                lines.append(line)
                print(line, flush=True)
    body = f"Threads: {args.threads}\n\n" + ("\n".join(lines) if rows else "")
    if not args.no_compare:
        table = [f"Dense map, old generator (CPU mt19937 + copy) vs new (on-device counter "
                 f"hash), device {args.device}, interleaved, medians:", "",
                 "| kind | d | p | n | runs | old | new | old/new | new ns/entry | "
                 "|Px|^2/|x|^2 new (old) |", "|---|---|---|---|---|---|---|---|---|---|"]
        print("\n".join(table[:1]))
        for d in args.dims:
            for p in args.proj_dims:
                for kind in (k for k in args.kinds if k != "sparse"):
                    c = compare_dense(kind, d, p, args.n, args.repeat, args.budget, args.device)
                    compared.append(c)
                    line = (f"| {kind} | {d:,} | {p} | {args.n} | {c['runs']} | "
                            f"{_fmt(c['old_s'])} | {_fmt(c['new_s'])} | {c['speedup']:.2f}x | "
                            f"{c['new_ns_per_entry']:.2f} | {c['norm_ratio_new'][0]:.3f} "
                            f"({c['norm_ratio_old'][0]:.3f}) |")
                    table.append(line)
                    print(line, flush=True)
        body += "\n\n" + "\n".join(table)
    return [Result("projection", "hf_attrib projector timings (CPU)", body,
                   {"threads": args.threads, "results": rows, "dense_old_vs_new": compared})]


if __name__ == "__main__":
    from run import run_as_script

    sys.exit(run_as_script("projection"))
