"""Data builders: the exact, seeded train/test samples of each benchmark setting.

Every builder returns ``datasets.Dataset`` splits (what the Hub repos hold as parquet) and the
benchmark works on their tensors. Sampling is a fixed function of the setting's seed, so the
same setting always yields the same examples in the same order; only the sampled images are
decoded.

Source data are checked before use: when the source folder (a ``data_dir``, or the snapshot of
the Hub dataset repo) holds a ``SHA256SUMS`` file, every file it lists must be inside the folder
and match its sha256, and no data file may be missing from it (:func:`verify_checksums`). Each
built sample carries a fingerprint (:func:`data_fingerprint`), a sha256 over its tensors, so that
results and exports name the exact sample; the full-size MNIST samples are checked against
:data:`PINNED_FINGERPRINTS`, the sample the published ground truth was built on.
"""

from __future__ import annotations

import hashlib
import json
import re
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch
from torch import Tensor

from hf_attrib.benchmark.settings import BenchmarkSetting, get_setting
from hf_attrib.files import resolved_inside, sha256_file, snapshot_roots

__all__ = [
    "CHECKSUMS_FILE",
    "PINNED_FINGERPRINTS",
    "BenchmarkData",
    "DataIntegrityError",
    "DataMismatchWarning",
    "build_data",
    "data_fingerprint",
    "flip_labels",
    "split_tensors",
    "verify_checksums",
]

# Hub datasets the image settings read (or a local folder / parquet copy of them).
_HUB_IDS = {"mnist": "ylecun/mnist", "cifar10": "uoft-cs/cifar10", "cifar2": "uoft-cs/cifar10"}
_CIFAR2_CLASSES = (3, 5)  # cat, dog

CHECKSUMS_FILE = "SHA256SUMS"
# Files `datasets` can read as data. With a SHA256SUMS present, each one in the source folder
# must be listed there (an unlisted file could be read unverified); the Hub snapshot fetches
# them all, so that whatever load_dataset reads has been verified.
_DATA_SUFFIXES = ("parquet", "arrow", "csv", "tsv", "json", "jsonl", "txt", "zip", "tar", "gz",
                  "png", "jpg", "jpeg")
_HUB_PATTERNS = [f"*.{s}" for s in _DATA_SUFFIXES] + ["README.md", CHECKSUMS_FILE]
_SUMS_LINE = re.compile(r"^([0-9a-fA-F]{64}) [ *](.+)$")  # `sha256sum` output (text or binary)

# sha256 (see data_fingerprint) of the full-size samples (seed 0, 5,000 train / 500 test, 10%
# flipped labels) the published MNIST ground truth was built on, computed from the checksummed
# MNIST parquet copy (its SHA256SUMS: train b4f35dbf..., test 1d14bd6e...).
_MNIST_FINGERPRINT = "a9765672279777089c806f512eb1ce01434f2e31e3f2430ad6bbe8600812a3b6"
_MNIST_TRAIN_SHA256 = "b4f35dbf6e01d28d5c15996125cdac687cd73570eecdccbfa48e149106163de1"
PINNED_FINGERPRINTS = {"mnist_lr": _MNIST_FINGERPRINT, "mnist_mlp": _MNIST_FINGERPRINT}


class DataIntegrityError(ValueError):
    """A source data file is missing, changed, unlisted in or outside its ``SHA256SUMS``."""


class DataMismatchWarning(UserWarning):
    """A built sample differs from the one the published ground truth was built on."""


@dataclass
class BenchmarkData:
    """The benchmark sample of a setting.

    Attributes:
        train: training split (``pixel_values``: floats, ``[C, H, W]`` images or flat vectors
            for digits; ``label``).
        test: test split.
        noisy_train: training split with ``noisy_fraction`` of labels flipped, or ``None``.
        noisy_indices: positions of the flipped labels in ``noisy_train``.
        fingerprint: :func:`data_fingerprint` of the sample (set by :func:`build_data`).
    """

    train: datasets.Dataset
    test: datasets.Dataset
    noisy_train: datasets.Dataset | None = None
    noisy_indices: Tensor | None = None
    fingerprint: str | None = None

    @staticmethod
    def tensors(split: datasets.Dataset) -> tuple[Tensor, Tensor]:
        """``(x, y)`` tensors of a classification split."""
        return _column_tensor(split, "pixel_values").float(), _column_tensor(split, "label").long()


