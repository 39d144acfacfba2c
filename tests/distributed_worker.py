"""Scores of every attributor on a small problem, from 1 process or several (gloo).

Run alone (``python tests/distributed_worker.py OUT``), under ``torchrun --nproc_per_node 2``
or under ``accelerate launch --multi_gpu --num_processes 2``; rank 0 writes every score
tensor to ``OUT`` (safetensors). ``WORKER_ROWS=trak,if-cg`` runs only those attributors.
``tests/test_distributed.py`` compares the runs.
"""

from __future__ import annotations

import os
import sys
import time

import torch
from safetensors.torch import save_file
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from hf_attrib.algorithm import (
    GradCosAttributor,
    IFAttributorArnoldi,
    IFAttributorCG,
    IFAttributorEKFAC,
    IFAttributorExplicit,
    IFAttributorKFAC,
    IFAttributorLiSSA,
    RPSAttributor,
    TracInAttributor,
    TRAKAttributor,
)
from hf_attrib.distributed import is_main_process, rank_and_world
from hf_attrib.task import AttributionTask


def _setup() -> None:
    if os.environ.get("ACCELERATE_LAUNCH") == "1" or "ACCELERATE_MIXED_PRECISION" in os.environ:
        from accelerate import Accelerator

        Accelerator(cpu=True)  # initialises the gloo process group
    elif "RANK" in os.environ:
        torch.distributed.init_process_group("gloo")


def main(out: str) -> None:
    _setup()
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    n_train, n_test, dim, classes = 61, 9, 6, 3
    x = torch.randn(n_train, dim, generator=g)
    y = torch.randint(0, classes, (n_train,), generator=g)
    xt = torch.randn(n_test, dim, generator=g)
    yt = torch.randint(0, classes, (n_test,), generator=g)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(dim, 8), nn.Tanh(), nn.Linear(8, classes))
    ckpts = []
    for _ in range(2):
        ckpts.append({k: v.clone() for k, v in model.state_dict().items()})
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.1 * torch.randn(p.shape, generator=g))

    def loss(params, batch):
        xb, yb = batch
        return nn.functional.cross_entropy(torch.func.functional_call(model, params, (xb,)), yb)

    def margin(params, batch):
        xb, yb = batch
        logp = torch.log_softmax(torch.func.functional_call(model, params, (xb,)), -1)
        logp = logp.gather(1, yb[:, None])[:, 0]
        return (logp - torch.log1p(-logp.exp())).mean()

    def prob(params, batch):
        xb, yb = batch
        logits = torch.func.functional_call(model, params, (xb,))
        return torch.softmax(logits, -1).gather(1, yb[:, None]).mean()

    def sampled(params, batch, generator):  # the true Fisher's loss: labels from the model
        logits = torch.func.functional_call(model, params, (batch[0],))
        labels = torch.multinomial(torch.softmax(logits.detach(), -1), 1, generator=generator)
        return nn.functional.cross_entropy(logits, labels[:, 0])

    # 7 train batches (ragged last) and one test loader with a single batch: with two
    # processes the shares are uneven and one process owns no test batch at all.
    train = DataLoader(TensorDataset(x, y), batch_size=9)
    tests = {"t3": DataLoader(TensorDataset(xt, yt), batch_size=3),
             "t1": DataLoader(TensorDataset(xt, yt), batch_size=16)}
    task = AttributionTask(loss, model, ckpts, target_func=margin)
    one = AttributionTask(loss, model, ckpts[-1], target_func=margin)
    attributors = {
        "trak": TRAKAttributor(task, correct_probability_func=prob, regularization=0.01,
                               projector_kwargs={"proj_dim": 16, "proj_type": "sparse"}),
        "trak-streamed": TRAKAttributor(task, correct_probability_func=prob,
                                        regularization=0.01, max_cache_bytes=0,
                                        projector_kwargs={"proj_dim": 16, "proj_type": "sparse"}),
        "tracin": TracInAttributor(task, weight_list=[0.1, 0.05]),
        "tracin-streamed": TracInAttributor(task, weight_list=[0.1, 0.05], max_cache_bytes=0),
        "grad-cos": GradCosAttributor(one),
        "if-explicit": IFAttributorExplicit(one, regularization=0.01, rhs_chunk_size=7),
        "if-cg": IFAttributorCG(one, regularization=0.01, max_iter=20),
        # block CG couples the rows of a solve, and each process solves its own rows: equal
        # once converged
        "if-cg-block": IFAttributorCG(one, regularization=1.0, max_iter=100, tol=1e-9,
                                      block=True),
        "if-lissa": IFAttributorLiSSA(one, batch_size=20, recursion_depth=30, damping=0.01,
                                      scaling=10.0),
        "if-arnoldi": IFAttributorArnoldi(one, proj_dim=10, max_iter=30, regularization=0.01),
        "if-ekfac": IFAttributorEKFAC(task, fisher="empirical", max_cache_bytes=0),
        "if-kfac-true": IFAttributorKFAC(one, sampled_loss_func=sampled),
        "if-ekfac-true": IFAttributorEKFAC(one, sampled_loss_func=sampled),
        "rps": RPSAttributor(one, final_linear_layer_name="2", l2_strength=0.01),
    }
    rows = [r for r in os.environ.get("WORKER_ROWS", "").split(",") if r]
    if rows:  # a subset, e.g. the launcher check of tests/test_distributed.py
        attributors = {name: attributors[name] for name in rows}
    tensors = {}
    start = time.perf_counter()
    for name, attributor in attributors.items():
        attributor.cache(train)
        for tname, test in tests.items():
            tensors[f"{name}/{tname}"] = attributor.attribute(train, test).contiguous()
        tensors[f"{name}/self"] = attributor.self_attribute(train).contiguous()
    elapsed = time.perf_counter() - start
    if is_main_process():
        save_file(tensors, out, metadata={"world_size": str(rank_and_world()[1]),
                                          "seconds": f"{elapsed:.3f}"})
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
