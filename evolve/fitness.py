"""Cheaper fitness (``search.fitness: subset | irt``): score a candidate on a few items first and
on the whole fitness split only while it can still beat the best candidate so far.

Items: each task's fitness documents (the first ``lm_eval.limit`` of them, after the seeded
shuffle, as lm-eval's ``limit`` takes them) in a fixed order drawn from ``search.seed``. A task's
score on ``n`` of its ``N`` items is their mean; its standard error is the sample standard
deviation over sqrt(n), times the finite-population factor sqrt(1 - n / N), so it is 0 once
every item is scored. The fitness estimate is ``sum_t w_t * s_t`` (signs as the fitness) with
standard error ``sqrt(sum_t w_t**2 * se_t**2)``.

``subset`` (racing, successive halving): stage k scores the next items up to a share
``subset * 2**k`` of each task (stage 0: ``subset``); after each stage a candidate whose
estimate plus ``race_z`` standard errors is below ``bar`` (the best fully scored fitness before
this generation) stops there, and its estimate is its fitness; the others go on to the whole
split. ``irt`` (tinyBenchmarks / MERGE³ style): a 2-parameter logistic model
``P(item i right | candidate j) = sigmoid(a_i * theta_j - b_i)`` fitted by maximum a
posteriori before each generation on every fully scored candidate so far (generation 0, the
grid, then every candidate that went on to the whole split); a candidate is scored
first on ``subset`` of the items chosen as anchors (evenly spread over the items' difficulty
``b_i / a_i``), its ability ``theta`` fitted on them, and its score on the items not scored
predicted by the model; it goes on to the whole split under the same rule as racing.

Every record says how many items it scored (``items``) and whether it was fully scored
(``full``); a fully scored candidate keeps its first estimate (``estimate``), so a run reports
its estimator's error against the full score. Only full scores can become the best candidate:
a stopped candidate's estimate is below the bar.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from splice.errors import SpliceError

if TYPE_CHECKING:
    import torch

    from splice.evolve.scorer import TaskScorer

#: item scores of one candidate: score column -> {doc id: value}
Items = dict[str, dict[int, float]]


@dataclass(frozen=True)
class Estimate:
    """A fitness estimate from the items scored so far: ``value`` (weighted, signed as the
    fitness), its standard error ``se``, and per-column means ``scores``."""

    value: float
    se: float
    scores: dict[str, float]
    items: int


def item_order(doc_ids: Mapping[str, Sequence[int]], seed: int) -> dict[str, list[int]]:
    """Each task's fitness documents in a fixed random order drawn from ``seed``."""
    out = {}
    for k, (task, ids) in enumerate(sorted(doc_ids.items())):
        rng = np.random.default_rng([seed, k])
        out[task] = [int(ids[i]) for i in rng.permutation(len(ids))]
    return out


def estimate(
    items: Items,
    totals: Mapping[str, int],
    weights: Mapping[str, float],
    predicted: Mapping[str, float] | None = None,
) -> Estimate:
    """The fitness estimate of ``items`` (``totals``: items per column in the whole split;
    ``weights``: signed weight per column). ``predicted``: per column, the model's predicted
    sum over the items not scored (IRT), added to the scored ones' sum."""
    value, var, scores, count = 0.0, 0.0, {}, 0
    for col, w in weights.items():
        v = np.array(list(items[col].values()), dtype=float)
        n, total = len(v), totals[col]
        if n == 0:
            raise SpliceError(f"{col}: no item scored")
        if predicted is not None and n < total:
            mean = (v.sum() + predicted[col]) / total
        else:
            mean = float(v.mean())
        sd = float(v.std(ddof=1)) if n > 1 else 0.5
        se = sd / math.sqrt(n) * math.sqrt(max(0.0, 1 - n / total))
        scores[col] = mean
        value += w * mean
        var += (w * se) ** 2
        count += n
    return Estimate(value, math.sqrt(var), scores, count)


