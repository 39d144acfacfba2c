"""``hf-attrib bench run``: ground truth, every method, metrics, and a results table.

For a classification setting the runner

1. builds the seeded benchmark sample (and its noisy-label variant where AUC applies);
2. builds, or resumes, the ground truth with stacked training
   (``hf_attrib.model_utils.retraining``):
   ``lds_models`` models on random half subsets (the first half serve ensembling methods, the
   second half are the LDS ground truth) and, where LOO applies, one model per left-out
   example plus the full-data model they share their random stream with;
3. attributes the test set with each method on the full-data model (TRAK-k ensembles the
   first k subset models; TracInCP uses checkpoints along a training run) and times it;
4. evaluates LDS, LOO correlation and noisy-label AUC, and writes ``results.json`` and
   ``results.md`` under the output folder.
"""

from __future__ import annotations

import copy
import json
import os
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import psutil
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from hf_attrib import __version__
from hf_attrib.algorithm import Attributor, get_method
from hf_attrib.benchmark.builders import (
    Functions,
    build_model,
    classification_functions,
    generation_functions,
    load_state,
    setting_functions,
)
from hf_attrib.benchmark.data import BenchmarkData, build_data, data_fingerprint, split_tensors
from hf_attrib.benchmark.midi import NUM_EVENTS
from hf_attrib.benchmark.music import build_maestro, build_maestro_test_set
from hf_attrib.benchmark.pulled import PulledBenchmark
from hf_attrib.benchmark.report import results_chart, results_markdown
from hf_attrib.benchmark.sampling import build_generated_test_set
from hf_attrib.benchmark.settings import BenchmarkSetting, get_setting, smoke_setting
from hf_attrib.benchmark.stacked import (
    Stacked,
    evaluate_models,
    load_models,
    select_models,
    train_model,
    unstack,
)
from hf_attrib.benchmark.text import (
    SHAKESPEARE_NEW_TOKENS,
    SHAKESPEARE_PROMPT_LEN,
    build_shakespeare,
    load_shakespeare_text,
)
from hf_attrib.metrics import lds, loo_corr, mislabel_detection_auc
from hf_attrib.model_utils.retraining import (
    CorruptBlockError,
    load_subsets,
    retrain_lds,
    retrain_loo,
)
from hf_attrib.task import AttributionTask

# build_model, classification_functions, generation_functions: re-exported from builders.
__all__ = ["METHODS", "Prepared", "best_of_trials", "build_ground_truth", "build_model",
           "check_writable",
           "classification_functions", "ensemble_models_needed", "generated_test_set",
           "generation_functions", "loo_index", "prepare", "results_markdown", "run_benchmark"]

_TRACIN_CHECKPOINTS = 5


# --------------------------------------------------------------------------------------------
# Methods
# --------------------------------------------------------------------------------------------
# The methods come from the registry (``hf_attrib.algorithm``: classes, names, the Appendix
# C.1 grids); the benchmark adds its own tuned defaults, TRAK's ensembles and its wiring.
# ``DEFAULTS`` are the best of ``SEARCH`` on digits-lr, one entry per benchmarked method, in
# the order of the results table. Hyperparameters are recorded under the benchmark's names
# (results.json, the table): TRAK's projection size as ``proj_dim`` and its damping as
# ``per_example_regularization`` (see ``make_attributor``).
DEFAULTS: dict[str, dict[str, Any]] = {
    "if-explicit": {"regularization": 1e-1},
    "if-cg": {"regularization": 1e-1, "max_iter": 10},
    "if-lissa": {"recursion_depth": 500, "batch_size": 50},
    "if-arnoldi": {"regularization": 1e-1, "max_iter": 50},
    "tracin": {},
    "grad-dot": {},
    "grad-cos": {},
    "rps": {"l2_strength": 1e-3, "normalize_preactivate": True},
    "trak": {"proj_dim": 512, "per_example_regularization": 1e-1},
}
# TRAK is run as ensembles of the first k LDS subset models (TRAK-k, the paper's names).
_TRAK_ENSEMBLES = ("trak-1", "trak-10", "trak-50")
METHODS = tuple(name for family in DEFAULTS
                for name in (_TRAK_ENSEMBLES if family == "trak" else (family,)))


