#!/usr/bin/env python
"""Featurisation against training, side by side: examples/s of the per-layer engine with the
factored projection vs a training step (forward, backward, AdamW) of the same batch size.

The model is ``GPT2LMHeadModel(GPT2Config(n_layer=...))`` with random weights (124M parameters
at the default 12 layers), sequences of ``--seq-len`` tokens, every parameter attributed (all
Conv1D, LayerNorm and embedding layers; the head is tied to the token embedding). Contenders,
interleaved on the same batches in one process, medians over ``--reps``:

* ``train step``: ``model(input_ids, labels).loss.backward(); AdamW.step(); zero_grad()``, the
  model in training mode, as a fine-tuning run does;
* ``factored``: ``TRAKAttributor(..., projector_kwargs={"proj_type": "factored",
  "factor_dim": k}).featurize`` on the batch: one forward, one backward without weight
  gradients, the projections (the one-time check against explicit gradients on the first
  batch runs in the warm-up and is timed apart);
* ``dense`` (``--dense``): today's path, explicit per-example gradients (``torch.func`` vmap)
  projected by the default projector (sparse JL on CPU) to ``--proj-dim``.

A second part streams ``--stream`` examples through ``featurize`` in fresh processes at two
dataset sizes and reports each one's peak RSS: flat means memory independent of the number of
examples. Storage per example is the feature width times 2 bytes (fp16) or 4 (fp32).

    python recipes/speed/run.py featurize                        # GPT-2 124M, a few minutes
    python recipes/speed/run.py featurize --n-layer 6 --dense    # with today's dense path
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

from report import Result

# Batches before the timed ones: the first (one-time checks) and the factored path's spot-checked
# batches 1, 2 and 4.
_WARM = 5
DESCRIPTION = ("examples/s of featurisation with the per-layer engine + factored projection vs "
               "a training step (forward, backward, AdamW) on GPT-2, and peak memory against "
               "the number of examples")


def _model(n_layer: int, seed: int = 0):
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    return GPT2LMHeadModel(GPT2Config(n_layer=n_layer))


def _batches(vocab: int, count: int, batch_size: int, seq_len: int, seed: int = 1):
    import torch

    g = torch.Generator().manual_seed(seed)
    return [{"input_ids": (ids := torch.randint(0, vocab, (batch_size, seq_len), generator=g)),
             "labels": ids.clone()} for _ in range(count)]


def _attributor(model, factor_dim: int | None, proj_dim: int):
    from hf_attrib.algorithm import TRAKAttributor
    from hf_attrib.integrations.transformers import task_from_pretrained

    task = task_from_pretrained(model, "causal-lm")
    kwargs = ({"proj_type": "factored", "factor_dim": factor_dim} if factor_dim
              else {"proj_dim": proj_dim})
    return task, TRAKAttributor(task, projector_kwargs=kwargs)


def _featurize_once(attributor, batch) -> float:
    import torch

    loader = torch.utils.data.DataLoader([batch], batch_size=None)
    t0 = time.perf_counter()
    for _, feats in attributor.featurize(loader):
        assert bool(torch.isfinite(feats).all())
    return time.perf_counter() - t0


def _train_once(model, optimizer, batch) -> float:
    t0 = time.perf_counter()
    model(**batch).loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return time.perf_counter() - t0


def _side_by_side(args: argparse.Namespace) -> dict:
    import torch

    torch.set_num_threads(args.threads)
    train_model = _model(args.n_layer).train()
    optimizer = torch.optim.AdamW(train_model.parameters(), lr=1e-5)
    feat_model = _model(args.n_layer).eval()
    _, factored = _attributor(feat_model, args.factor_dim, args.proj_dim)
    dense = None
    if args.dense:
        dense = _attributor(_model(args.n_layer).eval(), None, args.proj_dim)[1]
    batches = _batches(feat_model.config.vocab_size, args.reps + _WARM, args.batch_size,
                       args.seq_len)
    first = {"train": _train_once(train_model, optimizer, batches[0]),
             "factored": _featurize_once(factored, batches[0])}  # includes the one-time check
    if dense is not None:
        first["dense"] = _featurize_once(dense, batches[0])
    # The factored path spot-checks batches 1, 2 and 4 (forward passes only, then 8, 16, ...):
    # timed batches are the steady state after them.
    checks = [_featurize_once(factored, batch) for batch in batches[1:_WARM]]
    times: dict[str, list[float]] = {k: [] for k in first}
    for batch in batches[_WARM:]:  # interleaved: every contender sees the same load
        times["train"].append(_train_once(train_model, optimizer, batch))
        times["factored"].append(_featurize_once(factored, batch))
        if dense is not None:
            times["dense"].append(_featurize_once(dense, batch))
    fns = factored.task.functions(0)
    width = factored._width(fns)
    return {"first_s": first, "times_s": times, "width": width, "spot_checked_s": checks,
            "params": sum(p.numel() for p in feat_model.parameters()),
            "selected": fns.dim}


def _stream_child(args: argparse.Namespace) -> None:
    import torch

    torch.set_num_threads(args.threads)
    model = _model(args.n_layer).eval()
    _, attributor = _attributor(model, args.factor_dim, args.proj_dim)
    data = _batches(model.config.vocab_size, args.child_n // args.batch_size, args.batch_size,
                    args.seq_len)
    loader = torch.utils.data.DataLoader(data, batch_size=None)
    total = 0
    t0 = time.perf_counter()
    for _, feats in attributor.featurize(loader):
        total += feats.shape[0]  # a real consumer writes them to disk (hf_attrib.index)
    print(json.dumps({"examples": total, "seconds": time.perf_counter() - t0,
                      "peak_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``run.py featurize``."""
    parser.add_argument("--n-layer", type=int, default=12, help="GPT-2 blocks (12: 124M)")
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--factor-dim", type=int, default=32)
    parser.add_argument("--proj-dim", type=int, default=4096, help="dense contender's dim")
    parser.add_argument("--dense", action="store_true", help="also time today's dense path")
    parser.add_argument("--stream", default="8,32",
                        help="dataset sizes streamed in fresh processes for peak memory")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--child-n", type=int, help=argparse.SUPPRESS)


