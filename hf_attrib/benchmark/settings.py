"""The benchmark settings of the paper (Table 3, Appendix C) plus offline digits settings.

A setting fixes everything that makes a benchmark number comparable: the model architecture,
the data and its seeded train/test sample, the training recipe, the target function and the
metrics it is evaluated with. ``get_setting("digits-lr")`` returns one; ``SETTINGS`` lists all;
``smoke_setting`` shrinks one to a few seconds of work (``--smoke``).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

__all__ = ["SETTINGS", "BenchmarkSetting", "TrainConfig", "get_setting", "smoke_setting"]


@dataclass(frozen=True)
class TrainConfig:
    """How the benchmark's models are trained (Appendix C).

    Attributes:
        optimizer: ``"sgd"`` or ``"adam"``.
        lr: learning rate.
        momentum: SGD momentum.
        betas: Adam betas.
        weight_decay: L2 penalty (PyTorch optimizer semantics).
        batch_size: mini-batch size.
        epochs: passes over the training subset.
    """

    optimizer: str
    lr: float
    momentum: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 0.0
    batch_size: int = 64
    epochs: int = 20


@dataclass(frozen=True)
class BenchmarkSetting:
    """One benchmark setting.

    Attributes:
        name: registry key, e.g. ``"mnist_lr"``.
        kind: ``"classification"`` (target: the margin ``log p/(1-p)`` of the true class) or
            ``"generation"`` (target: the log-likelihood of the test sequence/event).
        model: model family (``"logistic_regression"``, ``"mlp"``, ``"resnet9"``,
            ``"music_transformer"``, ``"nanogpt"``).
        model_kwargs: configuration arguments of the model.
        dataset: data source (``"digits"``, ``"mnist"``, ``"cifar2"``, ``"cifar10"``,
            ``"maestro"``, ``"shakespeare"``).
        n_train: training examples sampled for the benchmark.
        n_test: test examples sampled (generated samples for generative settings).
        train: the training recipe.
        metrics: metrics the paper evaluates on this setting (``"loo"``, ``"lds"``, ``"auc"``).
        noisy_fraction: fraction of training labels flipped for the noisy-label (AUC) variant.
        lds_models: models trained on random half subsets (the first half serve ensembling
            methods, the second half are the LDS ground truth).
        lds_fraction: subset size as a fraction of ``n_train``.
        seed: seed of the data sample, subsets and label noise.
        offline: whether the data ships with an installed package (runs without a network).
        description: one line for ``hf-attrib bench list``.
        license: data license (Appendix C).
    """

    name: str
    kind: str
    model: str
    model_kwargs: dict[str, Any]
    dataset: str
    n_train: int
    n_test: int
    train: TrainConfig
    metrics: tuple[str, ...]
    description: str
    license: str
    noisy_fraction: float = 0.1
    lds_models: int = 100
    lds_fraction: float = 0.5
    seed: int = 0
    offline: bool = False
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def ensemble_model_ids(self) -> range:
        """LDS models used by methods that ensemble (the first half)."""
        return range(self.lds_models // 2)

    @property
    def ground_truth_model_ids(self) -> range:
        """LDS models that form the ground truth (the second half)."""
        return range(self.lds_models // 2, self.lds_models)


_MNIST_SGD = dict(optimizer="sgd", lr=0.01, momentum=0.9, batch_size=64)
_SETTINGS = [
    BenchmarkSetting(
        name="mnist_lr", kind="classification", model="logistic_regression",
        model_kwargs=dict(input_dim=784, num_labels=10), dataset="mnist",
        n_train=5000, n_test=500, train=TrainConfig(**_MNIST_SGD, epochs=20),
        metrics=("loo", "lds", "auc"), license="cc-by-sa-3.0",
        description="Logistic regression on MNIST-10 (7,840 parameters)",
    ),
    BenchmarkSetting(
        name="mnist_mlp", kind="classification", model="mlp",
        model_kwargs=dict(input_dim=784, hidden_sizes=(128, 64), num_labels=10, dropout=0.1),
        dataset="mnist", n_train=5000, n_test=500, train=TrainConfig(**_MNIST_SGD, epochs=50),
        metrics=("loo", "lds", "auc"), license="cc-by-sa-3.0",
        description="3-layer MLP (128, 64; dropout 0.1) on MNIST-10 (0.11M parameters)",
    ),
    BenchmarkSetting(
        name="cifar2_resnet9", kind="classification", model="resnet9",
        model_kwargs=dict(num_channels=3, num_labels=2, dropout=0.1), dataset="cifar2",
        n_train=5000, n_test=500, train=TrainConfig(**_MNIST_SGD, epochs=50),
        metrics=("lds",), license="cc-by-4.0",
        description="ResNet-9 on CIFAR-2 (cat vs dog)",
    ),
    BenchmarkSetting(
        name="cifar10_resnet9", kind="classification", model="resnet9",
        model_kwargs=dict(num_channels=3, num_labels=10, dropout=0.1), dataset="cifar10",
        n_train=5000, n_test=500, train=TrainConfig(**_MNIST_SGD, epochs=50),
        metrics=("auc",), license="cc-by-4.0",
        description="ResNet-9 on CIFAR-10 (noisy-label detection)",
    ),
    BenchmarkSetting(
        name="maestro_musictransformer", kind="generation", model="music_transformer",
        model_kwargs=dict(num_hidden_layers=6, num_attention_heads=8, hidden_size=512,
                          intermediate_size=1024),
        dataset="maestro", n_train=5000, n_test=178,
        train=TrainConfig(optimizer="adam", lr=1e-4, betas=(0.9, 0.98), batch_size=64,
                          epochs=20),
        metrics=("lds",), license="cc-by-nc-sa-4.0",
        description="Music Transformer on MAESTRO v2.0.0 (388-event vocabulary)",
        extra=dict(seq_len=256),
    ),
    BenchmarkSetting(
        name="shakespeare_nanogpt", kind="generation", model="nanogpt",
        model_kwargs=dict(n_layer=6, n_head=6, n_embd=384, block_size=256), dataset="shakespeare",
        n_train=3921, n_test=435,
        # Appendix C: "train the model for 5000" (steps: nanoGPT's shakespeare_char default);
        # 40 epochs of 3921 blocks at batch 32 are 4,920 steps.
        train=TrainConfig(optimizer="adam", lr=1e-3, betas=(0.9, 0.99), batch_size=32,
                          epochs=40),
        metrics=("lds",), license="public-domain",
        description="NanoGPT on Tiny Shakespeare, character level, blocks of 256",
    ),
    BenchmarkSetting(
        name="digits_lr", kind="classification", model="logistic_regression",
        model_kwargs=dict(input_dim=64, num_labels=10), dataset="digits",
        n_train=1000, n_test=200, train=TrainConfig(**_MNIST_SGD, epochs=20),
        metrics=("loo", "lds", "auc"), license="bsd-3-clause", offline=True,
        description="Logistic regression on scikit-learn's 8x8 digits (offline MNIST stand-in)",
    ),
    BenchmarkSetting(
        name="digits_mlp", kind="classification", model="mlp",
        model_kwargs=dict(input_dim=64, hidden_sizes=(128, 64), num_labels=10, dropout=0.1),
        dataset="digits", n_train=1000, n_test=200, train=TrainConfig(**_MNIST_SGD, epochs=50),
        metrics=("loo", "lds", "auc"), license="bsd-3-clause", offline=True,
        description="3-layer MLP on scikit-learn's 8x8 digits (offline MNIST stand-in)",
    ),
]

SETTINGS: dict[str, BenchmarkSetting] = {s.name: s for s in _SETTINGS}


def get_setting(name: str) -> BenchmarkSetting:
    """Look a setting up by name; ``digits-lr`` and ``digits_lr`` are the same.

    Raises:
        KeyError: naming the known settings.
    """
    key = name.strip().lower().replace("-", "_")
    if key not in SETTINGS:
        known = ", ".join(n.replace("_", "-") for n in SETTINGS)
        raise KeyError(f"unknown benchmark setting {name!r}; known settings: {known} "
                       "(see `hf-attrib bench list`).")
    return SETTINGS[key]


# Smoke runs shrink the data, the number of models and the architectures' widths.
_SMOKE_MODEL = {
    "resnet9": dict(stem_channels=8, hidden_sizes=(16, 32, 64)),
    "music_transformer": dict(num_hidden_layers=2, num_attention_heads=2, hidden_size=32,
                              intermediate_size=64, max_position_embeddings=64),
    "nanogpt": dict(n_layer=1, n_head=2, n_embd=32, block_size=32),
}


def smoke_setting(setting: BenchmarkSetting) -> BenchmarkSetting:
    """The smoke-test version of a setting (``--smoke``): a pipeline check, not a benchmark.

    At most 120 training and 12 test examples, 8 LDS models, 3 epochs, narrow architectures
    and 32-token sequences.

    Args:
        setting: the setting.

    Returns:
        The shrunk setting (same name).
    """
    train = replace(setting.train, epochs=min(setting.train.epochs, 3))
    model_kwargs = {**setting.model_kwargs, **_SMOKE_MODEL.get(setting.model, {})}
    extra = {**setting.extra, "seq_len": 32} if "seq_len" in setting.extra else setting.extra
    return replace(setting, n_train=min(setting.n_train, 120), n_test=min(setting.n_test, 12),
                   lds_models=8, train=train, model_kwargs=model_kwargs, extra=extra)
