"""Cheaper fitness (splice.evolve.fitness): the estimate's formula on hand-built items, the item
model on data drawn from a known 2PL model, the per-item path against lm-eval's aggregate, and
racing searches that resume to the uninterrupted run."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from evolve_helpers import config_dict, write_tasks

from splice.errors import SpliceError
from splice.evolve import EvolveConfig, evolve, resume
from splice.evolve.fitness import (
    IRT,
    estimate,
    fit_ability,
    fit_irt,
    item_order,
)
from splice.evolve.search import load_state

torch.set_num_threads(1)


# ---- the formula --------------------------------------------------------------------------------
def test_estimate_is_the_weighted_mean_with_a_finite_population_error():
    items = {"a": {0: 1.0, 1: 0.0, 2: 1.0, 3: 1.0}, "b": {5: 0.0, 6: 1.0}}
    est = estimate(items, {"a": 16, "b": 2}, {"a": 1.0, "b": -0.5})
    assert est.scores == {"a": 0.75, "b": 0.5}
    assert est.value == pytest.approx(0.75 - 0.25)
    sd_a = np.std([1, 0, 1, 1], ddof=1)
    se_a = sd_a / 2 * math.sqrt(1 - 4 / 16)  # b is fully scored: no error
    assert est.se == pytest.approx(se_a) and est.items == 6
    whole = estimate({"a": {i: float(i % 2) for i in range(16)}}, {"a": 16}, {"a": 1.0})
    assert whole.se == 0 and whole.value == 0.5
    # the model's prediction for the items not scored joins the scored ones' sum
    pred = estimate(items, {"a": 16, "b": 2}, {"a": 1.0, "b": 0.0}, {"a": 6.0, "b": 0.0})
    assert pred.scores["a"] == pytest.approx((3 + 6) / 16)


def test_item_order_is_a_seeded_permutation():
    docs = {"t": list(range(50)), "u": list(range(7))}
    a, b = item_order(docs, 3), item_order(docs, 3)
    assert a == b and sorted(a["t"]) == docs["t"] and a["t"] != docs["t"]
    assert item_order(docs, 4)["t"] != a["t"]


# ---- the item model ------------------------------------------------------------------------------
def synthetic(m: int, n: int, seed: int = 0):
    """Responses of ``m`` respondents to ``n`` items drawn from a 2PL model."""
    rng = np.random.default_rng(seed)
    a = np.exp(rng.normal(0, 0.4, n))
    b = rng.normal(0, 1.2, n)
    theta = rng.normal(0, 1, m)
    p = 1 / (1 + np.exp(-(a[None] * theta[:, None] - b[None])))
    return (rng.uniform(size=p.shape) < p).astype(float), a, b, theta


def test_ability_is_recovered_from_known_items():
    a = np.ones(400)
    b = np.linspace(-2, 2, 400)
    p = 1 / (1 + np.exp(-(a * 0.8 - b)))
    y = (np.random.default_rng(1).uniform(size=400) < p).astype(float)
    assert fit_ability(a, b, y) == pytest.approx(0.8, abs=0.25)


def test_irt_predicts_a_new_candidate_better_than_a_random_subset():
    y, _a, _b, _theta = synthetic(125, 300)
    train, test = y[:25], y[25:]
    ids = {"t": list(range(300))}
    model = fit_irt({"t": train}, ids, share=0.1)
    anchors = model.anchors["t"]
    assert len(anchors) == 30 and len(set(anchors)) == 30
    again = fit_irt({"t": train}, ids, share=0.1)
    assert again == model  # deterministic: a resumed run refits the same model
    assert IRT.from_dict(model.to_dict()) == model
    rng = np.random.default_rng(5)
    err_irt, err_random = [], []
    for row in test:
        seen = {"t": {i: row[i] for i in anchors}}
        est = estimate(seen, {"t": 300}, {"t": 1.0}, model.predicted(seen))
        err_irt.append(abs(est.value - row.mean()))
        subset = rng.choice(300, size=30, replace=False)
        err_random.append(abs(row[subset].mean() - row.mean()))
    # (with 25 respondents the model adds little to anchors spread over its difficulties,
    # which a random subset of the same size does not have)
    assert np.mean(err_irt) < 0.065
    assert np.mean(err_irt) < np.mean(err_random)


def test_the_item_model_is_refitted_on_every_fully_scored_candidate_so_far():
    """irt's model before generation g: fitted on the fully scored candidates of generations
    0 .. g-1 (a stopped one has no item scores); refitted only when there are more, and the
    same after a resume (a fresh context fits the same records alike)."""
    from types import SimpleNamespace

    from splice.evolve.search import RaceContext

    y, _a, _b, _theta = synthetic(12, 40)

    def rec(gen: int, i: int, full: bool = True) -> dict:
        out = {"generation": gen, "fitness": float(y[i].mean()), "error": None}
        return out | ({"item_scores": {"t": list(y[i])}} if full else {"full": False})

    config = SimpleNamespace(search=SimpleNamespace(fitness="irt", subset=0.25))
    ctx = RaceContext(config)  # type: ignore[arg-type]
    gen0 = [rec(0, i) for i in range(4)]
    assert ctx({"generation": 0, "records": gen0})["irt"] is None  # gen 0 is fully scored
    first = ctx({"generation": 1, "records": gen0})["irt"]
    assert first == fit_irt({"t": y[:4]}, {"t": list(range(40))}, 0.25).to_dict()
    stopped = [*gen0, rec(1, 4, full=False)]
    assert ctx({"generation": 2, "records": stopped})["irt"] is first  # nothing new: kept
    more = [*stopped, rec(2, 5), rec(2, 6)]
    refit = ctx({"generation": 3, "records": more})["irt"]
    want = fit_irt({"t": y[[0, 1, 2, 3, 5, 6]]}, {"t": list(range(40))}, 0.25).to_dict()
    assert refit == want and refit != first
    assert RaceContext(config)({"generation": 3, "records": more})["irt"] == want  # type: ignore[arg-type]


# ---- the per-item path and racing on tiny models ----------------------------------------------------
@pytest.fixture(scope="module")
def tasks(tmp_path_factory) -> Path:
    return write_tasks(tmp_path_factory.mktemp("evolve_fitness_tasks"), items=64)


def racing(trio, tasks, **search):
    data = config_dict(trio, tasks, **search)
    data["tasks"] = [{"name": "tiny_mc"}]
    return EvolveConfig.from_dict(data)


def test_the_per_item_path_gives_lm_evals_score(trio, tasks):
    from splice.evolve.fitness import Racer
    from splice.evolve.search import Candidates, open_scorer, prepare

    cfg = racing(trio, tasks, fitness="subset", subset=0.125)
    genome, sources, options = prepare(cfg)
    with open_scorer(cfg) as scorer:
        cands = Candidates(cfg, genome, sources, scorer, options)
        x = np.full(genome.dim, 0.6)
        cands.merge(x)
        whole = scorer.score(cands.module)["tiny_mc"]
        racer = Racer(scorer, 0.125, 2.0, seed=0)
        full = racer.run(cands.module, None, None)
        assert full["full"] and full["items"] == 64
        assert full["scores"]["tiny_mc"] == pytest.approx(whole, abs=1e-12)
        assert len(full["item_scores"]["tiny_mc"]) == 64
        stopped = racer.run(cands.module, 1e9, None)  # nothing can reach this bar
        assert not stopped["full"] and stopped["items"] == 8 and stopped["fitness_se"] > 0
        gone_on = racer.run(cands.module, -1e9, None)  # it beats this bar: the whole split
        assert gone_on["full"] and gone_on["items"] == 64
        assert gone_on["estimate"] == pytest.approx(stopped["fitness"])  # its first stage
        kept = racer.run(cands.module, whole, None)  # a bar it ties: it goes on to the end
        assert kept["full"] and kept["fitness"] == pytest.approx(whole, abs=1e-12)


def test_a_metric_that_is_not_a_mean_is_refused(trio, tasks, tmp_path):
    cfg = EvolveConfig.from_dict(config_dict(trio, tasks, fitness="subset", generations=1))
    with pytest.raises(SpliceError, match="perplexity is not a mean"):
        evolve(cfg, tmp_path / "run")


@pytest.mark.parametrize("mode", ["subset", "irt"])
def test_racing_saves_items_keeps_full_scores_and_resumes(trio, tasks, tmp_path, mode):
    search = {"fitness": mode, "subset": 0.125, "grid": True, "restarts": "none", "race_z": 0.0}
    full = evolve(racing(trio, tasks, generations=4, **search), tmp_path / "full")
    state = load_state(full.run)
    recs = state["records"]
    gen0 = [r for r in recs if r["generation"] == 0]
    assert all(r["full"] and r["items"] == 64 for r in gen0)  # no bar yet: the whole split
    later = [r for r in recs if r["generation"] > 0]
    assert any(not r["full"] for r in later)  # some stopped early
    assert sum(r["items"] for r in recs) < 64 * len(recs)
    best = max((r for r in recs if r["full"]), key=lambda r: r["fitness"])
    assert full.best_fitness == best["fitness"]
    for r in later:
        if not r["full"]:  # stopped: its estimate cannot beat the bar
            assert r["fitness"] < best["fitness"]
    # the same genes fully scored give the plain search's fitness (same merge, same items)
    plain = evolve(
        racing(trio, tasks, generations=1, grid=True, restarts="none"), tmp_path / "plain"
    )
    plain_fits = [r["fitness"] for r in load_state(plain.run)["records"]]
    assert [r["fitness"] for r in gen0] == pytest.approx(plain_fits, abs=1e-12)
    from splice.evolve import format_report, report

    it = report(full.run).items
    assert it["items"] == sum(r["items"] for r in recs) and it["all_items"] == 64 * len(recs)
    assert it["fully_scored"] == sum(r["full"] for r in recs)
    assert "cheaper fitness: " in format_report(report(full.run))
    short = evolve(racing(trio, tasks, generations=2, **search), tmp_path / "short")
    resume(short.run, generations=4)
    mine = [(r["genes"], r["fitness"], r["items"]) for r in load_state(short.run)["records"]]
    assert mine == [(r["genes"], r["fitness"], r["items"]) for r in recs]
