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
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import psutil
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from hf_attrib import __version__
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
    MusicTransformerConfig,
    MusicTransformerForCausalLM,
    NanoGPTForCausalLM,
    ResNet9Config,
    ResNet9Model,
    nanogpt_config,
)
from hf_attrib.benchmark.music import NUM_MIDI_EVENTS, build_maestro, build_maestro_test_set
from hf_attrib.benchmark.report import results_chart, results_markdown
from hf_attrib.benchmark.settings import BenchmarkSetting, get_setting
from hf_attrib.benchmark.text import (
    SHAKESPEARE_NEW_TOKENS,
    SHAKESPEARE_PROMPT_LEN,
    build_generated_test_set,
    build_shakespeare,
    load_shakespeare_text,
)
from hf_attrib.metrics import lds, loo_corr, mislabel_detection_auc
from hf_attrib.model_utils.retraining import (
    CorruptBlockError,
    evaluate_stacked,
    load_stacked,
    load_subsets,
    retrain_lds,
    retrain_loo,
    train_stacked,
)
from hf_attrib.task import AttributionTask, _check_state_dict

__all__ = ["METHODS", "build_ground_truth", "check_writable", "prepare", "results_markdown",
           "run_benchmark"]

METHODS = ("if-explicit", "if-cg", "if-lissa", "if-arnoldi", "tracin", "grad-dot", "grad-cos",
           "rps", "trak-1", "trak-10", "trak-50")
_TRACIN_CHECKPOINTS = 5


# --------------------------------------------------------------------------------------------
# Models and functions
# --------------------------------------------------------------------------------------------
def build_model(setting: BenchmarkSetting, vocab_size: int | None = None) -> nn.Module:
    """A freshly initialised model of the setting (seeded)."""
    torch.manual_seed(setting.seed)
    if setting.model == "nanogpt":
        return NanoGPTForCausalLM(nanogpt_config(vocab_size=vocab_size, **setting.model_kwargs))
    if setting.model == "music_transformer":
        return MusicTransformerForCausalLM(MusicTransformerConfig(**setting.model_kwargs))
    if setting.model == "logistic_regression":
        return LogisticRegressionModel(LogisticRegressionConfig(**setting.model_kwargs))
    if setting.model == "mlp":
        return MLPModel(MLPConfig(**setting.model_kwargs))
    if setting.model == "resnet9":
        return ResNet9Model(ResNet9Config(**setting.model_kwargs))
    raise NotImplementedError(f"no model family {setting.model!r} (setting {setting.name}).")


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


def _sequence_log_likelihood(logits: Tensor, labels: Tensor) -> Tensor:
    """Per-sequence sum of ``log p(label_t+1 | prefix)`` over positions not labelled -100."""
    logp = torch.log_softmax(logits[:, :-1], dim=-1)
    target = labels[:, 1:]
    mask = target != -100
    picked = logp.gather(-1, target.clamp_min(0)[..., None])[..., 0]
    return (picked * mask).sum(dim=-1)


def generation_functions(model: nn.Module) -> dict[str, Callable[..., Tensor]]:
    """Causal-LM loss and log-likelihood target on ``(input_ids, labels)`` batches."""

    def logits(params: dict[str, Tensor], x: Tensor) -> Tensor:
        return torch.func.functional_call(model, params, (x,)).logits

    def mean_token_loss(params: dict[str, Tensor], x: Tensor, y: Tensor) -> Tensor:
        out = logits(params, x)
        target = y[:, 1:]
        mask = target != -100
        nll = -_sequence_log_likelihood(out, y)
        return nll.sum() / mask.sum().clamp_min(1)

    return {
        "loss": lambda p, b: mean_token_loss(p, b[0], b[1]),
        "margin": lambda p, b: _sequence_log_likelihood(logits(p, b[0]), b[1]).mean(),
        "prob": None,
        "train_loss": mean_token_loss,
        "target": lambda p, x, y: _sequence_log_likelihood(logits(p, x), y),
    }


Stacked = tuple[dict[str, Tensor], dict[str, Tensor]]  # (params, buffers), each [M, ...]


def _unstack(models: Stacked, i: int) -> dict[str, Tensor]:
    """The state dict (parameters and buffers) of stacked model ``i``."""
    params, buffers = models
    return {k: v[i].clone() for k, v in {**params, **buffers}.items()}


