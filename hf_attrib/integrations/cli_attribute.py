"""``hf-attrib attribute``: score a transformers model's training examples from the shell.

    hf-attrib attribute --model gpt2 --task causal-lm --train data/train.jsonl \\
        --test data/test.jsonl --method trak --layers last:2 --out scores.safetensors

DATASET arguments are a ``Dataset.save_to_disk`` folder, a data file (``.json``, ``.jsonl``,
``.csv``, ``.parquet``, ``.txt``) or a Hub dataset id. Scores ``[n_train, n_test]`` are written
as safetensors (``scores``; metadata ``n_train``, ``n_test``, ``method``, ...) and a report
lists the most helpful (highest positive scores: including the example raises the target) and
most harmful (lowest negative scores) training examples for each test example. Method options
not given take the method registry's defaults (``hf_attrib.algorithm.get_method(name)
.defaults``), as ``task.attributor(method)`` in Python does, so both give the same scores.
Only safetensors weights are loaded unless ``--allow-pickle``.
"""

from __future__ import annotations

import argparse
import inspect
import os
import time
from pathlib import Path
from typing import Any

__all__ = ["add_attribute_parser", "load_any_dataset", "report"]

_FILE_BUILDERS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet",
                  ".txt": "text", ".arrow": "arrow"}


def load_any_dataset(spec: str, split: str | None = None, role: str = "train") -> Any:
    """A ``datasets.Dataset`` from a ``save_to_disk`` folder, a data file or a Hub id.

    A ``spec`` that looks like a local path (a data file suffix, a leading ``.``/``/``/``~``,
    or more than the one ``/`` of ``org/name``) and does not exist is a
    ``FileNotFoundError``, not a Hub lookup.
    """
    import datasets

    path = Path(spec).expanduser()
    if path.is_dir() and ((path / "dataset_info.json").exists() or
                          (path / "dataset_dict.json").exists() or
                          (path / "state.json").exists()):
        data = datasets.load_from_disk(str(path))
    elif path.is_file():
        builder = _FILE_BUILDERS.get(path.suffix.lower())
        if builder is None:
            raise ValueError(f"{spec}: unknown data file type {path.suffix!r}; use one of "
                             f"{', '.join(_FILE_BUILDERS)} or a save_to_disk folder.")
        data = datasets.load_dataset(builder, data_files=str(path), split="train")
    elif path.exists():
        data = datasets.load_dataset(str(path))
    else:
        if _looks_like_path(spec):
            raise FileNotFoundError(
                f"{role} dataset {spec} does not exist (no such file or folder: "
                f"{path.resolve()}). Pass an existing data file, a save_to_disk folder, or a "
                f"Hub dataset id (org/name) to --{role}.")
        data = datasets.load_dataset(spec, split=split) if split else datasets.load_dataset(spec)
    if isinstance(data, datasets.DatasetDict):
        names = list(data)
        chosen = split or ("train" if role == "train" and "train" in data else
                           "test" if role == "test" and "test" in data else
                           names[0] if len(names) == 1 else None)
        if chosen not in data:
            raise ValueError(f"{role} dataset {spec} has splits {names}; choose one with "
                             f"--{role}-split.")
        data = data[chosen]
    return data


def _looks_like_path(spec: str) -> bool:
    """Whether ``spec`` names a local file or folder rather than a Hub id (``org/name``)."""
    if spec.startswith((".", "/", "~")) or "\\" in spec:
        return True
    if Path(spec).suffix.lower() in _FILE_BUILDERS:
        return True
    return spec.count("/") > 1


def _describe(dataset: Any, index: int, processor: Any, text_column: str | None,
              width: int = 70) -> str:
    row = dataset[index]
    text = None
    for col in ([text_column] if text_column else []) + ["text", "sentence", "content"]:
        if col and col in row and isinstance(row[col], str):
            text = row[col]
            break
    if text is None and "input_ids" in row and processor is not None and hasattr(processor,
                                                                                  "decode"):
        text = processor.decode(row["input_ids"], skip_special_tokens=True)
    if text is None:
        return f"#{index}"
    text = " ".join(text.split())
    return f"#{index} {text[:width]!r}" + ("..." if len(text) > width else "")


