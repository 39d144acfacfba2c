"""``hf-attrib attribute`` run as a user runs it, on a tiny saved model and saved datasets."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from integrations_helpers import char_tokenizer, text_datasets, tiny_bert, tiny_gpt2
from launchers import launch_two
from safetensors import safe_open

DUPS = (2, 5, 9)


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "hf_attrib.cli", *args], capture_output=True,
                          text=True, timeout=300)


def _main(capsys, *args: str) -> subprocess.CompletedProcess:
    """In-process ``hf-attrib`` (same entry point; saves the interpreter start-up)."""
    from hf_attrib.cli import main

    code = main(list(args))
    captured = capsys.readouterr()
    return subprocess.CompletedProcess(args, code, captured.out, captured.err)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    tok = char_tokenizer()
    gpt2 = tiny_gpt2()
    gpt2.save_pretrained(root / "gpt2")
    tok.save_pretrained(root / "gpt2")
    bert = tiny_bert()
    bert.save_pretrained(root / "bert")
    tok.save_pretrained(root / "bert")
    train, test = text_datasets(duplicates=DUPS)
    train.save_to_disk(str(root / "train"))
    with open(root / "test.jsonl", "w") as f:
        for text in test["text"]:
            f.write(json.dumps({"text": text}) + "\n")
    ltrain, ltest = text_datasets(duplicates=DUPS, labels=True, seed=1)
    ltrain.to_csv(str(root / "ltrain.csv"))
    ltest.to_parquet(str(root / "ltest.parquet"))
    return root, train, test, ltrain


def test_attribute_causal_lm_writes_scores_and_report(saved):
    root, train, _, _ = saved
    out = root / "scores.safetensors"
    result = _cli("attribute", "--model", str(root / "gpt2"), "--task", "causal-lm",
                  "--train", str(root / "train"), "--test", str(root / "test.jsonl"),
                  "--method", "grad-cos", "--layers", "last:1", "--out", str(out),
                  "--top-k", "2", "--batch-size", "4", "--no-progress")
    assert result.returncode == 0, result.stderr
    with safe_open(str(out), "pt") as f:
        scores = f.get_tensor("scores")
        meta = f.metadata()
    assert scores.shape == (12, 3)
    assert meta["n_train"] == "12" and meta["n_test"] == "3" and meta["method"] == "grad-cos"
    assert scores.argmax(0).tolist() == list(DUPS)
    stdout = result.stdout
    # per test example: its text, then the duplicate as the most helpful training example
    for j, i in enumerate(DUPS):
        block = stdout.split(f"test #{j} ")[1]
        helpful = block.split("most helpful:")[1].split("most harmful:")[0]
        first = helpful.strip().splitlines()[0]
        assert f"#{i} {train[i]['text']!r}" in first
        assert f"{float(scores[i, j]):+.4e}" in first
        harmful = block.split("most harmful:")[1].strip().splitlines()[0]
        lowest = int(scores[:, j].argmin())
        assert f"#{lowest} " in harmful
    assert f"wrote {out}" in stdout


def test_attribute_classifier_trak_from_csv_and_parquet(saved, capsys):
    root, _, _, ltrain = saved
    out = root / "cls.safetensors"
    result = _main(capsys, "attribute", "--model", str(root / "bert"), "--task",
                  "sequence-classification", "--train", str(root / "ltrain.csv"),
                  "--test", str(root / "ltest.parquet"), "--method", "trak",
                  "--proj-dim", "64", "--regularization", "0", "--layers", "last:1",
                  "--out", str(out), "--no-progress")
    assert result.returncode == 0, result.stderr
    with safe_open(str(out), "pt") as f:
        scores = f.get_tensor("scores")
    assert scores.argmax(0).tolist() == list(DUPS)
    assert len(ltrain) == scores.shape[0]


def test_attribute_block_cg_equals_explicit(saved, capsys):
    """``--method if-cg --block-cg`` reaches the explicit-Hessian scores, and with 2 iterations
    gives other scores than plain CG with 2 (the flag reaches the solver)."""
    root = saved[0]
    # c_proj of the last block: 4,128 parameters, lowest Hessian eigenvalue -1.03, so
    # regularization 1.5 makes H + lambda I positive definite (block CG's domain)
    common = ["attribute", "--model", str(root / "gpt2"), "--task", "causal-lm",
              "--train", str(root / "train"), "--test", str(root / "test.jsonl"),
              "--layers", "transformer.h.1.mlp.c_proj", "--regularization", "1.5",
              "--batch-size", "6", "--no-progress"]
    scores = {}
    for name, extra in (("explicit", ["--method", "if-explicit"]),
                        ("block", ["--method", "if-cg", "--block-cg", "--max-iter", "100"]),
                        ("block2", ["--method", "if-cg", "--block-cg", "--max-iter", "2"]),
                        ("plain2", ["--method", "if-cg", "--max-iter", "2"])):
        out = root / f"{name}.safetensors"
        result = _main(capsys, *common, *extra, "--out", str(out))
        assert result.returncode == 0, result.stderr
        with safe_open(str(out), "pt") as f:
            scores[name] = f.get_tensor("scores")
    ref = scores["explicit"]
    tol = dict(rtol=1e-3, atol=1e-3 * float(ref.abs().max()))
    torch.testing.assert_close(scores["block"], ref, **tol)
    assert not torch.allclose(scores["block2"], scores["plain2"], **tol)
    bad = root / "bad.safetensors"
    result = _main(capsys, *common, "--method", "trak", "--block-cg", "--out", str(bad))
    assert result.returncode == 2
    assert "--block-cg applies to --method if-cg only (got --method trak)" in result.stderr
    assert not bad.exists()


def test_attribute_errors_are_clear(saved, capsys):
    root = saved[0]
    common = ["--train", str(root / "train"), "--test", str(root / "test.jsonl")]
    result = _main(capsys, "attribute", "--model", str(root / "bert"), "--task", "causal-lm",
                   *common)
    assert result.returncode == 2
    assert "task='sequence-classification'" in result.stderr
    result = _main(capsys, "attribute", "--model", str(root / "gpt2"), "--task", "causal-lm",
                   "--layers", "transformer.h.9", *common)
    assert result.returncode == 2 and "unknown layer name 'transformer.h.9'" in result.stderr
    result = _main(capsys, "attribute", "--model", str(root / "gpt2"), "--task", "causal-lm",
                   "--train", str(root / "missing"), "--test", str(root / "test.jsonl"))
    assert result.returncode == 2 and "does not exist" in result.stderr


def test_report_shows_indices_for_images():
    from datasets import Dataset

    from hf_attrib.integrations.cli_attribute import report

    images = Dataset.from_dict({"pixel_values": [[0.0]] * 3, "label": [0, 1, 0]})
    text = report(torch.tensor([[0.5], [-1.0], [2.0]]), images, images.select([0]), top_k=1)
    lines = text.splitlines()
    assert "test #0" in text
    helpful = lines[lines.index("  most helpful:") + 1]
    harmful = lines[lines.index("  most harmful:") + 1]
    assert helpful.strip() == "+2.0000e+00  #2"
    assert harmful.strip() == "-1.0000e+00  #1"


@pytest.mark.slow
def test_attribute_under_torchrun_matches_one_process(saved):
    """``torchrun --nproc_per_node 2 -m hf_attrib.cli attribute ...`` shares the gradients
    between two gloo processes and writes the same scores as one process."""
    root = saved[0]
    common = ["attribute", "--model", str(root / "gpt2"), "--task", "causal-lm",
              "--train", str(root / "train"), "--test", str(root / "test.jsonl"),
              "--method", "if-cg", "--layers", "last:1", "--batch-size", "3",
              "--regularization", "0.1", "--max-iter", "5", "--no-progress"]
    one = _cli(*common, "--out", str(root / "one.safetensors"))
    assert one.returncode == 0, one.stderr
    two = launch_two("torchrun", ["-m", "hf_attrib.cli", *common,
                                  "--out", str(root / "two.safetensors")])
    assert two.stdout.count("wrote ") == 1  # only the main process reports
    with safe_open(str(root / "one.safetensors"), "pt") as f:
        ref = f.get_tensor("scores")
    with safe_open(str(root / "two.safetensors"), "pt") as f:
        got = f.get_tensor("scores")
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5 * float(ref.abs().max()))


@pytest.mark.parametrize("method", ["trak", "rps", "if-cg"])
def test_cli_and_python_defaults_give_the_same_scores(saved, capsys, method):
    """``hf-attrib attribute --method M`` without method options scores exactly as
    ``task.attributor(M)`` without options (one set of defaults: METHOD_DEFAULTS)."""
    from hf_attrib.integrations.cli_attribute import load_any_dataset
    from hf_attrib.integrations.transformers import task_from_pretrained

    root = saved[0]
    out = root / f"defaults-{method}.safetensors"
    result = _main(capsys, "attribute", "--model", str(root / "bert"), "--task",
                   "sequence-classification", "--train", str(root / "ltrain.csv"),
                   "--test", str(root / "ltest.parquet"), "--method", method,
                   "--layers", "classifier", "--out", str(out), "--no-progress")
    assert result.returncode == 0, result.stderr
    with safe_open(str(out), "pt") as f:
        cli = f.get_tensor("scores")
    # --layers is a task option (the same on both sides); "classifier" keeps TRAK's default
    # 2048-dimensional kernel small (99 parameters: no projection needed)
    task = task_from_pretrained(root / "bert", "sequence-classification", layers="classifier")
    train = task.dataloader(load_any_dataset(str(root / "ltrain.csv")))
    test = task.dataloader(load_any_dataset(str(root / "ltest.parquet"), role="test"))
    api = task.attributor(method).attribute(train, test).float()
    torch.testing.assert_close(cli, api, rtol=1e-6, atol=1e-7 * float(api.abs().max()))


def test_method_defaults_are_the_class_defaults():
    """TRAK's and RPS's integration defaults are their classes' own (no second set)."""
    import inspect

    from hf_attrib.algorithm import RPSAttributor, TRAKAttributor
    from hf_attrib.algorithm.trak import _DEFAULT_PROJ_DIM
    from hf_attrib.integrations.transformers import METHOD_DEFAULTS

    trak = inspect.signature(TRAKAttributor).parameters
    assert METHOD_DEFAULTS["trak"] == {"projector_kwargs": {"proj_dim": _DEFAULT_PROJ_DIM},
                                       "regularization": trak["regularization"].default}
    rps = inspect.signature(RPSAttributor).parameters
    assert METHOD_DEFAULTS["rps"] == {name: rps[name].default for name in METHOD_DEFAULTS["rps"]}
