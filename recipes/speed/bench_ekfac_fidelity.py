#!/usr/bin/env python
"""Fidelity of EK-FAC influence on ``digits-mlp``: LDS against kronfluence, IF-CG and TRAK.

Issue 14's acceptance "Fidelity": on the ``digits_mlp`` benchmark setting (1,000 training /
200 test digits, MLP 64-128-64-10, 17,226 parameters), the same trained checkpoint, the same
examples and the same LDS ground truth as ``hf-attrib bench run digits-mlp``, this benchmark
scores

* kronfluence's EK-FAC with its defaults (``FactorArguments()``: strategy ``"ekfac"``, true
  Fisher with sampled labels; ``ScoreArguments()``: damping ``1e-8``), where importable, and
  with its heuristic damping (``damping_factor=None``: 0.1 x the mean eigenvalue) as a check;
* hf_attrib's IF-CG at the runner's default and over its grid (``runner.SEARCH``);
* hf_attrib's EK-FAC and K-FAC (registry ``if-ekfac`` / ``if-kfac``) where registered;
* TRAK with the runner's dense projection and with the factored one (``proj_type
  "factored"``) at the same total dimension, where the factored projector exists.

Everything the benchmark setting defines is reused from ``hf_attrib.benchmark`` (data, model,
training, ground truth, methods' defaults and wiring); nothing is re-implemented here. The
checkpoint is the runner's full-data model of this setting (``loo-full``: the LOO build's
full model, trained on stream 0 whatever the number of LOO models, so this benchmark trains
only one LOO model; ``--workdir`` may point at a ``bench run digits-mlp`` output folder to
reuse its ground truth as it is).

kronfluence is the competition, never a dependency: it is imported only in this process and
only when installed (see ``README.md`` here); without it its row says why and the rest runs::

    python -m venv --system-site-packages /work/venvs/kf
    /work/venvs/kf/bin/pip install --no-deps kronfluence==1.0.1 einops opt-einsum einconv
    OMP_NUM_THREADS=1 /work/venvs/kf/bin/python recipes/speed/run.py ekfac-fidelity --threads 1

Sign conventions: hf_attrib's ``score[i, j]`` is how much including training example ``i``
raises the target of test example ``j`` (here the margin ``log p/(1-p)`` of the true class).
kronfluence's pairwise score is ``grad f(test)^T (G + damping I)^-1 grad L(train_i)``, with
``f`` the measurement of its ``Task``, which is the first-order change of ``f`` when example
``i`` is *removed* (its README: with the loss as measurement, positive = helpful). With the
margin as measurement, our score is therefore minus kronfluence's; the results file also
reports the LDS of the other sign as a check. Writes
``results/ekfac-fidelity-digits-mlp-<date>.md`` (+ ``.json``).
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from report import Result

DESCRIPTION = ("LDS on digits-mlp of kronfluence's EK-FAC (defaults; where installed), "
               "hf_attrib's IF-CG (runner default and grid), EK-FAC and K-FAC, and TRAK with the "
               "dense vs the factored projection at the same dimension")
SETTING = "digits_mlp"
# The rows this benchmark can run, in the table's order.
ROWS = ("kronfluence-ekfac", "if-cg", "if-ekfac", "if-kfac", "trak-dense", "trak-factored")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The benchmark's options."""
    parser.add_argument("--rows", nargs="+", choices=ROWS, default=list(ROWS),
                        help="which rows to run (default: all)")
    parser.add_argument("--workdir", type=Path, default=Path("bench-out/ekfac-fidelity"),
                        help="ground truth and kronfluence's factors (default: "
                             "bench-out/ekfac-fidelity; a `bench run digits-mlp` --out folder "
                             "reuses its ground truth)")
    parser.add_argument("--no-search", action="store_true",
                        help="hf_attrib methods at their default only (no grid)")
    parser.add_argument("--proj-dim", type=int, default=512,
                        help="TRAK's target projection dimension (default 512, the runner's): "
                             "the factored projection's factor_dim is the one whose total "
                             "width is nearest, and the dense row uses exactly that width")
    parser.add_argument("--factor-dim", type=int, default=None,
                        help="the factored projection's k (default: from --proj-dim)")
    parser.add_argument("--factored-option", action="append", default=[], metavar="KEY=VALUE",
                        help="extra projector option of the factored TRAK row (repeatable; "
                             "VALUE parsed as int/float when it is one)")
    parser.add_argument("--trak-models", type=int, default=10,
                        help="TRAK ensemble size: the first k LDS subset models, as the "
                             "runner's trak-k (default 10: less projection noise than 1)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    parser.add_argument("--smoke", action="store_true",
                        help="the setting's smoke version (a pipeline check, not a benchmark)")


