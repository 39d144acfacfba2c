#!/usr/bin/env python
"""Peak memory and wall time of attributing a GPT-2-small-sized model (124M parameters) on CPU.

The model is ``GPT2LMHeadModel(GPT2Config())`` with random weights (no download), attributed
through its last two transformer blocks (``layers="last:2"``, 14.2M parameters) with
``hf_attrib.integrations.transformers.task_from_pretrained``: TRAK (sparse JL projection to
``--proj-dim``), Grad-Cos, and TracInCP over two checkpoints. Every method runs in a fresh
Python process, whose peak resident set size (``ru_maxrss``: imports, model, checkpoints,
gradients, projection tables, everything) is reported with its wall time. Target: < 8 GB.

    python recipes/speed/run.py gpt2-memory                  # defaults, a few minutes
    python recipes/speed/run.py gpt2-memory --n-train 64 --seq-len 128

Numbers depend on the machine and on what else runs on it: on a shared machine, wall times
are upper bounds; peak memory is per process and not affected by other processes. Writes
``results/gpt2-124m-memory-<date>.md`` (+ ``.json``).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from report import Result

DESCRIPTION = ("peak RSS and time of TRAK, Grad-Cos and TracInCP on a GPT-2-small-sized model "
               "(124M parameters, random weights), last two blocks attributed, on CPU")
METHODS = ("trak", "grad-cos", "tracin")  # registry names, built by task.attributor(name)


def _peak_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB


def _rss_gb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 2**20
    return float("nan")


def _prepare(workdir: Path, seed: int) -> None:
    """Save two 124M checkpoints (the second a small perturbation of the first)."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    model = GPT2LMHeadModel(GPT2Config())
    model.save_pretrained(workdir / "model")
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1e-3 * torch.randn_like(p))
    model.save_pretrained(workdir / "step2")


def _child(args: argparse.Namespace) -> None:
    """One method in a fresh process: print its timings and peak RSS as a JSON line."""
    import torch
    from datasets import Dataset

    from hf_attrib.integrations.transformers import task_from_pretrained

    torch.set_num_threads(args.threads)
    workdir = Path(args.workdir)
    start = time.perf_counter()
    checkpoints = ([str(workdir / "model"), str(workdir / "step2")]
                   if args.child == "tracin" else None)
    task = task_from_pretrained(workdir / "model", "causal-lm", layers="last:2",
                                checkpoints=checkpoints)
    n_params = sum(p.numel() for p in task.model.parameters())
    n_selected = task.functions(0, task.layer_name).dim
    g = torch.Generator().manual_seed(1)
    vocab = task.model.config.vocab_size

    def data(n: int) -> Dataset:
        return Dataset.from_dict({"input_ids": torch.randint(0, vocab, (n, args.seq_len),
                                                             generator=g).tolist()})

    train_loader = task.dataloader(data(args.n_train), batch_size=args.batch_size)
    test_loader = task.dataloader(data(args.n_test), batch_size=args.batch_size)
    load_s = time.perf_counter() - start
    rss_loaded = _rss_gb()
    kwargs = {"projector_kwargs": {"proj_dim": args.proj_dim}} if args.child == "trak" else {}
    if args.child == "tracin":
        kwargs["weight_list"] = [1e-4, 5e-5]
    attributor = task.attributor(args.child, **kwargs)
    t0 = time.perf_counter()
    scores = attributor.attribute(train_loader, test_loader)
    attribute_s = time.perf_counter() - t0
    assert scores.shape == (args.n_train, args.n_test) and torch.isfinite(scores).all()
    print(json.dumps({"method": args.child, "params": n_params, "selected": n_selected,
                      "load_s": load_s, "attribute_s": attribute_s,
                      "rss_after_load_gb": rss_loaded, "peak_gb": _peak_gb()}))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``run.py gpt2-memory``."""
    parser.add_argument("--n-train", type=int, default=32)
    parser.add_argument("--n-test", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--proj-dim", type=int, default=512)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--workdir", help=argparse.SUPPRESS)


def run(args: argparse.Namespace) -> list[Result]:
    """Run every method in its own process; one ``Result`` (none in a child)."""
    if args.child:
        _child(args)
        return []
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        _prepare(Path(tmp), seed=0)
        for method in args.methods.split(","):
            cmd = [sys.executable, __file__, "--child", method, "--workdir", tmp,
                   "--n-train", str(args.n_train), "--n-test", str(args.n_test),
                   "--seq-len", str(args.seq_len), "--batch-size", str(args.batch_size),
                   "--proj-dim", str(args.proj_dim), "--threads", str(args.threads)]
            t0 = time.perf_counter()
            done = subprocess.run(cmd, capture_output=True, text=True)
            wall = time.perf_counter() - t0
            if done.returncode != 0:
                print(done.stderr[-3000:], file=sys.stderr)
                rows.append({"method": method, "error": done.stderr.strip().splitlines()[-1]})
                continue
            row = json.loads(done.stdout.strip().splitlines()[-1])
            row["process_s"] = wall
            rows.append(row)
            print(f"{method}: {row['peak_gb']:.2f} GiB peak, {row['attribute_s']:.1f} s",
                  file=sys.stderr, flush=True)
    lines = [
        f"GPT-2 small (GPT2Config(), random weights), CPU ({args.threads} threads), "
        f"layers='last:2', {args.n_train} train x {args.n_test} test sequences of "
        f"{args.seq_len} tokens, batch {args.batch_size}; TRAK proj_dim={args.proj_dim}, "
        "TracInCP over 2 checkpoints.",
        "",
        "| method | params (selected) | peak RSS (GiB) | RSS after load (GiB) | load (s) "
        "| attribute (s) | process (s) |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['method']} | failed: {r['error']} | | | | | |")
            continue
        lines.append(f"| {r['method']} | {r['params'] / 1e6:.1f}M ({r['selected'] / 1e6:.1f}M) "
                     f"| {r['peak_gb']:.2f} | {r['rss_after_load_gb']:.2f} | {r['load_s']:.1f} "
                     f"| {r['attribute_s']:.1f} | {r['process_s']:.1f} |")
    body = "\n".join(lines)
    print(body)
    options = {k: v for k, v in vars(args).items() if k not in ("child", "workdir", "out")}
    return [Result("gpt2-124m-memory", "GPT-2 small (124M): peak memory and time on CPU", body,
                   {"args": {**options, "out": str(args.out)}, "rows": rows})]


if __name__ == "__main__":
    from run import run_as_script

    sys.exit(run_as_script("gpt2-memory"))
