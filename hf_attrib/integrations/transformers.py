"""Attribute any ``transformers`` model: ``task_from_pretrained`` builds the ``AttributionTask``.

    from hf_attrib.integrations.transformers import task_from_pretrained

    task = task_from_pretrained("gpt2", task="causal-lm", layers="last:2")
    train_loader = task.dataloader(train_dataset, text_column="text", max_length=128)
    test_loader = task.dataloader(test_dataset, text_column="text", max_length=128)
    attributor = task.attributor("trak", projector_kwargs={"proj_dim": 512})
    scores = attributor.attribute(train_loader, test_loader)     # [n_train, n_test]

Task kinds and their functions (dict batches: ``input_ids``, ``attention_mask``, ``labels``,
``pixel_values``; padding and ``-100`` labels are ignored):

================================  ===========================  ==============================
kind                              loss (per example)           default target (per example)
================================  ===========================  ==============================
``causal-lm``                     mean NLL of the next tokens  log-likelihood of the labels
``masked-lm``                     mean NLL of the masked ones  log-likelihood of the labels
``sequence-classification``       cross-entropy                margin ``log p/(1-p)``
``image-classification``          cross-entropy                margin ``log p/(1-p)``
``token-classification``          mean token cross-entropy     mean token margin
================================  ===========================  ==============================

Batch losses are the mean of the per-example values. Sign convention: ``score[i, j]`` is how
much training example ``i`` raises the target on test example ``j``, so with these targets
helpful examples score positive. TRAK's ``Q = 1 - p`` uses the correct-class probability for
classification; for language models the log-likelihood target has ``dL/df = -1`` (no ``Q``).

Remote code is never run unless ``trust_remote_code=True`` is passed.
"""

from __future__ import annotations

import inspect
import os
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader

from hf_attrib.task import AttributionTask, use_eager_attention

__all__ = [
    "METHOD_DEFAULTS",
    "TASK_KINDS",
    "HFAttributionTask",
    "dataloader_from_dataset",
    "find_blocks",
    "load_pretrained",
    "method_defaults",
    "task_from_pretrained",
]


@dataclass(frozen=True)
class _Kind:
    auto_class: str
    mapping: str
    suffixes: tuple[str, ...]
    classification: bool  # one label per example (RPS applies)
    token_level: bool     # logits per position


TASK_KINDS: dict[str, _Kind] = {
    "causal-lm": _Kind("AutoModelForCausalLM", "MODEL_FOR_CAUSAL_LM_MAPPING_NAMES",
                       ("ForCausalLM", "LMHeadModel"), False, True),
    "masked-lm": _Kind("AutoModelForMaskedLM", "MODEL_FOR_MASKED_LM_MAPPING_NAMES",
                       ("ForMaskedLM",), False, True),
    "sequence-classification": _Kind(
        "AutoModelForSequenceClassification", "MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES",
        ("ForSequenceClassification",), True, False),
    "token-classification": _Kind(
        "AutoModelForTokenClassification", "MODEL_FOR_TOKEN_CLASSIFICATION_MAPPING_NAMES",
        ("ForTokenClassification",), False, True),
    "image-classification": _Kind(
        "AutoModelForImageClassification", "MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES",
        ("ForImageClassification",), True, False),
}

# Forward arguments a batch may carry (``labels`` are never passed: losses are computed here).
_MODEL_INPUTS = ("input_ids", "attention_mask", "token_type_ids", "position_ids",
                 "pixel_values", "pixel_mask", "inputs_embeds", "bbox")


# --------------------------------------------------------------------------------------------
# Task kinds and loading
# --------------------------------------------------------------------------------------------
def _kind(task: str) -> _Kind:
    if task not in TASK_KINDS:
        raise ValueError(f"unknown task kind {task!r}; choose one of {', '.join(TASK_KINDS)}.")
    return TASK_KINDS[task]


def _class_names(kind: _Kind) -> set[str]:
    from transformers.models.auto import modeling_auto

    names: set[str] = set()
    for value in getattr(modeling_auto, kind.mapping, {}).values():
        names.update([value] if isinstance(value, str) else value)
    return names


def _matches(class_name: str, kind: _Kind) -> bool:
    return class_name in _class_names(kind) or class_name.endswith(kind.suffixes)


def _guess_kinds(class_name: str) -> list[str]:
    return [name for name, kind in TASK_KINDS.items() if _matches(class_name, kind)]


def _mismatch(class_name: str, task: str, where: str) -> ValueError:
    kind = TASK_KINDS[task]
    guesses = _guess_kinds(class_name)
    hint = (f" This model fits task={guesses[0]!r}." if guesses else
            " It has no task head (a base model); load one with a head, e.g. "
            f"transformers.{kind.auto_class}.from_pretrained(...).")
    return ValueError(
        f"task={task!r} needs a model with a {task} head (a *{kind.suffixes[0]} class), but "
        f"{where} is {class_name}.{hint}"
    )


def _base_model(model: nn.Module) -> nn.Module:
    """The ``PreTrainedModel`` under a PEFT wrapper (the model itself otherwise)."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) and _is_peft(model) else model


def _is_peft(model: nn.Module) -> bool:
    return any(c.__name__ == "PeftModel" for c in type(model).__mro__)


def check_task_kind(model: nn.Module, task: str) -> None:
    """Raise a ``ValueError`` when ``model``'s class has no head for task kind ``task``."""
    kind = _kind(task)
    name = type(_base_model(model)).__name__
    if not _matches(name, kind):
        raise _mismatch(name, task, "the model")


