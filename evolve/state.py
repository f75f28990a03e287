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


def replay(
    state: dict[str, Any], x0: np.ndarray, sigma0: float, popsize: int, seed: int, where: Path
) -> Strategy:
    """The strategy as it stood after the state's last generation: built anew and told every
    recorded generation again. Each generation must propose exactly the recorded genes, else
    the state is not this config's (edited, or its models changed): ``SpliceError``."""
    strategy = Strategy(x0, sigma0, popsize, seed, state["generations"])
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
        strategy.tell(xs, costs(recs))
    return strategy