def _stream(args: argparse.Namespace, n: int) -> dict:
    cmd = [sys.executable, __file__, "--child-n", str(n), "--n-layer", str(args.n_layer),
           "--seq-len", str(args.seq_len), "--batch-size", str(args.batch_size),
           "--factor-dim", str(args.factor_dim), "--threads", str(args.threads)]
    done = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def run(args: argparse.Namespace) -> list[Result]:
    """The side by side, then the streaming runs; one ``Result`` (none in a child)."""
    if args.child_n:
        _stream_child(args)
        return []
    side = _side_by_side(args)
    med = {k: statistics.median(v) for k, v in side["times_s"].items()}
    per_s = {k: args.batch_size / v for k, v in med.items()}
    streams = [_stream(args, int(n)) for n in args.stream.split(",")]
    lines = [
        f"GPT-2 ({args.n_layer} blocks, {side['params'] / 1e6:.1f}M parameters, random "
        f"weights), every parameter attributed ({side['selected'] / 1e6:.1f}M), sequences of "
        f"{args.seq_len} tokens, batch {args.batch_size}, {args.threads} CPU threads; "
        f"median of {args.reps} interleaved batches after the warm-up batches.",
        "",
        "| contender | s / batch (median) | examples/s | vs training step | first batch (s) |",
        "|---|---|---|---|---|",
    ]
    for name in side["times_s"]:
        lines.append(f"| {name} | {med[name]:.2f} | {per_s[name]:.2f} "
                     f"| {per_s[name] / per_s['train']:.2f}x | {side['first_s'][name]:.2f} |")
    lines += [
        "",
        f"Factored features: factor_dim {args.factor_dim}, width {side['width']:,} per example "
        f"= {side['width'] * 2 / 1024:.0f} KiB in fp16, {side['width'] * 4 / 1024:.0f} KiB in "
        "fp32. The factored first batch includes the one-time check of two examples against "
        "explicit per-example gradients; its spot-checked batches 1, 2 and 4 (forward passes "
        "of each example, then at 8, 16, ...) took "
        + ", ".join(f"{t:.2f}" for t in side["spot_checked_s"]) + " s.",
        "",
        "| examples streamed | peak RSS (GiB) | seconds |",
        "|---|---|---|",
    ]
    lines += [f"| {s['examples']} | {s['peak_gib']:.2f} | {s['seconds']:.1f} |" for s in streams]
    body = "\n".join(lines)
    print(body)
    options = {k: v for k, v in vars(args).items() if k not in ("child_n", "out")}
    return [Result(f"featurize-gpt2-{args.n_layer}l", "Featurisation vs training step (GPT-2)",
                   body, {"args": {**options, "out": str(args.out)}, "side_by_side": side,
                          "streams": streams})]


if __name__ == "__main__":
    from run import run_as_script

    sys.exit(run_as_script("featurize"))
