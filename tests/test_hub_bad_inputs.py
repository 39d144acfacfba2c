"""Hub repo folders and indexes that are damaged, incomplete or hostile (issue 11, item 1) and
an unreachable Hub (item 9): each case asserts the error type and a message fragment, or the
correct result. The repos are small hand-made checkpoint folders (no training); the Hub ones
use the local Hub of ``tests/hub_server.py``."""

from __future__ import annotations

import builtins
import io
import json
import os
import random
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

import hf_attrib.hub.benchmark as hub_benchmark
from hf_attrib.hub import (
    HubIntegrityError,
    HubNotFoundError,
    pull,
    push,
    read_checkpoints,
    read_splits,
    read_state,
)
from hf_attrib.hub.errors import HubConnectionError, HubPathError
from hf_attrib.hub.layout import (
    CHECKPOINTS_FORMAT,
    INDEX_FILE,
    INDEX_FORMAT,
    check_folder,
    file_entry,
    save_safetensors,
    sha256_file,
)
from hf_attrib.model_utils.block_store import MODEL_IDS_KEY

TOKEN = "hf_local_test_token_4242"
SHARDS = [f"lds/shard-0000{i}-of-00002.safetensors" for i in range(2)]
CONFINED = "relative path inside the repo folder"


# ---------------------------------------------------------------------------------- helpers
def _write_index(folder: Path, index: dict) -> None:
    (folder / INDEX_FILE).write_text(json.dumps(index, indent=1))


def _index(folder: Path) -> dict:
    return json.loads((folder / INDEX_FILE).read_text())


