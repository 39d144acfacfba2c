#!/usr/bin/env python
"""Time the full-scale ground truth on random data of the real shapes (no dataset needed).

    python recipes/time_full_scale.py mnist-lr-lds        # the 100 LDS LR models, 5,000 x 784
    python recipes/time_full_scale.py mnist-lr-lds --setting mnist_mlp --models 10
    python recipes/time_full_scale.py steps                # one training step of every model
    python recipes/time_full_scale.py mnist-lr-loo --models 250 --repeats 2
                                   # one LOO block, shared windows vs per-model batches, interleaved

``mnist-lr-lds`` trains the 100 LDS models of ``mnist_lr`` (half subsets of 5,000 examples,
20 epochs, SGD 0.01/0.9, batch 64) with the benchmark's stacked retraining
(``hf_attrib.model_utils.retraining.retrain_lds``, the ``train`` stage's code) on random inputs
of MNIST's shape; the time does not depend on the pixel values. ``steps`` times a few
optimizer steps of each full-size model at its paper batch size on this machine, from which
the READMEs extrapolate per-model training times (steps per model = epochs x ceil(n / batch)).
Prints one JSON line per measurement.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time

import torch


def _setup(setting: str) -> tuple:
    """``(setting, x, y, model, fns, n_params)``: random data of MNIST's shape (the time does
    not depend on the pixel values) and the setting's model and functions."""
    from hf_attrib.benchmark.runner import build_model, classification_functions
    from hf_attrib.benchmark.settings import get_setting

    s = get_setting(setting)
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(s.n_train, 784, generator=gen)
    y = torch.randint(0, 10, (s.n_train,), generator=gen)
    model = build_model(s)
    fns = classification_functions(model)
    return s, x, y, model, fns, sum(p.numel() for p in model.parameters())


def mnist_lr_lds(num_models: int, threads: int | None, setting: str = "mnist_lr") -> dict:
    from hf_attrib.model_utils.retraining import retrain_lds

    if threads:
        torch.set_num_threads(threads)
    s, x, y, model, fns, n_params = _setup(setting)
    block = max(1, min(250, (64 * 2**20) // (4 * n_params)))  # as runner.prepare
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        retrain_lds(tmp, model, fns["train_loss"], x, y, num_models=num_models,
                    fraction=s.lds_fraction, seed=s.seed, block_size=block, progress=False,
                    epochs=s.train.epochs, batch_size=s.train.batch_size, lr=s.train.lr,
                    momentum=s.train.momentum, weight_decay=s.train.weight_decay,
                    optimizer=s.train.optimizer, betas=s.train.betas)
        seconds = time.perf_counter() - start
    return {"what": f"{s.name} LDS models", "models": num_models, "n_train": s.n_train,
            "epochs": s.train.epochs, "block_size": block, "seconds": round(seconds, 1),
            "torch_threads": torch.get_num_threads()}


def mnist_loo_block(num_models: int, repeats: int, setting: str = "mnist_lr",
                    epochs: int | None = None) -> list[dict]:
    """One block of ``num_models`` LOO models, trained both ways, interleaved ``repeats`` times.

    ``window``: shared windows + the input layer as one GEMM (``example_loss_fn`` given, what
    the benchmark runs); ``per-model``: every model gathers its own mini-batch (no
    ``example_loss_fn``, the path before shared windows). Useful FLOP per model: forward and
    weight gradient of every layer, ``4 * params * examples * epochs`` (the input gradient of
    the first layer is never needed), the same for both paths.
    """
    from hf_attrib.model_utils.retraining import train_stacked
    from hf_attrib.model_utils.subsets import loo_subsets

    s, x, y, model, fns, n_params = _setup(setting)
    epochs = epochs or s.train.epochs
    masks = loo_subsets(s.n_train, range(num_models))
    flop = 4 * n_params * (s.n_train - 1) * epochs * num_models
    kw = dict(epochs=epochs, batch_size=s.train.batch_size, lr=s.train.lr,
              momentum=s.train.momentum, stream_ids=[0] * num_models, init="seeded")
    rows = []
    for _ in range(repeats):
        for path in ("window", "per-model"):
            extra = {"example_loss_fn": fns["example_loss"]} if path == "window" else {}
            start = time.perf_counter()
            train_stacked(model, fns["train_loss"], x, y, masks, **kw, **extra)
            seconds = time.perf_counter() - start
            rows.append({"what": f"{s.name} LOO block", "path": path, "models": num_models,
                         "epochs": epochs, "seconds": round(seconds, 1),
                         "useful_gflop_per_s": round(flop / seconds / 1e9, 1),
                         "torch_threads": torch.get_num_threads()})
            print(json.dumps(rows[-1]), flush=True)
    return rows


def steps(repeats: int) -> list[dict]:
    from hf_attrib.benchmark.runner import build_model
    from hf_attrib.benchmark.settings import get_setting

    shapes = {
        "mnist_mlp": lambda b: (torch.rand(b, 784), torch.randint(0, 10, (b,))),
        "cifar2_resnet9": lambda b: (torch.rand(b, 3, 32, 32), torch.randint(0, 2, (b,))),
        "maestro_musictransformer": lambda b: (torch.randint(0, 388, (b, 256)),) * 2,
        "shakespeare_nanogpt": lambda b: (torch.randint(0, 65, (b, 256)),) * 2,
    }
    rows = []
    for name, make in shapes.items():
        s = get_setting(name)
        model = build_model(s, vocab_size=65) if s.model == "nanogpt" else build_model(s)
        model.train()
        opt = torch.optim.SGD(model.parameters(), lr=1e-3)
        x, y = make(s.train.batch_size)

        def step(model=model, opt=opt, x=x, y=y, kind=s.kind) -> None:
            out = model(x).logits
            if kind == "classification":
                loss = torch.nn.functional.cross_entropy(out, y)
            else:
                loss = torch.nn.functional.cross_entropy(out[:, :-1].reshape(-1, out.shape[-1]),
                                                         y[:, 1:].reshape(-1))
            opt.zero_grad()
            loss.backward()
            opt.step()

        step()  # warm-up
        start = time.perf_counter()
        for _ in range(repeats):
            step()
        per = (time.perf_counter() - start) / repeats
        per_epoch = -(-s.n_train // s.train.batch_size)
        rows.append({"what": f"{name} step", "batch": s.train.batch_size,
                     "params": sum(p.numel() for p in model.parameters()),
                     "seconds_per_step": round(per, 3),
                     "steps_per_model": per_epoch * s.train.epochs,
                     "cpu_hours_per_model": round(per * per_epoch * s.train.epochs / 3600, 2),
                     "torch_threads": torch.get_num_threads()})
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("what", choices=("mnist-lr-lds", "mnist-lr-loo", "steps"))
    p.add_argument("--epochs", type=int, help="mnist-lr-loo: fewer epochs than the recipe's")
    p.add_argument("--models", type=int, default=100)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int)
    p.add_argument("--setting", default="mnist_lr", choices=("mnist_lr", "mnist_mlp"),
                   help="mnist-lr-lds: time this MNIST setting's LDS models instead")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.what == "mnist-lr-loo":
        mnist_loo_block(args.models, args.repeats, args.setting, args.epochs)
        return
    rows = ([mnist_lr_lds(args.models, args.threads, args.setting)] if args.what == "mnist-lr-lds"
            else steps(args.repeats))
    for row in rows:
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
