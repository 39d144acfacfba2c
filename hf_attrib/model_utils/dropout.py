"""Switch on chosen dropout layers of an otherwise evaluating model (dropout ensembles).

Deng et al. (2024), "Efficient Ensembles Improve Training Data Attribution", replace the
independently retrained models of an ensemble (e.g. in TRAK) with one trained model evaluated
under several dropout masks. :func:`activate_dropout` prepares such a model: everything runs in
eval mode (BatchNorm uses its running statistics, and so on) except the chosen dropout modules,
which keep sampling masks. Each forward pass, or each fixed random seed, is then one ensemble
member.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

__all__ = ["activate_dropout", "dropout_modules"]


def _is_dropout(module: nn.Module) -> bool:
    return isinstance(module, nn.modules.dropout._DropoutNd) or "Dropout" in type(module).__name__


def dropout_modules(model: nn.Module) -> dict[str, nn.Module]:
    """The dropout modules of ``model`` by qualified name.

    A module counts as dropout if it subclasses torch's dropout base (``nn.Dropout``,
    ``Dropout1d/2d/3d``, ``AlphaDropout``, ``FeatureAlphaDropout``) or its class name contains
    ``"Dropout"`` (e.g. custom dropouts in Hugging Face models).
    """
    return {name: module for name, module in model.named_modules() if _is_dropout(module)}


def activate_dropout(
    model: nn.Module,
    layer_positions: str | Sequence[str] | None = None,
    dropout_prob: float | None = None,
) -> nn.Module:
    """Put ``model`` in eval mode with the chosen dropout modules in train mode.

    Used for dropout ensembles (Deng et al. 2024): one trained model evaluated under several
    random dropout masks stands in for several retrained models. Only dropout *modules* are
    switched; dropout applied functionally with a parent module's ``training`` flag (e.g.
    ``F.dropout(..., training=self.training)`` or an attention kernel's ``dropout_p`` inside an
    attention module) stays off, because those parents are in eval mode.

    Args:
        model: the model, changed in place.
        layer_positions: qualified module names (as in ``model.named_modules()``) of the dropout
            modules to activate, or a single name; ``None`` activates every dropout module and
            an empty sequence none.
        dropout_prob: if given, the new drop probability of the activated modules (their ``p``
            attribute, or ``drop_prob`` for dropouts that name it so).

    Returns:
        ``model`` itself.

    Raises:
        ValueError: if a name is not a dropout module of ``model``, or ``dropout_prob`` is not a
            probability.
    """
    if dropout_prob is not None and not 0.0 <= dropout_prob <= 1.0:
        raise ValueError(f"dropout_prob must be between 0 and 1, got {dropout_prob}.")
    dropouts = dropout_modules(model)
    if layer_positions is None:
        names = list(dropouts)
    else:
        names = [layer_positions] if isinstance(layer_positions, str) else list(layer_positions)
        unknown = [name for name in names if name not in dropouts]
        if unknown:
            available = ", ".join(repr(n) for n in dropouts) or "none"
            raise ValueError(
                f"{unknown} are not dropout modules of this model; its dropout modules are: "
                f"{available}."
            )
    if dropout_prob is not None:
        for name in names:
            if not (hasattr(dropouts[name], "p") or hasattr(dropouts[name], "drop_prob")):
                raise ValueError(
                    f"cannot set the drop probability of {name!r} "
                    f"({type(dropouts[name]).__name__}): it has neither a `p` nor a `drop_prob` "
                    "attribute."
                )
    model.eval()
    for name in names:
        module = dropouts[name]
        if dropout_prob is not None:
            setattr(module, "p" if hasattr(module, "p") else "drop_prob", dropout_prob)
        module.train()
    return model
