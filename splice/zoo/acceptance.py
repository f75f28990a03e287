"""The zoo's acceptance: what a build must reach, measured in process at the end of the build.

:func:`mc_accuracy` scores multiple-choice items exactly as lm-eval's ``acc`` does (the choice
whose continuation tokens have the highest summed log-likelihood after the prompt), batched, on
a live module: the build's stopping criteria and its final check use it, and
``splice.zoo.evaluate`` (lm-eval) gives the same figures on the written task files. It is not
the lm-eval scorer (:mod:`splice.lmeval`) on purpose: it runs inside training, many times, on
in-memory items before any task file exists, sharing each prompt's key/value cache among its
choices; and being computed apart from lm-eval, the figures it records are an independent
cross-check of lm-eval's (``tests/test_zoo.py::test_acceptance`` re-measures them with it).

:func:`check` measures a built zoo (its saved, bf16 weights) on the report splits: each
specialist on its own task and the other's, the base, the combined task ``zoo_math_lang``, the
fixed grid of naive merges (:data:`GRID`), the task vectors' norms and the MoE's routing and
experts, and lists every criterion with its value and whether it passed.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch
    from tokenizers import Tokenizer

    from splice.zoo.corpus import Item


@dataclass(frozen=True)
class Encoded:
    """Items as token ids: for every (item, choice) row, ``prompt + choice`` ids and the length
    of the prompt's ids; ``gold[i]`` the right choice of item ``i``."""

    rows: list[tuple[list[int], int]]
    choices: list[int]
    gold: list[int]


def encode_items(tok: Tokenizer, items: Sequence[Item]) -> Encoded:
    """lm-eval's split: the context is ``<bos> prompt``, the continuation ``" " + choice``."""
    prompts = [it.prompt for it in items]
    p_ids = [e.ids for e in tok.encode_batch(prompts)]
    full = tok.encode_batch([it.prompt + c for it in items for c in it.choices])
    rows = []
    k = 0
    for i, it in enumerate(items):
        for _ in it.choices:
            ids = full[k].ids
            n = len(p_ids[i])
            if ids[:n] != p_ids[i]:
                raise ValueError("a prompt's tokens are not a prefix of prompt + choice")
            rows.append((ids, n))
            k += 1
    return Encoded(rows, [len(it.choices) for it in items], [it.gold for it in items])


def choice_loglik(model: torch.nn.Module, enc: Encoded, batch: int = 256) -> list[float]:
    """Summed log-likelihood of every row's continuation (float32 log-softmax, float64 sum).

    Rows are grouped by (prompt length, continuation length), so nothing is padded: each
    group's distinct prompts run once, their key/value cache is copied to every row, and only
    the continuations run per row (the four choices of an item share one prompt pass).
    """
    import torch

    groups: dict[tuple[int, int], list[int]] = {}
    for r, (ids, n) in enumerate(enc.rows):
        groups.setdefault((n, len(ids) - n), []).append(r)
    out = [0.0] * len(enc.rows)
    with torch.no_grad():
        for (n, c), rows in groups.items():
            for s in range(0, len(rows), batch):
                part = rows[s : s + batch]
                prompts: dict[tuple[int, ...], int] = {}
                which = [prompts.setdefault(tuple(enc.rows[r][0][:n]), len(prompts)) for r in part]
                res = model(input_ids=torch.tensor(list(prompts)), use_cache=True)
                cache = res.past_key_values
                cache.batch_select_indices(torch.tensor(which))
                first = torch.log_softmax(res.logits[:, -1].float(), dim=-1)[which]  # [R, V]
                cont = torch.tensor([enc.rows[r][0][n:] for r in part])  # [R, c]
                lp = first.gather(1, cont[:, :1]).double()[:, 0]
                if c > 1:
                    pos = torch.arange(n, n + c - 1)[None].expand(len(part), -1)
                    kw = {_cache_kwarg(model): cache, "position_ids": pos}
                    more = model(input_ids=cont[:, :-1], **kw).logits.float()
                    more = torch.log_softmax(more, dim=-1).gather(2, cont[:, 1:, None])
                    lp = lp + more[..., 0].double().sum(1)
                for r, v in zip(part, lp.tolist(), strict=True):
                    out[r] = v
    return out


def _cache_kwarg(model: Any) -> str:
    """``cache`` (transformers >= 5.2x) or ``past_key_values`` (older)."""
    import inspect

    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def mc_accuracy(model: torch.nn.Module, enc: Encoded, batch: int = 256) -> float:
    """lm-eval's ``acc`` of ``model`` on encoded items (ties go to the first choice)."""
    ll = choice_loglik(model, enc, batch)
    right = 0
    k = 0
    for n, gold in zip(enc.choices, enc.gold, strict=True):
        scores = ll[k : k + n]
        right += max(range(n), key=lambda j: (scores[j], -j)) == gold
        k += n
    return right / len(enc.gold)


