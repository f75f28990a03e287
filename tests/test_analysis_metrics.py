"""splice.analysis.metrics against numpy formulas on hand-built tensors with known answers."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from splice.analysis.metrics import METRICS, Baseline, gaussian_like, resolve_metrics
from splice.errors import SpliceError

rng = np.random.default_rng(0)


def np_cos(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.ravel().astype(np.float64), b.ravel().astype(np.float64)
    return float(a @ b / np.sqrt((a @ a) * (b @ b)))


def np_cka(wa: np.ndarray, wb: np.ndarray) -> float:
    """Linear CKA via HSIC with the centering matrix H; examples are W's smaller axis."""
    tall = wa.shape[1] <= wa.shape[0]
    x, y = (wa.T, wb.T) if tall else (wa, wb)
    x, y = x.astype(np.float64), y.astype(np.float64)
    n = x.shape[0]
    h = np.eye(n) - np.ones((n, n)) / n
    k, l_ = x @ x.T, y @ y.T
    hsic = lambda p, q: np.trace(p @ h @ q @ h)  # noqa: E731
    return float(hsic(k, l_) / np.sqrt(hsic(k, k) * hsic(l_, l_)))


def orthogonal(n: int) -> np.ndarray:
    q, _ = np.linalg.qr(rng.standard_normal((n, n)))
    return q


def T(x: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(x))


def test_cosine_known_angle():
    a = rng.standard_normal((6, 5))
    u = a.ravel() / np.linalg.norm(a)
    v = rng.standard_normal(30)
    v -= (v @ u) * u
    v /= np.linalg.norm(v)
    for theta in (0.0, 0.3, math.pi / 2, 2.5):
        b = (3.0 * (math.cos(theta) * u + math.sin(theta) * v)).reshape(6, 5)
        assert METRICS.get("cosine")(T(a), T(b)) == pytest.approx(math.cos(theta), abs=1e-12)


def test_flat_metrics_match_numpy():
    a = rng.standard_normal((7, 4)).astype(np.float32)
    b = a + 0.5 * rng.standard_normal((7, 4)).astype(np.float32)
    ta, tb = T(a), T(b)
    diff = np.linalg.norm((a.astype(np.float64) - b).ravel())
    assert METRICS.get("cosine")(ta, tb) == pytest.approx(np_cos(a, b), rel=1e-12)
    assert METRICS.get("frobenius")(ta, tb) == pytest.approx(diff, rel=1e-12)
    rel = diff / np.linalg.norm(a.astype(np.float64))
    assert METRICS.get("frobenius_rel")(ta, tb) == pytest.approx(rel, rel=1e-12)
    assert METRICS.get("frobenius_rel")(tb, ta) != pytest.approx(rel, rel=1e-6)  # relative to A


def test_svd_cosine_known_spectra():
    s1 = np.array([5.0, 3.0, 1.0, 0.5])
    s2 = np.array([4.0, 4.0, 2.0, 0.1])
    a = orthogonal(6)[:, :4] @ np.diag(s1) @ orthogonal(4).T  # [6, 4] with singular values s1
    b = orthogonal(6)[:, :4] @ np.diag(s2) @ orthogonal(4).T
    expected = float(s1 @ s2 / np.linalg.norm(s1) / np.linalg.norm(s2))
    m = METRICS.get("svd_cosine")
    assert m(T(a), T(b)) == pytest.approx(expected, abs=1e-12)
    assert m(T(a.T), T(b.T)) == pytest.approx(expected, abs=1e-12)  # wide matrices too
    np.testing.assert_allclose(m.features(T(a)).numpy(), s1, rtol=1e-10)
    big = rng.standard_normal((40, 90)).astype(np.float32)
    ref = np.linalg.svd(big.astype(np.float64), compute_uv=False)
    np.testing.assert_allclose(m.features(T(big)).numpy(), ref, rtol=1e-9, atol=1e-9)


def test_eig_cosine_known_eigenvalues():
    lam1 = np.array([4.0, -2.0, 1.0, 0.5, 0.25])
    lam2 = np.array([3.0, 3.0, -1.0, 0.1, 2.0])
    p1, p2 = rng.standard_normal((5, 5)), rng.standard_normal((5, 5))
    a = p1 @ np.diag(lam1) @ np.linalg.inv(p1)
    b = p2 @ np.diag(lam2) @ np.linalg.inv(p2)
    m1, m2 = np.sort(np.abs(lam1))[::-1], np.sort(np.abs(lam2))[::-1]
    expected = float(m1 @ m2 / np.linalg.norm(m1) / np.linalg.norm(m2))
    m = METRICS.get("eig_cosine")
    assert m(T(a), T(b)) == pytest.approx(expected, abs=1e-9)
    x = rng.standard_normal((30, 30)).astype(np.float32)
    ref = np.sort(np.abs(np.linalg.eigvals(x.astype(np.float64))))[::-1]
    np.testing.assert_allclose(m.features(T(x)).numpy(), ref, rtol=1e-4)
    assert not m.applies((30, 20)) and m.applies((30, 30))
    assert not METRICS.get("svd_cosine").applies((30,))