def load_pretrained(model_id: str | os.PathLike, task: str, trust_remote_code: bool = False,
                    revision: str | None = None, allow_pickle: bool = False,
                    **model_kwargs: Any) -> tuple[nn.Module, Any]:
    """``(model, processor)`` for a Hub id or a local folder (``save_pretrained`` or a PEFT
    adapter folder). The processor is the tokenizer (text) or image processor, or ``None``.

    The checkpoint's ``config.architectures`` must fit ``task``: a base model or a model with
    another head would otherwise get a freshly initialised head without notice. Only
    safetensors weights are loaded unless ``allow_pickle=True``: pickled weights
    (``pytorch_model.bin``) can run arbitrary code when they are loaded.
    """
    import transformers
    from transformers import AutoConfig

    kind = _kind(task)
    model_id = os.fspath(model_id)
    adapter_config = Path(model_id) / "adapter_config.json"
    if adapter_config.is_file():
        return _load_peft(model_id, task, trust_remote_code, revision, allow_pickle,
                          **model_kwargs)
    config = AutoConfig.from_pretrained(model_id, trust_remote_code=trust_remote_code,
                                        revision=revision)
    for arch in getattr(config, "architectures", None) or []:
        if _matches(arch, kind):
            break
    else:
        if getattr(config, "architectures", None):
            raise _mismatch(config.architectures[0], task, f"the checkpoint {model_id!r} "
                            "(config.architectures)")
    auto = getattr(transformers, kind.auto_class)
    _weights_policy(model_id, allow_pickle, model_kwargs)
    try:
        model = auto.from_pretrained(model_id, trust_remote_code=trust_remote_code,
                                     revision=revision, **model_kwargs)
    except OSError as err:
        if not allow_pickle and "safetensors" in str(err):
            raise _pickled_only(model_id, kind.auto_class) from err
        raise
    except ValueError as err:
        if "Unrecognized configuration class" in str(err):
            raise ValueError(f"{type(config).__name__} ({model_id!r}) has no {task} head in "
                             f"transformers ({kind.auto_class} does not support it).") from err
        raise
    return model, _load_processor(model_id, task, trust_remote_code, revision)


_PICKLED_WEIGHTS = ("pytorch_model.bin", "pytorch_model.bin.index.json", "tf_model.h5",
                    "adapter_model.bin", "model.pt")


def _weights_policy(model_id: str, allow_pickle: bool, model_kwargs: dict[str, Any]) -> None:
    """Set ``use_safetensors`` in ``model_kwargs``: ``True`` unless ``allow_pickle``."""
    if not allow_pickle:
        if model_kwargs.get("use_safetensors") is False:
            raise ValueError("use_safetensors=False loads pickled weights, which can run "
                             "arbitrary code; pass allow_pickle=True (CLI: --allow-pickle) to "
                             "accept that for a source you trust.")
        model_kwargs["use_safetensors"] = True
        return
    model_kwargs.setdefault("use_safetensors", None)  # transformers: safetensors first
    local = Path(model_id)
    if local.is_dir() and any(local.glob("*.safetensors")):
        return
    warnings.warn(f"allow_pickle=True: if {model_id} has only pickled weights "
                  "(pytorch_model.bin), loading them unpickles them, which can run arbitrary "
                  "code. Use it only for a source you trust, and convert the weights once "
                  "(model.save_pretrained(folder) writes model.safetensors).", UserWarning,
                  stacklevel=4)


def _pickled_only(model_id: str, auto_class: str) -> ValueError:
    local = Path(model_id)
    found = [f for f in _PICKLED_WEIGHTS if (local / f).exists()] if local.is_dir() else []
    what = f"has only pickled weights ({', '.join(found)})" if found else (
        "has no safetensors weights (model.safetensors)")
    return ValueError(
        f"{model_id} {what}. hf_attrib loads safetensors only, because unpickling weights can "
        "run arbitrary code. Convert them once, where you trust the file: "
        f"{auto_class}.from_pretrained(path, use_safetensors=False).save_pretrained(path) "
        "writes safetensors; or, for a source you trust, pass allow_pickle=True "
        "(CLI: --allow-pickle).")


def _load_processor(model_id: str, task: str, trust_remote_code: bool,
                    revision: str | None) -> Any:
    from transformers import AutoImageProcessor, AutoTokenizer

    image = task == "image-classification"
    local = Path(model_id)
    if local.is_dir() and not image and not any((local / f).exists() for f in _TOKENIZER_FILES):
        return None  # transformers would build an empty tokenizer from the config alone
    loader = AutoImageProcessor if image else AutoTokenizer
    try:
        processor = loader.from_pretrained(model_id, trust_remote_code=trust_remote_code,
                                           revision=revision)
    except (OSError, ValueError, TypeError, KeyError):
        return None
    if not image and len(processor) < 2:
        return None
    return processor


_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "vocab.txt",
                    "tokenizer.model", "spiece.model", "sentencepiece.bpe.model")


def _load_peft(adapter_dir: str, task: str, trust_remote_code: bool, revision: str | None,
               allow_pickle: bool = False, **model_kwargs: Any) -> tuple[nn.Module, Any]:
    import json

    try:
        from peft import PeftModel
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError(f"{adapter_dir} is a PEFT adapter folder; pip install peft.") from err
    base_id = json.loads((Path(adapter_dir) / "adapter_config.json").read_text()).get(
        "base_model_name_or_path")
    if not base_id:
        raise ValueError(f"{adapter_dir}/adapter_config.json names no base_model_name_or_path.")
    if not allow_pickle and not (Path(adapter_dir) / "adapter_model.safetensors").exists():
        raise _pickled_only(adapter_dir, "PeftModel")
    base, processor = load_pretrained(base_id, task, trust_remote_code, revision,
                                      allow_pickle=allow_pickle, **model_kwargs)
    # is_trainable=True: the adapter weights are the ones attributed through.
    model = PeftModel.from_pretrained(base, adapter_dir, is_trainable=True)
    own = _load_processor(adapter_dir, task, trust_remote_code, revision)
    return model, own if own is not None else processor


