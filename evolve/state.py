"""A run folder's state as data: ``state.json``, validated on read, the CMA-ES strategy
rebuilt by replaying the recorded generations.

``state.json`` holds what a search did, never an object: the config and its fingerprint, the
generation count, every scored candidate (its genes, recipe, scores, fitness, error), the
per-generation history and why the run stopped. The CMA-ES strategy is not stored: it is a
deterministic function of the config, the genome and the costs told to it, so
:func:`replay` builds a new ``cma.CMAEvolutionStrategy`` from the config's seed and, for each
finished generation, asks (checking that it proposes exactly the recorded genes) and tells the
recorded costs. A resumed run is therefore the uninterrupted run, bit for bit, and a state file
that was edited, or whose models changed underneath it, is refused instead of silently
continued.

Nothing in a run folder is unpickled: run folders are what people share. A ``state.pkl`` left
by an older splice is read only with ``allow_pickle=True`` (the CLI's ``--allow-pickle``), and
then converted to ``state.json`` on the next save.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from splice.errors import SpliceError

if TYPE_CHECKING:
    from splice.evolve.config import EvolveConfig

STATE = "state.json"
#: what an older splice kept (a pickle): read only with ``allow_pickle``
LEGACY_STATE = "state.pkl"
FORMAT = "splice-evolve-state"
VERSION = 1


# ---- the schema ----------------------------------------------------------------------------------
class _Record(BaseModel):
    """One scored candidate (extra keys are kept: timings, future fields)."""

    model_config = ConfigDict(extra="allow", strict=True)

    generation: int = Field(ge=0)
    index: int = Field(ge=0)
    genes: list[float]
    recipe: dict[str, Any] | None
    scores: dict[str, float | None]
    fitness: float | None
    error: str | None


class _History(BaseModel):
    model_config = ConfigDict(extra="allow")

    generation: int = Field(ge=0)


class _State(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    format: str
    version: int
    fingerprint: str
    config: dict[str, Any]
    generation: int = Field(ge=0)
    generations: int = Field(ge=1)
    records: list[_Record]
    history: list[_History]
    stop: str | None


def new_state(config: EvolveConfig, generations: int) -> dict[str, Any]:
    """The state of a run that has scored nothing yet."""
    return {
        "format": FORMAT,
        "version": VERSION,
        "fingerprint": config.fingerprint(),
        "config": config.model_dump(mode="json"),
        "generation": 0,
        "generations": generations,
        "records": [],
        "history": [],
        "stop": None,
    }


def dumps(state: dict[str, Any]) -> bytes:
    """``state`` as the bytes of ``state.json``."""
    return (json.dumps(state, separators=(",", ":")) + "\n").encode()


def is_run(folder: str | os.PathLike[str]) -> bool:
    """Whether ``folder`` holds an evolve run's state (this splice's, or an older pickle)."""
    f = Path(folder)
    return (f / STATE).is_file() or (f / LEGACY_STATE).is_file()


def load(run: str | os.PathLike[str], *, allow_pickle: bool = False) -> dict[str, Any]:
    """The state of the run folder ``run``, checked against the schema (``SpliceError``, one
    line, on anything else). An older ``state.pkl`` only with ``allow_pickle``."""
    run = Path(run)
    path = run / STATE
    if path.is_file():
        try:
            data = json.loads(path.read_bytes())
        except (OSError, ValueError, RecursionError) as e:
            raise SpliceError(f"{path}: cannot read the run state ({_why(e)})") from None
        return validate(data, path)
    legacy = run / LEGACY_STATE
    if legacy.is_file():
        if not allow_pickle:
            raise SpliceError(
                f"{legacy}: a run state written by an older splice as a pickle, which can run "
                "code when read; pass --allow-pickle only if you trust who made this folder"
            )
        return validate(_legacy(legacy), legacy)
    raise SpliceError(f"{run}: not an evolve run folder (no {STATE})")


def validate(data: Any, where: Path | str) -> dict[str, Any]:
    """``data`` if it is a run state (types, ranges and the counts agreeing), else one line."""
    if not isinstance(data, dict):
        raise SpliceError(f"{where}: not a run state (a {type(data).__name__}, not a mapping)")
    if data.get("format") != FORMAT:
        raise SpliceError(f"{where}: not a run state (format is not {FORMAT!r})")
    if data.get("version") != VERSION:
        raise SpliceError(
            f"{where}: run state version {data.get('version')!r}; this splice reads {VERSION}"
        )
    try:
        _State.model_validate(data)
    except ValidationError as e:
        err = e.errors()[0]
        loc = ".".join(str(p) for p in err["loc"])
        more = f" (and {e.error_count() - 1} more problems)" if e.error_count() > 1 else ""
        raise SpliceError(f"{where}: not a valid run state ({loc}: {err['msg']}){more}") from None
    gen, records, history = data["generation"], data["records"], data["history"]
    if len(history) != gen or [h["generation"] for h in history] != list(range(gen)):
        raise SpliceError(f"{where}: the history does not list generations 0..{gen - 1}")
    if any(r["generation"] >= gen for r in records):
        raise SpliceError(f"{where}: a candidate of a generation after {gen - 1} is recorded")
    if gen > data["generations"] or (gen == data["generations"] and data["stop"] is None):
        raise SpliceError(
            f"{where}: generation {gen} of {data['generations']} planned, and no stop recorded"
        )
    if any(not all(math.isfinite(g) for g in r["genes"]) for r in records):
        raise SpliceError(f"{where}: a candidate's genes are not finite numbers")
    return data


def _legacy(path: Path) -> dict[str, Any]:
    """An older splice's ``state.pkl`` as a state dict (its pickled strategy dropped: the
    replay rebuilds it)."""
    import pickle

    try:
        with open(path, "rb") as f:
            old = pickle.load(f)
    except Exception as e:
        raise SpliceError(f"{path}: cannot read the run state ({_why(e)})") from None
    if not isinstance(old, dict):
        raise SpliceError(f"{path}: not a run state (a {type(old).__name__}, not a mapping)")
    keep = ("fingerprint", "config", "generation", "generations", "records", "history", "stop")
    data = {"format": FORMAT, "version": VERSION, **{k: old.get(k) for k in keep}}
    try:  # numpy scalars and the like become plain JSON values, as a save would write them
        return json.loads(json.dumps(data, default=float))
    except (TypeError, ValueError) as e:
        raise SpliceError(f"{path}: not a run state ({_why(e)})") from None


def _why(e: BaseException) -> str:
    line = (str(e).strip().splitlines() or [""])[0][:200]
    return f"{type(e).__name__}: {line}" if line else type(e).__name__


# ---- CMA-ES with its own random stream --------------------------------------------------------------
class Strategy:
    """``cma.CMAEvolutionStrategy`` with a private random stream: it samples from its own
    ``RandomState`` (the ``randn`` option), and anything else it draws from numpy's global
    generator comes from a state kept here and installed around each ``ask`` / ``tell`` only.
    Whatever the evaluation does with numpy's generators, the samples are the same."""

    def __init__(self, x0: np.ndarray, sigma0: float, popsize: int, seed: int, maxiter: int):
        import cma

        self._np = np.random.RandomState(seed).get_state()
        opts = {
            "bounds": [0, 1],
            "popsize": popsize,
            "seed": np.nan,  # the stream is ours
            "randn": np.random.RandomState(seed).randn,
            "verbose": -9,
            "verb_disp": 0,
            "verb_log": 0,
            "maxiter": maxiter,
        }
        with self._random(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            self.es = cma.CMAEvolutionStrategy(x0, sigma0, opts)

    @contextlib.contextmanager
    def _random(self) -> Iterator[None]:
        outer = np.random.get_state()
        np.random.set_state(self._np)
        try:
            yield
        finally:
            self._np = np.random.get_state()
            np.random.set_state(outer)

    def ask(self) -> list[np.ndarray]:
        """One generation's genes, ``popsize`` arrays ``[d]``."""
        with self._random():
            return [np.asarray(x) for x in self.es.ask()]

    def tell(self, xs: list[np.ndarray], costs: list[float]) -> None:
        with self._random(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            self.es.tell(xs, costs)

    def stop(self) -> dict[str, Any]:
        """CMA-ES's own stop conditions met (``maxiter`` aside: the run counts generations)."""
        return {k: v for k, v in self.es.stop().items() if k != "maxiter"}

    @property
    def sigma(self) -> float:
        return float(self.es.sigma)


def costs(records: list[dict[str, Any]]) -> list[float]:
    """What CMA-ES (a minimizer) is told for one generation's records: ``-fitness``, failures
    ranked after the worst success."""
    fits = [r["fitness"] for r in records if r["fitness"] is not None]
    worst = -min(fits) + 1.0 if fits else 1.0
    return [-r["fitness"] if r["fitness"] is not None else worst for r in records]


class Search:
    """What proposes each generation: the grid (generation 0, when ``grid`` is given: its
    points, in order), then CMA-ES (a :class:`Strategy`) from the best grid point (else from
    ``x0``), restarted when it stalls if ``restarts`` is ``ipop`` or ``bipop``.

    A restart happens after a generation in which CMA-ES's own stop conditions are met, or
    after ``patience`` generations in which the restart found nothing better than its best;
    it starts from the best candidate so far with ``sigma0``; ipop doubles the population each
    time, bipop alternates ipop's large populations with small ones (population
    ``floor(popsize * (large / popsize / 2) ** (u * u))`` and step ``sigma0 * 10 ** (-2 u)``, u
    uniform from the restart's seed) whenever the small ones have spent fewer candidates.
    Everything follows from the settings and the fitnesses told, so :func:`replay` rebuilds it.
    """

    def __init__(
        self,
        x0: np.ndarray,
        sigma0: float,
        popsize: int,
        seed: int,
        maxiter: int,
        *,
        grid: list[tuple[str, np.ndarray]] | None = None,
        restarts: str | None = None,
        patience: int = 10,
        max_restarts: int = 9,
    ) -> None:
        self.x0, self.sigma0, self.popsize0, self.seed = x0, sigma0, popsize, seed
        self.maxiter, self.patience, self.max_restarts = maxiter, patience, max_restarts
        self.restarts = restarts if restarts in ("ipop", "bipop") else None
        self.grid = list(grid or [])
        self.in_grid = bool(self.grid)
        self.restart = 0
        self.large = popsize  # bipop: the last large population
        self.spent = {"large": 0, "small": 0}
        self.regime = "large"
        self.best: tuple[float, np.ndarray] | None = None  # (fitness, genes) so far
        self.restart_best = -math.inf
        self.stalled = 0
        self._stop: dict[str, Any] = {}
        self.strategy: Strategy | None = None
        if not self.in_grid:
            self.strategy = Strategy(x0, sigma0, popsize, seed, maxiter)

    @property
    def labels(self) -> list[str | None]:
        """The next generation's labels: the grid's, or ``None`` per CMA-ES candidate."""
        return [label for label, _ in self.grid] if self.in_grid else [None] * self.popsize

    @property
    def popsize(self) -> int:
        return len(self.grid) if self.in_grid else self.strategy.es.popsize

    @property
    def sigma(self) -> float:
        return self.sigma0 if self.strategy is None else self.strategy.sigma

    def ask(self) -> list[np.ndarray]:
        if self.in_grid:
            return [np.array(x, dtype=float) for _, x in self.grid]
        assert self.strategy is not None
        return self.strategy.ask()

    def tell(self, xs: list[np.ndarray], records: list[dict[str, Any]]) -> None:
        """The generation ``xs`` scored (``records`` in order); may start a restart."""
        fits = [(r["fitness"], k) for k, r in enumerate(records) if r["fitness"] is not None]
        top = max(fits, default=None, key=lambda f: (f[0], -f[1]))
        if top is not None and (self.best is None or top[0] > self.best[0]):
            self.best = (top[0], np.array(xs[top[1]], dtype=float))
        if self.in_grid:  # CMA-ES starts from the best grid point
            self.in_grid = False
            x0 = self.best[1] if self.best is not None else self.x0
            self.strategy = Strategy(x0, self.sigma0, self.popsize0, self.seed, self.maxiter)
            return
        assert self.strategy is not None
        self.strategy.tell(xs, costs(records))
        self.spent[self.regime] += len(xs)
        if top is not None and top[0] > self.restart_best:
            self.restart_best, self.stalled = top[0], 0
        else:
            self.stalled += 1
        stop = self.strategy.stop()
        if self.stalled >= self.patience and self.restarts:
            stop = {**stop, "stagnation": self.stalled}
        if stop and self.restarts and self.restart < self.max_restarts:
            self._restart()
        elif stop and (not self.restarts or self.restart >= self.max_restarts):
            self._stop = stop

    def _restart(self) -> None:
        self.restart += 1
        seed = (self.seed + 7919 * self.restart) % 2**32
        x0 = self.best[1] if self.best is not None else self.x0
        sigma, small = self.sigma0, False
        if self.restarts == "bipop" and self.restart > 1:
            small = self.spent["small"] < self.spent["large"]
        if small:
            u = np.random.RandomState(seed).uniform()
            pop = max(2, math.floor(self.popsize0 * (self.large / self.popsize0 / 2) ** (u * u)))
            sigma = self.sigma0 * 10 ** (-2 * u)
        else:
            self.large *= 2
            pop = self.large
        self.regime = "small" if small else "large"
        self.strategy = Strategy(x0, sigma, pop, seed, self.maxiter)
        self.restart_best, self.stalled = -math.inf, 0

    def stop(self) -> dict[str, Any]:
        """Why the search cannot go on (CMA-ES stopped, no restart left); empty otherwise."""
        return dict(self._stop)


def replay(state: dict[str, Any], strategy: Search, where: Path) -> Search:
    """``strategy`` (new, as the run began) brought to where it stood after the state's last
    generation: told every recorded generation again. Each generation must propose exactly the
    recorded genes, else the state is not this config's (edited, or its models changed):
    ``SpliceError``."""
    by_gen: dict[int, list[dict[str, Any]]] = {}
    for r in state["records"]:
        by_gen.setdefault(r["generation"], []).append(r)
    for gen in range(state["generation"]):
        xs = strategy.ask()
        recs = sorted(by_gen.get(gen, []), key=lambda r: r["index"])
        asked = [[float(v) for v in x] for x in xs]
        if [r["index"] for r in recs] != list(range(len(xs))) or [
            r["genes"] for r in recs
        ] != asked:
            raise SpliceError(
                f"{where}: generation {gen}'s candidates are not the ones this config's search "
                "proposes (the state was edited, or its models changed); use a new --out"
            )
        strategy.tell(xs, recs)
    return strategy
