"""``export``: write a setting's dataset and checkpoint repos as local folders (cards included).

``export(setting, out)`` builds (or resumes, or reuses) the setting's ground truth with the
benchmark runner, then writes ``out/dataset`` and ``out/checkpoints`` in the layout of
``docs/hub.md``. Everything is safetensors, parquet or JSON: nothing is pickled. The files are
byte-reproducible (safetensors headers in a fixed order, no timestamps), so exporting unchanged
data again gives identical files and pushing them again makes no commit.
"""

from __future__ import annotations

import copy
import json
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets
import torch
from torch import Tensor

from hf_attrib import __version__
from hf_attrib.benchmark import runner
from hf_attrib.benchmark.builders import load_state
from hf_attrib.benchmark.data import BenchmarkData
from hf_attrib.benchmark.settings import BenchmarkSetting
from hf_attrib.benchmark.stacked import (
    evaluate_models,
    load_models,
    persistent,
    train_model,
    unstack,
)
from hf_attrib.files import replace_folder, restore_replaced_folder
from hf_attrib.hub.cards import checkpoints_card, dataset_card
from hf_attrib.hub.errors import HubPathError
from hf_attrib.hub.layout import (
    CHECKPOINTS_FORMAT,
    DEFAULT_ORG,
    GROUND_TRUTH_FORMAT,
    INDEX_FILE,
    INDEX_FORMAT,
    PAIR_KEY,
    check_folder,
    checkpoints_repo_id,
    dataset_repo_id,
    file_entry,
    files_digest,
    save_safetensors,
    shard_name,
)
from hf_attrib.model_utils.block_store import (
    load_stacked,
    load_subsets,
    pack_masks,
    stacked_tensors,
)

__all__ = ["ExportResult", "export", "split_from_tensors"]

# Shards of ~16 MiB: a range pull (`hub pull --models 0:10`) fetches at most one shard's worth
# beyond the models asked for per kind (MNIST-LR: 534 models of 31 KB per shard, so the 5,000
# LOO models are 10 shards), while the file count stays small for large sets.
_SHARD_BYTES = 16 * 2**20


@dataclass
class ExportResult:
    """Folders written by :func:`export`.

    Attributes:
        dataset_dir: the dataset repo folder (``<org>/<setting>``).
        checkpoints_dir: the checkpoint repo folder (``<org>/<setting>-checkpoints``).
        dataset_repo_id: its default repo id.
        checkpoints_repo_id: its default repo id.
    """

    dataset_dir: Path
    checkpoints_dir: Path
    dataset_repo_id: str
    checkpoints_repo_id: str


def split_from_tensors(x: Tensor, y: Tensor, kind: str) -> datasets.Dataset:
    if kind == "classification":
        return datasets.Dataset.from_dict({"pixel_values": x.float().tolist(),
                                           "label": y.long().tolist()})
    return datasets.Dataset.from_dict({"input_ids": x.long().tolist(),
                                       "labels": y.long().tolist()})


