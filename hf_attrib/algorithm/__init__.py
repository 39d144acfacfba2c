"""Attributors: one class per method, all with ``cache``, ``attribute`` and ``self_attribute``.

Every attributor returns scores on one sign convention: ``score[i, j]`` estimates how much
including training example ``i`` raises ``target_func`` on test example ``j``.
"""

from hf_attrib.algorithm.base import BaseAttributor, FeatureAttributor
from hf_attrib.algorithm.influence_function import (
    IFAttributorArnoldi,
    IFAttributorCG,
    IFAttributorExplicit,
    IFAttributorLiSSA,
)
from hf_attrib.algorithm.rps import RPSAttributor
from hf_attrib.algorithm.tracin import GradCosAttributor, GradDotAttributor, TracInAttributor
from hf_attrib.algorithm.trak import TRAKAttributor

#: The type every attributor is (``cache``, ``attribute``, ``self_attribute``).
Attributor = BaseAttributor

__all__ = [
    "Attributor",
    "BaseAttributor",
    "FeatureAttributor",
    "GradCosAttributor",
    "GradDotAttributor",
    "IFAttributorArnoldi",
    "IFAttributorCG",
    "IFAttributorExplicit",
    "IFAttributorLiSSA",
    "RPSAttributor",
    "TRAKAttributor",
    "TracInAttributor",
]
