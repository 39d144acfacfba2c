"""Pure functions on ``torch.func``: per-sample gradients, HVP/IHVP solvers, random projection."""

from hf_attrib.func import hessian, projection, utils
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
    "utils",
]