def _column_tensor(split: datasets.Dataset, column: str) -> Tensor:
    """A column of equal-shaped (nested) lists or scalars as one tensor.

    Read through Arrow (flattening the list levels) rather than ``with_format("torch")``,
    which builds a tensor per innermost list: 0.05 s instead of ~6 s for 5,000 MNIST images.
    Columns that are ragged or hold nulls go through the ``datasets`` formatter.
    """
    array = split.with_format("arrow")[:][column].combine_chunks()
    shape = [len(array)]
    while (pa.types.is_list(array.type) or pa.types.is_large_list(array.type)
           or pa.types.is_fixed_size_list(array.type)) and len(array) and not array.null_count:
        lengths = pc.min_max(pc.list_value_length(array)).as_py()
        if lengths["min"] != lengths["max"]:
            break
        shape.append(lengths["min"])
        array = pc.list_flatten(array)
    numeric = pa.types.is_integer(array.type) or pa.types.is_floating(array.type)
    if numeric and not array.null_count:
        return torch.from_numpy(array.to_numpy(zero_copy_only=False).reshape(shape).copy())
    return split.with_format("torch")[:][column]


def split_tensors(split: datasets.Dataset, kind: str) -> tuple[Tensor, Tensor]:
    """``(x, y)`` tensors of a split of a classification or generation setting.

    Args:
        split: a split (``pixel_values``/``label`` or ``input_ids``/``labels`` columns).
        kind: the setting's kind, ``"classification"`` or ``"generation"``.

    Returns:
        Float inputs and long labels (classification), or long token ids and labels.
    """
    if kind == "classification":
        return BenchmarkData.tensors(split)
    return _column_tensor(split, "input_ids").long(), _column_tensor(split, "labels").long()


def flip_labels(labels: Tensor, fraction: float, num_labels: int, seed: int
                ) -> tuple[Tensor, Tensor]:
    """Flip ``fraction`` of the labels to a different, uniformly chosen class.

    Returns:
        ``(noisy_labels, flipped_indices)`` (indices sorted).
    """
    gen = torch.Generator().manual_seed(seed + 7919)
    count = round(fraction * labels.shape[0])
    flipped = torch.randperm(labels.shape[0], generator=gen)[:count].sort().values
    shift = torch.randint(1, num_labels, (count,), generator=gen)
    noisy = labels.clone()
    noisy[flipped] = (labels[flipped] + shift) % num_labels
    return noisy, flipped


def _sample(n_total: int, n_train: int, n_test: int, seed: int) -> tuple[Tensor, Tensor]:
    if n_train + n_test > n_total:
        raise ValueError(f"the data has {n_total} examples, fewer than the setting's "
                         f"{n_train} train + {n_test} test.")
    order = torch.randperm(n_total, generator=torch.Generator().manual_seed(seed))
    return order[:n_train], order[n_train:n_train + n_test]


def _split(x: np.ndarray, y: np.ndarray) -> datasets.Dataset:
    return datasets.Dataset.from_dict({
        "pixel_values": x.astype(np.float32).tolist(),
        "label": y.astype(np.int64).tolist(),
    })


# --------------------------------------------------------------------------------------------
# Checksums of the source folder
# --------------------------------------------------------------------------------------------
def _listed_path(folder: Path, name: str, line: int) -> Path:
    """The resolved path of a file ``SHA256SUMS`` names, refused unless it lies in ``folder``."""
    where = f"{folder / CHECKSUMS_FILE}, line {line}"
    parts = name.split("/")
    if name.startswith("/") or "\\" in name or any(p in ("", ".", "..") for p in parts):
        raise DataIntegrityError(
            f"{where} names {name!r}, which is not a plain relative path inside {folder}; a "
            f"checksum list may only name files inside its folder: fix or remove that line.")
    resolved = resolved_inside(folder, name, snapshot_roots(folder))
    if resolved is None:
        raise DataIntegrityError(
            f"{folder / name} (named by {where}) leads outside {folder} (to "
            f"{(folder / name).resolve()}): a "
            "symlink points out of the folder; replace it with the file itself.")
    return resolved


