r"""Random projections of gradients: ``[n, d] -> [n, p]`` with inner products kept (JL).

TRAK and TracIn compare gradients through inner products; projecting them to ``p << d``
dimensions with a Johnson-Lindenstrauss map ``P`` (``E[P^T P] = I``) keeps those inner
products within a small relative error while making storage and kernels ``p``-sized.

Projectors are deterministic functions of ``(seed, ensemble_id)``: the same pair gives the same
``P`` on every call, on every device, so train and test features of one ensemble member always
share a projection. Available kinds:

* ``"fast_jl"``: the CUDA kernel of the ``fast_jl`` package (optional ``cuda`` extra),
  Rademacher entries generated on the fly.
* ``"normal"`` / ``"rademacher"``: dense Gaussian or ±1 entries scaled by ``1/sqrt(p)``,
  each a counter-based hash of ``(seed, ensemble_id, row, column)`` computed with integer
  tensor ops on the features' device (pure torch, no build step, the same map on CPU and
  CUDA), in blocks of input rows, so the whole ``d x p`` matrix never exists in memory.
* ``"sparse"``: a sparse JL map (count-sketch with ``s`` non-zeros ``±1/sqrt(s)`` per input
  coordinate) applied with ``index_add_``: ``O(n d s)`` work instead of ``O(n d p)``, the fast
  choice on CPU.
* ``"identity"``: no projection (``p = d``).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor

from hf_attrib.func.hvp_engine import flat_objective, hvp_operator
from hf_attrib.func.solvers import arnoldi_eigen

__all__ = [
    "DENSE_GENERATOR",
    "ArnoldiProjector",
    "DenseProjector",
    "FastJLProjector",
    "IdentityProjector",
    "Projector",
    "SparseProjector",
    "arnoldi_project",
    "dense_block",
    "dense_keys",
    "fast_jl_available",
    "make_projector",
    "projector_options",
    "random_project",
]

_PROJ_TYPES = ("auto", "fast_jl", "normal", "rademacher", "sparse", "identity")
# Options of each projector kind beyond proj_dim/proj_type/seed (``"auto"`` takes them all and
# passes on those of the kind it picks). max_batch_size is fast_jl's, accepted everywhere.
_TYPE_OPTIONS: dict[str, frozenset[str]] = {
    "fast_jl": frozenset({"kind"}),
    "normal": frozenset({"block_rows"}),
    "rademacher": frozenset({"block_rows"}),
    "sparse": frozenset({"nnz"}),
    "identity": frozenset(),
}
_TYPE_OPTIONS["auto"] = frozenset().union(*_TYPE_OPTIONS.values())
# Entries of the implicit d x p matrix generated per block by default (block_rows = this / p):
# bounds the dense projector's working memory (~16 bytes an entry with the int64 hash words)
# whatever d is. On CPU a block's ~25 elementwise passes run fastest when their int64 words
# (8 bytes per 2 entries) stay in the L2 cache (2**19 entries: 2 MiB); on CUDA bigger blocks
# amortise the kernel launches (_CUDA_BLOCK_FACTOR times more).
_BLOCK_ENTRIES = 2**19
_CUDA_BLOCK_FACTOR = 64


_FAST_JL_WORKS: bool | None = None


def fast_jl_available() -> bool:
    """Whether the optional ``fast_jl`` CUDA kernel really runs here (checked once, cached).

    Importable is not enough: any folder named ``fast_jl`` on ``sys.path`` imports as an
    empty namespace package, and a kernel built for another GPU or CUDA version imports but
    fails on its first call. So this projects a tiny CUDA tensor with it, and is ``False`` on
    machines without CUDA.
    """
    global _FAST_JL_WORKS
    if _FAST_JL_WORKS is None:
        _FAST_JL_WORKS = _probe_fast_jl()
    return _FAST_JL_WORKS


def _probe_fast_jl() -> bool:
    if not torch.cuda.is_available():
        return False
    try:
        import fast_jl

        kernel = fast_jl.project_rademacher_8  # absent from an empty namespace package
        sms = torch.cuda.get_device_properties(torch.cuda.current_device()).multi_processor_count
        out = kernel(torch.ones(8, 16, device="cuda"), 512, 0, sms)
        torch.cuda.synchronize()
        return tuple(out.shape) == (8, 512) and bool(torch.isfinite(out).all())
    except Exception:  # any failure (import, missing symbol, launch) means: not usable
        return False


def _block_seed(seed: int, ensemble_id: int, block: int) -> int:
    # A fixed mixing of the three integers; any collision-free map works, this one is stable
    # across Python processes (unlike hash()).
    return (seed * 1_000_003 + ensemble_id * 10_007 + block * 97 + 12345) % (2**63 - 1)


# --------------------------------------------------------------------------------------------
# Counter-based generator of the dense maps: entry (row, col) of P is a pure function of
# (seed, ensemble_id, row, col), computed with int64 tensor ops on the features' device.
# --------------------------------------------------------------------------------------------
def _int64(value: int) -> int:
    """``value`` mod 2**64 as a signed int64 (torch's int64 ops wrap modulo 2**64)."""
    value %= 2**64
    return value - 2**64 if value >= 2**63 else value


# splitmix64 (Steele et al., 2014): the Weyl increment and the two finaliser multipliers.
_GOLDEN = _int64(0x9E3779B97F4A7C15)
_MIX1 = _int64(0xBF58476D1CE4E5B9)
_MIX2 = _int64(0x94D049BB133111EB)
_U24 = (1 << 24) - 1
# Version of the dense maps' generator: a stored projection is comparable with a new one only
# when this (with seed, ensemble_id, kind, d, p) matches.
DENSE_GENERATOR = "splitmix64-boxmuller-v1"


def _shr_(z: Tensor, shift: int, out: Tensor) -> Tensor:
    """Logical right shift of int64 ``z`` into ``out``: ``>>`` on int64 is arithmetic (it
    copies the sign bit), so the ``shift`` top bits are masked off."""
    torch.bitwise_right_shift(z, shift, out=out)
    return out.bitwise_and_((1 << (64 - shift)) - 1)


def _mix_(z: Tensor, scratch: Tensor) -> Tensor:
    """The splitmix64 finaliser applied to int64 ``z`` in place (``scratch``: same shape).

    A bijection of the 64-bit words whose output bits each depend on every input bit, so
    counters that differ in a single bit give unrelated words."""
    for shift, mult in ((30, _MIX1), (27, _MIX2)):
        z.bitwise_xor_(_shr_(z, shift, scratch)).mul_(mult)  # the multiply wraps mod 2**64
    return z.bitwise_xor_(_shr_(z, 31, scratch))


def _hashed(start: int, count: int, key: int, device: torch.device) -> Tensor:
    """``mix(key + (i + 1) * golden)`` for ``i`` in ``start:start+count``: the splitmix64
    stream of ``key`` (int64 ``[count]``)."""
    z = torch.arange(start + 1, start + count + 1, dtype=torch.int64, device=device)
    return _mix_(z.mul_(_GOLDEN).add_(key), torch.empty_like(z))


def dense_keys(seed: int, ensemble_id: int) -> tuple[int, int]:
    """The row and column keys of the dense map of ``(seed, ensemble_id)`` (Python ints)."""
    def mix(x: int) -> int:  # the scalar splitmix64 finaliser, mod 2**64
        x %= 2**64
        x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) % 2**64
        x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) % 2**64
        return x ^ (x >> 31)

    base = mix(mix(seed * 0x9E3779B97F4A7C15 + 0x632BE59BD9B4E019) + ensemble_id)
    return _int64(mix(base + 1)), _int64(mix(base + 2))


