"""The search: CMA-ES (pycma, ask/tell) over a genome, candidates merged and scored in memory,
the run folder written atomically after every generation.

``evolve(config, out)`` runs a search into the run folder ``out``; ``resume(out)`` continues it
to exactly the result an uninterrupted run gives. ``resume(out, generations=N)`` (or
``max_fevals=N``, or ``evolve`` again with a larger budget) extends a run, finished or not, to
the result an uninterrupted run with that budget gives; ``config.yml`` and the state then record
the new budget. The run folder::

    config.yml        the configuration (CLI overrides applied); the run belongs to it
    state.json        the whole state after the last finished generation, as data: every scored
                      candidate, the per-generation history, why it stopped (see
                      ``splice.evolve.state``: the CMA-ES strategy is rebuilt by replay)
    candidates.jsonl  one line per scored candidate: generation, index, genes, recipe,
                      per-task scores, fitness, merge and evaluation seconds, error
    best.yml          the best recipe so far, runnable by ``splice merge best.yml OUT``
    history.json      per generation: best, mean, best so far, evaluations, seconds
    fitness.png       fitness per generation (written when the run ends)

Every file is written to a temporary name and renamed into place (``os.replace``), state first;
a kill loses at most the generation in flight, and a new run folder appears whole or not at all.
CMA-ES samples from a private random stream (``splice.evolve.state.Strategy``), so whatever the
evaluation does with numpy's generators, the samples are the same. Nothing in a run folder is
unpickled (an older splice's ``state.pkl`` only with ``allow_pickle``).

One resident model: the sources are :class:`~splice.resident.ResidentCheckpoint` s (read once,
then kept in memory on the device), the module is built once with
:func:`~splice.resident.empty_model`, and each candidate's recipe is merged into it in place
with :func:`~splice.merge.merge_into`; lm-eval's tasks are loaded once and ``HFLM`` wraps the
live module. Nothing is read from disk or written per candidate after the first.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import os
import shutil
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

import numpy as np
import yaml

from splice.errors import SpliceError, SpliceWarning
from splice.evolve.config import MAX_CANDIDATES, EvolveConfig
from splice.evolve.genome import Genome, build_genome, check_genome
from splice.evolve.state import STATE, Search, dumps, is_run, new_state, replay
from splice.evolve.state import load as _load
from splice.text import plural

if TYPE_CHECKING:
    import torch

    from splice.evolve.scorer import TaskScorer
    from splice.merge.runner import MergeOptions

CONFIG = "config.yml"
DEFAULT_MAX_FEVALS = 100  # mergekit-evolve's default
#: the config keys a run may change after it began: its budget (the run is then extended)
BUDGET = ("search.generations", "search.max_fevals")
MAX_WORKERS = 1024


def default_popsize(dim: int) -> int:
    """CMA-ES's default population: 4 + floor(3 ln d)."""
    return 4 + math.floor(3 * math.log(dim))


def default_patience(dim: int, popsize: int) -> int:
    """Generations without a better candidate before a restart: 10 + ceil(30 d / popsize)
    (pycma's ``tolstagnation`` is 100 + 100 d^1.5 / popsize: too long for a user's budget; a
    noisy fitness plateaus for a few generations while CMA-ES still adapts)."""
    return 10 + math.ceil(30 * dim / popsize)


@dataclass
class EvolveResult:
    """Where a search stands: the best candidate so far and how far it got."""

    run: Path
    generation: int
    generations: int
    evaluations: int
    best_genes: list[float] | None
    best_fitness: float | None
    best_scores: dict[str, float] | None
    best_recipe: dict[str, Any] | None
    stop: str | None = None
    history: list[dict[str, Any]] = field(default_factory=list)

    @property
    def done(self) -> bool:
        return self.stop is not None


