"""The task kinds ``task_from_pretrained`` and the loaders know: the model head each needs and
the shape of its labels, and the forward arguments a batch may carry."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["MODEL_INPUTS", "TASK_KINDS", "TaskKind", "task_kind"]


@dataclass(frozen=True)
class TaskKind:
    """One task kind.

    Attributes:
        auto_class: the ``transformers`` Auto class that loads a model with this head.
        mapping: the name of its class mapping in ``transformers.models.auto.modeling_auto``.
        suffixes: class-name endings of models with this head.
        classification: one label per example (RPS applies).
        token_level: logits per position.
    """

    auto_class: str
    mapping: str
    suffixes: tuple[str, ...]
    classification: bool
    token_level: bool


TASK_KINDS: dict[str, TaskKind] = {
    "causal-lm": TaskKind("AutoModelForCausalLM", "MODEL_FOR_CAUSAL_LM_MAPPING_NAMES",
                          ("ForCausalLM", "LMHeadModel"), False, True),
    "masked-lm": TaskKind("AutoModelForMaskedLM", "MODEL_FOR_MASKED_LM_MAPPING_NAMES",
                          ("ForMaskedLM",), False, True),
    "sequence-classification": TaskKind(
        "AutoModelForSequenceClassification", "MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES",
        ("ForSequenceClassification",), True, False),
    "token-classification": TaskKind(
        "AutoModelForTokenClassification", "MODEL_FOR_TOKEN_CLASSIFICATION_MAPPING_NAMES",
        ("ForTokenClassification",), False, True),
    "image-classification": TaskKind(
        "AutoModelForImageClassification", "MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES",
        ("ForImageClassification",), True, False),
}

#: Forward arguments a batch may carry (``labels`` are never passed: losses are computed by
#: hf_attrib).
MODEL_INPUTS = ("input_ids", "attention_mask", "token_type_ids", "position_ids",
                "pixel_values", "pixel_mask", "inputs_embeds", "bbox")


def task_kind(task: str) -> TaskKind:
    """The :class:`TaskKind` named ``task``.

    Raises:
        ValueError: for an unknown kind, listing the known ones.
    """
    if task not in TASK_KINDS:
        raise ValueError(f"unknown task kind {task!r}; choose one of {', '.join(TASK_KINDS)}.")
    return TASK_KINDS[task]