# --------------------------------------------------------------------------------------------
# Parameter selection
# --------------------------------------------------------------------------------------------
def find_blocks(model: nn.Module) -> tuple[str, int]:
    """``(name, count)`` of the model's stack of transformer blocks.

    The stack is the ``nn.ModuleList`` of same-class modules holding the most parameters
    (``transformer.h`` in GPT-2, ``bert.encoder.layer`` in BERT, ``model.layers`` in Llama).
    """
    best: tuple[int, str, int] | None = None
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) == 0:
            continue
        if len({type(m) for m in module}) != 1:
            continue
        size = sum(p.numel() for p in module.parameters())
        if size and (best is None or size > best[0]):
            best = (size, name, len(module))
    if best is None:
        raise ValueError(f"{type(model).__name__} has no nn.ModuleList of transformer blocks, "
                         "so layers='last:N' cannot be used; name the modules instead "
                         "(layers=['...'], see model.named_modules()).")
    return best[1], best[2]


def _last_blocks(model: nn.Module, spec: str) -> list[str]:
    try:
        count = int(spec.split(":", 1)[1])
    except ValueError:
        raise ValueError(f"layers={spec!r}: use 'last:N' with N a positive integer.") from None
    name, total = find_blocks(model)
    if not 1 <= count <= total:
        raise ValueError(f"layers={spec!r}: the model has {total} blocks ({name}); "
                         f"N must be between 1 and {total}.")
    return [f"{name}.{i}" for i in range(total - count, total)]


def _expand(model: nn.Module, entries: Sequence[str]) -> list[str]:
    """Parameter names under each entry (a parameter or module name); unknown names raise."""
    named = [n for n, _ in model.named_parameters()]
    out: list[str] = []
    for entry in entries:
        hits = [n for n in named if n == entry or n.startswith(entry + ".")]
        if not hits:
            close = [m for m, _ in model.named_modules()
                     if m and entry.split(".")[-1] in m.split(".")][:10]
            try:
                blocks = f" The transformer blocks are {find_blocks(model)[0]}.<i>."
            except ValueError:
                blocks = ""
            raise ValueError(
                f"unknown layer name {entry!r}: no parameter or module of "
                f"{type(model).__name__} has that name.{blocks}"
                + (f" Similar modules: {close}." if close else "")
                + " Pass module names from model.named_modules(), or layers='last:N'."
            )
        out += [n for n in hits if n not in out]
    return out


def select_layers(model: nn.Module, layers: str | Sequence[str] | None) -> list[str] | None:
    """Parameter names to attribute through (``None``: every parameter of a plain model).

    ``layers`` is ``None``, ``"last:N"``, ``"trainable"`` (parameters that require grad, e.g.
    the adapters of a PEFT model), or names of modules/parameters. For a PEFT model only the
    trainable (adapter) parameters inside the selection are kept.
    """
    peft = _is_peft(model)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    if layers is None:
        names = trainable if peft else None
        where = "the model"
    elif isinstance(layers, str) and layers == "trainable":
        names, where = trainable, "layers='trainable'"
    elif isinstance(layers, str) and layers.startswith("last:"):
        names, where = _expand(model, _last_blocks(model, layers)), f"layers={layers!r}"
    else:
        entries = [layers] if isinstance(layers, str) else list(layers)
        names, where = _expand(model, entries), f"layers={entries}"
    if names is not None and (peft or layers == "trainable"):
        kept = [n for n in names if n in set(trainable)]
        if not kept:
            adapters = sorted({n.rsplit(".", 3)[0] for n in trainable})[:8]
            raise ValueError(
                f"{where} selects no trainable parameters"
                + (" of this PEFT model" if peft else "")
                + ": only the adapter (e.g. LoRA) weights are trained, so attribution goes "
                "through them. "
                + (f"Modules with adapters: {adapters}; pass layers=None for all of them."
                   if adapters else
                   "The model has no trainable parameters at all: load the adapter with "
                   "PeftModel.from_pretrained(base, path, is_trainable=True).")
            )
        names = kept
    return names


# --------------------------------------------------------------------------------------------
# Loss / target functions
# --------------------------------------------------------------------------------------------
def _require_labels(batch: Mapping[str, Tensor], task: str) -> Tensor:
    if not isinstance(batch, Mapping):
        raise TypeError(f"{task} batches must be dicts of tensors (input_ids, attention_mask, "
                        f"labels, ...), got {type(batch).__name__}.")
    if "labels" not in batch:
        how = ("labels = input_ids with padding set to -100 (DataCollatorForLanguageModeling("
               "tokenizer, mlm=False) does this)" if task == "causal-lm" else
               "a 'labels' (or 'label') column in the dataset")
        raise ValueError(
            f"the batch has no 'labels' (keys: {sorted(batch)}); the {task} loss and target "
            f"need them. Build loaders with task.dataloader(dataset), or add {how}."
        )
    return batch["labels"]


def _token_logprobs(logits: Tensor, labels: Tensor, shift: bool) -> tuple[Tensor, Tensor]:
    """``(log p(label), valid mask)`` per position; ``-100`` labels are masked."""
    if shift:
        logits, labels = logits[:, :-1], labels[:, 1:]
    logits = logits.float()
    mask = labels != -100
    picked = logits.gather(-1, labels.clamp_min(0)[..., None])[..., 0]
    return picked - torch.logsumexp(logits, dim=-1), mask


