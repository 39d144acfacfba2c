#!/usr/bin/env python
"""One resumable, shardable pipeline behind every benchmark recipe.

    python recipes/pipeline.py --config recipes/mnist/config.toml [--profile full|offline|smoke]
        [--smoke] [--stage data,train,...] [--setting mnist_lr] [--shard i/n|auto]
        [--work DIR] [--data-dir DIR] [--device cpu|cuda|auto] [--endpoint URL]

Stages, run in this order for every setting of the recipe (``--stage`` picks some):

``data``          build the seeded benchmark sample from the source data and write it as
                  parquet (``WORK/SETTING/data/``); synthetic image folders in smoke mode for
                  CIFAR (no offline copy exists).
``train``         the checkpoint sets that are the ground truth: 100 LDS subset models and,
                  where LOO applies, one model per left-out example plus the full-data model
                  (``WORK/SETTING/ground_truth/``, one safetensors file per block, written
                  atomically; a rerun trains only missing blocks). ``--shard i/n`` takes every
                  n-th block; after all shards, one run without ``--shard`` checks that every
                  block is there (and trains any that is not) and marks the stage done.
``ground-truth``  targets of every ground-truth model on the test set, the full-data (and
                  noisy-label) model, and the dataset + checkpoint repo folders in the Hub
                  layout of ``docs/hub.md`` (``WORK/SETTING/export/``).
``attribute``     every method of the config on the exported benchmark, over the Appendix C.1
                  grid when ``search`` is on (``WORK/SETTING/attribute/METHOD/``; a finished
                  method is never rerun). ``--shard i/n`` takes every n-th method.
``evaluate``      merges the methods into ``WORK/SETTING/results/results.{json,md,png}``
                  (the best value of each metric over the grid and the setting that reached
                  the best LDS, as the paper reports).
``push``          the dataset repo, the checkpoint repo and the results run to the Hub
                  (``--endpoint`` or ``HF_ENDPOINT``; token from ``HF_TOKEN``). Without a
                  token, in offline mode or with no Hub reachable it is skipped with a note
                  (``push skipped: ...``) and not marked done, so an offline run succeeds and a
                  later ``--stage push`` uploads.

A finished stage writes ``WORK/SETTING/stages/STAGE.done`` (JSON: seconds, details) through a
temporary file and a rename; a rerun skips it, unless it is outdated (an ``attribute`` stage
that did not cover a method the config now names, an ``evaluate`` stage older than its
``attribute`` stage: see ``outdated``). Every start, skip and finish is appended to
``WORK/pipeline.log`` (JSON lines). ``--shard auto`` takes the shard from the ``RANK`` and
``WORLD_SIZE`` variables ``accelerate launch`` (or ``torchrun``) sets.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tomllib

STAGES = ("data", "train", "ground-truth", "attribute", "evaluate", "push")
SHARDABLE = ("train", "attribute")
PROFILES = ("full", "offline", "smoke")


# --------------------------------------------------------------------------------------------
# Config
# --------------------------------------------------------------------------------------------
def load_config(path: str | Path, profile: str = "full") -> dict[str, Any]:
    """The config file's top-level keys with ``[profiles.PROFILE]`` merged over them."""
    with open(path, "rb") as f:
        raw = tomllib.load(f)
    profiles = raw.pop("profiles", {})
    if profile not in profiles and profile != "full":
        raise SystemExit(f"{path}: no [profiles.{profile}] table (have: "
                         f"{', '.join(sorted(profiles)) or 'none'}).")
    cfg = {**raw, **profiles.get(profile, {})}
    cfg["profile"] = profile
    cfg.setdefault("stages", list(STAGES))
    cfg.setdefault("search", True)
    cfg.setdefault("smoke", profile == "smoke")
    cfg.setdefault("org", "hf-attrib")
    cfg.setdefault("results_repo", f"{cfg['org']}/attribution-results")
    missing = [k for k in ("name", "settings", "methods") if k not in cfg]
    if missing:
        raise SystemExit(f"{path}: missing key(s) {missing}.")
    unknown = [s for s in cfg["stages"] if s not in STAGES]
    if unknown:
        raise SystemExit(f"{path}: unknown stage(s) {unknown}; stages: {', '.join(STAGES)}.")
    return cfg


