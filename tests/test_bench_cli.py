"""The ``hf-attrib bench`` command, run as a user runs it."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from hf_attrib.benchmark.data import build_data, flip_labels
from hf_attrib.benchmark.settings import SETTINGS, get_setting


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "hf_attrib.cli", *args], capture_output=True,
                          text=True, timeout=900)


def test_bench_list_names_every_setting():
    result = _cli("bench", "list")
    assert result.returncode == 0
    for name in SETTINGS:
        assert name.replace("_", "-") in result.stdout


def test_unknown_setting_and_method_are_clear_errors():
    result = _cli("bench", "run", "mnist-transformer")
    assert result.returncode == 2
    assert "unknown benchmark setting 'mnist-transformer'" in result.stderr
    assert "digits-lr" in result.stderr
    result = _cli("bench", "run", "digits-lr", "--methods", "if-magic")
    assert result.returncode == 2 and "unknown method(s) ['if-magic']" in result.stderr


def test_from_hub_pulls_the_lds_models_the_trak_ensembles_use():
    from hf_attrib.benchmark.runner import ensemble_models_needed

    assert ensemble_models_needed("digits-lr", ["if-cg", "grad-dot"]) == 0
    assert ensemble_models_needed("digits-lr", ["trak-10", "grad-dot"]) == 10
    assert ensemble_models_needed("digits-lr") == 50  # all methods: TRAK-50
    assert ensemble_models_needed("digits-lr", smoke=True) == 4  # half of the 8 smoke models
    with pytest.raises(KeyError, match=r"unknown method\(s\) \['if-magic'\]"):
        ensemble_models_needed("digits-lr", ["if-magic"])


def test_pulled_repos_of_another_setting_or_size_are_refused():
    from hf_attrib.benchmark.pulled import PulledBenchmark
    from hf_attrib.benchmark.settings import smoke_setting

    meta = {"setting": "digits_lr", "n_train": 120, "n_test": 12, "lds_models": 8,
            "smoke": True}
    pulled = PulledBenchmark(data=None, full=({}, {}), lds_models=({}, {}), ground_truth={},
                             noisy=None, loo_index=[], meta=meta, source="org/digits-lr")
    pulled.check(smoke_setting(get_setting("digits-lr")))  # fits
    with pytest.raises(ValueError, match="org/digits-lr holds setting 'digits_lr', not "
                                         "'digits_mlp'"):
        pulled.check(smoke_setting(get_setting("digits-mlp")))
    with pytest.raises(ValueError, match=r"exported for .*it is a smoke build: pass --smoke"):
        pulled.check(get_setting("digits-lr"))


def test_missing_data_path_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        build_data(get_setting("mnist-lr"), data_dir=tmp_path / "missing")


def test_digits_sample_is_seeded_and_noisy_labels_flip_ten_percent():
    setting = get_setting("digits-lr")
    a, b = build_data(setting), build_data(setting)
    assert a.train["label"][:] == b.train["label"][:]
    assert len(a.train) == setting.n_train and len(a.test) == setting.n_test
    assert len(a.noisy_indices) == setting.n_train // 10
    clean, noisy = a.train["label"][:], a.noisy_train["label"][:]
    changed = {i for i, (c, n) in enumerate(zip(clean, noisy)) if c != n}
    assert changed == set(a.noisy_indices.tolist())


def test_flip_labels_never_keeps_the_class():
    import torch

    labels = torch.arange(100) % 10
    noisy, flipped = flip_labels(labels, 0.3, 10, seed=1)
    assert len(flipped) == 30 and (noisy[flipped] != labels[flipped]).all()


@pytest.mark.slow
def test_bench_run_smoke_end_to_end(tmp_path):
    out = tmp_path / "run"
    result = _cli("bench", "run", "digits-lr", "--smoke", "--no-progress", "--out", str(out),
                  "--methods", "if-explicit,grad-dot,trak-10,rps")
    assert result.returncode == 0, result.stderr
    results = json.loads((out / "results.json").read_text())
    assert [r["method"] for r in results["methods"]] == ["if-explicit", "grad-dot", "trak-10",
                                                          "rps"]
    for row in results["methods"]:
        assert "error" not in row, row
        assert {"lds", "loo", "auc", "seconds", "peak_rss_mb"} <= row.keys()
    assert "| if-explicit |" in (out / "results.md").read_text()
    assert (out / "results.png").stat().st_size > 0
    # A second run reuses the ground truth on disk instead of retraining it.
    blocks = sorted((out / "ground_truth" / "lds").glob("*.safetensors"))
    mtimes = [p.stat().st_mtime_ns for p in blocks]
    assert _cli("bench", "run", "digits-lr", "--smoke", "--no-progress", "--out", str(out),
                "--methods", "grad-dot").returncode == 0
    assert [p.stat().st_mtime_ns for p in blocks] == mtimes


@pytest.mark.slow
def test_killed_ground_truth_build_resumes_to_the_same_result(tmp_path):
    """SIGKILL a build midway; the rerun trains only what is missing and ends identical."""
    import ast
    import signal
    import time

    import torch

    from hf_attrib.model_utils import load_stacked

    # LOO: 120 one-model blocks over ~0.8 s (the 8 LDS smoke models are written within ~30 ms,
    # too fast to kill reliably in between)
    args = ["bench", "ground-truth", "digits-lr", "--kind", "loo", "--smoke", "--no-progress",
            "--block-size", "1"]
    total = 120
    killed = tmp_path / "killed"
    blocks = killed / "ground_truth" / "loo"
    proc = subprocess.Popen([sys.executable, "-m", "hf_attrib.cli", *args, "--out", str(killed)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while len(list(blocks.glob("block-*.safetensors"))) < 2 and time.time() < deadline:
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = sorted(p.name for p in blocks.glob("block-*.safetensors"))
    assert 2 <= len(done) < total, done
    rerun = _cli(*args, "--out", str(killed))
    assert rerun.returncode == 0, rerun.stderr
    line = next(x for x in rerun.stdout.splitlines() if x.startswith("loo: trained blocks "))
    trained = line.split("trained blocks ")[1].split("]")[0] + "]"
    assert len(ast.literal_eval(trained)) == total - len(done)  # only the missing blocks
    reference = tmp_path / "reference"
    assert _cli(*args, "--out", str(reference)).returncode == 0
    got, _ = load_stacked(killed / "ground_truth", "loo")
    want, _ = load_stacked(reference / "ground_truth", "loo")
    assert got.keys() == want.keys()
    assert all(torch.equal(got[k], want[k]) for k in want)


@pytest.mark.slow
def test_ground_truth_of_another_training_set_size_is_refused(tmp_path):
    out = str(tmp_path / "gt")
    built = _cli("bench", "ground-truth", "digits-lr", "--kind", "lds", "--smoke",
                 "--no-progress", "--out", out)
    assert built.returncode == 0, built.stderr
    full = _cli("bench", "ground-truth", "digits-lr", "--kind", "lds", "--no-progress",
                "--out", out)
    assert full.returncode == 2
    assert "was built for 120 training examples but this setting has 1000" in full.stderr


def test_method_params_reach_the_attributor_and_are_recorded(tmp_path):
    """``run_benchmark(params=...)`` lays per-method values over the method's setting: a LiSSA
    scaling far below the Hessian's top eigenvalue makes the recursion diverge (so the value
    reached the attributor), and a sound one is recorded with the trial."""
    from hf_attrib.benchmark.runner import run_benchmark

    out = tmp_path / "run"
    bad = run_benchmark("digits-lr", methods=["if-lissa"], out_dir=out, smoke=True,
                        progress=False, params={"if-lissa": {"scaling": 1e-3}})
    assert "diverged" in bad["methods"][0]["error"]
    good = run_benchmark("digits-lr", methods=["if-lissa"], out_dir=out, smoke=True,
                         progress=False, params={"if-lissa": {"scaling": 50.0, "damping": 2e-5}})
    row = good["methods"][0]
    assert "error" not in row and row["params"]["scaling"] == 50.0
    assert row["params"]["damping"] == 2e-5 and row["params"]["recursion_depth"] == 10
    with pytest.raises(KeyError, match="if-magic"):
        run_benchmark("digits-lr", methods=["if-lissa"], out_dir=out, smoke=True,
                      progress=False, params={"if-magic": {"scaling": 1.0}})


def test_a_grid_point_scores_as_it_does_alone(tmp_path):
    """Each grid point's main attribution uses the full-data model, not the noisy-label model
    the previous point's AUC loaded into the shared model: LiSSA's second grid point (batch
    50, the default) gives the same LDS and LOO in the grid as alone (it did not: the grid's
    later points of every single-checkpoint method scored with the noisy model)."""
    from hf_attrib.benchmark.runner import SEARCH, run_benchmark

    assert SEARCH["if-lissa"][1]["batch_size"] == 50
    out = tmp_path / "run"
    grid = run_benchmark("digits-lr", methods=["if-lissa"], out_dir=out, smoke=True,
                         progress=False, search=True)["methods"][0]["trials"]
    alone = run_benchmark("digits-lr", methods=["if-lissa"], out_dir=out, smoke=True,
                          progress=False)["methods"][0]["trials"]
    assert grid[1]["params"] == alone[0]["params"]
    for metric in ("lds", "loo", "auc"):
        assert grid[1][metric] == alone[0][metric], metric
    # every finished setting was logged as it finished (a grid stopped halfway keeps them)
    logged = [json.loads(line) for line in (out / "trials.jsonl").read_text().splitlines()]
    assert [t["params"] for t in logged] == [t["params"] for t in grid + alone]
    assert [t["lds"] for t in logged] == [t["lds"] for t in grid + alone]


def test_auc_can_be_skipped(tmp_path):
    """``run_benchmark(auc=False)``: no noisy-label model, no AUC, and the results say so."""
    from hf_attrib.benchmark.runner import run_benchmark

    results = run_benchmark("digits-lr", methods=["grad-dot"], out_dir=tmp_path / "run",
                            smoke=True, progress=False, auc=False)
    row = results["methods"][0]
    assert "auc" not in row and row["auc_skipped"] and results["auc_skipped"]
    assert "lds" in row and "loo" in row and "auc" not in row["trials"][0]


def test_each_metric_reports_its_own_best_setting():
    """A metric's best may come from another setting than LDS's: the row names each (the
    tables printed LDS's setting beside LOO's and AUC's values); a NaN never wins."""
    from hf_attrib.benchmark.report import settings_text
    from hf_attrib.benchmark.runner import best_of_trials

    nan = float("nan")
    trials = [
        {"params": {"r": 1}, "lds": nan, "loo": 0.2, "auc": 0.9, "seconds": 1.0,
         "peak_rss_mb": 10.0},
        {"params": {"r": 2}, "lds": 0.5, "loo": 0.4, "auc": 0.8, "seconds": 2.0,
         "peak_rss_mb": 20.0},
        {"params": {"r": 3}, "lds": 0.3, "loo": 0.1, "auc": 0.95, "seconds": 3.0,
         "peak_rss_mb": 30.0},
        {"params": {"r": 4}, "error": "MemoryError: no"},
    ]
    row = best_of_trials(trials)
    assert (row["lds"], row["lds_params"], row["params"], row["seconds"]) == (0.5, {"r": 2},
                                                                             {"r": 2}, 2.0)
    assert (row["loo"], row["loo_params"]) == (0.4, {"r": 2})
    assert (row["auc"], row["auc_params"]) == (0.95, {"r": 3})
    assert settings_text(row) == "r=2 (AUC: r=3)"
    first_nan = best_of_trials([trials[0], trials[2]])
    assert first_nan["params"] == {"r": 3} and first_nan["lds"] == 0.3


def test_a_failing_auc_keeps_the_settings_lds_and_loo(tmp_path, monkeypatch):
    """The noisy-label self-influence failing (a singular Hessian, memory) lost the whole
    setting before: its LDS and LOO, already computed, were dropped with it."""
    from hf_attrib.benchmark import runner

    def fail(*args, **kwargs):
        raise RuntimeError("noisy model went wrong")

    monkeypatch.setattr(runner, "mislabel_detection_auc", fail)
    row = runner.run_benchmark("digits-lr", methods=["grad-dot"], out_dir=tmp_path / "run",
                               smoke=True, progress=False)["methods"][0]
    assert "error" not in row and "lds" in row and "loo" in row and "auc" not in row
    assert row["auc_error"] == "RuntimeError: noisy model went wrong"