def _class_terms(logits: Tensor, labels: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Per position: ``(log p, margin log p/(1-p), p)`` of the labelled class."""
    logits = logits.float()
    idx = labels.clamp_min(0)[..., None]
    true = logits.gather(-1, idx)[..., 0]
    logp = true - torch.logsumexp(logits, dim=-1)
    others = logits.scatter(-1, idx, float("-inf"))
    margin = true - torch.logsumexp(others, dim=-1)
    return logp, margin, logp.exp()


def _masked_mean(values: Tensor, mask: Tensor) -> Tensor:
    """Per-example mean over valid positions ``[B]`` (0 for an example without any)."""
    return (values * mask).sum(-1) / mask.sum(-1).clamp_min(1)


class _Functions:
    """Loss, target and correct-class probability of one task kind, on dict batches."""

    def __init__(self, model: nn.Module, task: str, mask_mode: str) -> None:
        self.model = model
        self.task = task
        self.kind = TASK_KINDS[task]
        self.mask_mode = mask_mode
        signature = inspect.signature(model.forward).parameters
        self._accepts_any = any(p.kind is p.VAR_KEYWORD for p in signature.values())
        self._accepts = set(signature)
        base = _base_model(model)
        config = getattr(base, "config", None)
        self._dtype = next(model.parameters()).dtype
        if self.kind.classification or task == "token-classification":
            problem = getattr(config, "problem_type", None)
            if problem in ("regression", "multi_label_classification") or (
                    problem is None and getattr(config, "num_labels", 2) == 1):
                raise ValueError(
                    f"{type(base).__name__} is set up for {problem or 'regression'} "
                    "(num_labels=1 or problem_type), but hf_attrib's classification "
                    "functions are single-label cross-entropy; write loss_func/target_func "
                    "yourself and build AttributionTask directly.")

    def inputs(self, batch: Mapping[str, Tensor]) -> dict[str, Tensor]:
        inputs = {k: v for k, v in batch.items() if k != "labels" and (
            k in self._accepts or (self._accepts_any and k in _MODEL_INPUTS))}
        mask = inputs.get("attention_mask")
        if (self.task == "causal-lm" and mask is not None and mask.dim() == 2
                and "position_ids" not in inputs and self._takes("position_ids")):
            # Left padding (Llama's tokenizers): without position ids the model numbers the
            # positions from the first (padding) token, which shifts every real token's
            # position. Counting real tokens gives each the position it has unpadded.
            inputs["position_ids"] = (mask.long().cumsum(-1) - 1).clamp_min(0)
        if self.mask_mode == "4d" and mask is not None and mask.dim() == 2:
            inputs["attention_mask"] = _bidirectional_mask(mask, self._dtype)
        return inputs

    def _takes(self, name: str) -> bool:
        return name in self._accepts or (self._accepts_any and name in _MODEL_INPUTS)

    def logits(self, params: dict[str, Tensor], batch: Mapping[str, Tensor]) -> Tensor:
        out = torch.func.functional_call(self.model, params, (), self.inputs(batch))
        return out.logits if hasattr(out, "logits") else out[0]

    # per-example values [B] ------------------------------------------------------------
    def per_example(self, params: dict[str, Tensor], batch: Mapping[str, Tensor]
                    ) -> dict[str, Tensor]:
        labels = _require_labels(batch, self.task)
        logits = self.logits(params, batch)
        if self.task in ("causal-lm", "masked-lm"):
            logp, mask = _token_logprobs(logits, labels, shift=self.task == "causal-lm")
            attention = batch.get("attention_mask")
            if self.task == "causal-lm" and attention is not None and attention.dim() == 2:
                # A token is predicted from the position before it; after left padding the
                # first real token would be "predicted" from a padding position, a term the
                # unpadded sequence does not have.
                mask = mask & attention[:, :-1].bool()
            return {"loss": -_masked_mean(logp, mask), "target": (logp * mask).sum(-1)}
        logp, margin, prob = _class_terms(logits, labels)
        if self.task == "token-classification":
            mask = labels != -100
            return {"loss": -_masked_mean(logp, mask), "target": _masked_mean(margin, mask),
                    "prob": _masked_mean(prob, mask)}
        return {"loss": -logp, "target": margin, "prob": prob}

    def loss(self, params: dict[str, Tensor], batch: Mapping[str, Tensor]) -> Tensor:
        return self.per_example(params, batch)["loss"].mean()

    def target(self, params: dict[str, Tensor], batch: Mapping[str, Tensor]) -> Tensor:
        return self.per_example(params, batch)["target"].mean()

    def correct_probability(self, params: dict[str, Tensor], batch: Mapping[str, Tensor]
                            ) -> Tensor:
        return self.per_example(params, batch)["prob"].mean()


def _bidirectional_mask(mask: Tensor, dtype: torch.dtype) -> Tensor:
    """A 2-D padding mask as the additive 4-D mask ``[B, 1, T, T]`` eager attention adds."""
    length = mask.shape[-1]
    blocked = (1 - mask[:, None, None, :].to(dtype)) * torch.finfo(dtype).min
    return blocked.expand(mask.shape[0], 1, length, length)


def _mask_mode(model: nn.Module, task: str) -> str:
    """How attention masks reach the model under ``vmap``: ``"2d"`` or ``"4d"``.

    transformers decides whether a bidirectional (encoder) model can skip its mask by looking
    at the mask's values, which ``vmap`` forbids. Encoders then get the equivalent additive
    4-D mask, whose equivalence is checked here on a padded probe batch.
    """
    if task == "image-classification":
        return "2d"
    vocab = getattr(getattr(_base_model(model), "config", None), "vocab_size", None) or 3
    ids = (torch.arange(8).reshape(2, 4) % min(vocab, 5)).to(_device_of(model))
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]], device=ids.device)

    def run(am: Tensor, i: Tensor) -> Tensor:
        out = model(input_ids=i[None], attention_mask=am[None])
        return out.logits if hasattr(out, "logits") else out[0]

    with torch.no_grad():
        try:
            torch.func.vmap(run, in_dims=(0, 0))(mask, ids)
            return "2d"
        except RuntimeError as err:
            if "vmap" not in str(err):
                raise
        plain = model(input_ids=ids, attention_mask=mask)
        plain = plain.logits if hasattr(plain, "logits") else plain[0]
        dtype = next(model.parameters()).dtype
        four = model(input_ids=ids, attention_mask=_bidirectional_mask(mask, dtype))
        four = four.logits if hasattr(four, "logits") else four[0]
    if not torch.allclose(plain, four, atol=1e-4, rtol=1e-4):
        raise NotImplementedError(
            f"{type(_base_model(model)).__name__}: its attention mask cannot be traced by "
            "torch.func.vmap, and an additive 4-D mask does not reproduce it. Pass batches "
            "without padding (equal lengths, no attention_mask) or report the model.")
    return "4d"


def _device_of(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


# --------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------
def dataloader_from_dataset(
    dataset: Any, task: str, processor: Any = None, batch_size: int = 8,
    text_column: str | None = None, text_pair_column: str | None = None,
    label_column: str | None = None, max_length: int | None = None,
    mlm_probability: float = 0.15, seed: int = 0, num_workers: int = 0,
    label2id: Mapping[str, int] | None = None, num_labels: int | None = None,
) -> DataLoader:
    """An unshuffled ``DataLoader`` of dict batches from a ``datasets.Dataset``.

    Pre-tokenised datasets (an ``input_ids`` column, or ``pixel_values``) are used as they are;
    a text column is tokenised with ``processor`` (the tokenizer, truncating to
    ``max_length``); an ``image``/``img`` column is transformed with ``processor`` (an image
    processor). Labels: a ``labels``/``label`` column (classification), ``input_ids`` with
    padding set to ``-100`` (causal LM), or a fixed random 15% masking drawn once with
    ``seed`` (masked LM without labels, so every pass sees the same masks).

    Classification labels that are strings are mapped through ``label2id`` (the model's
    ``config.label2id``; ``task.dataloader`` passes it); a label the head cannot score (an
    unknown string, an integer outside ``0..num_labels-1``, a negative other than ``-100``)
    is an error naming it.
    """
    from datasets import Dataset

    if not isinstance(dataset, Dataset):
        raise TypeError(f"expected a datasets.Dataset, got {type(dataset).__name__} (for a "
                        "DatasetDict pick a split, e.g. dataset['train']).")
    if len(dataset) == 0:
        raise ValueError("the dataset is empty.")
    kind = _kind(task)
    original_columns = list(dataset.column_names)  # as the user knows them, for messages
    columns = set(original_columns)
    label_source = "labels" if "labels" in columns else "label"
    if label_column and label_column != "labels":
        if label_column not in columns:
            raise ValueError(f"label column {label_column!r} is not in the dataset; its columns "
                             f"are {sorted(columns)}. Name the class label column with "
                             "label_column=... (CLI: --label-column).")
        dataset = dataset.rename_column(label_column, "labels")
        label_source = label_column
    elif "labels" not in columns and "label" in columns:
        dataset = dataset.rename_column("label", "labels")
    columns = set(dataset.column_names)
    if "labels" in columns and (kind.classification or task == "token-classification"):
        dataset = _class_labels(dataset, label_source, label2id, num_labels,
                                ignore_index=task == "token-classification")

    if task == "image-classification":
        dataset = _image_features(dataset, processor)
    elif "input_ids" not in columns:
        dataset = _tokenize(dataset, processor, text_column, text_pair_column, max_length,
                            shown_columns=original_columns)
    keep = [c for c in dataset.column_names if c in _MODEL_INPUTS or c == "labels"]
    dataset = dataset.select_columns(keep)

    if task == "masked-lm" and "labels" not in dataset.column_names:
        dataset = _fixed_masking(dataset, processor, mlm_probability, seed)
    if kind.classification and "labels" not in dataset.column_names:
        raise ValueError(f"{task} needs a 'label' or 'labels' column, or the class label "
                         "column named with label_column=... (CLI: --label-column); the "
                         f"dataset has {sorted(columns)}.")
    if task == "image-classification":
        from transformers import default_data_collator
        collate = default_data_collator
    elif _equal_lengths(dataset):
        # Pre-tokenised sequences of one length need no padding (nor a tokenizer).
        collate = _StackCollator(task)
    elif task == "causal-lm" and "labels" not in dataset.column_names:
        collate = _causal_lm_collator(processor)
    else:
        collate = _padding_collator(processor, task)
    return DataLoader(dataset, batch_size=batch_size, shuffle=False,
                      collate_fn=_PlainDict(collate), num_workers=num_workers)


def _class_labels(dataset: Any, column: str, label2id: Mapping[str, int] | None,
                  num_labels: int | None, ignore_index: bool) -> Any:
    """Map string labels through ``label2id`` and check every label is in the head's range
    (``-100`` too with ``ignore_index``: token labels the loss skips; one label per example
    has no such value, as the loss would read it as class 0)."""
    values = dataset["labels"]
    flat = [v for row in values for v in row] if values and isinstance(
        values[0], (list, tuple)) else list(values)
    strings = [v for v in flat if isinstance(v, str)]
    if strings:
        if not label2id:
            raise ValueError(f"column {column!r} holds string labels (e.g. {strings[0]!r}) but "
                             "no label2id was given to map them to class indices; pass "
                             "label2id=model.config.label2id (task.dataloader does).")
        unknown = next((v for v in strings if v not in label2id), None)
        if unknown is not None:
            raise ValueError(
                f"label {unknown!r} in column {column!r} is not one of the model's labels "
                f"{sorted(label2id)} (config.label2id). Use the model's label names, or a "
                "model fine-tuned on these labels.")
        mapping = dict(label2id)

        def encode(rows: dict[str, list[Any]]) -> dict[str, list[Any]]:
            return {"labels": [[mapping[v] for v in row] if isinstance(row, (list, tuple))
                               else mapping[row] for row in rows["labels"]]}

        dataset = dataset.map(encode, batched=True, desc="label2id")
        flat = [mapping[v] if isinstance(v, str) else v for v in flat]
    if num_labels is None:
        return dataset
    bad = next((v for v in flat if not (0 <= int(v) < num_labels
                                         or (ignore_index and int(v) == -100))), None)
    if bad is not None:
        raise ValueError(
            f"label {bad!r} in column {column!r} is outside the classification head: the model "
            f"has num_labels={num_labels}, so labels must be 0..{num_labels - 1}"
            + (" (or -100 for a token to ignore)" if ignore_index else "")
            + ". Check the label column (label_column=..., CLI: --label-column), drop the "
            "examples without a class, or load a model with a head of that many classes.")
    return dataset


def _equal_lengths(dataset: Any) -> bool:
    if "input_ids" not in dataset.column_names:
        return False
    lengths = {len(ids) for ids in dataset["input_ids"]}
    return len(lengths) == 1


class _StackCollator:
    """Stack equal-length pre-tokenised examples; causal-LM labels are the inputs (masked
    positions set to -100)."""

    def __init__(self, task: str) -> None:
        self.task = task

    def __call__(self, features: list[Mapping[str, Any]]) -> dict[str, Tensor]:
        batch = {k: torch.stack([torch.as_tensor(f[k]) for f in features]) for k in features[0]}
        if "labels" not in batch:
            if self.task != "causal-lm":
                raise ValueError(f"{self.task} needs labels; the dataset has none.")
            labels = batch["input_ids"].clone()
            if "attention_mask" in batch:
                labels[batch["attention_mask"] == 0] = -100
            batch["labels"] = labels
        return batch


class _PlainDict:
    """Collate into a plain ``dict`` (``vmap`` does not treat ``BatchEncoding`` as a pytree)."""

    def __init__(self, collate: Callable[[list[Any]], Mapping[str, Tensor]]) -> None:
        self.collate = collate

    def __call__(self, features: list[Any]) -> dict[str, Tensor]:
        return dict(self.collate(features))


def _needs_pad(processor: Any) -> None:
    if processor is None:
        raise ValueError("batches of sequences need padding, so pass the tokenizer "
                         "(processor=tokenizer, or load the model from a folder that has one).")
    if getattr(processor, "pad_token", None) is None:
        raise ValueError(
            f"the tokenizer ({type(processor).__name__}) has no pad token, so sequences of "
            "different lengths cannot be batched. Set one, e.g. "
            "tokenizer.pad_token = tokenizer.eos_token (padding is masked out of the loss).")


def _tokenize(dataset: Any, processor: Any, text_column: str | None,
              text_pair_column: str | None, max_length: int | None,
              shown_columns: list[str] | None = None) -> Any:
    columns = dataset.column_names
    if text_column is None:
        text_column = next((c for c in ("text", "sentence", "content") if c in columns), None)
    if text_column is None:
        raise ValueError(f"no text column to tokenise: the dataset has no 'text', 'sentence' "
                         f"or 'content' column (its columns are {shown_columns or columns}). "
                         "Name it with "
                         "text_column=... (CLI: --text-column), or pass a dataset with "
                         "input_ids.")
    if text_column not in columns:
        raise ValueError(f"text column {text_column!r} is not in the dataset; its columns are "
                         f"{shown_columns or columns}. Name the column to tokenise with "
                         "text_column=... "
                         "(CLI: --text-column).")
    if processor is None or not callable(processor):
        raise ValueError(f"column {text_column!r} holds text, so a tokenizer is needed: pass "
                         "processor=tokenizer (or load the model from a folder with one).")

    def encode(rows: dict[str, list[Any]]) -> Any:
        pair = rows[text_pair_column] if text_pair_column else None
        return processor(rows[text_column], pair, truncation=max_length is not None,
                         max_length=max_length)

    return dataset.map(encode, batched=True, desc="tokenising")


def _image_features(dataset: Any, processor: Any) -> Any:
    if "pixel_values" in dataset.column_names:
        return dataset.with_format("torch")
    column = next((c for c in ("image", "img", "pixel_values") if c in dataset.column_names),
                  None)
    if column is None:
        raise ValueError(f"image-classification needs a pixel_values or image column; the "
                         f"dataset has {dataset.column_names}.")
    if processor is None:
        raise ValueError("images need the model's image processor: pass processor=...")

    def encode(rows: dict[str, list[Any]]) -> Any:
        images = [im.convert("RGB") if hasattr(im, "convert") else im for im in rows[column]]
        return {"pixel_values": processor(images, return_tensors="np")["pixel_values"]}

    dataset = dataset.map(encode, batched=True, desc="image features")
    return dataset.with_format("torch")


def _causal_lm_collator(processor: Any) -> Callable[[list[dict[str, Any]]], dict[str, Tensor]]:
    from transformers import DataCollatorForLanguageModeling

    _needs_pad(processor)
    return DataCollatorForLanguageModeling(processor, mlm=False)


def _padding_collator(processor: Any, task: str) -> Callable[..., dict[str, Tensor]]:
    from transformers import DataCollatorForTokenClassification, DataCollatorWithPadding

    _needs_pad(processor)
    if task in ("token-classification", "masked-lm"):
        # Pads 'labels' with -100 as well.
        return DataCollatorForTokenClassification(processor)
    return DataCollatorWithPadding(processor)


def _fixed_masking(dataset: Any, processor: Any, probability: float, seed: int) -> Any:
    """Mask ``probability`` of the non-special tokens once, reproducibly (BERT's 80/10/10)."""
    mask_id = getattr(processor, "mask_token_id", None)
    if mask_id is None:
        raise ValueError("masked-lm without a labels column needs a tokenizer with a mask "
                         "token to mask inputs with.")
    special = set(getattr(processor, "all_special_ids", []))
    vocab = len(processor)

    def mask_rows(rows: dict[str, list[Any]], indices: list[int]) -> dict[str, list[Any]]:
        ids_out, labels_out = [], []
        for ids, index in zip(rows["input_ids"], indices, strict=True):
            g = torch.Generator().manual_seed(seed * 1_000_003 + index)
            ids_t = torch.tensor(ids)
            can = torch.tensor([t not in special for t in ids])
            chosen = (torch.rand(len(ids), generator=g) < probability) & can
            labels = torch.where(chosen, ids_t, torch.full_like(ids_t, -100))
            roll = torch.rand(len(ids), generator=g)
            random_ids = torch.randint(vocab, (len(ids),), generator=g)
            new = torch.where(chosen & (roll < 0.8), torch.full_like(ids_t, mask_id), ids_t)
            new = torch.where(chosen & (roll >= 0.8) & (roll < 0.9), random_ids, new)
            ids_out.append(new.tolist())
            labels_out.append(labels.tolist())
        return {"input_ids": ids_out, "labels": labels_out}

    return dataset.map(mask_rows, batched=True, with_indices=True, desc="masking")


# --------------------------------------------------------------------------------------------
# The task
# --------------------------------------------------------------------------------------------
_METHODS = ("trak", "tracin", "grad-dot", "grad-cos", "if-explicit", "if-cg", "if-lissa",
            "if-arnoldi", "rps")

# The one set of defaults of ``task.attributor(method)`` and ``hf-attrib attribute`` (which
# passes only the options given on its command line): the attributor classes' own defaults,
# except the influence functions' Hessian damping. A transformer's loss Hessian is indefinite
# away from a minimum, so the classes' regularization=0 (dattri's) would make CG/explicit
# solves meaningless; 1e-2 is the damping of dattri's and Koh & Liang's examples.
METHOD_DEFAULTS: dict[str, dict[str, Any]] = {
    "trak": {"projector_kwargs": {"proj_dim": 2048}, "regularization": 0.0},
    "tracin": {},
    "grad-dot": {},
    "grad-cos": {},
    "if-explicit": {"regularization": 1e-2},
    "if-cg": {"regularization": 1e-2, "max_iter": 10},
    "if-lissa": {},
    "if-arnoldi": {"regularization": 1e-2},
    "rps": {"l2_strength": 0.003, "fit_last_layer": True},
}


def method_defaults(method: str) -> dict[str, Any]:
    """The keyword arguments ``task.attributor(method)`` gives the attributor by default."""
    if method not in METHOD_DEFAULTS:
        raise ValueError(f"unknown method {method!r}; choose one of {', '.join(_METHODS)}.")
    return {k: dict(v) if isinstance(v, dict) else v
            for k, v in METHOD_DEFAULTS[method].items()}


class HFAttributionTask(AttributionTask):
    """An ``AttributionTask`` for a ``transformers`` model and task kind.

    Built by ``task_from_pretrained``. Besides the ``AttributionTask`` interface it carries
    what the attributors need for this model: ``layer_name`` (the selected parameters),
    ``correct_probability_func`` (TRAK), ``rps_layer_name`` (RPS's final linear layer, for
    classifiers), ``weight_list`` (TracInCP step sizes from a Trainer run), and the
    tokenizer/image ``processor``; ``dataloader`` and ``attributor`` put them together.
    """

    def __init__(self, model: nn.Module, task: str, checkpoints: Any,
                 layer_name: list[str] | None, processor: Any = None,
                 target: str = "default", weight_list: list[float] | None = None,
                 checkpoints_load_func: Callable[[nn.Module, Any], nn.Module] | None = None
                 ) -> None:
        model.eval()
        use_eager_attention(model)  # fused attention kernels have no vmap/double-backward rules
        functions = _Functions(model, task, _mask_mode(model, task))
        if target not in ("default", "loss"):
            raise ValueError(f"target must be 'default' or 'loss', got {target!r}.")
        super().__init__(functions.loss, model, checkpoints,
                         target_func=functions.loss if target == "loss" else functions.target,
                         checkpoints_load_func=checkpoints_load_func)
        self.task_kind = task
        self.functions_ = functions
        self.layer_name = layer_name
        self.processor = processor
        self.weight_list = weight_list
        kind = TASK_KINDS[task]
        self.correct_probability_func = (
            functions.correct_probability if kind.classification or
            task == "token-classification" else None)
        if target == "loss":
            self.correct_probability_func = None
        self.rps_layer_name = _final_linear(model) if kind.classification else None

    @property
    def tokenizer(self) -> Any:
        return self.processor

    def dataloader(self, dataset: Any, batch_size: int = 8, **kwargs: Any) -> DataLoader:
        """``dataloader_from_dataset`` with this task's kind and processor."""
        kwargs.setdefault("processor", self.processor)
        config = getattr(_base_model(self.model), "config", None)
        if TASK_KINDS[self.task_kind].classification or self.task_kind == "token-classification":
            kwargs.setdefault("label2id", getattr(config, "label2id", None))
            kwargs.setdefault("num_labels", getattr(config, "num_labels", None))
        return dataloader_from_dataset(dataset, self.task_kind, batch_size=batch_size, **kwargs)

    def attributor(self, method: str, device: torch.device | str | None = None,
                   **kwargs: Any) -> Any:
        """The attributor of ``method`` wired to this task (layers, TRAK's Q, RPS layer,
        TracInCP step sizes); ``kwargs`` go to its constructor, over ``METHOD_DEFAULTS``
        (the same defaults as ``hf-attrib attribute``). ``device=None``: the model's device.
        """
        from hf_attrib import algorithm as alg

        kwargs = {**method_defaults(method), **kwargs}
        if method == "rps":
            if self.rps_layer_name is None:
                raise ValueError(f"RPS needs one feature vector per example at a final linear "
                                 f"layer; task kind {self.task_kind!r} has none (it applies "
                                 "to sequence/image classification).")
            kwargs.setdefault("final_linear_layer_name", self.rps_layer_name)
            return alg.RPSAttributor(self, device=device, **kwargs)
        kwargs.setdefault("layer_name", self.layer_name)
        if method == "trak":
            kwargs.setdefault("correct_probability_func", self.correct_probability_func)
            return alg.TRAKAttributor(self, device=device, **kwargs)
        if method == "tracin":
            if self.weight_list is not None:
                kwargs.setdefault("weight_list", self.weight_list)
            elif "weight_list" not in kwargs:
                warnings.warn(
                    f"TracInCP without learning rates: {self.num_checkpoints} checkpoint(s) "
                    "and no weight_list, so every step size is 1 and the scores are "
                    "gradient dot products summed over checkpoints, not estimates of a "
                    "training step's effect. Pass weight_list=[lr, ...] or "
                    "checkpoints=<Trainer output_dir> (its learning rates are read).",
                    UserWarning, stacklevel=2)
            return alg.TracInAttributor(self, device=device, **kwargs)
        classes = {"grad-dot": alg.GradDotAttributor, "grad-cos": alg.GradCosAttributor,
                   "if-explicit": alg.IFAttributorExplicit, "if-cg": alg.IFAttributorCG,
                   "if-lissa": alg.IFAttributorLiSSA, "if-arnoldi": alg.IFAttributorArnoldi}
        return classes[method](self, device=device, **kwargs)


def _final_linear(model: nn.Module) -> str | None:
    """The name of the last ``nn.Linear`` whose outputs are the labels (the logits layer)."""
    base = _base_model(model)
    num_labels = getattr(getattr(base, "config", None), "num_labels", None)
    found = None
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and module.out_features == num_labels:
            found = name
    return found


def _peft_load_func(model: nn.Module, checkpoint: Any) -> nn.Module:
    """Load full or adapter-only checkpoints (``adapter_model.safetensors``) into a PEFT model."""
    from safetensors.torch import load_file

    from hf_attrib.task import load_state_dict_file

    path = Path(checkpoint) if isinstance(checkpoint, (str, os.PathLike)) else None
    if path is not None and path.is_dir() and (path / "adapter_model.safetensors").exists():
        from peft import set_peft_model_state_dict

        result = set_peft_model_state_dict(model, load_file(path / "adapter_model.safetensors"))
        unexpected = getattr(result, "unexpected_keys", [])
        if unexpected:
            raise ValueError(f"adapter checkpoint {path} does not match the PEFT model: "
                             f"unexpected keys {unexpected[:5]}.")
        return model
    state = checkpoint if isinstance(checkpoint, Mapping) else load_state_dict_file(checkpoint)
    model.load_state_dict(state, strict=False)
    return model


def _last_checkpoint(output_dir: str | os.PathLike) -> Path:
    from hf_attrib.integrations.trainer import _checkpoint_folders

    return _checkpoint_folders(Path(output_dir))[-1][1]


def _unaliased(model: nn.Module, checkpoint: Any) -> Any:
    """Copy the tensors of a state-dict checkpoint that share memory with the model.

    ``model.state_dict()`` returns the model's own parameters: loading another checkpoint
    into the model would silently overwrite that one too.
    """
    if not isinstance(checkpoint, Mapping):
        return checkpoint
    own = {t.untyped_storage().data_ptr() for t in model.state_dict().values()}
    return {k: v.detach().clone() if v.untyped_storage().data_ptr() in own else v
            for k, v in checkpoint.items()}


def task_from_pretrained(
    model: nn.Module | str | os.PathLike,
    task: str = "causal-lm",
    layers: str | Sequence[str] | None = None,
    checkpoints: Any = None,
    processor: Any = None,
    trust_remote_code: bool = False,
    target: str = "default",
    tracin_weights: str = "lr",
    revision: str | None = None,
    device: torch.device | str | None = None,
    allow_pickle: bool = False,
    **model_kwargs: Any,
) -> HFAttributionTask:
    """An attribution task for a ``transformers`` model.

    Args:
        model: a ``PreTrainedModel`` (or PEFT model), a Hub id, a ``save_pretrained`` folder
            or a PEFT adapter folder.
        task: ``"causal-lm"``, ``"masked-lm"``, ``"sequence-classification"``,
            ``"token-classification"`` or ``"image-classification"``. The model must have that
            head (checked on its class / ``config.architectures``).
        layers: parameters to attribute through: ``None`` (all; for a PEFT model, its
            adapter weights), ``"last:N"`` (the last N transformer blocks), ``"trainable"``, or
            module/parameter names.
        checkpoints: ``None`` (the model's current weights), a Trainer ``output_dir`` (its
            ``checkpoint-*`` folders in step order; their learning rates become TracInCP's
            ``weight_list``), or a list of state dicts / ``.safetensors`` files / folders.
        processor: tokenizer or image processor (default: loaded with the model from a folder
            or id, else none).
        trust_remote_code: allow loading models whose code lives in the repository. Off by
            default: remote code runs only when asked for.
        target: ``"default"`` (log-likelihood for LMs, margin for classifiers) or ``"loss"``.
        tracin_weights: ``"lr"`` or ``"interval"`` (see ``hf_attrib.integrations.trainer``).
        revision, **model_kwargs: passed to ``from_pretrained``.
        device: move the model there.
        allow_pickle: also load pickled weights (``pytorch_model.bin``) when a checkpoint has
            no safetensors. Off by default: unpickling can run arbitrary code.
    """
    _kind(task)
    if isinstance(model, (str, os.PathLike)) and not (Path(model) / "config.json").exists():
        from hf_attrib.integrations.trainer import is_trainer_output_dir

        if is_trainer_output_dir(model):
            # A Trainer output_dir without a final save: the architecture comes from its last
            # checkpoint, and the checkpoints default to the whole run.
            checkpoints = model if checkpoints is None else checkpoints
            model = _last_checkpoint(model)
    if isinstance(model, (str, os.PathLike)):
        model, loaded = load_pretrained(model, task, trust_remote_code=trust_remote_code,
                                        revision=revision, allow_pickle=allow_pickle,
                                        **model_kwargs)
        processor = processor if processor is not None else loaded
    elif not isinstance(model, nn.Module):
        raise TypeError(f"model must be a PreTrainedModel, a model id or a folder, got "
                        f"{type(model).__name__}.")
    check_task_kind(model, task)
    if device is not None:
        model.to(device)
    model.eval()
    layer_name = select_layers(model, layers)

    weight_list = None
    load_func = _peft_load_func if _is_peft(model) else None
    if checkpoints is None:
        # The model's own tensors: loading this single checkpoint copies it onto itself.
        checkpoints = model.state_dict()
    elif isinstance(checkpoints, Mapping):
        checkpoints = [checkpoints]
    if isinstance(checkpoints, (list, tuple)) and len(checkpoints) > 1:
        checkpoints = [_unaliased(model, c) for c in checkpoints]
    elif isinstance(checkpoints, (str, os.PathLike)):
        from hf_attrib.integrations.trainer import is_trainer_output_dir, trainer_checkpoints

        if is_trainer_output_dir(checkpoints):
            run = trainer_checkpoints(checkpoints, weights=tracin_weights)
            checkpoints, weight_list = [os.fspath(p) for p in run.paths], run.weights
    return HFAttributionTask(model, task, checkpoints, layer_name, processor=processor,
                             target=target, weight_list=weight_list,
                             checkpoints_load_func=load_func)