def _read_checksums(folder: Path) -> dict[str, tuple[str, int]]:
    """``{name: (sha256, line)}`` of the ``SHA256SUMS`` of ``folder`` (``sha256sum`` format)."""
    sums: dict[str, tuple[str, int]] = {}
    text = (folder / CHECKSUMS_FILE).read_text(encoding="utf-8")
    for line, raw in enumerate(text.splitlines(), start=1):
        if not raw.strip() or raw.startswith("#"):
            continue
        m = _SUMS_LINE.match(raw.rstrip("\r"))
        if m is None:
            raise DataIntegrityError(
                f"{folder / CHECKSUMS_FILE}, line {line} is not '<64 hex digits>  <file name>' "
                f"(the output of `sha256sum`): {raw[:120]!r}; rewrite the list with "
                f"`sha256sum <files> > {CHECKSUMS_FILE}`.")
        if m.group(2) in sums:
            raise DataIntegrityError(f"{folder / CHECKSUMS_FILE} lists {m.group(2)!r} twice "
                                     f"(lines {sums[m.group(2)][1]} and {line}); keep one line.")
        sums[m.group(2)] = (m.group(1).lower(), line)
    return sums


def _unlisted_data_files(folder: Path, listed: set[str]) -> list[str]:
    """Data files (``_DATA_SUFFIXES``) under ``folder`` that the checksum list does not name;
    hidden folders (``.cache``, ``.git``) are skipped."""
    found = []
    for path in sorted(folder.rglob("*")):
        name = path.relative_to(folder).as_posix()
        if any(part.startswith(".") for part in path.relative_to(folder).parts[:-1]):
            continue
        if path.suffix.lstrip(".").lower() in _DATA_SUFFIXES and name not in listed:
            found.append(name)
    return found


def verify_checksums(folder: str | Path) -> list[str]:
    """Verify the source files of ``folder`` against its ``SHA256SUMS``, if it has one.

    Every file the list names must lie inside the folder (no absolute names, ``..`` or
    symlinks leading out; a Hugging Face cache snapshot may link into its repo's ``blobs``),
    exist and match its sha256, and every data file of the folder (``*.parquet``, ``*.csv``,
    ...) must be listed, so that nothing is read unverified.

    Args:
        folder: the source folder (a ``--data-dir`` copy or a Hub snapshot).

    Returns:
        The names verified, in list order; ``[]`` when the folder has no ``SHA256SUMS``.

    Raises:
        DataIntegrityError: naming the file, what is wrong (expected and actual sha256 for a
            changed file) and the fix.
    """
    folder = Path(folder)
    if not (folder / CHECKSUMS_FILE).is_file():
        return []
    sums = _read_checksums(folder)
    fix = ("restore an intact copy (copy the data folder again; for a Hub download, delete the "
           "repo's folder in the Hugging Face cache and run again) or, if the file was changed "
           f"on purpose, update its line in {CHECKSUMS_FILE} (`sha256sum <file>`).")
    for name, (expected, line) in sums.items():
        path = _listed_path(folder, name, line)
        if not path.is_file():
            raise DataIntegrityError(f"{CHECKSUMS_FILE} of {folder} lists {name}, which is "
                                     f"missing; {fix}")
        actual = sha256_file(path)
        if actual != expected:
            raise DataIntegrityError(
                f"{folder / name} does not match {CHECKSUMS_FILE}: expected sha256 {expected}, "
                f"got {actual}. The file is corrupt or was changed; {fix}")
    unlisted = _unlisted_data_files(folder, set(sums))
    if unlisted:
        raise DataIntegrityError(
            f"{folder} has data files that {CHECKSUMS_FILE} does not list ({', '.join(unlisted)}"
            "), so they cannot be verified and are refused; remove them or add their lines "
            f"(`sha256sum <file> >> {CHECKSUMS_FILE}`).")
    return list(sums)


