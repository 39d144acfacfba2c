"""Unshuffled loaders of dict batches from a ``datasets.Dataset``, for attribution.

:func:`dataloader_from_dataset` (also ``task.dataloader(...)``) tokenises a text column or
transforms an image column with the model's processor, maps class labels (string labels
through ``config.label2id``, checked against the head), masks a masked-LM dataset once,
reproducibly, and picks the collator: stacking for equal lengths, padding otherwise (causal-LM
labels are the inputs with padding set to ``-100``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import DataLoader

from hf_attrib.integrations.task_kinds import MODEL_INPUTS, task_kind

__all__ = ["dataloader_from_dataset"]


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
    kind = task_kind(task)
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
    elif "labels" not in columns and "label" in columns and (
            kind.classification or task == "token-classification"):
        # a language model's labels are its tokens: a class 'label' column is not them
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
    keep = [c for c in dataset.column_names if c in MODEL_INPUTS or c == "labels"]
    dataset = dataset.select_columns(keep)
    if task in ("token-classification", "masked-lm") and "labels" in dataset.column_names:
        _check_token_labels(dataset, task)

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


def _check_token_labels(dataset: Any, task: str) -> None:
    """One label per token: the padding collator fills short label lists with -100, so word
    labels beside sub-word tokens would silently pair word i with token i (often [CLS])."""
    for i, (ids, labels) in enumerate(zip(dataset["input_ids"], dataset["labels"],
                                          strict=True)):
        if len(ids) != len(labels):
            raise ValueError(
                f"{task} needs one label per token, but example {i} has {len(labels)} labels "
                f"for {len(ids)} tokens (word-level labels?). Align them to the tokens first: "
                "tokenise with is_split_into_words=True and map each token's word_ids() to its "
                "word's label (-100 for special tokens), then pass input_ids and labels.")


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
    from transformers import DataCollatorWithPadding

    _needs_pad(processor)
    return _CausalLMLabels(DataCollatorWithPadding(processor))


class _CausalLMLabels:
    """Pad, then label every real token with itself and padding with -100, by the attention
    mask as ``_StackCollator`` does. (``DataCollatorForLanguageModeling`` masks by the pad id,
    which with ``pad_token = eos_token`` also drops each real end-of-sequence token.)"""

    def __init__(self, pad: Callable[[list[Any]], Mapping[str, Tensor]]) -> None:
        self.pad = pad

    def __call__(self, features: list[Any]) -> dict[str, Tensor]:
        batch = dict(self.pad(features))
        labels = batch["input_ids"].clone()
        if "attention_mask" in batch:
            labels[batch["attention_mask"] == 0] = -100
        batch["labels"] = labels
        return batch


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