def report(scores: Any, train: Any, test: Any, processor: Any = None,
           text_column: str | None = None, top_k: int = 5) -> str:
    """Most helpful (positive) / most harmful (negative) training examples per test example,
    as text; a list without any example of its sign says "none"."""
    n_train, n_test = scores.shape
    k = min(top_k, n_train)
    lines = [f"scores [{n_train} train x {n_test} test]: positive = including the training "
             "example raises the target (helps), negative = lowers it (harms)."]
    for j in range(n_test):
        column = scores[:, j]
        order = column.argsort(descending=True)
        helpful = [i for i in order[:k].tolist() if float(column[i]) > 0]
        harmful = [i for i in order.flip(0)[:k].tolist() if float(column[i]) < 0]
        lines.append("")
        lines.append(f"test {_describe(test, j, processor, text_column)}")
        for title, rows in (("most helpful:", helpful), ("most harmful:", harmful)):
            lines.append(f"  {title}")
            lines += [f"    {float(column[i]):+.4e}  {_describe(train, i, processor, text_column)}"
                      for i in rows] or ["    none"]
    return "\n".join(lines)


def _method_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """The options given on the command line; everything else comes from the registry's
    defaults, as for ``task.attributor(method)``."""
    kwargs: dict[str, Any] = {}
    method = args.method
    if method in ("trak", "tracin", "grad-dot", "grad-cos") and args.proj_dim is not None:
        kwargs["projector_kwargs"] = {"proj_dim": args.proj_dim}
    if args.regularization is not None:
        if method in ("grad-dot", "grad-cos", "tracin", "if-lissa"):
            raise ValueError(f"--regularization does not apply to --method {method}"
                             + (" (LiSSA is damped through damping/scaling in Python: "
                                "task.attributor('if-lissa', damping=..., scaling=...))"
                                if method == "if-lissa" else "") + "; drop it.")
        kwargs["l2_strength" if method == "rps" else "regularization"] = args.regularization
    if args.relative_regularization is not None:
        if method != "trak":
            raise ValueError(f"--relative-regularization applies to --method trak only (got "
                             f"--method {method}); use --regularization.")
        kwargs["relative_regularization"] = args.relative_regularization
    if args.max_iter is not None and method in ("if-cg", "if-arnoldi"):
        kwargs["max_iter"] = args.max_iter
    if args.block_cg:
        kwargs["block"] = True
    return kwargs


