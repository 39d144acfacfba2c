#!/usr/bin/env python
"""Size and speed of a setting's Hub export: the MNIST-LR checkpoint set (issue 13, item 5).

    python recipes/mnist/export_benchmark.py                          # 5,000 LOO + 100 LDS
    python recipes/mnist/export_benchmark.py --endpoint http://127.0.0.1:PORT   # + push, pull
    python recipes/mnist/export_benchmark.py --gt-dir WORK/.../ground_truth     # a real build

Without ``--gt-dir`` the ground truth is built with *random weights* of the right shapes
(7,850 parameters per MNIST-LR model) through the real retraining driver (``retrain``: same
blocks, fingerprints, subsets and checksums; only ``train_stacked`` is replaced), so the
export's sizes and times are the real ones without hours of training. The full-data model
comes from that build; the noisy-label model is trained for real by ``export``.
``hf-attrib hub export`` then writes the dataset and checkpoint repos; with ``--endpoint``
both are pushed and ``pull(..., what=("checkpoints",), models="0:10")`` (what
``hf-attrib hub pull REPO --what checkpoints --models 0:10`` runs) fetches the shards holding
models 0..9. Prints one JSON object: bytes, shard counts, bytes per model and seconds.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any
from unittest import mock

import torch

ROOT = Path(__file__).resolve().parents[2]
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "mnist"


def _random_train_stacked(model: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
    """Stand-in for ``train_stacked``: random weights of the model's shapes, one stack per
    block, seeded by the block's first model id (a rerun writes the same blocks)."""
    ids = list(kwargs["model_ids"])
    gen = torch.Generator().manual_seed(ids[0])
    params = {name: 0.01 * torch.randn((len(ids), *p.shape), generator=gen)
              for name, p in model.named_parameters()}
    return (params, {}) if kwargs.get("return_buffers") else params


@contextmanager
def random_weights():
    """Within this block, ``retrain`` writes random-weight blocks instead of training."""
    from hf_attrib.model_utils import retraining

    with mock.patch.object(retraining, "train_stacked", _random_train_stacked):
        yield


def build_random_ground_truth(setting: Any, gt_dir: Path, data_dir: Path | None,
                              loo: int) -> float:
    """The LOO (+ full) and LDS blocks of ``setting`` with random weights; returns seconds."""
    from hf_attrib.benchmark import runner

    start = time.perf_counter()
    prep = runner.prepare(setting, data_dir)
    with random_weights():
        if "loo" in setting.metrics:
            runner.build_ground_truth(prep, gt_dir, "loo", loo_examples=loo, progress=False)
        runner.build_ground_truth(prep, gt_dir, "lds", progress=False)
    return time.perf_counter() - start


def _folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*")
               if p.is_file() and ".cache" not in p.relative_to(folder).parts)


def export_figures(ckpt_dir: Path, dataset_dir: Path) -> dict[str, Any]:
    """Total bytes, shards and bytes per model of each stacked kind, from the index."""
    from hf_attrib.hub.layout import read_index

    index = read_index(ckpt_dir)
    figures: dict[str, Any] = {
        "checkpoints_bytes": _folder_bytes(ckpt_dir), "dataset_bytes": _folder_bytes(dataset_dir),
        "index_bytes": (ckpt_dir / "hf_attrib_index.json").stat().st_size,
        "ground_truth_bytes": {p.name: p.stat().st_size
                               for p in sorted((dataset_dir / "ground_truth").iterdir())},
        "files": len(index["files"]), "kinds": {}}
    for kind, entry in index["kinds"].items():
        if "shards" not in entry:
            figures["kinds"][kind] = {"models": 1, "bytes": index["files"][entry["file"]]["size"]}
            continue
        size = sum(index["files"][s["file"]]["size"] for s in entry["shards"])
        figures["kinds"][kind] = {
            "models": entry["num_models"], "shards": len(entry["shards"]),
            "models_per_shard": entry["models_per_shard"], "bytes": size,
            "bytes_per_model": round(size / entry["num_models"], 1)}
    figures["shards"] = sum(k.get("shards", 0) for k in figures["kinds"].values())
    return figures