def _benchmark_params(params: Mapping[str, Any]) -> dict[str, Any]:
    """A registry grid entry under the benchmark's names (``projector_kwargs={"proj_dim": p}``
    becomes ``proj_dim=p``)."""
    flat = dict(params.get("projector_kwargs", {}))
    flat.update((k, v) for k, v in params.items() if k != "projector_kwargs")
    return flat


# The paper's grid of each method, plus a kernel damping grid for TRAK (the paper fixes it; on
# small models an unregularized (Phi^T Phi)^-1 is a near-exact inverse and ranks poorly).
SEARCH: dict[str, list[dict[str, Any]]] = {
    family: [_benchmark_params(params) for params in get_method(family).search]
    for family in DEFAULTS
}
SEARCH["trak"] = [{**params, "per_example_regularization": r}
                  for params in SEARCH["trak"] for r in (0.0, 1e-2, 1e-1, 1.0)]


# Smoke runs check the pipeline, not the methods: their solvers run a few iterations only.
_SMOKE_PARAMS: dict[str, dict[str, Any]] = {
    "if-cg": {"max_iter": 3},
    "if-lissa": {"recursion_depth": 10, "batch_size": 10},
    "if-arnoldi": {"max_iter": 10},
}


def _family(method: str) -> str:
    return "trak" if method.startswith("trak-") else method




def _trak(hp: dict[str, Any], task: AttributionTask, fns: Functions, n_train: int
          ) -> dict[str, Any]:
    d_model = sum(p.numel() for p in task.model.parameters() if p.requires_grad)
    lam = hp["per_example_regularization"] * n_train * hp["proj_dim"] / d_model
    return {"correct_probability_func": fns.get("prob"),
            "projector_kwargs": {"proj_dim": hp["proj_dim"]}, "regularization": lam}


# What the benchmark gives a method besides its hyperparameters: family -> hook turning
# ``(params, task, fns, n_train)`` into constructor keyword arguments (default: the params).
_WIRING: dict[str, Callable[[dict[str, Any], AttributionTask, Functions, int],
                            dict[str, Any]]] = {
    "if-lissa": lambda hp, task, fns, n: {"damping": 1e-4, "scaling": 10.0, **hp},
    "if-arnoldi": lambda hp, task, fns, n: {"proj_dim": min(50, hp["max_iter"]), **hp},
    "tracin": lambda hp, task, fns, n: {"weight_list": [1.0] * task.num_checkpoints, **hp},
    "rps": lambda hp, task, fns, n: {"final_linear_layer_name": "classifier", **hp},
    "trak": _trak,
}


def make_attributor(method: str, task: AttributionTask, fns: Functions, device: str,
                    n_train: int, params: dict[str, Any] | None = None) -> Attributor:
    """The attributor of ``method`` with hyperparameters ``params`` (default: ``DEFAULTS``).

    The class is the registry's (``hf_attrib.algorithm.get_method``), the hyperparameters are
    the benchmark's, and ``_WIRING`` adds the rest. LiSSA's ``scaling`` is set above the
    largest Hessian eigenvalue is ever likely to be for these models (10) with
    ``damping * scaling`` equal to 1e-3. TRAK's ``per_example_regularization`` ``r`` damps the
    averaged kernel, ``Phi^T Phi / n + r I`` on hf_attrib's normalised features (its kernel
    sums over examples, while the IF Hessian averages); ``TRAKAttributor.regularization`` is on
    dattri's scale (``lambda D / p`` on those features), hence the conversion
    ``lambda = r n p / D``.

    Raises:
        KeyError: ``method`` is not one of ``METHODS``.
    """
    if method not in METHODS:
        raise KeyError(f"unknown method {method!r}; known methods: {', '.join(METHODS)}.")
    family = _family(method)
    hp = dict(DEFAULTS[family] if params is None else params)
    wiring = _WIRING.get(family)
    kwargs = hp if wiring is None else wiring(hp, task, fns, n_train)
    return get_method(family).attributor_class(task, device=device, **kwargs)


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
def check_writable(folder: str | Path, option: str = "out_dir") -> Path:
    """Create ``folder`` if needed and check that a file can be written in it.

    Called before any training, so that a read-only or mistyped output folder fails in a
    second instead of after the ground truth has been trained.

    Args:
        folder: the output folder.
        option: how the caller names it (``"--out"`` on the command line), for the message.

    Returns:
        ``folder`` as a ``Path``.

    Raises:
        NotADirectoryError: ``folder`` (or a parent) is an existing file.
        PermissionError: the folder cannot be created or written to.
    """
    path = Path(folder)
    fix = f"pass a writable folder as {option}"
    if path.exists() and not path.is_dir():
        raise NotADirectoryError(f"output folder {str(path)!r} ({option}) is an existing file, "
                                 f"not a folder; {fix}.")
    try:
        path.mkdir(parents=True, exist_ok=True)
        # A real write: access() is wrong on read-only mounts and for root.
        fd, probe = tempfile.mkstemp(dir=path, prefix=".hf-attrib-write-check-")
        os.close(fd)
        os.unlink(probe)
    except (FileExistsError, NotADirectoryError) as err:  # a parent is a file
        raise NotADirectoryError(f"cannot create output folder {str(path)!r} ({option}): "
                                 f"{err.strerror}: {err.filename!r}; {fix}.") from None
    except OSError as err:
        raise PermissionError(f"cannot write to output folder {str(path)!r} ({option}): "
                              f"{err.strerror or err}; {fix}.") from None
    return path


