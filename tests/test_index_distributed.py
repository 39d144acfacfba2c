"""An index built by two processes (``torchrun --nproc_per_node 2``, gloo on the CPU) equals
one built by one process, and its scores equal ``attribute()``'s: TRAK with a per-example
factor ``1 - p(correct)`` over two checkpoints (the factor averaged as ``attribute`` does).

Run as a script (``torchrun ... tests/test_index_distributed.py OUT``) it is the worker.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset


def problem():
    """``(attributor, train loader, test loader)``: a small MLP, two checkpoints."""
    from hf_attrib.algorithm import TRAKAttributor
    from hf_attrib.task import AttributionTask

    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(37, 6, generator=g), torch.randint(0, 3, (37,), generator=g)
    xt, yt = torch.randn(5, 6, generator=g), torch.randint(0, 3, (5,), generator=g)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))
    ckpts = []
    for _ in range(2):
        ckpts.append({k: v.clone() for k, v in model.state_dict().items()})
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.1 * torch.randn(p.shape, generator=g))

    def loss(params, batch):
        xb, yb = batch
        return nn.functional.cross_entropy(torch.func.functional_call(model, params, (xb,)), yb)

    def prob(params, batch):
        xb, yb = batch
        logits = torch.func.functional_call(model, params, (xb,))
        return torch.softmax(logits, -1).gather(1, yb[:, None]).mean()

    task = AttributionTask(loss, model, ckpts)
    att = TRAKAttributor(task, correct_probability_func=prob, regularization=0.01,
                         projector_kwargs={"proj_dim": 16, "proj_type": "sparse"})
    return (att, DataLoader(TensorDataset(x, y), batch_size=5),
            DataLoader(TensorDataset(xt, yt), batch_size=5))


def _worker(out: str) -> None:
    from hf_attrib.distributed import close_process_group, rank_and_world
    from hf_attrib.index import build

    if "RANK" in os.environ:
        torch.distributed.init_process_group("gloo")
    torch.set_num_threads(1)
    att, train, _ = problem()
    result = build(att, train, out=Path(out) / "index", shard_rows=10)
    rank, world = rank_and_world()
    (Path(out) / f"rank{rank}.json").write_text(json.dumps(
        {"world": world, "computed": result.computed, "complete": result.complete}))
    close_process_group()


@pytest.mark.slow  # ~25 s on 2 shared cores: two interpreters importing torch and hf_attrib
def test_two_process_build_equals_one_process_build(tmp_path):
    from launchers import launch_two

    from hf_attrib.index import Index, build

    launch_two("torchrun", [__file__, str(tmp_path / "two")])
    ranks = [json.loads((tmp_path / "two" / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["world"] for r in ranks] == [2, 2] and all(r["complete"] for r in ranks)
    assert ranks[0]["computed"] == [0, 2] and ranks[1]["computed"] == [1, 3]
    att, train, test = problem()
    single = build(att, train, out=tmp_path / "one", shard_rows=10)
    assert single.computed == [0, 1, 2, 3] and single.complete
    ref = att.attribute(train, test)
    two = Index.open(tmp_path / "two" / "index", task=att).scores(test)
    one = Index.open(tmp_path / "one", task=att).scores(test)
    tol = 2e-3 * float(ref.abs().max())  # fp16 storage
    torch.testing.assert_close(two, one, rtol=0, atol=1e-6 * float(ref.abs().max()))
    torch.testing.assert_close(one, ref, rtol=0, atol=tol)


if __name__ == "__main__":
    _worker(sys.argv[1])
