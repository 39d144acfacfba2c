"""hf_attrib.hub against a local Hub (olah for reads + tests/hub_server.py for writes)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
from huggingface_hub import DatasetCard, HfApi, ModelCard

from hf_attrib.hub import (
    HubAuthError,
    HubIntegrityError,
    HubNotFoundError,
    export,
    load_benchmark,
    pull,
    push,
    push_results,
)
from hf_attrib.hub.layout import INDEX_FILE, sha256_file

TOKEN = "hf_local_test_token_4242"


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A smoke export of digits-lr: 8 LDS models in 4 shards of 2, 20 LOO models."""
    out = tmp_path_factory.mktemp("export")
    return out, export("digits-lr", out, smoke=True, shard_models=2)


@pytest.fixture(scope="module")
def pushed(local_hub, exported):
    """The export pushed to org/digits-lr and org/digits-lr-checkpoints."""
    _, result = exported
    push(result.dataset_dir, "org/digits-lr", endpoint=local_hub.endpoint, token=TOKEN)
    push(result.checkpoints_dir, "org/digits-lr-checkpoints", endpoint=local_hub.endpoint,
         token=TOKEN)
    return local_hub


@pytest.fixture
def hub_env(local_hub, monkeypatch, tmp_path):
    monkeypatch.setenv("HF_ENDPOINT", local_hub.endpoint)
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    return local_hub


def _cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "hf_attrib.cli", *args], capture_output=True,
                          text=True, timeout=600, env={**os.environ, **(env or {})})


# ---------------------------------------------------------------------------------- layout
def test_export_layout_and_cards_parse_back(exported):
    out, result = exported
    ds, ck = result.dataset_dir, result.checkpoints_dir
    for name in ("data/train-00000-of-00001.parquet", "data/test-00000-of-00001.parquet",
                 "data/noisy_train-00000-of-00001.parquet", "ground_truth/lds.safetensors",
                 "ground_truth/loo.safetensors", "ground_truth/noisy_labels.safetensors",
                 INDEX_FILE, "README.md"):
        assert (ds / name).is_file(), name
    index = json.loads((ck / INDEX_FILE).read_text())
    assert [s["file"] for s in index["kinds"]["lds"]["shards"]] == [
        f"lds/shard-0000{i}-of-00004.safetensors" for i in range(4)]
    # Model 5 is found through the shards' [start, stop) ranges; the per-model "model_map"
    # (one JSON entry per model: 5,100 for MNIST-LR) is no longer written (issue 13).
    assert [s["file"] for s in index["kinds"]["lds"]["shards"]
            if s["start"] <= 5 < s["stop"]] == ["lds/shard-00002-of-00004.safetensors"]
    assert all("model_map" not in kind for kind in index["kinds"].values())
    assert index["kinds"]["loo"]["num_models"] == 20
    assert index["kinds"]["loo"]["left_out"] == list(range(20))  # one id per LOO model
    assert {"config.json", "model.safetensors"} <= {p.name for p in ck.iterdir()}
    for name, entry in index["files"].items():  # every file hashed
        assert sha256_file(ck / name) == entry["sha256"]
    assert not list(out.rglob("*.bin")) and not list(out.rglob("*.pt")) \
        and not list(out.rglob("*.pkl"))

    card = DatasetCard.load(ds / "README.md")
    assert card.data.license == "bsd-3-clause"
    assert card.data.task_categories == ["image-classification"]
    assert {"data-attribution", "smoke-test"} <= set(card.data.tags)
    assert card.data.configs[0]["data_files"][0] == {"split": "train",
                                                      "path": "data/train-*.parquet"}
    assert "@inproceedings{deng2024dattri" in card.text
    assert "hf-attrib hub export digits-lr" in card.text  # how to regenerate
    model_card = ModelCard.load(ck / "README.md")
    assert model_card.data.license == "bsd-3-clause"
    assert model_card.data.datasets == ["hf-attrib/digits-lr"]
    assert "SGD lr 0.01" in model_card.text and "seed 0" in model_card.text