def _select(models: Stacked, ids: Sequence[int]) -> Stacked:
    params, buffers = models
    return ({k: v[ids] for k, v in params.items()}, {k: v[ids] for k, v in buffers.items()})


def _persistent(model: nn.Module, params: dict[str, Tensor], buffers: dict[str, Tensor]
                ) -> Stacked:
    """Drop non-persistent buffers (e.g. attention masks): they are not part of a state."""
    keys = model.state_dict().keys()
    return params, {k: v for k, v in buffers.items() if k in keys}


def _load(model: nn.Module, gt_dir: Path, kind: str) -> Stacked:
    params, buffers, _ = load_stacked(gt_dir, kind, with_buffers=True)
    return _persistent(model, params, buffers)


def _train(model: nn.Module, loss: Callable[..., Tensor], x: Tensor, y: Tensor, seed: int,
           recipe: dict[str, Any], start: dict[str, Tensor] | None = None,
           **kwargs: Any) -> Stacked:
    """One model on all of ``x``, from ``start`` (default: the model's current weights).

    ``loss`` calls ``model`` itself, so ``model`` is trained in place of a copy and its
    weights are restored afterwards. Batch-norm models train sequentially, keeping buffers.
    """
    saved = {k: v.detach().clone() for k, v in model.state_dict().items()}
    if start is not None:
        _load_state(model, start)
    mask = torch.ones(1, x.shape[0], dtype=torch.bool)
    try:
        params, buffers = train_stacked(model, loss, x, y, mask, seed=seed, return_buffers=True,
                                        init="model", **{**recipe, **kwargs})
        return _persistent(model, params, buffers)
    finally:
        model.load_state_dict(saved)


def _evaluate(model: nn.Module, models: Stacked, x: Tensor, y: Tensor,
              target: Callable[..., Tensor]) -> Tensor:
    params, buffers = models
    return evaluate_stacked(model, params, x, y, target, chunk=64, buffers=buffers or None)


def _load_state(model: nn.Module, state: dict[str, Tensor]) -> None:
    """``load_state_dict`` that accepts tied weights stored once (checked, not silent)."""
    _check_state_dict(model, state, "trained state")
    model.load_state_dict(state, strict=False)


# --------------------------------------------------------------------------------------------
# Methods
# --------------------------------------------------------------------------------------------
# Hyperparameters: ``DEFAULTS`` are the best of ``SEARCH`` on digits-lr; ``SEARCH`` is the
# paper's Appendix C.1 grid, plus a kernel regularization grid for TRAK (the paper fixes it; on
# small models an unregularized (Phi^T Phi)^-1 is a near-exact inverse and ranks poorly).
_REGS = [1e-1, 1e-2, 5e-3, 1e-3, 1e-4, 1e-5]
SEARCH: dict[str, list[dict[str, Any]]] = {
    "if-explicit": [{"regularization": r} for r in _REGS],
    "if-cg": [{"regularization": r, "max_iter": 10} for r in _REGS],
    "if-lissa": [{"recursion_depth": 500, "batch_size": b} for b in (10, 50)],
    "if-arnoldi": [{"regularization": r, "max_iter": 50} for r in _REGS],
    "tracin": [{}],
    "grad-dot": [{}],
    "grad-cos": [{}],
    "rps": [{"l2_strength": s, "normalize_preactivate": nm}
            for s in (10, 1, 1e-1, 1e-2, 1e-3, 1e-4) for nm in (True, False)],
    "trak": [{"proj_dim": p, "per_example_regularization": r}
             for p in (512, 2048) for r in (0.0, 1e-2, 1e-1, 1.0)],
}
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


# Smoke runs check the pipeline, not the methods: their solvers run a few iterations only.
_SMOKE_PARAMS: dict[str, dict[str, Any]] = {
    "if-cg": {"max_iter": 3},
    "if-lissa": {"recursion_depth": 10, "batch_size": 10},
    "if-arnoldi": {"max_iter": 10},
}


def _family(method: str) -> str:
    return "trak" if method.startswith("trak-") else method


