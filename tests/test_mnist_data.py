"""MNIST through the Hub path: the offline copy served as ``ylecun/mnist``, its SHA256SUMS
verified, the sample fingerprint pinned, and only the sampled images decoded.

The real data are the offline copy (``$HF_ATTRIB_MNIST_DIR``, ``../shared/data/mnist``); tests
needing it skip without it. Hub tests run the clients in a fresh process: they read
``HF_ENDPOINT`` at import time.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import warnings
from dataclasses import replace

import numpy as np
import pytest
import torch

from hf_attrib.benchmark.data import (
    CHECKSUMS_FILE,
    PINNED_FINGERPRINTS,
    BenchmarkData,
    DataIntegrityError,
    DataMismatchWarning,
    build_data,
    data_fingerprint,
    verify_checksums,
)
from hf_attrib.benchmark.settings import get_setting, smoke_setting

TRAIN, TEST = "train-00000-of-00001.parquet", "test-00000-of-00001.parquet"


def _hub_env(hub, tmp_path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("HF_HUB_", "HF_DATASETS_")) and k != "HF_HOME"}
    return {**env, "HF_ENDPOINT": hub.endpoint, "HF_HOME": str(tmp_path / "hf_home"),
            "OMP_NUM_THREADS": "1"}


def _python(code: str, env: dict[str, str]) -> str:
    """Run ``code`` in a fresh interpreter; its last stdout line."""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=600, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout.strip().splitlines()[-1]


def _sums(folder, names) -> None:
    lines = [f"{hashlib.sha256((folder / n).read_bytes()).hexdigest()}  {n}\n" for n in names]
    (folder / CHECKSUMS_FILE).write_text("".join(lines))


def _image_folder(root, n: int = 150, seed: int = 0):
    """A small MNIST-shaped folder in the Hub's parquet layout (random 28x28 PNGs)."""
    import datasets
    from PIL import Image

    rng = np.random.default_rng(seed)
    images = [Image.fromarray(rng.integers(0, 255, (28, 28), dtype=np.uint8)) for _ in range(n)]
    ds = datasets.Dataset.from_dict({"image": images, "label": [i % 10 for i in range(n)]})
    root.mkdir(parents=True)
    ds.cast_column("image", datasets.Image()).to_parquet(root / TRAIN)
    return root


# ------------------------------------------------------------------------------ the Hub path
@pytest.mark.slow  # a fresh process, 19 MB through olah and the Arrow conversion (~8 s)
def test_load_dataset_ylecun_mnist_from_the_local_hub(mnist_hub, tmp_path):
    code = ("import datasets; d = datasets.load_dataset('ylecun/mnist'); "
            "print(sorted(d), len(d['train']), len(d['test']), d['train'].column_names, "
            "d['train'][0]['label'], d['train'].features['image'].__class__.__name__)")
    line = _python(code, _hub_env(mnist_hub, tmp_path))
    assert line == "['test', 'train'] 60000 10000 ['image', 'label'] 5 Image"
    assert any("/datasets/ylecun/mnist/resolve/" in path and path.endswith(TRAIN)
               for _, path, _ in mnist_hub.requests)


@pytest.mark.slow  # a fresh process; fetches and decodes 5,500 images from the Hub (~10 s)
def test_full_sample_from_the_hub_has_the_pinned_fingerprint(mnist_hub, tmp_path):
    code = ("import warnings; warnings.simplefilter('error'); "
            "from hf_attrib.benchmark.data import build_data; "
            "from hf_attrib.benchmark.settings import get_setting; "
            "d = build_data(get_setting('mnist_lr')); print(d.fingerprint, len(d.train))")
    mnist_hub.requests.clear()
    line = _python(code, _hub_env(mnist_hub, tmp_path))
    assert line == f"{PINNED_FINGERPRINTS['mnist_lr']} 5000"
    fetched = {path.rsplit("/", 1)[-1] for _, path, _ in mnist_hub.requests
               if "/datasets/ylecun/mnist/resolve/" in path}
    assert {TRAIN, TEST, CHECKSUMS_FILE} <= fetched  # read from the Hub, with its checksums


@pytest.mark.slow  # two smoke runs in fresh processes (~40 s on the shared 2-core machine)
def test_bench_run_mnist_lr_smoke_reads_the_hub_and_matches_data_dir(mnist_hub, mnist_dir,
                                                                     tmp_path):
    env = _hub_env(mnist_hub, tmp_path)
    fingerprints = []
    for out, extra in ((tmp_path / "hub", []), (tmp_path / "dir", ["--data-dir", str(mnist_dir)])):
        mnist_hub.requests.clear()
        run = subprocess.run([sys.executable, "-m", "hf_attrib.cli", "bench", "run", "mnist-lr",
                              "--smoke", "--no-progress", "--methods", "grad-dot", "--out",
                              str(out), *extra], capture_output=True, text=True, timeout=900,
                             env=env)
        assert run.returncode == 0, run.stderr[-3000:]
        results = json.loads((out / "results.json").read_text())
        (row,) = results["methods"]
        assert row["method"] == "grad-dot" and "error" not in row and np.isfinite(row["lds"])
        read_hub = any("/datasets/ylecun/mnist/" in path for _, path, _ in mnist_hub.requests)
        assert read_hub == (not extra)  # no --data-dir: the Hub; --data-dir: the folder only
        fingerprints.append(results["data_fingerprint"])
    assert fingerprints[0] == fingerprints[1]
    assert len(fingerprints[0]) == 64


