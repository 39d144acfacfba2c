"""Speed of stacked retraining: 100 LDS models at once vs one after another.

The LDS ground truth needs 100 models trained on random half subsets (dattri paper, Section
3.3). This recipe trains them on scikit-learn's digits (n_train=1000, 500-example subsets) with
the paper's MNIST recipe (Appendix C: SGD, lr 0.01, momentum 0.9, batch 64; 20 epochs for the
logistic regression, 50 for the MLP 64-128-64-10 with dropout 0.1) in three ways:

* sequential: a plain PyTorch loop per model (``torch.optim.SGD``, the same batch order as the
  stacked models, batches gathered by tensor indexing: no DataLoader overhead);
* stacked: :func:`train_stacked` on all models at once (vmap over models);
* retrain(): the resumable driver (blocks of ``--block-size``, default 10), including writing
  the safetensors blocks.

It reports the wall times, the speed-ups, and checks that stacked and sequential models agree
(exactly up to float rounding for the dropout-free LR; by test accuracy for the MLP, whose
dropout masks differ). Writes ``results/retrain-digits-<date>.md``.

    python recipes/speed/run.py retrain                 # both models, 1 thread
    python recipes/speed/run.py retrain --models 20 --threads 2 --only lr --loss lse
"""

from __future__ import annotations

import argparse
import copy
import sys
import tempfile
import time
from typing import Any

from report import Result

DESCRIPTION = ("stacked retraining (vmap over models) against one plain PyTorch loop per model "
               "and the resumable retrain() driver: 100 LDS models on digits")


def make_model(name: str) -> Any:
    """The logistic regression (``lr``) or the MLP with dropout (``mlp``), seed 0."""
    import torch
    from torch import nn

    torch.manual_seed(0)
    if name == "lr":
        return nn.Linear(64, 10)
    return nn.Sequential(
        nn.Linear(64, 128), nn.ReLU(), nn.Dropout(0.1),
        nn.Linear(128, 64), nn.ReLU(), nn.Dropout(0.1),
        nn.Linear(64, 10),
    )


def lse_cross_entropy(logits: Any, y: Any) -> Any:
    """Cross entropy as ``logsumexp - correct logit``: the same value as ``F.cross_entropy``,
    but it avoids torch's CPU ``log_softmax`` kernel, which is slow for many short rows
    (10 classes); that kernel dominates the stacked step."""
    return (logits.logsumexp(-1) - logits.gather(-1, y[:, None])[:, 0]).mean()


LOSSES = ("ce", "lse")  # F.cross_entropy; the same loss via logsumexp


def sequential(model: Any, x: Any, y: Any, masks: Any, epochs: int, batch_size: int,
               criterion: Any) -> dict[str, Any]:
    """One plain PyTorch training loop per model, same init and batch order as stacked."""
    import torch

    from hf_attrib.model_utils.retraining import batch_orders

    out: dict[str, list[Any]] = {}
    for m in range(masks.shape[0]):
        order = batch_orders(masks[m:m + 1], epochs=epochs, stream_ids=[m])[0]
        net = copy.deepcopy(model).train()
        opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9)
        for epoch_order in order:
            for start in range(0, epoch_order.numel(), batch_size):
                idx = epoch_order[start:start + batch_size]
                opt.zero_grad()
                criterion(net(x[idx]), y[idx]).backward()
                opt.step()
        for name, p in net.named_parameters():
            out.setdefault(name, []).append(p.detach())
    return {name: torch.stack(ps) for name, ps in out.items()}