# ---- item response theory ---------------------------------------------------------------------
@dataclass(frozen=True)
class IRT:
    """A 2-parameter logistic model per score column: ``a[col]``, ``b[col]`` ``[N]`` in the
    column's item order (``ids[col]``); ``anchors[col]``: the doc ids a candidate is scored on
    first."""

    ids: dict[str, list[int]]
    a: dict[str, list[float]]
    b: dict[str, list[float]]
    anchors: dict[str, list[int]]

    def to_dict(self) -> dict[str, Any]:
        return {"ids": self.ids, "a": self.a, "b": self.b, "anchors": self.anchors}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> IRT:
        return cls(
            {k: [int(i) for i in v] for k, v in data["ids"].items()},
            {k: [float(x) for x in v] for k, v in data["a"].items()},
            {k: [float(x) for x in v] for k, v in data["b"].items()},
            {k: [int(i) for i in v] for k, v in data["anchors"].items()},
        )

    def predicted(self, items: Items) -> dict[str, float]:
        """Per column: the predicted sum of the scores of the items not in ``items``, from the
        ability fitted on those that are."""
        out = {}
        for col, ids in self.ids.items():
            a, b = np.array(self.a[col]), np.array(self.b[col])
            seen = items[col]
            idx = [k for k, i in enumerate(ids) if i in seen]
            y = np.array([seen[ids[k]] for k in idx])
            theta = fit_ability(a[idx], b[idx], y)
            rest = [k for k, i in enumerate(ids) if i not in seen]
            out[col] = float(_sigmoid(a[rest] * theta - b[rest]).sum())
        return out


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 1 / (1 + np.exp(-np.clip(z, -30, 30)))


def fit_ability(a: np.ndarray, b: np.ndarray, y: np.ndarray, steps: int = 50) -> float:
    """MAP ability ``theta`` (prior N(0, 1)) of a candidate whose scores on items with
    parameters ``a``, ``b`` ``[n]`` are ``y`` ``[n]`` in [0, 1] (Newton's method)."""
    theta = 0.0
    for _ in range(steps):
        p = _sigmoid(a * theta - b)
        grad = float(np.sum(a * (y - p))) - theta
        hess = -float(np.sum(a * a * p * (1 - p))) - 1.0
        step = grad / hess
        theta -= step
        if abs(step) < 1e-10:
            break
    return theta


def fit_irt(
    responses: Mapping[str, np.ndarray],
    ids: Mapping[str, list[int]],
    share: float,
    steps: int = 2000,
) -> IRT:
    """Fit the 2PL model per column on ``responses[col]`` ``[candidates, N]`` (scores in
    [0, 1], items in ``ids[col]``'s order) by MAP gradient ascent (priors: theta ~ N(0, 1),
    log a ~ N(0, 0.5**2), b ~ N(0, 2**2); deterministic), and choose ``ceil(share * N)``
    anchors per column, evenly spread over the items' difficulty."""
    a_out, b_out, anchors = {}, {}, {}
    for col, y in responses.items():
        y = np.asarray(y, dtype=float)
        n = y.shape[1]
        theta = (y.mean(axis=1) - y.mean()) / (y.mean(axis=1).std() + 1e-6)
        log_a = np.zeros(n)
        p_item = np.clip(y.mean(axis=0), 0.02, 0.98)
        b = -np.log(p_item / (1 - p_item))
        lr = 0.05
        for _ in range(steps):
            a = np.exp(log_a)
            p = _sigmoid(a[None, :] * theta[:, None] - b[None, :])
            r = y - p  # [m, n]
            g_theta = (r * a[None, :]).sum(axis=1) - theta
            g_log_a = (r * theta[:, None]).sum(axis=0) * a - log_a / 0.25
            g_b = -r.sum(axis=0) - b / 4.0
            theta = theta + lr * g_theta
            log_a = log_a + lr * g_log_a
            b = b + lr * g_b
        a = np.exp(log_a)
        k = min(n, max(2, math.ceil(share * n)))
        order = np.argsort(b / a, kind="stable")
        picks = sorted({int(order[round(q)]) for q in np.linspace(0, n - 1, k)})
        a_out[col] = [float(v) for v in a]
        b_out[col] = [float(v) for v in b]
        anchors[col] = [ids[col][i] for i in picks]
    return IRT({c: list(v) for c, v in ids.items()}, a_out, b_out, anchors)


