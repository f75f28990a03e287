"""Merge methods: formulas on hand-built tensors, identities, statistics, and parity with
mergekit's own method code on random tensors (skipped when mergekit is not importable)."""

from __future__ import annotations

import math

import pytest
import torch

from splice.merge.methods import METHODS, REQUIRED
from splice.merge.methods import sparsify as sp
from splice.merge.methods.task_arithmetic import sign_agreement


def call(name: str, tensors, base=None, **params) -> torch.Tensor:
    """Call a registered method as the executor does: per-model defaults broadcast."""
    method = METHODS.get(name)
    for key, default in method.per_model.items():
        if key not in params and default is not None:
            params[key] = [default] * len(tensors)
    return method(tensors, base, **params)


def rand(*shape: int, seed: int, scale: float = 1.0, dtype=torch.float32) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (scale * torch.randn(*shape, generator=g, dtype=torch.float64)).to(dtype)


def close(a: torch.Tensor, b: torch.Tensor, atol: float = 1e-6) -> None:
    assert a.shape == b.shape, (a.shape, b.shape)
    diff = (a.double() - b.double()).abs().max().item()
    assert diff <= atol, f"max abs diff {diff:.3g} > {atol}"


# one set of parameters per method, for the generic property tests
W3 = [0.5, 0.3, 0.4]
CASES: dict[str, dict] = {
    "linear": {"weight": W3},
    "task_arithmetic": {"weight": W3, "lambda_": 0.8},
    "slerp": {"t": 0.3},
    "nuslerp": {"weight": [0.4, 0.6]},
    "multislerp": {"weight": W3},
    "karcher": {},
    "model_stock": {},
    "ties": {"weight": W3, "density": [0.5, 0.7, 0.3]},
    "dare_ties": {"weight": W3, "density": [0.5, 0.7, 0.3]},
    "dare_linear": {"weight": W3, "density": [0.5, 0.7, 0.3]},
    "breadcrumbs": {"weight": W3, "density": [0.5, 0.7, 0.3], "gamma": [0.05] * 3},
    "breadcrumbs_ties": {"weight": W3, "density": [0.5, 0.7, 0.3]},
    "della": {"weight": W3, "density": [0.5, 0.6, 0.4], "epsilon": [0.1] * 3},
    "della_linear": {"weight": W3, "density": [0.5, 0.6, 0.4]},
    "sce": {"select_topk": 0.5},
    "nearswap": {"t": 0.01},
    "arcee_fusion": {},
    "ram": {"epsilon": 0.005},
    "ramplus_tl": {"epsilon": 0.005},
    "passthrough": {"scale": [0.5]},
    "layer_path": {},
    "moe": {},
}
N_MODELS = {
    "slerp": 1,
    "nuslerp": 2,
    "nearswap": 1,
    "arcee_fusion": 1,
    "passthrough": 1,
    "layer_path": 1,
    "moe": 1,
}


def inputs(name: str, dtype=torch.float32, shape=(24, 16)):
    """(tensors, base) as the executor passes them: base + small deltas, base None if unused."""
    base = rand(*shape, seed=0, scale=0.02)
    n = N_MODELS.get(name, 3)
    tensors = [(base + rand(*shape, seed=i + 1, scale=0.01)).to(dtype) for i in range(n)]
    uses_base = METHODS.get(name).base != "none"
    return tensors, base.to(dtype) if uses_base else None


def run_case(name: str, tensors, base, seed: int = 7, **extra) -> torch.Tensor:
    params = {**CASES[name], **extra}
    if METHODS.get(name).stochastic:
        params["generator"] = torch.Generator().manual_seed(seed)
    return call(name, tensors, base, **params)


def test_every_registered_method_has_a_case():
    """Equality: a method registered without a test case here fails (test-only methods, named
    with a leading underscore by other test files, are not the library's)."""
    assert set(CASES) == {n for n in METHODS.names() if not n.startswith("_")}


# ---------------------------------------------------------------- generic properties


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name", sorted(CASES))
def test_keeps_dtype_shape_and_inputs(name, dtype):
    tensors, base = inputs(name, dtype)
    before = [t.clone() for t in tensors] + ([base.clone()] if base is not None else [])
    out = run_case(name, tensors, base)
    assert out.dtype == dtype and out.shape == tensors[0].shape
    assert torch.isfinite(out).all()
    after = tensors + ([base] if base is not None else [])
    assert all(torch.equal(a, b) for a, b in zip(before, after, strict=True))
    assert not any(out.data_ptr() == t.data_ptr() for t in after)


@pytest.mark.parametrize("name", [n for n in sorted(CASES) if METHODS.get(n).stochastic])
def test_stochastic_methods_reproducible_from_generator(name, monkeypatch):
    from splice.merge.methods import arcee_fusion

    monkeypatch.setattr(arcee_fusion, "SAMPLE", 100)  # it draws only on tensors over SAMPLE
    tensors, base = inputs(name, shape=(64, 32))
    a, b = run_case(name, tensors, base, seed=1), run_case(name, tensors, base, seed=1)
    c = run_case(name, tensors, base, seed=2)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


@pytest.mark.parametrize("shape", [(40,), (6, 8), (2, 3, 5)])
@pytest.mark.parametrize("name", sorted(CASES))
def test_shapes(name, shape):
    tensors, base = inputs(name, shape=shape)
    assert run_case(name, tensors, base).shape == shape


# ---------------------------------------------------------------- linear, task arithmetic


def test_linear_identical_tensors_return_them():
    x = rand(5, 7, seed=1)
    close(call("linear", [x, x, x], weight=[0.2, 0.5, 0.3]), x, atol=1e-7)
    xb = x.to(torch.bfloat16)
    assert torch.equal(call("linear", [xb, xb], weight=[1.0, 3.0]), xb)


def test_linear_weights_normalize():
    a, b = rand(4, 4, seed=1), rand(4, 4, seed=2)
    expected = 0.25 * a.double() + 0.75 * b.double()
    close(call("linear", [a, b], weight=[2.0, 6.0]), expected)
    close(call("linear", [a, b], weight=[0.25, 0.75]), expected)
    close(call("linear", [a, b], weight=[2.0, 6.0], normalize=False), 8 * expected, atol=1e-5)
    with pytest.raises(ValueError, match="sum to 0"):
        call("linear", [a, b], weight=[1.0, -1.0])


