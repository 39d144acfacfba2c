"""Small data utilities shared by the benchmark settings.

``SubsetSampler`` lives in ``hf_attrib.loaders`` (the attributors' loader checks accept it);
it is re-exported here, its former home.
"""

from __future__ import annotations

from hf_attrib.loaders import SubsetSampler

__all__ = ["SubsetSampler"]
