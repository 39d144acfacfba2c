"""Multinomial logistic regression (the "LR" model of the dattri MNIST-10 benchmark).

Table 3 of the dattri paper lists 7840 parameters for LR on MNIST-10 and Appendix C describes
"a linear layer and a sigmoid activation layer" whose "linear layer has 7840 parameters in
total": that is a ``784 x 10`` weight matrix **without a bias** (with a bias it would be 7850).
The default here is therefore ``use_bias=False`` (exactly 7840 parameters for MNIST).

The model outputs the linear scores as ``logits``; the loss is the softmax cross-entropy, i.e.
multinomial logistic regression, as in dattri's training code (its ``nn.Module`` also returns
the raw linear outputs, the sigmoid never enters the loss). ``torch.sigmoid(logits)`` gives the
per-class sigmoid activations of the paper's description if they are wanted.

Importing this module registers ``"hf_attrib_logistic_regression"`` with ``AutoConfig``,
``AutoModel`` and ``AutoModelForImageClassification``.
"""

from __future__ import annotations

from typing import Any

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

__all__ = ["LogisticRegressionConfig", "LogisticRegressionModel"]


class LogisticRegressionConfig(ClassifierConfig):
    """Configuration of :class:`LogisticRegressionModel`.

    Args:
        input_dim: number of input features (inputs are flattened; 784 for 28x28 MNIST).
        num_labels: number of classes (ignored when ``id2label`` is given, which then wins).
        use_bias: add a bias to the linear layer. ``False`` (default) gives the paper's 7840
            parameters for MNIST-10; dattri's released code uses ``True`` (7850).
        **kwargs: passed to ``PretrainedConfig``.
    """

    model_type = "hf_attrib_logistic_regression"

    def __init__(
        self,
        input_dim: int = 784,
        num_labels: int = 10,
        use_bias: bool = False,
        **kwargs: Any,
    ) -> None:
        self.input_dim = int(input_dim)
        self.use_bias = bool(use_bias)
        if kwargs.get("id2label") is None:
            kwargs["num_labels"] = num_labels
        super().__init__(**kwargs)


class LogisticRegressionModel(PreTrainedModel):
    """One linear layer ``input_dim -> num_labels`` on flattened inputs.

    Parameter count: ``input_dim * num_labels`` (+ ``num_labels`` with ``use_bias``); 7840 for
    MNIST-10 with the default config, matching Table 3. The layer is called ``classifier``
    (``final_linear_layer_name="classifier"`` for RPS).

    Args:
        config: the model configuration.
    """

    config_class = LogisticRegressionConfig
    base_model_prefix = "logistic_regression"
    main_input_name = "pixel_values"

    def __init__(self, config: LogisticRegressionConfig) -> None:
        super().__init__(config)
        self.classifier = nn.Linear(config.input_dim, config.num_labels, bias=config.use_bias)
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
            pixel_values: ``[B, ...]`` inputs with ``input_dim`` features per example (e.g.
                ``[B, 1, 28, 28]`` or ``[B, 784]``); flattened from dimension 1.
            labels: optional ``[B]`` class indices; adds the mean cross-entropy ``loss``.
            **kwargs: ignored (accepted for ``Trainer`` compatibility).

        Returns:
            ``ImageClassifierOutput`` with ``logits [B, num_labels]`` and ``loss``.
        """
        logits = self.classifier(pixel_values.flatten(1))
        return ImageClassifierOutput(loss=classification_loss(logits, labels), logits=logits)


register_auto(
    LogisticRegressionConfig,
    (AutoModel, LogisticRegressionModel),
    (AutoModelForImageClassification, LogisticRegressionModel),
)