def _say(progress: bool, message: str) -> None:
    """A progress line on stderr (stdout carries the results table); off with ``--no-progress``."""
    if progress:
        print(message, file=sys.stderr, flush=True)


def _outcome(row: dict[str, Any]) -> str:
    """``"LDS 0.761, LOO 0.908, AUC 0.984"``, or the error of a failed method."""
    if "error" in row:
        return f"failed ({row['error']})"
    return ", ".join(f"{m.upper()} {row[m]:.3f}" for m in ("lds", "loo", "auc") if m in row)


@dataclass
class Prepared:
    """A setting made concrete: its data tensors, model, functions and training recipe."""

    setting: BenchmarkSetting
    data: BenchmarkData
    x: Tensor
    y: Tensor
    xt: Tensor
    yt: Tensor
    model: nn.Module
    fns: dict[str, Callable[..., Tensor]]
    recipe: dict[str, Any]
    block_size: int


def prepare(setting: str | BenchmarkSetting, data_dir: str | Path | None = None,
            smoke: bool = False, cache_dir: str | Path | None = None,
            data: BenchmarkData | None = None) -> Prepared:
    """Build the data, model, functions and training recipe of a setting.

    For generative settings the test set is generated by the trained model, so ``xt``/``yt``
    are ``None`` until :func:`generated_test_set` fills them.

    Args:
        setting: the setting (or its name).
        data_dir: a local copy of the source data.
        smoke: the smoke version of the setting.
        cache_dir: where generative settings cache their tokenised data.
        data: a classification setting's sample as already built (e.g. pulled from the Hub
            with its ground truth): used as is, so the source data is not read at all.
    """
    setting = get_setting(setting) if isinstance(setting, str) else setting
    if smoke:
        setting = smoke_setting(setting)
    if setting.kind == "generation":
        data, vocab_size = _generation_data(setting, data_dir, cache_dir, smoke)
        setting = replace(setting, n_train=len(data.train))
        x, y = split_tensors(data.train, setting.kind)
        xt = yt = None
        model = build_model(setting, vocab_size)
    else:
        data = build_data(setting, data_dir) if data is None else data
        x, y = split_tensors(data.train, setting.kind)
        xt, yt = split_tensors(data.test, setting.kind)
        model = build_model(setting)
    fns = setting_functions(setting, model)
    # Blocks of models trained together (and written together): as many as keep the stacked
    # parameters within ~64 MB, so small models train hundreds at a time.
    n_params = sum(p.numel() for p in model.parameters())
    block_size = max(1, min(250, (64 * 2**20) // (4 * n_params)))
    recipe = dict(epochs=setting.train.epochs, batch_size=setting.train.batch_size,
                  lr=setting.train.lr, momentum=setting.train.momentum,
                  weight_decay=setting.train.weight_decay, optimizer=setting.train.optimizer,
                  betas=setting.train.betas)
    return Prepared(setting, data, x, y, xt, yt, model, fns, recipe, block_size)


def _generation_data(setting: BenchmarkSetting, data_dir: str | Path | None,
                     cache_dir: str | Path | None, smoke: bool) -> tuple[BenchmarkData, int]:
    """Training windows/blocks and held-out prompts of a generative setting, and the vocab."""
    if setting.dataset == "shakespeare":
        text = load_shakespeare_text(data_dir)
        train, validation, tokenizer = build_shakespeare(
            text, block_size=setting.model_kwargs["block_size"], n_train=setting.n_train,
            seed=setting.seed)
        return BenchmarkData(train=train, test=validation), tokenizer.vocab_size
    if setting.dataset == "maestro":
        music = build_maestro(data_dir, n_train=setting.n_train,
                              seq_len=setting.extra.get("seq_len", 256), seed=setting.seed,
                              max_pieces=8 if smoke and data_dir is None else None,
                              eval_stride=64 if data_dir is None else None,
                              cache_dir=cache_dir)
        return BenchmarkData(train=music.train, test=music.test), NUM_EVENTS + 2
    raise NotImplementedError(f"no data builder for {setting.dataset!r}.")


def generated_test_set(prep: Prepared, state: dict[str, Tensor]) -> None:
    """Fill ``prep.xt``/``prep.yt`` with samples of the model at ``state`` (paper, Sec. 3.3).

    Shakespeare: held-out prompts continued by the model; MAESTRO: test-split prompts
    continued by one event, as the paper does.
    """
    setting = prep.setting
    model = copy.deepcopy(prep.model)
    load_state(model, state)
    holdout = prep.data.test
    if setting.dataset == "maestro":
        seq_len = setting.extra.get("seq_len", 256)
        test = build_maestro_test_set(model, holdout, n_test=min(setting.n_test, len(holdout)),
                                      seed=setting.seed, prompt_len=seq_len - 1, new_tokens=1)
    else:
        block = setting.model_kwargs["block_size"]
        prompt = min(SHAKESPEARE_PROMPT_LEN, block // 2)
        test = build_generated_test_set(model, holdout, min(setting.n_test, len(holdout)),
                                        prompt_len=prompt,
                                        new_tokens=min(SHAKESPEARE_NEW_TOKENS, block - prompt),
                                        seed=setting.seed)
    prep.xt, prep.yt = split_tensors(test, setting.kind)


def loo_index(setting: BenchmarkSetting, loo_examples: int | None) -> list[int]:
    """The training examples LOO models leave out: the first ``loo_examples`` (default all)."""
    return list(range(min(loo_examples or setting.n_train, setting.n_train)))



def _check_existing(gt_dir: Path, kind: str, n_train: int) -> None:
    """Refuse ground truth on disk that was built for another training-set size."""
    if not any((gt_dir / kind).glob("block-*.safetensors")):
        return
    try:
        masks, _ = load_subsets(gt_dir, kind)
    except (FileNotFoundError, CorruptBlockError):
        # Some blocks missing or damaged: the build retrains those, and checks the rest.
        return
    if masks.shape[1] != n_train:
        raise ValueError(
            f"the ground truth in {gt_dir / kind} was built for {masks.shape[1]} training "
            f"examples but this setting has {n_train}: use another --out folder or delete it."
        )


def build_ground_truth(prep: Prepared, gt_dir: str | Path, kind: str,
                       models: Any = None, shard: tuple[int, int] | None = None,
                       loo_examples: int | None = None, progress: bool = True) -> Any:
    """Train (or resume) the ``kind`` ground-truth models of a setting into ``gt_dir``.

    Args:
        prep: the prepared setting.
        gt_dir: folder of the ground truth.
        kind: ``"lds"`` (subset models) or ``"loo"`` (leave-one-out models + full model).
        models: only the blocks covering these model ids (``"a:b"``).
        shard: ``(i, n)``: this process takes every n-th block starting at i.
        loo_examples: leave out only the first this-many examples.
        progress: progress bars.
    """
    setting, gt_dir = prep.setting, Path(gt_dir)
    if kind not in ("lds", "loo"):
        raise ValueError(f"unknown ground-truth kind {kind!r}; use 'lds' or 'loo'.")
    if kind == "loo" and "loo" not in setting.metrics:
        raise ValueError(f"{setting.name} has no LOO metric (its metrics: "
                         f"{', '.join(setting.metrics)}).")
    _check_existing(gt_dir, kind, setting.n_train)
    # Per-example losses let leave-one-out blocks train on shared windows (same models).
    common = dict(seed=setting.seed, models=models, shard=shard, progress=progress,
                  block_size=prep.block_size, example_loss_fn=prep.fns.get("example_loss"),
                  **prep.recipe)
    if kind == "lds":
        return retrain_lds(gt_dir, prep.model, prep.fns["train_loss"], prep.x, prep.y,
                           num_models=setting.lds_models, fraction=setting.lds_fraction, **common)
    return retrain_loo(gt_dir, prep.model, prep.fns["train_loss"], prep.x, prep.y,
                       indices=loo_index(setting, loo_examples), **common)


def _checked_methods(methods: Sequence[str] | None) -> list[str]:
    """``methods`` (default: all of ``METHODS``), each checked to be known."""
    methods = list(methods or METHODS)
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise KeyError(f"unknown method(s) {unknown}; known methods: {', '.join(METHODS)}.")
    return methods


def ensemble_models_needed(setting: str | BenchmarkSetting,
                           methods: Sequence[str] | None = None, smoke: bool = False) -> int:
    """How many LDS subset models (``0..k-1``) a run's ensembling methods (TRAK-k) use: the
    checkpoints ``--from-hub`` has to pull.

    Args:
        setting: a setting or its name.
        methods: the run's methods (default: all of ``METHODS``).
        smoke: the run is a smoke run.

    Raises:
        KeyError: an unknown method (the error ``run_benchmark`` gives).
    """
    setting = get_setting(setting) if isinstance(setting, str) else setting
    if smoke:
        setting = smoke_setting(setting)
    return max((min(int(m.split("-")[1]), len(setting.ensemble_model_ids))
                for m in _checked_methods(methods) if m.startswith("trak-")), default=0)


def run_benchmark(
    setting: str | BenchmarkSetting,
    methods: Sequence[str] | None = None,
    out_dir: str | Path = "bench-out",
    device: str = "cpu",
    smoke: bool = False,
    data_dir: str | Path | None = None,
    loo_examples: int | None = None,
    search: bool = False,
    progress: bool = True,
    pulled: PulledBenchmark | None = None,
    params: Mapping[str, Mapping[str, Any]] | None = None,
    auc: bool = True,
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
        search: evaluate each method over the hyperparameter grid ``SEARCH`` (Appendix C.1)
            and report the best value of each metric, as the paper does; otherwise use
            ``DEFAULTS``.
        progress: progress bars while training the ground truth, and a line on stderr as
            each method starts and ends (``[3/11] if-cg done in 12.3 s: LDS ...``).
        pulled: use pulled repos instead of building the ground truth (``--from-hub``): what
            :func:`hf_attrib.hub.benchmark.pull_benchmark` returns for a folder written by
            ``hf-attrib hub export``/``hub pull --out`` or a repo id, with
            ``ensemble_models=ensemble_models_needed(setting, methods, smoke)``. The data, the
            full-data (and noisy-label) models, the LDS subset models ensembling methods use
            and the ground-truth targets come from it; nothing is retrained but TracIn's
            trajectory.
        params: per-method hyperparameters laid over every setting the method runs (the
            default or each grid point), e.g. ``{"if-lissa": {"scaling": 50.0}}`` where a
            model's curvature needs a value the digits-tuned wiring does not give. They are
            recorded with each trial's ``params`` (results.json, the table's settings).
        auc: evaluate the noisy-label AUC where the setting has it. ``False`` skips it (and
            the noisy-label model): for the IHVP methods at scale, AUC's self-influence of
            every training example costs ``n_train / n_test`` times the LDS run. The results
            then hold no ``auc`` (``"auc_skipped": true``).

    Returns:
        The results (also written to ``out_dir/results.json`` and ``out_dir/results.md``; each
        hyperparameter setting is also appended to ``out_dir/trials.jsonl`` as it finishes).

    Raises:
        KeyError: an unknown method (in ``methods`` or ``params``).
        PermissionError, NotADirectoryError: ``out_dir`` cannot be written (checked first).
        ValueError: ``pulled`` holds another setting, or another size (smoke or full).
    """
    setting = get_setting(setting) if isinstance(setting, str) else setting
    if smoke:
        setting = smoke_setting(setting)
        loo_examples = min(loo_examples or 20, 20)
    methods_given = methods
    methods = _checked_methods(methods)
    overrides = {method: dict(values) for method, values in (params or {}).items()}
    _checked_methods(list(overrides))
    out = check_writable(out_dir)  # before any training
    gt_dir = out / "ground_truth"
    # Pulled benchmarks bring their sample: the source data (e.g. ylecun/mnist) is not needed.
    given = pulled.data if pulled is not None and setting.kind == "classification" else None
    prep = prepare(setting, data_dir, smoke=smoke, cache_dir=out / "cache", data=given)
    setting = prep.setting
    data, model, fns, recipe = prep.data, prep.model, prep.fns, prep.recipe
    x, y = prep.x, prep.y
    loo_ids = loo_index(setting, loo_examples)
    if pulled is not None:
        # The pulled data replaces the prepared one.
        pulled.check(setting)
        prep.data = pulled.data
        prep.x, prep.y = split_tensors(pulled.data.train, setting.kind)
        prep.xt, prep.yt = split_tensors(pulled.data.test, setting.kind)
        x, y, data, loo_ids = prep.x, prep.y, prep.data, pulled.loo_index

    # The full-data model (for LOO it shares its random stream with the LOO models). ---------
    if pulled is not None:
        full = pulled.full
    elif "loo" in setting.metrics:
        build_ground_truth(prep, gt_dir, "loo", loo_examples=loo_examples, progress=progress)
        full = load_models(model, gt_dir, "loo-full")
    else:
        _say(progress, "training the full-data model ...")
        full = train_model(model, fns["train_loss"], x, y, setting.seed, recipe)
    full_state = unstack(full, 0)
    if prep.xt is None:
        generated_test_set(prep, full_state)
    xt, yt = prep.xt, prep.yt

    # Ground truth (resumable: only missing blocks are trained). ------------------------------
    if pulled is not None:
        lds_models, ground_truth = pulled.lds_models, pulled.ground_truth
    else:
        build_ground_truth(prep, gt_dir, "lds", progress=progress)
        lds_models = load_models(model, gt_dir, "lds")
        masks, _ = load_subsets(gt_dir, "lds")
        gt_ids = list(setting.ground_truth_model_ids)
        lds_values = evaluate_models(model, select_models(lds_models, gt_ids), xt, yt,
                                     fns["target"])
        ground_truth = {"lds": (lds_values, masks[gt_ids])}
    if "loo" in setting.metrics and pulled is None:
        ground_truth["loo"] = (evaluate_models(model, load_models(model, gt_dir, "loo"), xt, yt,
                                               fns["target"]),
                               torch.tensor(loo_ids),
                               evaluate_models(model, full, xt, yt, fns["target"])[0])
    # TracInCP's checkpoints along one training run (trained only when TracIn is run).
    trajectory: list[dict[str, Tensor]] = []
    if "tracin" in methods:
        _say(progress, "training TracInCP's checkpoints ...")
        trajectory = _trajectory(model, fns, x, y, setting, recipe)
    noisy_state = None
    if "auc" in setting.metrics and auc:
        xn, yn = BenchmarkData.tensors(data.noisy_train)
        if pulled is not None and pulled.noisy is not None:
            noisy = pulled.noisy
        else:
            _say(progress, "training the noisy-label model (for AUC) ...")
            noisy = train_model(model, fns["train_loss"], xn, yn, setting.seed, recipe)
        noisy_state = (unstack(noisy, 0), DataLoader(TensorDataset(xn, yn), batch_size=250))

    # Methods. ---------------------------------------------------------------------------
    batch = 250 if setting.kind == "classification" else 32
    train_loader = DataLoader(TensorDataset(x, y), batch_size=batch)
    test_loader = DataLoader(TensorDataset(xt, yt), batch_size=batch)
    if methods_given is None and setting.kind == "generation":
        methods = [m for m in methods
                   if not get_method(_family(m)).needs_classification_head]
    rows = []
    _say(progress, f"methods: {len(methods)} on {len(x)} training / {len(xt)} test examples"
                   f"{' (hyperparameter search)' if search else ''}")
    for i, method in enumerate(methods, 1):
        # One line when a method starts and one when it ends: the methods phase can be most of
        # the run (LiSSA, TRAK-50, the search grids), and a silent one looks hung.
        trials = len(SEARCH[_family(method)]) if search else 1
        _say(progress, f"[{i}/{len(methods)}] {method} ..."
                       f"{f' ({trials} settings)' if trials > 1 else ''}")
        start = time.perf_counter()
        rows.append(_run_method(method, model, fns, full_state, trajectory, lds_models,
                                setting, train_loader, test_loader, ground_truth, noisy_state,
                                data, device, search, smoke, overrides.get(method, {}),
                                trial_log=out / "trials.jsonl"))
        _say(progress, f"[{i}/{len(methods)}] {method} done in "
                       f"{time.perf_counter() - start:.1f} s: {_outcome(rows[-1])}")
    results = {
        "setting": setting.name, "smoke": smoke, "search": search,
        "n_train": setting.n_train, "n_test": setting.n_test,
        "data_fingerprint": data_fingerprint(data),  # names the exact sample used
        "loo_examples": len(loo_ids) if "loo" in setting.metrics else 0,
        "device": device, "hf_attrib_version": __version__, "methods": rows,
    }
    if pulled is not None:
        results["ground_truth_source"] = pulled.source
    if "auc" in setting.metrics and not auc:
        results["auc_skipped"] = True
        for row in rows:
            row["auc_skipped"] = True
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=2))
    (out / "results.md").write_text(results_markdown(results))
    results_chart(results, out / "results.png")
    return results


def _trajectory(model: nn.Module, fns: dict[str, Callable[..., Tensor]], x: Tensor, y: Tensor,
                setting: BenchmarkSetting, recipe: dict[str, Any]) -> list[dict[str, Tensor]]:
    """Checkpoints along one training run (for TracInCP), every ``epochs / k`` epochs."""
    k = min(_TRACIN_CHECKPOINTS, setting.train.epochs)
    per = setting.train.epochs // k
    states: list[dict[str, Tensor]] = []
    for i in range(k):
        epochs = per if i < k - 1 else setting.train.epochs - per * (k - 1)
        start = states[-1] if states else None
        states.append(unstack(train_model(model, fns["train_loss"], x, y,
                                          setting.seed + 1000 + i, recipe, start=start,
                                          epochs=epochs), 0))
    return states


# Percentile-bootstrap intervals of every metric (over test examples for LDS and LOO, over
# noisy and clean training examples for AUC), 1,000 resamples.
CI_LEVEL = 0.95


def _store(trial: dict[str, Any], metric: str, result: Any) -> None:
    """The mean of a per-test-example metric and its bootstrap interval, into ``trial``."""
    trial[metric] = result.mean
    if result.ci is not None:
        trial[f"{metric}_ci"] = list(result.ci)


# Methods whose cache does not depend on ``regularization``: a grid over it reuses one cache
# (IFAttributorExplicit keeps each Hessian's eigendecomposition).
_REGULARIZATION_AFTER_CACHE = ("if-explicit",)


def _cached_attributor(cached: dict[str, Any], role: str, method: str, task: AttributionTask,
                       fns: Functions, device: str, n_train: int, params: dict[str, Any],
                       loader: DataLoader) -> tuple[Attributor, float]:
    """A cached attributor at ``params``, and the seconds its ``cache`` took.

    For :data:`_REGULARIZATION_AFTER_CACHE` methods, settings that differ only in
    ``regularization`` share one cache (``role`` keeps the main and the noisy-label one apart):
    the attributor is kept in ``cached`` and only its ``regularization`` changes; the seconds
    returned for a reused one are its cache's, so every setting reports cache + attribute
    time. A fresh attributor returns 0.0 (its cache ran on the caller's clock).
    """
    key = (role, tuple(sorted((k, repr(v)) for k, v in params.items()
                              if k != "regularization")))
    if method in _REGULARIZATION_AFTER_CACHE and key in cached:
        attributor, seconds = cached[key]
        attributor.regularization = params.get("regularization", 0.0)
        return attributor, seconds
    start = time.perf_counter()
    attributor = make_attributor(method, task, fns, device, n_train, params)
    attributor.cache(loader)
    seconds = time.perf_counter() - start
    if method in _REGULARIZATION_AFTER_CACHE:
        cached[key] = (attributor, seconds)
    return attributor, 0.0  # the caller's clock already ran through this cache


def _run_method(method: str, model: nn.Module, fns: dict[str, Callable[..., Tensor]],
                full_state: dict[str, Tensor], trajectory: list[dict[str, Tensor]],
                lds_models: Stacked, setting: BenchmarkSetting,
                train_loader: DataLoader, test_loader: DataLoader,
                ground_truth: dict[str, Any], noisy_state: Any, data: BenchmarkData,
                device: str, search: bool, smoke: bool = False,
                overrides: Mapping[str, Any] | None = None,
                trial_log: Path | None = None) -> dict[str, Any]:
    """Evaluate one method: each hyperparameter setting of the grid (``search``) or the
    default, reporting for every metric the best value over the settings, as the paper does.
    ``overrides`` are laid over every setting (``run_benchmark(params=...)``); each finished
    setting is appended to ``trial_log`` (JSON lines), so a long grid stopped halfway keeps
    what it measured."""
    if method == "tracin":
        checkpoints = trajectory
    elif method.startswith("trak-"):
        k = min(int(method.split("-")[1]), len(setting.ensemble_model_ids))
        checkpoints = [unstack(lds_models, i) for i in range(k)]
    else:
        checkpoints = [full_state]
    task = AttributionTask(loss_func=fns["loss"], model=model, checkpoints=checkpoints,
                           target_func=fns["margin"])
    # Self-influence on the model trained with flipped labels (one checkpoint for every method:
    # the noisy-label model is trained once).
    noisy_task = None if noisy_state is None else AttributionTask(
        loss_func=fns["loss"], model=model, checkpoints=[noisy_state[0]],
        target_func=fns["margin"])
    grid = SEARCH[_family(method)] if search else [DEFAULTS[_family(method)]]
    if smoke:
        grid = [{**params, **_SMOKE_PARAMS.get(method, {})} for params in grid]
    grid = [{**params, **(overrides or {})} for params in grid]
    trials = []
    cached: dict[str, Any] = {}  # reusable caches (see _cached_attributor)
    for params in grid:
        trial: dict[str, Any] = {"params": params}
        try:
            with _PeakRSS() as mem:
                start = time.perf_counter()
                attributor, cache_seconds = _cached_attributor(
                    cached, "main", method, task, fns, device, setting.n_train, params,
                    train_loader)
                score = attributor.attribute(train_loader, test_loader)
                trial["seconds"] = time.perf_counter() - start + cache_seconds
            trial["peak_rss_mb"] = mem.peak / 2**20
            _store(trial, "lds", lds(score, ground_truth["lds"], ci=CI_LEVEL))
            if "loo" in ground_truth:
                _store(trial, "loo", loo_corr(score, ground_truth["loo"], ci=CI_LEVEL))
        except Exception as err:  # one failing setting must not lose the others' results
            trial["error"] = f"{type(err).__name__}: {err}"
        if noisy_task is not None and "error" not in trial:
            try:  # its own failure (the noisy model's Hessian...) keeps this LDS and LOO
                noisy, _ = _cached_attributor(cached, "noisy", method, noisy_task, fns, device,
                                              setting.n_train, params, noisy_state[1])
                auc, interval = mislabel_detection_auc(
                    noisy.self_attribute(noisy_state[1]), data.noisy_indices, ci=CI_LEVEL)
                trial["auc"], trial["auc_ci"] = auc, list(interval)
            except Exception as err:
                trial["auc_error"] = f"{type(err).__name__}: {err}"
        trials.append(trial)
        if trial_log is not None:
            with open(trial_log, "a") as f:
                f.write(json.dumps({"method": method, **trial}) + "\n")
    row: dict[str, Any] = {"method": method, "trials": trials}
    if not any("error" not in t for t in trials):
        row["error"] = trials[0]["error"]
        return row
    row.update(best_of_trials(trials))
    if "auc" not in row and any("auc_error" in t for t in trials):
        row["auc_error"] = next(t["auc_error"] for t in trials if "auc_error" in t)
    return row


def best_of_trials(trials: list[dict[str, Any]]) -> dict[str, Any]:
    """For each metric the best value over the settings that computed it (a NaN is not a
    value), its interval and its setting (``lds_params``, ``loo_params``, ``auc_params``: a
    metric's best may come from another setting than LDS's); ``params``, ``seconds`` and
    ``peak_rss_mb`` of the best-LDS setting (the runtime the tables report)."""
    ok = [t for t in trials if "error" not in t]
    row: dict[str, Any] = {}
    for metric in ("lds", "loo", "auc"):
        scored = [t for t in ok if _defined(t, metric)]
        if scored:
            top = max(scored, key=lambda t: t[metric])
            row[metric], row[f"{metric}_params"] = top[metric], top["params"]
            if f"{metric}_ci" in top:
                row[f"{metric}_ci"] = top[f"{metric}_ci"]
    if ok:
        best = max(ok, key=lambda t: t["lds"] if _defined(t, "lds") else float("-inf"))
        row.update(params=best["params"], seconds=best["seconds"],
                   peak_rss_mb=best["peak_rss_mb"])
    return row


def _defined(trial: dict[str, Any], metric: str) -> bool:
    value = trial.get(metric)
    return value is not None and value == value  # NaN != NaN

