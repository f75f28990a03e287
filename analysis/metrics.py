"""Similarity metrics between two weight tensors, registered by name, with their null baselines.

A :class:`Metric` is two pure tensor functions: ``features(t)`` turns one tensor into what is
compared (the flattened weights, its singular values, ...) and ``compare(fa, fb)`` gives a
float. ``metric(a, b) == compare(features(a), features(b))``; splitting them lets a comparison
compute each tensor's SVD once however many tensors it is compared with.

Every ``features`` is homogeneous of degree 1 (``features(c * t) == c * features(t)`` for
c > 0), so the null baseline, a Gaussian matrix with ``a``'s shape and Frobenius norm, is
``norm(a) * G0`` for one unit-norm Gaussian ``G0`` per shape (:func:`gaussian_like`), and
its spectra can be computed once per shape.

Registered metrics (``METRICS.names()``):

- ``cosine``: cosine of the flattened tensors (accumulated in float64, block by block).
- ``svd_cosine``: cosine of the singular-value spectra (descending), matrices only.
- ``eig_cosine``: cosine of the eigenvalue-modulus spectra (descending), square matrices only.
- ``frobenius``: ``‖a − b‖_F``.
- ``frobenius_rel``: ``‖a − b‖_F / ‖a‖_F`` (relative to the first tensor).
- ``cka``: linear CKA with the smaller axis as examples and the longer one as features.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from splice.errors import SpliceError
from splice.registry import Registry

if TYPE_CHECKING:
    import torch

Shape = tuple[int, ...]

#: metrics computed when none are named
DEFAULT_METRICS = ("cosine", "svd_cosine", "frobenius", "frobenius_rel")


@dataclass(frozen=True)
class Metric:
    """A registered similarity metric (see the module docstring).

    ``higher_is_similar`` is False for distances (Frobenius). ``small_features`` marks metrics
    whose features are small vectors (spectra), cheap to cache per tensor.
    ``scale_invariant``: ``compare(fa, c * fb) == compare(fa, fb)`` for c > 0.
    ``other_layer_baseline``: False where the unrelated-layer null costs too much (CKA).
    """

    name: str
    description: str
    features: Callable[[torch.Tensor], Any]
    compare: Callable[[Any, Any], float]
    applies: Callable[[Shape], bool]
    higher_is_similar: bool = True
    small_features: bool = False
    scale_invariant: bool = True
    symmetric: bool = True
    other_layer_baseline: bool = True

    def __call__(self, a: torch.Tensor, b: torch.Tensor) -> float:
        """The metric between two tensors ``a``, ``b`` of one shape."""
        return self.compare(self.features(a), self.features(b))


METRICS: Registry[Metric] = Registry("similarity metric")


def metric(
    name: str,
    description: str,
    *,
    features: Callable[[torch.Tensor], Any],
    applies: Callable[[Shape], bool] = lambda shape: True,
    higher_is_similar: bool = True,
    small_features: bool = False,
    scale_invariant: bool = True,
    symmetric: bool = True,
    other_layer_baseline: bool = True,
) -> Callable[[Callable[[Any, Any], float]], Callable[[Any, Any], float]]:
    """Decorator: register ``compare`` as metric ``name`` with its ``features`` function."""

    def add(compare: Callable[[Any, Any], float]) -> Callable[[Any, Any], float]:
        METRICS.register(name)(
            Metric(
                name,
                description,
                features,
                compare,
                applies,
                higher_is_similar,
                small_features,
                scale_invariant,
                symmetric,
                other_layer_baseline,
            )
        )
        return compare

    return add


def resolve_metrics(names: str | list[str] | tuple[str, ...] | None) -> list[Metric]:
    """Metrics for ``names``: a list, a comma-separated string, ``"all"`` or None (defaults)."""
    if names is None:
        names = list(DEFAULT_METRICS)
    elif isinstance(names, str):
        names = METRICS.names() if names == "all" else [n.strip() for n in names.split(",")]
    out = [METRICS.get(n) for n in dict.fromkeys(names) if n]
    if not out:
        raise SpliceError(f"no similarity metric named; choose from: {', '.join(METRICS.names())}")
    return out


# ---- pure tensor functions ---------------------------------------------------------------------
def is_matrix(shape: Shape) -> bool:
    return len(shape) == 2 and min(shape) > 1


def is_square(shape: Shape) -> bool:
    return is_matrix(shape) and shape[0] == shape[1]


#: elements converted to float64 at a time by the flattened metrics and Gram matrices
BLOCK = 1 << 22


def flat(t: torch.Tensor) -> torch.Tensor:
    """``[*shape] -> [n]``, a view in the tensor's own dtype (metrics upcast block by block)."""
    return t.reshape(-1)


def _blocks(*vs: torch.Tensor) -> Iterator[tuple[torch.Tensor, ...]]:
    """Float64 copies of ``BLOCK``-element slices of equal-length vectors, one slice at a time."""
    import torch

    n = vs[0].numel()
    for i in range(0, n, BLOCK):
        yield tuple(v[i : i + BLOCK].to(torch.float64) for v in vs)