# ---- the in-memory candidate path ----------------------------------------------------------------
class Candidates:
    """Merges and scores candidates in one resident module (see the module docstring)."""

    def __init__(
        self,
        config: EvolveConfig,
        genome: Genome,
        sources: dict[str, Any],
        scorer: TaskScorer,
        options: MergeOptions,
    ) -> None:
        self.config, self.genome, self.sources = config, genome, sources
        self.scorer, self.options = scorer, options
        self.module: torch.nn.Module | None = None
        self.paths: Any = None  # PathModels, for data-flow genomes
        self._racer: Any = None

    def merge(self, x: np.ndarray) -> dict[str, Any]:
        """Merge genes ``x`` ``[d]`` into the resident module (data-flow genes: point the path
        model at the path's shared layers; genes that drop layers or experts: merge into the
        module's view of the kept ones, ``splice.evolve.pruning``); returns the recipe."""
        from splice.merge.runner import merge_into, plan
        from splice.resident import empty_model

        recipe = self.genome.recipe(x)
        if recipe.get("layer_path"):
            from splice.evolve.dataflow import PathModels

            if self.paths is None:
                self.paths = PathModels(
                    self.sources, self.genome.donor, self.options, self.config.dtype
                )
                for src in self.sources.values():
                    src.release()  # the modules hold the weights now
            self.module = self.paths.build(recipe["layer_path"], donor=recipe["base_model"])
            return recipe
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", SpliceWarning)
            p = plan(recipe, self.options, self.sources)
            kept = getattr(self.genome, "kept_layers", None)  # a genome that drops layers
            if self.module is None:
                full = p  # the module has every layer
                if kept is not None:
                    full = plan(
                        self.genome.recipe(self.genome.keep_all(x)), self.options, self.sources
                    )
                self.module = empty_model(
                    full.config, device=self.options.device, dtype=self.config.dtype
                )
            if kept is not None:
                from splice.evolve.pruning import show_experts, show_layers

                show_layers(self.module, kept(x), self.sources, self.genome.donor)
                if getattr(self.genome, "moe", None) is not None:
                    show_experts(self.module, p)
            merge_into(self.module, p, self.sources, self.options)
        return recipe

    @functools.cached_property
    def items(self) -> int | None:
        """Items of the whole fitness split (``None`` where a task is a group)."""
        try:
            return sum(len(ids) for ids in self.scorer.fitness_docs().values())
        except (KeyError, TypeError, AttributeError):
            return None

    @property
    def racer(self) -> Any:
        """The staged scorer of ``search.fitness: subset | irt`` (``splice.evolve.fitness``)."""
        if self._racer is None:
            from splice.evolve.fitness import Racer

            s = self.config.search  # (open_scorer checked the metrics)
            self._racer = Racer(self.scorer, s.subset, s.race_z, s.seed)
        return self._racer

    def evaluate(self, x: np.ndarray, context: dict[str, Any] | None = None) -> dict[str, Any]:
        """One candidate's record; a merge or evaluation that fails scores NaN (worst) and
        keeps its error. ``context`` (cheaper fitness): the generation's ``bar`` and ``irt``
        model (:func:`race_context`)."""
        rec: dict[str, Any] = {"genes": [float(v) for v in x], "recipe": None, "scores": {}}
        t0 = time.perf_counter()
        try:
            rec["recipe"] = self.genome.recipe(x)
            self.merge(x)
            t1 = time.perf_counter()
            rec["merge_s"] = round(t1 - t0, 4)
            assert self.module is not None
            size = getattr(self.genome, "size", None)  # genomes that shrink the model
            penalty = 0.0
            if size is not None:
                rec["size"] = float(size(x))
                penalty = self.config.search.size_weight * rec["size"]
            if self.config.search.fitness == "full":
                rec["scores"] = self.scorer.score(self.module)
                rec["items"] = self.items
                fit = self.scorer.fitness(rec["scores"])
            else:
                from splice.evolve.fitness import IRT

                ctx = context or {}
                irt = IRT.from_dict(ctx["irt"]) if ctx.get("irt") else None
                rec.update(self.racer.run(self.module, ctx.get("bar"), irt, -penalty))
                if self.config.search.fitness != "irt":
                    rec.pop("item_scores", None)  # only the item model is fitted on them
                fit = rec["fitness"]
            rec["eval_s"] = round(time.perf_counter() - t1, 4)
            fit -= penalty
            if not math.isfinite(fit):
                raise ValueError("the fitness is not a finite number")
            rec["fitness"], rec["error"] = fit, None
        except Exception as e:  # a failed candidate scores worst; the run goes on
            lines = str(e).strip().splitlines()
            rec["fitness"] = None
            rec["error"] = f"{type(e).__name__}: {lines[0] if lines else ''}".rstrip(": ")
            rec.setdefault("merge_s", round(time.perf_counter() - t0, 4))
        return rec