# --------------------------------------------------------------------------------------------
# Sources: the row count first, then only the sampled rows
# --------------------------------------------------------------------------------------------
_Take = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]


def _digits() -> tuple[int, _Take]:
    from sklearn.datasets import load_digits

    digits = load_digits()
    x, y = digits.data / 16.0, digits.target
    return len(y), lambda idx: (x[idx], y[idx])


def _checked_source(name: str, data_dir: str | Path | None) -> tuple[str, str | None]:
    """``(path or repo id, revision)`` to load, after checking the source's checksums.

    A Hub dataset is first fetched (its data files, card and ``SHA256SUMS``) into the Hugging
    Face cache and verified; ``load_dataset(repo_id, revision=<that commit>)`` then reads the
    very files verified, from the same cache.
    """
    if data_dir is not None:
        if not Path(data_dir).exists():
            raise FileNotFoundError(f"data path {data_dir} does not exist; pass a folder with "
                                    f"the {name} parquet files or omit it to read "
                                    f"{_HUB_IDS[name]}.")
        if Path(data_dir).is_dir():
            verify_checksums(data_dir)
        return str(data_dir), None
    from huggingface_hub import snapshot_download

    repo_id = _HUB_IDS[name]
    try:
        snapshot = Path(snapshot_download(repo_id, repo_type="dataset",
                                          allow_patterns=_HUB_PATTERNS))
    except Exception as err:  # offline, unreachable, missing repo: one message with the fix
        raise FileNotFoundError(
            f"could not fetch the dataset {repo_id} from the Hub ({type(err).__name__}: {err}); "
            "check the connection (HF_ENDPOINT, HF_HUB_OFFLINE), or pass a local copy of it as "
            "data_dir (--data-dir).") from err
    verify_checksums(snapshot)
    # The snapshot folder is named by the commit it holds (.../snapshots/<commit sha>).
    revision = snapshot.name if re.fullmatch(r"[0-9a-f]{40}", snapshot.name) else None
    return repo_id, revision