# ---- racing ------------------------------------------------------------------------------------
class Racer:
    """Scores a live module by stages (see the module docstring) with ``scorer``'s per-item
    path (``subset``; :meth:`run` given an item model: ``irt``). ``share``: the first stage's
    share of the items; ``z``: standard errors of margin; ``seed``: the item order."""

    def __init__(self, scorer: TaskScorer, share: float, z: float, seed: int) -> None:
        self.scorer, self.share, self.z = scorer, share, z
        self.docs = scorer.fitness_docs()  # column -> doc ids of the whole split
        self.order = item_order(self.docs, seed)
        self.totals = {col: len(ids) for col, ids in self.docs.items()}
        self.weights = scorer.signed_weights()

    def stages(self) -> list[dict[str, list[int]]]:
        """The doc ids each stage adds, per column (stage 0: the first ``share``)."""
        out, done, frac = [], dict.fromkeys(self.order, 0), self.share
        while True:
            step = {}
            for col, ids in self.order.items():
                upto = len(ids) if frac >= 1 else max(2, math.ceil(frac * len(ids)))
                step[col] = ids[done[col] : upto]
                done[col] = max(done[col], upto)
            out.append(step)
            if frac >= 1:
                return out
            frac *= 2

    def run(
        self, module: torch.nn.Module, bar: float | None, irt: IRT | None, offset: float = 0.0
    ) -> dict[str, Any]:
        """The record fields of one candidate: ``scores``, ``fitness`` (task fitness; the
        caller adds ``offset``-like terms itself), ``fitness_se``, ``items``, ``full``,
        ``estimate`` and, when fully scored, ``item_scores`` (per column, in doc-id order).
        ``bar``: the fitness to beat (``None``: score the whole split); ``offset``: what the
        caller will add to the task fitness (a size term), so the bar is met on the total."""
        items: Items = {col: {} for col in self.order}
        first: float | None = None
        if irt is not None and bar is not None:  # the anchors, then every other item
            anchors = {c: set(ids) for c, ids in irt.anchors.items()}
            rest = {c: [i for i in ids if i not in anchors[c]] for c, ids in self.order.items()}
            plan = [irt.anchors, rest]
        else:
            plan = self.stages() if bar is not None else [dict(self.order)]
        for k, step in enumerate(plan):
            self._score(module, step, items)
            full = all(len(items[c]) == self.totals[c] for c in items)
            pred = irt.predicted(items) if irt is not None and not full else None
            est = estimate(items, self.totals, self.weights, pred)
            if k == 0:
                first = est.value
            if full or bar is None or est.value + offset + self.z * est.se < bar:
                break
        out: dict[str, Any] = {
            "scores": est.scores,
            "fitness": est.value,
            "fitness_se": round(est.se, 6),
            "items": est.items,
            "full": full,
            "estimate": first,
        }
        if full:
            out["item_scores"] = {c: [items[c][i] for i in self.docs[c]] for c in items}
        return out

    def _score(self, module: torch.nn.Module, step: dict[str, list[int]], items: Items) -> None:
        got = self.scorer.score_items(module, step)
        for col, values in got.items():
            items[col].update(values)


def responses(records: Sequence[Mapping[str, Any]]) -> dict[str, np.ndarray]:
    """Per column ``[candidates, N]``: the item scores of the fully scored ``records``."""
    rows = [r for r in records if r.get("item_scores")]
    if len(rows) < 3:
        raise SpliceError(
            "fitness irt: fewer than 3 fully scored candidates to fit the model on (turn "
            "search.grid on)"
        )
    cols = list(rows[0]["item_scores"])
    return {c: np.array([r["item_scores"][c] for r in rows], dtype=float) for c in cols}