# --------------------------------------------------------------------------------------------
# Markers and log
# --------------------------------------------------------------------------------------------
def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` via a temporary file in the same folder and a rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=1, default=str))


@dataclass
class Context:
    """One setting of one recipe run."""

    cfg: dict[str, Any]
    setting_name: str
    work: Path
    data_dir: str | None
    device: str
    endpoint: str | None
    shard: tuple[int, int] | None
    block_size: int | None
    progress: bool
    log_path: Path
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def smoke(self) -> bool:
        return bool(self.cfg["smoke"])

    @property
    def root(self) -> Path:
        return self.work / self.setting_name

    def marker(self, stage: str, shard: tuple[int, int] | None = None) -> Path:
        suffix = "" if shard is None else f".shard-{shard[0]}-of-{shard[1]}"
        return self.root / "stages" / f"{stage}{suffix}.done"

    def done(self, stage: str) -> dict[str, Any] | None:
        path = self.marker(stage)
        return json.loads(path.read_text()) if path.is_file() else None

    def log(self, stage: str, event: str, **extra: Any) -> None:
        entry = {"time": time.time(), "pid": os.getpid(), "recipe": self.cfg["name"],
                 "setting": self.setting_name, "stage": stage, "event": event,
                 "shard": None if self.shard is None else list(self.shard), **extra}
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "a") as f:
            f.write(json.dumps(entry, default=str) + "\n")
        detail = {k: v for k, v in extra.items() if k in ("seconds", "trained", "skipped",
                                                          "method", "repo", "why")}
        print(f"[{self.cfg['name']}/{self.setting_name}] {stage}: {event}"
              f"{' ' + json.dumps(detail, default=str) if detail else ''}", flush=True)

    @property
    def loo_examples(self) -> int | None:
        """LOO models to build: ``[loo_examples_by_setting] SETTING = n`` in the config, else the
        recipe-wide ``loo_examples``, else every training example (20 at most in smoke runs)."""
        per_setting = self.cfg.get("loo_examples_by_setting", {}).get(self.setting_name)
        count = per_setting or self.cfg.get("loo_examples")
        if self.smoke:
            return min(count or 20, 20)
        return count

    def source_dir(self) -> str | None:
        """The source data folder: ``--data-dir``, or synthetic images (``synthetic_images``
        in the config: CIFAR smoke runs, which have no offline copy)."""
        if self.data_dir is not None:
            return self.data_dir
        spec = self.cfg.get("synthetic_images", {}).get(self.setting_name)
        if spec is None:
            return None
        folder = self.root / "source"
        if not (folder / "data" / "train-00000-of-00001.parquet").is_file():
            synthetic_image_folder(folder, tuple(spec["shape"]), spec["column"],
                                   list(spec["labels"]), int(spec.get("n", 200)))
        return str(folder)

    def prepare(self) -> Any:
        from hf_attrib.benchmark.runner import prepare

        prep = prepare(self.setting_name, self.source_dir(), smoke=self.smoke,
                       cache_dir=self.root / "cache")
        if self.block_size:
            prep.block_size = self.block_size
        return prep


def synthetic_image_folder(root: Path, shape: tuple[int, ...], column: str,
                           labels: list[int], n: int = 200) -> Path:
    """Random images in the Hub's parquet layout (``data/train-00000-of-00001.parquet``),
    read by the settings' real loading code (``datasets.load_dataset`` on a folder)."""
    import datasets
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 255, shape, dtype=np.uint8)) for _ in range(n)]
    ys = [labels[i % len(labels)] for i in range(n)]
    ds = datasets.Dataset.from_dict({column: images, "label": ys}).cast_column(
        column, datasets.Image())
    tmp = root.with_name(f".{root.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "data").mkdir(parents=True)
    ds.to_parquet(str(tmp / "data" / "train-00000-of-00001.parquet"))
    shutil.rmtree(root, ignore_errors=True)
    os.replace(tmp, root)
    return root


# --------------------------------------------------------------------------------------------
# Stages
# --------------------------------------------------------------------------------------------
class StageError(RuntimeError):
    """A stage cannot run (a prerequisite is missing); the message says what to run."""


class StageSkipped(Exception):
    """A stage that cannot run here and is not needed by the others (``push`` offline): the run
    goes on, the stage is not marked done, and the message says how to run it later."""


def _require(ctx: Context, stage: str, before: str) -> None:
    if ctx.done(before) is None:
        raise StageError(f"{ctx.setting_name}: stage {stage!r} needs stage {before!r} done "
                         f"first (no {ctx.marker(before)}); run `--stage {before}`.")


def _share_cache(ctx: Context, folder: Path) -> None:
    """Point ``folder/cache`` (where the runner and ``export`` cache built data, e.g. MAESTRO
    windows) at the setting's one cache, so that no stage rebuilds what another built."""
    folder.mkdir(parents=True, exist_ok=True)
    cache = folder / "cache"
    if not cache.exists() and not cache.is_symlink():
        (ctx.root / "cache").mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(FileExistsError):  # another shard made it first
            cache.symlink_to((ctx.root / "cache").resolve(), target_is_directory=True)


def stage_data(ctx: Context) -> dict[str, Any]:
    from hf_attrib.hub.export import split_from_tensors
    from hf_attrib.hub.layout import file_entry

    prep = ctx.prepare()
    s = prep.setting
    splits = {"train": prep.data.train if s.kind == "classification"
              else split_from_tensors(prep.x, prep.y, s.kind)}
    if s.kind == "classification":
        splits["test"] = prep.data.test
    else:  # generative settings: the test set is generated by the full model (ground-truth)
        splits["holdout"] = prep.data.test
    if prep.data.noisy_train is not None:
        splits["noisy_train"] = prep.data.noisy_train
    out = ctx.root / "data"
    out.mkdir(parents=True, exist_ok=True)
    files = {}
    for name, split in splits.items():
        path = out / f"{name}.parquet"
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        split.to_parquet(str(tmp))
        os.replace(tmp, path)
        files[path.name] = file_entry(path)
    return {"n_train": s.n_train, "n_test": s.n_test, "files": files,
            "source": ctx.source_dir() or "default (offline stand-in or Hub)"}


def stage_train(ctx: Context) -> dict[str, Any]:
    from hf_attrib.benchmark.runner import build_ground_truth

    _require(ctx, "train", "data")
    prep = ctx.prepare()
    if ctx.device != "cpu":
        prep.model.to(ctx.device)
    kinds = (["loo"] if "loo" in prep.setting.metrics else []) + ["lds"]
    info: dict[str, Any] = {"block_size": prep.block_size}
    for kind in kinds:
        result = build_ground_truth(prep, ctx.root / "ground_truth", kind, shard=ctx.shard,
                                    loo_examples=ctx.loo_examples, progress=ctx.progress)
        for r in result.values() if isinstance(result, dict) else [result]:
            info[r.kind] = {"trained": list(r.trained), "skipped": list(r.skipped)}
            ctx.log("train", f"blocks-{r.kind}", trained=len(r.trained),
                    skipped=len(r.skipped))
    return info


def stage_ground_truth(ctx: Context) -> dict[str, Any]:
    from hf_attrib.hub.export import export

    _require(ctx, "ground-truth", "train")
    _share_cache(ctx, ctx.root / "export")
    result = export(ctx.setting_name, ctx.root / "export", gt_dir=ctx.root / "ground_truth",
                    smoke=ctx.smoke, data_dir=ctx.source_dir(), loo_examples=ctx.loo_examples,
                    shard_models=ctx.cfg.get("shard_models"), org=ctx.cfg["org"],
                    progress=ctx.progress, block_size=ctx.done("train")["block_size"],
                    device=ctx.device)
    return {"dataset_dir": str(result.dataset_dir), "checkpoints_dir": str(result.checkpoints_dir)}


def _methods(ctx: Context) -> list[str]:
    from hf_attrib.benchmark.settings import get_setting

    # ``[methods_by_setting] SETTING = [...]`` narrows a setting to the methods its hardware
    # budget allows (the README says which were left out and why).
    methods = list(ctx.cfg.get("methods_by_setting", {}).get(ctx.setting_name)
                   or ctx.cfg["methods"])
    if get_setting(ctx.setting_name).kind == "generation":
        methods = [m for m in methods if m != "rps"]  # RPS needs a classification head
    return methods


def searched(cfg: dict[str, Any], setting: str, method: str) -> bool:
    """Whether ``method`` runs over its Appendix C.1 grid: ``search`` on and the method not in
    ``[no_search] SETTING = [...]`` (methods whose grid costs too much at that scale run at the
    benchmark's defaults, the best of the grid on the digits stand-in)."""
    return bool(cfg["search"]) and method not in cfg.get("no_search", {}).get(setting, [])


def method_params(cfg: dict[str, Any], setting: str, method: str
                  ) -> dict[str, dict[str, Any]]:
    """``[params_by_setting.SETTING] METHOD = {...}``: hyperparameters laid over every setting
    ``method`` runs on ``setting`` (e.g. LiSSA's ``scaling`` where the model's curvature is
    steeper than the digits-tuned default allows), as ``run_benchmark(params=...)`` takes them."""
    values = cfg.get("params_by_setting", {}).get(setting, {}).get(method)
    return {method: dict(values)} if values else {}


def stage_attribute(ctx: Context) -> dict[str, Any]:
    from hf_attrib.benchmark.runner import ensemble_models_needed, run_benchmark
    from hf_attrib.hub.benchmark import pull_benchmark

    _require(ctx, "attribute", "ground-truth")
    methods = _methods(ctx)
    mine = methods if ctx.shard is None else methods[ctx.shard[0]::ctx.shard[1]]
    ran, skipped = [], []
    for method in mine:
        out = ctx.root / "attribute" / method
        marker = out / "method.done"
        if marker.is_file():
            skipped.append(method)
            ctx.log("attribute", "skip", method=method, why="done")
            continue
        _share_cache(ctx, out)
        ctx.log("attribute", "start", method=method)
        start = time.perf_counter()
        # The exported repos (stage ground-truth) instead of a ground-truth build.
        pulled = pull_benchmark(ctx.root / "export", ensemble_models=ensemble_models_needed(
            ctx.setting_name, [method], smoke=ctx.smoke))
        results = run_benchmark(ctx.setting_name, methods=[method], out_dir=out,
                                device=ctx.device, smoke=ctx.smoke, data_dir=ctx.source_dir(),
                                search=searched(ctx.cfg, ctx.setting_name, method),
                                progress=ctx.progress, pulled=pulled,
                                params=method_params(ctx.cfg, ctx.setting_name, method),
                                auc=method not in ctx.cfg.get("no_auc", {}).get(
                                    ctx.setting_name, []))
        seconds = time.perf_counter() - start
        atomic_write_json(marker, {"seconds": seconds, "row": results["methods"][0]})
        ctx.log("attribute", "method-done", method=method, seconds=round(seconds, 2))
        ran.append(method)
    missing = [m for m in methods if not (ctx.root / "attribute" / m / "method.done").is_file()]
    return {"ran": ran, "skipped": skipped, "missing": missing}


def stage_evaluate(ctx: Context) -> dict[str, Any]:
    from hf_attrib import __version__
    from hf_attrib.benchmark.report import results_chart, results_markdown
    from hf_attrib.benchmark.runner import best_of_trials

    _require(ctx, "evaluate", "attribute")
    rows, first = [], None
    for method in _methods(ctx):
        path = ctx.root / "attribute" / method / "results.json"
        results = json.loads(path.read_text())
        first = first or results
        row = results["methods"][0]
        # each metric's best setting, also for attribute results of an older runner
        row.update({k: v for k, v in best_of_trials(row.get("trials", [])).items()
                    if k.endswith("_params")})
        row["attribute_seconds_total"] = sum(t.get("seconds", 0.0) for t in row.get("trials", []))
        row["searched"] = bool(results.get("search"))
        rows.append(row)
    results = {**{k: first[k] for k in ("setting", "smoke", "search", "n_train", "n_test",
                                         "loo_examples", "device", "ground_truth_source")
                  if k in first},
               "hf_attrib_version": __version__, "recipe": ctx.cfg["name"],
               "profile": ctx.cfg["profile"], "methods": rows,
               "stage_seconds": {k: v.get("seconds") for k, v in
                                 ((s, ctx.done(s)) for s in STAGES) if v}}
    out = ctx.root / "results"
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "results.json", results)
    atomic_write_text(out / "results.md", results_markdown(results))
    results_chart(results, out / "results.png")
    return {"results": str(out / "results.json"),
            "best": {r["method"]: {m: r.get(m) for m in ("lds", "loo", "auc", "params")}
                     for r in rows}}


def push_blocker(endpoint: str | None, timeout: float = 10.0) -> str | None:
    """Why nothing can be pushed from here (offline mode, no token, no Hub), or ``None``.

    Args:
        endpoint: ``--endpoint`` (default: ``HF_ENDPOINT`` or huggingface.co).
        timeout: seconds to wait for the Hub to answer.
    """
    from huggingface_hub import constants, get_token

    if constants.HF_HUB_OFFLINE:
        return "HF_HUB_OFFLINE is set"
    if get_token() is None:
        return "no Hub token (set HF_TOKEN or run `hf auth login`)"
    url = endpoint or constants.ENDPOINT
    try:
        urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=timeout)
    except urllib.error.HTTPError:
        return None  # the server answered (any status): it is there
    except (urllib.error.URLError, OSError, ValueError) as err:
        reason = getattr(err, "reason", None) or err
        return f"cannot reach the Hub at {url} ({reason}); pass --endpoint or set HF_ENDPOINT"
    return None


def stage_push(ctx: Context) -> dict[str, Any]:
    from hf_attrib.hub.layout import check_folder, checkpoints_repo_id, dataset_repo_id
    from hf_attrib.hub.transfer import push, push_results

    _require(ctx, "push", "evaluate")
    blocker = push_blocker(ctx.endpoint)
    if blocker is not None:
        raise StageSkipped(f"push skipped: {blocker}. The results are in "
                           f"{ctx.root / 'results'}; to upload them later, rerun with "
                           f"`--stage push` where the Hub is reachable.")
    org = ctx.cfg["org"]
    for repo in ("checkpoints", "dataset"):  # both whole before either is sent
        check_folder(ctx.root / "export" / repo)
    # The dataset repo names its checkpoints repo's files, so readers refuse the mixed pair a
    # stop between the two pushes leaves (until this stage is run again).
    steps = [("checkpoints", lambda: push(ctx.root / "export" / "checkpoints",
                                          checkpoints_repo_id(ctx.setting_name, org), "model",
                                          endpoint=ctx.endpoint)),
             ("dataset", lambda: push(ctx.root / "export" / "dataset",
                                      dataset_repo_id(ctx.setting_name, org), "dataset",
                                      endpoint=ctx.endpoint)),
             ("results", lambda: push_results(ctx.root / "results" / "results.json",
                                              ctx.cfg["results_repo"], endpoint=ctx.endpoint))]
    info: dict[str, Any] = {"endpoint": ctx.endpoint or os.environ.get("HF_ENDPOINT")}
    for name, step in steps:
        marker = ctx.marker(f"push-{name}")
        if marker.is_file():  # never add the same results run twice
            info[name] = json.loads(marker.read_text())["ref"]
            ctx.log("push", "skip", repo=name, why="done")
            continue
        ref = str(step())
        atomic_write_json(marker, {"ref": ref})
        ctx.log("push", "pushed", repo=name)
        info[name] = ref
    return info


STAGE_FUNCS: dict[str, Callable[[Context], dict[str, Any]]] = {
    "data": stage_data, "train": stage_train, "ground-truth": stage_ground_truth,
    "attribute": stage_attribute, "evaluate": stage_evaluate, "push": stage_push,
}


def outdated(ctx: Context, stage: str) -> str | None:
    """Why a finished stage must run again, or None: an ``attribute`` stage that did not cover a
    method the config now names (the rerun skips the finished methods), an ``evaluate`` stage
    older than the ``attribute`` stage it read. Sharded markers are never outdated."""
    done = ctx.done(stage)
    if done is None:
        return None
    if stage == "attribute":
        covered = set(done.get("ran", [])) | set(done.get("skipped", []))
        added = [m for m in _methods(ctx) if m not in covered]
        return f"methods {added} added since it finished" if added else None
    if stage == "evaluate":
        attribute = ctx.done("attribute")
        if attribute and attribute.get("finished", 0) > done.get("finished", 0):
            return "the attribute stage finished after it"
    return None


def run_stage(ctx: Context, stage: str) -> None:
    marker = ctx.marker(stage, ctx.shard)
    if marker.is_file() or ctx.marker(stage).is_file():
        why = outdated(ctx, stage) if ctx.marker(stage).is_file() else None
        if why is None:
            ctx.log(stage, "skip", why="done")
            return
        ctx.log(stage, "redo", why=why)
    ctx.log(stage, "start")
    start = time.perf_counter()
    try:
        info = STAGE_FUNCS[stage](ctx)
    except StageSkipped as note:  # no marker: a later run does the stage
        ctx.log(stage, "skip", why=str(note))
        print(f"pipeline: {note}", file=sys.stderr, flush=True)
        return
    seconds = time.perf_counter() - start
    if stage == "attribute" and ctx.shard is None and info["missing"]:
        raise StageError(f"methods {info['missing']} did not finish")
    atomic_write_json(marker, {"stage": stage, "seconds": seconds, "finished": time.time(),
                               "shard": ctx.shard, "device": ctx.device,
                               "profile": ctx.cfg["profile"], **info})
    ctx.log(stage, "done", seconds=round(seconds, 2))


# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------
def _parse_shard(text: str | None) -> tuple[int, int] | None:
    from hf_attrib.distributed import parse_shard

    try:
        return parse_shard(text, allow_auto=True)
    except ValueError as err:
        raise SystemExit(str(err)) from None


def _device(text: str) -> str:
    if text != "auto":
        return text
    import torch

    if torch.cuda.is_available():
        return f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
    return "cpu"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="recipes/<name>/config.toml")
    p.add_argument("--profile", choices=PROFILES, help="config profile (default full)")
    p.add_argument("--smoke", action="store_true", help="same as --profile smoke")
    p.add_argument("--stage", help=f"comma-separated stages (default: the config's; "
                   f"{', '.join(STAGES)})")
    p.add_argument("--setting", help="comma-separated settings of the recipe (default: all)")
    p.add_argument("--shard", help="i/n or auto (RANK/WORLD_SIZE): for train and attribute")
    p.add_argument("--work", help="work folder (default: the config's work_dir)")
    p.add_argument("--data-dir", help="local copy of the source data")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto")
    p.add_argument("--endpoint", help="Hub endpoint for push (default: HF_ENDPOINT)")
    p.add_argument("--block-size", type=int, help="ground-truth models trained and saved "
                   "together (default: as many as fit ~64 MB)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    profile = "smoke" if args.smoke else (args.profile or "full")
    cfg = load_config(args.config, profile)
    stages = ([s.strip() for s in args.stage.split(",")] if args.stage else cfg["stages"])
    bad = [s for s in stages if s not in STAGES]
    if bad:
        raise SystemExit(f"unknown stage(s) {bad}; stages: {', '.join(STAGES)}.")
    stages = [s for s in STAGES if s in stages]  # always in pipeline order
    shard = _parse_shard(args.shard)
    if shard is not None and any(s not in SHARDABLE for s in stages):
        raise SystemExit(f"--shard applies to the stages {', '.join(SHARDABLE)} only; pass "
                         f"--stage train or --stage attribute (got {', '.join(stages)}).")
    if args.no_progress:
        import datasets

        datasets.disable_progress_bars()
    settings = cfg["settings"]
    if args.setting:
        wanted = [s.strip().replace("-", "_") for s in args.setting.split(",")]
        unknown = [s for s in wanted if s not in settings]
        if unknown:
            raise SystemExit(f"setting(s) {unknown} are not in this recipe's {profile} "
                             f"profile: {', '.join(settings)}.")
        settings = wanted
    work = Path(args.work or cfg.get("work_dir", f"recipe-out/{cfg['name']}")) / profile
    for name in settings:
        ctx = Context(cfg=cfg, setting_name=name, work=work, data_dir=args.data_dir,
                      device=_device(args.device), endpoint=args.endpoint, shard=shard,
                      block_size=args.block_size, progress=not args.no_progress,
                      log_path=work / "pipeline.log")
        for stage in stages:
            try:
                run_stage(ctx, stage)
            except StageError as err:
                ctx.log(stage, "error", why=str(err))
                print(f"pipeline: error: {err}", file=sys.stderr)
                return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
