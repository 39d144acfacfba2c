"""``IndexCallback``: build a model's attribution index at the end of a ``Trainer`` run, so that
a fine-tuned model is published together with its index."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from transformers import TrainerCallback

__all__ = ["IndexCallback"]


class IndexCallback(TrainerCallback):
    """Build an index (``hf_attrib.index.build``) of the training set with the trained model.

    Args:
        train_dataset: the training examples to index (a ``datasets.Dataset`` of the columns
            ``task_from_pretrained``'s ``dataloader`` reads, e.g. ``text``).
        out: the index folder.
        method: the attribution method (``trak``, ``grad-dot``, ``grad-cos``).
        task: the task kind for ``task_from_pretrained`` (``causal-lm``, ...).
        layers: the layer selection (``None``: all; ``"last:2"``...).
        at: ``"train_end"`` (after the last step) or ``"last_epoch"`` (at the end of the last
            epoch, before the Trainer's final save).
        **build_kwargs: passed to ``build`` (``dtype``, ``shard_rows``, ``batch_size``,
            ``method_kwargs``, ``model_id``, ``dataset_id``...).

    Attributes:
        result: the ``BuildResult`` once built (``None`` before).
        built_at: when it was built (``"epoch 3"``, ``"train_end"``).
    """

    def __init__(self, train_dataset: Any, out: str | Path, *, method: str = "trak",
                 task: str = "causal-lm", layers: Any = None, at: str = "train_end",
                 **build_kwargs: Any) -> None:
        if at not in ("train_end", "last_epoch"):
            raise ValueError(f"at must be 'train_end' or 'last_epoch', got {at!r}.")
        self.train_dataset = train_dataset
        self.out = Path(out)
        self.method = method
        self.task = task
        self.layers = layers
        self.at = at
        self.build_kwargs = build_kwargs
        self.result: Any = None
        self.built_at: str | None = None

    def on_epoch_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        last = state.epoch is not None and state.epoch >= args.num_train_epochs - 1e-6
        if self.at == "last_epoch" and last and self.result is None:
            self._build(kwargs)
            self.built_at = f"epoch {state.epoch:g}"

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.result is None:
            self._build(kwargs)
            self.built_at = "train_end"

    def _build(self, kwargs: dict[str, Any]) -> None:
        from hf_attrib.index.builder import build
        from hf_attrib.integrations.transformers import task_from_pretrained

        model = kwargs["model"]
        processor = kwargs.get("processing_class") or kwargs.get("tokenizer")
        training = model.training
        try:  # features of the trained weights, in eval mode (no dropout)
            task = task_from_pretrained(model, self.task, layers=self.layers,
                                        processor=processor)
            self.result = build(task, self.train_dataset, out=self.out, method=self.method,
                                **self.build_kwargs)
        finally:
            model.train(training)
