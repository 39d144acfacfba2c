#!/usr/bin/env python
"""MNIST-MLP's 5,000 leave-one-out models on one GPU, in one call of the `device` tool.

The MLP's LOO ground truth is about 8e14 FLOP (5,000 models x 50 epochs x 5,000 examples):
days on a 2-core CPU, minutes on an H200. The GPU machine has no ``datasets`` and no network,
so the job travels as tensors:

    # here (CPU): the benchmark's exact MNIST-MLP sample, hash-recorded, into an ignored folder
    python recipes/mnist/mlp_loo_gpu.py prepare --data-dir ../shared/data/mnist --job gpu-job
    # on the GPU machine (run tool; carry gpu-job):
    python recipes/mnist/mlp_loo_gpu.py run --job gpu-job --out $OUT --device cuda
    # here: LOO targets -> the pipeline's ground-truth folder format for `bench run`
    #   ($OUT/mlp_loo_targets.safetensors: loo [N, 500] margins, full [1, 500], left_out [N])

``run`` trains the full-data model and the LOO models with the benchmark's own code
(``retrain_loo``: shared windows, one stream, blocks of ``--block-size`` models), evaluates
every model's margin on the 500 test examples, and writes only those targets (10 MB) and a
timing record under ``--out``: the 2.2 GB of weights stay on the machine (the tool brings back
at most 64 MiB). ``--loo-examples`` and ``--epochs`` shrink the job (a CPU check: ``--device
cpu --loo-examples 8 --epochs 1``).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

SETTING = "mnist_mlp"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def prepare(data_dir: str | None, job: Path) -> dict:
    """Write the setting's train/test tensors and their sha256 to ``job``."""
    from hf_attrib.benchmark.runner import prepare as prepare_setting

    prep = prepare_setting(SETTING, data_dir)
    job.mkdir(parents=True, exist_ok=True)
    sample = job / "sample.safetensors"
    save_file({"x": prep.x.contiguous(), "y": prep.y.contiguous(),
               "xt": prep.xt.contiguous(), "yt": prep.yt.contiguous()}, str(sample))
    info = {"setting": SETTING, "sample_sha256": _sha256(sample),
            "data_fingerprint": prep.data.fingerprint, "n_train": int(prep.x.shape[0]),
            "n_test": int(prep.xt.shape[0]), "recipe": prep.recipe}
    (job / "job.json").write_text(json.dumps(info, indent=1))
    return info


def run(job: Path, out: Path, device: str, loo_examples: int | None, epochs: int | None,
        block_size: int) -> dict:
    """Train and evaluate the LOO models; write their targets and a timing record to ``out``."""
    from hf_attrib.benchmark.builders import build_model, classification_functions
    from hf_attrib.benchmark.settings import get_setting
    from hf_attrib.model_utils.retraining import evaluate_stacked, load_stacked, retrain_loo

    info = json.loads((job / "job.json").read_text())
    sample = job / "sample.safetensors"
    if _sha256(sample) != info["sample_sha256"]:
        raise SystemExit(f"{sample} does not match the sha256 in job.json: prepare it again.")
    tensors = load_file(str(sample))
    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 models, as on CPU
    torch.backends.cudnn.allow_tf32 = False
    setting = get_setting(SETTING)
    model = build_model(setting).to(device)
    fns = classification_functions(model)
    x, y = tensors["x"].to(device), tensors["y"].to(device)
    xt, yt = tensors["xt"].to(device), tensors["yt"].to(device)
    recipe = dict(info["recipe"], betas=tuple(info["recipe"]["betas"]))
    if epochs:
        recipe["epochs"] = epochs
    indices = list(range(loo_examples or x.shape[0]))
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as gt:
        start = time.perf_counter()
        retrain_loo(gt, model, fns["train_loss"], x, y, indices=indices, seed=setting.seed,
                    block_size=block_size, example_loss_fn=fns["example_loss"],
                    progress=False, **recipe)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        train_seconds = time.perf_counter() - start
        start = time.perf_counter()
        targets = {}
        for kind in ("loo", "loo-full"):
            params, _ = load_stacked(gt, kind)
            params = {k: v.to(device) for k, v in params.items()}
            targets[kind] = evaluate_stacked(model, params, xt, yt, fns["target"],
                                             model_chunk=block_size).cpu()
        eval_seconds = time.perf_counter() - start
    save_file({"loo": targets["loo"].contiguous(), "full": targets["loo-full"].contiguous(),
               "left_out": torch.tensor(indices, dtype=torch.long)},
              str(out / "mlp_loo_targets.safetensors"))
    record = {"setting": SETTING, "models": len(indices), "epochs": recipe["epochs"],
              "device": torch.cuda.get_device_name() if device.startswith("cuda") else device,
              "train_seconds": round(train_seconds, 1), "eval_seconds": round(eval_seconds, 1),
              "models_per_second": round(len(indices) / train_seconds, 2),
              "data_fingerprint": info["data_fingerprint"],
              "targets_sha256": _sha256(out / "mlp_loo_targets.safetensors")}
    (out / "run.json").write_text(json.dumps(record, indent=1))
    return record


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    pp = sub.add_parser("prepare", help="write the sample tensors (here, with datasets)")
    pp.add_argument("--data-dir", help="local MNIST copy (default: the Hub's ylecun/mnist)")
    pp.add_argument("--job", type=Path, default=Path("gpu-job"))
    pr = sub.add_parser("run", help="train + evaluate the LOO models (GPU machine)")
    pr.add_argument("--job", type=Path, default=Path("gpu-job"))
    pr.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "gpu-out")))
    pr.add_argument("--device", default="cuda")
    pr.add_argument("--loo-examples", type=int, help="default: all 5,000")
    pr.add_argument("--epochs", type=int, help="default: the recipe's 50")
    pr.add_argument("--block-size", type=int, default=1000)
    args = p.parse_args()
    if args.command == "prepare":
        print(json.dumps(prepare(args.data_dir, args.job)))
    else:
        print(json.dumps(run(args.job, args.out, args.device, args.loo_examples, args.epochs,
                             args.block_size)))


if __name__ == "__main__":
    main()