@pytest.mark.parametrize("shape", [(12, 5), (5, 12), (7, 7)])  # tall, wide, square
def test_cka_matches_hsic_reference(shape):
    a = rng.standard_normal(shape)
    b = a @ np.diag(rng.uniform(0.5, 2, shape[1])) + 0.7 * rng.standard_normal(shape)
    m = METRICS.get("cka")
    assert m(T(a), T(b)) == pytest.approx(np_cka(a, b), rel=1e-10)
    # invariant to rotating the features (the longer axis; the rows of a square matrix) and scale
    tall = shape[1] <= shape[0]
    rot = orthogonal(shape[0]) @ a * 3.0 if tall else a @ orthogonal(shape[1]) * 3.0
    assert m(T(a), T(rot)) == pytest.approx(1.0, abs=1e-10)


@pytest.mark.parametrize("name", ["cosine", "svd_cosine", "eig_cosine", "cka"])
def test_identical_is_one(name):
    a = T(rng.standard_normal((9, 9)).astype(np.float32))
    tol = 1e-6 if name == "cka" else 1e-9  # CKA's products run in float32 for float32 input
    assert METRICS.get(name)(a, a.clone()) == pytest.approx(1.0, abs=tol)


@pytest.mark.parametrize("name", ["frobenius", "frobenius_rel"])
def test_identical_is_zero(name):
    a = T(rng.standard_normal((9, 3)).astype(np.float32)).to(torch.bfloat16)
    assert METRICS.get(name)(a, a.clone()) == 0.0


def test_gaussian_baseline():
    g = gaussian_like((64, 32))
    assert float(torch.linalg.vector_norm(g)) == pytest.approx(1.0, rel=1e-6)
    assert torch.equal(g, gaussian_like((64, 32)))  # fixed per shape
    a = T(rng.standard_normal((64, 32)) * 0.02 + 0.01)
    base = Baseline()
    for x in (a, 7 * a + 1, a):  # per-shape caches must not leak one tensor's norm into another
        gauss = base.gaussian(x)
        norm = float(torch.linalg.vector_norm(x))
        assert float(torch.linalg.vector_norm(gauss)) == pytest.approx(norm, rel=1e-6)
        ms = [m for n in METRICS.names() if (m := METRICS.get(n)).applies(tuple(x.shape))]
        assert len(ms) == 5  # all but eig_cosine
        for m in ms:
            name = m.name
            expected = m(x, gauss)
            assert base(m, x, m.features(x)) == pytest.approx(expected, rel=1e-6, abs=1e-6), name
        together = base.values(ms, x, {m.features: m.features(x) for m in ms})
        assert together == {m.name: base(m, x, m.features(x)) for m in ms}
    cos = base(METRICS.get("cosine"), a, METRICS.get("cosine").features(a))
    assert abs(cos) < 5 / math.sqrt(a.numel())
    rel = METRICS.get("frobenius_rel")
    assert base(rel, a, rel.features(a)) == pytest.approx(math.sqrt(2), abs=0.1)


def test_spectrum_cosine_is_nearly_blind():
    """The issue's example: two random-delta fine-tunes of one random base."""
    g = torch.Generator().manual_seed(0)
    base = torch.randn(128, 128, generator=g)
    s = math.sqrt(1 / 0.71 - 1)  # cos(base + d1, base + d2) = 1 / (1 + s²) = 0.71
    a = base + s * torch.randn(128, 128, generator=g)
    b = base + s * torch.randn(128, 128, generator=g)
    assert METRICS.get("cosine")(a, b) == pytest.approx(0.71, abs=0.01)
    assert METRICS.get("svd_cosine")(a, b) > 0.999
    m = METRICS.get("svd_cosine")
    assert Baseline()(m, a, m.features(a)) > 0.99  # and so is a Gaussian matrix


def test_resolve_metrics():
    assert [m.name for m in resolve_metrics(None)] == [
        "cosine",
        "svd_cosine",
        "frobenius",
        "frobenius_rel",
    ]
    assert {m.name for m in resolve_metrics("all")} == set(METRICS.names())
    assert [m.name for m in resolve_metrics("cka, cosine")] == ["cka", "cosine"]
    with pytest.raises(SpliceError, match="unknown similarity metric 'nope'; choose from: cka"):
        resolve_metrics("nope")