# --------------------------------------------------------------------------------------------
# The setting: the runner's data, checkpoint and ground truth
# --------------------------------------------------------------------------------------------
def prepare_setting(workdir: Path, smoke: bool) -> dict[str, Any]:
    """The runner's digits-mlp: prepared data and model, its full-data checkpoint, the LDS
    ground truth, the loaders and the attribution task (as ``run_benchmark`` builds them)."""
    from torch.utils.data import DataLoader, TensorDataset

    from hf_attrib.benchmark.data import data_fingerprint
    from hf_attrib.benchmark.runner import build_ground_truth, check_writable, prepare
    from hf_attrib.benchmark.stacked import evaluate_models, load_models, select_models, unstack
    from hf_attrib.model_utils.retraining import load_subsets
    from hf_attrib.task import AttributionTask

    gt_dir = check_writable(workdir, "--workdir") / "ground_truth"
    prep = prepare(SETTING, smoke=smoke)
    setting, model, fns = prep.setting, prep.model, prep.fns
    # The full-data model does not depend on how many LOO models share its stream: one LOO
    # model is enough to get the runner's checkpoint. An existing full build is used as it is.
    if not any((gt_dir / "loo-full").glob("block-*.safetensors")):
        build_ground_truth(prep, gt_dir, "loo", loo_examples=1)
    full_state = unstack(load_models(model, gt_dir, "loo-full"), 0)
    build_ground_truth(prep, gt_dir, "lds")
    lds_models = load_models(model, gt_dir, "lds")
    masks, _ = load_subsets(gt_dir, "lds")
    gt_ids = list(setting.ground_truth_model_ids)
    values = evaluate_models(model, select_models(lds_models, gt_ids), prep.xt, prep.yt,
                             fns["target"])
    batch = 250  # the runner's classification batch
    return {
        "prep": prep, "full_state": full_state, "lds_models": lds_models,
        "ground_truth": (values, masks[gt_ids]),
        "train_loader": DataLoader(TensorDataset(prep.x, prep.y), batch_size=batch),
        "test_loader": DataLoader(TensorDataset(prep.xt, prep.yt), batch_size=batch),
        "task": AttributionTask(loss_func=fns["loss"], model=model, checkpoints=[full_state],
                                target_func=fns["margin"]),
        "fingerprint": data_fingerprint(prep.data),
    }


def score_row(method: str, params: dict[str, Any], score: Any, seconds: float,
              ground_truth: Any, note: str = "") -> dict[str, Any]:
    """LDS (with the runner's bootstrap interval) of one score matrix, as a table row."""
    from hf_attrib.benchmark.runner import CI_LEVEL
    from hf_attrib.metrics import lds

    result = lds(score, ground_truth, ci=CI_LEVEL)
    return {"method": method, "params": params, "lds": float(result.mean),
            "lds_ci": list(result.ci) if result.ci is not None else None,
            "seconds": seconds, "note": note, "score": score}


def timed(build: Callable[[], Any], train_loader: Any, test_loader: Any) -> tuple[Any, float]:
    """``build()``, ``cache(train)`` and ``attribute(train, test)`` on one clock: the runner's
    "seconds" of a method."""
    start = time.perf_counter()
    attributor = build()
    attributor.cache(train_loader)
    score = attributor.attribute(train_loader, test_loader)
    return score, time.perf_counter() - start


# --------------------------------------------------------------------------------------------
# hf_attrib's methods
# --------------------------------------------------------------------------------------------
def method_grid(name: str, search: bool) -> tuple[dict[str, Any], list[dict[str, Any]]] | None:
    """``(default, grid)`` of a method: the runner's (``DEFAULTS``/``SEARCH``) where it
    benchmarks it, else the registry's; ``None`` when the method is not registered."""
    from hf_attrib.algorithm import get_method
    from hf_attrib.benchmark.runner import DEFAULTS, SEARCH

    if name in DEFAULTS:
        default, grid = dict(DEFAULTS[name]), [dict(p) for p in SEARCH[name]]
    else:
        try:
            spec = get_method(name)
        except (KeyError, ValueError):  # the registry's "unknown method" (ValueError today)
            return None
        default, grid = {}, [dict(p) for p in spec.search]
    grid = [p for p in grid if p != default] if search else []
    return default, [default, *grid]


