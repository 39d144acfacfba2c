"""The models of the dattri benchmark settings as ``transformers`` models.

Every family is a ``PretrainedConfig``/``PreTrainedModel`` pair registered with the ``Auto``
classes on import, so checkpoints round-trip through ``save_pretrained`` and
``AutoModel*.from_pretrained`` (safetensors). Import this package before loading a saved
checkpoint of a custom family (``model_type`` ``"hf_attrib_*"``) with an ``Auto`` class.

Exact parameter counts of the default models against Table 3 of the dattri paper:

* MNIST-10 LR, ``LogisticRegressionModel``: 7,840 (no bias; Table 3: 7840).
* MNIST-10 MLP, ``MLPModel``: 109,386 (0.11M).
* CIFAR-2 / CIFAR-10 ResNet-9, ``ResNet9Model``: 4,825,154 / 4,829,258 (4.83M).
* MAESTRO Music Transformer, ``MusicTransformerForCausalLM``: 13,803,910 with the 390-token
  vocabulary (13.3M; +3.8%).
* Shakespeare NanoGPT, ``NanoGPTForCausalLM`` (``GPT2LMHeadModel``): 10,770,816 with 65
  characters, ``lm_head`` tied (10.7M; +0.7%).

See each module's docstring for how the architecture was chosen.
"""

from __future__ import annotations

from hf_attrib.benchmark.models._common import count_parameters
from hf_attrib.benchmark.models.logistic_regression import (
    LogisticRegressionConfig,
    LogisticRegressionModel,
)
from hf_attrib.benchmark.models.mlp import MLPConfig, MLPModel
from hf_attrib.benchmark.models.music_transformer import (
    NUM_MIDI_EVENTS,
    TOKEN_END,
    TOKEN_PAD,
    MusicTransformerConfig,
    MusicTransformerForCausalLM,
    MusicTransformerModel,
    causal_lm_loss,
)
from hf_attrib.benchmark.models.nanogpt import NanoGPTForCausalLM, nanogpt_config
from hf_attrib.benchmark.models.resnet9 import ResNet9Config, ResNet9Model

__all__ = [
    "IMPLEMENTED_PARAMETER_COUNTS",
    "NUM_MIDI_EVENTS",
    "PARAMETER_COUNTS",
    "TOKEN_END",
    "TOKEN_PAD",
    "LogisticRegressionConfig",
    "LogisticRegressionModel",
    "MLPConfig",
    "MLPModel",
    "MusicTransformerConfig",
    "MusicTransformerForCausalLM",
    "MusicTransformerModel",
    "NanoGPTForCausalLM",
    "ResNet9Config",
    "ResNet9Model",
    "causal_lm_loss",
    "count_parameters",
    "nanogpt_config",
]

#: Parameter sizes of the benchmark models as printed in Table 3 of the dattri paper.
PARAMETER_COUNTS: dict[str, int] = {
    "mnist_lr": 7_840,
    "mnist_mlp": 110_000,
    "cifar2_resnet9": 4_830_000,
    "cifar10_resnet9": 4_830_000,
    "maestro_musictransformer": 13_300_000,
    "shakespeare_nanogpt": 10_700_000,
}

#: Exact parameter counts of the default models here, for the same settings (see the table above).
IMPLEMENTED_PARAMETER_COUNTS: dict[str, int] = {
    "mnist_lr": 7_840,
    "mnist_mlp": 109_386,
    "cifar2_resnet9": 4_825_154,
    "cifar10_resnet9": 4_829_258,
    "maestro_musictransformer": 13_803_910,
    "shakespeare_nanogpt": 10_770_816,
}