def _image_source(name: str, data_dir: str | Path | None) -> tuple[int, _Take]:
    """MNIST/CIFAR from the Hub (or a local copy): the row count and a function giving the
    rows at given positions as ``[n, C, H, W]`` floats in [0, 1] and labels.

    The training split of the source is sampled (as in the paper); CIFAR-2 keeps cat and dog.
    Only the rows asked for are decoded (PNG decoding of all 60,000 rows dominated the time).
    """
    source, revision = _checked_source(name, data_dir)
    split = datasets.load_dataset(source, split="train", revision=revision)
    image_col = "image" if "image" in split.column_names else "img"
    label_col = "label" if "label" in split.column_names else "labels"
    if name == "cifar2":
        split = split.filter(lambda y: y in _CIFAR2_CLASSES, input_columns=label_col)

    def take(idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        rows = split.select(idx)[:]  # one batch: decodes only these rows' images
        images = np.stack([np.asarray(im, dtype=np.float32) / 255.0 for im in rows[image_col]])
        images = images.transpose(0, 3, 1, 2) if images.ndim == 4 else images[:, None]
        labels = np.asarray(rows[label_col])
        if name == "cifar2":
            labels = (labels == _CIFAR2_CLASSES[1]).astype(np.int64)
        return images, labels

    return len(split), take


# --------------------------------------------------------------------------------------------
# Fingerprint
# --------------------------------------------------------------------------------------------
def _split_arrays(split: datasets.Dataset, labels_only: bool = False) -> list[tuple[str, Tensor]]:
    if "pixel_values" in split.column_names:
        x, y = BenchmarkData.tensors(split)
        names = ("pixel_values", "label")
    else:
        x, y = split_tensors(split, "generation")
        names = ("input_ids", "labels")
    return [(names[1], y)] if labels_only else [(names[0], x), (names[1], y)]


def data_fingerprint(data: BenchmarkData) -> str:
    """sha256 of a benchmark sample: the tensors the benchmark trains and evaluates on.

    Covers, in order, the training inputs and labels, the test inputs and labels, and (for
    AUC settings) the noisy labels and flipped positions, each as its name, dtype, shape and
    little-endian bytes (inputs as float32, as :meth:`BenchmarkData.tensors` gives them). Two
    samples with the same fingerprint are the same examples in the same order.

    Args:
        data: the sample.

    Returns:
        64 lowercase hex digits.
    """
    h = hashlib.sha256(b"hf-attrib-sample/1")
    parts = [("train", data.train, False), ("test", data.test, False)]
    if data.noisy_train is not None:  # its inputs are the training inputs: labels only
        parts.append(("noisy_train", data.noisy_train, True))
    tensors = [(f"{split_name}.{column}", t) for split_name, split, labels_only in parts
               for column, t in _split_arrays(split, labels_only)]
    if data.noisy_indices is not None:
        tensors.append(("noisy_indices", data.noisy_indices.long()))
    for name, tensor in tensors:
        array = tensor.contiguous().numpy()
        array = array.astype(array.dtype.newbyteorder("<"), copy=False)
        h.update(json.dumps([name, str(array.dtype), list(array.shape)]).encode())
        h.update(array.tobytes())
    return h.hexdigest()


def _check_pinned(setting: BenchmarkSetting, fingerprint: str) -> None:
    """Warn when a full-size sample with a pinned fingerprint came out different."""
    pinned = PINNED_FINGERPRINTS.get(setting.name)
    if pinned is None or fingerprint == pinned:
        return
    published = get_setting(setting.name)
    sample = ("dataset", "seed", "n_train", "n_test", "noisy_fraction", "metrics")
    if any(getattr(setting, f) != getattr(published, f) for f in sample):
        return  # another sample (e.g. --smoke): nothing pinned for it
    warnings.warn(
        f"the {setting.name} sample built from this source data has fingerprint {fingerprint}, "
        f"not {pinned}, the one the published ground truth was built on: the source data "
        "differ from the MNIST copy used there (other images, labels or order), so results are "
        "not comparable with the published ones; build from that copy (the 60,000 classic "
        "training images in their original order: its train parquet has sha256 "
        f"{_MNIST_TRAIN_SHA256[:12]}...) or one with the same images in the same order.",
        DataMismatchWarning, stacklevel=3)


# --------------------------------------------------------------------------------------------
# Build
# --------------------------------------------------------------------------------------------
def build_data(setting: BenchmarkSetting, data_dir: str | Path | None = None) -> BenchmarkData:
    """Build the setting's benchmark sample (and its noisy-label variant where AUC applies).

    The sample positions are drawn from the source's row count first, then only those rows
    are decoded. The sample's :func:`data_fingerprint` is recorded in ``fingerprint``; for the
    full-size MNIST settings a fingerprint other than the pinned one warns
    (:class:`DataMismatchWarning`).

    Args:
        setting: the benchmark setting.
        data_dir: a local copy of the source data (for the Hub-backed settings); without it
            they are read from the Hub (``datasets.load_dataset("ylecun/mnist")``).

    Raises:
        FileNotFoundError: ``data_dir`` does not exist.
        DataIntegrityError: the source folder's ``SHA256SUMS`` does not match its files.
        ValueError: the source has fewer examples than the setting samples.
    """
    if setting.dataset == "digits":
        n_total, take = _digits()
    elif setting.dataset in _HUB_IDS:
        n_total, take = _image_source(setting.dataset, data_dir)
    else:
        raise NotImplementedError(
            f"the {setting.dataset!r} data builder (setting {setting.name}) is not available in "
            "this version; the classification settings (digits, mnist, cifar) are."
        )
    train_idx, test_idx = _sample(n_total, setting.n_train, setting.n_test, setting.seed)
    x_train, y_train = take(train_idx.numpy())
    data = BenchmarkData(train=_split(x_train, y_train), test=_split(*take(test_idx.numpy())))
    if "auc" in setting.metrics:
        noisy, flipped = flip_labels(torch.as_tensor(y_train), setting.noisy_fraction,
                                     setting.model_kwargs["num_labels"], setting.seed)
        data.noisy_train = data.train.remove_columns("label").add_column("label", noisy.tolist())
        data.noisy_indices = flipped
    data.fingerprint = data_fingerprint(data)
    _check_pinned(setting, data.fingerprint)
    return data
