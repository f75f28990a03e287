"""Task vectors (``splice analyze tasks``) against numpy on hand-built checkpoints.

Every tensor of the fine-tunes is base + a seeded integer delta in {-2, ..., 2} (exact in
float32, about a third of the entries zero); one tensor gets hand-picked deltas, one is left
untouched by a fine-tune. The reference reads the files with ``safetensors`` and recomputes
every number with numpy.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from analysis_helpers import edited_copy
from conftest import make_tiny
from safetensors.numpy import load_file

from splice.analysis import gaussian_like, task_vectors
from splice.analysis.tasks import (
    elected_sign_conflict,
    sign_conflict,
    summary,
    task_cosine,
    top_k_mask,
    topk_overlap,
)
from splice.cli import main

Q0 = "model.layers.0.self_attn.q_proj.weight"
UP1 = "model.layers.1.mlp.up_proj.weight"


# ---- numpy reference -------------------------------------------------------------------------------
def np_cos(a: np.ndarray, b: np.ndarray) -> float:
    return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))


def np_sign_conflict(a: np.ndarray, b: np.ndarray) -> float:
    both = (a != 0) & (b != 0)
    return float((np.sign(a[both]) != np.sign(b[both])).mean())


def np_elected(ds: list[np.ndarray]) -> float:
    elected = np.sign(np.sum(ds, axis=0))
    conflicts = counted = 0
    for d in ds:
        live = (d != 0) & (elected != 0)
        counted += live.sum()
        conflicts += (live & (np.sign(d) != elected)).sum()
    return conflicts / counted


def np_topk(a: np.ndarray, b: np.ndarray, k: float) -> float:
    count = max(1, round(k * a.size))
    top = [set(np.argsort(-np.abs(v), kind="stable")[:count]) for v in (a, b)]
    return len(top[0] & top[1]) / count


# ---- the pure functions on vectors checked by hand ---------------------------------------------
A = [1.0, -1.0, 2.0, 0.0, 1.0]
B = [1.0, 1.0, -1.0, 0.0, 0.0]
C = [-1.0, 1.0, -2.0, 3.0, 0.0]


def test_hand_checked_vectors():
    a, b, c = (torch.tensor(v) for v in (A, B, C))
    assert task_cosine(a, b) == pytest.approx(-2 / math.sqrt(21), rel=1e-12)
    assert task_cosine(a, 2 * a) == pytest.approx(1.0, rel=1e-12)
    assert task_cosine(a, -a) == pytest.approx(-1.0, rel=1e-12)
    assert math.isnan(task_cosine(a, torch.zeros(5)))
    # both nonzero at entries 0, 1, 2
    assert sign_conflict(a, b) == pytest.approx(2 / 3)
    assert sign_conflict(a, c) == 1.0
    assert sign_conflict(b, c) == pytest.approx(1 / 3)
    # elected signs sign(a + b + c) = [+, +, -, +, +]: a disagrees at 1 and 2 (of 4 nonzero),
    # b nowhere (of 3), c at 0 (of 4)
    assert elected_sign_conflict([a, b, c]) == pytest.approx(3 / 11)
    # top 40% = 2 entries; ties go to the lower index: a -> {2, 0}, b -> {0, 1}
    assert top_k_mask(a, 0.4).tolist() == [True, False, True, False, False]
    assert top_k_mask(b, 0.4).tolist() == [True, True, False, False, False]
    assert topk_overlap(a, b, 0.4) == 0.5
    assert topk_overlap(a, a, 0.4) == 1.0


def test_top_k_mask_matches_numpy_with_ties():
    g = torch.Generator().manual_seed(0)
    v = torch.randint(-3, 4, (1000,), generator=g).float()  # many ties
    for k in (0.001, 0.1, 0.37, 1.0):
        count = max(1, round(k * v.numel()))
        mask = top_k_mask(v, k)
        ref = np.zeros(v.numel(), bool)
        ref[np.argsort(-np.abs(v.numpy()), kind="stable")[:count]] = True
        assert int(mask.sum()) == count and np.array_equal(mask.numpy(), ref), k


# ---- checkpoints ------------------------------------------------------------------------------------
def integer_delta(shape, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(-2, 3, shape, generator=g).float()


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    """base (tiny llama, 2 layers) and fine-tunes a, b, c: base + integer deltas; Q0 of a, b, c
    is base + A, B, C repeated; b leaves UP1 untouched; c is a's delta negated on UP1."""
    root = tmp_path_factory.mktemp("tasks")
    base = make_tiny(root / "base", "llama", layers=2, hidden=16, vocab=40)
    hand = {"a": A, "b": B, "c": C}
    out = {"base": base}
    for i, name in enumerate("abc"):

        def edit(tensor, ckpt, i=i, name=name):
            t = ckpt.load(tensor, dtype="float32")
            if tensor == Q0:
                return t + torch.tensor(hand[name]).repeat(t.numel() // 5 + 1)[: t.numel()].view(
                    t.shape
                )
            index = list(ckpt.tensors).index(tensor)
            if tensor == UP1 and name == "b":
                return t
            if tensor == UP1 and name == "c":
                return t - integer_delta(t.shape, index)  # a's delta, negated
            return t + integer_delta(t.shape, 1000 * i + index)

        out[name] = edited_copy(base, root / name, edit)
    return out


