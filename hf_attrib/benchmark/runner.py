"""``hf-attrib bench run``: ground truth, every method, metrics, and a results table.

For a classification setting the runner

1. builds the seeded benchmark sample (and its noisy-label variant where AUC applies);
2. builds, or resumes, the ground truth with stacked training (``hf_attrib.model_utils.retraining``):
   ``lds_models`` models on random half subsets (the first half serve ensembling methods, the
   second half are the LDS ground truth) and, where LOO applies, one model per left-out
   example plus the full-data model they share their random stream with;
3. attributes the test set with each method on the full-data model (TRAK-k ensembles the
   first k subset models; TracInCP uses checkpoints along a training run) and times it;
4. evaluates LDS, LOO correlation and noisy-label AUC, and writes ``results.json`` and
   ``results.md`` under the output folder.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import psutil
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from hf_attrib.algorithm import (
    GradCosAttributor,
    GradDotAttributor,
    IFAttributorArnoldi,
    IFAttributorCG,
    IFAttributorExplicit,
    IFAttributorLiSSA,
    RPSAttributor,
    TracInAttributor,
    TRAKAttributor,
)
from hf_attrib.benchmark.data import BenchmarkData, build_data
from hf_attrib.benchmark.models import (
    LogisticRegressionConfig,
    LogisticRegressionModel,
    MLPConfig,
    MLPModel,
)
from hf_attrib.benchmark.settings import BenchmarkSetting, get_setting
from hf_attrib.metrics import lds, loo_corr, mislabel_detection_auc
from hf_attrib.model_utils.retraining import (
    evaluate_stacked,
    lds_subsets,
    load_stacked,
    retrain_lds,
    retrain_loo,
    train_stacked,
)
from hf_attrib.task import AttributionTask

__all__ = ["METHODS", "run_benchmark"]

METHODS = ("if-explicit", "if-cg", "if-lissa", "if-arnoldi", "tracin", "grad-dot", "grad-cos",
           "rps", "trak-1", "trak-10", "trak-50")
_TRACIN_CHECKPOINTS = 5


# --------------------------------------------------------------------------------------------
# Models and functions
# --------------------------------------------------------------------------------------------
def build_model(setting: BenchmarkSetting) -> nn.Module:
    """A freshly initialised model of the setting (seeded)."""
    torch.manual_seed(setting.seed)
    if setting.model == "logistic_regression":
        return LogisticRegressionModel(LogisticRegressionConfig(**setting.model_kwargs))
    if setting.model == "mlp":
        return MLPModel(MLPConfig(**setting.model_kwargs))
    raise NotImplementedError(f"`bench run` supports the classification settings on LR and MLP "
                              f"models in this version, not {setting.name} ({setting.model}).")


def _margin(logits: Tensor, y: Tensor) -> Tensor:
    """``log p/(1-p)`` of the true class, per example (stable form)."""
    true = logits.gather(1, y[:, None])[:, 0]
    others = logits.scatter(1, y[:, None], float("-inf"))
    return true - torch.logsumexp(others, dim=1)


def _lse_cross_entropy(logits: Tensor, y: Tensor) -> Tensor:
    return (torch.logsumexp(logits, dim=1) - logits.gather(1, y[:, None])[:, 0]).mean()


def classification_functions(model: nn.Module) -> dict[str, Callable[..., Tensor]]:
    """Loss, margin target and correct-class probability on ``(x, y)`` batches."""

    def logits(params: dict[str, Tensor], x: Tensor) -> Tensor:
        return torch.func.functional_call(model, params, (x,)).logits

    return {
        "loss": lambda p, b: nn.functional.cross_entropy(logits(p, b[0]), b[1]),
        "margin": lambda p, b: _margin(logits(p, b[0]), b[1]).mean(),
        "prob": lambda p, b: torch.softmax(logits(p, b[0]), -1).gather(1, b[1][:, None]).mean(),
        # Cross-entropy as logsumexp - true logit: the same value, but CPU log_softmax on many
        # narrow rows is ~10x slower under vmap (recipes/speed/bench_retrain.py).
        "train_loss": lambda p, x, y: _lse_cross_entropy(logits(p, x), y),
        "target": lambda p, x, y: _margin(logits(p, x), y),
    }


def _unstack(params: dict[str, Tensor], i: int) -> dict[str, Tensor]:
    return {k: v[i].clone() for k, v in params.items()}


# --------------------------------------------------------------------------------------------
# Methods
# --------------------------------------------------------------------------------------------
def make_attributor(method: str, task: AttributionTask, fns: dict[str, Callable[..., Tensor]],
                    device: str) -> Any:
    """The attributor of ``method`` with the hyperparameters of the paper's Appendix C.1."""
    if method == "if-explicit":
        return IFAttributorExplicit(task=task, device=device, regularization=1e-3)
    if method == "if-cg":
        return IFAttributorCG(task=task, device=device, max_iter=10, regularization=1e-3)
    if method == "if-lissa":
        return IFAttributorLiSSA(task=task, device=device, recursion_depth=500, batch_size=50,
                                 damping=1e-3 / 10, scaling=10.0)
    if method == "if-arnoldi":
        return IFAttributorArnoldi(task=task, device=device, proj_dim=50, max_iter=100,
                                   regularization=1e-3)
    if method == "tracin":
        return TracInAttributor(task=task, device=device,
                                weight_list=[1.0] * task.num_checkpoints)
    if method == "grad-dot":
        return GradDotAttributor(task=task, device=device)
    if method == "grad-cos":
        return GradCosAttributor(task=task, device=device)
    if method == "rps":
        return RPSAttributor(task=task, device=device, final_linear_layer_name="classifier",
                             l2_strength=1e-3, normalize_preactivate=True)
    if method.startswith("trak-"):
        return TRAKAttributor(task=task, device=device, correct_probability_func=fns["prob"],
                              projector_kwargs={"proj_dim": 512})
    raise KeyError(f"unknown method {method!r}; known methods: {', '.join(METHODS)}.")


