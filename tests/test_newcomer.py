"""What a newcomer meets: the README's snippets, the quick start, the CLI's help and version,
the documented folder names, the benchmark's progress lines and the checkpoint cards."""

from __future__ import annotations

import argparse
import re
import runpy
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

import hf_attrib
from hf_attrib import cli

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
QUICKSTART = ROOT / "recipes" / "quickstart.py"

# The only reason a README block may give for not running here (``# needs: REASON ...`` as its
# first line): it downloads from the Hub. Anything else must run as printed.
ALLOWED_NEEDS = {"hub"}


def _python_blocks(path: Path) -> list[tuple[int, str, str | None]]:
    """``(line, code, needs)`` of every ```python block: ``needs`` is the word after a
    ``# needs:`` first line, else ``None``."""
    text = path.read_text(encoding="utf-8")
    blocks = []
    for match in re.finditer(r"^```python\n(.*?)^```", text, re.S | re.M):
        code = match.group(1)
        needs = re.match(r"# needs: (\w+)", code)
        blocks.append((text.count("\n", 0, match.start()) + 1, code,
                       needs.group(1) if needs else None))
    return blocks


BLOCKS = _python_blocks(README)


def test_readme_marks_only_hub_blocks_as_not_runnable():
    assert len(BLOCKS) >= 4
    marked = [(line, needs) for line, _, needs in BLOCKS if needs is not None]
    assert all(needs in ALLOWED_NEEDS for _, needs in marked), marked
    assert len(marked) <= 1, f"keep the skipped README blocks minimal: {marked}"


@pytest.fixture
def fresh_accelerate_state():
    """A README block may create an ``Accelerator``; its state is process-wide."""
    yield
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)


@pytest.mark.parametrize("line,code,needs", BLOCKS, ids=[f"README.md:{b[0]}" for b in BLOCKS])
def test_readme_python_block_runs_as_printed(line, code, needs, tmp_path, monkeypatch,
                                            fresh_accelerate_state):
    if needs is not None:
        pytest.skip(f"README.md:{line} needs: {needs}")
    monkeypatch.chdir(tmp_path)  # files a snippet writes (scores.safetensors) land here
    namespace = {"__name__": "__main__"}  # nothing defined but what the block defines
    with torch.random.fork_rng(), warnings.catch_warnings():
        # A numerical warning (CG on an indefinite H, ...) means the snippet's answer is wrong.
        warnings.simplefilter("error", RuntimeWarning)
        exec(compile(code, f"README.md:{line}", "exec"), namespace)


def test_quickstart_holds_the_readme_usage_snippet():
    """The README points to recipes/quickstart.py as its Usage snippet on real data."""
    usage = next(code for _, code, _ in BLOCKS if "IFAttributorCG(task=task" in code)
    snippet = usage[usage.index("def f(params, data):"):].strip().splitlines()
    quickstart = [line.strip() for line in QUICKSTART.read_text().splitlines()]
    missing = [line for line in snippet if line.strip() and line.strip() not in quickstart]
    assert not missing, missing


