"""Helpers shared by the benchmark model families: registration, initialisation, counting."""

from __future__ import annotations

import math
from typing import Any

import torch.nn.functional as F
from torch import Tensor, nn
from transformers import AutoConfig, PretrainedConfig, PreTrainedModel

__all__ = [
    "ClassifierConfig",
    "classification_loss",
    "count_parameters",
    "register_auto",
    "torch_default_init",
]


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of scalar parameters of ``model`` (shared tensors counted once).

    Args:
        model: any module.
        trainable_only: count only parameters with ``requires_grad``.

    Returns:
        The parameter count (buffers such as batch-norm running statistics are not counted).
    """
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def torch_default_init(module: nn.Module) -> None:
    """Re-apply PyTorch's own default initialisation to a standard layer.

    Used by the ``_init_weights`` of the image classifiers so that a freshly built model is
    initialised exactly as the plain-PyTorch dattri reference models are. Only ``torch.nn.init``
    functions are used: ``transformers`` guards them while loading a checkpoint, so weights read
    by ``from_pretrained`` are never overwritten.

    Args:
        module: a ``Linear``, ``Conv*``, ``BatchNorm*``, ``LayerNorm`` or ``Embedding`` layer;
            other modules are left unchanged.
    """
    if isinstance(module, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        nn.init.kaiming_uniform_(module.weight, a=math.sqrt(5))
        if module.bias is not None:
            fan_in, _ = nn.init._calculate_fan_in_and_fan_out(module.weight)
            bound = 1.0 / math.sqrt(fan_in) if fan_in > 0 else 0.0
            nn.init.uniform_(module.bias, -bound, bound)
    elif isinstance(module, (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.LayerNorm)):
        if getattr(module, "weight", None) is not None:
            nn.init.ones_(module.weight)
        if getattr(module, "bias", None) is not None:
            nn.init.zeros_(module.bias)
        if getattr(module, "running_mean", None) is not None:
            nn.init.zeros_(module.running_mean)
            nn.init.ones_(module.running_var)
        if getattr(module, "num_batches_tracked", None) is not None:
            nn.init.zeros_(module.num_batches_tracked)
    elif isinstance(module, nn.Embedding):
        nn.init.normal_(module.weight)


def register_auto(
    config_class: type[PretrainedConfig],
    *registrations: tuple[type, type[PreTrainedModel]],
) -> None:
    """Register a config with ``AutoConfig`` and model classes with ``AutoModel*`` classes.

    Registration is idempotent (``exist_ok=True``), so re-importing a module is harmless.

    Args:
        config_class: the config class; its ``model_type`` is the key written to
            ``config.json``.
        *registrations: ``(AutoClass, ModelClass)`` pairs, e.g.
            ``(AutoModelForCausalLM, MusicTransformerForCausalLM)``.
    """
    AutoConfig.register(config_class.model_type, config_class, exist_ok=True)
    for auto_class, model_class in registrations:
        auto_class.register(config_class, model_class, exist_ok=True)


def classification_loss(logits: Tensor, labels: Tensor | None) -> Tensor | None:
    """Mean cross-entropy of ``logits [B, C]`` against class indices ``labels [B]``.

    Args:
        logits: unnormalised class scores.
        labels: class indices (``-100`` entries are ignored), or ``None``.

    Returns:
        The scalar loss, or ``None`` when ``labels`` is ``None``.
    """
    if labels is None:
        return None
    return F.cross_entropy(logits, labels.to(logits.device).long())


class ClassifierConfig(PretrainedConfig):
    """``PretrainedConfig`` that always writes its label maps to ``config.json``.

    ``transformers`` leaves ``id2label`` out of a saved config when it equals the library
    default, which is the two-label map; the benchmark configs default to other label counts
    (10 for MNIST and CIFAR-10), so a saved CIFAR-2 config would otherwise reload with 10 labels.
    """

    def to_diff_dict(self) -> dict[str, Any]:
        """The non-default fields, plus ``id2label``/``label2id``."""
        diff = super().to_diff_dict()
        full = self.to_dict()
        for key in ("id2label", "label2id"):
            if full.get(key) is not None:
                diff[key] = full[key]
        return diff