def test_lds_subsets_are_bit_packed_and_read_back(exported, tmp_path):
    """ground_truth/lds.safetensors stores the LDS masks bit-packed (uint8 [M, ceil(n/8)]);
    read_ground_truth returns the bool masks of the build, also from a /1 export (bool
    ``masks``), and the index hash of the file is still checked."""
    from safetensors.torch import load_file, save_file

    from hf_attrib.hub import read_ground_truth
    from hf_attrib.hub.layout import file_entry
    from hf_attrib.model_utils.block_store import load_subsets

    out, result = exported
    masks, _ = load_subsets(out / "ground_truth", "lds")
    stored = load_file(result.dataset_dir / "ground_truth" / "lds.safetensors")
    assert "masks" not in stored and stored["masks_packed"].dtype == torch.uint8
    assert stored["masks_packed"].shape == (8, 15)  # 120 smoke examples / 8 bits
    assert torch.equal(read_ground_truth(result.dataset_dir).lds_masks, masks)
    old = tmp_path / "dataset"
    shutil.copytree(result.dataset_dir, old)
    path = old / "ground_truth" / "lds.safetensors"
    del stored["masks_packed"]
    save_file({**stored, "masks": masks}, str(path))
    index = json.loads((old / INDEX_FILE).read_text())
    index["files"]["ground_truth/lds.safetensors"] = file_entry(path)
    (old / INDEX_FILE).write_text(json.dumps(index))
    assert torch.equal(read_ground_truth(old).lds_masks, masks)
    raw = bytearray(path.read_bytes())
    raw[-1] ^= 0x01  # the hash check stays
    path.write_bytes(bytes(raw))
    with pytest.raises(HubIntegrityError, match=r"lds\.safetensors .*does not match the sha256"):
        read_ground_truth(old)


def test_full_data_model_loads_with_from_pretrained(exported):
    from hf_attrib.benchmark.models import LogisticRegressionModel

    _, result = exported
    model = LogisticRegressionModel.from_pretrained(result.checkpoints_dir)
    bench = load_benchmark("digits-lr", result.dataset_dir.parent)
    assert torch.equal(model.classifier.weight, bench.model.classifier.weight)
    assert bench.checkpoints["lds"][2].tolist() == list(range(8))
    values, masks = bench.ground_truth.lds()
    assert values.shape == (4, 12) and masks.shape == (4, 120)


# ---------------------------------------------------------------------------------- round trip
def test_round_trip_push_pull_bench_run_gives_the_same_lds(pushed, exported, tmp_path):
    from hf_attrib.benchmark.runner import run_benchmark

    out, _ = exported
    methods = "if-explicit,grad-dot,trak-10"  # trak-10 -> LDS models 0-3 in smoke
    local = run_benchmark("digits-lr", methods=methods.split(","), out_dir=out, smoke=True,
                          progress=False)  # reuses the ground truth the export built
    env = {"HF_ENDPOINT": pushed.endpoint, "HF_TOKEN": TOKEN,
           "HF_HOME": str(tmp_path / "hf_home")}
    run = _cli("bench", "run", "digits-lr", "--smoke", "--no-progress", "--methods", methods,
               "--out", str(tmp_path / "run"), "--from-hub", "org/digits-lr", env=env)
    assert run.returncode == 0, run.stderr
    remote = json.loads((tmp_path / "run" / "results.json").read_text())
    assert remote["ground_truth_source"] == "org/digits-lr"
    assert not (tmp_path / "run" / "ground_truth").exists()  # nothing was built
    for a, b in zip(local["methods"], remote["methods"], strict=True):
        assert "error" not in a and "error" not in b
        for metric in ("lds", "loo", "auc"):  # the same numbers, not just close ones
            assert isinstance(a[metric], float) and a[metric] == b[metric], (a["method"], metric)
            assert a[f"{metric}_ci"] == b[f"{metric}_ci"]  # and the same intervals
    # the same sample, named by the export's index and by both runs
    index = json.loads((out / "dataset" / "hf_attrib_index.json").read_text())
    assert local["data_fingerprint"] == remote["data_fingerprint"] == index["data_fingerprint"]
    # The dataset repo is a real datasets repo served through olah (a fresh process: the
    # clients read HF_ENDPOINT at import time).
    code = ("import datasets; d = datasets.load_dataset('org/digits-lr'); "
            "print(sorted(d), len(d['train']))")
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=300, env={**os.environ, **env})
    assert loaded.returncode == 0, loaded.stderr
    assert loaded.stdout.split("\n")[-2] == "['noisy_train', 'test', 'train'] 120"


