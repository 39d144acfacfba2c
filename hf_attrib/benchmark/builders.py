"""A setting's model and functions: what the runner builds and the Hub loaders rebuild.

``build_model`` gives a freshly initialised (seeded) model of a setting, ``setting_functions``
its loss, target and correct-class probability on ``(x, y)`` batches, ``load_state`` puts
trained weights into it. The target math itself lives in :mod:`hf_attrib.func.targets`.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from hf_attrib.benchmark.models import (
    LogisticRegressionConfig,
    LogisticRegressionModel,
    MLPConfig,
    MLPModel,
    MusicTransformerConfig,
    MusicTransformerForCausalLM,
    NanoGPTForCausalLM,
    ResNet9Config,
    ResNet9Model,
    nanogpt_config,
)
from hf_attrib.benchmark.settings import BenchmarkSetting
from hf_attrib.func.targets import (
    correct_class_log_prob,
    correct_class_margin,
    correct_class_probability,
    sequence_log_likelihood,
)
from hf_attrib.task import check_state_dict

__all__ = ["build_model", "classification_functions", "generation_functions", "load_state",
           "setting_functions"]

Functions = dict[str, Callable[..., Tensor] | None]


def build_model(setting: BenchmarkSetting, vocab_size: int | None = None) -> nn.Module:
    """A freshly initialised model of the setting (seeded with ``setting.seed``).

    Args:
        setting: the setting.
        vocab_size: vocabulary of a NanoGPT setting (the tokenizer's).

    Raises:
        NotImplementedError: for an unknown model family.
    """
    torch.manual_seed(setting.seed)
    if setting.model == "nanogpt":
        return NanoGPTForCausalLM(nanogpt_config(vocab_size=vocab_size, **setting.model_kwargs))
    if setting.model == "music_transformer":
        return MusicTransformerForCausalLM(MusicTransformerConfig(**setting.model_kwargs))
    if setting.model == "logistic_regression":
        return LogisticRegressionModel(LogisticRegressionConfig(**setting.model_kwargs))
    if setting.model == "mlp":
        return MLPModel(MLPConfig(**setting.model_kwargs))
    if setting.model == "resnet9":
        return ResNet9Model(ResNet9Config(**setting.model_kwargs))
    raise NotImplementedError(f"no model family {setting.model!r} (setting {setting.name}).")


def classification_functions(model: nn.Module) -> Functions:
    """Loss, margin target and correct-class probability on ``(x, y)`` batches.

    Keys: ``loss``, ``margin`` (batch mean of ``log p/(1-p)``) and ``prob`` take
    ``(params, (x, y))`` as an ``AttributionTask`` does; ``train_loss`` (batch mean
    cross-entropy), ``example_loss`` (its per-example terms) and ``target`` (per-example
    margin) take ``(params, x, y)`` as stacked training and evaluation do.
    """

    def logits(params: dict[str, Tensor], x: Tensor) -> Tensor:
        return torch.func.functional_call(model, params, (x,)).logits

    return {
        "loss": lambda p, b: nn.functional.cross_entropy(logits(p, b[0]), b[1]),
        "margin": lambda p, b: correct_class_margin(logits(p, b[0]), b[1]).mean(),
        "prob": lambda p, b: correct_class_probability(logits(p, b[0]), b[1]).mean(),
        "train_loss": lambda p, x, y: -correct_class_log_prob(logits(p, x), y).mean(),
        "example_loss": lambda p, x, y: -correct_class_log_prob(logits(p, x), y),
        "target": lambda p, x, y: correct_class_margin(logits(p, x), y),
    }


def generation_functions(model: nn.Module) -> Functions:
    """Causal-LM loss and log-likelihood target on ``(input_ids, labels)`` batches.

    The keys of :func:`classification_functions`; ``prob`` is ``None`` (the log-likelihood
    target has no correct-class probability) and the loss is the mean over the batch's scored
    tokens.
    """

    def logits(params: dict[str, Tensor], x: Tensor) -> Tensor:
        return torch.func.functional_call(model, params, (x,)).logits

    def mean_token_loss(params: dict[str, Tensor], x: Tensor, y: Tensor) -> Tensor:
        nll = -sequence_log_likelihood(logits(params, x), y)
        return nll.sum() / (y[:, 1:] != -100).sum().clamp_min(1)

    return {
        "loss": lambda p, b: mean_token_loss(p, b[0], b[1]),
        "margin": lambda p, b: sequence_log_likelihood(logits(p, b[0]), b[1]).mean(),
        "prob": None,
        "train_loss": mean_token_loss,
        "target": lambda p, x, y: sequence_log_likelihood(logits(p, x), y),
    }


def setting_functions(setting: BenchmarkSetting, model: nn.Module) -> Functions:
    """:func:`classification_functions` or :func:`generation_functions`, by the setting's kind."""
    if setting.kind == "classification":
        return classification_functions(model)
    return generation_functions(model)


def load_state(model: nn.Module, state: dict[str, Tensor]) -> None:
    """``load_state_dict`` that accepts tied weights stored once (checked, not silent).

    Raises:
        ValueError: if ``state`` does not fit ``model`` (see
            :func:`hf_attrib.task.check_state_dict`).
    """
    check_state_dict(model, state, "trained state")
    model.load_state_dict(state, strict=False)
