#!/usr/bin/env python
"""Accuracy against time of CG self-influence: plain CG, block CG and (if installed) dattri.

On the digits MLP of the method benchmark (``cases.py``; 17,226 parameters, 500 training examples, the same
trained checkpoint), the exact self-influence
:math:`-\\tfrac1n g_i^\\top (H + \\lambda I)^{-1} g_i` is computed from the explicit Hessian
(float64, built from HVPs, solved by Cholesky, or LU where :math:`H + \\lambda I` is
indefinite), then every solver's ``cache`` + ``self_attribute`` is timed from a fresh
attributor and scored by its relative error against the exact values and its Spearman
correlation with them. dattri 0.3.0's ``IFAttributorCG`` solves against each Hessian batch
separately and sums the solutions (a different estimator, of another scale): its error is
reported after the best scalar fit, which can only flatter it.

    python recipes/speed/run.py cg-accuracy --regularization 0.3
    /work/venv-dattri/bin/python recipes/speed/run.py cg-accuracy   # adds dattri's CG

The explicit Hessian takes ~30 s and its solve 1-3 min on 2 cores; the result is cached in
the work directory. Writes ``results/cg-accuracy-reg<lambda>-<date>.md``.
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path
from typing import Any

from adapters import dattri_available, make_adapter
from cases import LoadedCase, load_case, prepare_case
from measure import warm_up_torch_func
from report import Result

DESCRIPTION = ("CG self-influence accuracy against time: plain and block CG at several "
               "iteration counts (and dattri's CG where importable) against the exact values "
               "of the explicit 17k x 17k Hessian of the digits MLP")
CASE = "mlp-digits"


def exact_self_influence(task: Any, loader: Any, regularization: float, cache: Path
                         ) -> tuple[Any, bool]:
    """Exact ``-1/n g_i^T (H + lambda I)^{-1} g_i`` and whether ``H + lambda I`` is PD.

    ``H`` is the training loss's Hessian at the task's first checkpoint, built column by
    column from HVPs and solved in float64 (Cholesky, or LU where indefinite).
    """
    import torch

    from hf_attrib.func.hvp_engine import HessianSum, hessian_columns

    if cache.exists():
        saved = torch.load(cache)
        return saved["values"], bool(saved["positive_definite"])
    fns = task.functions(0, None)
    batches = list(loader)
    n = sum(len(batch[0]) for batch in batches)
    # the per-example loss gradients IF caches, and the training-set Hessian it solves with
    grads = torch.cat([fns.loss_grads(batch) for batch in batches]).double()
    matvec = HessianSum(fns.loss, fns.theta, [(batch, len(batch[0]) / n) for batch in batches],
                        merge_batches=True)
    d = grads.shape[1]
    t0 = time.perf_counter()
    hessian = hessian_columns(matvec, d, range(d), 256, torch.float32, "cpu")
    hessian = (hessian + hessian.T) / 2 + regularization * torch.eye(d, dtype=torch.float64)
    print(f"[exact] Hessian {d} x {d} built in {time.perf_counter() - t0:.1f} s", flush=True)
    chol, info = torch.linalg.cholesky_ex(hessian)
    positive = int(info) == 0
    solution = (torch.cholesky_solve(grads.T, chol) if positive
                else torch.linalg.solve(hessian, grads.T)).T
    values = -(grads * solution).sum(1) / grads.shape[0]
    print(f"[exact] solved in {time.perf_counter() - t0:.1f} s (positive definite: {positive})",
          flush=True)
    torch.save({"values": values, "positive_definite": positive}, cache)
    return values, positive


def spearman(a: Any, b: Any) -> float:
    """Spearman rank correlation of two vectors."""
    import torch

    ranks = torch.stack([a.argsort().argsort(), b.argsort().argsort()]).double()
    return float(torch.corrcoef(ranks)[0, 1])


def errors(values: Any, exact: Any, fit_scale: bool) -> tuple[float, float]:
    """Relative L2 error against ``exact`` (after the best scalar fit with ``fit_scale``) and
    the Spearman correlation."""
    values = values.detach().double()
    if fit_scale:  # least-squares scalar: removes a different normalisation or sign
        values = values * (values @ exact) / (values @ values)
    return float((values - exact).norm() / exact.norm()), spearman(values, exact)


def run_hf(task: Any, loader: Any, regularization: float, block: bool, max_iter: int
           ) -> tuple[float, Any]:
    """Seconds and values of a fresh IF-CG attributor's ``cache`` + ``self_attribute``."""
    from hf_attrib.algorithm.registry import make_attributor

    t0 = time.perf_counter()
    attributor = make_attributor("if-cg", task, regularization=regularization,
                                 max_iter=max_iter, block=block)
    attributor.cache(loader)
    values = attributor.self_attribute(loader)
    return time.perf_counter() - t0, values


