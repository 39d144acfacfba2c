"""MNIST recipe pieces: the per-setting LOO count and the GPU job for MNIST-MLP's LOO models."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

ROOT = Path(__file__).resolve().parents[1]


def _load(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


gpu_job = _load("mlp_loo_gpu", ROOT / "recipes" / "mnist" / "mlp_loo_gpu.py")
pipeline = _load("recipe_pipeline_mnist", ROOT / "recipes" / "pipeline.py")


def _job(folder: Path, n_train: int = 24, n_test: int = 5) -> Path:
    g = torch.Generator().manual_seed(0)
    sample = folder / "sample.safetensors"
    folder.mkdir()
    save_file({"x": torch.rand(n_train, 1, 28, 28, generator=g),
               "y": torch.randint(0, 10, (n_train,), generator=g),
               "xt": torch.rand(n_test, 1, 28, 28, generator=g),
               "yt": torch.randint(0, 10, (n_test,), generator=g)}, str(sample))
    recipe = dict(epochs=50, batch_size=8, lr=0.01, momentum=0.9, weight_decay=0.0,
                  optimizer="sgd", betas=[0.9, 0.999])
    (folder / "job.json").write_text(json.dumps({
        "setting": "mnist_mlp", "sample_sha256": gpu_job._sha256(sample),
        "data_fingerprint": "test", "recipe": recipe}))
    return folder


def test_gpu_job_targets_are_the_loo_models_margins(tmp_path):
    """The job's targets equal the margins of the same LOO models trained by retrain_loo."""
    from hf_attrib.benchmark.builders import build_model, classification_functions
    from hf_attrib.benchmark.settings import get_setting
    from hf_attrib.model_utils.retraining import evaluate_stacked, load_stacked, retrain_loo

    job = _job(tmp_path / "job")
    record = gpu_job.run(job, tmp_path / "out", "cpu", loo_examples=3, epochs=1, block_size=2)
    got = load_file(str(tmp_path / "out" / "mlp_loo_targets.safetensors"))
    assert record["models"] == 3 and got["loo"].shape == (3, 5) and got["full"].shape == (1, 5)
    assert got["left_out"].tolist() == [0, 1, 2]
    assert torch.isfinite(got["loo"]).all()
    # the same models through the benchmark's code, independently
    t = load_file(str(job / "sample.safetensors"))
    model = build_model(get_setting("mnist_mlp"))
    fns = classification_functions(model)
    retrain_loo(tmp_path / "gt", model, fns["train_loss"], t["x"], t["y"], indices=range(3),
                block_size=2, epochs=1, batch_size=8, lr=0.01, momentum=0.9, progress=False,
                example_loss_fn=fns["example_loss"])
    for kind, key in (("loo", "loo"), ("loo-full", "full")):
        params, _ = load_stacked(tmp_path / "gt", kind)
        expected = evaluate_stacked(model, params, t["xt"], t["yt"], fns["target"])
        torch.testing.assert_close(got[key], expected)


def test_gpu_job_refuses_a_changed_sample(tmp_path):
    job = _job(tmp_path / "job")
    info = json.loads((job / "job.json").read_text())
    (job / "job.json").write_text(json.dumps({**info, "sample_sha256": "0" * 64}))
    with pytest.raises(SystemExit, match="does not match the sha256"):
        gpu_job.run(job, tmp_path / "out", "cpu", loo_examples=1, epochs=1, block_size=1)


def test_loo_count_per_setting_overrides_the_recipe_wide_one(tmp_path):
    cfg = pipeline.load_config(ROOT / "recipes" / "mnist" / "config.toml")
    ctx = lambda name, c: pipeline.Context(  # noqa: E731
        cfg=c, setting_name=name, work=tmp_path, data_dir=None, device="cpu", endpoint=None,
        shard=None, block_size=None, progress=False, log_path=tmp_path / "log")
    by_setting = {**cfg, "loo_examples": None,
                  "loo_examples_by_setting": {"mnist_mlp": 500}}
    assert ctx("mnist_mlp", by_setting).loo_examples == 500
    assert ctx("mnist_lr", by_setting).loo_examples is None  # every example
    assert ctx("mnist_lr", {**by_setting, "loo_examples": 100}).loo_examples == 100
    assert ctx("mnist_mlp", {**by_setting, "smoke": True}).loo_examples == 20


def test_readme_tables_are_the_committed_results():
    """The MNIST tables of README.md and recipes/mnist/README.md (and the side-by-side file)
    are what ``paper_table.py --write`` makes of the committed results files."""
    tables = _load("mnist_paper_table", ROOT / "recipes" / "mnist" / "paper_table.py")
    for (name, marker), body in tables.sections(ROOT / "recipes" / "mnist" / "results").items():
        text = (ROOT / name).read_text()
        assert tables.replace_section(text, marker, body) == text, f"{name}: {marker}"
    side = (ROOT / "recipes" / "mnist" / "results" / "paper_side_by_side.md").read_text()
    assert tables.sections(ROOT / "recipes" / "mnist" / "results")[
        ("recipes/mnist/README.md", "side-by-side")] in side