def _sources(config: EvolveConfig, device: str, allow_pickle: bool = False) -> dict[str, Any]:
    from splice.problems import open_models
    from splice.resident import ResidentCheckpoint

    opened = open_models(config.source_models(), allow_pickle=allow_pickle)
    return {
        ref: ResidentCheckpoint.of(ckpt, device=device, dtype=config.dtype)
        for ref, ckpt in opened.items()
    }


def with_winners(config: EvolveConfig, *, allow_pickle: bool = False) -> EvolveConfig:
    """Parameter space + data flow in sequence: a genome model (or base) that is an evolve run
    folder stands for that run's winner, ``RUN/winner``, written once from ``RUN/best.yml`` by
    ``splice merge`` (the one model a search writes; its candidates stay in memory). Returns
    the config naming the winners' folders. Every run folder's state is read (and checked:
    no pickle unless ``allow_pickle``) before anything is merged."""
    from splice.merge.runner import MergeOptions
    from splice.merge.runner import run as merge_run

    runs = {
        ref: load_state(Path(ref), allow_pickle=allow_pickle)
        for ref in config.source_models()
        if is_run(ref)
    }
    winners: dict[str, str] = {}
    for ref, state in runs.items():
        folder = Path(ref)
        winner = folder / "winner"
        if not (winner / "config.json").is_file():
            if not (folder / "best.yml").is_file():
                raise SpliceError(f"{ref}: an evolve run with no scored candidate yet")
            if state["stop"] is None:
                warnings.warn(
                    f"{ref} is unfinished; its best candidate so far is used",
                    SpliceWarning,
                    stacklevel=3,
                )
            merge_run(folder / "best.yml", winner, MergeOptions(show_progress=False))
        winners[ref] = str(winner)
    if not winners:
        return config
    g = config.genome
    genome = g.model_copy(
        update={
            "models": [winners.get(m, m) for m in g.models],
            "base_model": winners.get(g.base_model, g.base_model) if g.base_model else None,
        }
    )
    return config.model_copy(update={"genome": genome})


def prepare(
    config: EvolveConfig, *, allow_pickle: bool = False
) -> tuple[Genome, dict[str, Any], MergeOptions]:
    """Check everything that can be checked without reading a tensor: the device, the models'
    headers, the genome's size, start and bounds, and the search's budget. Returns (genome,
    sources, merge options)."""
    from splice.devices import resolve_device
    from splice.merge.runner import MergeOptions

    device = resolve_device(config.device)
    options = MergeOptions(device=device, show_progress=False, threads=config_threads(config))
    sources = _sources(config, device, allow_pickle)
    genome = build_genome(config, sources)
    popsize = popsize_of(config, genome)
    generations = planned(config, genome)
    total = generations * popsize
    if total > MAX_CANDIDATES:
        raise SpliceError(
            f"search: {generations} generations of {popsize} "
            f"candidates is {total:,} candidates, more than {MAX_CANDIDATES:,}; lower "
            "search.generations, search.max_fevals or search.popsize"
        )
    check_genome(genome, sources, options, start_point(config, genome))
    return genome, sources, options


def check_finite_sources(sources: dict[str, Any]) -> None:
    """Read every source onto its device (where the search keeps them) and refuse one with NaN
    or inf weights: every candidate merged from it would score as noise."""
    from splice.finite import check_finite

    for ref, src in sources.items():
        for name in src.tensors:
            check_finite(
                src.load(name),
                f"model {ref}: {name}",
                why="a model with NaN or inf weights cannot be merged into candidates",
            )


def config_threads(config: EvolveConfig) -> int | None:
    return 1 if config.device == "cpu" else None


def start_point(config: EvolveConfig, genome: Genome) -> np.ndarray:
    s = config.search
    return genome.start(s.start, random_init=config.random_init, seed=s.seed)


def with_budget(
    config: EvolveConfig, *, max_fevals: int | None = None, generations: int | None = None
) -> EvolveConfig:
    """``config`` with its budget replaced by ``max_fevals`` or ``generations`` (``None``:
    unchanged; not both)."""
    if max_fevals is not None and generations is not None:
        raise SpliceError("give a budget of max_fevals or of generations, not both")
    if generations is None:
        return config.with_overrides(max_fevals=max_fevals)
    data = config.model_dump(mode="json")
    data["search"].update(generations=generations, max_fevals=None)
    return EvolveConfig.from_dict(data)