def push_and_pull(export_dir: Path, repo: str, endpoint: str, token: str | None,
                  models: str, pull_dir: Path) -> dict[str, Any]:
    """Push both repos, then pull the checkpoint shards holding ``models``; seconds, files
    and bytes that arrived."""
    from hf_attrib.hub import pull, push

    start = time.perf_counter()
    push(export_dir / "dataset", repo, endpoint=endpoint, token=token)
    push(export_dir / "checkpoints", f"{repo}-checkpoints", endpoint=endpoint, token=token)
    pushed = time.perf_counter()
    got = pull(f"{repo}-checkpoints", what=("checkpoints",), models=models, out=pull_dir,
               endpoint=endpoint, token=token)
    done = time.perf_counter()
    files = got.files[f"{repo}-checkpoints"]
    return {"push_seconds": round(pushed - start, 2), "pull_seconds": round(done - pushed, 2),
            "pull_models": models, "pulled_files": files,
            "pulled_bytes": _folder_bytes(got.checkpoints_dir)}


def run(setting_name: str = "mnist-lr", out: str | Path = "recipe-out/export-benchmark", *,
        gt_dir: str | Path | None = None, data_dir: str | Path | None = None,
        loo: int = 5000, lds: int = 100, shard_models: int | None = None,
        endpoint: str | None = None, token: str | None = None, repo: str | None = None,
        models: str = "0:10") -> dict[str, Any]:
    """Build (unless ``gt_dir``), export, and (with ``endpoint``) push and pull; the figures."""
    from hf_attrib.benchmark.settings import get_setting
    from hf_attrib.hub import export

    out = Path(out)
    setting = replace(get_setting(setting_name), lds_models=lds)
    data = Path(data_dir) if data_dir else None
    if data is None and setting.dataset == "mnist" and DEFAULT_DATA.is_dir():
        data = DEFAULT_DATA
    figures: dict[str, Any] = {"setting": setting.name, "loo_models": loo, "lds_models": lds}
    if gt_dir is None:
        gt_dir = out / "ground_truth"
        figures["random_weights"] = True
        figures["ground_truth_seconds"] = round(
            build_random_ground_truth(setting, Path(gt_dir), data, loo), 2)
    start = time.perf_counter()
    result = export(setting, out / "export", gt_dir=gt_dir, data_dir=data, loo_examples=loo,
                    shard_models=shard_models)
    figures["export_seconds"] = round(time.perf_counter() - start, 2)
    figures.update(export_figures(result.checkpoints_dir, result.dataset_dir))
    if endpoint:
        figures.update(push_and_pull(out / "export", repo or f"bench/{setting_name}", endpoint,
                                     token, models, out / "pulled"))
    return figures


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--setting", default="mnist-lr")
    ap.add_argument("--out", default="recipe-out/export-benchmark")
    ap.add_argument("--gt-dir", help="a ground-truth build to export (default: random weights)")
    ap.add_argument("--data-dir", help=f"the setting's data (default for MNIST: {DEFAULT_DATA})")
    ap.add_argument("--loo", type=int, default=5000, help="LOO models")
    ap.add_argument("--lds", type=int, default=100, help="LDS models")
    ap.add_argument("--shard-models", type=int, help="models per shard (default: by size)")
    ap.add_argument("--endpoint", help="a Hub endpoint to push to and pull from")
    ap.add_argument("--repo", help="dataset repo id to push to (default bench/<setting>)")
    ap.add_argument("--models", default="0:10", help="the range to pull")
    args = ap.parse_args(argv)
    figures = run(args.setting, args.out, gt_dir=args.gt_dir, data_dir=args.data_dir,
                  loo=args.loo, lds=args.lds, shard_models=args.shard_models,
                  endpoint=args.endpoint, token=os.environ.get("HF_TOKEN"), repo=args.repo,
                  models=args.models)
    print(json.dumps(figures, indent=1))
    return figures


if __name__ == "__main__":
    main()