def _write_shards(folder: Path, kind: str, params: dict[str, Tensor],
                  buffers: dict[str, Tensor], ids: Tensor, per_shard: int
                  ) -> list[dict[str, Any]]:
    """Stacked parameters as shards of ``per_shard`` consecutive models (the block format's
    keys for parameters, buffers and model ids: :func:`.stacked_tensors`)."""
    count = max(1, -(-ids.numel() // per_shard))
    shards = []
    for i in range(count):
        lo, hi = i * per_shard, min((i + 1) * per_shard, ids.numel())
        tensors = stacked_tensors({name: t[lo:hi] for name, t in params.items()}, ids[lo:hi],
                                  {name: t[lo:hi] for name, t in buffers.items()})
        rel = shard_name(kind, i, count)
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        save_safetensors(tensors, str(folder / rel), metadata={
            "format": CHECKPOINTS_FORMAT, "kind": kind, "start": str(int(ids[lo])),
            "stop": str(int(ids[hi - 1]) + 1)})
        shards.append({"file": rel, "start": int(ids[lo]), "stop": int(ids[hi - 1]) + 1})
    return shards


def _models_per_shard(params: dict[str, Tensor], buffers: dict[str, Tensor],
                      shard_models: int | None, shard_bytes: int) -> int:
    if shard_models is not None:
        if shard_models < 1:
            raise ValueError(f"shard_models must be >= 1, got {shard_models}.")
        return shard_models
    per_model = sum(t[0].numel() * t.element_size() for t in [*params.values(),
                                                               *buffers.values()])
    return max(1, shard_bytes // max(1, per_model))


def export(
    setting: str | BenchmarkSetting,
    out_dir: str | Path,
    *,
    gt_dir: str | Path | None = None,
    smoke: bool = False,
    data_dir: str | Path | None = None,
    loo_examples: int | None = None,
    shard_models: int | None = None,
    shard_bytes: int = _SHARD_BYTES,
    org: str = DEFAULT_ORG,
    progress: bool = False,
    block_size: int | None = None,
    device: str = "cpu",
) -> ExportResult:
    """Write the dataset and checkpoint repos of ``setting`` under ``out_dir``.

    Args:
        setting: setting name (``"digits-lr"``), or a :class:`BenchmarkSetting` (e.g. a
            registered one with fewer epochs; the index and cards record what was used).
        out_dir: writes ``out_dir/dataset`` and ``out_dir/checkpoints`` (replaced if present).
        gt_dir: the ground-truth build to export (as written by ``hf-attrib bench
            ground-truth``/``bench run``: ``.../ground_truth``); missing blocks are trained,
            blocks on disk are checked against the setting and reused. Default
            ``out_dir/ground_truth``.
        smoke: the shrunk smoke sizes (as ``bench run --smoke``).
        data_dir: local copy of the source data (Hub-backed settings).
        loo_examples: leave out only the first N examples (default: all; smoke: 20).
        shard_models: models per checkpoint shard (default: as many as fit ``shard_bytes``).
        shard_bytes: target shard size when ``shard_models`` is not given.
        org: organisation of the default repo ids written into the cards.
        progress: progress bars while training.
        block_size: ground-truth models per block, when ``gt_dir`` was built with a
            ``--block-size`` other than the default (blocks on disk must match).
        device: where missing models are trained and targets evaluated (``"cuda"``).
    """
    out = Path(out_dir)
    gt = Path(gt_dir) if gt_dir is not None else out / "ground_truth"
    if smoke:
        loo_examples = min(loo_examples or 20, 20)
    prep = runner.prepare(setting, data_dir, smoke=smoke, cache_dir=out / "cache")
    if block_size is not None:
        prep.block_size = block_size
    prep.model.to(device)
    s, model, fns = prep.setting, prep.model, prep.fns
    loo_index = runner.loo_index(s, loo_examples)

    # Ground truth: build what is missing (resumable), reuse what is there. ---------------
    if "loo" in s.metrics:
        runner.build_ground_truth(prep, gt, "loo", loo_examples=loo_examples, progress=progress)
        full = load_models(model, gt, "loo-full")
    else:
        full = train_model(model, fns["train_loss"], prep.x, prep.y, s.seed, prep.recipe)
    full_state = unstack(full, 0)
    if prep.xt is None:
        runner.generated_test_set(prep, full_state)
    runner.build_ground_truth(prep, gt, "lds", progress=progress)
    lds_params, lds_buffers, lds_ids = load_stacked(gt, "lds", with_buffers=True)
    lds_params, lds_buffers = persistent(model, lds_params, lds_buffers)
    masks, mask_ids = load_subsets(gt, "lds")
    if not torch.equal(mask_ids, lds_ids):
        raise ValueError(f"{gt}/lds: subsets and models disagree on the model ids.")
    lds_targets = evaluate_models(model, (lds_params, lds_buffers), prep.xt, prep.yt,
                                   fns["target"])

    final = {"dataset": out / "dataset", "checkpoints": out / "checkpoints"}
    for folder in final.values():
        restore_replaced_folder(folder)  # an export killed between its renames
        if folder.is_symlink():  # never write through a link
            raise HubPathError(f"{folder} is a symbolic link: export writes real folders "
                               "under --out; remove the link or pick another --out.")
    # Written aside and renamed into place at the end: a killed export leaves the previous
    # one whole (and its staging folders, removed here by the next export), never a new
    # dataset repo beside an old or half-written checkpoints repo.
    for name in final:
        for left in out.glob(f".{name}.partial-*"):
            shutil.rmtree(left)
    tag = uuid.uuid4().hex[:8]
    dataset_dir, ckpt_dir = out / f".dataset.partial-{tag}", out / f".checkpoints.partial-{tag}"
    for folder in (dataset_dir, ckpt_dir):
        folder.mkdir(parents=True)
    index: dict[str, Any] = {
        "format": INDEX_FORMAT, "setting": s.name, "smoke": smoke, "kind": s.kind,
        "n_train": s.n_train, "n_test": s.n_test, "metrics": list(s.metrics),
        "seed": s.seed, "lds_models": s.lds_models, "lds_fraction": s.lds_fraction,
        "train": {k: list(v) if isinstance(v, tuple) else v for k, v in prep.recipe.items()},
        "hf_attrib_version": __version__, "torch_version": torch.__version__,
        "dataset_repo_id": dataset_repo_id(s.name, org),
        "checkpoints_repo_id": checkpoints_repo_id(s.name, org),
        "loo_models": len(loo_index) if "loo" in s.metrics else 0,
        # sha256 of the exact sample (hf_attrib.benchmark.data.data_fingerprint): results
        # computed from these repos name the same value in their results.json.
        "data_fingerprint": prep.data.fingerprint,
    }

    # Dataset repo: parquet splits + ground truth. ----------------------------------------
    splits = {"train": prep.data.train if s.kind == "classification"
              else split_from_tensors(prep.x, prep.y, s.kind),
              "test": split_from_tensors(prep.xt, prep.yt, s.kind)}
    if prep.data.noisy_train is not None:
        splits["noisy_train"] = prep.data.noisy_train
    (dataset_dir / "data").mkdir()
    for name, split in splits.items():
        split.to_parquet(str(dataset_dir / "data" / f"{name}-00000-of-00001.parquet"))
    (dataset_dir / "ground_truth").mkdir()
    meta = {"format": GROUND_TRUTH_FORMAT, "setting": s.name, "smoke": str(smoke),
            "n_train": str(s.n_train), "n_test": str(s.n_test),
            "hf_attrib_version": __version__}
    # The subsets bit-packed (example i: bit i % 8 of byte i // 8), as in the retrain blocks.
    save_safetensors({"masks_packed": pack_masks(masks), "model_ids": lds_ids.to(torch.int64),
               "targets": lds_targets.float().contiguous(),
               "ground_truth_model_ids": torch.tensor(list(s.ground_truth_model_ids),
                                                      dtype=torch.int64)},
              str(dataset_dir / "ground_truth" / "lds.safetensors"), metadata={**meta,
                                                                              "kind": "lds"})
    if "loo" in s.metrics:
        loo_params, loo_buffers, loo_ids = load_stacked(gt, "loo", with_buffers=True)
        loo_params, loo_buffers = persistent(model, loo_params, loo_buffers)
        loo_targets = evaluate_models(model, (loo_params, loo_buffers), prep.xt, prep.yt,
                                       fns["target"])
        full_targets = evaluate_models(model, full, prep.xt, prep.yt, fns["target"])[0]
        save_safetensors({"indices": torch.tensor(loo_index, dtype=torch.int64),
                   "targets": loo_targets.float().contiguous(),
                   "full_targets": full_targets.float().contiguous()},
                  str(dataset_dir / "ground_truth" / "loo.safetensors"),
                  metadata={**meta, "kind": "loo"})
    noisy_state = None
    if prep.data.noisy_indices is not None:
        _, yn = BenchmarkData.tensors(prep.data.noisy_train)
        save_safetensors({"indices": prep.data.noisy_indices.to(torch.int64).contiguous(),
                   "labels": yn.contiguous()},
                  str(dataset_dir / "ground_truth" / "noisy_labels.safetensors"),
                  metadata={**meta, "kind": "noisy_labels"})
        xn, _ = BenchmarkData.tensors(prep.data.noisy_train)
        noisy_state = unstack(
            train_model(model, fns["train_loss"], xn, yn, s.seed, prep.recipe), 0)

    # Checkpoint repo: full-data model (from_pretrained), stacked shards. -----------------
    full_model = copy.deepcopy(model)
    load_state(full_model, full_state)
    full_model.save_pretrained(str(ckpt_dir), safe_serialization=True)
    kinds: dict[str, Any] = {"full": {"file": "model.safetensors", "num_models": 1}}
    per = _models_per_shard(lds_params, lds_buffers, shard_models, shard_bytes)
    kinds["lds"] = {"num_models": int(lds_ids.numel()), "models_per_shard": per,
                    "shards": _write_shards(ckpt_dir, "lds", lds_params, lds_buffers,
                                            lds_ids, per)}
    if "loo" in s.metrics:
        kinds["loo"] = {"num_models": int(loo_ids.numel()), "models_per_shard": per,
                        "left_out": loo_index,
                        "shards": _write_shards(ckpt_dir, "loo", loo_params, loo_buffers,
                                                loo_ids, per)}
    if noisy_state is not None:
        (ckpt_dir / "noisy").mkdir()
        save_safetensors({k: v.contiguous() for k, v in noisy_state.items()},
                  str(ckpt_dir / "noisy" / "model.safetensors"),
                  metadata={"format": CHECKPOINTS_FORMAT, "kind": "noisy"})
        kinds["noisy"] = {"file": "noisy/model.safetensors", "num_models": 1}

    # Indexes (with every file's hash) and cards; the checkpoints repo's first, as the
    # dataset index records its file list (readers refuse repos of two exports). ----------
    pair: dict[str, Any] = {}
    for folder, repo in ((ckpt_dir, "model"), (dataset_dir, "dataset")):
        files = {p.relative_to(folder).as_posix(): file_entry(p)
                 for p in sorted(folder.rglob("*")) if p.is_file()}
        entry = {**index, **pair, "repo_type": repo, "files": files}
        if repo == "model":
            entry["kinds"] = kinds
            pair = {PAIR_KEY: files_digest(entry)}
        (folder / INDEX_FILE).write_text(json.dumps(entry, indent=1))
        card = (dataset_card(s, entry, list(splits)) if repo == "dataset"
                else checkpoints_card(s, entry))
        card.save(str(folder / "README.md"))
        check_folder(folder)  # what push and the readers will check: fail here, not there
    # The dataset repo names the checkpoints repo's files: it goes into place last.
    replace_folder(ckpt_dir, final["checkpoints"])
    replace_folder(dataset_dir, final["dataset"])
    return ExportResult(final["dataset"], final["checkpoints"], index["dataset_repo_id"],
                        index["checkpoints_repo_id"])
