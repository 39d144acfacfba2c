"""Two CPU processes on gloo give the same scores as one, for every attributor.

The worker (``tests/distributed_worker.py``) runs each attributor's ``cache``, ``attribute``
(two test loaders: several batches, and a single batch that one process does not own) and
``self_attribute``; here it runs alone and under ``torchrun`` / ``accelerate launch``.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from launchers import launch_two
from safetensors import safe_open
from safetensors.torch import load_file

WORKER = Path(__file__).with_name("distributed_worker.py")


def _run(cmd: list[str], out: Path) -> dict[str, torch.Tensor]:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([*cmd, str(WORKER), str(out)], capture_output=True, text=True,
                          env=env, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return load_file(out)


def _world_size(path: Path) -> int:
    with safe_open(path, "pt") as f:
        return int(f.metadata()["world_size"])


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    out = tmp_path_factory.mktemp("single") / "scores.safetensors"
    return _run([sys.executable], out), out


# Every attributor under torchrun; under accelerate (the same work sharing, another way to
# start the process group) the three that share work differently: gathered features (TRAK),
# split solves (CG) and all-reduced factors (EK-FAC).
ACCELERATE_ROWS = ("trak", "if-cg", "if-ekfac")


@pytest.mark.parametrize("launcher", ["torchrun", "accelerate"])
def test_two_processes_match_one(single, tmp_path, launcher):
    ref, ref_path = single
    out = tmp_path / "scores.safetensors"
    rows = ACCELERATE_ROWS if launcher == "accelerate" else ()
    launch_two(launcher, [str(WORKER), str(out)], env={"WORKER_ROWS": ",".join(rows)})
    got = load_file(out)
    assert _world_size(ref_path) == 1 and _world_size(out) == 2
    assert len(ref) == 42  # 14 attributors x (2 test loaders + self-influence)
    if rows:
        ref = {k: v for k, v in ref.items() if k.split("/")[0] in rows}
        assert len(ref) == 3 * len(rows)
    assert set(got) == set(ref)
    for key, value in ref.items():
        assert got[key].shape == value.shape, key
        torch.testing.assert_close(got[key], value, rtol=1e-5, atol=1e-5 * value.abs().max(),
                                   msg=lambda m, k=key: f"{k}: {m}")


def test_gather_rows_refuses_incomplete_cover():
    from hf_attrib.distributed import gather_rows

    rows = torch.arange(6.0).reshape(3, 2)
    full = gather_rows(rows, torch.tensor([2, 0, 1]), 3)
    torch.testing.assert_close(full, rows[[1, 2, 0]])
    with pytest.raises(RuntimeError, match="same loaders"):
        gather_rows(rows, torch.tensor([0, 0, 1]), 3)


def test_distributed_false_ignores_process_group(monkeypatch):
    """``distributed=False`` keeps an attributor to itself inside a process group."""
    import hf_attrib.algorithm.base as base
    from hf_attrib.algorithm import GradDotAttributor
    from hf_attrib.task import AttributionTask

    monkeypatch.setattr(base, "rank_and_world", lambda: (1, 2))
    model = torch.nn.Linear(2, 2)

    def loss(params, batch):
        return torch.func.functional_call(model, params, (batch[0],)).pow(2).mean()

    task = AttributionTask(loss, model, model.state_dict())
    assert GradDotAttributor(task, distributed=False)._world() == (0, 1)
    assert GradDotAttributor(task)._world() == (1, 2)


@pytest.mark.parametrize("method", ["trak", "grad-dot"])
def test_distributed_false_makes_no_collective_inside_a_group(monkeypatch, method):
    """Inside a process group, ``distributed=False`` read every batch itself: TRAK's streamed
    kernel was still summed over the group (W times the kernel: scores off ~1/W, silently) and
    self_attribute gathered rows every process had computed (an error). Here the group is
    pretended (rank 1 of 2, no real one): any collective call fails the test."""
    import hf_attrib.algorithm.base as base
    import hf_attrib.distributed as distributed
    from hf_attrib.algorithm import make_attributor
    from hf_attrib.task import AttributionTask

    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    x, y = torch.randn(12, 4), torch.randint(0, 3, (12,))
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=5)

    def loss(params, batch):
        out = torch.func.functional_call(model, params, (batch[0],))
        return torch.nn.functional.cross_entropy(out, batch[1])

    def scores() -> tuple[torch.Tensor, torch.Tensor]:
        task = AttributionTask(loss, model, {k: v.clone() for k, v in model.state_dict().items()})
        kwargs = {"projector_kwargs": {"proj_dim": 8}} if method == "trak" else {}
        att = make_attributor(method, task, distributed=False, max_cache_bytes=0, **kwargs)
        att.cache(loader)
        return att.attribute(loader, loader), att.self_attribute(loader)

    alone = scores()
    monkeypatch.setattr(base, "rank_and_world", lambda: (1, 2))
    monkeypatch.setattr(distributed, "rank_and_world", lambda: (1, 2))
    in_group = scores()
    for a, b in zip(alone, in_group, strict=True):
        torch.testing.assert_close(a, b)
