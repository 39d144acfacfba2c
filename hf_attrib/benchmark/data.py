"""Data builders: the exact, seeded train/test samples of each benchmark setting.

Every builder returns ``datasets.Dataset`` splits (what the Hub repos hold as parquet) and the
benchmark works on their tensors. Sampling is a fixed function of the setting's seed, so the
same setting always yields the same examples in the same order.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import datasets
import numpy as np
import torch
from torch import Tensor

from hf_attrib.benchmark.settings import BenchmarkSetting

__all__ = ["BenchmarkData", "build_data", "flip_labels", "split_tensors"]

# Hub datasets the image settings read (or a local folder / parquet copy of them).
_HUB_IDS = {"mnist": "ylecun/mnist", "cifar10": "uoft-cs/cifar10", "cifar2": "uoft-cs/cifar10"}
_CIFAR2_CLASSES = (3, 5)  # cat, dog


@dataclass
class BenchmarkData:
    """The benchmark sample of a setting.

    Attributes:
        train: training split (``pixel_values``: floats, ``[C, H, W]`` images or flat vectors
            for digits; ``label``).
        test: test split.
        noisy_train: training split with ``noisy_fraction`` of labels flipped, or ``None``.
        noisy_indices: positions of the flipped labels in ``noisy_train``.
    """

    train: datasets.Dataset
    test: datasets.Dataset
    noisy_train: datasets.Dataset | None = None
    noisy_indices: Tensor | None = None

    @staticmethod
    def tensors(split: datasets.Dataset) -> tuple[Tensor, Tensor]:
        """``(x, y)`` tensors of a classification split."""
        columns = split.with_format("torch")[:]
        return columns["pixel_values"].float(), columns["label"].long()


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
    columns = split.with_format("torch")[:]
    return columns["input_ids"].long(), columns["labels"].long()


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


def _split(x: np.ndarray, y: np.ndarray, index: Tensor) -> datasets.Dataset:
    idx = index.numpy()
    return datasets.Dataset.from_dict({
        "pixel_values": x[idx].astype(np.float32).tolist(),
        "label": y[idx].astype(np.int64).tolist(),
    })


def _digits() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    digits = load_digits()
    return digits.data / 16.0, digits.target


def _image_dataset(name: str, data_dir: str | Path | None) -> tuple[np.ndarray, np.ndarray]:
    """MNIST/CIFAR from the Hub (or a local copy) as ``[N, C, H, W]`` floats in [0, 1], labels.

    The training split of the source is sampled (as in the paper); CIFAR-2 keeps cat and dog.
    """
    source = str(data_dir) if data_dir is not None else _HUB_IDS[name]
    if data_dir is not None and not Path(data_dir).exists():
        raise FileNotFoundError(f"data path {data_dir} does not exist; pass a folder with the "
                                f"{name} parquet files or omit it to read {_HUB_IDS[name]}.")
    split = datasets.load_dataset(source, split="train")
    image_col = "image" if "image" in split.column_names else "img"
    label_col = "label" if "label" in split.column_names else "labels"
    if name == "cifar2":
        split = split.filter(lambda y: y in _CIFAR2_CLASSES, input_columns=label_col)
    images = np.stack([np.asarray(im, dtype=np.float32) / 255.0 for im in split[image_col]])
    images = images.transpose(0, 3, 1, 2) if images.ndim == 4 else images[:, None]
    labels = np.asarray(split[label_col])
    if name == "cifar2":
        labels = (labels == _CIFAR2_CLASSES[1]).astype(np.int64)
    return images, labels


def build_data(setting: BenchmarkSetting, data_dir: str | Path | None = None) -> BenchmarkData:
    """Build the setting's benchmark sample (and its noisy-label variant where AUC applies).

    Args:
        setting: the benchmark setting.
        data_dir: a local copy of the source data (for the Hub-backed settings).
    """
    if setting.dataset == "digits":
        x, y = _digits()
    elif setting.dataset in _HUB_IDS:
        x, y = _image_dataset(setting.dataset, data_dir)
    else:
        raise NotImplementedError(
            f"the {setting.dataset!r} data builder (setting {setting.name}) is not available in "
            "this version; the classification settings (digits, mnist, cifar) are."
        )
    train_idx, test_idx = _sample(len(y), setting.n_train, setting.n_test, setting.seed)
    data = BenchmarkData(train=_split(x, y, train_idx), test=_split(x, y, test_idx))
    if "auc" in setting.metrics:
        labels = torch.as_tensor(y[train_idx.numpy()])
        noisy, flipped = flip_labels(labels, setting.noisy_fraction,
                                     setting.model_kwargs["num_labels"], setting.seed)
        data.noisy_train = data.train.remove_columns("label").add_column("label", noisy.tolist())
        data.noisy_indices = flipped
    return data