class _PeakRSS:
    """Peak resident memory of this process while the block runs (sampled every 5 ms)."""

    def __enter__(self) -> _PeakRSS:
        self._proc = psutil.Process()
        self.peak = self._proc.memory_info().rss
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()
        return self

    def _poll(self) -> None:
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, self._proc.memory_info().rss)

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


# --------------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------------
def _smoke(setting: BenchmarkSetting) -> BenchmarkSetting:
    train = replace(setting.train, epochs=min(setting.train.epochs, 3))
    return replace(setting, n_train=min(setting.n_train, 120), n_test=min(setting.n_test, 12),
                   lds_models=8, train=train)


def run_benchmark(
    setting: str | BenchmarkSetting,
    methods: Sequence[str] | None = None,
    out_dir: str | Path = "bench-out",
    device: str = "cpu",
    smoke: bool = False,
    data_dir: str | Path | None = None,
    loo_examples: int | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Run the benchmark of one setting; see the module docstring.

    Args:
        setting: a setting or its name (``"digits-lr"``).
        methods: method names (default: all of ``METHODS``).
        out_dir: output folder; ground truth is kept under ``out_dir/ground_truth`` and reused.
        device: ``"cpu"`` or ``"cuda"``.
        smoke: shrink everything to a few seconds of work (a pipeline check, not a benchmark).
        data_dir: local copy of the source data (Hub-backed settings).
        loo_examples: leave out only the first this-many training examples (default: all).
        progress: progress bars.

    Returns:
        The results (also written to ``out_dir/results.json`` and ``out_dir/results.md``).
    """
    setting = get_setting(setting) if isinstance(setting, str) else setting
    if smoke:
        setting = _smoke(setting)
        loo_examples = min(loo_examples or 20, 20)
    methods = list(methods or METHODS)
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise KeyError(f"unknown method(s) {unknown}; known methods: {', '.join(METHODS)}.")
    out = Path(out_dir)
    gt_dir = out / "ground_truth"
    data = build_data(setting, data_dir)
    x, y = BenchmarkData.tensors(data.train)
    xt, yt = BenchmarkData.tensors(data.test)
    model = build_model(setting)
    fns = classification_functions(model)
    # Blocks of models trained together (and written together): as many as keep the stacked
    # parameters within ~64 MB, so small models train hundreds at a time.
    n_params = sum(p.numel() for p in model.parameters())
    block_size = max(1, min(250, (64 * 2**20) // (4 * n_params)))
    recipe = dict(epochs=setting.train.epochs, batch_size=setting.train.batch_size,
                  lr=setting.train.lr, momentum=setting.train.momentum,
                  weight_decay=setting.train.weight_decay, optimizer=setting.train.optimizer,
                  betas=setting.train.betas)

    # Ground truth (resumable). --------------------------------------------------------------
    retrain_lds(gt_dir, model, fns["train_loss"], x, y, num_models=setting.lds_models,
                fraction=setting.lds_fraction, seed=setting.seed, progress=progress,
                block_size=block_size, **recipe)
    lds_params, _ = load_stacked(gt_dir, "lds")
    masks = lds_subsets(setting.n_train, setting.lds_models, setting.lds_fraction, setting.seed)
    gt_ids = list(setting.ground_truth_model_ids)
    lds_values = evaluate_stacked(model, {k: v[gt_ids] for k, v in lds_params.items()}, xt, yt,
                                  fns["target"])
    ground_truth: dict[str, Any] = {"lds": (lds_values, masks[gt_ids])}
    loo_index = list(range(min(loo_examples or setting.n_train, setting.n_train)))
    if "loo" in setting.metrics:
        retrain_loo(gt_dir, model, fns["train_loss"], x, y, indices=loo_index, seed=setting.seed,
                    progress=progress, block_size=block_size, **recipe)
        loo_params, _ = load_stacked(gt_dir, "loo")
        full_params, _ = load_stacked(gt_dir, "loo-full")
        ground_truth["loo"] = (evaluate_stacked(model, loo_params, xt, yt, fns["target"]),
                               torch.tensor(loo_index),
                               evaluate_stacked(model, full_params, xt, yt, fns["target"])[0])
    else:
        full_params = train_stacked(model, fns["train_loss"], x, y,
                                    torch.ones(1, setting.n_train, dtype=torch.bool),
                                    seed=setting.seed, **recipe)
    full_state = _unstack(full_params, 0)
    trajectory = _trajectory(model, fns, x, y, setting, recipe)
    noisy_state = None
    if "auc" in setting.metrics:
        xn, yn = BenchmarkData.tensors(data.noisy_train)
        noisy = train_stacked(model, fns["train_loss"], xn, yn,
                              torch.ones(1, setting.n_train, dtype=torch.bool),
                              seed=setting.seed, **recipe)
        noisy_state = (_unstack(noisy, 0), DataLoader(TensorDataset(xn, yn), batch_size=250))

    # Methods. ---------------------------------------------------------------------------
    train_loader = DataLoader(TensorDataset(x, y), batch_size=250)
    test_loader = DataLoader(TensorDataset(xt, yt), batch_size=250)
    rows = []
    for method in methods:
        rows.append(_run_method(method, model, fns, full_state, trajectory, lds_params,
                                setting, train_loader, test_loader, ground_truth, noisy_state,
                                data, device))
    results = {"setting": setting.name, "smoke": smoke, "n_train": setting.n_train,
               "n_test": setting.n_test, "loo_examples": len(loo_index)
               if "loo" in setting.metrics else 0, "methods": rows}
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=2))
    (out / "results.md").write_text(results_markdown(results))
    return results


def _trajectory(model: nn.Module, fns: dict[str, Callable[..., Tensor]], x: Tensor, y: Tensor,
                setting: BenchmarkSetting, recipe: dict[str, Any]) -> list[dict[str, Tensor]]:
    """Checkpoints along one training run (for TracInCP), every ``epochs / k`` epochs."""
    k = min(_TRACIN_CHECKPOINTS, setting.train.epochs)
    per = setting.train.epochs // k
    states = []
    current = build_model(setting)
    for i in range(k):
        epochs = per if i < k - 1 else setting.train.epochs - per * (k - 1)
        params = train_stacked(current, fns["train_loss"], x, y,
                               torch.ones(1, x.shape[0], dtype=torch.bool),
                               seed=setting.seed + 1000 + i, init="model",
                               **{**recipe, "epochs": epochs})
        state = _unstack(params, 0)
        current.load_state_dict(state)
        states.append(state)
    return states


def _run_method(method: str, model: nn.Module, fns: dict[str, Callable[..., Tensor]],
                full_state: dict[str, Tensor], trajectory: list[dict[str, Tensor]],
                lds_params: dict[str, Tensor], setting: BenchmarkSetting,
                train_loader: DataLoader, test_loader: DataLoader,
                ground_truth: dict[str, Any], noisy_state: Any, data: BenchmarkData,
                device: str) -> dict[str, Any]:
    if method == "tracin":
        checkpoints = trajectory
    elif method.startswith("trak-"):
        k = min(int(method.split("-")[1]), len(setting.ensemble_model_ids))
        checkpoints = [_unstack(lds_params, i) for i in range(k)]
    else:
        checkpoints = [full_state]
    task = AttributionTask(loss_func=fns["loss"], model=model, checkpoints=checkpoints,
                           target_func=fns["margin"])
    row: dict[str, Any] = {"method": method}
    try:
        with _PeakRSS() as mem:
            start = time.perf_counter()
            attributor = make_attributor(method, task, fns, device)
            attributor.cache(train_loader)
            score = attributor.attribute(train_loader, test_loader)
            row["seconds"] = time.perf_counter() - start
        row["peak_rss_mb"] = mem.peak / 2**20
        row["lds"] = lds(score, ground_truth["lds"]).mean
        if "loo" in ground_truth:
            row["loo"] = loo_corr(score, ground_truth["loo"]).mean
        if noisy_state is not None:
            state, loader = noisy_state
            # Self-influence on the model trained with flipped labels (one checkpoint for every
            # method: the noisy-label model is trained once).
            noisy_task = AttributionTask(loss_func=fns["loss"], model=model,
                                         checkpoints=[state], target_func=fns["margin"])
            noisy_attributor = make_attributor(method, noisy_task, fns, device)
            noisy_attributor.cache(loader)
            self_score = noisy_attributor.self_attribute(loader)
            row["auc"] = mislabel_detection_auc(self_score, data.noisy_indices)
    except Exception as err:  # one method failing must not lose the others' results
        row["error"] = f"{type(err).__name__}: {err}"
    return row


def results_markdown(results: dict[str, Any]) -> str:
    """The results as a Markdown table."""
    lines = [f"### {results['setting']} (n_train={results['n_train']}, "
             f"n_test={results['n_test']}{', smoke' if results['smoke'] else ''})", "",
             "| method | LDS | LOO | AUC | seconds | peak RSS (MB) |",
             "|---|---|---|---|---|---|"]

    def fmt(value: Any, digits: int = 3) -> str:
        return "-" if value is None else f"{value:.{digits}f}"

    for row in results["methods"]:
        if "error" in row:
            lines.append(f"| {row['method']} | error: {row['error'][:80]} | | | | |")
            continue
        lines.append(f"| {row['method']} | {fmt(row.get('lds'))} | {fmt(row.get('loo'))} | "
                     f"{fmt(row.get('auc'))} | {fmt(row.get('seconds'), 1)} | "
                     f"{fmt(row.get('peak_rss_mb'), 0)} |")
    return "\n".join(lines) + "\n"
