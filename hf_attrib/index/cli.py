"""``hf-attrib index build|push|pull|query``: attribution indexes from the shell.

    hf-attrib index build --model ORG/MODEL --task causal-lm --train DATASET --method trak \\
        --out DIR [--layers last:2] [--dtype float16] [--shard-rows 4096] [--shard i/n]
        [--max-length 128]
    hf-attrib index push DIR --repo-id ORG/MODEL-index
    hf-attrib index pull ORG/MODEL-index --out DIR [--rows a:b]
    hf-attrib index query DIR_OR_REPO --text "..." [--text ...] [--test DATASET] [--top-k 10]
        [--train DATASET (to show texts)] [--rows a:b]
"""

from __future__ import annotations

import argparse
import json
from typing import Any

__all__ = ["add_index_parser"]


def _build(args: argparse.Namespace) -> int:
    from hf_attrib.distributed import parse_shard
    from hf_attrib.index.builder import build
    from hf_attrib.integrations.cli_attribute import load_any_dataset
    from hf_attrib.integrations.transformers import task_from_pretrained

    train = load_any_dataset(args.train, args.train_split, "train")
    task = task_from_pretrained(args.model, args.task, layers=args.layers,
                                revision=args.revision, device=args.device)
    kwargs: dict[str, Any] = {}
    if args.proj_dim:
        kwargs["projector_kwargs"] = {"proj_type": "factored", "proj_dim": args.proj_dim}
    result = build(task, train, out=args.out, method=args.method, dtype=args.dtype,
                   shard_rows=args.shard_rows, batch_size=args.batch_size,
                   shard=parse_shard(args.shard, allow_auto=True), method_kwargs=kwargs,
                   dataset_id=args.dataset_id or args.train, text_column=args.text_column,
                   dataloader_kwargs={"max_length": args.max_length} if args.max_length
                   else None)
    print(f"{result.path}: {len(result.computed)} shard(s) computed, {len(result.skipped)} "
          f"already done, of {result.num_shards} ({result.num_rows} examples)")
    print("index complete" if result.complete else
          "index not complete yet: the other --shard parts are still to run")
    return 0


def _push(args: argparse.Namespace) -> int:
    from hf_attrib.index.hub import push_index

    ref = push_index(args.folder, args.repo_id, endpoint=args.endpoint, revision=args.revision,
                     private=args.private or None, resumable=not args.one_commit)
    print(f"pushed {args.folder} to {args.repo_id} ({ref})")
    return 0


def _pull(args: argparse.Namespace) -> int:
    from hf_attrib.index.hub import pull_index

    path = pull_index(args.repo_id, out=args.out, rows=args.rows, revision=args.revision,
                      endpoint=args.endpoint)
    print(f"index: {path}")
    return 0


def _query(args: argparse.Namespace) -> int:
    from hf_attrib.index.query import Index
    from hf_attrib.integrations.cli_attribute import load_any_dataset

    if not args.text and not args.test:
        raise ValueError("give the queries with --text TEXT (repeatable) or --test DATASET.")
    train = load_any_dataset(args.train, args.train_split, "train") if args.train else None
    index = Index.open(args.index, model=args.model, dataset=train, rows=args.rows,
                       revision=args.revision, endpoint=args.endpoint, device=args.device)
    queries = list(args.text or [])
    if args.test:
        queries = load_any_dataset(args.test, None, "test")
    result = index.query(queries, top_k=args.top_k, rows=args.rows)
    if args.json:
        print(json.dumps({"scores": result.scores.tolist(),
                          "example_ids": result.example_ids.tolist(), "texts": result.texts}))
        return 0
    for j in range(result.scores.shape[0]):
        label = queries[j] if isinstance(queries, list) else f"test example {j}"
        print(f"query {j}: {label!r}")
        for r in range(result.scores.shape[1]):
            text = f"  {result.texts[j][r]!r}" if result.texts else ""
            print(f"  {float(result.scores[j, r]):+.4e}  #{int(result.example_ids[j, r])}{text}")
    return 0