def cosine_of(a: torch.Tensor, b: torch.Tensor) -> float:
    """Cosine of two vectors ``[n]``, ``[n]``, accumulated in float64.

    Zero vectors have no direction: two zero vectors give 1 (identical), one gives 0.
    """
    dot = na = nb = 0.0
    for x, y in _blocks(a, b):
        dot += float(x @ y)
        na += float(x @ x)
        nb += float(y @ y)
    if na == 0 or nb == 0:
        return 1.0 if na == nb else 0.0
    return dot / (na**0.5 * nb**0.5)


def norm_of(v: torch.Tensor) -> float:
    """``‖v‖`` of a vector ``[n]``, accumulated in float64."""
    return sum(float(x @ x) for (x,) in _blocks(v)) ** 0.5


def distance_of(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float]:
    """``(‖a − b‖, ‖a‖)`` of two vectors ``[n]``, accumulated in float64."""
    diff = na = 0.0
    for x, y in _blocks(a, b):
        d = x - y
        diff += float(d @ d)
        na += float(x @ x)
    return diff**0.5, na**0.5


def gram(t: torch.Tensor, dtype: torch.dtype, center: bool = False) -> torch.Tensor:
    """Gram matrix of the smaller side of ``[m, n]``: ``tᵀt`` ``[n, n]`` if n ≤ m else ``t tᵀ``.

    Accumulated over blocks of the longer side in ``dtype``. ``center`` subtracts, from each
    vector along the longer side, its mean over the smaller side first (CKA's centring with the
    smaller side as examples).
    """
    import torch

    m, n = t.shape
    tall = n <= m
    k = n if tall else m
    out = torch.zeros(k, k, dtype=dtype, device=t.device)
    step = max(1, BLOCK // k)
    for i in range(0, m if tall else n, step):
        c = (t[i : i + step] if tall else t[:, i : i + step]).to(dtype)
        if center:
            c = c - c.mean(1 if tall else 0, keepdim=True)
        out += c.T @ c if tall else c @ c.T
    return out


def singular_values(t: torch.Tensor) -> torch.Tensor:
    """Singular values ``[min(m, n)]``, descending, of a matrix ``[m, n]``.

    Computed as the square roots of the eigenvalues of the float64 Gram matrix of the smaller
    side (:func:`gram`): 3-5x faster than ``svdvals`` on CPU, and accurate to about 1e-8 of the
    largest singular value, far below what a spectrum cosine can see.
    """
    import torch

    ev = torch.linalg.eigvalsh(gram(t, torch.float64))
    return ev.clamp_min(0).sqrt().flip(0)


def eigenvalue_moduli(t: torch.Tensor) -> torch.Tensor:
    """Moduli ``|λ|`` ``[n]``, descending, of the (complex) eigenvalues of a square ``[n, n]``.

    Uses the general eigensolver in float32 (float64 when given float64).
    """
    import torch

    dtype = torch.float64 if t.dtype == torch.float64 else torch.float32
    return torch.linalg.eigvals(t.to(dtype)).abs().to(torch.float64).sort(descending=True).values


def cka_features(t: torch.Tensor) -> torch.Tensor:
    """``[m, n]`` -> the centred Gram matrix ``K`` ``[k, k]``, k = min(m, n), for linear CKA.

    Examples are the smaller axis (the input axis of a square matrix), features the longer one:
    for MLP matrices the examples are the residual-stream axis and the features the MLP's
    neurons, so CKA is blind to permuting or rotating neurons (and to scale). ``K = Xc Xcᵀ`` with
    ``X`` ``[examples, features]`` centred over examples; float32 (float64 when given float64).
    """
    import torch

    return gram(t, torch.float64 if t.dtype == torch.float64 else torch.float32, center=True)


def linear_cka(ka: torch.Tensor, kb: torch.Tensor) -> float:
    """``⟨Ka, Kb⟩_F / (‖Ka‖_F ‖Kb‖_F)`` on centred Gram matrices (:func:`cka_features`).

    Equals ``‖YᵀX‖²_F / (‖XᵀX‖_F ‖YᵀY‖_F)`` for the centred ``X``, ``Y``; accumulated in float64.
    """
    return cosine_of(ka.reshape(-1), kb.reshape(-1))


# ---- registered metrics ------------------------------------------------------------------------
@metric("cosine", "cosine of the flattened weights (float64)", features=flat)
def _cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return cosine_of(a, b)


@metric(
    "svd_cosine",
    "cosine of the singular-value spectra (sorted descending; matrices only)",
    features=singular_values,
    applies=is_matrix,
    small_features=True,
)
def _svd_cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return cosine_of(a, b)


@metric(
    "eig_cosine",
    "cosine of the eigenvalue-modulus spectra |λ| (sorted descending; square matrices only)",
    features=eigenvalue_moduli,
    applies=is_square,
    small_features=True,
)
def _eig_cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return cosine_of(a, b)


@metric(
    "frobenius",
    "Frobenius norm of the difference ‖A − B‖_F",
    features=flat,
    higher_is_similar=False,
    scale_invariant=False,
)
def _frobenius(a: torch.Tensor, b: torch.Tensor) -> float:
    return distance_of(a, b)[0]


@metric(
    "frobenius_rel",
    "relative Frobenius distance ‖A − B‖_F / ‖A‖_F",
    features=flat,
    higher_is_similar=False,
    scale_invariant=False,
    symmetric=False,
)
def _frobenius_rel(a: torch.Tensor, b: torch.Tensor) -> float:
    diff, na = distance_of(a, b)
    return diff / na if na > 0 else (0.0 if diff == 0 else float("inf"))


@metric(
    "cka",
    "linear CKA (smaller axis as examples, longer axis as features; matrices only)",
    features=cka_features,
    applies=is_matrix,
    other_layer_baseline=False,
)
def _cka(a: torch.Tensor, b: torch.Tensor) -> float:
    return linear_cka(a, b)


# ---- null baseline -----------------------------------------------------------------------------
def gaussian_like(shape: Shape, seed: int = 0) -> torch.Tensor:
    """A Gaussian tensor ``[*shape]`` (float32) with unit Frobenius norm, fixed per shape and seed.

    ``norm(a) * gaussian_like(a.shape)`` is the null baseline for ``a``: an unrelated matrix of
    the same shape and size.
    """
    import torch

    g = torch.Generator().manual_seed(zlib.crc32(repr((tuple(shape), seed)).encode()))
    t = torch.randn(tuple(shape), generator=g)
    return t.div_(torch.linalg.vector_norm(t))


class Baseline:
    """Metric values against the Gaussian null, with the Gaussian's features cached per shape.

    The baseline of ``m`` for ``a`` is ``m`` between ``a`` and a Gaussian matrix of ``a``'s
    shape and Frobenius norm. Metrics blind to the second tensor's scale compare against the
    unit Gaussian's features; small features (spectra, Gram matrices: costly to compute) are
    kept per shape while they fit in ``cache_bytes``, big ones (a flattened Gaussian: cheap to
    draw again) never, so memory stays flat. The others share one scaled Gaussian per call of
    :meth:`values`.
    """

    def __init__(
        self,
        seed: int = 0,
        device: str | torch.device | None = None,
        cache_bytes: int = 256 * 2**20,
    ) -> None:
        self.seed = seed
        self.device = device
        self.cache_bytes = cache_bytes
        self._cached = 0
        self._features: dict[tuple[Callable[..., Any], Shape], Any] = {}

    def gaussian(self, a: torch.Tensor) -> torch.Tensor:
        """``[*a.shape]``: a Gaussian tensor with ``a``'s shape and Frobenius norm (float32)."""
        g = gaussian_like(tuple(a.shape), self.seed).to(self.device or a.device)
        return g.mul_(norm_of(a.reshape(-1)))

    def values(
        self, ms: list[Metric], a: torch.Tensor, features: dict[Callable[..., Any], Any]
    ) -> dict[str, float]:
        """``{metric: baseline}`` for tensor ``a``; ``features`` maps ``m.features`` to a's.

        At most one Gaussian ``[*a.shape]`` exists at a time: the unit one is drawn once (unless
        every feature it is needed for is cached), serves the scale-invariant metrics, and is
        then scaled in place to ``‖a‖`` for the others.
        """
        shape = tuple(a.shape)
        g: torch.Tensor | None = None
        out: dict[str, float] = {}
        for m in (m for m in ms if m.scale_invariant):
            fg = self._features.get((m.features, shape))
            if fg is None:
                if g is None:
                    g = gaussian_like(shape, self.seed).to(self.device or a.device)
                fg = m.features(g)
                size = nbytes_of(fg)
                if m.small_features and self._cached + size <= self.cache_bytes:
                    self._features[(m.features, shape)] = fg
                    self._cached += size
            out[m.name] = m.compare(features[m.features], fg)
            del fg  # e.g. a Gram matrix, freed before the next features are computed
        rest = [m for m in ms if not m.scale_invariant]
        if rest:
            g = self.gaussian(a) if g is None else g.mul_(norm_of(a.reshape(-1)))
            scaled: dict[Callable[..., Any], Any] = {}
            for m in rest:
                if m.features not in scaled:
                    scaled[m.features] = m.features(g)
                out[m.name] = m.compare(features[m.features], scaled[m.features])
        return {m.name: out[m.name] for m in ms}

    def __call__(self, m: Metric, a: torch.Tensor, fa: Any) -> float:
        """The baseline of one metric for ``a`` (features ``fa``)."""
        return self.values([m], a, {m.features: fa})[m.name]


def nbytes_of(f: Any) -> int:
    if isinstance(f, (tuple, list)):
        return sum(nbytes_of(x) for x in f)
    return int(f.numel() * f.element_size()) if hasattr(f, "element_size") else 64
