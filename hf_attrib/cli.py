"""The ``hf-attrib`` command.

    hf-attrib --version
    hf-attrib attribute --model ID_OR_DIR --task causal-lm --train DATASET --test DATASET
        --method trak [--layers last:2] [--out scores.safetensors] [--top-k 5]
    hf-attrib bench list
    hf-attrib bench ground-truth digits-lr --kind lds|loo [--models a:b] [--shard i/n]
    hf-attrib bench run digits-lr [--methods if-cg,trak-10] [--out DIR] [--device cpu] [--smoke]
                                  [--from-hub REPO_OR_DIR]
    hf-attrib hub export digits-lr --out DIR [--gt-dir DIR] [--smoke]
    hf-attrib hub push DIR --repo-id ORG/NAME [--repo-type dataset|model] [--large]
    hf-attrib hub pull digits-lr|ORG/NAME [--what data,ground-truth,checkpoints] [--models a:b]
    hf-attrib hub push-results RESULTS.json --repo-id ORG/NAME
    hf-attrib index build|push|pull|query ...   (see hf_attrib.index.cli)
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

__all__ = ["main"]


def _bench_list(_: argparse.Namespace) -> int:
    from hf_attrib.benchmark.settings import SETTINGS

    print(f"{'setting':28} {'metrics':12} {'train/test':11} description")
    for s in SETTINGS.values():
        print(f"{s.name.replace('_', '-'):28} {','.join(s.metrics):12} "
              f"{f'{s.n_train}/{s.n_test}':11} {s.description}"
              f"{' [offline]' if s.offline else ''}")
    return 0


def _bench_run(args: argparse.Namespace) -> int:
    from hf_attrib.benchmark.runner import (
        check_writable,
        ensemble_models_needed,
        results_markdown,
        run_benchmark,
    )
    from hf_attrib.benchmark.settings import get_setting

    setting = get_setting(args.setting)
    methods = [m.strip() for m in args.methods.split(",")] if args.methods else None
    out = args.out or f"bench-out/{setting.name}"
    check_writable(out, "--out")  # before any training, in the option's name
    pulled = None
    if args.from_hub is not None:
        from hf_attrib.hub.benchmark import pull_benchmark

        # Pull (or read) the repos here: the benchmark layer never talks to the Hub.
        pulled = pull_benchmark(args.from_hub, ensemble_models=ensemble_models_needed(
            setting, methods, smoke=args.smoke))
    results = run_benchmark(setting, methods=methods, out_dir=out, device=args.device,
                            smoke=args.smoke, data_dir=args.data_dir,
                            loo_examples=args.loo_examples, search=args.search,
                            progress=not args.no_progress, pulled=pulled)
    print(results_markdown(results))
    print(f"results written to {out}/results.json and {out}/results.md")
    return 0


def _bench_ground_truth(args: argparse.Namespace) -> int:
    from hf_attrib.benchmark.runner import build_ground_truth, check_writable, prepare
    from hf_attrib.benchmark.settings import get_setting
    from hf_attrib.distributed import parse_shard

    out = args.out or f"bench-out/{get_setting(args.setting).name}"
    check_writable(out, "--out")
    prep = prepare(args.setting, args.data_dir, smoke=args.smoke)
    if args.block_size:
        prep.block_size = args.block_size
    results = build_ground_truth(prep, f"{out}/ground_truth", args.kind, models=args.models,
                                 shard=parse_shard(args.shard),
                                 loo_examples=args.loo_examples, progress=not args.no_progress)
    for result in results.values() if isinstance(results, dict) else [results]:
        print(f"{result.kind}: trained blocks {result.trained}, already on disk "
              f"{result.skipped} ({result.directory})")
    return 0


def _hub_export(args: argparse.Namespace) -> int:
    from hf_attrib.benchmark.runner import check_writable
    from hf_attrib.benchmark.settings import get_setting
    from hf_attrib.hub import export

    name = get_setting(args.setting).name
    check_writable(args.out, "--out")
    gt_dir = args.gt_dir or f"bench-out/{name}/ground_truth"
    result = export(args.setting, args.out, gt_dir=gt_dir, smoke=args.smoke,
                    data_dir=args.data_dir, loo_examples=args.loo_examples,
                    shard_models=args.shard_models, org=args.org, progress=not args.no_progress)
    print(f"dataset repo folder:    {result.dataset_dir} (push to {result.dataset_repo_id})")
    print(f"checkpoint repo folder: {result.checkpoints_dir} "
          f"(push to {result.checkpoints_repo_id})")
    return 0


def _hub_push(args: argparse.Namespace) -> int:
    from pathlib import Path

    from hf_attrib.hub import push
    from hf_attrib.hub.layout import CHECKPOINTS_SUFFIX, check_folder

    folder = Path(args.folder)
    if (folder / "dataset").is_dir() and (folder / "checkpoints").is_dir():
        # Both checked before either is sent. The dataset repo names the checkpoints repo's
        # files, so readers refuse the mixed pair a stop between the pushes would leave.
        targets = [(folder / "checkpoints", args.repo_id + CHECKPOINTS_SUFFIX, "model"),
                   (folder / "dataset", args.repo_id, "dataset")]
        for path, _, _ in targets:
            check_folder(path)
    else:
        targets = [(folder, args.repo_id, args.repo_type)]
    for path, repo_id, repo_type in targets:
        ref = push(path, repo_id, repo_type, endpoint=args.endpoint, revision=args.revision,
                   private=args.private or None, large=args.large)
        print(f"pushed {path} to {repo_id} ({ref})")
    return 0


def _hub_pull(args: argparse.Namespace) -> int:
    from hf_attrib.hub import pull

    what = [w.strip() for w in args.what.split(",") if w.strip()]
    kinds = [k.strip() for k in args.kinds.split(",")] if args.kinds else None
    result = pull(args.source, what=what, models=args.models, kinds=kinds, out=args.out,
                  revision=args.revision, endpoint=args.endpoint, org=args.org)
    for label, path in (("dataset", result.dataset_dir), ("checkpoints", result.checkpoints_dir)):
        if path is not None:
            print(f"{label}: {path}")
    for repo, files in result.files.items():
        print(f"{repo}: {len(files)} file(s)")
    return 0


def _hub_push_results(args: argparse.Namespace) -> int:
    from hf_attrib.hub import push_results

    path = push_results(args.results, args.repo_id, repo_type=args.repo_type,
                        endpoint=args.endpoint)
    print(f"added {path} to {args.repo_id}; leaderboard README regenerated")
    return 0


def _add_hub(commands: argparse._SubParsersAction) -> None:
    from hf_attrib.hub.layout import DEFAULT_ORG, DEFAULT_RESULTS_REPO

    hub = commands.add_parser("hub", help="export, push and pull benchmark repos; push results")
    cmds = hub.add_subparsers(dest="hub_command", required=True, metavar="COMMAND",
                              help="what to do (`hf-attrib hub COMMAND --help` for its options)")
    endpoint = dict(help="Hub endpoint (default: HF_ENDPOINT or huggingface.co)")
    ex = cmds.add_parser("export", help="write a setting's dataset and checkpoint repo folders")
    ex.add_argument("setting", help="setting name, e.g. digits-lr (see `bench list`)")
    ex.add_argument("--out", required=True, help="writes OUT/dataset and OUT/checkpoints")
    ex.add_argument("--gt-dir", help="ground-truth build to export (default: "
                    "bench-out/SETTING/ground_truth; missing blocks are trained)")
    ex.add_argument("--smoke", action="store_true", help="tiny sizes (pipeline check)")
    ex.add_argument("--data-dir", help="local copy of the source data")
    ex.add_argument("--loo-examples", type=int, help="leave out only the first N examples")
    ex.add_argument("--shard-models", type=int, help="models per checkpoint shard")
    ex.add_argument("--org", default=DEFAULT_ORG, help="organisation named in the cards")
    ex.add_argument("--no-progress", action="store_true", help="no progress bars or progress lines")
    ex.set_defaults(func=_hub_export)
    pu = cmds.add_parser("push", help="upload an exported folder (create the repo if needed)")
    pu.add_argument("folder", help="OUT of `hub export` (pushes both repos) or one repo folder")
    pu.add_argument("--repo-id", required=True,
                    help="dataset repo id (the checkpoints go to REPO_ID-checkpoints)")
    pu.add_argument("--repo-type", choices=("dataset", "model"),
                    help="for a single repo folder (default: from its index)")
    pu.add_argument("--revision", help="branch to commit to (default main)")
    pu.add_argument("--private", action="store_true", help="create new repos private")
    pu.add_argument("--large", action="store_true",
                    help="resumable multi-commit upload (for very large checkpoint sets; "
                    "rerun the same push to continue an interrupted one)")
    pu.add_argument("--endpoint", **endpoint)
    pu.set_defaults(func=_hub_push)
    pl = cmds.add_parser("pull", help="download a setting's data, ground truth or checkpoints")
    pl.add_argument("source", help="setting name (repos under --org) or repo id")
    pl.add_argument("--what", default="data,ground-truth,checkpoints",
                    help="comma-separated: data, ground-truth, checkpoints")
    pl.add_argument("--models", help="checkpoints: only the shards holding model ids a:b")
    pl.add_argument("--kinds", help="checkpoint kinds (default all: full,lds,loo,noisy)")
    pl.add_argument("--out", help="download into OUT/dataset, OUT/checkpoints "
                    "(default: the Hugging Face cache)")
    pl.add_argument("--revision", help="branch, tag or commit")
    pl.add_argument("--org", default=DEFAULT_ORG,
                    help=f"organisation of a setting's repos (default {DEFAULT_ORG})")
    pl.add_argument("--endpoint", **endpoint)
    pl.set_defaults(func=_hub_pull)
    pr = cmds.add_parser("push-results", help="add a run to a results repo and its leaderboard")
    pr.add_argument("results", help="results.json written by `hf-attrib bench run`")
    pr.add_argument("--repo-id", default=DEFAULT_RESULTS_REPO,
                    help=f"results repo (default {DEFAULT_RESULTS_REPO})")
    pr.add_argument("--repo-type", choices=("model", "dataset"), default="model",
                    help="type of the results repo (default model)")
    pr.add_argument("--endpoint", **endpoint)
    pr.set_defaults(func=_hub_push_results)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``hf-attrib``."""
    from hf_attrib import __version__

    parser = argparse.ArgumentParser(
        prog="hf-attrib", description="Data attribution for PyTorch and Hugging Face models: "
        "attribute a model's predictions to its training examples, and run the benchmarks.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}",
                        help="print the hf-attrib version and exit")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND",
                                     help="what to do (`hf-attrib COMMAND --help` for its "
                                          "options)")
    bench = commands.add_parser("bench", help="benchmark settings, ground truth and runs")
    bench_cmds = bench.add_subparsers(dest="bench_command", required=True, metavar="COMMAND",
                                      help="what to do (`hf-attrib bench COMMAND --help` for "
                                           "its options)")
    bench_cmds.add_parser("list", help="list the benchmark settings").set_defaults(
        func=_bench_list)
    gt = bench_cmds.add_parser("ground-truth", help="train (or resume) ground-truth models")
    gt.add_argument("setting", help="setting name, e.g. digits-lr (see `bench list`)")
    gt.add_argument("--kind", choices=("lds", "loo"), default="lds",
                    help="lds: models on random subsets; loo: leave-one-out models "
                         "(default lds)")
    gt.add_argument("--models", help="model ids a:b (only the blocks covering them)")
    gt.add_argument("--shard", help="i/n: take every n-th block starting at block i")
    gt.add_argument("--out", help="output folder (default: bench-out/SETTING)")
    gt.add_argument("--data-dir", help="local copy of the source data")
    gt.add_argument("--loo-examples", type=int, help="leave out only the first N examples")
    gt.add_argument("--block-size", type=int,
                    help="models trained (and saved) together; default: fit ~64 MB")
    gt.add_argument("--smoke", action="store_true", help="tiny sizes (pipeline check)")
    gt.add_argument("--no-progress", action="store_true", help="no progress bars or progress lines")
    gt.set_defaults(func=_bench_ground_truth)
    run = bench_cmds.add_parser("run", help="build ground truth, run methods, print results")
    run.add_argument("setting", help="setting name, e.g. digits-lr (see `bench list`)")
    run.add_argument("--methods", help="comma-separated methods (default: all)")
    run.add_argument("--out", help="output folder (default: bench-out/SETTING)")
    run.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default cpu)")
    run.add_argument("--smoke", action="store_true", help="tiny sizes: checks the pipeline")
    run.add_argument("--data-dir", help="local copy of the source data")
    run.add_argument("--loo-examples", type=int, help="leave out only the first N examples")
    run.add_argument("--search", action="store_true",
                     help="hyperparameter search of the paper's Appendix C.1; best per metric")
    run.add_argument("--no-progress", action="store_true",
                     help="no progress bars or progress lines")
    run.add_argument("--from-hub", metavar="REPO_OR_DIR",
                     help="use pulled data, models and ground truth (a `hub pull --out` or "
                          "`hub export` folder, or a repo id to pull) instead of building them")
    run.set_defaults(func=_bench_run)
    _add_hub(commands)
    from hf_attrib.integrations.cli_attribute import add_attribute_parser

    add_attribute_parser(commands)
    from hf_attrib.index.cli import add_index_parser

    add_index_parser(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``hf-attrib`` console script."""
    from hf_attrib.hub.errors import HubError

    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (KeyError, ValueError, FileNotFoundError, NotImplementedError, HubError,
            PermissionError, NotADirectoryError) as err:
        message = err.args[0] if isinstance(err, KeyError) and err.args else err
        print(f"hf-attrib: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