def dense_block(seed: int, ensemble_id: int, kind: str, start: int, stop: int, proj_dim: int,
                device: torch.device | str = "cpu") -> Tensor:
    """Rows ``start:stop`` of the unscaled ``d x p`` dense map, float32, made on ``device``.

    Entry ``(i, j)`` hashes ``row_key(i) + col_key(j mod h)`` (``h = ceil(p / 2)``, keys from
    splitmix64 streams of ``(seed, ensemble_id)``) into a 64-bit word ``w``:

    * ``"rademacher"``: the sign of bit 63 of ``w`` for ``j < h``, of bit 31 for ``j >= h``;
    * ``"normal"``: Box-Muller from the uniforms ``u1 = (w[63:40] + 1/2) / 2**24`` and
      ``u2 = (w[23:0] + 1/2) / 2**24``: ``sqrt(-2 ln u1) cos(2 pi u2)`` for ``j < h`` and the
      ``sin`` for ``j >= h`` (the two are independent standard normals). ``u1 >= 2**-25`` keeps
      every entry finite (``|entry| <= 5.9``).

    Integer steps are exact, so the bits are the same on every device; the float steps
    (log, sqrt, cos) agree to float32 round-off.
    """
    device = torch.device(device)
    rows, half = stop - start, (proj_dim + 1) // 2
    row_key, col_key = dense_keys(seed, ensemble_id)
    z = _hashed(start, rows, row_key, device)[:, None] + _hashed(0, half, col_key, device)
    scratch = torch.empty_like(z)
    _mix_(z, scratch)
    out = torch.empty(rows, proj_dim, dtype=torch.float32, device=device)
    rest = proj_dim - half
    if kind == "rademacher":
        # (w >> 63) is -1 or 0 (arithmetic shift): 2 * that + 1 is -1 or +1.
        out[:, :half] = torch.bitwise_right_shift(z, 63, out=scratch).mul_(2).add_(1)
        out[:, half:] = _shr_(z[:, :rest], 31, scratch[:, :rest]).bitwise_and_(1).mul_(-2).add_(1)
        return out
    u1 = _shr_(z, 40, scratch).to(torch.float32).add_(0.5).mul_(2.0**-24)
    radius = u1.log_().mul_(-2.0).sqrt_()
    angle = z.bitwise_and_(_U24).to(torch.float32).add_(0.5).mul_(2 * math.pi * 2.0**-24)
    torch.mul(radius, torch.cos(angle), out=out[:, :half])
    torch.mul(radius[:, :rest], torch.sin(angle[:, :rest]), out=out[:, half:])
    return out