def add_index_parser(commands: argparse._SubParsersAction) -> None:
    """Add ``hf-attrib index ...`` to the ``hf-attrib`` parser."""
    index = commands.add_parser("index", help="build, push, pull and query attribution indexes")
    cmds = index.add_subparsers(dest="index_command", required=True, metavar="COMMAND",
                                help="what to do (`hf-attrib index COMMAND --help`)")
    endpoint = dict(help="Hub endpoint (default: HF_ENDPOINT or huggingface.co)")
    b = cmds.add_parser("build", help="featurize a training set into an index folder")
    b.add_argument("--model", required=True, help="Hub model id or save_pretrained folder")
    b.add_argument("--task", default="causal-lm", help="task kind (default causal-lm)")
    b.add_argument("--train", required=True, help="training data: a file, a save_to_disk "
                   "folder or a Hub dataset id")
    b.add_argument("--train-split", help="split of --train")
    b.add_argument("--dataset-id", help="Hub id of the training data to record (default --train)")
    b.add_argument("--text-column", help="column of each example's text (default text)")
    b.add_argument("--method", default="trak", help="trak, grad-dot, grad-cos or tracin")
    b.add_argument("--layers", help="layer selection, e.g. last:2 (default all)")
    b.add_argument("--proj-dim", type=int, help="feature size (factored projection budget)")
    b.add_argument("--dtype", default="float16", choices=("float16", "bfloat16", "float32"),
                   help="storage type of the features (default float16)")
    b.add_argument("--shard-rows", type=int, default=4096, help="rows per shard")
    b.add_argument("--batch-size", type=int, default=8, help="examples per featurized batch")
    b.add_argument("--max-length", type=int, help="truncate each example to this many tokens "
                   "(default the tokenizer's; queries are truncated alike)")
    b.add_argument("--shard", help="i/n: compute every n-th shard from i (or auto under "
                   "torchrun/accelerate); the last part to finish writes the index")
    b.add_argument("--out", required=True, help="the index folder (rerun to resume)")
    b.add_argument("--revision", help="model revision")
    b.add_argument("--device", help="cpu, cuda, ... (default the model's)")
    b.set_defaults(func=_build)
    p = cmds.add_parser("push", help="upload an index folder as a model repo (resumable)")
    p.add_argument("folder", help="the index folder (index build's --out)")
    p.add_argument("--repo-id", required=True, help="the index repo to create or update")
    p.add_argument("--revision", help="branch to commit to (default main)")
    p.add_argument("--private", action="store_true", help="create the repo private")
    p.add_argument("--one-commit", action="store_true",
                   help="upload in one commit (default: resumable batches of commits)")
    p.add_argument("--endpoint", **endpoint)
    p.set_defaults(func=_push)
    pl = cmds.add_parser("pull", help="download an index repo (or the shards of some rows)")
    pl.add_argument("repo_id", help="the index repo on the Hub")
    pl.add_argument("--out", help="folder (default: the Hugging Face cache)")
    pl.add_argument("--rows", help="only the shards holding rows a:b")
    pl.add_argument("--revision", help="branch, tag or commit (default main)")
    pl.add_argument("--endpoint", **endpoint)
    pl.set_defaults(func=_pull)
    q = cmds.add_parser("query", help="top-k training examples of test texts")
    q.add_argument("index", help="index folder or Hub repo id")
    q.add_argument("--text", action="append", help="a query text (repeatable)")
    q.add_argument("--test", help="a dataset of queries (file, folder or Hub id)")
    q.add_argument("--top-k", type=int, default=10, help="training examples per query")
    q.add_argument("--train", help="the training data, to print each example's text")
    q.add_argument("--train-split", help="split of --train")
    q.add_argument("--model", help="model to use instead of the one the index records")
    q.add_argument("--rows", help="search only rows a:b")
    q.add_argument("--json", action="store_true", help="print JSON")
    q.add_argument("--revision", help="revision of an index repo")
    q.add_argument("--device", help="cpu, cuda, ...")
    q.add_argument("--endpoint", **endpoint)
    q.set_defaults(func=_query)