def run_hf_method(name: str, ctx: dict[str, Any], search: bool, device: str
                  ) -> list[dict[str, Any]]:
    """Rows of an hf_attrib IF method at its default and (``search``) over its grid."""
    from hf_attrib.algorithm import make_attributor as registry_attributor
    from hf_attrib.benchmark.runner import METHODS
    from hf_attrib.benchmark.runner import make_attributor as runner_attributor

    grids = method_grid(name, search)
    if grids is None:
        print(f"[ekfac-fidelity] {name}: not available (not in hf_attrib's registry)",
              flush=True)
        return [{"method": name, "params": {}, "lds": None, "note": "not available"}]
    default, grid = grids
    prep, task = ctx["prep"], ctx["task"]

    def build(params: dict[str, Any]) -> Any:
        if name in METHODS:  # the runner's wiring (e.g. its defaults' names)
            return runner_attributor(name, task, prep.fns, device, len(prep.x), params)
        return registry_attributor(name, task, device=device, **params)

    rows = []
    for params in grid:
        try:
            score, seconds = timed(lambda p=params: build(p), ctx["train_loader"],
                                   ctx["test_loader"])
        except Exception as err:  # one failing setting must not lose the others
            rows.append({"method": name, "params": params, "lds": None,
                         "note": f"failed: {type(err).__name__}: {err}"})
        else:
            rows.append(score_row(name, params, score, seconds, ctx["ground_truth"],
                                  "default" if params is default else "grid"))
        print(f"[ekfac-fidelity] {name} {params}: {_outcome(rows[-1])}", flush=True)
    return rows


def factored_width(model: Any, factor_dim: int) -> int:
    """Feature width of the factored projection with ``factor_dim`` ``k`` on ``model``'s
    ``nn.Linear`` layers: ``min(k, out) * min(k, in)`` per weight, ``min(k, out)`` per bias
    (``hf_attrib.func.factored_projection``: a side no larger than ``k`` is kept whole)."""
    from torch import nn

    width = 0
    for module in model.modules():
        if isinstance(module, nn.Linear):
            rows, cols = min(factor_dim, module.out_features), min(factor_dim, module.in_features)
            width += rows * cols + (rows if module.bias is not None else 0)
    return width


def matched_dimension(model: Any, proj_dim: int, factor_dim: int | None) -> tuple[int, int]:
    """``(factor_dim, width)``: the given ``factor_dim``, or the one whose factored width is
    nearest ``proj_dim``; the dense row then projects to exactly that width."""
    if factor_dim is None:
        factor_dim = min(range(1, proj_dim + 1),
                         key=lambda k: (abs(factored_width(model, k) - proj_dim), k))
    return factor_dim, factored_width(model, factor_dim)


def run_trak(kind: str, ctx: dict[str, Any], args: argparse.Namespace) -> list[dict[str, Any]]:
    """TRAK-k as the runner builds it (first k LDS models, its damping conversion), with its
    dense projection (``kind="dense"``) or the factored one, both at the same total dimension
    (the factored projection's width, ``matched_dimension``)."""
    from hf_attrib.benchmark.runner import DEFAULTS
    from hf_attrib.benchmark.runner import make_attributor as runner_attributor
    from hf_attrib.benchmark.stacked import unstack
    from hf_attrib.task import AttributionTask

    prep = ctx["prep"]
    k = min(args.trak_models, len(prep.setting.ensemble_model_ids))
    task = AttributionTask(loss_func=prep.fns["loss"], model=prep.model,
                           checkpoints=[unstack(ctx["lds_models"], i) for i in range(k)],
                           target_func=prep.fns["margin"])
    factor_dim, width = matched_dimension(prep.model, args.proj_dim, args.factor_dim)
    params = {**DEFAULTS["trak"], "proj_dim": width}
    method = f"trak-{k}-{kind}"
    factored = {"proj_type": "factored", "factor_dim": factor_dim,
                **dict(_option(o) for o in args.factored_option)}

    def build() -> Any:
        dense = runner_attributor(f"trak-{k}", task, prep.fns, args.device, len(prep.x), params)
        if kind == "dense":
            return dense
        # The same class, probability function and damping (the runner's lambda for this
        # width), only another projector of the same total dimension.
        return type(dense)(task, device=args.device,
                           correct_probability_func=prep.fns["prob"],
                           projector_kwargs=factored, regularization=dense.regularization)

    shown = {**params, **(factored if kind == "factored" else {})}
    try:
        score, seconds = timed(build, ctx["train_loader"], ctx["test_loader"])
    except Exception as err:
        unknown = "factored" in str(err) and kind == "factored"
        note = ("not available (proj_type 'factored': "
                f"{type(err).__name__}: {err})" if unknown
                else f"failed: {type(err).__name__}: {err}")
        row = {"method": method, "params": shown, "lds": None, "note": note}
    else:
        row = score_row(method, shown, score, seconds, ctx["ground_truth"])
    print(f"[ekfac-fidelity] {method}: {_outcome(row)}", flush=True)
    return [row]