def _write_repo(folder: Path) -> Path:
    """A checkpoint repo folder as ``export`` lays it out: a full model (``w`` = -1), 4 LDS
    models in 2 shards (model ``m`` has ``w`` = m), ``config.json``, an index hashing all."""
    folder.mkdir(parents=True)
    save_safetensors({"w": torch.full((2,), -1.0)}, folder / "model.safetensors",
                     {"format": "pt"})
    (folder / "lds").mkdir()
    shards = []
    for i, name in enumerate(SHARDS):
        ids = torch.arange(2 * i, 2 * i + 2)
        save_safetensors({"w": ids[:, None].float().repeat(1, 2), MODEL_IDS_KEY: ids},
                         folder / name, {"format": CHECKPOINTS_FORMAT, "kind": "lds",
                                         "start": str(2 * i), "stop": str(2 * i + 2)})
        shards.append({"file": name, "start": 2 * i, "stop": 2 * i + 2})
    (folder / "config.json").write_text('{"model_type": "tiny"}')
    files = {p.relative_to(folder).as_posix(): file_entry(p)
             for p in sorted(folder.rglob("*")) if p.is_file()}
    _write_index(folder, {
        "format": INDEX_FORMAT, "setting": "tiny", "repo_type": "model", "files": files,
        "kinds": {"full": {"file": "model.safetensors", "num_models": 1},
                  "lds": {"num_models": 4, "models_per_shard": 2, "shards": shards,
                          "model_map": {str(m): SHARDS[m // 2] for m in range(4)}}}})
    return folder


def _write_sentinel(path: Path) -> Path:
    """A file outside the repo that would load as a valid shard (``w`` = 999)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    save_safetensors({"w": torch.full((2, 2), 999.0), MODEL_IDS_KEY: torch.arange(2)}, path)
    return path


def _rename_shard(folder: Path, index: dict, i: int, name: str, entry: dict | None) -> None:
    """Point shard ``i`` (its shard list and model_map) at ``name``, with ``entry`` as its
    ``files`` entry (``None``: no entry)."""
    old = index["kinds"]["lds"]["shards"][i]["file"]
    index["kinds"]["lds"]["shards"][i]["file"] = name
    model_map = index["kinds"]["lds"]["model_map"]
    index["kinds"]["lds"]["model_map"] = {m: name if f == old else f
                                          for m, f in model_map.items()}
    index["files"].pop(old, None)
    if entry is not None:
        index["files"][name] = entry
    _write_index(folder, index)


@pytest.fixture
def repo(tmp_path):
    return _write_repo(tmp_path / "repo")


@pytest.fixture
def opened(monkeypatch):
    """Every path opened for reading through Python or safetensors, resolved."""
    paths: list[Path] = []
    real_open, real_safe_open, real_load_file = builtins.open, safe_open, load_file

    def record(path):
        if isinstance(path, (str, Path)):
            paths.append(Path(path).resolve())

    def spy_open(file, *args, **kwargs):
        record(file)
        return real_open(file, *args, **kwargs)

    def spy_safe_open(path, *args, **kwargs):
        record(path)
        return real_safe_open(path, *args, **kwargs)

    def spy_load_file(path, *args, **kwargs):
        record(path)
        return real_load_file(path, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", spy_open)
    monkeypatch.setattr(io, "open", spy_open)  # Path.open / read_bytes go through io.open
    monkeypatch.setattr(hub_benchmark, "safe_open", spy_safe_open)
    monkeypatch.setattr(hub_benchmark, "load_file", spy_load_file)
    return paths


# ---------------------------------------------------------------------------------- confinement
BAD_NAMES = [
    ("/etc/passwd", "absolute path"),
    ("../outside.safetensors", "'..'"),
    ("lds/../../outside.safetensors", "'..'"),
    ("..\\outside.safetensors", r"'\\\\'"),
    ("lds\\shard.safetensors", r"'\\\\'"),
    ("C:/outside.safetensors", "':'"),
    ("C:outside.safetensors", "':'"),
    ("//server/share/x.safetensors", "absolute path"),
    ("lds//shard.safetensors", "empty segment"),
    ("./model.safetensors", "'.'"),
    ("lds/*.safetensors", "'\\*'"),
    ("", "not a non-empty string"),
]


@pytest.mark.parametrize(("name", "why"), BAD_NAMES)
def test_unsafe_names_in_an_index_are_refused_on_read(repo, opened, name, why):
    index = _index(repo)
    # Its hash is right (a copy of a real shard): only the path itself is wrong.
    _rename_shard(repo, index, 0, name, file_entry(repo / SHARDS[0]))
    opened.clear()
    with pytest.raises(HubPathError, match=rf"{why}.*{CONFINED}.*hf-attrib hub export"):
        read_checkpoints(repo, "lds")
    with pytest.raises(HubPathError, match=CONFINED):  # any reader: the index is refused
        read_state(repo, "full")
    assert opened == [(repo / INDEX_FILE).resolve()] * 2  # only the index was read


def test_unsafe_name_in_files_alone_is_refused(repo):
    index = _index(repo)
    index["files"]["../../etc/shadow"] = index["files"]["config.json"]
    _write_index(repo, index)
    with pytest.raises(HubPathError, match=r"files names '\.\./\.\./etc/shadow'"):
        check_folder(repo)


@pytest.mark.parametrize("relative", [False, True])
def test_symlink_leaving_the_folder_is_refused(repo, tmp_path, opened, relative):
    secret = _write_sentinel(tmp_path / "outside" / "secret.safetensors")
    link = repo / "lds" / "link.safetensors"
    link.symlink_to(os.path.relpath(secret, link.parent) if relative else secret)
    _rename_shard(repo, _index(repo), 1, "lds/link.safetensors", file_entry(secret))
    opened.clear()
    with pytest.raises(HubPathError, match=r"link\.safetensors.*leads outside the repo folder"):
        read_checkpoints(repo, "lds")
    assert secret.resolve() not in opened
    with pytest.raises(HubPathError, match="leads outside"):
        check_folder(repo)


def test_symlinked_folder_leaving_the_repo_is_refused(repo, tmp_path):
    outside = tmp_path / "outside"
    shutil.move(repo / "lds", outside)
    (repo / "lds").symlink_to(outside)
    with pytest.raises(HubPathError, match=r"shard-00000-of-00002\.safetensors.*leads outside"):
        read_checkpoints(repo, "lds", "0:2")


def test_symlink_inside_the_folder_is_followed(repo):
    (repo / "lds" / "alias.safetensors").symlink_to("shard-00000-of-00002.safetensors")
    _rename_shard(repo, _index(repo), 0, "lds/alias.safetensors",
                  file_entry(repo / SHARDS[0]))
    params, _, ids = read_checkpoints(repo, "lds")
    assert ids.tolist() == [0, 1, 2, 3] and params["w"][:, 0].tolist() == [0, 1, 2, 3]


def test_reading_a_model_range_past_the_last_model_is_refused(repo):
    """``"0:6"`` of a 4-model kind is an error, not 4 models without a word; open ends and
    ranges inside still read."""
    with pytest.raises(ValueError, match=r"models 0:6 asks for lds models up to id 5.*has 4 "
                                         r"\(ids 0\.\.3\).*e\.g\. 0:4"):
        read_checkpoints(repo, "lds", "0:6")
    assert read_checkpoints(repo, "lds", "1:")[2].tolist() == [1, 2, 3]
    assert read_checkpoints(repo, "lds", "0:4")[2].tolist() == [0, 1, 2, 3]


# ---------------------------------------------------------------------------------- hashes
def test_shard_without_a_hash_is_refused(repo, opened):
    _rename_shard(repo, _index(repo), 0, SHARDS[0], None)  # named, but not in files
    opened.clear()
    with pytest.raises(HubIntegrityError, match=r"shards\[0\]\.file names 'lds/shard-00000-of-"
                                                r"00002\.safetensors', which has no entry in "
                                                r"'files'.*cannot be verified"):
        read_checkpoints(repo, "lds", "2:4")
    assert (repo / SHARDS[0]).resolve() not in opened


@pytest.mark.parametrize("damage", ["file", "sha256", "size"])
def test_hash_mismatch_is_refused_on_read(repo, damage):
    index = _index(repo)
    if damage == "file":
        data = bytearray((repo / SHARDS[1]).read_bytes())
        data[-1] ^= 0x01  # one bit of the last tensor
        (repo / SHARDS[1]).write_bytes(bytes(data))
    elif damage == "sha256":
        index["files"][SHARDS[1]]["sha256"] = "0" * 64
    else:
        index["files"][SHARDS[1]]["size"] += 1
    _write_index(repo, index)
    with pytest.raises(HubIntegrityError, match=r"shard-00001-of-00002\.safetensors .*does not "
                                                r"match the sha256 recorded"):
        read_checkpoints(repo, "lds", "2:4")
    ids = read_checkpoints(repo, "lds", "0:2")[2]  # the intact shard still reads
    assert ids.tolist() == [0, 1]


def test_unindexed_parquet_files_are_not_read(tmp_path):
    import datasets

    folder = tmp_path / "ds"
    (folder / "data").mkdir(parents=True)
    datasets.Dataset.from_dict({"label": [1, 2]}).to_parquet(
        str(folder / "data" / "train-00000-of-00001.parquet"))
    files = {"data/train-00000-of-00001.parquet":
             file_entry(folder / "data" / "train-00000-of-00001.parquet")}
    _write_index(folder, {"format": INDEX_FORMAT, "repo_type": "dataset", "files": files})
    datasets.Dataset.from_dict({"label": [9]}).to_parquet(
        str(folder / "data" / "extra-00000-of-00001.parquet"))  # dropped in, not indexed
    splits = read_splits(folder)
    assert list(splits) == ["train"] and splits["train"]["label"] == [1, 2]


def test_a_split_in_several_parquet_files_is_read_whole(tmp_path):
    """train-00000-of-00002 and train-00001-of-00002: both read, in order (before, the split's
    last file replaced the first, silently)."""
    import datasets

    folder = tmp_path / "ds"
    (folder / "data").mkdir(parents=True)
    files = {}
    for i, labels in enumerate(([1, 2], [3])):
        name = f"data/train-0000{i}-of-00002.parquet"
        datasets.Dataset.from_dict({"label": labels}).to_parquet(str(folder / name))
        files[name] = file_entry(folder / name)
    _write_index(folder, {"format": INDEX_FORMAT, "repo_type": "dataset", "files": files})
    assert read_splits(folder)["train"]["label"] == [1, 2, 3]


@pytest.mark.parametrize(("text", "match"), [
    ("{not json", "not valid JSON"),
    ('["a list"]', "format 'list'"),
    ('{"format": "other/1", "files": {}}', "format 'other/1', expected 'hf-attrib-index/1'"),
    ('{"format": "hf-attrib-index/1"}', "no 'files' mapping"),
    ('{"format": "hf-attrib-index/1", "files": {"a.json": {"sha256": "xyz", "size": 1}}}',
     r"files\['a\.json'\]"),
])
def test_damaged_index_is_a_clear_error(repo, text, match):
    (repo / INDEX_FILE).write_text(text)
    with pytest.raises(HubIntegrityError, match=rf"{INDEX_FILE} is not a valid hf-attrib index "
                                                rf"\(.*{match}"):
        read_checkpoints(repo, "lds")


# ---------------------------------------------------------------------------------- push checks
CLOSED = "http://127.0.0.1:9"  # nothing listens: a push that got past the checks would fail


@pytest.mark.parametrize("damage", ["missing", "changed"])
def test_push_refuses_an_incomplete_export(repo, damage):
    if damage == "missing":
        (repo / SHARDS[1]).unlink()
        match = r"incomplete export: lds/shard-00001-of-00002\.safetensors.*is missing"
    else:
        (repo / "config.json").write_text('{"model_type": "edited"}')
        match = r"config\.json .*does not match the sha256"
    with pytest.raises(HubIntegrityError, match=rf"{match}.*re-run `hf-attrib hub export`"):
        push(repo, "org/never", endpoint=CLOSED, token=TOKEN)


def test_push_refuses_a_symlink_leaving_the_folder(repo, tmp_path):
    secret = tmp_path / "secret.txt"
    secret.write_text("not for upload")
    (repo / "README.md").symlink_to(secret)
    with pytest.raises(HubPathError, match=r"README\.md \(named by the repo card\) leads "
                                           r"outside"):
        push(repo, "org/never", endpoint=CLOSED, token=TOKEN)


# ---------------------------------------------------------------------------------- reproducible
def test_safetensors_are_byte_reproducible(tmp_path):
    """safetensors orders ``__metadata__`` differently from one call to the next (a Rust
    HashMap): the bytes, and so the Hub commits, changed with every export."""
    tensors = {"b": torch.arange(6.0).reshape(2, 3), "a": torch.arange(3),
               MODEL_IDS_KEY: torch.arange(2)}
    meta = {k: str(i) for i, k in enumerate("zyxwvutsrq")}
    digests = set()
    for i in range(20):
        save_safetensors(dict(reversed(tensors.items())) if i % 2 else tensors,
                         tmp_path / f"{i}.safetensors", meta)
        digests.add(sha256_file(tmp_path / f"{i}.safetensors"))
    assert len(digests) == 1
    with safe_open(str(tmp_path / "0.safetensors"), framework="pt") as f:
        assert f.metadata() == meta
        for key, value in tensors.items():
            assert torch.equal(f.get_tensor(key), value)


# ---------------------------------------------------------------------------------- fuzz
def _hostile_name(rng: random.Random, case: Path, secret: Path) -> tuple[str, bool]:
    """``(name, lexically_bad)``: a path an attacker (or a broken tool) might write."""
    rel = os.path.relpath(secret, case)
    choices = [
        (str(secret), True),
        (rel, True),
        ("lds/" + "../" * rng.randint(1, 4) + secret.name, True),
        (rel.replace("/", "\\"), True),
        ("C:" + rel, True),
        ("C:\\" + secret.name, True),
        ("lds/./" + secret.name, True),
        ("lds//" + secret.name, True),
        ("%2e%2e/" + secret.name, False),  # a literal (odd but safe) name: simply absent
        ("lds/shard-" + str(rng.randint(0, 9)) + ".safetensors", False),
    ]
    return rng.choice(choices)


def _symlink(rng: random.Random, case: Path, secret: Path) -> str:
    link = case / "lds" / f"link{rng.randint(0, 99)}.safetensors"
    if not link.exists():
        link.symlink_to(secret if rng.random() < 0.5 else os.path.relpath(secret, link.parent))
    return link.relative_to(case).as_posix()


def _mutate(rng: random.Random, case: Path, secret: Path) -> set[str]:
    """Apply 0-3 random faults to the repo at ``case``; return their kinds."""
    index = _index(case)
    done: set[str] = set()
    for _ in range(rng.choice([0, 1, 1, 2, 3])):
        fault = rng.choice(["name", "symlink", "no-hash", "hash", "size", "bit", "gone"])
        target = rng.choice(["full", 0, 1])
        old = (index["kinds"]["full"]["file"] if target == "full"
               else index["kinds"]["lds"]["shards"][target]["file"])
        if fault in ("name", "symlink"):
            if fault == "name":
                name, lexical = _hostile_name(rng, case, secret)
                fault = "bad-name" if lexical else "odd-name"
            else:
                name = _symlink(rng, case, secret)
            entry = file_entry(secret) if rng.random() < 0.8 else None  # a matching hash
            if name in index["files"] or (old != name and any(
                    name == s["file"] for s in index["kinds"]["lds"]["shards"])):
                continue
            if target == "full":
                index["files"].pop(old, None)
                index["kinds"]["full"]["file"] = name
                if entry is not None:
                    index["files"][name] = entry
                _write_index(case, index)
            else:
                _rename_shard(case, index, target, name, entry)
        elif fault == "no-hash":
            index["files"].pop(old, None)
        elif old in index["files"] and fault in ("hash", "size"):
            entry = index["files"][old]
            if fault == "hash":
                entry["sha256"] = entry["sha256"][:-1] + ("0" if entry["sha256"][-1] != "0"
                                                          else "1")
            else:
                entry["size"] += rng.choice([-1, 1])
        elif fault == "bit" and old in ("model.safetensors", *SHARDS):  # never the secret
            data = bytearray((case / old).read_bytes())
            data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
            (case / old).write_bytes(bytes(data))
        elif fault == "gone" and old in ("model.safetensors", *SHARDS):  # never the secret
            (case / old).unlink(missing_ok=True)
        else:
            continue
        done.add(fault)
        _write_index(case, index)
    return done


def test_fuzzed_indexes_never_read_outside_the_folder(tmp_path, opened):
    """200 random indexes (absolute, ``..``, Windows and symlink paths, missing or wrong
    hashes, flipped bits, deleted files): nothing outside the repo folder is ever opened, and
    each read either returns the right models or raises the confinement / verification
    error."""
    rng = random.Random(11)
    secret = _write_sentinel(tmp_path / "outside" / "secret.safetensors")
    base = _write_repo(tmp_path / "base")
    outcomes: dict[str, int] = {}
    kinds_seen: set[str] = set()
    for i in range(200):
        case = tmp_path / f"case{i}"
        shutil.copytree(base, case, symlinks=True)
        faults = _mutate(rng, case, secret)
        op = rng.choice(["lds", "full", "check"])
        opened.clear()
        try:
            if op == "lds":
                params, _, ids = read_checkpoints(case, "lds")
                assert ids.tolist() == [0, 1, 2, 3], faults
                assert params["w"][:, 0].tolist() == [0.0, 1.0, 2.0, 3.0], faults
            elif op == "full":
                assert read_state(case, "full")["w"].tolist() == [-1.0, -1.0], faults
            else:
                check_folder(case)
            outcome = "ok"
            # A fault is harmless only if what was read is not what it touched.
            assert op != "check" or not faults, faults
            assert "bad-name" not in faults, faults
        except (HubPathError, HubIntegrityError, HubNotFoundError) as err:
            outcome = type(err).__name__
            assert faults, (op, err)  # an intact repo always reads
        outcomes[outcome] = outcomes.get(outcome, 0) + 1
        kinds_seen.update(faults)
        root = case.resolve()
        outside = [p for p in opened if not p.is_relative_to(root)]
        assert not outside, (i, faults, op, outside)
        shutil.rmtree(case)
    # Every kind of outcome happened (the fuzz is not vacuous).
    assert set(outcomes) == {"ok", "HubPathError", "HubIntegrityError", "HubNotFoundError"}
    assert min(outcomes.values()) >= 10, outcomes
    assert kinds_seen == {"bad-name", "odd-name", "symlink", "no-hash", "hash", "size", "bit",
                          "gone"}


# ---------------------------------------------------------------------------------- on the Hub
@pytest.fixture(scope="module")
def tiny_hub(local_hub, tmp_path_factory):
    """The hand-made repo pushed to org/tiny-checkpoints."""
    folder = _write_repo(tmp_path_factory.mktemp("tiny") / "repo")
    push(folder, "org/tiny-checkpoints", endpoint=local_hub.endpoint, token=TOKEN)
    return local_hub


def _index_gets(hub, repo: str) -> int:
    return sum(1 for m, p, _ in hub.requests
               if m == "GET" and p.split("?")[0].endswith(f"{repo}/resolve/main/{INDEX_FILE}"))


def _pull(hub, repo: str, cache: Path, **kw):
    return pull(repo, what=("checkpoints",), cache_dir=cache, endpoint=hub.endpoint, **kw)


def test_pushing_an_unchanged_rewrite_makes_no_commit(tiny_hub, tmp_path):
    """A second export of the same data writes the same bytes, so its push changes nothing."""
    again = _write_repo(tmp_path / "again")  # written anew, as a re-export does
    commits, head = tiny_hub.commits, tiny_hub.head("model", "org/tiny-checkpoints")
    push(again, "org/tiny-checkpoints", endpoint=tiny_hub.endpoint, token=TOKEN)
    assert tiny_hub.commits == commits
    assert tiny_hub.head("model", "org/tiny-checkpoints") == head


def test_corrupt_cached_index_is_fetched_again(tiny_hub, tmp_path):
    cache = tmp_path / "cache"
    _pull(tiny_hub, "org/tiny-checkpoints", cache)
    blob = next(cache.rglob(f"snapshots/*/{INDEX_FILE}")).resolve()
    blob.write_text('{"format": "hf-attrib-index/1", "files": {')  # cut short
    gets = _index_gets(tiny_hub, "org/tiny-checkpoints")
    got = _pull(tiny_hub, "org/tiny-checkpoints", cache)
    assert _index_gets(tiny_hub, "org/tiny-checkpoints") == gets + 1  # fetched once more
    assert json.loads(blob.read_text())["format"] == INDEX_FORMAT  # the cache is repaired
    assert read_checkpoints(got.checkpoints_dir, "lds")[2].tolist() == [0, 1, 2, 3]


def _commit_index(hub, repo: str, content: bytes) -> None:
    from huggingface_hub import CommitOperationAdd, HfApi

    api = HfApi(endpoint=hub.endpoint, token=TOKEN)
    api.create_repo(repo, exist_ok=True)
    api.create_commit(repo, [CommitOperationAdd(INDEX_FILE, content)], commit_message="index")


def test_damaged_index_on_the_hub_is_a_clear_error(tiny_hub, tmp_path):
    _commit_index(tiny_hub, "org/badjson-checkpoints", b"{broken")
    with pytest.raises(HubIntegrityError, match=r"not valid JSON.*downloaded again and is "
                                                r"still damaged"):
        _pull(tiny_hub, "org/badjson-checkpoints", tmp_path / "cache")


@pytest.mark.parametrize(("name", "in_files", "error", "match"), [
    ("../../../escaped.safetensors", True, HubPathError, CONFINED),
    ("/tmp/escaped.safetensors", True, HubPathError, "absolute path"),
    (SHARDS[0], False, HubIntegrityError, "no entry in 'files'"),
])
def test_hostile_index_on_the_hub_downloads_nothing(tiny_hub, tmp_path, name, in_files, error,
                                                    match):
    index = _index(_write_repo(tmp_path / "src"))
    _rename_shard(tmp_path / "src", index, 0, name,
                  index["files"][SHARDS[0]] if in_files else None)
    repo = f"org/hostile{len(tiny_hub.committed)}-checkpoints"
    _commit_index(tiny_hub, repo, json.dumps(index).encode())
    out = tmp_path / "deep" / "out"
    with pytest.raises(error, match=match):
        pull(repo, what=("checkpoints",), out=out, endpoint=tiny_hub.endpoint)
    assert not list(tmp_path.rglob("escaped*"))
    assert not (out / "checkpoints" / "lds").exists()  # no shard was fetched


# ---------------------------------------------------------------------------------- offline
UNREACHABLE = r"cannot reach the Hub \({}.*use --data-dir / a local folder"


@pytest.fixture
def no_retry_wait(monkeypatch):
    """huggingface_hub waits 1+2+4+8+8 s between retries of a refused connection."""
    import huggingface_hub.utils._http as hf_http

    monkeypatch.setattr(hf_http.time, "sleep", lambda seconds: None)


def test_closed_port_is_cannot_reach_the_hub(tmp_path, no_retry_wait):
    from hub_server import free_port

    endpoint = f"http://127.0.0.1:{free_port()}"
    for what in (("data",), ("checkpoints",)):
        with pytest.raises(HubConnectionError, match=UNREACHABLE.format(endpoint)):
            pull("org/digits-lr", what=what, endpoint=endpoint, cache_dir=tmp_path / "c")
    with pytest.raises(HubConnectionError, match=rf"cannot reach the Hub \({endpoint}\); check "
                                                 r"the network.*push again"):
        push(_write_repo(tmp_path / "repo"), "org/x", endpoint=endpoint, token=TOKEN)


@pytest.mark.slow  # prepares the setting first (~15 s on a loaded 2-core machine)
def test_bench_run_from_hub_unreachable_is_a_clear_cli_error(tmp_path, monkeypatch, capsys,
                                                             no_retry_wait):
    from hub_server import free_port
    from huggingface_hub import constants

    from hf_attrib.cli import main

    endpoint = f"http://127.0.0.1:{free_port()}"
    monkeypatch.setattr(constants, "ENDPOINT", endpoint)  # what HF_ENDPOINT sets at import
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "cache"))
    code = main(["bench", "run", "digits-lr", "--smoke", "--no-progress", "--methods",
                 "grad-dot", "--out", str(tmp_path / "run"), "--from-hub", "org/digits-lr"])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith(f"hf-attrib: error: cannot reach the Hub ({endpoint})"), err
    assert "use --data-dir / a local folder" in err and "None" not in err


@pytest.mark.parametrize("what", ["data", "checkpoints"])
def test_offline_mode_without_cache_is_a_clear_cli_error(tmp_path, monkeypatch, capsys, what):
    from huggingface_hub import constants

    from hf_attrib.cli import main

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)  # what HF_HUB_OFFLINE=1 sets
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    code = main(["hub", "pull", "org/digits-lr", "--what", what])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("hf-attrib: error: cannot reach the Hub ("), err
    assert "offline mode (HF_HUB_OFFLINE) and not in the local cache" in err
    assert "use --data-dir / a local folder" in err and "file None" not in err