def _launched_device(device: str) -> str:
    """Under ``accelerate launch``/``torchrun`` with several processes, set up the process
    group (the attributors then share the work) and return this process's device."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return device
    from accelerate import PartialState

    state = PartialState(cpu=device == "cpu")
    return str(state.device)


def _attribute(args: argparse.Namespace) -> int:
    from safetensors.torch import save_file

    from hf_attrib.distributed import close_process_group, is_main_process
    from hf_attrib.integrations.transformers import task_from_pretrained

    if args.block_cg and args.method != "if-cg":
        raise ValueError(f"--block-cg applies to --method if-cg only (got --method "
                         f"{args.method}); drop it or use --method if-cg.")
    args.device = _launched_device(args.device)

    layers: Any = args.layers
    if layers and not layers.startswith("last:") and layers != "trainable":
        layers = [name.strip() for name in layers.split(",") if name.strip()]
    start = time.perf_counter()
    method_kwargs = _method_kwargs(args)  # option errors before any loading
    task = task_from_pretrained(args.model, args.task, layers=layers,
                                checkpoints=args.checkpoints,
                                trust_remote_code=args.trust_remote_code, device=args.device,
                                allow_pickle=args.allow_pickle)
    if args.pad_with_eos and task.processor is not None and task.processor.pad_token is None:
        task.processor.pad_token = task.processor.eos_token
    train = load_any_dataset(args.train, args.train_split, "train")
    test = load_any_dataset(args.test, args.test_split, "test")
    if args.max_train:
        train = train.select(range(min(args.max_train, len(train))))
    if args.max_test:
        test = test.select(range(min(args.max_test, len(test))))
    loader_kwargs = dict(batch_size=args.batch_size, text_column=args.text_column,
                         label_column=args.label_column, max_length=args.max_length)
    train_loader = task.dataloader(train, **loader_kwargs)
    test_loader = task.dataloader(test, **loader_kwargs)
    attributor = task.attributor(args.method, device=args.device, progress=not args.no_progress,
                                 **method_kwargs)
    scores = attributor.attribute(train_loader, test_loader).detach().cpu().float()
    elapsed = time.perf_counter() - start
    main = is_main_process()
    close_process_group()
    if not main:  # every process holds the scores; one writes and reports
        return 0
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    metadata = {"n_train": str(scores.shape[0]), "n_test": str(scores.shape[1]),
                "method": args.method, "model": str(args.model), "task": args.task,
                "layers": str(args.layers), "train": str(args.train), "test": str(args.test),
                "sign": "score[i, j] > 0: training example i raises the target on test j"}
    save_file({"scores": scores.contiguous()}, str(out), metadata=metadata)
    is_text = args.task != "image-classification"
    print(report(scores, train, test, task.processor if is_text else None,
                 args.text_column if is_text else None, args.top_k))
    print(f"\nwrote {out} ({scores.shape[0]} x {scores.shape[1]}, {args.method}, "
          f"{elapsed:.1f} s)")
    return 0


def add_attribute_parser(commands: argparse._SubParsersAction) -> None:
    """Add the ``attribute`` subcommand to the ``hf-attrib`` parser."""
    from hf_attrib.algorithm import get_method, method_names
    from hf_attrib.integrations.transformers import TASK_KINDS

    p = commands.add_parser("attribute", help="attribute a transformers model's predictions "
                            "to its training examples")
    p.add_argument("--model", required=True, help="Hub id or local save_pretrained folder")
    p.add_argument("--task", required=True, choices=list(TASK_KINDS),
                   help="the model's head: " + ", ".join(TASK_KINDS))
    p.add_argument("--train", required=True,
                   help="save_to_disk folder, data file (json/jsonl/csv/parquet/txt) or Hub id")
    p.add_argument("--test", required=True, help="as --train")
    p.add_argument("--train-split", help="split of --train (default: train / the only one)")
    p.add_argument("--test-split", help="split of --test (default: test / the only one)")
    p.add_argument("--method", default="trak", choices=list(method_names()),
                   help="attribution method (default: trak); unset options take the same "
                        "defaults as task.attributor(method) in Python")
    p.add_argument("--layers", help="last:N, trainable, or comma-separated module names "
                   "(default: all parameters, adapters for a PEFT folder; for models of more "
                   "than a few million parameters select a few blocks, e.g. last:2)")
    p.add_argument("--checkpoints", help="Trainer output_dir (TracInCP trajectory) or folder")
    p.add_argument("--text-column", help="column to tokenise (default: text/sentence)")
    p.add_argument("--label-column", help="class label column (default: label/labels)")
    p.add_argument("--max-length", type=int, help="truncate tokenised text to N tokens")
    p.add_argument("--max-train", type=int, help="use the first N training examples")
    p.add_argument("--max-test", type=int, help="use the first N test examples")
    p.add_argument("--batch-size", type=int, default=8,
                   help="examples per batch (default: 8)")
    trak, if_cg, rps = (get_method(name).defaults for name in ("trak", "if-cg", "rps"))
    arnoldi = inspect.signature(get_method("if-arnoldi").attributor_class).parameters
    p.add_argument("--proj-dim", type=int,
                   help="random projection size for trak/tracin/grad-dot/grad-cos (default: "
                        f"{trak['projector_kwargs']['proj_dim']} for trak, none for the others; "
                        "no projection when the selected parameters are fewer)")
    p.add_argument("--regularization", type=float,
                   help="trak: kernel damping lambda on dattri's scale (default: "
                        f"{trak['regularization']:g}); if-explicit/if-cg/if-arnoldi: Hessian "
                        f"damping (default: {if_cg['regularization']:g}); rps: L2 strength of "
                        f"the last-layer fit (default: {rps['l2_strength']:g})")
    p.add_argument("--relative-regularization", type=float,
                   help="trak: kernel damping as a multiple of the kernel's mean eigenvalue "
                        "(e.g. 1e-3), instead of --regularization")
    p.add_argument("--max-iter", type=int,
                   help=f"if-cg / if-arnoldi iterations (default: {if_cg['max_iter']} for "
                        f"if-cg, {arnoldi['max_iter'].default} for if-arnoldi)")
    p.add_argument("--block-cg", action="store_true",
                   help="IF-CG: solve all test gradients in one shared Krylov space (block "
                        "CG: fewer iterations; needs H + regularization*I positive definite)")
    p.add_argument("--out", default="scores.safetensors",
                   help="safetensors file for the scores (default: scores.safetensors)")
    p.add_argument("--top-k", type=int, default=5,
                   help="training examples listed per test example and sign (default: 5)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ... (default: cpu)")
    p.add_argument("--allow-pickle", action="store_true",
                   help="also load pickled weights (pytorch_model.bin) when the model has no "
                        "safetensors; unpickling can run arbitrary code (off by default)")
    p.add_argument("--pad-with-eos", action="store_true",
                   help="set tokenizer.pad_token = eos_token when the tokenizer has none")
    p.add_argument("--trust-remote-code", action="store_true",
                   help="allow running code from the model repository (off by default)")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    p.set_defaults(func=_attribute)
