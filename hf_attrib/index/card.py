"""The index repo's card (``hub_cards/index_card.md``): model, data, method, sizes, how to query."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from huggingface_hub import ModelCard, ModelCardData

from hf_attrib import __version__
from hf_attrib.hub.cards import hub_url, read_template
from hf_attrib.hub.layout import INDEX_FILE

__all__ = ["index_card"]

# A Hub repo id (``org/name`` or ``name``), not a local path: only those get links.
_REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")


def _hub_id(value: Any) -> str | None:
    """``value`` when it is an ``org/name`` Hub id rather than a local file or folder."""
    text = value if isinstance(value, str) else None
    if text and "/" in text and _REPO_ID.fullmatch(text) and not Path(text).exists():
        return text
    return None


def index_card(index: dict[str, Any], repo_id: str | None = None) -> ModelCard:
    """The card of an index folder, from its ``hf_attrib_index.json`` data.

    Args:
        index: the index file's data (``attribution_index``, ``kinds``, ``files``).
        repo_id: the index repo, shown in the query examples (default a placeholder).
    """
    meta = index["attribution_index"]
    model, dataset, feats = meta["model"], meta["dataset"], meta["features"]
    sizes = meta.get("sizes", {})
    model_id, dataset_id = _hub_id(model.get("id")), _hub_id(dataset.get("id"))
    data = ModelCardData(
        library_name="hf-attrib", tags=["hf-attrib", "data-attribution", "attribution-index"],
        base_model=model_id, datasets=[dataset_id] if dataset_id else None)
    layers = model.get("layers")
    return ModelCard.from_template(
        data, template_str=read_template("index_card.md"), version=__version__,
        pretty_name=f"Attribution index of {model.get('id') or 'a model'}",
        model_id=model.get("id") or "unknown", model_revision=model.get("revision"),
        model_url=hub_url(model_id) if model_id else None, task_kind=model.get("task"),
        dataset_id=dataset.get("id") or "unknown",
        dataset_url=hub_url(dataset_id, "dataset") if dataset_id else None,
        num_rows=dataset.get("num_rows"), fingerprint=dataset.get("fingerprint"),
        method=meta["method"]["name"], method_class=meta["method"]["class"],
        projection=meta["method"]["kwargs"].get("projector_kwargs"),
        layers="all parameters" if not layers else ", ".join(map(str, layers)),
        width=feats.get("width"), num_checkpoints=feats.get("num_checkpoints"),
        dtype=feats.get("dtype"), num_shards=feats.get("num_shards"),
        feature_mb=f"{sizes.get('feature_bytes', 0) / 1e6:.1f}",
        bytes_per_example=f"{sizes.get('bytes_per_example', 0):.0f}",
        state_kb=f"{sizes.get('state_bytes', 0) / 1e3:.0f}",
        has_state="state" in index.get("kinds", {}), index_file=INDEX_FILE,
        repo_hint=repo_id or "ORG/INDEX-REPO")