def run_dattri(case: LoadedCase, regularization: float, max_iter: int) -> tuple[float, Any]:
    """The same for dattri 0.3.0's ``IFAttributorCG`` (one-batch ``self_attribute``)."""
    from torch.utils.data import DataLoader

    params = {"method": "if-cg", "max_iter": max_iter, "regularization": regularization}
    t0 = time.perf_counter()
    attributor = make_adapter("dattri").build(params, case, case.info["models"][:1])
    attributor.cache(case.train_loader)
    # one batch: dattri 0.3.0's inner-product self_attribute needs it (see adapters.py)
    values = attributor.self_attribute(DataLoader(case.train_set, batch_size=len(case.train_set),
                                                  shuffle=False))
    return time.perf_counter() - t0, values


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``run.py cg-accuracy``."""
    parser.add_argument("--regularization", type=float, default=0.3)
    parser.add_argument("--cg-iters", nargs="+", type=int, default=[5, 10, 20])
    parser.add_argument("--block-iters", nargs="+", type=int, default=[1, 2, 3])
    parser.add_argument("--dattri-iters", type=int, default=10)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=2, help="timed runs per row (min)")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/hf_attrib_cg_accuracy"))


def run(args: argparse.Namespace) -> list[Result]:
    """Time and score every solver row; one ``Result``."""
    import torch

    from hf_attrib.task import AttributionTask

    torch.set_num_threads(args.threads)
    warnings.simplefilter("ignore", RuntimeWarning)  # the indefinite-system warning, by design
    args.workdir.mkdir(parents=True, exist_ok=True)
    warm_up_torch_func()
    if not (args.workdir / f"{CASE}-info.json").exists():
        prepare_case(CASE, False, args.workdir, args.threads, 0)
    case = load_case(CASE, args.workdir)
    info, loader = case.info, case.train_loader
    task = AttributionTask(loss_func=case.fns["loss"], model=case.model,
                           checkpoints=info["models"][:1])
    lam = args.regularization
    exact, positive = exact_self_influence(task, loader, lam,
                                           args.workdir / f"exact-{lam:g}.pt")
    run_hf(task, loader, lam, True, 1)  # untimed warm-up of the code paths

    rows = []
    solvers = [("hf_attrib CG", False, it) for it in args.cg_iters]
    solvers += [("hf_attrib block CG", True, it) for it in args.block_iters]
    for name, block, it in solvers:
        times = []
        for _ in range(args.repeat):
            seconds, values = run_hf(task, loader, lam, block, it)
            times.append(seconds)
        rows.append((name, it, min(times), *errors(values, exact, fit_scale=False)))
        print(f"[run] {rows[-1]}", flush=True)
    have_dattri, why = dattri_available()
    if not have_dattri:
        print(f"[run] {why}: its row is skipped")
    else:
        seconds, values = run_dattri(case, lam, args.dattri_iters)
        rows.append(("dattri 0.3.0 CG", args.dattri_iters, seconds,
                     *errors(values, exact, fit_scale=True)))
        print(f"[run] {rows[-1]}", flush=True)

    dattri_s = next((r[2] for r in rows if r[0].startswith("dattri")), None)
    lines = [
        f"Threads {args.threads}; H + lambda I positive definite: {positive}",
        "",
        "Time: fresh attributor, `cache` + `self_attribute` of all training examples (min of "
        f"{args.repeat} runs for hf_attrib, 1 for dattri). Error: relative L2 error of the "
        "self-influence values against the exact ones (explicit Hessian, float64); dattri's "
        "after the best scalar fit. Spearman: rank correlation with the exact values.",
        "",
        "| solver | iterations | cache+self_attribute (s) | relative error | Spearman |"
        + (" dattri time / this |" if dattri_s else ""),
        "|---|---|---|---|---|" + ("---|" if dattri_s else ""),
    ]
    for name, it, seconds, err, rho in rows:
        ratio = f" {dattri_s / seconds:.1f}x |" if dattri_s else ""
        lines.append(f"| {name} | {it} | {seconds:.2f} | {err:.2e} | {rho:.4f} |{ratio}")
    body = "\n".join(lines)
    print("\n" + body)
    title = (f"CG self-influence: accuracy against time (digits MLP, {info['n_params']} params, "
             f"n_train {info['n_train']}, regularization {lam:g})")
    return [Result(f"cg-accuracy-reg{lam:g}", title, body)]


if __name__ == "__main__":
    from run import run_as_script

    sys.exit(run_as_script("cg-accuracy"))
