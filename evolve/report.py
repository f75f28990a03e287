"""What a run folder says: the best candidates, the winning recipe, fitness per generation.

``report(run)`` returns an :class:`EvolveReport` (data); ``format_report`` makes it text and
``plot_history`` draws fitness per generation (matplotlib, Agg, outside pyplot).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from splice.errors import SpliceError


@dataclass
class EvolveReport:
    """A run folder read back: ``top`` candidates (best first), the history, the best recipe."""

    run: Path
    generation: int
    generations: int
    evaluations: int
    failed: int
    stop: str | None
    top: list[dict[str, Any]]
    history: list[dict[str, Any]]
    best_recipe: str | None
    #: the grid of generation 0 (``search.grid``), best first: label and fitness
    grid: list[dict[str, Any]] | None = None
    #: cheaper fitness (``search.fitness``): items scored, candidates fully scored, the
    #: estimates' error against the full score
    items: dict[str, Any] | None = None

    def plot(self, path: str | os.PathLike[str] | None = None) -> Any:
        return plot_history(self.history, path)


def report(
    run: str | os.PathLike[str], *, top: int = 5, allow_pickle: bool = False
) -> EvolveReport:
    """Read ``run`` (its state: what the last finished generation left; an older splice's
    pickled state only with ``allow_pickle``)."""
    from splice.evolve.search import load_state

    run = Path(run)
    state = load_state(run, allow_pickle=allow_pickle)
    records = state["records"]
    ok = [r for r in records if r["fitness"] is not None]
    ranked = sorted(ok, key=lambda r: (-r["fitness"], r["generation"], r["index"]))
    best = run / "best.yml"
    grid = sorted(
        ({"label": r["grid"], "fitness": r["fitness"]} for r in ok if r.get("grid")),
        key=lambda g: -g["fitness"],
    )
    return EvolveReport(
        run=run,
        generation=state["generation"],
        generations=state["generations"],
        evaluations=len(records),
        failed=len(records) - len(ok),
        stop=state["stop"],
        top=ranked[:top],
        history=list(state["history"]),
        best_recipe=best.read_text() if best.is_file() else None,
        grid=grid or None,
        items=item_summary(records),
    )


def item_summary(records: list[dict[str, Any]]) -> dict[str, Any] | None:
    """Cheaper fitness's account: items scored against every candidate on the whole split,
    candidates fully scored, and the mean absolute error of the first estimate against the
    full score where both exist (after generation 0). ``None`` for a full-fitness run."""
    staged = [r for r in records if "full" in r and r["fitness"] is not None]
    if not staged:
        return None
    whole = max(r["items"] for r in staged if r["full"])
    errs = [
        abs(r["estimate"] - r["fitness"])
        for r in staged
        if r["full"] and r["generation"] > 0 and r.get("estimate") is not None
    ]
    scored = sum(r["items"] for r in staged)
    return {
        "items": scored,
        "all_items": whole * len(staged),
        "fewer_x": round(whole * len(staged) / scored, 2),
        "fully_scored": sum(r["full"] for r in staged),
        "candidates": len(staged),
        "estimate_mae": round(sum(errs) / len(errs), 4) if errs else None,
        "estimates_checked": len(errs),
    }


def format_report(rep: EvolveReport) -> str:
    """The report as text: status, the top candidates with their scores, the best recipe."""
    status = rep.stop or "unfinished (splice evolve resume RUN continues it)"
    lines = [
        f"run {rep.run}: generation {rep.generation}/{rep.generations}, "
        f"{rep.evaluations} candidates ({rep.failed} failed); {status}",
    ]
    if not rep.top:
        lines.append("no candidate scored yet")
        return "\n".join(lines)
    cols = list(dict.fromkeys(k for r in rep.top for k in r["scores"]))
    head = f"{'rank':>4}  {'gen':>4}  {'cand':>4}  {'fitness':>9}  "
    head += "  ".join(f"{c:>12}" for c in cols)
    head += f"  {'merge s':>7}  {'eval s':>7}"
    lines += ["", "best candidates:", head]
    for k, r in enumerate(rep.top, 1):
        scores = "  ".join(f"{r['scores'].get(c, math.nan):>12.4f}" for c in cols)
        lines.append(
            f"{k:>4}  {r['generation']:>4d}  {r['index']:>4d}  {r['fitness']:>9.4f}  "
            f"{scores}  {r.get('merge_s', math.nan):>7.3f}  {r.get('eval_s', math.nan):>7.3f}"
        )
    if rep.grid:
        g, best = rep.grid[0], rep.top[0]["fitness"]
        lines += [
            "",
            f"seeded grid (generation 0, {len(rep.grid)} points): best {g['label']} at "
            f"{g['fitness']:.4f}; the winner {best - g['fitness']:+.4f} on the fitness split "
            "(report --table scores them on the report split)",
        ]
    if rep.items:
        it = rep.items
        mae = (
            ""
            if it["estimate_mae"] is None
            else (
                f"; first estimates off the full score by {it['estimate_mae']:.4f} on average "
                f"({it['estimates_checked']} candidates)"
            )
        )
        lines += [
            "",
            f"cheaper fitness: {it['items']:,} items scored of {it['all_items']:,} "
            f"({it['fewer_x']:g}x fewer), {it['fully_scored']} of {it['candidates']} "
            f"candidates fully scored{mae}",
        ]
    if rep.best_recipe:
        lines += ["", "winning recipe (best.yml):", rep.best_recipe.rstrip()]
    return "\n".join(lines)


def plot_history(history: list[dict[str, Any]], path: str | os.PathLike[str] | None = None) -> Any:
    """Fitness per generation (best, mean, best so far) as a matplotlib ``Figure``; saved as
    PNG to ``path`` when given (atomically)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    fig = Figure(figsize=(6, 3.5))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    gens = [h["generation"] for h in history]

    def col(key: str) -> list[float]:
        return [math.nan if h.get(key) is None else h[key] for h in history]

    ax.plot(gens, col("best"), "o-", label="generation best")
    ax.plot(gens, col("mean"), "s--", label="generation mean")
    ax.plot(gens, col("best_so_far"), "-", label="best so far")
    ax.set_xlabel("generation")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel("fitness")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    fig.tight_layout()
    if path is not None:
        path = Path(path)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}.png")
        fig.savefig(tmp, dpi=100)
        os.replace(tmp, path)
    return fig