def test_pushing_the_same_folder_again_makes_no_commit(pushed, exported):
    _, result = exported
    before = pushed.head("dataset", "org/digits-lr")
    push(result.dataset_dir, "org/digits-lr", endpoint=pushed.endpoint, token=TOKEN)
    assert pushed.head("dataset", "org/digits-lr") == before


@pytest.mark.slow  # a second export (~10 s)
def test_re_export_is_byte_identical_and_its_push_makes_no_commit(pushed, exported, tmp_path):
    out, first = exported
    again = export("digits-lr", tmp_path / "again", gt_dir=out / "ground_truth", smoke=True,
                   shard_models=2)
    for a, b in ((first.dataset_dir, again.dataset_dir),
                 (first.checkpoints_dir, again.checkpoints_dir)):
        names = sorted(p.relative_to(a).as_posix() for p in a.rglob("*") if p.is_file())
        assert names == sorted(p.relative_to(b).as_posix() for p in b.rglob("*") if p.is_file())
        for name in names:
            assert sha256_file(a / name) == sha256_file(b / name), name
    commits = pushed.commits
    heads = (pushed.head("dataset", "org/digits-lr"),
             pushed.head("model", "org/digits-lr-checkpoints"))
    push(again.dataset_dir, "org/digits-lr", endpoint=pushed.endpoint, token=TOKEN)
    push(again.checkpoints_dir, "org/digits-lr-checkpoints", endpoint=pushed.endpoint,
         token=TOKEN)
    assert pushed.commits == commits
    assert heads == (pushed.head("dataset", "org/digits-lr"),
                     pushed.head("model", "org/digits-lr-checkpoints"))


def test_dataset_and_checkpoints_of_two_exports_are_refused(exported, tmp_path):
    """A dataset repo beside the checkpoints repo of another export (a push or pull stopped
    between the two): the ground truth would score models it was not computed from."""
    from hf_attrib.hub.benchmark import pull_benchmark

    out, first = exported
    other = export("digits-lr", tmp_path / "other", gt_dir=out / "ground_truth", smoke=True,
                   shard_models=4)
    mixed = tmp_path / "mixed"
    shutil.copytree(first.dataset_dir, mixed / "dataset")
    shutil.copytree(other.checkpoints_dir, mixed / "checkpoints")
    with pytest.raises(HubIntegrityError, match="not of one export"):
        load_benchmark("digits-lr", mixed)
    with pytest.raises(HubIntegrityError, match="not of one export"):
        pull_benchmark(mixed)
    assert load_benchmark("digits-lr", tmp_path / "other").ground_truth is not None


def test_a_failed_export_leaves_the_previous_one_whole(exported, tmp_path, monkeypatch):
    import importlib

    export_module = importlib.import_module("hf_attrib.hub.export")  # the package's export()
    out, _ = exported                                                 # shadows the attribute
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    before = {p.relative_to(copy).as_posix(): sha256_file(p)
              for p in sorted(copy.rglob("*")) if p.is_file()}

    def fail(*args, **kwargs):
        raise RuntimeError("stopped while writing the cards")

    monkeypatch.setattr(export_module, "checkpoints_card", fail)
    with pytest.raises(RuntimeError, match="stopped"):
        export("digits-lr", copy, smoke=True, shard_models=4)
    kept = {p.relative_to(copy).as_posix(): sha256_file(p)
            for p in sorted(copy.rglob("*")) if p.is_file() and not p.relative_to(
                copy).parts[0].startswith(".")}
    assert kept == before
    monkeypatch.undo()
    export("digits-lr", copy, smoke=True, shard_models=4)
    assert not list(copy.glob(".*.partial-*"))  # the stopped export's staging is cleared
    assert load_benchmark("digits-lr", copy).checkpoints