def _option(text: str) -> tuple[str, Any]:
    """``"factor_dim=16"`` -> ``("factor_dim", 16)``."""
    key, sep, value = text.partition("=")
    if not sep:
        raise SystemExit(f"--factored-option {text!r}: expected KEY=VALUE, e.g. factor_dim=16.")
    for kind in (int, float):
        try:
            return key, kind(value)
        except ValueError:
            pass
    return key, value


# --------------------------------------------------------------------------------------------
# kronfluence (the competition; imported only here, only when installed)
# --------------------------------------------------------------------------------------------
def kronfluence_version() -> str | None:
    """kronfluence's version, or ``None`` when it cannot be imported."""
    try:
        import kronfluence  # noqa: F401
    except ImportError:
        return None
    from importlib.metadata import version

    return version("kronfluence")


# kronfluence's ScoreArguments default damping, and its heuristic (0.1 x the mean eigenvalue)
# that ``damping_factor=None`` selects: the first is the criterion's row, the second a check.
KRONFLUENCE_DAMPINGS = (("default", 1e-8), ("heuristic", None))


def kronfluence_scores(ctx: dict[str, Any], workdir: Path, device: str
                       ) -> list[tuple[str, float | None, Any, float]]:
    """kronfluence's EK-FAC pairwise scores ``[n_test, n_train]`` with its defaults, once per
    damping of :data:`KRONFLUENCE_DAMPINGS`: ``(label, damping, scores, seconds)``, the
    seconds being fitting the factors (once, shared) plus that scoring (as our rows: cache +
    attribute).

    Its ``Task``: the training loss summed over the batch (kronfluence's convention; with
    ``sample=True`` labels drawn from the model, for its default true Fisher) and the setting's
    target, the true-class margin, as the measurement.
    """
    import torch
    from kronfluence.analyzer import Analyzer, prepare_model
    from kronfluence.arguments import FactorArguments, ScoreArguments
    from kronfluence.task import Task

    from hf_attrib.benchmark.builders import load_state
    from hf_attrib.func.targets import correct_class_margin

    class DigitsTask(Task):
        def compute_train_loss(self, batch: Any, model: Any, sample: bool = False) -> Any:
            x, y = batch
            logits = model(x).logits
            if sample:
                with torch.no_grad():
                    y = torch.multinomial(torch.softmax(logits.detach(), -1), 1).flatten()
            return torch.nn.functional.cross_entropy(logits, y, reduction="sum")

        def compute_measurement(self, batch: Any, model: Any) -> Any:
            x, y = batch
            return correct_class_margin(model(x).logits, y).sum()

    prep = ctx["prep"]
    model = copy.deepcopy(prep.model)  # prepare_model wraps modules and freezes in place
    load_state(model, ctx["full_state"])
    task = DigitsTask()
    train, test = ctx["train_loader"].dataset, ctx["test_loader"].dataset
    batch = ctx["train_loader"].batch_size
    torch.manual_seed(0)  # the sampled labels of the true Fisher
    start = time.perf_counter()
    model = prepare_model(model, task)
    analyzer = Analyzer(analysis_name=SETTING, model=model, task=task, cpu=device == "cpu",
                        disable_tqdm=True, output_dir=str(workdir / "kronfluence"))
    analyzer.fit_all_factors(factors_name="ekfac", dataset=train, per_device_batch_size=batch,
                             factor_args=FactorArguments(), overwrite_output_dir=True)
    fit_seconds = time.perf_counter() - start
    out = []
    for label, damping in KRONFLUENCE_DAMPINGS:
        start = time.perf_counter()
        analyzer.compute_pairwise_scores(
            scores_name=f"pairwise-{label}", factors_name="ekfac", query_dataset=test,
            train_dataset=train, per_device_query_batch_size=batch,
            per_device_train_batch_size=batch,
            score_args=ScoreArguments(damping_factor=damping), overwrite_output_dir=True)
        scores = analyzer.load_pairwise_scores(f"pairwise-{label}")["all_modules"]
        out.append((label, damping, scores.to(torch.float32).cpu(),
                    fit_seconds + time.perf_counter() - start))
    return out