def sizes_shape(models: dict[str, Path], name: str) -> tuple[int, ...]:
    return load_file(models["base"] / "model.safetensors")[name].shape


def deltas(models: dict[str, Path], names: list[str]) -> dict[str, dict[str, np.ndarray]]:
    """float32 task vectors per model and tensor, as numpy computes them from the files."""
    base = load_file(models["base"] / "model.safetensors")
    out = {}
    for n in names:
        ft = load_file(models[n] / "model.safetensors")
        out[n] = {k: (ft[k].astype(np.float32) - base[k]).reshape(-1) for k in base}
    return out


def test_task_vectors_match_numpy(models):
    report = task_vectors(models["base"], [models[n] for n in "abc"], top_k=0.2)
    ref = deltas(models, list("abc"))
    base = load_file(models["base"] / "model.safetensors")
    assert {r["tensor"] for r in report.records} == set(base)
    pairs = {"a & b": ("a", "b"), "a & c": ("a", "c"), "b & c": ("b", "c")}
    checked = 0
    for r in report.records:
        name, against, v = r["tensor"], r["against"], r["value"]
        if r["metric"] == "delta_norm":
            assert v == pytest.approx(np.linalg.norm(ref[against][name].astype(np.float64)))
        elif r["metric"] == "delta_norm_rel":
            d = ref[against][name].astype(np.float64)
            assert v == pytest.approx(np.linalg.norm(d) / np.linalg.norm(base[name]), rel=1e-6)
        elif r["metric"] == "sign_conflict_elected":
            ds = [ref[n][name] for n in "abc" if np.any(ref[n][name])]
            assert v == pytest.approx(np_elected(ds), abs=1e-12), r
        else:
            x, y = (ref[n][name].astype(np.float64) for n in pairs[against])
            if not (x.any() and y.any()):  # b left UP1 untouched
                assert name == UP1 and math.isnan(v), r
                continue
            if r["metric"] == "task_cosine":
                expected = np_cos(x, y)
            elif r["metric"] == "sign_conflict":
                expected = np_sign_conflict(x, y)
            else:
                assert r["metric"] == "topk_overlap"
                expected = np_topk(x, y, 0.2)
            assert v == pytest.approx(expected, rel=1e-9, abs=1e-12), r
        checked += 1
    assert checked == len(base) * (3 * 2 + 3 * 3 + 1) - 2 * 3
    # the hand-picked tensor: the pure functions' values on the repeated pattern
    (r,) = report.values("sign_conflict_elected", tensor=Q0)
    (c,) = report.values("task_cosine", tensor=UP1, against="a & c")
    assert c["value"] == pytest.approx(-1.0, abs=1e-12)
    (s,) = report.values("sign_conflict", tensor=UP1, against="a & c")
    assert s["value"] == 1.0
    assert 0.2 < r["value"] < 0.35  # near 3/11 (the pattern does not tile the tensor exactly)