def check_budget(run: Path, state: dict[str, Any], config: EvolveConfig) -> None:
    """``config``'s budget can extend the run in ``state``: it is more than the run has spent,
    and CMA-ES did not stop the run itself (else ``SpliceError``, one line)."""
    stop = state["stop"] or ""
    if stop.startswith("cma:"):
        raise SpliceError(
            f"{run}: CMA-ES stopped this search itself after generation {state['generation']} "
            f"({stop}); a larger budget would not continue it"
        )
    s, gen, n = config.search, state["generation"], len(state["records"])
    if s.generations is not None and s.generations <= gen:
        raise SpliceError(
            f"{run}: {plural(gen, 'generation')} done already; a budget of "
            f"{plural(s.generations, 'generation')} is not more (give a larger one)"
        )
    fevals = s.max_fevals or DEFAULT_MAX_FEVALS
    if s.generations is None and fevals <= n:
        raise SpliceError(
            f"{run}: {plural(n, 'candidate')} scored already; a budget of max_fevals {fevals} is not "
            "more (give a larger one)"
        )


def _extend(run: Path, config: EvolveConfig, state: dict[str, Any], generations: int) -> None:
    """Move the run to ``config``'s budget of ``generations``: ``config.yml`` first, then
    ``state`` (saved by the caller). A kill in between leaves a ``config.yml`` whose budget is
    not the state's: the next resume extends again, to the same result."""
    _write(run / CONFIG, config.to_yaml().encode())
    state.update(
        config=config.model_dump(mode="json"),
        fingerprint=config.fingerprint(),
        generations=generations,
        stop=None,
    )


def planned_generations(config: EvolveConfig, popsize: int, grid: int = 0) -> int:
    """Generations the run makes at most (``grid``: the points of generation 0); it stops
    earlier when CMA-ES stops with no restart left, or once ``max_fevals`` candidates are
    scored (restarts' larger populations spend it in fewer generations)."""
    s = config.search
    if s.generations is not None:
        return s.generations
    fevals = s.max_fevals or DEFAULT_MAX_FEVALS
    if grid:
        return 1 + math.ceil(max(0, fevals - grid) / popsize)
    return math.ceil(fevals / popsize)


def fevals_budget(config: EvolveConfig) -> int | None:
    """The candidates a run scores at most (``None``: it counts generations)."""
    s = config.search
    return None if s.generations is not None else (s.max_fevals or DEFAULT_MAX_FEVALS)


def planned(config: EvolveConfig, genome: Genome) -> int:
    """:func:`planned_generations` of ``config`` over ``genome``."""
    return planned_generations(config, popsize_of(config, genome), len(grid_points(config, genome)))


# ---- the strategy ----------------------------------------------------------------------------------
def popsize_of(config: EvolveConfig, genome: Genome) -> int:
    return config.search.popsize or default_popsize(genome.dim)


def grid_points(config: EvolveConfig, genome: Genome) -> list[tuple[str, np.ndarray]]:
    """Generation 0 of a search with ``search.grid``: the start, then the genome's grid
    (points equal to the start left out); empty without ``grid``."""
    if not config.search.grid:
        return []
    x0 = start_point(config, genome)
    grid = getattr(genome, "grid", None)
    points = [(label, x) for label, x in (grid() if grid else []) if not np.array_equal(x, x0)]
    return [("start", x0), *points]


def strategy_of(run: Path, config: EvolveConfig, genome: Genome, state: dict[str, Any]) -> Search:
    """The search where ``state`` left it (replayed; see ``splice.evolve.state``)."""
    s, popsize = config.search, popsize_of(config, genome)
    search = Search(
        start_point(config, genome),
        s.sigma0,
        popsize,
        s.seed,
        state["generations"],
        grid=grid_points(config, genome),
        restarts=s.restarts,
        patience=s.patience or default_patience(genome.dim, popsize),
        max_restarts=s.max_restarts,
    )
    return replay(state, search, run / STATE)


