"""Linear solvers on a matvec ``[k, d] -> [k, d]``, one module per solver.

* ``explicit``: ``solve_explicit``, a dense solve with a materialised Hessian;
* ``cg``: ``batched_cg`` (one conjugate-gradient recursion per right-hand side) and
  ``block_cg`` (one shared Krylov space);
* ``lissa``: ``lissa_recursion``, the stochastic Neumann recursion on sampled mini-batches;
* ``arnoldi``: ``arnoldi_eigen`` (top eigenpairs) and ``arnoldi_solve`` (inverse on their span);
* ``checks``: what every solver checks before returning (no NaN/inf, no zero eigenvalue).

They know nothing of models or functions: the operators come from
``hf_attrib.func.hvp_engine``, and ``hf_attrib.func.hessian`` wraps both into dattri's
``ihvp_*`` API.
"""

from hf_attrib.func.solvers.arnoldi import arnoldi_eigen, arnoldi_solve
from hf_attrib.func.solvers.cg import CG_FIX, batched_cg, block_cg
from hf_attrib.func.solvers.checks import check_eigenvalues, check_finite_solution, round_up
from hf_attrib.func.solvers.explicit import EXPLICIT_FIX, solve_explicit
from hf_attrib.func.solvers.lissa import lissa_recursion

__all__ = [
    "CG_FIX",
    "EXPLICIT_FIX",
    "arnoldi_eigen",
    "arnoldi_solve",
    "batched_cg",
    "block_cg",
    "check_eigenvalues",
    "check_finite_solution",
    "lissa_recursion",
    "round_up",
    "solve_explicit",
]