# ---- the build's final check ------------------------------------------------------------------
SPECIALIST_MIN = 0.9  # each specialist on its own task
OFF_TASK_MAX = 0.45  # a specialist on the other's task, the base on both, all on the combined
MERGE_GAIN_MIN = 0.10  # best grid merge over the best specialist, on the combined task
MERGE_MAX = 0.80  # room above the best naive merge
NORM_RATIO_MAX = 2.0  # the larger task vector at most twice the smaller
ROUTING_SPREAD_MIN = 0.05  # mean over layers of (max - min) share of an expert's selections


def grid(zoo: Path) -> dict[str, dict[str, Any]]:
    """The fixed grid of naive merges of ``math`` and ``lang``: linear 50/50, task arithmetic
    with weights in {0.5, 0.8, 1.0}², TIES with its defaults (weights 1/1)."""
    base, m, lang = str(zoo / "base"), str(zoo / "math"), str(zoo / "lang")

    def two(method: str, wm: float, wl: float, with_base: bool = True) -> dict[str, Any]:
        r: dict[str, Any] = {
            "merge_method": method,
            "models": [
                {"model": m, "parameters": {"weight": wm}},
                {"model": lang, "parameters": {"weight": wl}},
            ],
            "dtype": "float32",
        }
        if with_base:
            r["base_model"] = base
        return r

    out = {"linear 0.5/0.5": two("linear", 0.5, 0.5, with_base=False)}
    for a in (0.5, 0.8, 1.0):
        for b in (0.5, 0.8, 1.0):
            out[f"task_arithmetic {a}/{b}"] = two("task_arithmetic", a, b)
    out["ties 1.0/1.0"] = two("ties", 1.0, 1.0)
    return out


GRID_NAMES = tuple(grid(Path("z")))


@dataclass(frozen=True)
class Criterion:
    name: str
    value: float
    bound: str  # ">= 0.9"
    passed: bool


def _at_least(name: str, value: float, bound: float) -> Criterion:
    return Criterion(name, round(value, 4), f">= {bound}", value >= bound - 1e-9)


def _at_most(name: str, value: float, bound: float) -> Criterion:
    return Criterion(name, round(value, 4), f"<= {bound}", value <= bound + 1e-9)


def task_vector_norms(zoo: Path) -> dict[str, float]:
    """Frobenius norm of ``model - base`` over all tensors, for ``math`` and ``lang``."""
    from splice.checkpoint import open_checkpoint

    base = open_checkpoint(zoo / "base")
    out = {}
    for name in ("math", "lang"):
        ck = open_checkpoint(zoo / name)
        sq = 0.0
        for t in ck.tensors:
            d = ck.load(t, dtype="float32") - base.load(t, dtype="float32")
            sq += float(d.double().pow(2).sum())
        out[name] = math.sqrt(sq)
    return out


def moe_stats(zoo: Path, text: str, tok: Tokenizer) -> dict[str, Any]:
    """Routing shares per layer and expert on ``text`` (top-k selections / all selections), and
    the mean relative distance of experts to each other and to the dense MLP of ``base``."""
    import torch

    from splice.calib import RouterCounts, run, token_windows
    from splice.checkpoint import open_checkpoint
    from splice.modeling import load_causal_lm, load_tokenizer

    model = load_causal_lm(zoo / "moe", dtype="float32")
    windows = token_windows(load_tokenizer(zoo / "base"), text, 64, 64)
    stats = run(model, windows, [RouterCounts()], batch_size=16)[0]
    counts = stats.counts.astype(float)
    shares = counts / counts.sum(axis=1, keepdims=True)
    spread = float((shares.max(axis=1) - shares.min(axis=1)).mean())
    moe, base = open_checkpoint(zoo / "moe"), open_checkpoint(zoo / "base")
    layers = model.config.num_hidden_layers
    experts = model.config.num_local_experts
    kinds = {"w1": "gate_proj", "w3": "up_proj", "w2": "down_proj"}
    to_dense, between = [], []
    for i in range(layers):
        for w, dense in kinds.items():
            d = base.load(f"model.layers.{i}.mlp.{dense}.weight", dtype="float32")
            es = [
                moe.load(
                    f"model.layers.{i}.block_sparse_moe.experts.{e}.{w}.weight", dtype="float32"
                )
                for e in range(experts)
            ]
            to_dense += [float((e - d).norm() / d.norm()) for e in es]
            between += [
                float((es[a] - es[b]).norm() / d.norm())
                for a in range(experts)
                for b in range(a + 1, experts)
            ]
    del torch
    return {
        "routing_shares": [[round(float(x), 4) for x in row] for row in shares],
        "routing_spread": spread,
        "expert_to_dense": sum(to_dense) / len(to_dense),
        "expert_to_expert": sum(between) / len(between),
    }