def test_quickstart_runs_and_finds_same_label_helpers(monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", [str(QUICKSTART), "--n-train", "300", "--n-test", "5"])
    with torch.random.fork_rng():
        runpy.run_path(str(QUICKSTART), run_name="__main__")
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 3, lines
    for line in (lines[0], lines[2]):  # IF (CG) and TRAK "most helped by"
        label = int(re.search(r"\(label (\d)\)", line).group(1))
        helpers = [int(v) for v in re.search(r"with labels \[(.*)\]", line).group(1).split(",")]
        # A digit is helped most by training digits of its own class.
        assert sum(h == label for h in helpers) >= 4, line


def test_quickstart_refuses_impossible_sizes(monkeypatch):
    monkeypatch.setattr(sys, "argv", [str(QUICKSTART), "--n-train", "1797"])
    with pytest.raises(SystemExit, match="sum to at most 1797"):
        runpy.run_path(str(QUICKSTART), run_name="__main__")


# ------------------------------------------------------------------------------------ CLI
def _parsers(parser: argparse.ArgumentParser, name: str = "hf-attrib"):
    """The parser and, recursively, every sub-command's parser, with its command line."""
    yield name, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub_name, sub in action.choices.items():
                yield from _parsers(sub, f"{name} {sub_name}")


def test_every_cli_option_and_command_has_help():
    missing = []
    for name, parser in _parsers(cli.build_parser()):
        for action in parser._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            if not (action.help or "").strip() or action.help == argparse.SUPPRESS:
                missing.append(f"{name}: {'/'.join(action.option_strings) or action.dest}")
            if isinstance(action, argparse._SubParsersAction):
                missing += [f"{name} {c.dest}" for c in action._choices_actions
                            if not (c.help or "").strip()]
    assert not missing, f"CLI options without help text: {missing}"


def test_cli_version_prints_the_package_version(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.strip() == f"hf-attrib {hf_attrib.__version__}"


@pytest.mark.parametrize("command", [["bench", "run", "digits-lr"],
                                     ["bench", "ground-truth", "digits-lr"],
                                     ["hub", "export", "digits-lr"]])
def test_unwritable_out_is_refused_before_any_work(command, tmp_path, monkeypatch, capsys):
    from hf_attrib.benchmark import runner

    def no_work(*args, **kwargs):
        raise AssertionError("training started before --out was checked")

    for name in ("run_benchmark", "prepare", "build_ground_truth"):
        monkeypatch.setattr(runner, name, no_work)
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    for out, fragment in [(blocker, "is an existing file, not a folder"),
                          (blocker / "sub", "cannot create output folder")]:
        assert cli.main([*command, "--out", str(out)]) == 2
        err = capsys.readouterr().err
        assert fragment in err and str(out) in err and "(--out)" in err, err
        assert "pass a writable folder as --out" in err


def test_run_benchmark_checks_out_dir_before_preparing(tmp_path, monkeypatch):
    from hf_attrib.benchmark import runner

    monkeypatch.setattr(runner, "prepare", lambda *a, **k: pytest.fail("prepared first"))
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    with pytest.raises(NotADirectoryError, match=r"\(out_dir\) is an existing file"):
        runner.run_benchmark("digits-lr", out_dir=blocker)


@pytest.mark.skipif(sys.platform == "win32" or not hasattr(__import__("os"), "geteuid")
                    or __import__("os").geteuid() == 0, reason="root writes anywhere")
def test_read_only_out_is_refused(tmp_path):
    from hf_attrib.benchmark.runner import check_writable

    folder = tmp_path / "ro"
    folder.mkdir(mode=0o500)
    with pytest.raises(PermissionError, match=r"cannot write to output folder .* \(--out\)"):
        check_writable(folder, "--out")


def test_documented_bench_folders_are_the_ones_bench_run_writes(tmp_path, monkeypatch):
    from hf_attrib.benchmark import runner
    from hf_attrib.benchmark.settings import get_setting

    written = {}
    monkeypatch.setattr(runner, "run_benchmark",
                        lambda setting, out_dir, **_: written.setdefault("out", out_dir) and {})
    monkeypatch.setattr(runner, "results_markdown", lambda results: "")
    monkeypatch.chdir(tmp_path)
    assert cli.main(["bench", "run", "digits-lr"]) == 0
    assert written["out"] == "bench-out/digits_lr"
    for doc in (ROOT / "docs" / "hub.md", README):
        for name in re.findall(r"bench-out/([\w-]+)", doc.read_text()):
            if name != "SETTING":
                assert name == get_setting(name).name, f"{doc.name}: bench-out/{name}"


@pytest.mark.skipif(shutil.which("git") is None, reason="needs git")
def test_bench_out_is_git_ignored():
    result = subprocess.run(["git", "check-ignore", "-q", "bench-out/digits_lr/results.json"],
                            cwd=ROOT, capture_output=True)
    assert result.returncode == 0, ".gitignore does not ignore bench-out/"


@pytest.mark.slow
def test_bench_run_prints_a_line_per_method(tmp_path):
    def run(*extra: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "hf_attrib.cli", "bench", "run",
                               "digits-lr", "--smoke", "--methods", "grad-dot,if-explicit",
                               "--out", str(tmp_path), *extra],
                              capture_output=True, text=True, timeout=900)

    shown = run()
    assert shown.returncode == 0, shown.stderr
    err = shown.stderr
    assert "methods: 2 on 120 training / 12 test examples" in err
    assert re.search(r"^\[1/2\] grad-dot \.\.\.$", err, re.M), err
    assert re.search(r"^\[2/2\] if-explicit done in \d+\.\d s: LDS -?\d\.\d{3}, "
                     r"LOO -?\d\.\d{3}, AUC \d\.\d{3}$", err, re.M), err
    assert err.index("[1/2] grad-dot done") < err.index("[2/2] if-explicit ...")
    assert "| grad-dot |" in shown.stdout and "[1/2]" not in shown.stdout
    quiet = run("--no-progress")
    assert quiet.returncode == 0 and "[1/2]" not in quiet.stderr


# ---------------------------------------------------------------------------------- cards
_INDEX = {"dataset_repo_id": "org/digits-lr", "checkpoints_repo_id": "org/digits-lr-checkpoints",
          "smoke": False, "kinds": {"lds": {"num_models": 100, "shards": [{}] * 10}}}


def _cards(setting_name: str = "digits-lr") -> dict[str, str]:
    from hf_attrib.benchmark.settings import get_setting
    from hf_attrib.hub import cards

    s = get_setting(setting_name)
    run = {"setting": "digits_lr", "methods": [{"method": "grad-dot", "lds": 0.25}]}
    return {"dataset": str(cards.dataset_card(s, _INDEX, ["train", "test"])),
            "checkpoints": str(cards.checkpoints_card(s, _INDEX)),
            "results": str(cards.results_card([("runs/digits-lr/x.json", run)], "org/res"))}


def test_cards_link_other_repos_absolutely():
    rendered = _cards()
    assert "[`org/digits-lr-checkpoints`](https://huggingface.co/org/digits-lr-checkpoints)" \
        in rendered["dataset"]
    assert "[`org/digits-lr`](https://huggingface.co/datasets/org/digits-lr)" \
        in rendered["checkpoints"]
    assert "(https://huggingface.co/org/res/blob/main/runs/digits-lr/x.json)" \
        in rendered["results"]
    for name, text in rendered.items():
        targets = re.findall(r"\]\(([^)]*)\)", text)
        assert targets and all(t.startswith("https://") for t in targets), (name, targets)


def _load_snippet(card: str) -> str:
    blocks = re.findall(r"^```python\n(.*?)^```", card, re.S | re.M)
    return next(b for b in blocks if "from_pretrained" in b)


@pytest.mark.parametrize("setting,auto_class", [("digits-lr", "AutoModel"),
                                                ("shakespeare-nanogpt", "AutoModelForCausalLM")])
def test_checkpoints_card_shows_the_auto_class_load(setting, auto_class):
    snippet = _load_snippet(_cards(setting)["checkpoints"])
    assert "import hf_attrib.benchmark.models" in snippet
    assert f'{auto_class}.from_pretrained("org/digits-lr-checkpoints")' in snippet


def _saved_lr(folder: Path) -> dict[str, torch.Tensor]:
    from hf_attrib.benchmark.models import LogisticRegressionConfig, LogisticRegressionModel

    torch.manual_seed(0)
    model = LogisticRegressionModel(LogisticRegressionConfig(input_dim=64, num_labels=10))
    model.save_pretrained(str(folder), safe_serialization=True)
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_saved_benchmark_model_loads_with_auto_model(tmp_path):
    from transformers import AutoModel, AutoModelForImageClassification

    import hf_attrib.benchmark.models as models

    want = _saved_lr(tmp_path)
    for auto in (AutoModel, AutoModelForImageClassification):
        model = auto.from_pretrained(str(tmp_path))
        assert type(model) is models.LogisticRegressionModel
        got = model.state_dict()
        assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)


@pytest.mark.slow
def test_card_load_snippet_runs_in_a_fresh_interpreter(tmp_path):
    """Without the import transformers does not know the model type; with it (the card's
    snippet, the repo id replaced by a saved folder) the weights come back exactly."""
    want = _saved_lr(tmp_path / "model")
    snippet = _load_snippet(_cards()["checkpoints"]).replace(
        '"org/digits-lr-checkpoints"', repr(str(tmp_path / "model")))
    script = (
        "import torch\n"
        "from transformers import AutoModel\n"
        "try:\n"
        f"    AutoModel.from_pretrained({str(tmp_path / 'model')!r})\n"
        "except ValueError as err:\n"
        "    print('unregistered:', 'hf_attrib_logistic_regression' in str(err))\n"
        f"{snippet}"
        f"torch.save(model.state_dict(), {str(tmp_path / 'got.pt')!r})\n"
        "print(type(model).__name__)\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=600, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["unregistered:", "True", "LogisticRegressionModel"]
    got = torch.load(tmp_path / "got.pt")
    assert all(torch.equal(got[k], want[k]) for k in want)
