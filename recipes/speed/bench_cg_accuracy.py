#!/usr/bin/env python
"""Accuracy against time of CG self-influence: plain CG, block CG and (if installed) dattri.

On the digits MLP of ``bench_methods.py`` (17,226 parameters, 500 training examples, the same
trained checkpoint), the exact self-influence
:math:`-\\tfrac1n g_i^\\top (H + \\lambda I)^{-1} g_i` is computed from the explicit Hessian
(float64, built from HVPs, solved by Cholesky, or LU where :math:`H + \\lambda I` is
indefinite), then every solver's ``cache`` + ``self_attribute`` is timed from a fresh
attributor and scored by its relative error against the exact values and its Spearman
correlation with them. dattri 0.3.0's ``IFAttributorCG`` solves against each Hessian batch
separately and sums the solutions (a different estimator, of another scale): its error is
reported after the best scalar fit, which can only flatter it.

    python recipes/speed/bench_cg_accuracy.py --regularization 0.3
    /work/venv-dattri/bin/python recipes/speed/bench_cg_accuracy.py   # adds dattri's CG

The explicit Hessian takes ~30 s and its solve 1-3 min on 2 cores; the result is cached in
the work directory.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
if (HERE.parents[1] / "hf_attrib").is_dir():
    sys.path.insert(0, str(HERE.parents[1]))

import bench_methods as bm  # noqa: E402

from hf_attrib.algorithm import IFAttributorCG  # noqa: E402
from hf_attrib.func.hessian import hessian_columns  # noqa: E402
from hf_attrib.task import AttributionTask  # noqa: E402


def load_case(workdir: Path, threads: int) -> tuple[dict, dict, torch.nn.Module, dict]:
    if not (workdir / "mlp-digits-info.json").exists():
        bm.prepare_case("mlp-digits", False, workdir, threads, 0)
    from safetensors.torch import load_file

    info = json.loads((workdir / "mlp-digits-info.json").read_text())
    model = bm.build_model("mlp-digits", info)
    model.eval()
    return info, load_file(info["data"]), model, bm.user_functions("mlp-digits", model)


def exact_self_influence(task: AttributionTask, loader, regularization: float,
                         cache: Path) -> tuple[torch.Tensor, bool]:
    """Exact ``-1/n g_i^T (H + lambda I)^{-1} g_i`` and whether ``H + lambda I`` is PD."""
    if cache.exists():
        saved = torch.load(cache)
        return saved["values"], bool(saved["positive_definite"])
    attributor = IFAttributorCG(task, regularization=regularization)
    attributor.cache(loader)
    fns = task.functions(0, None)
    grads = attributor._train_cache[0][0].double()  # the cached per-example loss gradients
    d = grads.shape[1]
    t0 = time.perf_counter()
    hessian = hessian_columns(attributor._hessian_matvec(fns), d, range(d), 256,
                              torch.float32, "cpu")
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


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    ranks = torch.stack([a.argsort().argsort(), b.argsort().argsort()]).double()
    return float(torch.corrcoef(ranks)[0, 1])


def errors(values: torch.Tensor, exact: torch.Tensor, fit_scale: bool) -> tuple[float, float]:
    values = values.detach().double()
    if fit_scale:  # least-squares scalar: removes a different normalisation or sign
        values = values * (values @ exact) / (values @ values)
    return float((values - exact).norm() / exact.norm()), spearman(values, exact)


def run_hf(task, loader, regularization: float, block: bool, max_iter: int
           ) -> tuple[float, torch.Tensor]:
    t0 = time.perf_counter()
    attributor = IFAttributorCG(task, regularization=regularization, max_iter=max_iter,
                                block=block)
    attributor.cache(loader)
    values = attributor.self_attribute(loader)
    return time.perf_counter() - t0, values


def run_dattri(model, fns, info, data, regularization: float, max_iter: int
               ) -> tuple[float, torch.Tensor]:
    from torch.utils.data import DataLoader, TensorDataset

    train = TensorDataset(data["x_train"], data["y_train"])
    mp = {"kind": "if-cg", "max_iter": max_iter, "regularization": regularization}
    t0 = time.perf_counter()
    attributor = bm.build_dattri("mlp-digits", mp, model, fns, info["models"][:1], info)
    attributor.cache(DataLoader(train, batch_size=info["train_batch"], shuffle=False))
    # one batch: dattri 0.3.0's inner-product self_attribute needs it (see bench_methods.py)
    values = attributor.self_attribute(DataLoader(train, batch_size=len(train), shuffle=False))
    return time.perf_counter() - t0, values


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--regularization", type=float, default=0.3)
    parser.add_argument("--cg-iters", nargs="+", type=int, default=[5, 10, 20])
    parser.add_argument("--block-iters", nargs="+", type=int, default=[1, 2, 3])
    parser.add_argument("--dattri-iters", type=int, default=10)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=2, help="timed runs per row (min)")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/hf_attrib_cg_accuracy"))
    parser.add_argument("--out", type=Path, default=HERE / "results")
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    warnings.simplefilter("ignore", RuntimeWarning)  # the indefinite-system warning, by design
    args.workdir.mkdir(parents=True, exist_ok=True)
    bm._warm_up_torch_func()
    info, data, model, fns = load_case(args.workdir, args.threads)
    from torch.utils.data import DataLoader, TensorDataset

    loader = DataLoader(TensorDataset(data["x_train"], data["y_train"]),
                        batch_size=info["train_batch"], shuffle=False)
    task = AttributionTask(loss_func=fns["loss"], model=model, checkpoints=info["models"][:1])
    lam = args.regularization
    exact, positive = exact_self_influence(task, loader, lam,
                                           args.workdir / f"exact-{lam:g}.pt")
    run_hf(task, loader, lam, True, 1)  # untimed warm-up of the code paths

    rows = []
    cases = [("hf_attrib CG", False, it) for it in args.cg_iters]
    cases += [("hf_attrib block CG", True, it) for it in args.block_iters]
    for name, block, it in cases:
        times = []
        for _ in range(args.repeat):
            seconds, values = run_hf(task, loader, lam, block, it)
            times.append(seconds)
        rows.append((name, it, min(times), *errors(values, exact, fit_scale=False)))
        print(f"[run] {rows[-1]}", flush=True)
    try:
        import dattri  # noqa: F401
    except ImportError:
        print("[run] dattri not importable: its row is skipped")
    else:
        seconds, values = run_dattri(model, fns, info, data, lam, args.dattri_iters)
        rows.append(("dattri 0.3.0 CG", args.dattri_iters, seconds,
                     *errors(values, exact, fit_scale=True)))
        print(f"[run] {rows[-1]}", flush=True)

    dattri_s = next((r[2] for r in rows if r[0].startswith("dattri")), None)
    lines = [
        f"# CG self-influence: accuracy against time (digits MLP, {info['n_params']} params, "
        f"n_train {info['n_train']}, regularization {lam:g})",
        "",
        f"Command: `{' '.join([Path(sys.executable).name, *sys.argv])}`  ",
        f"Date: {time.strftime('%Y-%m-%dT%H:%M:%S')}; threads {args.threads}; "
        f"torch {torch.__version__}; H + lambda I positive definite: {positive}",
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
    text = "\n".join(lines) + "\n"
    print("\n" + text)
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"cg_accuracy_reg{lam:g}.md"
    path.write_text(text)
    print(f"[bench] wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