# ---- the run folder --------------------------------------------------------------------------------
def _write(path: Path, data: bytes) -> None:
    """Write ``path`` atomically: a temporary file beside it, then ``os.replace``. A full or
    read-only disk is one line (``splice.target.os_error``), and leaves neither the temporary
    file nor a partial ``path``: the file is as it was before."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        from splice.target import os_error

        with contextlib.suppress(OSError):
            tmp.unlink()
        raise os_error(path, e, "write") from None


def _clean_leftovers(run: Path) -> None:
    """Remove the temporary files of killed runs (``.NAME.tmp-PID``, PID no longer alive)."""
    from splice.target import pid_alive

    for tmp in run.glob(".*.tmp-*"):
        pid = tmp.name.rsplit("-", 1)[-1].split(".", 1)[0]
        if not pid.isdigit() or pid_alive(int(pid)):
            continue
        with contextlib.suppress(OSError):
            tmp.unlink()


def _best(records: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The fully scored record with the highest fitness (the earliest among equals)."""
    best = None
    for r in records:
        if r["fitness"] is None or not r.get("full", True):
            continue  # (a candidate stopped early: its estimate is below the best)
        if best is None or r["fitness"] > best["fitness"]:
            best = r
    return best


def best_yaml(rec: dict[str, Any]) -> str:
    head = (
        f"# splice evolve: best candidate (generation {rec['generation']}, index "
        f"{rec['index']}, fitness {rec['fitness']:.6g}); run with `splice merge THIS OUT`\n"
    )
    return head + yaml.safe_dump(rec["recipe"], sort_keys=False)


def save(run: Path, state: dict[str, Any]) -> None:
    """The run folder's files from ``state``: ``state.json`` first, so that a view (what an
    observer polls) never shows a generation the state lacks; a resume rewrites the views."""
    _write(run / STATE, dumps(state))
    lines = "".join(json.dumps(r) + "\n" for r in state["records"])
    _write(run / "candidates.jsonl", lines.encode())
    _write(run / "history.json", (json.dumps(state["history"], indent=1) + "\n").encode())
    best = _best(state["records"])
    if best is not None:
        _write(run / "best.yml", best_yaml(best).encode())


def load_state(run: str | os.PathLike[str], *, allow_pickle: bool = False) -> dict[str, Any]:
    """The checked state of a run folder (``splice.evolve.state.load``)."""
    return _load(run, allow_pickle=allow_pickle)


def _result(run: Path, state: dict[str, Any]) -> EvolveResult:
    best = _best(state["records"])
    return EvolveResult(
        run=run,
        generation=state["generation"],
        generations=state["generations"],
        evaluations=len(state["records"]),
        best_genes=best["genes"] if best else None,
        best_fitness=best["fitness"] if best else None,
        best_scores=best["scores"] if best else None,
        best_recipe=best["recipe"] if best else None,
        stop=state["stop"],
        history=list(state["history"]),
    )


def _refuse_other(run: Path, config: EvolveConfig, state: dict[str, Any]) -> None:
    """Refuse a run folder of another configuration; one that differs only in its
    :data:`BUDGET` is extended (by ``_run``)."""
    if state["fingerprint"] == config.fingerprint():
        return
    try:
        changed = EvolveConfig.from_dict(state["config"]).differences(config)
    except SpliceError:
        changed = ["?"]
    if set(changed) <= set(BUDGET):  # the budget, or nothing (a fingerprint of older keys)
        return
    raise SpliceError(
        f"{run} holds a run of another configuration (changed: {', '.join(changed[:4])}"
        f"{', ...' if len(changed) > 4 else ''}); use a new --out folder"
    )


# ---- the loop ----------------------------------------------------------------------------------------
Progress = Callable[[dict[str, Any]], None]


