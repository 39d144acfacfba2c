"""hf_attrib.index on the local test Hub: push/pull round trip, partial pulls, resumable pushes,
the CLI, and the README section's commands as printed."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
from pathlib import Path

import pytest
import torch
from datasets import Dataset
from integrations_helpers import char_tokenizer, random_texts, tiny_gpt2

from hf_attrib.hub.errors import HubError
from hf_attrib.index import Index, build, pull_index, push_index
from hf_attrib.index.format import INDEX_FILE, shard_file
from hf_attrib.integrations.transformers import task_from_pretrained

TOKEN = "hf_local_test_token_4242"
FACTORED = {"proj_type": "factored", "proj_dim": 128}
ROOT = Path(__file__).resolve().parents[1]
README_FALLBACK = Path("/work/briefs/I15-readme.md")  # until the section is in README.md
MARKERS = ("<!-- index-commands:start -->", "<!-- index-commands:end -->")


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("index")
    task = task_from_pretrained(tiny_gpt2(), "causal-lm", processor=char_tokenizer())
    att = task.attributor("trak", projector_kwargs=FACTORED)
    train = Dataset.from_dict({"text": random_texts(20, 0)})
    build(att, train, out=tmp / "index", shard_rows=4, batch_size=4, model_id="demo/tiny")
    return tmp / "index", att, train


def _files(folder: Path) -> list[str]:
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*")
                  if p.is_file() and ".cache" not in p.parts and ".build" not in p.parts)


def test_push_pull_round_trip_gives_identical_top_k(local_hub, built, tmp_path):
    folder, att, _ = built
    push_index(folder, "demo/tiny-index", endpoint=local_hub.endpoint, token=TOKEN,
               resumable=False)
    pulled = pull_index("demo/tiny-index", out=tmp_path / "pulled", endpoint=local_hub.endpoint)
    assert _files(pulled) == _files(folder)  # the .build bookkeeping stays home
    queries = random_texts(3, 5)
    here = Index.open(folder, task=att).query(queries, top_k=5)
    there = Index.open(pulled, task=att).query(queries, top_k=5)
    assert torch.equal(here.example_ids, there.example_ids)
    assert torch.equal(here.scores, there.scores)
    card = (pulled / "README.md").read_text()
    assert "hf-attrib index query" in card and "https://huggingface.co/demo/tiny" in card
    # A partial pull: only the shards of rows 5:9 (shards 1 and 2 of 5), queried there.
    local_hub.requests.clear()
    part = pull_index("demo/tiny-index", out=tmp_path / "part", rows="5:9",
                      endpoint=local_hub.endpoint)
    shards = [f for f in _files(part) if f.startswith("features/")]
    assert shards == [shard_file(1, 5), shard_file(2, 5)]
    fetched = {p for _, p, _ in local_hub.requests if "/features/" in p}
    assert all(shard_file(1, 5) in p or shard_file(2, 5) in p for p in fetched) and fetched
    got = Index.open(part, task=att).query(queries, top_k=2, rows="4:12")
    ref = Index.open(folder, task=att).query(queries, top_k=2, rows="4:12")
    assert torch.equal(got.example_ids, ref.example_ids)
    # Opened from the repo with rows: only their shards pulled, and the default rows of
    # later queries (not all rows, whose shards are absent).
    opened = Index.open("demo/tiny-index", task=att, rows="5:9", endpoint=local_hub.endpoint,
                        cache_dir=tmp_path / "cache")
    got = opened.query(queries, top_k=2)
    ref = Index.open(folder, task=att).query(queries, top_k=2, rows="5:9")
    assert torch.equal(got.example_ids, ref.example_ids) and got.rows.min() >= 5


def test_interrupted_push_resumes_without_sending_committed_files(local_hub, built,
                                                                  monkeypatch):
    """The server fails commits after the first (an outage midway through the resumable
    multi-commit upload): the push says to run it again, and the rerun sends only the rest."""
    upload_pipeline = pytest.importorskip("huggingface_hub._upload_pipeline")
    if not hasattr(upload_pipeline, "REGULAR_CONTENT_BYTES_BUDGET"):
        pytest.skip("this huggingface_hub has no multi-commit upload_folder pipeline")
    monkeypatch.setattr(upload_pipeline, "REGULAR_CONTENT_BYTES_BUDGET", 2_000)
    folder, _, _ = built
    local_hub.committed.clear()
    local_hub.commits_left = 1
    try:
        with pytest.raises(HubError, match="run the same push again"):
            push_index(folder, "demo/tiny-index-big", endpoint=local_hub.endpoint, token=TOKEN)
    finally:
        local_hub.commits_left = None
    first = [f for commit in local_hub.committed for f in commit]
    assert 0 < len(first) < len(_files(folder))
    local_hub.committed.clear()
    push_index(folder, "demo/tiny-index-big", endpoint=local_hub.endpoint, token=TOKEN)
    second = [f for commit in local_hub.committed for f in commit]
    assert not set(first) & set(second)
    assert sorted(first + second) == _files(folder)


def _readme_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    if MARKERS[0] not in text:
        if not README_FALLBACK.is_file():
            pytest.skip("README.md has no index-commands section yet")
        text = README_FALLBACK.read_text()
    block = text.split(MARKERS[0], 1)[1].split(MARKERS[1], 1)[0]
    commands = [line.strip() for line in block.splitlines() if line.strip().startswith(
        "hf-attrib ")]
    assert len(commands) >= 4, block
    return commands


@pytest.mark.slow
def test_readme_index_commands_run_as_printed(local_hub, tmp_path):
    """The README's "Attribute a Hub model with its index" commands, run in a folder holding
    train.jsonl, against the local Hub serving the model demo/tiny-gpt2."""
    from huggingface_hub import HfApi

    commands = _readme_commands()
    model_dir = tmp_path / "model"
    tiny_gpt2().save_pretrained(model_dir)
    char_tokenizer().save_pretrained(model_dir)
    # olah answers 401 (the Hub: 404) for the tree of a missing folder, which transformers'
    # tokenizer loading lists: give the repo that folder, holding no template.
    (model_dir / "additional_chat_templates").mkdir()
    (model_dir / "additional_chat_templates" / "README.md").write_text("no templates\n")
    model_repo = re.search(r"--model (\S+)", commands[0]).group(1)
    api = HfApi(endpoint=local_hub.endpoint, token=TOKEN)
    api.create_repo(model_repo, exist_ok=True)
    api.upload_folder(repo_id=model_repo, folder_path=model_dir)
    work = tmp_path / "work"
    work.mkdir()
    lines = [*random_texts(30, 0), "to be or not to be"]
    (work / "train.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in lines))
    env = {**os.environ, "HF_ENDPOINT": local_hub.endpoint, "HF_TOKEN": TOKEN,
           "HF_HOME": str(tmp_path / "hf_home")}
    outputs = []
    for command in commands:
        run = subprocess.run(shlex.split(command), cwd=work, env=env, capture_output=True,
                             text=True, timeout=300)
        assert run.returncode == 0, f"{command}\n{run.stderr[-3000:]}"
        outputs.append(run.stdout)
    assert "index complete" in outputs[0]
    # the query prints its top-3 with scores and texts; the duplicate of the query is first
    shown = re.findall(r"^\s+([+-]\d\.\d+e[+-]\d+)\s+#(\d+)\s+'(.*)'$", outputs[-1], re.M)
    assert len(shown) == 3 and shown[0][2] == "to be or not to be", outputs[-1]


def test_cli_build_query_and_errors(tmp_path, capsys, built):
    from hf_attrib.cli import main

    _, _, train = built
    model_dir = tmp_path / "model"
    tiny_gpt2().save_pretrained(model_dir)
    char_tokenizer().save_pretrained(model_dir)
    train.to_json(tmp_path / "train.jsonl")
    out = tmp_path / "idx"
    assert main(["index", "build", "--model", str(model_dir), "--train",
                 str(tmp_path / "train.jsonl"), "--method", "grad-dot", "--proj-dim", "128",
                 "--shard-rows", "8", "--out", str(out)]) == 0
    assert "index complete" in capsys.readouterr().out
    assert main(["index", "query", str(out), "--text", train[3]["text"], "--top-k", "2",
                 "--train", str(tmp_path / "train.jsonl"), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert len(result["example_ids"][0]) == 2 and result["texts"][0][0] in train["text"]
    assert main(["index", "query", str(out)]) == 2
    assert "--text" in capsys.readouterr().err
    index = json.loads((out / INDEX_FILE).read_text())
    assert index["attribution_index"]["model"]["id"] == str(model_dir)