def check(
    zoo: Path,
    tok: Tokenizer,
    items: dict[str, list[Item]],
    heldout: str,
    log: Callable[[str], None] = lambda s: None,
) -> dict[str, Any]:
    """Measure the built zoo in ``zoo`` on the report splits ``items`` (task -> items): scores,
    the merge grid, task-vector norms, MoE statistics and the list of criteria."""
    from splice.modeling import load_causal_lm
    from splice.registry import plugin
    from splice.zoo.evaluate import _FINITE

    merge_into = plugin("splice.zoo", "merge_into")  # splice.merge's, declared in pyproject

    tasks = ("zoo_math", "zoo_lang", "zoo_math_lang")
    enc = {t: encode_items(tok, items[t]) for t in tasks}
    scores: dict[str, dict[str, float]] = {}

    def score(name: str, model: Any) -> None:
        scores[name] = {t: round(mc_accuracy(model, enc[t]), 4) for t in tasks}
        log(f"{name}: " + " ".join(f"{t} {v:.3f}" for t, v in scores[name].items()))

    for name in ("base", "math", "lang"):
        score(name, load_causal_lm(zoo / name, why=_FINITE))
    for name, recipe in grid(zoo).items():  # the merges matter on the combined task only
        model = load_causal_lm(zoo / "base", why=_FINITE)
        merge_into(model, recipe)
        scores[name] = {"zoo_math_lang": round(mc_accuracy(model, enc["zoo_math_lang"]), 4)}
        log(f"{name}: zoo_math_lang {scores[name]['zoo_math_lang']:.3f}")
    norms = task_vector_norms(zoo)
    moe = moe_stats(zoo, heldout, tok)
    s = scores
    best_spec = max(s["math"]["zoo_math_lang"], s["lang"]["zoo_math_lang"])
    best_merge = max(GRID_NAMES, key=lambda n: s[n]["zoo_math_lang"])
    crit = [
        _at_least("math on zoo_math", s["math"]["zoo_math"], SPECIALIST_MIN),
        _at_least("lang on zoo_lang", s["lang"]["zoo_lang"], SPECIALIST_MIN),
        _at_most("math on zoo_lang", s["math"]["zoo_lang"], OFF_TASK_MAX),
        _at_most("lang on zoo_math", s["lang"]["zoo_math"], OFF_TASK_MAX),
        _at_most("base on zoo_math", s["base"]["zoo_math"], OFF_TASK_MAX),
        _at_most("base on zoo_lang", s["base"]["zoo_lang"], OFF_TASK_MAX),
        *(
            _at_most(f"{m} on zoo_math_lang", s[m]["zoo_math_lang"], OFF_TASK_MAX)
            for m in ("base", "math", "lang")
        ),
        _at_least(
            f"best merge ({best_merge}) minus best specialist on zoo_math_lang",
            s[best_merge]["zoo_math_lang"] - best_spec,
            MERGE_GAIN_MIN,
        ),
        _at_most(
            f"best merge ({best_merge}) on zoo_math_lang", s[best_merge]["zoo_math_lang"], MERGE_MAX
        ),
        _at_most(
            "task vector norm ratio (larger / smaller)",
            max(norms.values()) / max(1e-12, min(norms.values())),
            NORM_RATIO_MAX,
        ),
        _at_least(
            "moe routing spread (mean over layers of max - min share)",
            moe["routing_spread"],
            ROUTING_SPREAD_MIN,
        ),
        _at_least(
            "moe experts: distance to each other minus distance to the dense MLP",
            moe["expert_to_expert"] - moe["expert_to_dense"],
            0.0,
        ),
    ]
    return {
        "scores": scores,
        "best_merge": best_merge,
        "task_vector_norms": {k: round(v, 4) for k, v in norms.items()},
        "moe": moe,
        "criteria": [c.__dict__ for c in crit],
        "passed": all(c.passed for c in crit),
    }


def failures(report: dict[str, Any]) -> list[str]:
    """One line per missed criterion of a :func:`check` report."""
    return [
        f"{c['name']} is {c['value']}, needs {c['bound']}"
        for c in report["criteria"]
        if not c["passed"]
    ]


def summary(rows: Iterable[dict[str, Any]]) -> str:
    return "\n".join(
        f"{'ok ' if c['passed'] else 'MISS'} {c['name']}: {c['value']} ({c['bound']})" for c in rows
    )