def evolve(
    config: EvolveConfig | str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    max_fevals: int | None = None,
    generations: int | None = None,
    device: str | None = None,
    tasks_dir: str | os.PathLike[str] | None = None,
    show_progress: bool = False,
    on_generation: Progress | None = None,
    workers: int = 1,
    ray: str | None = None,
    allow_pickle: bool = False,
) -> EvolveResult:
    """Run the search of ``config`` (an :class:`EvolveConfig` or a YAML file) into the run
    folder ``out``. An existing run folder of the same configuration is resumed (extended, when
    only the budget is larger); one of another is refused. ``max_fevals`` or ``generations``,
    ``device`` and ``tasks_dir`` override the config's; ``show_progress``: see
    :class:`GenerationProgress`; ``workers``
    processes score the candidates, or ``workers`` Ray actors with ``ray`` (``auto``, an
    address; a Ray instance this process started is used as it is); the result does not depend
    on either. ``allow_pickle``: read an older splice's ``state.pkl`` (and pickled weights)."""
    from splice.target import check_target, clean_stale, commit, lock_target, staging_dir

    check_run_options(workers, ray)
    if not isinstance(config, EvolveConfig):
        config = EvolveConfig.from_yaml(config)
    config = config.with_paths(Path.cwd())  # the run folder's config names absolute paths
    config = config.with_overrides(device=device, tasks_dir=tasks_dir)
    config = with_budget(config, max_fevals=max_fevals, generations=generations)
    run = Path(out)
    if is_run(run):
        state = load_state(run, allow_pickle=allow_pickle)
        with contextlib.suppress(SpliceError):  # a state of another schema: refused below
            config = config.for_run(EvolveConfig.from_dict(state["config"]))
        _refuse_other(run, config, state)
    elif run.exists() and (not run.is_dir() or any(run.iterdir())):
        raise SpliceError(f"{run}: exists and is not an evolve run folder; use a new --out")
    else:
        check_target(run, overwrite=True, inputs=config.source_models())
        config = config.for_run()
    config = with_winners(config, allow_pickle=allow_pickle)
    for line in config.split_warnings():
        warnings.warn(line, SpliceWarning, stacklevel=2)
    with lock_target(run):
        if is_run(run):
            return _run(run, config, show_progress, on_generation, workers, ray, allow_pickle)
        clean_stale(run)
        genome, sources, options = prepare(config, allow_pickle=allow_pickle)  # all checked
        check_finite_sources(sources)
        scorer = open_scorer(config)
        try:  # the folder appears whole (config and state) or not at all
            tmp = staging_dir(run, "evolve")
            try:
                _write(tmp / CONFIG, config.to_yaml().encode())
                save(tmp, new_state(config, planned(config, genome)))
                commit(tmp, run, tag="evolve")
            finally:
                if tmp.exists():
                    shutil.rmtree(tmp, ignore_errors=True)
        except BaseException:
            scorer.close()
            raise
        prepared = (genome, sources, options, scorer)
        return _run(run, config, show_progress, on_generation, workers, ray, allow_pickle, prepared)


def resume(
    run: str | os.PathLike[str],
    *,
    max_fevals: int | None = None,
    generations: int | None = None,
    show_progress: bool = False,
    on_generation: Progress | None = None,
    workers: int = 1,
    ray: str | None = None,
    allow_pickle: bool = False,
) -> EvolveResult:
    """Continue the run in ``run`` from its last finished generation (its ``config.yml``; a
    config changed since the run began is refused). A budget of ``max_fevals`` or
    ``generations`` extends the run, finished or not, to what an uninterrupted run with that
    budget gives; one not more than the run has spent is refused."""
    from splice.target import lock_target

    check_run_options(workers, ray)
    run = Path(run)
    state = load_state(run, allow_pickle=allow_pickle)
    config = EvolveConfig.from_yaml(run / CONFIG)
    if max_fevals is not None or generations is not None:
        config = with_budget(config, max_fevals=max_fevals, generations=generations)
        check_budget(run, state, config)  # the same budget as the run's too
    _refuse_other(run, config, state)
    with lock_target(run):
        return _run(run, config, show_progress, on_generation, workers, ray, allow_pickle)


def check_run_options(workers: int, ray: str | None) -> None:
    """``workers`` and ``ray`` make sense (before anything is read or written)."""
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise SpliceError(f"workers must be a whole number, 1 or more, got {workers!r}")
    if workers > MAX_WORKERS:
        raise SpliceError(f"workers {workers} is more than {MAX_WORKERS}")
    if ray is not None:
        from splice.evolve.executors import check_ray_address

        check_ray_address(ray, reach=True)