def test_task_arithmetic_lambda_and_normalize():
    base, a, b = rand(6, 3, seed=0), rand(6, 3, seed=1), rand(6, 3, seed=2)
    tv = 0.5 * (a.double() - base.double()) + 2.0 * (b.double() - base.double())
    out = call("task_arithmetic", [a, b], base, weight=[0.5, 2.0], lambda_=0.3)
    close(out, base.double() + 0.3 * tv)
    out = call("task_arithmetic", [a, b], base, weight=[0.5, 2.0], normalize=True)
    close(out, base.double() + tv / 2.5)


# ---------------------------------------------------------------- TIES sign election


def ties_example():
    base = rand(4, seed=0)
    deltas = torch.tensor(
        [[1.0, -2.0, 0.5, 0.0], [2.0, 1.0, -1.0, 3.0], [-4.0, 0.5, -0.2, 0.0]], dtype=torch.float64
    )
    return base, [(base.double() + d).float() for d in deltas]


def test_ties_sign_election_by_hand():
    base, xs = ties_example()
    # sums per entry: -1, -0.5, -0.7, 3 -> elected signs -, -, -, +; zeros never vote
    # entry 0: only -4 agrees; 1: only -2; 2: mean(-1, -0.2); 3: only 3
    out = call("ties", xs, base, weight=[1.0] * 3)
    close(out, base.double() + torch.tensor([-4.0, -2.0, -0.6, 3.0], dtype=torch.float64))
    # count vote: signs (+,+,-), (-,+,+), (+,-,-), (0,+,0) -> +, +, -, +
    out = call("ties", xs, base, weight=[1.0] * 3, consensus_method="count")
    close(out, base.double() + torch.tensor([1.5, 0.75, -0.6, 3.0], dtype=torch.float64))


def test_ties_trim_weights_and_disjoint_mean_by_hand():
    base, xs = ties_example()
    # density 0.5 keeps the 2 largest |delta| of 4: [1,-2,0,0], [2,0,0,3], [-4,.5,0,0]
    # weighted (1, .5, 2): [1,-2,0,0], [1,0,0,1.5], [-8,1,0,0]; sums -6, -1, 0, 1.5
    # elected -, -, + (a zero sum elects +), +; disjoint mean divides by agreeing weights
    out = call("ties", xs, base, weight=[1.0, 0.5, 2.0], density=[0.5] * 3)
    close(out, base.double() + torch.tensor([-4.0, -2.0, 0.0, 3.0], dtype=torch.float64))
    out = call("ties", xs, base, weight=[1.0, 0.5, 2.0], density=[0.5] * 3, normalize=False)
    close(out, base.double() + torch.tensor([-8.0, -2.0, 0.0, 1.5], dtype=torch.float64))


def test_ties_agreeing_weights_that_cancel_divide_by_one():
    base = torch.zeros(2)
    xs = [torch.tensor([1.0, 2.0]), torch.tensor([-1.0, 2.0])]
    # weighted deltas (1, 2) and (1, -2): entry 0 both agree but the weights sum to 0 there
    out = call("ties", xs, base, weight=[1.0, -1.0])
    close(out, torch.tensor([2.0, 2.0]))


def test_sign_agreement_int8_mask_same_result():
    d = rand(3, 50, seed=3).to(torch.bfloat16)
    for method in ("sum", "count"):
        m = sign_agreement(d, method)
        assert m.dtype == torch.bool
        assert torch.equal(m, sign_agreement(d, method, int8_mask=True))
    for dtype in (torch.float32, torch.bfloat16):
        tensors, base = inputs("ties", dtype)
        a = run_case("ties", tensors, base)
        assert torch.equal(a, run_case("ties", tensors, base, int8_mask=True))


@pytest.mark.parametrize(
    "name, extra",
    [
        ("ties", {"normalize": False}),
        ("dare_ties", {}),
        ("dare_linear", {"rescale": False}),
        ("dare_linear", {}),  # at density 1 nothing is dropped, so nothing is rescaled
        ("breadcrumbs", {}),
        ("breadcrumbs_ties", {}),
        ("della_linear", {}),
        ("della", {"normalize": False}),
    ],
)
def test_density_one_equals_task_arithmetic(name, extra):
    """With nothing dropped and all task vectors of one sign, the presets are task arithmetic."""
    base = rand(8, 8, seed=0)
    xs = [base + rand(8, 8, seed=i).abs() * s for i, s in ((1, 0.01), (2, 0.02), (3, 0.005))]
    w = [0.3, 0.5, 0.9]
    expected = call("task_arithmetic", xs, base, weight=w, lambda_=0.7)
    params = {"weight": w, "density": [1.0] * 3, "lambda_": 0.7, **extra}
    if METHODS.get(name).stochastic:
        params["generator"] = torch.Generator().manual_seed(0)
    close(call(name, xs, base, **params), expected, atol=1e-7)


# ---------------------------------------------------------------- sparsifiers


def test_magnitude_keeps_top_k_and_ties_by_index():
    x = torch.tensor([0.1, -3.0, 2.0, -0.5, 2.0, 0.0, 2.0, 1.0])
    # k = int(0.375 * 8) = 3: -3 and two of the three 2.0s (the later ones, by position)
    assert torch.equal(sp.magnitude(x, 0.375), torch.tensor([0, -3.0, 0, 0, 2, 0, 2, 0]))
    assert torch.equal(sp.magnitude(x, 0.01), torch.tensor([0, -3.0, 0, 0, 0, 0, 0, 0]))
    assert torch.equal(sp.magnitude(x, 0.0), torch.zeros(8))
    assert sp.magnitude(x, 1.0) is x
    kept = sp.magnitude(x, 0.375, rescale=True)
    assert kept.abs().sum().item() == pytest.approx(x.abs().sum().item())


def test_magnitude_matches_a_stable_sort():
    x = rand(4096, seed=5).to(torch.bfloat16)  # bf16: many equal magnitudes
    for density in (0.1, 0.33, 0.9):
        k = max(1, int(density * x.numel()))
        order = torch.argsort(x.float().abs(), stable=True)  # ascending, ties by index
        expected = torch.zeros_like(x)
        expected[order[-k:]] = x[order[-k:]]
        assert torch.equal(sp.magnitude(x, density), expected)


def test_breadcrumbs_removes_top_gamma_and_bottom():
    g = torch.Generator().manual_seed(0)
    mags = torch.randperm(1000, generator=g).double() + 1  # 1..1000, shuffled, distinct
    x = mags * (torch.randint(0, 2, (1000,), generator=g) * 2 - 1)
    kept = sp.magnitude_outliers(x, 0.5, gamma=0.1) != 0
    # top 10% (901..1000) and the bottom 40% (1..400) go, 401..900 stay
    assert torch.equal(kept, (mags > 400) & (mags <= 900))
    # density + gamma > 1: fewer outliers go so that density survives
    kept = sp.magnitude_outliers(x, 0.95, gamma=0.1) != 0
    assert torch.equal(kept, mags <= 950)
    assert sp.magnitude_outliers(x, 1.0, gamma=0.1) is x