def make_attributor(method: str, task: AttributionTask, fns: dict[str, Callable[..., Tensor]],
                    device: str, n_train: int, params: dict[str, Any] | None = None) -> Any:
    """The attributor of ``method`` with hyperparameters ``params`` (default: ``DEFAULTS``).

    LiSSA's ``scaling`` is set above the largest Hessian eigenvalue is ever likely to be for
    these models (10) with ``damping * scaling`` equal to 1e-3. TRAK's
    ``per_example_regularization`` ``r`` damps the averaged kernel, ``Phi^T Phi / n + r I`` on
    hf_attrib's normalised features (its kernel sums over examples, while the IF Hessian
    averages); ``TRAKAttributor.regularization`` is on dattri's scale (``lambda D / p`` on
    those features), hence the conversion ``lambda = r n p / D``.
    """
    hp = dict(DEFAULTS[_family(method)] if params is None else params)
    if method == "if-explicit":
        return IFAttributorExplicit(task=task, device=device, **hp)
    if method == "if-cg":
        return IFAttributorCG(task=task, device=device, **hp)
    if method == "if-lissa":
        return IFAttributorLiSSA(task=task, device=device, damping=1e-4, scaling=10.0, **hp)
    if method == "if-arnoldi":
        return IFAttributorArnoldi(task=task, device=device, proj_dim=min(50, hp["max_iter"]),
                                   **hp)
    if method == "tracin":
        return TracInAttributor(task=task, device=device,
                                weight_list=[1.0] * task.num_checkpoints)
    if method == "grad-dot":
        return GradDotAttributor(task=task, device=device)
    if method == "grad-cos":
        return GradCosAttributor(task=task, device=device)
    if method == "rps":
        return RPSAttributor(task=task, device=device, final_linear_layer_name="classifier", **hp)
    if method.startswith("trak-"):
        d_model = sum(p.numel() for p in task.model.parameters() if p.requires_grad)
        lam = hp["per_example_regularization"] * n_train * hp["proj_dim"] / d_model
        return TRAKAttributor(task=task, device=device, correct_probability_func=fns.get("prob"),
                              projector_kwargs={"proj_dim": hp["proj_dim"]}, regularization=lam)
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


# Smoke runs shrink the data, the number of models and the architectures' widths.
_SMOKE_MODEL = {
    "resnet9": dict(stem_channels=8, hidden_sizes=(16, 32, 64)),
    "music_transformer": dict(num_hidden_layers=2, num_attention_heads=2, hidden_size=32,
                              intermediate_size=64, max_position_embeddings=64),
    "nanogpt": dict(n_layer=1, n_head=2, n_embd=32, block_size=32),
}


def _smoke(setting: BenchmarkSetting) -> BenchmarkSetting:
    train = replace(setting.train, epochs=min(setting.train.epochs, 3))
    model_kwargs = {**setting.model_kwargs, **_SMOKE_MODEL.get(setting.model, {})}
    extra = {**setting.extra, "seq_len": 32} if "seq_len" in setting.extra else setting.extra
    return replace(setting, n_train=min(setting.n_train, 120), n_test=min(setting.n_test, 12),
                   lds_models=8, train=train, model_kwargs=model_kwargs, extra=extra)


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
            smoke: bool = False, cache_dir: str | Path | None = None) -> Prepared:
    """Build the data, model, functions and training recipe of a setting.

    For generative settings the test set is generated by the trained model, so ``xt``/``yt``
    are ``None`` until :func:`generated_test_set` fills them.
    """
    setting = get_setting(setting) if isinstance(setting, str) else setting
    if smoke:
        setting = _smoke(setting)
    if setting.kind == "generation":
        data, vocab_size = _generation_data(setting, data_dir, cache_dir, smoke)
        setting = replace(setting, n_train=len(data.train))
        columns = data.train.with_format("torch")[:]
        x, y = columns["input_ids"].long(), columns["labels"].long()
        xt = yt = None
        model = build_model(setting, vocab_size)
        fns = generation_functions(model)
    else:
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
        return BenchmarkData(train=music.train, test=music.test), NUM_MIDI_EVENTS + 2
    raise NotImplementedError(f"no data builder for {setting.dataset!r}.")


def generated_test_set(prep: Prepared, state: dict[str, Tensor]) -> None:
    """Fill ``prep.xt``/``prep.yt`` with samples of the model at ``state`` (paper, Sec. 3.3).

    Shakespeare: held-out prompts continued by the model; MAESTRO: test-split prompts
    continued by one event, as the paper does.
    """
    setting = prep.setting
    model = copy.deepcopy(prep.model)
    _load_state(model, state)
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
    columns = test.with_format("torch")[:]
    prep.xt, prep.yt = columns["input_ids"].long(), columns["labels"].long()