def open_scorer(config: EvolveConfig) -> TaskScorer:
    """The config's tasks loaded (unknown tasks and metrics are refused here)."""
    from splice.evolve.scorer import TaskScorer
    from splice.modeling import load_tokenizer

    scorer = TaskScorer(
        config.tasks,
        tokenizer=load_tokenizer(config.tokenizer_ref()),
        args=config.lm_eval,
        tasks_dir=config.tasks_dir,
        zoo=config.zoo,
        seed=config.search.seed,
    )
    if config.search.fitness != "full":
        try:
            scorer.check_items(f"search.fitness {config.search.fitness}")
        except BaseException:
            scorer.close()
            raise
    return scorer


def _run(
    run: Path,
    config: EvolveConfig,
    show_progress: bool,
    on_generation: Progress | None,
    workers: int,
    ray: str | None,
    allow_pickle: bool,
    prepared: tuple[Genome, dict[str, Any], MergeOptions, TaskScorer] | None = None,
) -> EvolveResult:
    """The loop, with ``run`` locked: generations until the state says stop."""
    from splice.evolve.executors import InProcess, RayActors, Workers

    _clean_leftovers(run)
    state = load_state(run, allow_pickle=allow_pickle)
    extend = False  # the budget only differs (_refuse_other refused anything else)
    if state["fingerprint"] != config.fingerprint():
        changed = EvolveConfig.from_dict(state["config"]).differences(config)
        extend = bool(changed)
        if not extend:  # the same config under an older fingerprint rule: the current one
            state["fingerprint"] = config.fingerprint()
    if extend:
        check_budget(run, state, config)
    elif state["stop"] is not None:
        if prepared is not None:
            prepared[3].close()
        return _result(run, state)
    if prepared is None:
        genome, sources, options = prepare(config, allow_pickle=allow_pickle)
        check_finite_sources(sources)
        scorer = open_scorer(config)
    else:
        genome, sources, options, scorer = prepared
    with scorer:
        if extend:
            _extend(run, config, state, planned(config, genome))
        strategy = strategy_of(run, config, genome, state)
        stop = strategy.stop() if extend and state["generation"] else {}
        if stop:  # the run stopped by its budget where CMA-ES would have stopped it
            state["stop"] = "cma: " + ", ".join(sorted(stop))
        save(run, state)  # the views match the state again (a kill may have left newer ones)
        if ray is not None or workers > 1:
            for src in sources.values():
                src.release()  # read for the checks; each worker keeps its own
        if ray is not None:
            scorer.close()  # checked; each actor loads its own
            executor: Any = RayActors(config, workers, ray)
        elif workers > 1:
            scorer.close()  # checked; each worker loads its own
            executor = Workers(config, workers)
        else:
            executor = InProcess(Candidates(config, genome, sources, scorer, options))
        race = RaceContext(config)
        shown = GenerationProgress(state) if show_progress else None
        try:
            while state["stop"] is None:
                _generation(state, strategy, executor.map, fevals_budget(config), race)
                save(run, state)
                if on_generation is not None:
                    on_generation(state["history"][-1])
                if shown is not None:
                    shown.update(state["history"][-1])
        finally:
            executor.close()
            if shown is not None:
                shown.close()
    with contextlib.suppress(Exception):
        from splice.evolve.report import plot_history

        plot_history(state["history"], run / "fitness.png")
    return _result(run, state)


class RaceContext:
    """What cheaper fitness (``search.fitness: subset | irt``) gives a generation's candidates:
    ``bar``, the best fully scored fitness before the generation (``None`` in the first, whose
    candidates are all fully scored), and, for ``irt``, the item model fitted on every fully
    scored candidate before the generation (refitted when there are more; as data: it goes to
    workers). Called with the state before each generation; ``None`` for ``full``."""

    def __init__(self, config: EvolveConfig) -> None:
        self.s = config.search
        self.irt: dict[str, Any] | None = None
        self._fitted_on = 0

    def __call__(self, state: dict[str, Any]) -> dict[str, Any] | None:
        if self.s.fitness == "full":
            return None
        best = _best(state["records"])
        bar = best["fitness"] if best is not None else None
        if self.s.fitness == "irt" and state["generation"] > 0:
            from splice.evolve.fitness import fit_irt, responses

            scored = [r for r in state["records"] if r.get("item_scores")]
            if len(scored) > self._fitted_on:
                got = responses(scored)
                ids = {col: list(range(v.shape[1])) for col, v in got.items()}
                self.irt = fit_irt(got, ids, self.s.subset).to_dict()
                self._fitted_on = len(scored)
        return {"bar": bar, "irt": self.irt}


