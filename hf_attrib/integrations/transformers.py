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

Where the pieces live: the task kinds in :mod:`hf_attrib.integrations.task_kinds`, the
loaders and collators in :mod:`hf_attrib.integrations.data` (``dataloader_from_dataset`` and
``TASK_KINDS`` are re-exported here), the margin / log-likelihood math in
:mod:`hf_attrib.func.targets`.
"""

from __future__ import annotations

import inspect
import os
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader

from hf_attrib.algorithm import Attributor, get_method, make_attributor, method_names
from hf_attrib.algorithm.registry import MethodSpec
from hf_attrib.func.layer_grads import LayerGradients
from hf_attrib.func.targets import (
    correct_class_log_prob,
    correct_class_margin,
    correct_class_probability,
    masked_mean,
    token_log_likelihood,
)
from hf_attrib.integrations.data import dataloader_from_dataset
from hf_attrib.integrations.task_kinds import MODEL_INPUTS, TASK_KINDS, TaskKind, task_kind
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


# --------------------------------------------------------------------------------------------
# Task kinds and loading
# --------------------------------------------------------------------------------------------
def _class_names(kind: TaskKind) -> set[str]:
    from transformers.models.auto import modeling_auto

    names: set[str] = set()
    for value in getattr(modeling_auto, kind.mapping, {}).values():
        names.update([value] if isinstance(value, str) else value)
    return names


def _matches(class_name: str, kind: TaskKind) -> bool:
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
    kind = task_kind(task)
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

    kind = task_kind(task)
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
            k in self._accepts or (self._accepts_any and k in MODEL_INPUTS))}
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
        return name in self._accepts or (self._accepts_any and name in MODEL_INPUTS)

    def logits(self, params: dict[str, Tensor], batch: Mapping[str, Tensor]) -> Tensor:
        out = torch.func.functional_call(self.model, params, (), self.inputs(batch))
        return out.logits if hasattr(out, "logits") else out[0]

    # per-example values [B] ------------------------------------------------------------
    def per_example(self, params: dict[str, Tensor], batch: Mapping[str, Tensor]
                    ) -> dict[str, Tensor]:
        labels = _require_labels(batch, self.task)
        # float32 math also for half-precision models (the terms: hf_attrib.func.targets)
        logits = self.logits(params, batch).float()
        if self.task in ("causal-lm", "masked-lm"):
            logp, mask = token_log_likelihood(logits, labels, shift=self.task == "causal-lm")
            attention = batch.get("attention_mask")
            if self.task == "causal-lm" and attention is not None and attention.dim() == 2:
                # A token is predicted from the position before it; after left padding the
                # first real token would be "predicted" from a padding position, a term the
                # unpadded sequence does not have.
                mask = mask & attention[:, :-1].bool()
            return {"loss": -masked_mean(logp, mask), "target": (logp * mask).sum(-1)}
        logp = correct_class_log_prob(logits, labels)
        margin = correct_class_margin(logits, labels)
        prob = correct_class_probability(logits, labels)
        if self.task == "token-classification":
            mask = labels != -100
            return {"loss": -masked_mean(logp, mask), "target": masked_mean(margin, mask),
                    "prob": masked_mean(prob, mask)}
        return {"loss": -logp, "target": margin, "prob": prob}

    def loss(self, params: dict[str, Tensor], batch: Mapping[str, Tensor]) -> Tensor:
        return self.per_example(params, batch)["loss"].mean()

    def sampled_loss(self, params: dict[str, Tensor], batch: Mapping[str, Tensor],
                     generator: torch.Generator) -> Tensor:
        """The loss with every counted label drawn from the model's own predictive
        distribution (the true Fisher of K-FAC/EK-FAC), batch mean. Positions that do not
        count in the loss (``-100``, padding) stay out."""
        labels = _require_labels(batch, self.task)
        with torch.no_grad():
            logits = self.logits(params, batch).float()
        probs = torch.softmax(logits, dim=-1).reshape(-1, logits.shape[-1])
        draw = torch.multinomial(probs, 1, generator=generator).reshape(logits.shape[:-1])
        if self.task == "causal-lm":  # position t predicts token t + 1
            draw = torch.cat([labels[:, :1], draw[:, :-1]], dim=1)
        sampled = torch.where(labels == -100, labels, draw.to(labels.dtype))
        return self.loss(params, {**batch, "labels": sampled})

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
# The task
# --------------------------------------------------------------------------------------------
def method_defaults(method: str) -> dict[str, Any]:
    """The keyword arguments ``task.attributor(method)`` gives the attributor by default: the
    registry's ``get_method(method).defaults``, as a fresh ``dict`` (nested ones too).

    Raises:
        ValueError: ``method`` is not registered.
    """
    return get_method(method).constructor_kwargs()


#: ``method_defaults`` of every built-in method, read once at import. Kept for compatibility:
#: the registry (``hf_attrib.algorithm.get_method``) is the home of these defaults.
METHOD_DEFAULTS: dict[str, dict[str, Any]] = {name: method_defaults(name)
                                              for name in method_names()}


def _check_pad_token(model: nn.Module, task: str) -> None:
    """Refuse a text classifier without ``config.pad_token_id``. Decoder classifiers (GPT-2,
    Llama...) score the last token that is not padding, found by that id; without it they
    refuse batches but take the last position of a batch of one, which is what a per-example
    gradient is: a right-padded example would be classified from a padding token."""
    config = getattr(_base_model(model), "config", None)
    if task == "sequence-classification" and config is not None and getattr(
            config, "pad_token_id", None) is None:
        raise ValueError(
            f"{type(_base_model(model)).__name__}'s config has no pad_token_id, so it cannot "
            "tell a padded example's last real token from padding (each example's gradient "
            "is computed alone, where the model would take the last, padding, position). Set "
            "model.config.pad_token_id = tokenizer.pad_token_id before building the task.")


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
        _check_pad_token(model, task)
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
        # K-FAC/EK-FAC's true Fisher (fisher="true") draws labels through this.
        self.sampled_loss_func = functions.sampled_loss
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
                   **kwargs: Any) -> Attributor:
        """The attributor of ``method`` wired to this task (layers, TRAK's Q, RPS layer,
        TracInCP step sizes); ``kwargs`` go to its constructor, over the registry's defaults
        (``hf_attrib.algorithm.get_method(method).defaults``, the same defaults as
        ``hf-attrib attribute``). ``device=None``: the model's device.

        Raises:
            ValueError: ``method`` is not registered, or needs a classification head that
                this task kind does not have.
        """
        spec = get_method(method)
        # What this task knows goes to every method whose constructor takes it.
        accepts = inspect.signature(spec.attributor_class).parameters
        if spec.needs_classification_head and self.rps_layer_name is None:
            raise ValueError(f"method {method!r} needs one feature vector per example at a "
                             f"final linear layer; task kind {self.task_kind!r} has none (it "
                             "applies to sequence/image classification).")
        if "final_linear_layer_name" in accepts:
            kwargs.setdefault("final_linear_layer_name", self.rps_layer_name)
        else:
            kwargs.setdefault("layer_name", self.layer_name)
        if "correct_probability_func" in accepts:
            kwargs.setdefault("correct_probability_func", self.correct_probability_func)
        if "weight_list" in accepts and self.weight_list is not None:
            kwargs.setdefault("weight_list", self.weight_list)
        if "projector_kwargs" not in kwargs:
            factored = self._factored_default(spec, kwargs.get("layer_name"))
            if factored is not None:
                kwargs["projector_kwargs"] = factored
        return make_attributor(method, self, device=device, **kwargs)

    def _factored_default(self, spec: MethodSpec, layer_name: Any) -> dict[str, Any] | None:
        """The factored projection at the method's default size, for a method that projects
        by default and a layer selection the per-layer engine covers (``None`` otherwise):
        features from one batched backward instead of explicit per-example gradients."""
        default = spec.constructor_kwargs().get("projector_kwargs")
        if (not getattr(spec.attributor_class, "supports_factored", False) or not default
                or default.get("proj_type", "auto") != "auto" or "proj_dim" not in default
                or any(m.training for m in self.model.modules())):
            return None
        if LayerGradients(self.model, self.select_parameters(layer_name)).uncovered:
            return None
        return {**default, "proj_type": "factored"}


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
        # an adapter file holds the trainable weights only: each of them must be in it
        trainable = {n for n, p in model.named_parameters() if p.requires_grad}
        _check_peft_keys(path, getattr(result, "unexpected_keys", []),
                         [k for k in getattr(result, "missing_keys", []) if k in trainable])
        return model
    state = checkpoint if isinstance(checkpoint, Mapping) else load_state_dict_file(checkpoint)
    result = model.load_state_dict(state, strict=False)
    _check_peft_keys(path or "the state dict", result.unexpected_keys, result.missing_keys)
    return model


def _check_peft_keys(source: Any, unexpected: list[str], missing: list[str]) -> None:
    """Refuse a checkpoint that does not fill the PEFT model: a key that loads nowhere (e.g. a
    base model's state dict, whose names lack ``base_model.model.``) or a weight left as it was
    would score every "checkpoint" with the weights already in the model."""
    if unexpected or missing:
        raise ValueError(
            f"checkpoint {source} does not match the PEFT model: "
            + (f"keys it has no place for: {unexpected[:3]}; " if unexpected else "")
            + (f"weights it lacks: {missing[:3]}; " if missing else "")
            + "save checkpoints from the PEFT model itself (its adapter folder, as a Trainer "
            "saves, or peft_model.state_dict()), not from the base model.")


def _last_checkpoint(output_dir: str | os.PathLike) -> Path:
    from hf_attrib.integrations.trainer import checkpoint_folders

    return checkpoint_folders(Path(output_dir))[-1][1]


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
    task_kind(task)
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