def run_kronfluence(ctx: dict[str, Any], workdir: Path, device: str) -> list[dict[str, Any]]:
    """The kronfluence rows (our sign: minus its score), or a row saying why they are missing."""
    from hf_attrib.metrics import lds

    name = "kronfluence-ekfac"
    found = kronfluence_version()
    if found is None:
        print("[ekfac-fidelity] kronfluence is not importable in this Python: its row is "
              "skipped (run with /work/venvs/kf/bin/python, see the module docstring)",
              flush=True)
        return [{"method": name, "params": {}, "lds": None,
                 "note": "not available (kronfluence not importable)"}]
    params = {"kronfluence": found, "strategy": "ekfac", "fisher": "true (sampled labels)"}
    try:
        results = kronfluence_scores(ctx, workdir, device)
    except Exception as err:
        row = {"method": name, "params": params, "lds": None,
               "note": f"failed: {type(err).__name__}: {err}"}
        print(f"[ekfac-fidelity] {name}: {_outcome(row)}", flush=True)
        return [row]
    rows = []
    for label, damping, kf, seconds in results:
        score = -kf.T  # see the module docstring: removal effect -> inclusion effect
        flipped = lds(-score, ctx["ground_truth"]).mean
        damped = {**params, "damping_factor": "0.1 x mean eigenvalue" if damping is None
                  else damping}
        rows.append(score_row(name, damped, score, seconds, ctx["ground_truth"],
                              f"{label} damping; LDS with kronfluence's own sign: "
                              f"{flipped:.3f}"))
        print(f"[ekfac-fidelity] {name} ({label} damping): {_outcome(rows[-1])}", flush=True)
    return rows


# --------------------------------------------------------------------------------------------
# The table
# --------------------------------------------------------------------------------------------
def _outcome(row: dict[str, Any]) -> str:
    if row.get("lds") is None:
        return row.get("note", "")
    return f"LDS {row['lds']:.3f} in {row['seconds']:.1f} s"


def _lds_cell(row: dict[str, Any]) -> str:
    if row.get("lds") is None:
        return row.get("note", "n/a")
    ci = row.get("lds_ci")
    return f"{row['lds']:.3f}" + (f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else "")


def _params_cell(params: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in params.items()) or "defaults"


def best(rows: list[dict[str, Any]], method: str) -> dict[str, Any] | None:
    """The row of ``method`` with the highest LDS (``None`` when it has none)."""
    scored = [r for r in rows if r["method"].startswith(method) and r.get("lds") is not None]
    return max(scored, key=lambda r: r["lds"]) if scored else None


def table(rows: list[dict[str, Any]]) -> str:
    """The Markdown table: method, settings, LDS with its 95% interval, wall time."""
    lines = ["| method | settings | LDS [95% CI] | wall time (s) | note |",
             "|---|---|---|---|---|"]
    for row in rows:
        seconds = f"{row['seconds']:.1f}" if row.get("lds") is not None else ""
        note = row.get("note", "") if row.get("lds") is not None else ""
        lines.append(f"| {row['method']} | {_params_cell(row['params'])} | {_lds_cell(row)} | "
                     f"{seconds} | {note} |")
    return "\n".join(lines)


def verdicts(rows: list[dict[str, Any]]) -> list[str]:
    """Issue 14's fidelity criteria, where both sides of a comparison ran."""
    out = []
    ekfac, cg = best(rows, "if-ekfac"), best(rows, "if-cg")
    kf = best([r for r in rows if r.get("note", "").startswith("default damping")],
              "kronfluence")
    for other, label in ((cg, "IF-CG (best of its grid)"),
                         (kf, "kronfluence's EK-FAC with its defaults")):
        if ekfac is not None and other is not None:
            ok = ekfac["lds"] >= other["lds"]
            out.append(f"- EK-FAC (best, {ekfac['lds']:.3f}) >= {label} ({other['lds']:.3f}): "
                       f"{'yes' if ok else 'NO'}")
    dense = best([r for r in rows if r["method"].endswith("-dense")], "trak-")
    factored = best([r for r in rows if r["method"].endswith("-factored")], "trak-")
    if dense is not None and factored is not None:
        gap = factored["lds"] - dense["lds"]
        out.append(f"- TRAK factored - dense = {gap:+.3f} (criterion: within 0.02): "
                   f"{'yes' if abs(gap) <= 0.02 else 'NO'}")
    return out or ["- no comparison ran on both sides (see the table)"]