def test_dare_kept_fraction_and_rescale():
    n, density = 400_000, 0.3
    x = rand(n, seed=1)
    g = torch.Generator().manual_seed(0)
    out = call("dare_linear", [x], torch.zeros(n), weight=[1.0], density=[density], generator=g)
    kept = out != 0
    sigma = math.sqrt(density * (1 - density) / n)
    assert abs(kept.double().mean().item() - density) < 5 * sigma
    scale = out[kept] / x[kept]  # one factor for every kept entry: ‖x‖₁ / ‖kept‖₁
    assert torch.allclose(scale, scale[0].expand_as(scale))
    assert scale[0].item() == pytest.approx(1 / density, rel=0.01)
    assert out.abs().sum().item() == pytest.approx(x.abs().sum().item(), rel=1e-5)
    plain = sp.random(x, density, generator=torch.Generator().manual_seed(0))
    assert torch.equal(plain != 0, kept)  # same draws, no rescale
    assert torch.equal(plain[kept], x[kept])


def test_della_keep_probability_ramp():
    rows, m, density, eps = 40_000, 5, 0.5, 0.2
    # every row holds the magnitudes 1..5 in a shuffled order
    g = torch.Generator().manual_seed(0)
    mags = torch.argsort(torch.rand(rows, m, generator=g), dim=1).double() + 1
    x = -mags  # signs do not matter
    kept = sp.della(x, density, epsilon=eps, generator=torch.Generator().manual_seed(1)) != 0
    freq = torch.stack([kept[mags == r].double().mean() for r in range(1, m + 1)])
    expected = density - eps + 2 * eps * torch.arange(m, dtype=torch.float64) / (m - 1)
    sigma = math.sqrt(0.25 / rows)
    assert (freq - expected).abs().max().item() < 5 * sigma
    assert freq.min() > density - eps - 5 * sigma and freq.max() < density + eps + 5 * sigma
    with pytest.raises(ValueError, match="density ± epsilon"):
        sp.della(x, 0.1, epsilon=0.15)
    single = sp.della(torch.ones(1000, 1), 0.3, epsilon=0.1, generator=g)  # rows of one entry
    assert 0.2 < (single != 0).double().mean().item() < 0.4


def test_della_rescale_matches_l1():
    x = rand(64, 64, seed=2)
    out = sp.della(x, 0.4, epsilon=0.1, rescale=True, generator=torch.Generator().manual_seed(0))
    assert out.abs().sum().item() == pytest.approx(x.abs().sum().item(), rel=1e-5)


def test_random_masks_follow_the_generator_device_not_the_default_rng():
    x = rand(1000, seed=0)
    torch.manual_seed(123)
    a = sp.random(x, 0.5, generator=torch.Generator().manual_seed(9))
    torch.manual_seed(456)
    b = sp.random(x, 0.5, generator=torch.Generator().manual_seed(9))
    assert torch.equal(a, b)


# ---------------------------------------------------------------- SLERP family