def _loo_index(setting: BenchmarkSetting, loo_examples: int | None) -> list[int]:
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
    common = dict(seed=setting.seed, models=models, shard=shard, progress=progress,
                  block_size=prep.block_size, **prep.recipe)
    if kind == "lds":
        return retrain_lds(gt_dir, prep.model, prep.fns["train_loss"], prep.x, prep.y,
                           num_models=setting.lds_models, fraction=setting.lds_fraction, **common)
    return retrain_loo(gt_dir, prep.model, prep.fns["train_loss"], prep.x, prep.y,
                       indices=_loo_index(setting, loo_examples), **common)


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
    from_hub: str | Path | None = None,
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
        from_hub: use pulled repos instead of building the ground truth: a folder written by
            ``hf-attrib hub export``/``hub pull --out`` (``dataset/`` + ``checkpoints/``) or a
            repo id / setting name to pull. The data, the full-data (and noisy-label) models,
            the LDS subset models ensembling methods use and the ground-truth targets come
            from it; nothing is retrained but TracIn's trajectory.

    Returns:
        The results (also written to ``out_dir/results.json`` and ``out_dir/results.md``).

    Raises:
        PermissionError, NotADirectoryError: ``out_dir`` cannot be written (checked first).
    """
    setting = get_setting(setting) if isinstance(setting, str) else setting
    if smoke:
        setting = _smoke(setting)
        loo_examples = min(loo_examples or 20, 20)
    methods_given = methods
    methods = list(methods or METHODS)
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise KeyError(f"unknown method(s) {unknown}; known methods: {', '.join(METHODS)}.")
    out = check_writable(out_dir)  # before any training
    gt_dir = out / "ground_truth"
    prep = prepare(setting, data_dir, smoke=smoke, cache_dir=out / "cache")
    setting = prep.setting
    data, model, fns, recipe = prep.data, prep.model, prep.fns, prep.recipe
    x, y = prep.x, prep.y
    loo_index = _loo_index(setting, loo_examples)
    pulled = None
    if from_hub is not None:
        from hf_attrib.hub.runner_support import use_pulled

        trak = [min(int(m.split("-")[1]), len(setting.ensemble_model_ids))
                for m in methods if m.startswith("trak-")]
        pulled = use_pulled(prep, from_hub, max(trak, default=0))
        x, y, data, loo_index = prep.x, prep.y, prep.data, pulled.loo_index

    # The full-data model (for LOO it shares its random stream with the LOO models). ---------
    if pulled is not None:
        full = pulled.full
    elif "loo" in setting.metrics:
        build_ground_truth(prep, gt_dir, "loo", loo_examples=loo_examples, progress=progress)
        full = _load(model, gt_dir, "loo-full")
    else:
        _say(progress, "training the full-data model ...")
        full = _train(model, fns["train_loss"], x, y, setting.seed, recipe)
    full_state = _unstack(full, 0)
    if prep.xt is None:
        generated_test_set(prep, full_state)
    xt, yt = prep.xt, prep.yt

    # Ground truth (resumable: only missing blocks are trained). ------------------------------
    if pulled is not None:
        lds_models, ground_truth = pulled.lds_models, pulled.ground_truth
    else:
        build_ground_truth(prep, gt_dir, "lds", progress=progress)
        lds_models = _load(model, gt_dir, "lds")
        masks, _ = load_subsets(gt_dir, "lds")
        gt_ids = list(setting.ground_truth_model_ids)
        lds_values = _evaluate(model, _select(lds_models, gt_ids), xt, yt, fns["target"])
        ground_truth = {"lds": (lds_values, masks[gt_ids])}
    if "loo" in setting.metrics and pulled is None:
        ground_truth["loo"] = (_evaluate(model, _load(model, gt_dir, "loo"), xt, yt, fns["target"]),
                               torch.tensor(loo_index),
                               _evaluate(model, full, xt, yt, fns["target"])[0])
    # TracInCP's checkpoints along one training run (trained only when TracIn is run).
    trajectory: list[dict[str, Tensor]] = []
    if "tracin" in methods:
        _say(progress, "training TracInCP's checkpoints ...")
        trajectory = _trajectory(model, fns, x, y, setting, recipe)
    noisy_state = None
    if "auc" in setting.metrics:
        xn, yn = BenchmarkData.tensors(data.noisy_train)
        if pulled is not None and pulled.noisy is not None:
            noisy = pulled.noisy
        else:
            _say(progress, "training the noisy-label model (for AUC) ...")
            noisy = _train(model, fns["train_loss"], xn, yn, setting.seed, recipe)
        noisy_state = (_unstack(noisy, 0), DataLoader(TensorDataset(xn, yn), batch_size=250))

    # Methods. ---------------------------------------------------------------------------
    batch = 250 if setting.kind == "classification" else 32
    train_loader = DataLoader(TensorDataset(x, y), batch_size=batch)
    test_loader = DataLoader(TensorDataset(xt, yt), batch_size=batch)
    if methods_given is None and setting.kind == "generation":
        methods = [m for m in methods if m != "rps"]  # RPS needs a classification head
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
                                data, device, search, smoke))
        _say(progress, f"[{i}/{len(methods)}] {method} done in "
                       f"{time.perf_counter() - start:.1f} s: {_outcome(rows[-1])}")
    results = {
        "setting": setting.name, "smoke": smoke, "search": search,
        "n_train": setting.n_train, "n_test": setting.n_test,
        "loo_examples": len(loo_index) if "loo" in setting.metrics else 0,
        "device": device, "hf_attrib_version": __version__, "methods": rows,
    }
    if pulled is not None:
        results["ground_truth_source"] = pulled.source
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
        states.append(_unstack(_train(model, fns["train_loss"], x, y, setting.seed + 1000 + i,
                                      recipe, start=start, epochs=epochs), 0))
    return states


def _run_method(method: str, model: nn.Module, fns: dict[str, Callable[..., Tensor]],
                full_state: dict[str, Tensor], trajectory: list[dict[str, Tensor]],
                lds_models: Stacked, setting: BenchmarkSetting,
                train_loader: DataLoader, test_loader: DataLoader,
                ground_truth: dict[str, Any], noisy_state: Any, data: BenchmarkData,
                device: str, search: bool, smoke: bool = False) -> dict[str, Any]:
    """Evaluate one method: each hyperparameter setting of the grid (``search``) or the
    default, reporting for every metric the best value over the settings, as the paper does."""
    if method == "tracin":
        checkpoints = trajectory
    elif method.startswith("trak-"):
        k = min(int(method.split("-")[1]), len(setting.ensemble_model_ids))
        checkpoints = [_unstack(lds_models, i) for i in range(k)]
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
    trials = []
    for params in grid:
        trial: dict[str, Any] = {"params": params}
        try:
            with _PeakRSS() as mem:
                start = time.perf_counter()
                attributor = make_attributor(method, task, fns, device, setting.n_train, params)
                attributor.cache(train_loader)
                score = attributor.attribute(train_loader, test_loader)
                trial["seconds"] = time.perf_counter() - start
            trial["peak_rss_mb"] = mem.peak / 2**20
            trial["lds"] = lds(score, ground_truth["lds"]).mean
            if "loo" in ground_truth:
                trial["loo"] = loo_corr(score, ground_truth["loo"]).mean
            if noisy_task is not None:
                noisy = make_attributor(method, noisy_task, fns, device, setting.n_train, params)
                noisy.cache(noisy_state[1])
                trial["auc"] = mislabel_detection_auc(noisy.self_attribute(noisy_state[1]),
                                                      data.noisy_indices)
        except Exception as err:  # one failing setting must not lose the others' results
            trial["error"] = f"{type(err).__name__}: {err}"
        trials.append(trial)
    ok = [t for t in trials if "error" not in t]
    row: dict[str, Any] = {"method": method, "trials": trials}
    if not ok:
        row["error"] = trials[0]["error"]
        return row
    for metric in ("lds", "loo", "auc"):
        values = [t[metric] for t in ok if metric in t and t[metric] == t[metric]]
        if values:
            row[metric] = max(values)
    best = max(ok, key=lambda t: t.get("lds", float("-inf")))
    row.update(params=best["params"], seconds=best["seconds"], peak_rss_mb=best["peak_rss_mb"])
    return row
