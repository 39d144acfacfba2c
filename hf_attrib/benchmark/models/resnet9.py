"""ResNet-9 for CIFAR-2 / CIFAR-10 (the image model of the dattri benchmark).

Which ResNet-9? Table 3 of the dattri paper gives 4.83M parameters for both CIFAR settings
(Appendix C also says "about 0.38M" once, and then "roughly 4.83M trainable parameters"). The
widely used Myrtle/DAWNBench ResNet-9 (``64, 128 + res(128), 256, 512 + res(512)``) has
6,573,130 parameters for 10 classes, 36% more than Table 3, and the 0.38M figure matches no
ResNet-9 with a 64-channel stem. The 4.83M figure is matched *exactly* by the network in dattri's
own code (``dattri/benchmark/models/resnet9/resnet9.py``), which is what is implemented here:

* stem: ``conv3x3(C_in -> 64) - BN - ReLU - Dropout``;
* three residual basic blocks ``64 -> 128`` (stride 1), ``128 -> 256`` (stride 2) and
  ``256 -> 512`` (stride 2), each ``conv3x3 - BN - ReLU - Dropout - conv3x3 - BN - ReLU -
  Dropout`` plus a ``conv1x1 - BN - Dropout`` projection shortcut, then ReLU after the sum;
* global average pooling and a linear ``classifier``.

That is 1 + 3 x 2 = 7 convolutions on the main path, plus the classifier: 8 weight layers on
the longest path and 3 shortcut projections. Convolutions have no bias. Parameter count:
**4,829,258** for CIFAR-10 (``num_labels=10``; Table 3: 4.83M) and 4,825,154 for CIFAR-2.
Dropout (rate 0.1) follows every convolution block, as in Appendix C.

Per-example gradients (``torch.func.vmap``) need the model in eval mode, where batch norm uses
its running statistics (``AttributionTask`` puts models in eval mode).

Importing this module registers ``"hf_attrib_resnet9"`` with ``AutoConfig``, ``AutoModel`` and
``AutoModelForImageClassification``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch.nn.functional as F
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

__all__ = ["ResNet9BasicBlock", "ResNet9Config", "ResNet9Model"]


class ResNet9Config(ClassifierConfig):
    """Configuration of :class:`ResNet9Model`.

    Args:
        num_channels: input image channels (3 for CIFAR).
        num_labels: number of classes (10 for CIFAR-10, 2 for CIFAR-2; ignored when
            ``id2label`` is given, which then wins).
        dropout: dropout rate after every convolution block.
        stem_channels: output channels of the stem convolution.
        hidden_sizes: output channels of the three residual blocks.
        strides: stride of the first convolution of each residual block.
        batch_norm_eps: epsilon of the batch-norm layers.
        batch_norm_momentum: momentum of the batch-norm running statistics.
        **kwargs: passed to ``PretrainedConfig``.
    """

    model_type = "hf_attrib_resnet9"

    def __init__(
        self,
        num_channels: int = 3,
        num_labels: int = 10,
        dropout: float = 0.1,
        stem_channels: int = 64,
        hidden_sizes: Sequence[int] = (128, 256, 512),
        strides: Sequence[int] = (1, 2, 2),
        batch_norm_eps: float = 1e-5,
        batch_norm_momentum: float = 0.1,
        **kwargs: Any,
    ) -> None:
        if len(hidden_sizes) != len(strides):
            raise ValueError(f"hidden_sizes ({len(hidden_sizes)}) and strides ({len(strides)}) "
                             "must have the same length.")
        self.num_channels = int(num_channels)
        self.dropout = float(dropout)
        self.stem_channels = int(stem_channels)
        self.hidden_sizes = [int(h) for h in hidden_sizes]
        self.strides = [int(s) for s in strides]
        self.batch_norm_eps = float(batch_norm_eps)
        self.batch_norm_momentum = float(batch_norm_momentum)
        if kwargs.get("id2label") is None:
            kwargs["num_labels"] = num_labels
        super().__init__(**kwargs)


class ResNet9BasicBlock(nn.Module):
    """Residual basic block with dropout after each convolution block.

    Args:
        in_channels: input channels.
        out_channels: output channels.
        stride: stride of the first convolution (and of the projection shortcut).
        config: supplies the dropout rate and batch-norm settings.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int,
                 config: ResNet9Config) -> None:
        super().__init__()
        eps, momentum = config.batch_norm_eps, config.batch_norm_momentum
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels, eps=eps, momentum=momentum)
        self.dropout1 = nn.Dropout(config.dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels, eps=eps, momentum=momentum)
        self.dropout2 = nn.Dropout(config.dropout)
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False),
                nn.BatchNorm2d(out_channels, eps=eps, momentum=momentum),
                nn.Dropout(config.dropout),
            )
        else:
            self.shortcut = nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        """``relu(main(x) + shortcut(x))``."""
        out = self.dropout1(F.relu(self.bn1(self.conv1(x))))
        out = self.dropout2(F.relu(self.bn2(self.conv2(out))))
        return F.relu(out + self.shortcut(x))


class ResNet9Model(PreTrainedModel):
    """ResNet-9 image classifier (dattri's variant; 4,829,258 parameters for CIFAR-10).

    Modules: ``stem_conv``/``stem_bn``/``stem_dropout``, ``layers.{0,1,2}``
    (:class:`ResNet9BasicBlock`) and ``classifier`` (the final ``nn.Linear``;
    ``final_linear_layer_name="classifier"`` for RPS).

    Args:
        config: the model configuration.
    """

    config_class = ResNet9Config
    base_model_prefix = "resnet9"
    main_input_name = "pixel_values"

    def __init__(self, config: ResNet9Config) -> None:
        super().__init__(config)
        self.stem_conv = nn.Conv2d(config.num_channels, config.stem_channels, 3, padding=1,
                                   bias=False)
        self.stem_bn = nn.BatchNorm2d(config.stem_channels, eps=config.batch_norm_eps,
                                      momentum=config.batch_norm_momentum)
        self.stem_dropout = nn.Dropout(config.dropout)
        blocks = []
        in_channels = config.stem_channels
        for out_channels, stride in zip(config.hidden_sizes, config.strides, strict=True):
            blocks.append(ResNet9BasicBlock(in_channels, out_channels, stride, config))
            in_channels = out_channels
        self.layers = nn.ModuleList(blocks)
        self.classifier = nn.Linear(in_channels, config.num_labels)
        self.post_init()

    def _init_weights(self, module: nn.Module) -> None:
        """PyTorch's default initialisation (as in the dattri reference model)."""
        torch_default_init(module)

    def forward(
        self,
        pixel_values: Tensor,
        labels: Tensor | None = None,
        **kwargs: Any,
    ) -> ImageClassifierOutput:
        """Class scores of a batch of images.

        Args:
            pixel_values: ``[B, num_channels, H, W]`` images (32x32 for CIFAR).
            labels: optional ``[B]`` class indices; adds the mean cross-entropy ``loss``.
            **kwargs: ignored (accepted for ``Trainer`` compatibility).

        Returns:
            ``ImageClassifierOutput`` with ``logits [B, num_labels]`` and ``loss``.
        """
        h = self.stem_dropout(F.relu(self.stem_bn(self.stem_conv(pixel_values))))
        for block in self.layers:
            h = block(h)
        logits = self.classifier(h.mean(dim=(2, 3)))
        return ImageClassifierOutput(loss=classification_loss(logits, labels), logits=logits)


register_auto(
    ResNet9Config,
    (AutoModel, ResNet9Model),
    (AutoModelForImageClassification, ResNet9Model),
)
