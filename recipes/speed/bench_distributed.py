"""Wall time of attributors in one process vs N processes (gloo on CPU, NCCL on GPUs).

    python recipes/speed/run.py distributed                 # 1 vs 2 CPU processes
    python recipes/speed/run.py distributed --nproc 4 --device cuda

Each configuration runs in fresh processes (``torchrun`` for N > 1); every process uses
``--threads`` intra-op threads, so "1 process x 1 thread" vs "2 processes x 1 thread" is the
fair comparison of the sharding itself, and "1 process x 2 threads" shows what the same cores
give without it. Every method first runs untimed on 8 examples (one-off warm-up costs). The problem: the digits MLP (17,226 parameters), ``--n-train`` training and
``--n-test`` test examples. The attributors come from the method registry
(``make_attributor``) with the options of ``OPTIONS``. Writes
``results/distributed-mlp-digits-<device>-<N>proc-<date>.md``; the scores of every run are
checked against the 1-process run.
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from report import Result

DESCRIPTION = ("wall time of TRAK, TracIn, Grad-Cos, IF-CG and IF-explicit (cache + attribute "
               "+ self_attribute) in 1 process vs N processes (torchrun: gloo on CPU, NCCL on "
               "GPUs) and in 1 process with N x the threads; checks that the scores agree")
# row -> (registry method, options); TRAK also gets the correct-class probability.
PROJECTION = {"proj_dim": 512}
OPTIONS: dict[str, tuple[str, dict[str, Any]]] = {
    "trak": ("trak", {"projector_kwargs": PROJECTION}),
    "tracin": ("tracin", {"weight_list": [0.1], "projector_kwargs": PROJECTION}),
    "grad-cos": ("grad-cos", {"projector_kwargs": PROJECTION}),
    "if-cg": ("if-cg", {"max_iter": 10, "regularization": 0.01}),
    "if-explicit-fc3": ("if-explicit", {"layer_name": "fc3", "regularization": 0.01}),
}
METHODS = tuple(OPTIONS)


def _worker(args: argparse.Namespace) -> None:
    """One process of a configuration: time every method, save its scores (main process)."""
    import torch
    from safetensors.torch import save_file
    from sklearn.datasets import load_digits
    from torch import nn
    from torch.utils.data import DataLoader, TensorDataset

    from hf_attrib.algorithm.registry import make_attributor
    from hf_attrib.distributed import close_process_group, is_main_process
    from hf_attrib.task import AttributionTask

    if "RANK" in os.environ:
        torch.distributed.init_process_group("nccl" if args.device == "cuda" else "gloo")
        if args.device == "cuda":
            torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    device = (torch.device("cuda", torch.cuda.current_device()) if args.device == "cuda"
              else torch.device("cpu"))
    torch.set_num_threads(args.threads)
    x, y = load_digits(return_X_y=True)
    x = torch.tensor(x, dtype=torch.float32) / 16
    y = torch.tensor(y)
    n = args.n_train + args.n_test
    if n > len(x):  # repeat the 1797 digits with small noise for larger sizes
        reps = -(-n // len(x))
        x = x.repeat(reps, 1) + 0.01 * torch.randn(len(x) * reps, 64,
                                                   generator=torch.Generator().manual_seed(0))
        y = y.repeat(reps)
    torch.manual_seed(0)
    model = nn.Sequential()
    model.add_module("fc1", nn.Linear(64, 128))
    model.add_module("act1", nn.ReLU())
    model.add_module("fc2", nn.Linear(128, 64))
    model.add_module("act2", nn.ReLU())
    model.add_module("fc3", nn.Linear(64, 10))

    def loss(params, batch):
        xb, yb = batch
        return nn.functional.cross_entropy(torch.func.functional_call(model, params, (xb,)), yb)

    def prob(params, batch):
        xb, yb = batch
        logits = torch.func.functional_call(model, params, (xb,))
        return torch.softmax(logits, -1).gather(1, yb[:, None]).mean()

    ckpts = [model.state_dict()]
    task = AttributionTask(loss_func=loss, model=model, checkpoints=ckpts)
    train = DataLoader(TensorDataset(x[: args.n_train], y[: args.n_train]), batch_size=100)
    test = DataLoader(TensorDataset(x[args.n_train:n], y[args.n_train:n]), batch_size=50)

    def make(row: str) -> Any:
        method, options = OPTIONS[row]
        if method == "trak":
            options = {**options, "correct_probability_func": prob}
        return make_attributor(method, task, device=device, **options)

    # One-off costs (torch.func set-up, first kernels, thread pools) are paid by whichever
    # method runs first: pay them untimed on a few examples of every method.
    few = DataLoader(TensorDataset(x[:8], y[:8]), batch_size=4)
    for method in args.methods:
        warm = make(method)
        warm.cache(few)
        warm.attribute(few, few)
    tensors, times = {}, {}
    for method in args.methods:
        attributor = make(method)
        start = time.perf_counter()
        attributor.cache(train)
        tensors[f"{method}/scores"] = attributor.attribute(train, test).cpu()
        tensors[f"{method}/self"] = attributor.self_attribute(train).cpu()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times[method] = time.perf_counter() - start
    if is_main_process():
        save_file(tensors, args._scores, metadata={k: f"{v:.4f}" for k, v in times.items()})
    close_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(nproc: int, threads: int, args: argparse.Namespace, out: Path) -> float:
    worker = [__file__, "--_worker", "--_scores", str(out), "--threads", str(threads),
              "--n-train", str(args.n_train), "--n-test", str(args.n_test),
              "--device", args.device, "--methods", *args.methods]
    cmd = ([sys.executable, *worker] if nproc == 1 else
           ["torchrun", "--nproc_per_node", str(nproc), "--master_port", str(_free_port()),
            *worker])
    start = time.perf_counter()
    subprocess.run(cmd, check=True, env={**os.environ, "OMP_NUM_THREADS": str(threads)},
                   stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    return time.perf_counter() - start


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``run.py distributed``."""
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--n-train", type=int, default=1000)
    parser.add_argument("--n-test", type=int, default=100)
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--_worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--_scores", help=argparse.SUPPRESS)