def test_partial_pull_fetches_only_the_shards_holding_the_models(pushed, exported, tmp_path):
    _, result = exported
    pushed.requests.clear()
    got = pull("org/digits-lr", what=("checkpoints",), kinds=("lds",), models="0:4",
               out=tmp_path / "p", endpoint=pushed.endpoint)
    files = sorted(p.relative_to(got.checkpoints_dir).as_posix()
                   for p in got.checkpoints_dir.rglob("*") if p.is_file()
                   and ".cache" not in p.parts)
    assert files == ["README.md", "config.json", INDEX_FILE,
                     "lds/shard-00000-of-00004.safetensors",
                     "lds/shard-00001-of-00004.safetensors"]
    shard_gets = sorted(path.split("/resolve/")[1].split("/", 1)[1]  # after the revision
                        for method, path, _ in pushed.requests
                        if method == "GET" and "/resolve/" in path and "/lds/" in path)
    assert shard_gets == ["lds/shard-00000-of-00004.safetensors",
                          "lds/shard-00001-of-00004.safetensors"]
    for name in files:  # the same bytes as exported
        assert (got.checkpoints_dir / name).read_bytes() == (
            result.checkpoints_dir / name).read_bytes()
    assert got.dataset_dir is None
    from hf_attrib.hub import read_checkpoints

    params, _, ids = read_checkpoints(got.checkpoints_dir, "lds", "1:3")
    assert ids.tolist() == [1, 2] and params["classifier.weight"].shape[0] == 2
    with pytest.raises(HubNotFoundError, match=r"lds/shard-00002-of-00004.*--models 4:6"):
        read_checkpoints(got.checkpoints_dir, "lds", "4:6")


def test_a_model_range_beyond_a_smaller_kind_pulls_the_kinds_that_hold_it(pushed, tmp_path):
    """8 LDS and 20 LOO models: --models 10:12 without --kinds pulls LOO shard 5 (and no LDS
    shard) instead of failing on the LDS kind; a range no kind holds is still an error."""
    got = pull("org/digits-lr", what=("checkpoints",), models="10:12", out=tmp_path / "p",
               endpoint=pushed.endpoint)
    shards = sorted(p.relative_to(got.checkpoints_dir).as_posix()
                    for p in got.checkpoints_dir.rglob("shard-*") if ".cache" not in p.parts)
    assert shards == ["loo/shard-00005-of-00010.safetensors"]
    with pytest.raises(ValueError, match=r"models 30:40 outside every kind of stacked "
                                         r"models \(8 lds, 20 loo\)"):
        pull("org/digits-lr", what=("checkpoints",), models="30:40", out=tmp_path / "q",
             endpoint=pushed.endpoint)


# ---------------------------------------------------------------------------------- results
def _results(method: str, lds: float) -> dict:
    return {"setting": "digits_lr", "smoke": True, "methods": [
        {"method": method, "lds": lds, "loo": 0.5, "auc": 0.6, "seconds": 1.0}]}