def bench(name: str, x: Any, y: Any, xt: Any, yt: Any, num_models: int, epochs: int,
          loss: str, block_size: int) -> list[str]:
    """Time the three ways for one model; the report's lines."""
    import torch

    from hf_attrib.model_utils.retraining import (
        RetrainBuild,
        evaluate_stacked,
        lds_subsets,
        retrain,
        train_stacked,
    )

    model = make_model(name)
    criterion = torch.nn.functional.cross_entropy if loss == "ce" else lse_cross_entropy

    def loss_fn(params, xb, yb):
        return criterion(torch.func.functional_call(model, params, xb), yb)

    def accuracy(params, xb, yb):
        return (torch.func.functional_call(model, params, xb).argmax(-1) == yb).float()

    masks = lds_subsets(x.shape[0], num_models, 0.5, seed=0)
    recipe = dict(epochs=epochs, batch_size=64, lr=0.01, momentum=0.9)

    t0 = time.perf_counter()
    seq = sequential(model, x, y, masks, epochs, 64, criterion)
    t_seq = time.perf_counter() - t0

    t0 = time.perf_counter()
    stacked = train_stacked(model, loss_fn, x, y, masks, init="model", **recipe)
    t_stack = time.perf_counter() - t0

    build = RetrainBuild(model=model, loss_fn=loss_fn, x=x, y=y, masks=masks, init="model",
                         **recipe)
    with tempfile.TemporaryDirectory() as out_dir:
        t0 = time.perf_counter()
        retrain("lds", out_dir, build, block_size=block_size, progress=False)
        t_blocks = time.perf_counter() - t0

    acc_seq = evaluate_stacked(model, seq, xt, yt, accuracy).mean().item()
    acc_stack = evaluate_stacked(model, stacked, xt, yt, accuracy).mean().item()
    diff = max((seq[k] - stacked[k]).abs().max().item() for k in seq)
    steps = -(-int(masks[0].sum()) // 64) * epochs
    lines = [
        f"[{name}, loss={loss}] {num_models} models x {epochs} epochs x {steps // epochs} "
        f"steps/epoch ({sum(p.numel() for p in model.parameters())} params each)",
        f"  {'sequential (plain torch loop per model):':41s} {t_seq:8.2f} s",
        f"  {f'stacked (train_stacked, M={num_models}):':41s} {t_stack:8.2f} s   "
        f"speed-up {t_seq / t_stack:5.1f}x",
        f"  {f'retrain() blocks of {block_size} (+ writing):':41s} {t_blocks:8.2f} s   "
        f"speed-up {t_seq / t_blocks:5.1f}x",
        f"  mean test accuracy: sequential {acc_seq:.4f}, stacked {acc_stack:.4f}; "
        f"max |param diff| {diff:.2e}" + (" (dropout masks differ)" if name == "mlp" else ""),
    ]
    print("\n".join(lines), flush=True)
    return lines


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``run.py retrain``."""
    parser.add_argument("--models", type=int, default=100)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--only", choices=["lr", "mlp"], default=None)
    parser.add_argument("--lr-epochs", type=int, default=20)
    parser.add_argument("--mlp-epochs", type=int, default=50)
    parser.add_argument("--loss", choices=LOSSES, default="lse",
                        help="ce: F.cross_entropy; lse: the same loss via logsumexp")
    parser.add_argument("--block-size", type=int, default=10, help="retrain() block size")


def run(args: argparse.Namespace) -> list[Result]:
    """Benchmark the selected models; one ``Result``."""
    import torch
    from sklearn.datasets import load_digits

    torch.set_num_threads(args.threads)
    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32) / 16.0
    y = torch.tensor(digits.target)
    x, xt, y, yt = x[:1000], x[1000:], y[:1000], y[1000:]
    lines = [f"{torch.get_num_threads()} thread(s), n_train={x.shape[0]}, "
             f"n_test={xt.shape[0]}", ""]
    print(lines[0])
    if args.only in (None, "lr"):
        lines += bench("lr", x, y, xt, yt, args.models, args.lr_epochs, args.loss,
                       args.block_size)
    if args.only in (None, "mlp"):
        lines += bench("mlp", x, y, xt, yt, args.models, args.mlp_epochs, args.loss,
                       args.block_size)
    body = "```\n" + "\n".join(lines) + "\n```"
    return [Result("retrain-digits", "Stacked retraining against one loop per model", body)]


if __name__ == "__main__":
    from run import run_as_script

    sys.exit(run_as_script("retrain"))