class Projector:
    """Base class: ``projector(features [n, d], ensemble_id=0) -> [n, proj_dim]``."""

    def __init__(self, feature_dim: int, proj_dim: int, seed: int = 0) -> None:
        if feature_dim <= 0 or proj_dim <= 0:
            raise ValueError(f"projection needs positive dimensions, got d={feature_dim}, "
                             f"p={proj_dim}.")
        self.feature_dim = feature_dim
        self.proj_dim = proj_dim
        self.seed = seed

    def project(self, features: Tensor, ensemble_id: int = 0) -> Tensor:
        raise NotImplementedError

    def __call__(self, features: Tensor | Mapping[str, Tensor], ensemble_id: int = 0) -> Tensor:
        features = _as_matrix(features)
        if features.shape[1] != self.feature_dim:
            raise ValueError(f"projector built for d={self.feature_dim} got features of "
                             f"dimension {features.shape[1]}.")
        return self.project(features, ensemble_id)


class IdentityProjector(Projector):
    """No projection: returns the features unchanged."""

    def __init__(self, feature_dim: int, seed: int = 0) -> None:
        super().__init__(feature_dim, feature_dim, seed)

    def project(self, features: Tensor, ensemble_id: int = 0) -> Tensor:
        return features


class DenseProjector(Projector):
    """Dense Gaussian (``"normal"``) or Rademacher JL projection, generated block by block.

    ``P[i, j]`` is a counter-based hash of ``(seed, ensemble_id, i, j)`` (see ``dense_block``)
    computed on the features' device, so there is no random state, no host-to-device copy and
    no build step: the map is the same on CPU and CUDA (to float32 round-off for ``"normal"``,
    exactly for ``"rademacher"``), for any batching of the input and any ``block_rows`` (rows
    of ``P`` made per matmul; it bounds the working memory to about ``16 * block_rows * p``
    bytes). The default is ``2**19 / p`` rows on CPU (cache-sized) and 64x that on CUDA, where
    bigger blocks amortise kernel launches.
    """

    def __init__(self, feature_dim: int, proj_dim: int, seed: int = 0, kind: str = "normal",
                 block_rows: int | None = None) -> None:
        super().__init__(feature_dim, proj_dim, seed)
        if kind not in ("normal", "rademacher"):
            raise ValueError(f"DenseProjector kind must be 'normal' or 'rademacher', got {kind!r}")
        if block_rows is not None and (isinstance(block_rows, bool)
                                       or not isinstance(block_rows, numbers.Integral)
                                       or block_rows < 1):
            raise ValueError(f"block_rows must be a positive int, got {block_rows!r}.")
        self.kind = kind
        self._auto_rows = block_rows is None
        self.block_rows = int(block_rows) if block_rows is not None else max(
            1, _BLOCK_ENTRIES // proj_dim)
        self.generator = DENSE_GENERATOR

    def _rows_per_block(self, device: torch.device) -> int:
        if self._auto_rows and device.type == "cuda":
            return self.block_rows * _CUDA_BLOCK_FACTOR
        return self.block_rows

    def project(self, features: Tensor, ensemble_id: int = 0) -> Tensor:
        device = features.device
        out = torch.zeros(features.shape[0], self.proj_dim, dtype=torch.float32, device=device)
        step = self._rows_per_block(device)
        for start in range(0, self.feature_dim, step):
            stop = min(start + step, self.feature_dim)
            mat = dense_block(self.seed, ensemble_id, self.kind, start, stop, self.proj_dim,
                              device)
            out.addmm_(features[:, start:stop].to(torch.float32), mat)
        return out.div_(math.sqrt(self.proj_dim)).to(features.dtype)


class SparseProjector(Projector):
    """Sparse JL (count-sketch) projection with ``nnz`` entries ``±1/sqrt(nnz)`` per input row.

    Each input coordinate ``i`` is added, with a random sign, into ``nnz`` output buckets.
    Inner products are preserved in expectation; the variance falls as ``1/p`` like the dense
    maps for the dense gradient vectors attribution works on. Work is ``O(n d nnz)``. The
    bucket/sign tables (``O(d nnz)`` integers, not ``d x p``) are kept per ensemble id.
    """

    # Rows of the bucket/sign tables drawn from one seeded generator: a constant, so the map
    # depends on (seed, ensemble_id) only.
    block_rows = 1 << 20

    def __init__(self, feature_dim: int, proj_dim: int, seed: int = 0, nnz: int = 4) -> None:
        super().__init__(feature_dim, proj_dim, seed)
        if nnz < 1:
            raise ValueError("SparseProjector needs nnz >= 1.")
        self.nnz = min(nnz, proj_dim)
        self._tables: dict[tuple[int, str], list[tuple[Tensor, Tensor]]] = {}

    def _table(self, ensemble_id: int, device: torch.device) -> list[tuple[Tensor, Tensor]]:
        key = (ensemble_id, str(device))
        if key not in self._tables:
            blocks = []
            for block, start in enumerate(range(0, self.feature_dim, self.block_rows)):
                rows = min(self.block_rows, self.feature_dim - start)
                gen = torch.Generator().manual_seed(_block_seed(self.seed, ensemble_id, block))
                buckets = torch.randint(0, self.proj_dim, (self.nnz, rows), generator=gen)
                signs = torch.randint(0, 2, (self.nnz, rows), generator=gen).float() * 2 - 1
                signs /= math.sqrt(self.nnz)
                blocks.append((buckets.to(device), signs.to(device)))
            self._tables[key] = blocks
        return self._tables[key]

    def project(self, features: Tensor, ensemble_id: int = 0) -> Tensor:
        x = features.to(torch.float32)
        out = torch.zeros(x.shape[0], self.proj_dim, dtype=torch.float32, device=x.device)
        for (buckets, signs), start in zip(self._table(ensemble_id, x.device),
                                           range(0, self.feature_dim, self.block_rows),
                                           strict=True):
            chunk = x[:, start:start + buckets.shape[1]]
            for j in range(self.nnz):
                out.index_add_(1, buckets[j], chunk * signs[j])
        return out.to(features.dtype)


class FastJLProjector(Projector):
    """The ``fast_jl`` CUDA kernel (Park et al., 2023), scaled by ``1/sqrt(p)``.

    ``proj_dim`` must be a multiple of 512 (a constraint of the kernel).
    """

    def __init__(self, feature_dim: int, proj_dim: int, seed: int = 0,
                 kind: str = "rademacher", max_batch_size: int = 32,
                 device: torch.device | str = "cuda") -> None:
        super().__init__(feature_dim, proj_dim, seed)
        if proj_dim % 512:
            raise ValueError(f"fast_jl needs proj_dim to be a multiple of 512, got {proj_dim}.")
        if max_batch_size not in (8, 16, 32):
            raise ValueError("fast_jl max_batch_size must be 8, 16 or 32.")
        if not fast_jl_available():
            raise ValueError(
                "proj_type='fast_jl' needs the fast_jl CUDA kernel, which does not run here (no "
                "CUDA device, fast_jl not installed or built for another GPU/CUDA, or a folder "
                "named fast_jl shadowing it). Install the cuda extra on a CUDA machine, or use "
                "proj_type='normal' / 'sparse' (proj_type='auto' picks for you)."
            )
        import fast_jl  # optional CUDA extra: imported only when this projector is built

        self._fast_jl = fast_jl
        self.kind = kind
        self.max_batch_size = max_batch_size
        self.num_sms = torch.cuda.get_device_properties(torch.device(device)).multi_processor_count

    def project(self, features: Tensor, ensemble_id: int = 0) -> Tensor:
        if not features.is_cuda:
            raise ValueError("fast_jl projects CUDA tensors only; move the features to a GPU or "
                             "use proj_type='rademacher'/'sparse'.")
        n = features.shape[0]
        tile = 8 if n <= 8 else 16 if n <= 16 else 32
        tile = min(tile, self.max_batch_size)
        fn = getattr(self._fast_jl, f"project_{self.kind}_{tile}")
        seed = self.seed + 10_000 * ensemble_id
        out = fn(features.contiguous(), self.proj_dim, seed, self.num_sms)
        return (out.to(torch.float32) / math.sqrt(self.proj_dim)).to(features.dtype)


def _as_matrix(features: Tensor | Mapping[str, Tensor]) -> Tensor:
    if isinstance(features, Mapping):
        first = next(iter(features.values()))
        features = torch.cat([v.reshape(first.shape[0], -1) for v in features.values()], dim=1)
    if features.dim() != 2:
        raise ValueError(f"features must be [n, d]; got shape {tuple(features.shape)}.")
    return features


def _feature_dim(feature: Tensor | Mapping[str, Tensor] | int) -> int:
    if isinstance(feature, int):
        return feature
    return _as_matrix(feature).shape[1]


def _check_options(proj_dim: Any, proj_type: Any, seed: Any, options: Mapping[str, Any]
                   ) -> None:
    """Refuse impossible projection options with an error naming the option."""
    if proj_dim is not None and (isinstance(proj_dim, bool)
                                 or not isinstance(proj_dim, numbers.Integral) or proj_dim <= 0):
        raise ValueError(
            f"proj_dim={proj_dim!r} is not a projection size: pass a positive int (e.g. "
            "proj_dim=512), or leave proj_dim out (projector_kwargs=None) for no projection."
        )
    if proj_type not in _PROJ_TYPES:
        raise ValueError(f"proj_type must be one of {_PROJ_TYPES}, got {proj_type!r}.")
    if proj_dim is None and proj_type not in ("auto", "identity"):
        raise ValueError(f"proj_type={proj_type!r} needs proj_dim (the projection size, e.g. "
                         "proj_dim=512); use proj_type='identity' for no projection.")
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        raise ValueError(f"proj_seed={seed!r} must be an int.")
    unknown = sorted(set(options) - _TYPE_OPTIONS[proj_type] - {"max_batch_size"})
    if unknown:
        known = ["proj_dim", "proj_type", "proj_seed", "max_batch_size",
                 *sorted(_TYPE_OPTIONS[proj_type])]
        raise ValueError(f"unknown projector option(s) {unknown} for proj_type={proj_type!r}; "
                         f"the options are {known}.")


def projector_options(projector_kwargs: Mapping[str, Any] | None) -> dict[str, Any]:
    """Check an attributor's ``projector_kwargs`` and turn them into ``make_projector``'s
    keyword arguments (``proj_dim``, ``proj_type``, ``seed`` and the kind's own options).

    Keys: ``proj_dim`` (``None``/absent: no projection), ``proj_type`` (default ``"auto"``
    with a ``proj_dim``, else ``"identity"``), ``proj_seed``, ``max_batch_size`` (or dattri's
    ``proj_max_batch_size``), ``nnz`` (sparse), ``block_rows`` (dense), ``kind`` (fast_jl);
    ``device`` is ignored (the attributor's is used).

    Raises:
        ValueError: an impossible value (``proj_dim=0``, a negative or non-int ``proj_dim``,
            an unknown ``proj_type``) or an unknown option, named in the message.
    """
    options = dict(projector_kwargs or {})
    proj_dim = options.pop("proj_dim", None)
    proj_type = options.pop("proj_type", "auto" if proj_dim is not None else "identity")
    seed = options.pop("proj_seed", 0)
    options.pop("device", None)
    if "proj_max_batch_size" in options:
        options["max_batch_size"] = options.pop("proj_max_batch_size")
    _check_options(proj_dim, proj_type, seed, options)
    return {"proj_dim": proj_dim, "proj_type": proj_type, "seed": seed, **options}


def make_projector(feature_dim: int, proj_dim: int | None, proj_type: str = "auto",
                   seed: int = 0, device: torch.device | str | None = None,
                   max_batch_size: int = 32, **kwargs: Any) -> Projector:
    """Build a projector.

    ``proj_type="auto"`` picks fast_jl on CUDA when it is installed and ``proj_dim`` is a
    multiple of 512, the dense Gaussian map on other CUDA set-ups (its entries are hashed on
    the device, in pure torch: no build step), and the sparse JL map on CPU, where generating
    a dense ``d x p`` map block by block costs far more than the count-sketch
    (``recipes/speed/bench_projection.py``). Its
    ``kwargs`` may hold the options of every kind; those of the kind picked are used.

    ``proj_dim=None`` or ``proj_dim >= feature_dim`` with ``proj_type="auto"`` gives the
    identity.

    Raises:
        ValueError: ``proj_dim`` is not a positive int (or ``None``), ``proj_type`` is
            unknown or needs a ``proj_dim``, or an option does not belong to ``proj_type``.
    """
    _check_options(proj_dim, proj_type, seed, kwargs)
    if proj_dim is not None:
        proj_dim = int(proj_dim)
    device = torch.device(device) if device is not None else torch.device("cpu")
    if proj_type == "identity" or proj_dim is None or (
        proj_type == "auto" and proj_dim >= feature_dim
    ):
        return IdentityProjector(feature_dim, seed)
    if proj_type == "auto":
        if device.type == "cuda":
            use_fast_jl = fast_jl_available() and proj_dim % 512 == 0
            proj_type = "fast_jl" if use_fast_jl else "normal"
        else:
            proj_type = "sparse"
        kwargs = {k: v for k, v in kwargs.items() if k in _TYPE_OPTIONS[proj_type]}
    if proj_type == "fast_jl":
        return FastJLProjector(feature_dim, proj_dim, seed, max_batch_size=max_batch_size,
                               device=device, **kwargs)
    if proj_type == "sparse":
        return SparseProjector(feature_dim, proj_dim, seed, **kwargs)
    return DenseProjector(feature_dim, proj_dim, seed, kind=proj_type, **kwargs)


def random_project(
    feature: Tensor | Mapping[str, Tensor] | int,
    feature_batch_size: int | None = None,
    proj_dim: int = 512,
    proj_max_batch_size: int = 32,
    device: torch.device | str | None = None,
    proj_seed: int = 0,
    use_half_precision: bool = False,
    proj_type: str = "auto",
    **kwargs: Any,
) -> Callable[..., Tensor]:
    """A random projector for features shaped like ``feature`` (the paper's ``random_project``).

    Args:
        feature: an example feature batch ``[n, d]`` (or dict of tensors), or ``d`` itself.
        feature_batch_size: kept for call compatibility (Demo 3); batches of any size work.
        proj_dim: output dimension ``p``.
        proj_max_batch_size: fast_jl kernel tile (8, 16 or 32).
        device: where projections run; ``"cuda"`` enables fast_jl.
        proj_seed: seed; with ``ensemble_id`` it fixes the projection.
        use_half_precision: project in float16 (fast_jl's native precision).
        proj_type: ``"auto"``, ``"fast_jl"``, ``"normal"``, ``"rademacher"``, ``"sparse"``,
            ``"identity"``.

    Returns:
        ``project(features, ensemble_id=0) -> [n, proj_dim]``.
    """
    del feature_batch_size
    projector = make_projector(_feature_dim(feature), proj_dim, proj_type, proj_seed, device,
                               max_batch_size=proj_max_batch_size, **kwargs)

    def project(features: Tensor | Mapping[str, Tensor], ensemble_id: int = 0) -> Tensor:
        x = _as_matrix(features)
        if use_half_precision:
            x = x.half()
        return projector(x, ensemble_id=ensemble_id)

    project.projector = projector  # type: ignore[attr-defined]
    return project


class ArnoldiProjector(Projector):
    r"""Project onto the top Hessian eigenvectors, scaled by :math:`\lambda^{-1/2}`.

    ``P(g) = diag(lambda + reg)^{-1/2} V^T g``, so that ``<P(g), P(g')>`` approximates
    ``g^T (H + reg I)^{-1} g'`` (the influence-function kernel on the top-``k`` eigenspace).
    """

    def __init__(self, eigenvalues: Tensor, eigenvectors: Tensor,
                 regularization: float = 0.0) -> None:
        super().__init__(eigenvectors.shape[1], eigenvectors.shape[0])
        scale = (eigenvalues + regularization).abs().clamp_min(1e-12).rsqrt()
        self.basis = eigenvectors * scale[:, None]

    def project(self, features: Tensor, ensemble_id: int = 0) -> Tensor:
        return features.to(self.basis.dtype) @ self.basis.T.to(features.device)


def arnoldi_project(
    feature_dim: int | Tensor,
    func: Callable[..., Tensor],
    x: Any,
    argnums: int = 0,
    proj_dim: int = 100,
    max_iter: int = 200,
    norm_constant: float = 1.0,
    tol: float = 1e-7,
    regularization: float = 0.0,
    mode: str = "rev-fwd",
    seed: int = 0,
) -> Callable[..., Tensor]:
    """A projector onto the top ``proj_dim`` eigenvectors of the Hessian of ``func`` at ``x``.

    This is the paper's Demo 4 building block: swapping it for ``random_project`` in TRAK
    yields an influence-function-like method on a low-rank Hessian.

    Args:
        feature_dim: ``d``, or a feature tensor ``[n, d]`` whose last dimension is ``d``.
        func: scalar function whose Hessian is taken with respect to ``x[argnums]``.
        x: the argument tuple (or the single parameter tensor).
        proj_dim: number of eigenvectors kept.
        max_iter: Arnoldi iterations (at least ``proj_dim``).
    """
    d = feature_dim if isinstance(feature_dim, int) else feature_dim.shape[-1]
    x = tuple(x) if isinstance(x, (tuple, list)) else (x,)
    objective, theta = flat_objective(func, x, argnums)
    if theta.numel() != d:
        raise ValueError(f"feature_dim {d} does not match the parameter size {theta.numel()}.")
    op = hvp_operator(objective, theta, mode)
    evals, evecs = arnoldi_eigen(
        lambda v: op(v) / norm_constant, d, max_iter=max(max_iter, proj_dim), top_k=proj_dim,
        tol=tol, seed=seed, dtype=theta.dtype, device=theta.device,
    )
    projector = ArnoldiProjector(evals * norm_constant, evecs, regularization)

    def project(features: Tensor | Mapping[str, Tensor], ensemble_id: int = 0) -> Tensor:
        return projector(features, ensemble_id)

    project.projector = projector  # type: ignore[attr-defined]
    return project
