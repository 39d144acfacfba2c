"""Read pulled (or exported) repos back: ground truth, checkpoints, data; ``load_benchmark``
(a setting's model, loaders and ground truth in one object) and ``pull_benchmark`` (what
``hf-attrib bench run --from-hub`` hands the runner).

Every file is read through :func:`~hf_attrib.hub.layout.verified_path`: only files the index
names, inside the repo folder, matching their recorded sha256.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import datasets
from safetensors import safe_open
from safetensors.torch import load_file
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from hf_attrib.benchmark.data import split_tensors
from hf_attrib.hub.errors import HubIntegrityError, HubNotFoundError
from hf_attrib.hub.layout import DEFAULT_ORG, check_same_export, read_index, verified_path
from hf_attrib.model_utils.block_store import (
    OPEN_END,
    merge_stacked,
    parse_model_range,
    unpack_masks,
)

if TYPE_CHECKING:  # imported when called: it loads the benchmark models (transformers)
    from hf_attrib.benchmark.pulled import PulledBenchmark

# split_tensors: re-exported from hf_attrib.benchmark.data (its home).
__all__ = ["Benchmark", "GroundTruth", "load_benchmark", "pull_benchmark", "read_checkpoints",
           "read_ground_truth", "read_splits", "read_state", "resolve_folders",
           "split_tensors"]


@dataclass
class GroundTruth:
    """A setting's ground truth as stored in its dataset repo (``ground_truth/``).

    Attributes:
        lds_masks: ``[M, n_train]`` training subset of each LDS model.
        lds_model_ids: ``[M]`` their ids.
        lds_targets: ``[M, n_test]`` target of each LDS model on each test example.
        ground_truth_model_ids: the LDS models that form the ground truth.
        loo_indices: left-out example of each LOO model (``None`` without LOO).
        loo_targets: ``[L, n_test]``.
        loo_full_targets: ``[n_test]``: the full-data model's targets.
        noisy_indices: flipped-label positions (``None`` without AUC).
        noisy_labels: the noisy training labels.
        meta: the index of the dataset repo.
    """

    lds_masks: Tensor
    lds_model_ids: Tensor
    lds_targets: Tensor
    ground_truth_model_ids: Tensor
    loo_indices: Tensor | None = None
    loo_targets: Tensor | None = None
    loo_full_targets: Tensor | None = None
    noisy_indices: Tensor | None = None
    noisy_labels: Tensor | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    def lds(self) -> tuple[Tensor, Tensor]:
        """``(targets, masks)`` of the ground-truth models: the argument of
        :func:`hf_attrib.metrics.lds`."""
        rows = [int((self.lds_model_ids == i).nonzero()[0, 0])
                for i in self.ground_truth_model_ids.tolist()]
        return self.lds_targets[rows], self.lds_masks[rows]

    def loo(self) -> tuple[Tensor, Tensor, Tensor] | None:
        """``(targets, indices, full_targets)``: the argument of
        :func:`hf_attrib.metrics.loo_corr`."""
        if self.loo_targets is None:
            return None
        return self.loo_targets, self.loo_indices, self.loo_full_targets


def _need(folder: Path, index: dict[str, Any], name: str, what: str) -> Path:
    """``folder/name``, verified against ``index``; missing: name the pull that fetches it."""
    return verified_path(folder, index, name, missing=(
        f"{folder / name} is missing: pull it with `hf-attrib hub pull SETTING --what {what}` "
        "(or export the setting again)."))


def _lds_masks(lds: dict[str, Tensor], n_train: Any, path: Path) -> Tensor:
    """The ``[M, n_train]`` LDS masks of ``ground_truth/lds.safetensors``: bit-packed
    (``masks_packed``, ground-truth format /2) or, in older exports, ``masks`` (bool)."""
    if "masks" in lds:
        return lds["masks"].bool()
    try:
        return unpack_masks(lds["masks_packed"], int(n_train))
    except (KeyError, TypeError, ValueError) as err:
        raise HubIntegrityError(
            f"{path} holds no LDS subsets for the index's n_train={n_train!r} ({err}): it was "
            "not written by `hf-attrib hub export`; export the setting again (or pull an "
            "intact copy with `hf-attrib hub pull`).") from err


def read_ground_truth(dataset_dir: str | Path) -> GroundTruth:
    """The ground truth of a dataset repo folder."""
    folder = Path(dataset_dir)
    meta = read_index(folder)
    path = _need(folder, meta, "ground_truth/lds.safetensors", "ground-truth")
    lds = load_file(str(path))
    gt = GroundTruth(_lds_masks(lds, meta.get("n_train"), path), lds["model_ids"],
                     lds["targets"], lds["ground_truth_model_ids"], meta=meta)
    if "loo" in meta.get("metrics", []):
        loo = load_file(str(_need(folder, meta, "ground_truth/loo.safetensors",
                                  "ground-truth")))
        gt.loo_indices, gt.loo_targets = loo["indices"], loo["targets"]
        gt.loo_full_targets = loo["full_targets"]
    if "auc" in meta.get("metrics", []):
        noisy = load_file(str(_need(folder, meta, "ground_truth/noisy_labels.safetensors",
                                    "ground-truth")))
        gt.noisy_indices, gt.noisy_labels = noisy["indices"], noisy["labels"]
    return gt


def read_checkpoints(ckpt_dir: str | Path, kind: str, models: Any = None
                     ) -> tuple[dict[str, Tensor], dict[str, Tensor], Tensor]:
    """Stacked ``(params, buffers, model_ids)`` of ``kind`` from the shards on disk.

    Only the shards holding ``models`` (``"a:b"``, see
    :func:`~hf_attrib.model_utils.block_store.parse_model_range`; default all) are read; a
    needed shard that was not pulled is an error naming the ``hub pull`` that fetches it.
    """
    from hf_attrib.hub.transfer import shards_for

    folder = Path(ckpt_dir)
    index = read_index(folder)
    files = shards_for(index, kind, models)
    spec = f" --models {models}" if models is not None else ""
    shards = []
    for name in files:
        path = _need(folder, index, name, f"checkpoints{spec}")
        with safe_open(str(path), framework="pt") as f:  # no __iter__: keys() it is
            shards.append({key: f.get_tensor(key) for key in f.keys()})  # noqa: SIM118
    if models is None:
        return merge_stacked(shards, None)
    a, b = parse_model_range(models)
    count = index["kinds"][kind].get("num_models")
    if count is not None and b != OPEN_END and b > count:
        # Reading (unlike pulling, where one range spans kinds of different sizes) must not
        # cut "0:10" of 8 models short without a word.
        raise ValueError(f"models {a}:{b} asks for {kind} models up to id {b - 1}, but "
                         f"{folder} has {count} (ids 0..{count - 1}); ask for a range "
                         f"within them, e.g. 0:{count}.")
    return merge_stacked(shards, (a, b))


def read_state(ckpt_dir: str | Path, kind: str = "full") -> dict[str, Tensor]:
    """The state dict of a single-model kind (``full``: ``model.safetensors``, ``noisy``)."""
    folder = Path(ckpt_dir)
    index = read_index(folder)
    entry = index.get("kinds", {}).get(kind)
    if entry is None or "file" not in entry:
        raise HubNotFoundError(f"{folder} has no single model of kind {kind!r}.")
    return load_file(str(_need(folder, index, entry["file"], "checkpoints")))


def read_splits(dataset_dir: str | Path) -> datasets.DatasetDict:
    """The parquet splits of a dataset repo folder (``datasets.load_dataset``): the
    ``data/*.parquet`` files its index lists (other files in ``data/`` are not read)."""
    folder = Path(dataset_dir)
    index = read_index(folder)
    names = sorted(n for n in index["files"]
                   if n.startswith("data/") and n.count("/") == 1 and n.endswith(".parquet"))
    files: dict[str, list[str]] = {}  # a split may span several files (train-0000i-of-0000n)
    for n in names:
        files.setdefault(Path(n).name.split("-")[0], []).append(str(_need(folder, index, n,
                                                                              "data")))
    if not files:
        raise HubNotFoundError(f"{folder / 'data'} holds no parquet files: pull them with "
                               "`hf-attrib hub pull SETTING --what data`.")
    return datasets.load_dataset("parquet", data_files=files)


def resolve_folders(source: str | Path, *, what: tuple[str, ...], models: Any = None,
                    endpoint: str | None = None, revision: str | None = None,
                    token: str | None = None, org: str = DEFAULT_ORG,
                    cache_dir: str | Path | None = None) -> tuple[Path | None, Path | None]:
    """``(dataset folder, checkpoints folder)`` of a local export/pull folder or a repo id /
    setting name (pulled)."""
    path = Path(source)
    if path.is_dir():
        if (path / "dataset").is_dir() or (path / "checkpoints").is_dir():
            ds, ck = path / "dataset", path / "checkpoints"
            return (ds if ds.is_dir() else None), (ck if ck.is_dir() else None)
        index = read_index(path)
        return (path, None) if index.get("repo_type") == "dataset" else (None, path)
    from hf_attrib.hub.transfer import pull

    result = pull(str(source), what=what, models=models, endpoint=endpoint, revision=revision,
                  token=token, org=org, cache_dir=cache_dir)
    return result.dataset_dir, result.checkpoints_dir


@dataclass
class Benchmark:
    """Everything to evaluate a method on a setting (the paper's user flow), in one object.

    Attributes:
        setting: the setting (smoke-shrunk if the repos are a smoke build).
        model: the full-data model (trained weights loaded).
        splits: ``train``, ``test`` (and ``noisy_train``) ``datasets.Dataset`` splits.
        train_loader: ``(x, y)`` batches of the training set, in order.
        test_loader: ``(x, y)`` batches of the test set.
        loss_func: ``loss_func(params, (x, y))`` for an ``AttributionTask``.
        target_func: ``target_func(params, (x, y))`` (the setting's target, averaged).
        functions: all functions of the setting (``loss``, ``margin``, ``target``, ...).
        checkpoints: ``{kind: (params, buffers, model_ids)}`` of the stacked kinds pulled.
        full_state: the full-data model's state dict.
        ground_truth: the :class:`GroundTruth`.
        dataset_dir: local folder of the dataset repo.
        checkpoints_dir: local folder of the checkpoint repo.
    """

    setting: Any
    model: nn.Module
    splits: datasets.DatasetDict
    train_loader: DataLoader
    test_loader: DataLoader
    loss_func: Any
    target_func: Any
    functions: dict[str, Any]
    checkpoints: dict[str, tuple[dict[str, Tensor], dict[str, Tensor], Tensor]]
    full_state: dict[str, Tensor]
    ground_truth: GroundTruth
    dataset_dir: Path
    checkpoints_dir: Path

    def state(self, kind: str, model_id: int) -> dict[str, Tensor]:
        """State dict of one stacked model (e.g. ``bench.state("lds", 3)``)."""
        params, buffers, ids = self.checkpoints[kind]
        row = int((ids == model_id).nonzero()[0, 0])
        return {k: v[row].clone() for k, v in {**params, **buffers}.items()}


def load_benchmark(setting: str, source: str | Path | None = None, *,
                   models: Any = None, kinds: tuple[str, ...] = ("lds", "loo"),
                   batch_size: int | None = None, endpoint: str | None = None,
                   revision: str | None = None, token: str | None = None,
                   org: str = DEFAULT_ORG, cache_dir: str | Path | None = None) -> Benchmark:
    """Load a setting's model, data, functions, checkpoints and ground truth in one call.

    Args:
        setting: setting name (``"digits-lr"``).
        source: a local folder (an export/pull folder with ``dataset/`` and ``checkpoints/``)
            or a dataset repo id; default the setting's repos under ``org`` on the Hub.
        models: only these stacked models (``"a:b"``), e.g. ``"0:10"`` for TRAK-10.
        kinds: stacked kinds to load (``lds``, ``loo``; those the setting lacks are skipped).
        batch_size: loader batch size (default 250 for classification, 32 for generation).
        endpoint, revision, token, cache_dir: Hub access when ``source`` is not a folder.
        org: organisation of the default repos.
    """
    from hf_attrib.benchmark.builders import build_model, load_state, setting_functions
    from hf_attrib.benchmark.settings import get_setting, smoke_setting

    base = get_setting(setting)
    ds_dir, ck_dir = resolve_folders(source or base.name, what=("data", "ground-truth",
                                                                "checkpoints"),
                                     models=models, endpoint=endpoint, revision=revision,
                                     token=token, org=org, cache_dir=cache_dir)
    if ds_dir is None or ck_dir is None:
        raise HubNotFoundError(f"{source} needs both the dataset and the checkpoint repo.")
    check_same_export(ds_dir, ck_dir)
    gt = read_ground_truth(ds_dir)
    if gt.meta.get("setting") != base.name:
        raise ValueError(f"{ds_dir} holds setting {gt.meta.get('setting')!r}, not {base.name!r}.")
    s = smoke_setting(base) if gt.meta.get("smoke") else base
    s = type(s)(**{**s.__dict__, "n_train": gt.meta["n_train"], "n_test": gt.meta["n_test"]})
    splits = read_splits(ds_dir)
    x, y = split_tensors(splits["train"], s.kind)
    xt, yt = split_tensors(splits["test"], s.kind)
    vocab = None
    if s.kind == "generation":
        import json

        config = _need(ck_dir, read_index(ck_dir), "config.json", "checkpoints")
        vocab = json.loads(config.read_text()).get("vocab_size")
    model = build_model(s, vocab)
    full_state = read_state(ck_dir, "full")
    load_state(model, full_state)
    fns = setting_functions(s, model)
    index = read_index(ck_dir)
    checkpoints = {k: read_checkpoints(ck_dir, k, models) for k in kinds
                   if k in index.get("kinds", {})}
    batch = batch_size or (250 if s.kind == "classification" else 32)
    return Benchmark(
        setting=s, model=model, splits=splits,
        train_loader=DataLoader(TensorDataset(x, y), batch_size=batch),
        test_loader=DataLoader(TensorDataset(xt, yt), batch_size=batch),
        loss_func=fns["loss"], target_func=fns["margin"], functions=fns,
        checkpoints=checkpoints, full_state=full_state, ground_truth=gt,
        dataset_dir=ds_dir, checkpoints_dir=ck_dir)


def pull_benchmark(source: str | Path, *, ensemble_models: int = 0,
                   endpoint: str | None = None, revision: str | None = None,
                   token: str | None = None, org: str = DEFAULT_ORG,
                   cache_dir: str | Path | None = None) -> PulledBenchmark:
    """What ``run_benchmark(..., pulled=...)`` takes from a setting's repos instead of building
    it: the data splits, the full-data (and noisy-label) models, the first LDS models and the
    ground truth (``hf-attrib bench run --from-hub``).

    Args:
        source: a local folder (``hub export`` / ``hub pull --out``: ``dataset/`` and
            ``checkpoints/``) or a repo id / setting name to pull.
        ensemble_models: LDS models ``0..k-1`` needed by ensembling methods (TRAK-k; see
            :func:`hf_attrib.benchmark.runner.ensemble_models_needed`); only the checkpoint
            shards holding them are pulled.
        endpoint, revision, token, cache_dir: Hub access when ``source`` is not a folder.
        org: organisation of a setting name's repos.

    Returns:
        The :class:`~hf_attrib.benchmark.pulled.PulledBenchmark`; the runner checks that it
        fits the setting it runs.

    Raises:
        FileNotFoundError: ``source`` lacks the dataset or the checkpoint repo.
        ValueError: LDS models ``0..k-1`` are not all there.
    """
    from hf_attrib.benchmark.data import BenchmarkData
    from hf_attrib.benchmark.pulled import PulledBenchmark

    models = f"0:{ensemble_models}" if ensemble_models else None
    ds_dir, ck_dir = resolve_folders(source, what=("data", "ground-truth", "checkpoints"),
                                     models=models, endpoint=endpoint, revision=revision,
                                     token=token, org=org, cache_dir=cache_dir)
    if ds_dir is None or ck_dir is None:
        raise FileNotFoundError(f"{source} must hold both the dataset and the checkpoint repo "
                                "(pull both: `hf-attrib hub pull SETTING --out DIR`).")
    check_same_export(ds_dir, ck_dir)
    gt = read_ground_truth(ds_dir)
    splits = read_splits(ds_dir)
    data = BenchmarkData(train=splits["train"], test=splits["test"],
                         noisy_train=splits.get("noisy_train"), noisy_indices=gt.noisy_indices)
    full = ({k: v[None] for k, v in read_state(ck_dir, "full").items()}, {})
    noisy = None
    if "noisy" in read_index(ck_dir).get("kinds", {}):
        noisy = ({k: v[None] for k, v in read_state(ck_dir, "noisy").items()}, {})
    lds_models: tuple[dict[str, Tensor], dict[str, Tensor]] = ({}, {})
    if ensemble_models:
        params, buffers, ids = read_checkpoints(ck_dir, "lds", models)
        if ids.tolist() != list(range(ensemble_models)):
            raise ValueError(f"{ck_dir}: LDS models 0..{ensemble_models - 1} are needed, found "
                             f"{ids.tolist()}.")
        lds_models = (params, buffers)
    ground_truth: dict[str, Any] = {"lds": gt.lds()}
    loo = gt.loo()
    if loo is not None:
        ground_truth["loo"] = loo
    loo_index = gt.loo_indices.tolist() if gt.loo_indices is not None else []
    return PulledBenchmark(data=data, full=full, lds_models=lds_models,
                           ground_truth=ground_truth, noisy=noisy, loo_index=loo_index,
                           meta=gt.meta, source=str(source))
