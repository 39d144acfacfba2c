"""Target and loss terms from a model's logits: the benchmark's and the integrations' one home.

Pure tensor math, no model and no dtype policy (callers cast, e.g. half-precision logits to
float32, before calling):

* :func:`correct_class_margin`: ``log p / (1 - p)`` of the labelled class, the classification
  target of the paper (Appendix C);
* :func:`correct_class_log_prob` and :func:`correct_class_probability`: ``log p`` (the negative
  cross-entropy) and ``p`` of the labelled class (TRAK's ``Q = 1 - p``);
* :func:`token_log_likelihood`: ``log p(label)`` per position of a language model, with the mask
  of the positions that count (labels ``-100`` do not), and :func:`sequence_log_likelihood`,
  its sum per sequence, the generative target;
* :func:`masked_mean`: the mean over the positions that count.

Every function works on the last dimension of ``logits`` (classes or vocabulary), so the same
call serves one label per example (``[B, C]``) and one label per token (``[B, T, C]``). Labels of
``-100`` are read as class 0 by the per-class functions; mask them with ``labels != -100``.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = [
    "correct_class_log_prob",
    "correct_class_margin",
    "correct_class_probability",
    "masked_mean",
    "sequence_log_likelihood",
    "token_log_likelihood",
]


def _picked(logits: Tensor, labels: Tensor) -> Tensor:
    """``logits[..., label]`` (``-100`` labels read as class 0)."""
    return logits.gather(-1, labels.clamp_min(0)[..., None])[..., 0]


def correct_class_margin(logits: Tensor, labels: Tensor) -> Tensor:
    """``log p / (1 - p)`` of the labelled class, in the stable form
    ``z_y - logsumexp_{c != y} z_c``.

    Args:
        logits: ``[..., C]`` logits.
        labels: ``[...]`` class indices.

    Returns:
        ``[...]`` margins.
    """
    idx = labels.clamp_min(0)[..., None]
    others = logits.scatter(-1, idx, float("-inf"))
    return _picked(logits, labels) - torch.logsumexp(others, dim=-1)


def correct_class_log_prob(logits: Tensor, labels: Tensor) -> Tensor:
    """``log p`` of the labelled class as ``z_y - logsumexp_c z_c`` (minus the cross-entropy).

    The ``logsumexp`` form, not ``log_softmax``: the same value, but on the CPU
    ``log_softmax`` over many narrow rows is ~10x slower under ``vmap``
    (recipes/speed/bench_retrain.py).

    Args:
        logits: ``[..., C]`` logits.
        labels: ``[...]`` class indices.

    Returns:
        ``[...]`` log-probabilities.
    """
    return _picked(logits, labels) - torch.logsumexp(logits, dim=-1)


def correct_class_probability(logits: Tensor, labels: Tensor) -> Tensor:
    """``p`` of the labelled class (``softmax(logits)[label]``).

    Args:
        logits: ``[..., C]`` logits.
        labels: ``[...]`` class indices.

    Returns:
        ``[...]`` probabilities.
    """
    return _picked(torch.softmax(logits, dim=-1), labels)


def token_log_likelihood(logits: Tensor, labels: Tensor, *, shift: bool = True
                         ) -> tuple[Tensor, Tensor]:
    """``log p(label)`` at every position, and which positions count.

    Args:
        logits: ``[B, T, V]`` logits.
        labels: ``[B, T]`` token ids; ``-100`` marks positions that do not count.
        shift: causal language models: position ``t`` predicts ``labels[:, t + 1]``
            (``transformers``' convention), so the result has ``T - 1`` positions. ``False``:
            position ``t`` predicts ``labels[:, t]`` (masked language models).

    Returns:
        ``(log_probs, mask)``, both ``[B, T']``; ``log_probs`` is also computed (from class 0)
        where ``mask`` is ``False``.
    """
    if shift:
        logits, labels = logits[:, :-1], labels[:, 1:]
    # log_softmax over a vocabulary (wide rows, unlike correct_class_log_prob's classes): the
    # form the generative benchmark's ground truth was built with.
    log_probs = _picked(torch.log_softmax(logits, dim=-1), labels)
    return log_probs, labels != -100


def sequence_log_likelihood(logits: Tensor, labels: Tensor, *, shift: bool = True) -> Tensor:
    """Per-sequence sum of ``log p(label)`` over the positions not labelled ``-100``.

    Args:
        logits: ``[B, T, V]`` logits.
        labels: ``[B, T]`` token ids (``-100``: not counted).
        shift: see :func:`token_log_likelihood`.

    Returns:
        ``[B]`` log-likelihoods.
    """
    log_probs, mask = token_log_likelihood(logits, labels, shift=shift)
    return (log_probs * mask).sum(dim=-1)


def masked_mean(values: Tensor, mask: Tensor) -> Tensor:
    """Mean of ``values`` over the last dimension where ``mask`` holds (0 where none does).

    Args:
        values: ``[B, T]`` values.
        mask: ``[B, T]`` booleans.

    Returns:
        ``[B]`` means.
    """
    return (values * mask).sum(-1) / mask.sum(-1).clamp_min(1)
