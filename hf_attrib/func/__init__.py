"""Pure functions on ``torch.func``: per-sample gradients, HVP/IHVP solvers, random projection.

``hessian`` is dattri's function API (``hvp``, ``ihvp_*``, ``ihvp_at_x_*``) over two layers
of its own: ``hvp_engine`` (Hessian-vector products within bounded memory) and ``solvers``
(explicit, CG, LiSSA and Arnoldi on a matvec).
"""

from hf_attrib.func import hessian, hvp_engine, projection, solvers, utils
from hf_attrib.func.hessian import (
    hvp,
    hvp_at_x,
    ihvp_arnoldi,
    ihvp_at_x_arnoldi,
    ihvp_at_x_cg,
    ihvp_at_x_explicit,
    ihvp_at_x_lissa,
    ihvp_cg,
    ihvp_explicit,
    ihvp_lissa,
)
from hf_attrib.func.projection import arnoldi_project, random_project
from hf_attrib.func.utils import flatten_func, flatten_params, partial_param, per_sample_grad

__all__ = [
    "arnoldi_project",
    "flatten_func",
    "flatten_params",
    "hessian",
    "hvp",
    "hvp_at_x",
    "hvp_engine",
    "ihvp_arnoldi",
    "ihvp_at_x_arnoldi",
    "ihvp_at_x_cg",
    "ihvp_at_x_explicit",
    "ihvp_at_x_lissa",
    "ihvp_cg",
    "ihvp_explicit",
    "ihvp_lissa",
    "partial_param",
    "per_sample_grad",
    "projection",
    "random_project",
    "solvers",
    "utils",
]