@pytest.mark.slow  # its own local Hub and a fresh process (~10 s)
def test_tampered_file_on_the_hub_is_refused_before_use(mnist_dir, tmp_path):
    from hub_server import LocalHub

    files = {p.name: p.read_bytes() for p in mnist_dir.iterdir() if p.is_file()}
    blob = bytearray(files[TEST])
    blob[100] ^= 0xFF
    files[TEST] = bytes(blob)
    code = ("from hf_attrib.benchmark.data import build_data, DataIntegrityError; "
            "from hf_attrib.benchmark.settings import get_setting, smoke_setting\n"
            "try:\n    build_data(smoke_setting(get_setting('mnist-lr')))\n"
            "except DataIntegrityError as err:\n    print(str(err).replace('\\n', ' '))")
    with LocalHub(tmp_path / "hub") as hub:
        hub.create_repo("dataset", "ylecun/mnist")
        hub.commit("dataset", "ylecun/mnist", "main", {"summary": "tampered"}, files, [], [])
        line = _python(code, _hub_env(hub, tmp_path))
    assert re.search(rf"snapshots/[0-9a-f]{{40}}/{TEST} does not match SHA256SUMS: expected "
                     rf"sha256 1d14bd6e[0-9a-f]{{56}}, got {hashlib.sha256(blob).hexdigest()}",
                     line), line


