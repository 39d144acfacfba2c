"""Attributors: one class per method, all with ``cache``, ``attribute`` and ``self_attribute``.

Every attributor returns scores on one sign convention: ``score[i, j]`` estimates how much
including training example ``i`` raises ``target_func`` on test example ``j``. Every
constructor argument after ``task`` is keyword-only. Methods are also chosen by name from the
registry (``hf_attrib.algorithm.registry``): ``make_attributor("if-cg", task)``.
"""

from hf_attrib.algorithm.base import Attributor, BaseAttributor, FeatureAttributor
from hf_attrib.algorithm.influence_function import (
    IFAttributorArnoldi,
    IFAttributorCG,
    IFAttributorExplicit,
    IFAttributorLiSSA,
)
from hf_attrib.algorithm.kfac import IFAttributorEKFAC, IFAttributorKFAC
from hf_attrib.algorithm.registry import (
    MethodSpec,
    get_method,
    make_attributor,
    method_names,
    register_method,
)
from hf_attrib.algorithm.rps import RPSAttributor
from hf_attrib.algorithm.tracin import GradCosAttributor, GradDotAttributor, TracInAttributor
from hf_attrib.algorithm.trak import TRAKAttributor

__all__ = [
    "Attributor",
    "BaseAttributor",
    "FeatureAttributor",
    "GradCosAttributor",
    "GradDotAttributor",
    "IFAttributorArnoldi",
    "IFAttributorCG",
    "IFAttributorEKFAC",
    "IFAttributorExplicit",
    "IFAttributorKFAC",
    "IFAttributorLiSSA",
    "MethodSpec",
    "RPSAttributor",
    "TRAKAttributor",
    "TracInAttributor",
    "get_method",
    "make_attributor",
    "method_names",
    "register_method",
]