def test_result_pushes_all_survive_also_concurrent(hub_env, monkeypatch):
    import hf_attrib.hub.cards as cards

    repo = "org/results-a"
    first = push_results(_results("grad-dot", 0.11), repo, endpoint=hub_env.endpoint)
    second = push_results(_results("grad-dot", 0.12), repo, endpoint=hub_env.endpoint)
    assert first != second

    # Two at once: both read the same head before either commits (a barrier in the card
    # rendering), so one commit is refused with 412 and must retry on the new head.
    barrier = threading.Barrier(2, timeout=60)
    render = cards.results_card
    calls = []

    def racing_card(runs, repo_id):
        calls.append(len(runs))
        if len(calls) <= 2:
            barrier.wait()
        return render(runs, repo_id)

    monkeypatch.setattr(cards, "results_card", racing_card)
    commits_before = hub_env.commits
    posted_before = sum(1 for m, p, _ in hub_env.requests if m == "POST" and "/commit/" in p)
    paths, errors = [], []

    def worker(method, value):
        try:
            paths.append(push_results(_results(method, value), repo, endpoint=hub_env.endpoint))
        except Exception as err:  # surfaced below
            errors.append(err)

    threads = [threading.Thread(target=worker, args=(m, v))
               for m, v in (("trak-10", 0.3), ("if-cg", 0.2))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
    posted = sum(1 for m, p, _ in hub_env.requests if m == "POST" and "/commit/" in p)
    assert hub_env.commits - commits_before == 2
    assert posted - posted_before == 3  # one refused, retried
    files = HfApi(endpoint=hub_env.endpoint).list_repo_files(repo)
    runs = sorted(f for f in files if f.startswith("runs/"))
    assert runs == sorted([first, second, *paths]) and len(runs) == 4
    assert all(r.startswith("runs/digits-lr/") for r in runs)
    from huggingface_hub import hf_hub_download

    readme = ModelCard.load(hf_hub_download(repo, "README.md", endpoint=hub_env.endpoint,
                                            cache_dir=hub_env.root / "readme-cache"))
    for run in runs:
        assert Path(run).stem in readme.text
    assert "| trak-10 | 0.3000 |" in readme.text and "| if-cg | 0.2000 |" in readme.text
    lds = sorted(r.metric_value for r in readme.data.eval_results if r.metric_type == "lds")
    assert lds == [0.11, 0.12, 0.2, 0.3]


def test_push_results_cli(hub_env, tmp_path):
    path = tmp_path / "results.json"
    path.write_text(json.dumps(_results("rps", 0.05)))
    done = _cli("hub", "push-results", str(path), "--repo-id", "org/results-b")
    assert done.returncode == 0, done.stderr
    assert "added runs/digits-lr/" in done.stdout and TOKEN not in done.stdout + done.stderr


# ---------------------------------------------------------------------------------- integrity
def _blob(cache: Path, name: str) -> Path:
    link = next(cache.rglob(f"snapshots/*/{name}"))
    return link.resolve()


def test_interrupted_download_resumes(pushed, tmp_path, monkeypatch):
    """The connection drops after half of a shard; the client resumes with a Range request
    from the bytes it has (huggingface_hub 2.4 resumes within the call; it no longer reuses a
    stale ``.incomplete`` file of another process) and the file ends complete and verified.
    Its read chunk (10 MB) is shrunk to 1 KB so that a small shard is read in several."""
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "DOWNLOAD_CHUNK_SIZE", 1024)
    name = "lds/shard-00000-of-00004.safetensors"
    pushed.requests.clear()
    pushed.interrupt.add(name)
    got = pull("org/digits-lr", what=("checkpoints",), kinds=("lds",), models="0:2",
               out=tmp_path / "p", endpoint=pushed.endpoint)
    data = (got.checkpoints_dir / name).read_bytes()
    assert sha256_file(got.checkpoints_dir / name) == json.loads(
        (got.checkpoints_dir / INDEX_FILE).read_text())["files"][name]["sha256"]
    ranges = [r for m, p, r in pushed.requests if m == "GET" and p.endswith(name)]
    assert not pushed.interrupt  # the cut happened
    have = (len(data) // 2) // 1024 * 1024  # whole chunks received before the cut
    assert have > 0 and ranges == [None, f"bytes={have}-"]  # resumed, not restarted


def test_corrupted_shard_is_refetched(pushed, tmp_path):
    cache = tmp_path / "cache"
    name = "lds/shard-00001-of-00004.safetensors"
    pull("org/digits-lr", what=("checkpoints",), kinds=("lds",), models="2:4",
         cache_dir=cache, endpoint=pushed.endpoint)
    blob = _blob(cache, name)
    good = blob.read_bytes()
    bad = bytearray(good)
    bad[-5] ^= 0xFF  # same size, one flipped byte in the tensor data
    blob.write_bytes(bytes(bad))
    got = pull("org/digits-lr", what=("checkpoints",), kinds=("lds",), models="2:4",
               cache_dir=cache, endpoint=pushed.endpoint)
    assert (got.checkpoints_dir / name).read_bytes() == good


def test_corrupted_shard_on_the_hub_is_a_clear_error(local_hub, exported, tmp_path):
    from huggingface_hub import CommitOperationAdd

    _, result = exported
    push(result.checkpoints_dir, "org/broken-checkpoints", endpoint=local_hub.endpoint,
         token=TOKEN)
    name = "lds/shard-00003-of-00004.safetensors"
    bad = bytearray((result.checkpoints_dir / name).read_bytes())
    bad[-5] ^= 0xFF
    HfApi(endpoint=local_hub.endpoint, token=TOKEN).create_commit(
        "org/broken-checkpoints", [CommitOperationAdd(name, bytes(bad))], commit_message="bad")
    with pytest.raises(HubIntegrityError, match=r"lds/shard-00003-of-00004\.safetensors is "
                                                r"corrupted"):
        pull("org/broken-checkpoints", what=("checkpoints",), kinds=("lds",), models="6:8",
             cache_dir=tmp_path / "cache", endpoint=local_hub.endpoint)


# ---------------------------------------------------------------------------------- errors
def test_missing_repo_file_revision_are_clear_errors(pushed, tmp_path):
    kw = dict(endpoint=pushed.endpoint, cache_dir=tmp_path / "cache")
    with pytest.raises(HubNotFoundError, match=r"dataset repo org/nothing not found.*"
                                               r"HF_ENDPOINT"):
        pull("org/nothing", what=("data",), **kw)
    with pytest.raises(HubNotFoundError, match=r"revision 'v9' not found in the dataset repo "
                                               r"org/digits-lr"):
        pull("org/digits-lr", what=("ground-truth",), revision="v9", **kw)
    # A repo that exists but is not an hf-attrib checkpoint repo: its index is missing.
    HfApi(endpoint=pushed.endpoint, token=TOKEN).create_repo("org/plain-checkpoints")
    with pytest.raises(HubNotFoundError, match=rf"file '{INDEX_FILE}' not found in the model "
                                               r"repo org/plain-checkpoints"):
        pull("org/plain", what=("checkpoints",), **kw)
    result = _cli("hub", "pull", "org/nothing", "--what", "data", "--endpoint", pushed.endpoint,
                  env={"HF_HOME": str(tmp_path / "home")})
    assert result.returncode == 2 and "dataset repo org/nothing not found" in result.stderr


def test_push_without_token_is_a_clear_error(local_hub, exported, monkeypatch, tmp_path):
    _, result = exported
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "empty_home"))
    with pytest.raises(HubAuthError, match=r"no Hugging Face token.*hf auth login.*HF_TOKEN"):
        push(result.dataset_dir, "org/tokenless", endpoint=local_hub.endpoint)
    with pytest.raises(HubAuthError):
        push_results(_results("grad-dot", 0.1), "org/tokenless", endpoint=local_hub.endpoint)
    assert not local_hub.repo_path("dataset", "org/tokenless").exists()
    env = {k: v for k, v in os.environ.items() if k not in ("HF_TOKEN",
                                                            "HUGGING_FACE_HUB_TOKEN")}
    done = subprocess.run([sys.executable, "-m", "hf_attrib.cli", "hub", "push",
                           str(result.dataset_dir), "--repo-id", "org/tokenless",
                           "--endpoint", local_hub.endpoint], capture_output=True, text=True,
                          env=env, timeout=300)
    assert done.returncode == 2 and "no Hugging Face token" in done.stderr