# ------------------------------------------------------------------------------ checksums
def test_intact_mnist_copy_passes_and_a_one_byte_change_is_refused(mnist_dir, tmp_path):
    good, bad = tmp_path / "good", tmp_path / "bad"
    shutil.copytree(mnist_dir, good)
    shutil.copytree(mnist_dir, bad)
    assert verify_checksums(good) == [TEST, TRAIN]  # SHA256SUMS order
    blob = bytearray((bad / TRAIN).read_bytes())
    blob[len(blob) // 2] ^= 0x01
    (bad / TRAIN).chmod(0o644)
    (bad / TRAIN).write_bytes(bytes(blob))
    expected = hashlib.sha256((good / TRAIN).read_bytes()).hexdigest()
    actual = hashlib.sha256(bytes(blob)).hexdigest()
    match = (rf"{TRAIN} does not match SHA256SUMS: expected sha256 {expected}, got {actual}\. "
             r"The file is corrupt or was changed; restore an intact copy")
    with pytest.raises(DataIntegrityError, match=match):
        verify_checksums(bad)
    # build_data checks before it reads anything
    with pytest.raises(DataIntegrityError, match=match):
        build_data(smoke_setting(get_setting("mnist-lr")), data_dir=bad)
    assert issubclass(DataIntegrityError, ValueError)


def _listed_folder(tmp_path):
    folder = tmp_path / "data"
    folder.mkdir()
    (folder / "a.parquet").write_bytes(b"parquet bytes")
    _sums(folder, ["a.parquet"])
    return folder


def test_folder_without_checksums_is_not_checked(tmp_path):
    (tmp_path / "a.parquet").write_bytes(b"x")
    assert verify_checksums(tmp_path) == []


@pytest.mark.parametrize("line", ["../outside.parquet", "/etc/passwd", "sub/./a.parquet",
                                  "sub\\a.parquet"])
def test_checksum_list_may_only_name_files_inside_the_folder(tmp_path, line):
    folder = _listed_folder(tmp_path)
    (tmp_path / "outside.parquet").write_bytes(b"secret")
    with open(folder / CHECKSUMS_FILE, "a") as f:
        f.write(f"{'0' * 64}  {line}\n")
    match = (rf"SHA256SUMS, line 2 names {re.escape(repr(line))}, which is not a plain "
             r"relative path inside .*fix or remove that line")
    with pytest.raises(DataIntegrityError, match=match):
        verify_checksums(folder)


def test_symlink_leading_out_of_the_folder_is_refused(tmp_path):
    folder = _listed_folder(tmp_path)
    (tmp_path / "outside.parquet").write_bytes(b"secret")
    (folder / "b.parquet").symlink_to(tmp_path / "outside.parquet")
    _sums(folder, ["a.parquet", "b.parquet"])
    with pytest.raises(DataIntegrityError, match=r"b\.parquet .*leads outside .*a symlink"):
        verify_checksums(folder)


def test_cache_snapshot_links_into_its_blobs_are_allowed(tmp_path):
    repo = tmp_path / "datasets--ylecun--mnist"
    (repo / "blobs").mkdir(parents=True)
    snapshot = repo / "snapshots" / ("a" * 40)
    snapshot.mkdir(parents=True)
    for name, content in (("a.parquet", b"rows"), (CHECKSUMS_FILE, None)):
        if content is None:
            content = f"{hashlib.sha256(b'rows').hexdigest()}  a.parquet\n".encode()
        blob = repo / "blobs" / hashlib.sha256(content).hexdigest()
        blob.write_bytes(content)
        (snapshot / name).symlink_to(os.path.relpath(blob, snapshot))
    assert verify_checksums(snapshot) == ["a.parquet"]


def test_missing_unlisted_and_malformed_entries_are_refused(tmp_path):
    folder = _listed_folder(tmp_path)
    (folder / "extra.parquet").write_bytes(b"unverified rows")
    (folder / "notes.py").write_text("# not data: allowed unlisted\n")
    with pytest.raises(DataIntegrityError, match=r"data files that SHA256SUMS does not list "
                                                 r"\(extra\.parquet\).*remove them or add"):
        verify_checksums(folder)
    (folder / "extra.parquet").unlink()
    (folder / "a.parquet").unlink()
    with pytest.raises(DataIntegrityError, match=r"lists a\.parquet, which is missing"):
        verify_checksums(folder)
    (folder / CHECKSUMS_FILE).write_text("deadbeef a.parquet\n")
    with pytest.raises(DataIntegrityError, match=r"line 1 is not '<64 hex digits>  <file name>'"):
        verify_checksums(folder)


# ------------------------------------------------------------------------------ fingerprint
def test_fingerprint_names_pixels_labels_and_noisy_labels():
    data = build_data(get_setting("digits-lr"))
    assert data.fingerprint == data_fingerprint(data) == build_data(
        get_setting("digits-lr")).fingerprint
    x, y = BenchmarkData.tensors(data.train)
    _, yn = BenchmarkData.tensors(data.noisy_train)

    def variant(train_x=x, train_y=y, noisy_y=yn) -> str:
        import datasets

        def split(xs, ys):
            return datasets.Dataset.from_dict({"pixel_values": xs.double().tolist(),
                                               "label": ys.tolist()})
        return data_fingerprint(replace(data, train=split(train_x, train_y),
                                        noisy_train=split(train_x, noisy_y)))

    assert variant() == data.fingerprint  # rebuilding the same tensors: same fingerprint
    x2, y2, yn2 = x.clone(), y.clone(), yn.clone()
    x2[3, 5] += 1 / 16
    y2[0] = (y2[0] + 1) % 10
    yn2[1] = (yn2[1] + 1) % 10
    changed = {variant(train_x=x2), variant(train_y=y2), variant(noisy_y=yn2)}
    assert len(changed) == 3 and data.fingerprint not in changed
    assert data_fingerprint(replace(data, test=data.test.select(range(1, len(data.test))))) \
        != data.fingerprint


@pytest.mark.slow  # two full-size samples (5,500 decoded images each, ~8 s)
def test_pinned_fingerprint_holds_for_the_copy_and_other_data_warn(mnist_dir, tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        data = build_data(get_setting("mnist_mlp"), mnist_dir)
    assert data.fingerprint == PINNED_FINGERPRINTS["mnist_mlp"] == PINNED_FINGERPRINTS["mnist_lr"]
    other = tmp_path / "other"  # MNIST's test images as the training split: other data
    other.mkdir()
    shutil.copy(mnist_dir / TEST, other / TRAIN)
    with pytest.warns(DataMismatchWarning, match=r"differ from the MNIST copy used there"):
        build_data(get_setting("mnist_lr"), other)


def test_smoke_sample_is_not_checked_against_the_pin(tmp_path):
    folder = _image_folder(tmp_path / "data")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        build_data(smoke_setting(get_setting("mnist-lr")), folder)


# ------------------------------------------------------------------------------ decoding
def test_decoding_only_the_sample_gives_the_decode_everything_tensors(tmp_path):
    import datasets

    folder = _image_folder(tmp_path / "data")
    setting = smoke_setting(get_setting("mnist-lr"))  # 120 train / 12 test of 150 rows
    data = build_data(setting, folder)
    # The former path: decode every image, then index with the seeded permutation.
    split = datasets.load_dataset(str(folder), split="train")
    images = np.stack([np.asarray(im, dtype=np.float32) / 255.0 for im in split["image"]])
    labels = np.asarray(split["label"])
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(setting.seed))
    for part, idx in ((data.train, order[:120]), (data.test, order[120:132])):
        x, y = BenchmarkData.tensors(part)
        assert torch.equal(x, torch.from_numpy(images[idx.numpy()][:, None]))
        assert torch.equal(y, torch.from_numpy(labels[idx.numpy()]))
    noisy = BenchmarkData.tensors(data.noisy_train)[1]
    assert torch.equal(noisy != torch.from_numpy(labels[order[:120].numpy()]),
                       torch.isin(torch.arange(120), data.noisy_indices))


def test_unreachable_hub_is_a_clear_error_naming_data_dir(tmp_path, monkeypatch):
    from hub_server import free_port
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{free_port()}")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "cache"))
    match = r"(?s)could not fetch the dataset ylecun/mnist from the Hub \(.*\); check the conn"
    with pytest.raises(FileNotFoundError, match=match + r".*\(--data-dir\)"):
        build_data(smoke_setting(get_setting("mnist-lr")))