def orthonormal(n: int = 16, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    q, _ = torch.linalg.qr(rand(n, 2, seed=seed).double())
    return q[:, 0].float(), q[:, 1].float()


def test_slerp_endpoints_exact():
    for dtype in (torch.float32, torch.bfloat16):
        a, b = rand(7, 9, seed=1, dtype=dtype), rand(7, 9, seed=2, dtype=dtype)
        assert torch.equal(call("slerp", [b], a, t=0.0), a)
        assert torch.equal(call("slerp", [b], a, t=1.0), b)


def test_slerp_orthogonal_unit_vectors():
    a, b = orthonormal()
    close(call("slerp", [b], a, t=0.5), (a + b) / math.sqrt(2))
    # along the great circle: cos(tπ/2) a + sin(tπ/2) b
    t = 0.2
    close(call("slerp", [b], a, t=t), math.cos(t * math.pi / 2) * a + math.sin(t * math.pi / 2) * b)
    # raw tensors are combined, so norms interpolate along with the angle
    close(call("slerp", [3 * b], a, t=0.5), (a + 3 * b) / math.sqrt(2))


def test_slerp_parallel_antiparallel_and_zero():
    a = rand(10, seed=3)
    close(call("slerp", [2 * a], a, t=0.25), 1.25 * a)  # parallel: linear
    close(call("slerp", [-a], a, t=0.25), 0.5 * a)  # antiparallel: linear
    # a zero tensor has no direction: it counts as orthogonal (mergekit's behaviour)
    close(call("slerp", [a], torch.zeros(10), t=0.5), math.sin(math.pi / 4) * a)


def test_slerp_dot_threshold():
    """Above |cos θ| = 0.9995 SLERP falls back to linear interpolation, below it does not."""
    a, b = orthonormal()
    for theta, linear in ((0.02, True), (0.05, False)):  # cos = 0.99980, 0.99875
        c = math.cos(theta) * a.double() + math.sin(theta) * b.double()
        out = call("slerp", [c.float()], a, t=0.5)
        lerp = (a.double() + c) / 2
        great_circle = math.cos(theta / 2) * a.double() + math.sin(theta / 2) * b.double()
        close(out, lerp if linear else great_circle, atol=1e-7)
        assert (lerp - great_circle).abs().max() > 1e-6


def test_nuslerp_only_exact_parallels_are_linear():
    a, b = (x.double() for x in orthonormal())
    theta = 0.005  # far inside SLERP's threshold, still spherical for NuSLERP
    c = math.cos(theta) * a + math.sin(theta) * b
    out = call("nuslerp", [a, c], weight=[1.0, 1.0])
    close(out, math.cos(theta / 2) * a + math.sin(theta / 2) * b, atol=1e-12)
    close(call("nuslerp", [a, 2 * a], weight=[3.0, 1.0]), 1.25 * a, atol=1e-12)
    close(call("nuslerp", [a, -a], weight=[3.0, 1.0]), 0.5 * a, atol=1e-12)


def test_nuslerp_weights_rows_and_base():
    a, b = rand(6, 10, seed=1), rand(6, 10, seed=2)
    # flattened, no base: plain SLERP at t = w1 / (w0 + w1)
    close(call("nuslerp", [a, b], weight=[1.0, 3.0]), call("slerp", [b], a, t=0.75))
    close(call("nuslerp", [a, b], weight=[1.0, -1.0]), call("slerp", [b], a, t=0.5))
    rows = call("nuslerp", [a, b], weight=[1.0, 3.0], nuslerp_flatten=False)
    close(rows, torch.stack([call("slerp", [b[i]], a[i], t=0.75) for i in range(6)]))
    cols = call("nuslerp", [a, b], weight=[1.0, 3.0], nuslerp_flatten=False, nuslerp_row_wise=True)
    close(cols, torch.stack([call("slerp", [b[:, j]], a[:, j], t=0.75) for j in range(10)], 1))
    base = rand(6, 10, seed=3)
    close(
        call("nuslerp", [a, b], base, weight=[1.0, 3.0]),
        base + call("slerp", [b - base], a - base, t=0.75),
    )


def test_multislerp_closed_form():
    # the tangent step vanishes: the result is the normalized weighted mean direction,
    # scaled by the weighted mean norm
    xs = [rand(5, 8, seed=i) for i in range(3)]
    w = torch.tensor([0.2, 0.5, 0.3], dtype=torch.float64)
    units = sum(wi * x.double() / x.double().norm() for wi, x in zip(w, xs, strict=True))
    scale = sum(wi * x.double().norm() for wi, x in zip(w, xs, strict=True))
    close(call("multislerp", xs, weight=w.tolist()), units / units.norm() * scale)
    a, b = orthonormal()
    close(call("multislerp", [a, 3 * b], weight=[1.0, 1.0]), 2 * (a + b) / math.sqrt(2))
    base = rand(5, 8, seed=9)
    close(
        call("multislerp", [x + base for x in xs], base, weight=w.tolist()),
        base.double() + units / units.norm() * scale,
        atol=2e-6,
    )
    assert torch.equal(call("multislerp", [xs[0]], base, weight=[1.0]), xs[0])
    with pytest.raises(ValueError, match="sum to zero"):
        call("multislerp", [a, -a, 2 * a], weight=[1.0, 2.0, 1.0])


# ---------------------------------------------------------------- Karcher, Model Stock


def test_karcher_identical_points_and_bisector():
    x = rand(4, 6, seed=1)
    close(call("karcher", [x, x, x]), x)
    a, b = orthonormal()
    close(call("karcher", [2 * a, 4 * b]), 3 * (a + b) / math.sqrt(2))
    assert torch.equal(call("karcher", [torch.zeros(5), torch.zeros(5)]), torch.zeros(5))


def test_karcher_three_points_is_stationary():
    """The Karcher mean zeroes the weighted sum of log maps (checked independently in float64)."""
    xs = [rand(12, seed=i, dtype=torch.float64) for i in range(3)]
    out = call("karcher", xs, max_iter=200, tol=1e-12)
    m = out / out.norm()
    logs = []
    for x in xs:
        u = x / x.norm()
        theta = torch.arccos((u @ m).clamp(-1, 1))
        logs.append(theta / torch.sin(theta) * (u - torch.cos(theta) * m))
    assert torch.stack(logs).mean(0).norm().item() < 1e-10
    assert out.norm().item() == pytest.approx(sum(x.norm().item() for x in xs) / 3)


def test_model_stock_known_angle():
    base = rand(3, seed=0)
    theta = math.pi / 3  # cos = 1/2 -> t = 2 * 0.5 / (1 + 0.5) = 2/3
    d1 = torch.tensor([1.0, 0.0, 0.0])
    d2 = torch.tensor([math.cos(theta), math.sin(theta), 0.0])
    out = call("model_stock", [base + d1, base + d2], base)
    close(out, base + 2 / 3 * (d1 + d2) / 2)


def test_model_stock_filter_wise_per_row():
    base = rand(3, 3, seed=0)
    # row 0: 60° (t = 2/3); row 1: 90° (t = 0, keep the base); row 2: 0° (t = 1, the average)
    d1 = torch.tensor([[1.0, 0.0, 0.0], [0.0, 2.0, 0.0], [0.0, 0.0, 1.0]])
    d2 = torch.tensor([[0.5, math.sqrt(3) / 2, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 3.0]])
    out = call("model_stock", [base + d1, base + d2], base, filter_wise=True)
    t = torch.tensor([[2 / 3], [0.0], [1.0]])
    close(out, base + t * (d1 + d2) / 2)
    # three task vectors at 60° pairwise: t = 3 * 0.5 / (1 + 2 * 0.5) = 3/4
    e = torch.eye(3)
    ds = [(e[i] + e[j]) / math.sqrt(2) for i, j in ((0, 1), (1, 2), (0, 2))]
    close(call("model_stock", [base[0] + d for d in ds], base[0]), base[0] + 0.75 * sum(ds) / 3)
    with pytest.raises(ValueError, match="at least two"):
        call("model_stock", [base + d1], base)


# ---------------------------------------------------------------- SCE, NearSwap, Arcee Fusion, RAM


def sce_example() -> tuple[torch.Tensor, list[torch.Tensor]]:
    base = rand(4, seed=0, dtype=torch.float64)
    deltas = [torch.tensor([1.0, -1.0, 2.0, 0.0]), torch.tensor([3.0, 1.0, -2.0, 0.0])]
    return base, [base + d.double() for d in deltas]


def test_sce_by_hand():
    base, xs = sce_example()
    # energies mean(d²): 6/4, 14/4 -> weights 0.3, 0.7; sums 4, 0, 0, 0 elect +, +, +, +
    # entry 0: both agree, (0.3·1 + 0.7·3) / 1; 1: only +1 (w 0.7); 2: only +2; 3: nobody
    close(call("sce", xs, base), base + torch.tensor([2.4, 1.0, 2.0, 0.0], dtype=torch.float64))
    # variances across models: 1, 1, 4, 0 (3 nonzero). select_topk 0.34: int(3 · 0.34) = 1,
    # entry 2 alone; energies then equal: entry 2's sum 0 elects +, so model 0's +2 wins
    close(
        call("sce", xs, base, select_topk=0.34),
        base + torch.tensor([0.0, 0.0, 2.0, 0.0], dtype=torch.float64),
    )
    # 0.67: k = 2, entry 2 and one of the tied entries 0, 1: the later one by position
    close(
        call("sce", xs, base, select_topk=0.67),
        base + torch.tensor([0.0, 1.0, 2.0, 0.0], dtype=torch.float64),
    )
    assert torch.equal(call("sce", xs, base, select_topk=0.0), base)


def test_sce_tiny_task_vectors_get_uniform_weights():
    """Below a total energy Σ mean(d²) of 1e-6 mergekit (and so splice) weights models equally."""
    base = torch.zeros(4, dtype=torch.float64)
    f64 = {"dtype": torch.float64}
    xs = [torch.tensor([1e-4, 1e-4, 0, 0], **f64), torch.tensor([3e-4, 1e-4, 0, 0], **f64)]
    close(call("sce", xs, base), torch.tensor([2e-4, 1e-4, 0, 0], **f64), atol=1e-15)  # means
    big = [100 * x for x in xs]  # energies 2 : 10 -> weights 1/6, 5/6
    expected = torch.tensor([(1 + 15) / 6 * 1e-2, 1e-2, 0, 0], **f64)
    close(call("sce", big, base), expected, atol=1e-15)


def test_sce_variance_mask_matches_a_stable_ranking():
    from splice.merge.methods.sce import variance_mask

    ds = [rand(30, 20, seed=i) for i in range(3)]
    ds[0][:2], ds[1][:2], ds[2][:2] = 0, 0, 0  # zero variance: never counted, never kept
    var = torch.stack(ds).double().var(dim=0, correction=0)
    k = int(torch.count_nonzero(var) * 0.4)
    top = torch.argsort(var.reshape(-1), descending=True)[:k]
    expected = torch.zeros(var.numel(), dtype=torch.bool)
    expected[top] = True
    assert torch.equal(variance_mask(ds, 0.4).reshape(-1), expected)


def test_nearswap_by_hand():
    a = torch.zeros(5)
    b = torch.tensor([0.001, 0.01, -0.1, 1.0, 0.0])
    # w = clamp(t / |a - b|, 0, 1) with t = 0.01: 1, 1, 0.1, 0.01, 1 (|a - b| floored at 1e-6)
    expected = torch.tensor([0.001, 0.01, -0.01, 0.01, 0.0])
    close(call("nearswap", [b], a, t=0.01), expected, atol=1e-8)
    base = rand(5, seed=2)
    close(call("nearswap", [base + b], base, t=0.01), base + expected, atol=1e-7)
    assert torch.equal(call("nearswap", [b], a, t=0.0), a)
    assert torch.equal(call("nearswap", [b], a, t=10.0), b)


def test_arcee_fusion_importance_and_threshold_independently():
    from splice.merge.methods.arcee_fusion import importance, outlier_threshold

    base, other = (
        rand(16, 24, seed=0, dtype=torch.float64),
        rand(16, 24, seed=1, dtype=torch.float64),
    )
    other[3] *= 4  # one row that moves its softmax much more
    p = torch.exp(other) / torch.exp(other).sum(-1, keepdim=True) + 1e-8
    q = torch.exp(base) / torch.exp(base).sum(-1, keepdim=True) + 1e-8
    kl = (p * (torch.log(p) - torch.log(q))).sum(-1, keepdim=True)  # [16, 1]
    s = importance(other, base)
    close(s, (other - base).abs() * kl, atol=1e-12)
    lo, med, hi = torch.quantile(s.reshape(-1), torch.tensor([0.25, 0.5, 0.75]).double(),
                                 interpolation="lower")  # fmt: skip
    threshold = med + 1.5 * (hi - lo)
    assert outlier_threshold(s, None).item() == threshold.item()
    keep = s >= threshold
    assert 0 < keep.sum() < keep.numel() and keep[3].float().mean() > keep.float().mean()
    g = torch.Generator().manual_seed(0)
    close(call("arcee_fusion", [other], base, generator=g), torch.where(keep, other, base), 1e-15)
    assert torch.equal(call("arcee_fusion", [base.clone()], base), base)


def test_arcee_fusion_large_tensors_estimate_quartiles_from_the_generator():
    from splice.merge.methods import arcee_fusion as af

    s = rand(1_200_000, seed=3).abs()
    exact = af.outlier_threshold(s[: af.SAMPLE], None)  # a million entries: exact
    lo, med, hi = torch.quantile(s.double(), torch.tensor([0.25, 0.5, 0.75]).double())
    full = (med + 1.5 * (hi - lo)).item()
    assert exact.item() == pytest.approx(full, rel=5e-3)
    a = af.outlier_threshold(s, torch.Generator().manual_seed(1))
    b = af.outlier_threshold(s, torch.Generator().manual_seed(1))
    c = af.outlier_threshold(s, torch.Generator().manual_seed(2))
    assert a == b and a != c
    assert a.item() == pytest.approx(full, rel=5e-3)


def f64(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64)


def ram_example() -> tuple[torch.Tensor, list[torch.Tensor]]:
    base = torch.zeros(5, dtype=torch.float64)
    deltas = [
        [0.5, 0.2, 1e-6, 0.3, 0.0],
        [0.0, 0.4, -1e-6, 0.6, 0.0],
        [0.0, 0.0, 0.0, -0.3, 0.7],
    ]
    return base, [base + torch.tensor(d, dtype=torch.float64) for d in deltas]


def test_ram_by_hand():
    base, xs = ram_example()
    # contributors per entry (|d| > 1e-5): 1, 2, 0, 3, 1 -> means over those that changed
    close(call("ram", xs, base), f64(0.5, 0.3, 0.0, 0.2, 0.7), atol=1e-15)
    # epsilon 0.35 leaves 0.5, 0.4, 0.6, 0.7: entries 0, 1, 4 alone, entry 3 shared by 1 model
    close(call("ram", xs, base, epsilon=0.35), f64(0.5, 0.4, 0.0, 0.6, 0.7), atol=1e-15)


def test_ramplus_tl_by_hand():
    base, xs = ram_example()
    # changed entries: model 0 {0 unique, 1 and 3 shared}: ρ = 2/1; model 1 {1, 3 shared}:
    # ρ = 2/ε (no unique entries); model 2 {3 shared, 4 unique}: ρ = 1
    # λ = 1 + r·clamp(ρ, 0, α) with r 0.5, α 1.5: 1.75, (unused), 1.5
    out = call("ramplus_tl", xs, base, r=0.5, alpha=1.5)
    close(out, f64(0.5 * 1.75, 0.3, 0.0, 0.2, 0.7 * 1.5), atol=1e-15)
    # defaults r 0.1, α 0.2: every ρ >= 0.2, λ = 1.02
    # (λ is float32, as in mergekit: 1.02 to float32 precision)
    close(call("ramplus_tl", xs, base), f64(0.51, 0.3, 0.0, 0.2, 0.714), atol=1e-7)
    # r = 0 is plain RAM
    close(call("ramplus_tl", xs, base, r=0.0), call("ram", xs, base), atol=0)


@pytest.mark.parametrize(
    "name, params, problem",
    [
        ("nearswap", {"t": -0.1}, "t must be >= 0"),
        ("sce", {"select_topk": 1.5}, "select_topk 1.5 is not in [0, 1]"),
        ("sce", {"select_topk": -0.1}, "not in [0, 1]"),
        ("ram", {"epsilon": -1e-3}, "epsilon must be >= 0"),
        ("ramplus_tl", {"epsilon": 0.0}, "epsilon must be > 0"),
        ("ramplus_tl", {"alpha": -1.0}, "alpha must be >= 0"),
    ],
)
def test_new_methods_refuse_bad_parameters(name, params, problem):
    method = METHODS.get(name)
    full = {k: v for k, v in method.global_params.items() if v is not REQUIRED} | params
    assert any(problem in p for _, p in method.problems(full))
    defaults = {k: v for k, v in method.global_params.items() if v is not REQUIRED}
    assert not method.problems(defaults | ({"t": 0.1} if name == "nearswap" else {}))


def test_new_methods_base_and_model_counts():
    for name in ("nearswap", "arcee_fusion"):
        assert METHODS.get(name).base == "required"
        assert (
            METHODS.get(name).count_problem(2, True)
            == f"{name} merges exactly 1 model besides the base, got 2"
        )
    for name in ("sce", "ram", "ramplus_tl"):
        assert METHODS.get(name).base == "required"
        assert METHODS.get(name).count_problem(5, True) is None
    assert METHODS.get("nearswap").global_params["t"] is REQUIRED


# ---------------------------------------------------------------- parity with mergekit


def mergekit_run(name: str, tensors, base, params: dict, seed: int | None = None):
    from mergekit.merge_methods import merge_tensors

    params = {("lambda" if k == "lambda_" else k): v for k, v in params.items()}
    if seed is not None:
        torch.manual_seed(seed)  # mergekit draws from the default generator
    if base is None:
        return merge_tensors(tensors, name, parameters=params)
    return merge_tensors([base, *tensors], name, parameters=params, base_index=0)


PARITY = [
    ("linear", {"weight": W3}),
    ("linear", {"weight": W3, "normalize": False}),
    ("task_arithmetic", {"weight": W3, "lambda_": 0.6, "normalize": True}),
    ("slerp", {"t": 0.3}),
    ("slerp", {"t": 0.9}),
    ("nuslerp", {"weight": [0.3, 0.5]}),
    ("nuslerp", {"weight": [0.3, 0.5], "nuslerp_flatten": False}),
    ("nuslerp", {"weight": [0.3, 0.5], "nuslerp_flatten": False, "nuslerp_row_wise": True}),
    ("multislerp", {"weight": W3}),
    ("multislerp", {"weight": W3, "normalize_weights": False}),
    ("karcher", {}),
    ("karcher", {"max_iter": 3, "tol": 1e-3}),
    ("model_stock", {}),
    ("model_stock", {"filter_wise": True}),
    ("ties", {"weight": W3, "density": [0.5, 0.7, 0.3]}),
    ("ties", {"weight": W3, "density": [0.2, 0.7, 0.3], "rescale": True, "lambda_": 0.7}),
    ("breadcrumbs", {"weight": W3, "density": [0.5, 0.7, 0.3], "gamma": [0.05, 0.01, 0.1]}),
    (
        "breadcrumbs",
        {"weight": W3, "density": [0.9, 0.7, 0.3], "gamma": [0.2] * 3, "rescale": True},
    ),
    ("breadcrumbs_ties", {"weight": W3, "density": [0.5, 0.7, 0.3], "normalize": True}),
    ("dare_ties", {"weight": W3, "density": [0.5, 0.7, 0.3]}),
    ("dare_ties", {"weight": W3, "density": [0.5, 0.7, 0.3], "rescale": False, "normalize": True}),
    ("dare_linear", {"weight": W3, "density": [0.5, 0.7, 0.3], "lambda_": 1.5}),
    ("della", {"weight": W3, "density": [0.5, 0.7, 0.3]}),
    ("della", {"weight": W3, "density": [0.5, 0.7, 0.3], "epsilon": [0.05, 0.2, 0.25]}),
    ("della_linear", {"weight": W3, "density": [0.5, 0.7, 0.3], "rescale": False}),
    ("sce", {}),
    ("sce", {"select_topk": 0.3}),
    ("sce", {"select_topk": 0.05, "int8_mask": True}),
    ("nearswap", {"t": 0.005}),
    ("nearswap", {"t": 0.03}),
    ("arcee_fusion", {}),
    ("ram", {}),
    ("ram", {"epsilon": 0.01}),
    ("ramplus_tl", {}),
    ("ramplus_tl", {"epsilon": 0.012, "r": 0.5, "alpha": 0.5}),
]


@pytest.mark.parametrize("shape", [(48, 40), (100,)])
@pytest.mark.parametrize(
    "name, params", PARITY, ids=[f"{n}-{i}" for i, (n, _) in enumerate(PARITY)]
)
def test_parity_with_mergekit_float32(name, params, shape):
    """Same result as mergekit's method code (``merge_tensors``); random masks are drawn
    from a generator seeded like mergekit's default one, so they match bit for bit."""
    pytest.importorskip("mergekit")
    tensors, base = inputs(name, shape=shape)
    seed = 11 if METHODS.get(name).stochastic else None
    expected = mergekit_run(name, tensors, base, params, seed)
    if seed is not None:
        params = {**params, "generator": torch.Generator().manual_seed(seed)}
    close(call(name, tensors, base, **params), expected, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize(
    "name, params",
    [p for p in PARITY if p[0] in {"linear", "task_arithmetic", "slerp", "nuslerp", "multislerp",
                                    "karcher", "model_stock", "nearswap", "arcee_fusion", "ram",
                                    "ramplus_tl"} or p == ("sce", {})],
)  # fmt: skip
def test_parity_with_mergekit_half(name, params, dtype):
    """In bf16/fp16 the methods without magnitude ranking or randomness match exactly (mergekit's
    arcee_fusion and ramplus_tl return float32 there, splice the inputs' dtype: compared after
    rounding theirs)."""
    pytest.importorskip("mergekit")
    tensors, base = inputs(name, dtype)
    expected = mergekit_run(name, tensors, base, params)
    assert torch.equal(call(name, tensors, base, **params), expected.to(dtype))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("topk", [0.3, 0.05])
def test_sce_selection_vs_mergekit_half(dtype, topk):
    """SCE's variance ranking in bf16/fp16 meets equal variances: mergekit's topk and splice's
    by-position rule may keep different members of a group tied at the cut, nowhere else."""
    pytest.importorskip("mergekit")
    from splice.merge.methods.sce import variance_mask

    tensors, base = inputs("sce", dtype)
    ours = call("sce", tensors, base, select_topk=topk)
    theirs = mergekit_run("sce", tensors, base, {"select_topk": topk})
    deltas = [x - base for x in tensors]
    var = torch.stack(deltas).var(dim=0, correction=0)
    kept = variance_mask(deltas, topk)
    cut = var[kept].min()
    differ = ours != theirs
    assert (var[differ] == cut).all() or not differ.any()
    assert differ.sum() <= 2 * (var == cut).sum()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rescale", [False, True])
@pytest.mark.parametrize("density, gamma", [(0.3, 0.0), (0.5, 0.1), (0.05, 0.02), (0.9, 0.2)])
def test_ranking_sparsifiers_vs_mergekit(density, gamma, rescale, dtype):
    """mergekit's magnitude / magnitude_outliers: equal in float32. In bf16 many magnitudes
    are equal; the kept sets then differ only among entries tied at a cut, where mergekit's
    unstable sort and splice's by-position rule pick different (equally valid) members."""
    pytest.importorskip("mergekit")
    from mergekit import sparsify as mk

    x = rand(64, 48, seed=4, scale=0.01, dtype=dtype)
    norm = mk.RescaleNorm.l1 if rescale else None
    n, w = x.numel(), x.float().abs().reshape(-1)
    sorted_w = w.sort().values
    k, keep_n, top_n = max(1, int(density * n)), int(density * n), int(gamma * n)
    bottom = max(0, n - keep_n - top_n)
    cases = [
        (sp.magnitude(x, density, rescale=rescale), mk.magnitude(x, density, norm), {n - k}),
        (
            sp.magnitude_outliers(x, density, gamma=gamma, rescale=rescale),
            mk.magnitude_outliers(x, density, norm, gamma=gamma),
            {bottom, bottom + keep_n - 1},
        ),
    ]
    for ours, theirs, cut_ranks in cases:
        differ = (ours != 0) != (theirs != 0)
        assert (ours != 0).sum() == (theirs != 0).sum()
        if dtype == torch.float32:
            assert not differ.any()
            close(ours, theirs, atol=1e-6)
            continue
        cut_values = {sorted_w[r].item() for r in cut_ranks}
        assert set(w[differ.reshape(-1)].tolist()) <= cut_values
        if not rescale:
            assert torch.equal(ours[~differ], theirs[~differ])


@pytest.mark.parametrize("density", [0.3, 0.8])
def test_random_sparsifiers_vs_mergekit(density):
    """Same seed, same draws: DARE's and DELLA's masks match mergekit's bit for bit."""
    pytest.importorskip("mergekit")
    from mergekit import sparsify as mk

    x = rand(64, 48, seed=4, scale=0.01)
    for rescale in (False, True):
        norm = mk.RescaleNorm.l1 if rescale else None
        torch.manual_seed(3)
        theirs = mk.bernoulli(x, density, norm)
        ours = sp.random(x, density, rescale=rescale, generator=torch.Generator().manual_seed(3))
        assert torch.equal(ours, theirs)
        torch.manual_seed(3)
        theirs = mk.della_magprune(x, density, 0.15, norm)
        g = torch.Generator().manual_seed(3)
        assert torch.equal(sp.della(x, density, epsilon=0.15, rescale=rescale, generator=g), theirs)


def test_sign_agreement_vs_mergekit():
    pytest.importorskip("mergekit")
    from mergekit.merge_methods.generalized_task_arithmetic import get_mask

    d = rand(4, 30, 20, seed=5)
    d[:, :3] = 0  # zero deltas and zero sums
    for method in ("sum", "count"):
        assert torch.equal(sign_agreement(d, method), get_mask(d, method=method))


# ---------------------------------------------------------------- chunked rank selection


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize(
    "lo,hi", [(0, 500), (123, 1000), (250, 700), (999, 1000), (0, 1), (1000, 1000), (400, 400)]
)
@pytest.mark.parametrize("row,block", [(37, 16), (100, 1 << 19), (1 << 20, 7)])
def test_chunked_rank_window_matches_a_stable_sort(monkeypatch, dtype, lo, hi, row, block):
    """Radix selection over many histogram rows and blocks == zeroing by a stable argsort of
    |x| (ties by index); an empty window keeps nothing."""
    monkeypatch.setattr(sp, "ROW", row)  # many rows, ties spanning row borders
    monkeypatch.setattr(sp, "BLOCK", block)  # ... and block borders
    x = rand(1000, seed=3, scale=0.01).to(dtype)
    x[::7] = x[3]  # many exact ties in magnitude...
    x[1::11] = -x[3]  # ...and of both signs
    x[5::13] = 0
    order = torch.argsort(x.abs().double(), stable=True)
    expected = x.clone()
    expected[order[:lo]] = 0
    expected[order[hi:]] = 0
    got = sp.zero_outside_ranks_(x.clone(), lo, hi)
    assert torch.equal(got, expected)


def test_chunked_ties_equal_unchunked(monkeypatch):
    tensors, base = inputs("ties", dtype=torch.bfloat16, shape=(64, 48))
    whole = run_case("ties", tensors, base)
    monkeypatch.setattr(sp, "ROW", 100)
    monkeypatch.setattr(sp, "BLOCK", 37)
    assert torch.equal(run_case("ties", tensors, base), whole)


@pytest.mark.parametrize("name", ["sce", "ram", "ramplus_tl"])
def test_chunked_new_methods_equal_unchunked(monkeypatch, name):
    from splice.merge.methods import ram, sce

    for dtype in (torch.float32, torch.bfloat16):
        tensors, base = inputs(name, dtype=dtype, shape=(64, 48))
        whole = run_case(name, tensors, base)
        with monkeypatch.context() as m:
            m.setattr(sce, "CHUNK", 100)
            m.setattr(ram, "CHUNK", 100)
            m.setattr(sp, "CHUNK", 100)
            assert torch.equal(run_case(name, tensors, base), whole)


# ---------------------------------------------------------------- the TIES family, block by block


def whole_tensor_gta(tensors, base, *, weight, density, sparsifier, consensus, normalize,
                     lambda_=1.0, gamma=None):  # fmt: skip
    """The generalized task arithmetic formula on whole tensors, written plainly: deltas held,
    ranks by a stable argsort, masks by ``torch.where``; the same dtypes and rounding steps."""
    dtype, n = base.dtype, base.numel()
    w = [torch.tensor(x, dtype=dtype) for x in weight]
    ds = []
    for i, x in enumerate(tensors):
        d = (x - base).reshape(-1)
        if sparsifier and density[i] < 1:
            keep = int(density[i] * n)
            if sparsifier == "magnitude":
                lo, hi = n - max(1, keep), n
            else:
                lo = max(0, n - keep - int(gamma[i] * n))
                hi = lo + keep
            order = torch.argsort(d.abs().double(), stable=True)
            d[order[:lo]] = 0
            d[order[hi:]] = 0
        ds.append(d * w[i])
    acc = dtype if len(ds) <= 2 else torch.float32
    if consensus:
        mask = sign_agreement(torch.stack(ds), consensus)
        mixed, div = torch.zeros(n, dtype=acc), torch.zeros(n, dtype=acc)
        for m, d, wi in zip(mask, ds, w, strict=True):
            mixed += torch.where(m, d, 0)
            div += torch.where(m, wi, 0)
        div = div.to(dtype)
        div[div == 0] = 1
    else:
        mixed = ds[0].to(acc, copy=True)
        for d in ds[1:]:
            mixed += d
        div = sum(w[1:], w[0].float()).to(dtype)
    out = mixed.to(dtype)
    if normalize:
        out /= div
    if lambda_ != 1:
        out *= lambda_
    return (base.reshape(-1) + out).reshape(base.shape)


STREAMED = [
    ("ties", "magnitude", "sum", True, {}),
    ("ties", "magnitude", "count", False, {"lambda_": 0.7}),
    ("breadcrumbs", "magnitude_outliers", None, False, {}),
    ("breadcrumbs_ties", "magnitude_outliers", "sum", True, {}),
    ("task_arithmetic", None, None, True, {"lambda_": 1.5}),
]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("n_models", [1, 2, 3])
@pytest.mark.parametrize("densities", [[0.4, 0.7, 0.25], [0.4, 1.0, 0.25]])
@pytest.mark.parametrize("name, sparsifier, consensus, normalize, extra", STREAMED)
def test_streamed_methods_equal_the_whole_tensor_formula(
    monkeypatch, dtype, n_models, densities, name, sparsifier, consensus, normalize, extra
):
    """Ranked, elected and summed block by block (ties at the cuts spanning blocks and rows),
    the result is the whole-tensor formula's, bit for bit: zeros, equal magnitudes of both
    signs, a negative and a zero weight, a model kept whole or not."""
    monkeypatch.setattr(sp, "ROW", 300)
    monkeypatch.setattr(sp, "BLOCK", 97)
    base = rand(40, 33, seed=0, scale=0.02).to(dtype)
    tensors = []
    for i in range(n_models):
        x = base + rand(40, 33, seed=i + 1, scale=0.01).to(dtype)
        x.view(-1)[i::5] = base.view(-1)[i::5]  # zero deltas
        x.view(-1)[1::7] = base.view(-1)[1::7] + 0.0078125  # many equal magnitudes...
        x.view(-1)[2::9] = base.view(-1)[2::9] - 0.0078125  # ...of both signs
        tensors.append(x)
    weight = [0.6, -0.4, 0.0][:n_models]
    density = densities[:n_models]
    params = {"weight": weight, "density": density, "gamma": [0.05, 0.0, 0.1][:n_models]}
    if consensus:
        params["consensus_method"] = consensus
    params["normalize"] = normalize
    params.update(extra)
    method = METHODS.get(name)
    params = {k: v for k, v in params.items() if k in method.per_model or k in
              {"consensus_method", "normalize", "lambda_"}}  # fmt: skip
    got = call(name, tensors, base, **params)
    expected = whole_tensor_gta(
        tensors, base, weight=weight, density=density if sparsifier else [1.0] * n_models,
        sparsifier=sparsifier, consensus=consensus, normalize=normalize,
        lambda_=extra.get("lambda_", 1.0), gamma=params.get("gamma"),
    )  # fmt: skip
    assert torch.equal(got, expected)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_streamed_ties_with_nan_and_inf_equal_the_whole_tensor_formula(monkeypatch, dtype):
    """NaN deltas never agree and a NaN vote elects ``-`` (as mergekit's ``get_mask``); infinite
    deltas agree by their sign: block by block as on the whole tensor."""
    monkeypatch.setattr(sp, "BLOCK", 64)
    base = rand(500, seed=0, scale=0.02).to(dtype)
    a = base + rand(500, seed=1, scale=0.01).to(dtype)
    b = base + rand(500, seed=2, scale=0.01).to(dtype)
    a[::17], b[3::19], a[5::23], b[7::29] = float("nan"), float("nan"), float("inf"), -float("inf")
    for density in ([0.5, 0.5], [1.0, 0.3]):
        got = call("ties", [a, b], base, weight=[0.7, 0.3], density=density)
        expected = whole_tensor_gta([a, b], base, weight=[0.7, 0.3], density=density,
                                    sparsifier="magnitude", consensus="sum", normalize=True)  # fmt: skip
        torch.testing.assert_close(got, expected, rtol=0, atol=0, equal_nan=True)


def test_breadcrumbs_keeping_no_entry_keeps_none():
    """``int(density·n) == 0`` keeps nothing, as in mergekit, even when no outlier is dropped."""
    x = rand(30, seed=1)
    assert not sp.magnitude_outliers(x, 0.02, gamma=0.01).any()
    assert not sp.magnitude_outliers(x, 0.02, gamma=0.1).any()
    pytest.importorskip("mergekit")
    from mergekit import sparsify as mk

    assert torch.equal(sp.magnitude_outliers(x, 0.02, gamma=0.01), mk.magnitude_outliers(x, 0.02))


def test_presets_register_the_table():
    """Each preset is registered with its table row's sparsifier, election and defaults."""
    from splice.merge.methods.task_arithmetic import PRESETS

    assert [p.name for p in PRESETS] == [
        "task_arithmetic", "ties", "dare_ties", "dare_linear",
        "breadcrumbs", "breadcrumbs_ties", "della", "della_linear",
    ]  # fmt: skip
    for p in PRESETS:
        m = METHODS.get(p.name)
        assert (m.base, m.per_model, m.stochastic) == ("required", p.per_model, p.stochastic)
        expected = {"normalize": p.normalize, "rescale": p.rescale, "lambda": 1.0,
                    "int8_mask": False} | ({"consensus_method": "sum"} if p.elect else {})  # fmt: skip
        assert m.global_params == expected
        assert m.choices == ({"consensus_method": ("sum", "count")} if p.elect else {})
        with pytest.raises(TypeError):
            m([torch.zeros(2)], torch.zeros(2), weight=[1.0], density=[1.0], bogus=1)