def test_token_is_never_printed(local_hub, exported, tmp_path):
    _, result = exported
    done = _cli("hub", "push", str(result.dataset_dir.parent), "--repo-id", "org/cli-push",
                "--endpoint", local_hub.endpoint,
                env={"HF_TOKEN": TOKEN, "HF_HOME": str(tmp_path / "home")})
    assert done.returncode == 0, done.stderr
    assert "pushed" in done.stdout and TOKEN not in done.stdout + done.stderr
    assert local_hub.repo_path("model", "org/cli-push-checkpoints").exists()


# ---------------------------------------------------------------------------------- packaging
_RENDER = """
import json, sys
import hf_attrib.hub.cards as cards
from hf_attrib.benchmark.settings import get_setting
cards.TEMPLATES = cards.Path("/nonexistent/hub_cards")  # no source-tree fallback
s = get_setting("digits-lr")
index = {"dataset_repo_id": "org/digits-lr", "checkpoints_repo_id": "org/digits-lr-checkpoints",
         "smoke": False, "kinds": {"lds": {"num_models": 100, "shards": [{}] * 10}}}
run = {"setting": "digits_lr", "methods": [{"method": "grad-dot", "lds": 0.25}]}
print(json.dumps({"module": cards.__file__,
                  "dataset": str(cards.dataset_card(s, index, ["train", "test"])),
                  "checkpoints": str(cards.checkpoints_card(s, index)),
                  "results": str(cards.results_card([("runs/x.json", run)], "org/res"))}))
"""