def run(args: argparse.Namespace) -> list[Result]:
    """Run the selected rows; one ``Result``."""
    import warnings

    import torch

    torch.set_num_threads(args.threads)
    warnings.simplefilter("ignore", RuntimeWarning)  # CG's indefinite-system warning
    workdir = args.workdir / ("smoke" if args.smoke else "full")
    t0 = time.perf_counter()
    ctx = prepare_setting(workdir, args.smoke)
    print(f"[ekfac-fidelity] setting, checkpoint and ground truth ready in "
          f"{time.perf_counter() - t0:.1f} s", flush=True)
    search = not args.no_search
    rows: list[dict[str, Any]] = []
    for name in args.rows:
        if name == "kronfluence-ekfac":
            rows += run_kronfluence(ctx, workdir, args.device)
        elif name.startswith("trak-"):
            rows += run_trak(name.split("-", 1)[1], ctx, args)
        else:
            rows += run_hf_method(name, ctx, search, args.device)
    _agreement(rows)
    body = _body(rows, ctx, args)
    print(body, flush=True)
    case = "ekfac-fidelity-digits-mlp" + ("-smoke" if args.smoke else "")
    payload = {"setting": ctx["prep"].setting.name, "data_fingerprint": ctx["fingerprint"],
               "kronfluence": kronfluence_version(), "threads": args.threads,
               "rows": [{k: v for k, v in r.items() if k != "score"} for r in rows]}
    return [Result(case=case, title="EK-FAC fidelity on digits-mlp: LDS against kronfluence, "
                   "IF-CG and TRAK", body=body, payload=payload)]


def _agreement(rows: list[dict[str, Any]]) -> None:
    """Pearson r of kronfluence's (sign-fixed) scores with IF-CG's default: a check that both
    scored the same problem with the same sign (noted on the kronfluence row)."""
    import torch

    cg = next((r for r in rows if r["method"] == "if-cg" and r.get("note") == "default"
               and "score" in r), None)
    for kf in rows:
        if cg is None or kf["method"] != "kronfluence-ekfac" or "score" not in kf:
            continue
        r = torch.corrcoef(torch.stack([kf["score"].flatten(), cg["score"].flatten()]))[0, 1]
        kf["note"] += f"; Pearson r with IF-CG default's scores: {float(r):.3f}"


def _body(rows: list[dict[str, Any]], ctx: dict[str, Any], args: argparse.Namespace) -> str:
    prep = ctx["prep"]
    found = kronfluence_version()
    k, width = matched_dimension(prep.model, args.proj_dim, args.factor_dim)
    return "\n".join([
        f"Setting `{prep.setting.name}`{' (smoke)' if args.smoke else ''}: "
        f"{len(prep.x)} training / {len(prep.xt)} test examples (data fingerprint "
        f"`{ctx['fingerprint'][:16]}`), the runner's full-data checkpoint (`loo-full`), LDS "
        f"over its {len(ctx['ground_truth'][0])} ground-truth subset models with the runner's "
        f"95% bootstrap interval; {args.threads} torch thread(s), device {args.device}. "
        f"kronfluence: {found or 'not installed'}.",
        "",
        "Wall time: building the attributor, `cache(train)` and `attribute(train, test)` (for "
        "kronfluence: `prepare_model`, `fit_all_factors` and `compute_pairwise_scores`, "
        "including its writes of factors and scores to disk). IF rows: the runner's default "
        "(note `default`) and, unless `--no-search`, each setting of its grid. TRAK: the "
        f"runner's TRAK-{args.trak_models} wiring (first LDS subset models, its damping), "
        "the dense projection at exactly the factored projection's total width (factor_dim "
        f"{k} gives {width} features on this MLP; target --proj-dim {args.proj_dim}).",
        "",
        table(rows),
        "",
        "Issue 14's criteria:",
        "",
        *verdicts(rows),
    ])


if __name__ == "__main__":
    from run import run_as_script

    sys.exit(run_as_script("ekfac-fidelity"))