def test_nulls_and_matrices(models):
    report = task_vectors(models["base"], [models["a"], models["b"]], top_k=0.1)
    sizes = {k: v.size for k, v in load_file(models["base"] / "model.safetensors").items()}
    matrices = [r for r in report.records if sizes[r["tensor"]] >= 128]
    assert len(matrices) > 100
    nulls = {"task_cosine": 0.0, "sign_conflict": 0.5, "topk_overlap": 0.1}
    nulls["sign_conflict_elected"] = 0.25  # two task vectors, whatever their norms
    for r in matrices:
        if r["metric"] in nulls and not math.isnan(r["value"]):  # 5 standard deviations
            sd = 1 / math.sqrt(0.6 * sizes[r["tensor"]])  # 0.6: a's nonzero share
            assert r["baseline_gaussian"] == pytest.approx(nulls[r["metric"]], abs=5 * sd), r
    # the null of pair (a, b) is a's task vector against the Gaussian seeded for b
    down = "model.layers.1.mlp.down_proj.weight"
    ref = deltas(models, ["a"])["a"][down].astype(np.float64)
    g = gaussian_like(tuple(sizes_shape(models, down)), seed=2).reshape(-1).double().numpy()
    (r,) = report.values("task_cosine", tensor=down, against="a & b")
    assert r["baseline_gaussian"] == pytest.approx(np_cos(ref, g), rel=1e-6)
    (r,) = report.values("sign_conflict", tensor=down, against="a & b")
    assert r["baseline_gaussian"] == pytest.approx(np_sign_conflict(ref, g), rel=1e-12)
    # b left UP1 untouched: no value, no null
    (r,) = report.values("task_cosine", tensor=UP1, against="a & b")
    assert math.isnan(r["value"]) and r["baseline_gaussian"] is None
    for r in report.values("delta_norm"):
        assert r["baseline_gaussian"] is None
    m = report.matrices["a & b/task_cosine"]
    assert m.rows == ["0", "1"] and "self_attn.q_proj" in m.cols
    (r,) = report.values("task_cosine", tensor=Q0, against="a & b")
    assert m.to_frame().loc["0", "self_attn.q_proj"] == r["value"]
    assert set(report.matrices) >= {"a/delta_norm", "b/delta_norm_rel", "all/sign_conflict_elected"}
    assert "a & b" in summary(report) and "q_proj" in summary(report)
    no_null = task_vectors(models["base"], [models["a"], models["b"]], baselines=False)
    assert all(r["baseline_gaussian"] is None for r in no_null.records)
    one = task_vectors(models["base"], models["a"])  # one fine-tune: norms only
    assert {r["metric"] for r in one.records} == {"delta_norm", "delta_norm_rel"}


def test_cli_writes_report(models, tmp_path, capsys):
    out = tmp_path / "out"
    argv = ["analyze", "tasks", models["base"], models["a"], models["b"], "--out", out]
    assert main([str(a) for a in [*argv, "--top-k", "0.2", "--no-progress"]]) == 0
    text = capsys.readouterr().out
    assert "task_cosine" in text and "wrote" in text
    saved = json.loads((out / "report.json").read_text())
    assert saved["analysis"] == "tasks" and saved["meta"]["top_k"] == 0.2
    assert (out / "tasks_task_cosine.png").stat().st_size > 1000


@pytest.fixture(scope="module")
def bad_models(tmp_path_factory, models) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("bad")
    return {
        "wide": make_tiny(root / "wide", "llama", layers=2, hidden=32, vocab=40),
        "deep": make_tiny(root / "deep", "llama", layers=3, hidden=16, vocab=40),
    }


@pytest.mark.parametrize(
    "case, needle",
    [
        ("none", "at least one fine-tune"),
        ("wide", "has shape"),
        ("deep", "differ in their tensors"),
        ("twice", "given twice"),
        ("top-k", "top_k"),
        ("missing", "missing"),
    ],
)
def test_cli_bad_input(models, bad_models, tmp_path, capsys, case, needle):
    base, a = str(models["base"]), str(models["a"])
    argv = {
        "none": [base],
        "wide": [base, a, str(bad_models["wide"])],
        "deep": [base, str(bad_models["deep"])],
        "twice": [base, a, a],
        "top-k": [base, a, "--top-k", "0"],
        "missing": [base, str(tmp_path / "missing")],
    }[case]
    out = tmp_path / "out"
    rc = main(["analyze", "tasks", *argv, "--out", str(out), "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and err.startswith("splice"), err
    assert needle in err, err
    assert not out.exists()