class GenerationProgress:
    """A search's progress on ``stream`` (default: stderr) by :mod:`splice.progress`'s rule: a
    bar on a terminal (best, mean and rate as its status); anywhere else one plain line per
    generation (:func:`generation_line`), never a ``\\r``."""

    def __init__(self, state: dict[str, Any], stream: TextIO | None = None) -> None:
        from splice.progress import Progress

        self.total = state["generations"]
        self.p = Progress(self.total, "evolve", unit="gen", initial=state["generation"],
                          stream=stream, every_s=float("inf"))  # fmt: skip

    def update(self, h: dict[str, Any]) -> None:
        """Show the generation whose history entry is ``h``."""
        status = f"best {h['best_so_far']:.4g} mean {h['mean']:.4g} {h['per_minute']:.1f}/min"
        self.p.update(1, status=status)
        if self.p.bar is None:
            self.p.line(generation_line(h, self.total, self.p.elapsed))

    def close(self) -> None:
        self.p.close()


def generation_line(h: dict[str, Any], total: int, elapsed: float) -> str:
    """A generation's history entry ``h`` as one log line, e.g. ``generation 3/10: best
    0.712, mean 0.655, 12 candidates, 41 s`` (best so far; candidates scored so far; time since
    this process started the loop)."""
    failed = f" ({h['failed']} failed)" if h.get("failed") else ""
    return (
        f"generation {h['generation'] + 1}/{total}: best {h['best_so_far']:.4g}, mean "
        f"{h['mean']:.4g}, {h['evaluations']} candidates{failed}, {_duration(elapsed)}"
    )


def _duration(seconds: float) -> str:
    """``41 s``, ``12 min 05 s``, ``2 h 03 min``."""
    s = round(seconds)
    if s < 60:
        return f"{s} s"
    m, s = divmod(s, 60)
    if m < 60:
        return f"{m} min {s:02d} s"
    h, m = divmod(m, 60)
    return f"{h} h {m:02d} min"


def _generation(
    state: dict[str, Any],
    strategy: Search,
    score: Callable[[list[np.ndarray], dict[str, Any] | None], list[dict[str, Any]]],
    max_fevals: int | None = None,
    context: Callable[[dict[str, Any]], dict[str, Any] | None] = lambda state: None,
) -> None:
    """Ask, score (``score(xs, context(state))``: one record per genes, in order), tell: one
    generation, recorded in ``state``; the run stops after it once ``max_fevals`` candidates
    are scored."""
    t0 = time.perf_counter()
    labels, restart = strategy.labels, strategy.restart
    xs = strategy.ask()
    gen = state["generation"]
    records = []
    for i, done in enumerate(score(xs, context(state))):
        rec = {"generation": gen, "index": i, **done}
        if labels[i] is not None:
            rec["grid"] = labels[i]
        if rec["error"]:
            warnings.warn(
                f"candidate {gen}.{i} failed: {rec['error']}", SpliceWarning, stacklevel=2
            )
        records.append(rec)
    fits = [r["fitness"] for r in records if r["fitness"] is not None]
    strategy.tell(xs, records)
    state["records"].extend(records)
    state["generation"] = gen + 1
    best = _best(state["records"])
    seconds = time.perf_counter() - t0
    state["history"].append(
        {
            "generation": gen,
            "best": max(fits) if fits else None,
            "mean": float(np.mean(fits)) if fits else math.nan,
            "best_so_far": best["fitness"] if best else math.nan,
            "failed": len(records) - len(fits),
            "evaluations": len(state["records"]),
            "seconds": round(seconds, 3),
            "per_minute": round(60 * len(records) / seconds, 2) if seconds > 0 else 0.0,
            "sigma": strategy.sigma,
            "restart": restart,
            "popsize": len(xs),
        }
    )
    if state["generation"] >= state["generations"]:
        state["stop"] = f"{state['generations']} generations done"
    elif max_fevals is not None and len(state["records"]) >= max_fevals:
        state["stop"] = f"{len(state['records'])} candidates scored (max_fevals {max_fevals})"
    else:
        stop = strategy.stop()
        if stop:
            state["stop"] = "cma: " + ", ".join(sorted(stop))
