"""Three-layer MLP classifier (the "MLP" model of the dattri MNIST-10 benchmark).

Appendix C of the dattri paper: "a 3-layer MLP with hidden layer sizes equal to 128 and 64 and
placed dropout layers after the first two linear layers with a rate of 0.1, which results in a
total of about 0.11M parameters". With biases, as in dattri's ``MLPMnist``, the MNIST model has
``784*128+128 + 128*64+64 + 64*10+10 = 109,386`` parameters (Table 3: 0.11M).

Importing this module registers ``"hf_attrib_mlp"`` with ``AutoConfig``, ``AutoModel`` and
``AutoModelForImageClassification``.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn
from transformers import (
    AutoModel,
    AutoModelForImageClassification,
    PreTrainedModel,
)
from transformers.modeling_outputs import ImageClassifierOutput

from hf_attrib.benchmark.models._common import (
    ClassifierConfig,
    classification_loss,
    register_auto,
    torch_default_init,
)

__all__ = ["MLPConfig", "MLPModel"]


class MLPConfig(ClassifierConfig):
    """Configuration of :class:`MLPModel`.

    Args:
        input_dim: number of input features (inputs are flattened; 784 for 28x28 MNIST).
        hidden_sizes: widths of the hidden layers (``(128, 64)``: the paper's 3-layer MLP).
        num_labels: number of classes (ignored when ``id2label`` is given, which then wins).
        dropout: dropout rate after each hidden layer's ReLU.
        **kwargs: passed to ``PretrainedConfig``.
    """

    model_type = "hf_attrib_mlp"

    def __init__(
        self,
        input_dim: int = 784,
        hidden_sizes: Sequence[int] = (128, 64),
        num_labels: int = 10,
        dropout: float = 0.1,
        **kwargs: Any,
    ) -> None:
        self.input_dim = int(input_dim)
        self.hidden_sizes = [int(h) for h in hidden_sizes]
        self.dropout = float(dropout)
        if kwargs.get("id2label") is None:
            kwargs["num_labels"] = num_labels
        super().__init__(**kwargs)


class MLPModel(PreTrainedModel):
    """``Linear -> ReLU -> Dropout`` per hidden layer, then a linear ``classifier``.

    Modules: ``hidden.{i}`` (``nn.Linear``), ``dropouts.{i}`` (``nn.Dropout``, one per hidden
    layer, so :func:`hf_attrib.model_utils.activate_dropout` can pick them individually) and
    ``classifier`` (the final ``nn.Linear``; ``final_linear_layer_name="classifier"`` for RPS).
    109,386 parameters with the default (MNIST-10) config.

    Args:
        config: the model configuration.
    """

    config_class = MLPConfig
    base_model_prefix = "mlp"
    main_input_name = "pixel_values"

    def __init__(self, config: MLPConfig) -> None:
        super().__init__(config)
        widths = [config.input_dim, *config.hidden_sizes]
        self.hidden = nn.ModuleList(nn.Linear(a, b) for a, b in itertools.pairwise(widths))
        self.dropouts = nn.ModuleList(nn.Dropout(config.dropout) for _ in config.hidden_sizes)
        self.classifier = nn.Linear(widths[-1], config.num_labels)
        self.post_init()

    def _init_weights(self, module: nn.Module) -> None:
        """PyTorch's default ``nn.Linear`` initialisation (as in the dattri reference model)."""
        torch_default_init(module)

    def forward(
        self,
        pixel_values: Tensor,
        labels: Tensor | None = None,
        **kwargs: Any,
    ) -> ImageClassifierOutput:
        """Class scores of a batch.

        Args:
            pixel_values: ``[B, ...]`` inputs with ``input_dim`` features per example;
                flattened from dimension 1.
            labels: optional ``[B]`` class indices; adds the mean cross-entropy ``loss``.
            **kwargs: ignored (accepted for ``Trainer`` compatibility).

        Returns:
            ``ImageClassifierOutput`` with ``logits [B, num_labels]`` and ``loss``.
        """
        h = pixel_values.flatten(1)
        for layer, dropout in zip(self.hidden, self.dropouts, strict=True):
            h = dropout(torch.relu(layer(h)))
        logits = self.classifier(h)
        return ImageClassifierOutput(loss=classification_loss(logits, labels), logits=logits)


register_auto(
    MLPConfig,
    (AutoModel, MLPModel),
    (AutoModelForImageClassification, MLPModel),
)
