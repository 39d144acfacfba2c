"""Helpers that prepare models for attribution (e.g. dropout ensembles)."""

from hf_attrib.model_utils.dropout import activate_dropout, dropout_modules

__all__ = ["activate_dropout", "dropout_modules"]