def read_candidates(run: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """``RUN/candidates.jsonl`` as records (``SpliceError``, one line, naming a bad line)."""
    path = Path(run) / "candidates.jsonl"
    if not path.is_file():
        raise SpliceError(f"{run}: not an evolve run folder (no candidates.jsonl)")
    out = []
    try:
        lines = path.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise SpliceError(f"{path}: cannot read it ({type(e).__name__})") from None
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except (ValueError, RecursionError):
            rec = None
        if not isinstance(rec, dict):
            raise SpliceError(f"{path}: line {n} is not a candidate record (a JSON object)")
        out.append(rec)
    return out


def read_best(run: str | os.PathLike[str]) -> dict[str, Any]:
    """``RUN/best.yml`` as a recipe dict (``SpliceError``, one line, if it is not one)."""
    path = Path(run) / "best.yml"
    if not path.is_file():
        raise SpliceError(f"{run}: no best.yml yet (no candidate has scored)")
    try:
        recipe = yaml.safe_load(path.read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        line = (str(e).strip().splitlines() or [""])[0]
        raise SpliceError(f"{path}: not a readable recipe ({type(e).__name__}: {line})") from None
    if not isinstance(recipe, dict):
        raise SpliceError(f"{path}: not a recipe (a mapping with merge_method)")
    return recipe


# ---- the report-split table ------------------------------------------------------------------
def naive_recipes(config: Any) -> dict[str, dict[str, Any]]:
    """The baselines a winner is compared with: every source alone, and the naive merges of
    the genome's models (linear with equal weights; the genome's method at its start point)."""
    from splice.evolve.genome import _label

    g = config.genome
    rows: dict[str, dict[str, Any]] = {}
    for ref in config.source_models():
        rows[_label(ref)] = {"merge_method": "passthrough", "models": [{"model": ref}]}
    if len(g.models) > 1:
        rows["linear (equal weights)"] = {
            "merge_method": "linear",
            "models": [{"model": m, "parameters": {"weight": 1 / len(g.models)}} for m in g.models],
            "dtype": config.dtype,
        }
    if g.space == "parameter" and g.merge_method != "linear":
        from splice.evolve.genome import build_genome
        from splice.evolve.search import start_point
        from splice.problems import open_models

        genome = build_genome(config, open_models(config.source_models()))
        rows[f"{g.merge_method} (start)"] = genome.recipe(start_point(config, genome))
    return rows


def grid_recipes(run: Path) -> dict[str, dict[str, Any]]:
    """``{"grid: LABEL": recipe}`` of the seeded grid of generation 0 (none without one)."""
    from splice.evolve.search import load_state

    return {
        f"grid: {r['grid']}": r["recipe"]
        for r in load_state(run)["records"]
        if r.get("grid") and r["recipe"] is not None
    }


def report_table(
    run: str | os.PathLike[str], tasks: list[str] | None = None
) -> dict[str, dict[str, float]]:
    """``{row: {task: score}}`` on the report tasks (``tasks``, else the config's report split):
    the sources, the naive merges, the seeded grid's points (``grid: ...``) and the winner
    (``best.yml``), each merged in memory."""
    import warnings

    from splice.errors import SpliceWarning
    from splice.evolve.config import EvolveConfig, TaskSpec
    from splice.evolve.scorer import TaskScorer
    from splice.evolve.search import CONFIG, config_threads
    from splice.merge.runner import MergeOptions, merge_into, plan
    from splice.modeling import load_tokenizer
    from splice.resident import empty_model

    run = Path(run)
    config = EvolveConfig.from_yaml(run / CONFIG)
    winner = read_best(run)
    names = tasks or config.report_split()
    if not names:
        raise SpliceError(
            "no report tasks: set report_tasks in the config or give --tasks (fitness tasks "
            "named X_fit report on X)"
        )
    fitted = [t.name for t in config.tasks if t.name in names]
    if fitted:
        warnings.warn(
            f"report task {fitted[0]} is also a fitness task", SpliceWarning, stacklevel=2
        )
    rows = naive_recipes(config)
    for label, recipe in grid_recipes(run).items():
        if recipe not in rows.values():  # (the start is a naive merge already)
            rows[label] = recipe
    rows["winner"] = winner
    opts = MergeOptions(device=config.device, show_progress=False, threads=config_threads(config))
    out: dict[str, dict[str, float]] = {}
    with TaskScorer(
        [TaskSpec(name=n) for n in names],
        tokenizer=load_tokenizer(config.tokenizer_ref()),
        args=config.lm_eval,
        tasks_dir=config.tasks_dir,
        zoo=config.zoo,
        seed=config.search.seed,
    ) as scorer:
        for label, recipe in rows.items():
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", SpliceWarning)
                p = plan(recipe, opts)
                module = empty_model(p.config, device=opts.device, dtype=config.dtype)
                merge_into(module, p, options=opts)
            out[label] = scorer.score(module)
    return out


def grid_standing(table: dict[str, dict[str, float]]) -> list[str]:
    """Per report task, where the winner stands against the seeded grid's points, e.g.
    ``zoo_math_lang: the winner 0.752, above 10 of 12 seeded points (best 0.766)``."""
    if "winner" not in table or not any(k.startswith("grid: ") for k in table):
        return []
    grid = {k: v for k, v in table.items() if k.startswith("grid: ") or k.endswith(" (start)")}
    out = []
    for task, won in table["winner"].items():
        points = [row[task] for row in grid.values() if task in row]
        below = sum(p < won for p in points)
        out.append(
            f"{task}: the winner {won:.4f}, above {below} of {len(points)} seeded points "
            f"(best {max(points):.4f})"
        )
    return out


def format_table(table: dict[str, dict[str, float]]) -> str:
    """One row per model, one column per task."""
    cols = list(dict.fromkeys(c for row in table.values() for c in row))
    width = max([5, *(len(r) for r in table)])
    lines = [f"{'model':<{width}}  " + "  ".join(f"{c:>14}" for c in cols)]
    for label, row in table.items():
        cells = "  ".join(f"{row.get(c, math.nan):>14.4f}" for c in cols)
        lines.append(f"{label:<{width}}  {cells}")
    return "\n".join(lines)