def run(args: argparse.Namespace) -> list[Result]:
    """Time every configuration in fresh processes; one ``Result`` (none in a worker)."""
    if args._worker:
        _worker(args)
        return []

    from safetensors import safe_open
    from safetensors.torch import load_file

    configs = [(1, args.threads), (args.nproc, args.threads)]
    if args.device == "cpu":
        configs.append((1, args.threads * args.nproc))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        results = {}
        for nproc, threads in configs:
            out = Path(tmp) / f"{nproc}x{threads}.safetensors"
            wall = _launch(nproc, threads, args, out)
            with safe_open(out, "pt") as f:
                times = {k: float(v) for k, v in f.metadata().items()}
            results[(nproc, threads)] = (wall, times, load_file(out))
        ref = results[configs[0]][2]
        for (nproc, threads), (wall, times, tensors) in results.items():
            err = max(float((tensors[k] - ref[k]).abs().max() / ref[k].abs().max().clamp_min(1e-30))
                      for k in ref)
            rows.append((nproc, threads, wall, times, err))
    base = rows[0][3]
    lines = [
        f"digits MLP (17,226 parameters), n_train={args.n_train}, n_test={args.n_test}, "
        f"device={args.device}; seconds of cache+attribute+self_attribute per method "
        "(process start-up excluded), speed-up vs 1 process x "
        f"{args.threads} thread(s)",
        "",
        "| processes x threads | " + " | ".join(args.methods) + " | total (s) | speed-up "
        "| process wall incl. start-up (s) | max rel. diff vs 1 process |",
        "|---" * (len(args.methods) + 5) + "|",
    ]
    for nproc, threads, wall, times, err in rows:
        total = sum(times.values())
        lines.append(f"| {nproc} x {threads} | "
                     + " | ".join(f"{times[m]:.2f}" for m in args.methods)
                     + f" | {total:.2f} | {sum(base.values()) / total:.2f}x | {wall:.1f} "
                     f"| {err:.1e} |")
    body = "\n".join(lines)
    print(body)
    backend = "NCCL" if args.device == "cuda" else "gloo"
    return [Result(f"distributed-mlp-digits-{args.device}-{args.nproc}proc",
                   f"1 vs {args.nproc} {args.device.upper()} processes ({backend})", body)]


if __name__ == "__main__":
    from run import run_as_script

    sys.exit(run_as_script("distributed"))