def _check_rendered(out: dict) -> None:
    assert "license: bsd-3-clause" in out["dataset"] and "@inproceedings" in out["dataset"]
    assert "hf-attrib hub export digits-lr" in out["dataset"]
    assert "100 LDS subset models in 10 shard(s)" in out["checkpoints"]
    assert "| grad-dot | 0.2500 |" in out["results"]


def test_card_templates_are_package_data_not_source_tree_files(monkeypatch):
    import importlib.resources

    import hf_attrib.hub.cards as cards

    root = Path(__file__).resolve().parents[1] / "hub_cards"
    packaged = importlib.resources.files("hf_attrib.hub") / "templates"
    names = sorted(p.name for p in root.glob("*.md"))
    assert names == ["checkpoints_card.md", "dataset_card.md", "index_card.md", "results_card.md"]
    for name in names:  # the packaged templates are hub_cards/'s
        assert (packaged / name).read_text() == (root / name).read_text()
    monkeypatch.setattr(cards, "TEMPLATES", Path("/nonexistent/hub_cards"))
    done = subprocess.run([sys.executable, "-c", _RENDER], capture_output=True, text=True,
                          timeout=300, cwd="/")
    assert done.returncode == 0, done.stderr
    _check_rendered(json.loads(done.stdout.splitlines()[-1]))


def test_cards_render_from_an_installed_wheel(tmp_path):
    """Build a wheel of this checkout, install it away from the source tree and render all
    three cards there: the templates must travel inside the wheel."""
    import shutil
    import zipfile

    pytest.importorskip("setuptools")
    root = Path(__file__).resolve().parents[1]
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(root / name, src / name)
    ignore = shutil.ignore_patterns("__pycache__", "*.egg-info")
    shutil.copytree(root / "hf_attrib", src / "hf_attrib", symlinks=True, ignore=ignore)
    shutil.copytree(root / "hub_cards", src / "hub_cards")
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    built = subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-w",
                            str(tmp_path / "wheel"), str(src)], capture_output=True, text=True,
                           timeout=300)
    assert built.returncode == 0, built.stderr
    wheel = next((tmp_path / "wheel").glob("hf_attrib-*.whl"))
    with zipfile.ZipFile(wheel) as z:
        listed = {i.filename: i for i in z.infolist()}
        for name in ("checkpoints_card.md", "dataset_card.md", "results_card.md"):
            info = listed[f"hf_attrib/hub/templates/{name}"]
            assert z.read(info).decode() == (root / "hub_cards" / name).read_text()
        assert not any(n.startswith("hub_cards/") for n in listed)
    target = tmp_path / "site"
    installed = subprocess.run([*pip, "install", "--no-deps", "--target", str(target),
                                str(wheel)], capture_output=True, text=True, timeout=300)
    assert installed.returncode == 0, installed.stderr
    assert (target / "hf_attrib" / "hub" / "templates" / "dataset_card.md").is_file()
    done = subprocess.run([sys.executable, "-c", _RENDER], capture_output=True, text=True,
                          timeout=300, cwd=tmp_path,
                          env={**os.environ, "PYTHONPATH": str(target)})
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout.splitlines()[-1])
    assert out["module"].startswith(str(target))  # the installed copy, not this checkout
    _check_rendered(out)


def test_bench_run_from_a_pulled_benchmark_never_reads_the_source_data(exported, tmp_path,
                                                                      monkeypatch):
    """`bench run --from-hub` brings its own sample: for MNIST the user need not reach
    ylecun/mnist at all. The source builder is made to fail; the run still succeeds, on the
    pulled sample."""
    import hf_attrib.benchmark.runner as runner
    from hf_attrib.hub.benchmark import pull_benchmark

    out, _ = exported
    pulled = pull_benchmark(out, ensemble_models=0)

    def no_source(*args, **kwargs):
        raise AssertionError("the source data was read")

    monkeypatch.setattr(runner, "build_data", no_source)
    results = runner.run_benchmark("digits-lr", methods=["grad-dot"], out_dir=tmp_path / "run",
                                   smoke=True, progress=False, pulled=pulled)
    assert "error" not in results["methods"][0]
    index = json.loads((out / "dataset" / "hf_attrib_index.json").read_text())
    assert results["data_fingerprint"] == index["data_fingerprint"]
