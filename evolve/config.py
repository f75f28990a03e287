"""The evolve configuration: one frozen pydantic model, validated before anything is loaded.

A mergekit-evolve file runs unchanged, with its meaning::

    genome:
      models: [math, lang]          # the sources (or top-level ``sources:``)
      merge_method: ties            # ties dare_ties task_arithmetic linear slerp della breadcrumbs
      base_model: base
      layer_granularity: 2          # one set of genes per 2 layers (0: one set for all layers)
      normalize: null               # null: true for ties, dare_ties, linear (mergekit's default)
      allow_negative_weights: false # weights span [-1, 1] instead of [0, 1]
      filters: [self_attn, mlp]     # a gene set per filter, plus one for the other tensors
      smooth: false                 # true: values interpolated across layers (gradients)
    tasks:
      - name: zoo_math_lang_fit
        weight: 1.0
        metric: acc,none
    limit: 100                      # mergekit's top-level lm-eval settings ...
    num_fewshot: 0
    shuffle: false                  # shuffle each task's documents (seeded) before ``limit``
    random_init: false              # start from a uniformly random point instead

splice's own keys: ``lm_eval:`` (batch_size, limit, num_fewshot, apply_chat_template,
fewshot_as_multiturn, shuffle, max_length), ``search:`` (popsize, sigma0, seed, generations,
max_fevals, start; grid, restarts, patience, max_restarts: how the search proceeds; fitness,
subset, race_z: cheaper fitness; size_weight), a task's ``higher_is_better``, ``dtype``,
``device``, ``tokenizer``, ``tasks_dir`` and ``zoo``. A file without a ``search`` section is
read as mergekit-evolve's and starts where mergekit-evolve does (weights 1/n, densities 1); otherwise every gene starts at
``search.start`` (0.5).

``genome.space: dataflow`` is Sakana's data-flow genome (``splice.evolve.dataflow``): the
genome's models, ``repeats`` (Sakana's r, default 3), ``scales`` (``per_slot``, or
``per_transition``: Sakana's matrix W), ``ranges.scale`` and the donor of the embeddings, final
norm and head (``base_model`` or ``donor: MODEL``, else the first model; ``donor: gene``: a
gene per model); it has no merge method, and its start is its own (the first model's layers
once, every scale 1), whatever ``search.start``.
A genome model that is a finished evolve run folder stands for that run's winner.

``genome.prune: layers`` (parameter space) adds one keep gene per layer: a candidate is the
merge with the dropped layers cut out (``splice.evolve.pruning``); ``experts`` (MoE models)
adds a gene for how many experts every MoE layer keeps and one rank gene per expert of each
MoE layer (which it keeps); ``layers+experts`` both. ``search.size_weight`` w makes the
fitness ``score - w * size`` (size: the candidate's parameters over the full model's).

Genes are in [0, 1] (CMA-ES runs with those bounds); a gene maps linearly onto its parameter's
range: ``weight`` [0, 1] ([-1, 1] with ``allow_negative_weights``), ``density`` [0, 1] (DELLA:
inside ``(epsilon, 1 - epsilon)``), slerp's per-model scores [0, 1]. ``genome.ranges`` overrides
a range, ``genome.parameters`` fixes other method parameters (``epsilon``, ``lambda``, ``gamma``).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from splice.errors import SpliceError
from splice.paths import resolve_path

#: merge methods a parameter-space genome can drive, and the genes each takes per source
METHOD_GENES: dict[str, tuple[str, ...]] = {
    "linear": ("weight",),
    "task_arithmetic": ("weight",),
    "ties": ("weight", "density"),
    "dare_ties": ("weight", "density"),
    "della": ("weight", "density"),
    "breadcrumbs": ("weight", "density"),
    "slerp": ("t",),
}
NEEDS_BASE = ("ties", "dare_ties", "task_arithmetic", "della", "breadcrumbs")
#: sizes past which a search is a typo, not a plan (CMA-ES's own default popsize for 10,000
#: genes is 31; Sakana's data-flow search used r = 3)
MAX_POPSIZE = 10_000
MAX_REPEATS = 100
MAX_CANDIDATES = 1_000_000
#: genes CMA-ES can handle here: its covariance matrix is genes^2 float64 (10,000: 800 MB)
MAX_GENES = 10_000


#: (section, key) of keys added after run folders existed: left out of the fingerprint at
#: their default (the field's), so those runs still resume and extend
LATER_KEYS: tuple[tuple[str, str], ...] = (
    ("search", "size_weight"),
    ("search", "grid"),
    ("search", "restarts"),
    ("search", "patience"),
    ("search", "max_restarts"),
    ("search", "fitness"),
    ("search", "subset"),
    ("search", "race_z"),
    ("genome", "prune"),
    ("genome", "scales"),
    ("genome", "donor"),
)
#: what a new run takes for a ``search`` key left null (a run begun before the key existed
#: keeps null: the behaviour it had)
NEW_RUN = {"grid": True, "restarts": "ipop"}


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)


class TaskSpec(_Frozen):
    """One lm-eval task in the fitness: ``weight * metric`` (negated when lower is better).

    ``higher_is_better: null`` takes the task's own declaration for the metric (lm-eval's
    ``higher_is_better``), true where it declares none; but a negative ``weight`` on a metric
    the task declares lower-is-better is mergekit-evolve's way of minimizing it, and is read so
    (negated once, with a warning).
    """

    name: str = Field(min_length=1)
    weight: float = 1.0
    metric: str = "acc,none"
    higher_is_better: bool | None = None

    @model_validator(mode="before")
    @classmethod
    def _from_string(cls, value: Any) -> Any:
        return {"name": value} if isinstance(value, str) else value

    @property
    def metric_key(self) -> str:
        """``acc`` -> ``acc,none`` (lm-eval's result key: metric, filter)."""
        return self.metric if "," in self.metric else f"{self.metric},none"


class LmEvalArgs(_Frozen):
    """How lm-eval scores a candidate (the same for every candidate)."""

    batch_size: int = Field(32, ge=1, le=65536)
    limit: int | None = Field(None, ge=1)
    num_fewshot: int | None = Field(None, ge=0)
    #: null: apply the tokenizer's chat template when it has one (mergekit-evolve: always)
    apply_chat_template: bool | None = None
    fewshot_as_multiturn: bool = False
    shuffle: bool = False
    max_length: int | None = Field(None, ge=1, le=1 << 24)


class SearchSettings(_Frozen):
    """CMA-ES settings. ``popsize`` null: 4 + floor(3 ln d); the run stops after
    ``generations`` or once ``max_fevals`` candidates are scored (whole generations: at most
    ``ceil(max_fevals / popsize)``), or when CMA-ES itself stops; with neither, 100 fevals
    (mergekit-evolve's default)."""

    popsize: int | None = Field(None, ge=2, le=MAX_POPSIZE)
    sigma0: float = Field(1 / 6, gt=0, le=10)
    seed: int = Field(0, ge=0, lt=2**32)
    generations: int | None = Field(None, ge=1, le=MAX_CANDIDATES)
    max_fevals: int | None = Field(None, ge=1, le=MAX_CANDIDATES)
    #: a gene value in [0, 1] for every gene, or mergekit-evolve's starting point
    start: float | Literal["mergekit"] = 0.5
    #: fitness = task score - size_weight * size, where the genome has a size (the fraction
    #: of the sources' parameters a candidate keeps, in [0, 1]); 0: size does not count
    size_weight: float = Field(0.0, ge=0, le=1000)
    #: generation 0 is a small grid of the genome's own space (and the start), CMA-ES starts
    #: from its best point; null: true for a new run (runs begun before this key: false)
    grid: bool | None = None
    #: on stagnation (CMA-ES's own stop, or ``patience`` generations without a better
    #: candidate), restart with twice the population (ipop) or alternately large and small
    #: ones (bipop), at most ``max_restarts`` times; null: ipop for a new run (older: none)
    restarts: Literal["none", "ipop", "bipop"] | None = None
    #: null: 10 + ceil(30 d / popsize) generations (d genes; pycma's stagnation rule, shorter)
    patience: int | None = Field(None, ge=1, le=MAX_CANDIDATES)
    max_restarts: int = Field(9, ge=0, le=1000)
    #: ``full``: every candidate on the whole fitness split; ``subset``: racing by stages from
    #: a share ``subset`` of the items, ``irt``: an item-response model predicts the rest from
    #: ``subset`` of them (anchors); either goes on to the whole split only while the candidate
    #: can still beat the best (``race_z`` standard errors of margin): splice.evolve.fitness
    fitness: Literal["full", "subset", "irt"] = "full"
    subset: float = Field(0.125, gt=0, le=1)
    race_z: float = Field(2.0, ge=0, le=100)

    @field_validator("start")
    @classmethod
    def _in_box(cls, v: float | str) -> float | str:
        if isinstance(v, float) and not 0 <= v <= 1:
            raise ValueError(f"start {v} must be in [0, 1] (genes live in [0, 1])")
        return v


class GenomeSpec(_Frozen):
    """mergekit-evolve's genome definition, plus ``space``, ``ranges`` and ``parameters``."""

    models: list[str] = Field(min_length=1)
    merge_method: str | None = None  # parameter space: required; data-flow: passthrough
    base_model: str | None = None
    tokenizer_source: str | None = None
    layer_granularity: int = Field(0, ge=0, le=1 << 20)
    normalize: bool | None = None
    allow_negative_weights: bool = False
    filters: list[str] | None = None
    smooth: bool = False
    #: ``parameter`` (mergekit-evolve's genome) or ``dataflow`` (Sakana's layer path)
    space: Literal["parameter", "dataflow"] = "parameter"
    #: data-flow: how many times every model's layers are laid out as slots (Sakana's r)
    repeats: int = Field(3, ge=1, le=MAX_REPEATS)
    #: data-flow: ``per_slot`` (one scale gene per slot) or ``per_transition`` (Sakana's W: one
    #: per (previous layer, next layer), the embeddings counting as a previous layer)
    scales: Literal["per_slot", "per_transition"] = "per_slot"
    #: data-flow: ``gene`` (one gene per model, the highest picks whose embeddings, final norm
    #: and head the path uses); a model here is read as ``base_model`` (the fixed donor)
    donor: Literal["gene"] | None = None
    #: parameter -> [low, high] that genes 0 and 1 map to
    ranges: dict[str, tuple[float, float]] = Field(default_factory=dict)
    #: fixed method parameters, the same in every candidate (``lambda``, ``epsilon``, ...)
    parameters: dict[str, float | bool | str] = Field(default_factory=dict)
    #: parameter space: ``layers`` adds one keep gene per layer (kept when over 0.5): a
    #: candidate is the merge with the dropped layers cut out; ``experts``: an expert count
    #: gene and one rank gene per expert of each MoE layer; ``layers+experts``: both
    #: (``splice.evolve.pruning``)
    prune: Literal["layers", "experts", "layers+experts"] | None = None

    @model_validator(mode="before")
    @classmethod
    def _donor_model(cls, data: Any) -> Any:
        """Data-flow ``donor: MODEL`` is ``base_model: MODEL`` (the path's donor)."""
        if not isinstance(data, dict) or data.get("donor") is None:
            return data
        donor = data["donor"]
        if data.get("space") != "dataflow":
            raise ValueError("donor is a data-flow setting (space: dataflow)")
        if donor == "gene" or not isinstance(donor, str):
            return data
        base = data.get("base_model")
        if base is not None and base != donor:
            raise ValueError(f"donor {donor} and base_model {base} name two donors; give one")
        return {**data, "base_model": donor, "donor": None}

    @model_validator(mode="after")
    def _consistent(self) -> GenomeSpec:
        if self.space == "dataflow":
            return self._dataflow()
        if self.scales != "per_slot":
            raise ValueError("scales is a data-flow setting (space: dataflow)")
        m = self.merge_method
        if m is None:
            raise ValueError("merge_method is required (space: parameter)")
        if m not in METHOD_GENES:
            raise ValueError(
                f"merge_method {m!r} cannot be evolved; choose from: {', '.join(METHOD_GENES)}"
            )
        if m in NEEDS_BASE and not self.base_model:
            raise ValueError(f"merge_method {m} needs a base_model")
        if m == "slerp":
            if self.smooth:
                raise ValueError("smooth is not supported for slerp (as in mergekit-evolve)")
            if self.filters:
                raise ValueError("filters are not supported for slerp (as in mergekit-evolve)")
            if len(self.models) < 2:
                raise ValueError("slerp needs at least two models")
        if self.filters is not None and len(set(self.filters)) != len(self.filters):
            raise ValueError("filters are given twice")
        genes = METHOD_GENES[m]
        for key, (lo, hi) in self.ranges.items():
            if key not in genes:
                raise ValueError(
                    f"ranges: {key!r} is not a gene of {m} (it has {', '.join(genes)})"
                )
            if not lo < hi:
                raise ValueError(f"ranges: {key} [{lo}, {hi}] must have low < high")
        for key in self.parameters:
            if key in genes:
                raise ValueError(f"parameters: {key!r} is a gene of {m}; set its range instead")
        return self

    def _dataflow(self) -> GenomeSpec:
        if self.merge_method not in (None, "passthrough", "layer_path"):
            raise ValueError(
                f"space dataflow decodes to a layer_path (passthrough), not {self.merge_method}"
            )
        for key, value in (
            ("filters", self.filters),
            ("smooth", self.smooth),
            ("prune", self.prune),
        ):
            if value:
                raise ValueError(f"{key} is a parameter-space setting (space: dataflow)")
        if self.layer_granularity or self.parameters:
            raise ValueError("layer_granularity and parameters are parameter-space settings")
        for key, (lo, hi) in self.ranges.items():
            if key != "scale":
                raise ValueError(f"ranges: {key!r} is not a data-flow gene (it has scale)")
            if not 0 < lo < hi:
                raise ValueError(f"ranges: scale [{lo}, {hi}] must have 0 < low < high")
        if self.donor == "gene":
            if self.base_model:
                raise ValueError(
                    "donor gene picks the donor among the models; base_model would fix it "
                    "(give one of the two)"
                )
            if len(self.models) < 2:
                raise ValueError("donor gene needs two or more models to pick from")
        return self

    @property
    def genes(self) -> tuple[str, ...]:
        """The per-model genes of the method (data-flow: indicator and scale per slot)."""
        if self.space == "dataflow":
            return ("on", "scale")
        assert self.merge_method is not None
        return METHOD_GENES[self.merge_method]

    def range_of(self, gene: str) -> tuple[float, float]:
        """The values genes 0 and 1 decode to."""
        if gene in self.ranges:
            return self.ranges[gene]
        if gene == "scale":
            return (0.5, 2.0)
        if gene == "weight":
            return (-1.0, 1.0) if self.allow_negative_weights else (0.0, 1.0)
        if gene == "density" and self.merge_method == "della":
            eps = abs(float(self.parameters.get("epsilon", 0.15)))
            return (round(eps + 0.01, 6), round(1 - eps - 0.01, 6))
        return (0.0, 1.0)

    def normalize_flag(self) -> bool:
        """mergekit-evolve's default: normalize ties, dare_ties and linear merges."""
        if self.normalize is not None:
            return self.normalize
        return self.merge_method in ("ties", "dare_ties", "linear")


_MERGEKIT_TOP = ("limit", "num_fewshot", "shuffle", "apply_chat_template", "fewshot_as_multiturn")


class EvolveConfig(_Frozen):
    """A whole search: what to merge (genome), how to score (tasks, lm_eval), how to search."""

    genome: GenomeSpec
    tasks: list[TaskSpec] = Field(min_length=1)
    lm_eval: LmEvalArgs = Field(default_factory=LmEvalArgs)
    search: SearchSettings = Field(default_factory=SearchSettings)
    random_init: bool = False
    dtype: Literal["float32", "bfloat16", "float16", "float64"] = "float32"
    device: str = "cpu"
    tokenizer: str | None = None
    tasks_dir: str | None = None
    zoo: str | None = None
    #: tasks ``splice evolve report --table`` scores the sources, naive merges and the winner
    #: on (never the fitness); default: ``X`` for every fitness task ``X_fit`` (the zoo's splits)
    report_tasks: list[str] | None = None

    @model_validator(mode="before")
    @classmethod
    def _mergekit_layout(cls, data: Any) -> Any:
        """mergekit-evolve's file: top-level lm-eval keys go to ``lm_eval``, no ``search``
        section means mergekit-evolve's start; top-level ``sources`` / ``base_model`` fill the
        genome."""
        if not isinstance(data, dict):
            return data
        data = dict(data)
        lm = data.get("lm_eval")
        if lm is None or isinstance(lm, dict):  # else the schema says what lm_eval must be
            lm = dict(lm or {})
            for key in _MERGEKIT_TOP:
                if key in data:
                    if key in lm:
                        raise ValueError(f"{key} is given twice (top level and lm_eval)")
                    lm[key] = data.pop(key)
            if lm:
                data["lm_eval"] = lm
        if "search" not in data:
            data["search"] = {"start": "mergekit"}
        genome = data.get("genome")
        if isinstance(genome, dict):
            genome = dict(genome)
            for top, key in (("sources", "models"), ("base_model", "base_model")):
                if top in data:
                    if key in genome:
                        raise ValueError(f"{top} is given twice (top level and genome.{key})")
                    genome[key] = data.pop(top)
            data["genome"] = genome
        return data

    @model_validator(mode="after")
    def _tasks_once(self) -> EvolveConfig:
        names = [(t.name, t.metric_key) for t in self.tasks]
        if len(set(names)) != len(names):
            raise ValueError("a task and metric is listed twice")
        if all(t.weight == 0 for t in self.tasks):
            raise ValueError("every task has weight 0: the fitness would be constant")
        return self

    # ---- reading ------------------------------------------------------------------------------
    @classmethod
    def from_yaml(cls, path: str | os.PathLike[str]) -> EvolveConfig:
        """Read a config file (plain YAML data only); relative model, tokenizer, tasks_dir and
        zoo paths are resolved as :mod:`splice.paths` says (from the current folder when they
        exist there, else from the file's folder) and made absolute, so a run folder's config
        names the same models from anywhere."""
        p = Path(path)
        if not p.is_file():
            raise SpliceError(f"{path}: no such config file")
        try:
            data = yaml.safe_load(p.read_text())
        except (yaml.YAMLError, UnicodeDecodeError) as e:
            raise SpliceError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
        return cls.from_dict(data, base_dir=p.parent, what=f"config {path}")

    @classmethod
    def from_dict(
        cls, data: Any, base_dir: Path | None = None, *, what: str = "config"
    ) -> EvolveConfig:
        """Validate ``data``; ``SpliceError``, one line per problem."""
        if not isinstance(data, dict):
            raise SpliceError(f"{what} must be a mapping with genome and tasks")
        try:
            config = cls.model_validate(data)
        except ValidationError as e:
            raise SpliceError(_format(e, what)) from None
        return config.with_paths(base_dir, what=what) if base_dir is not None else config

    def with_paths(self, base_dir: Path, *, what: str = "config") -> EvolveConfig:
        """Relative paths resolved as :func:`splice.paths.resolve_path` says (from the current
        folder, else ``base_dir``: the config file's) and made absolute; hub ids unchanged."""

        def near(ref: str | None) -> str | None:
            if ref is None:
                return None
            return resolve_path(ref, base_dir, what=what, absolute=True)  # a hub id as it is

        g = self.genome
        genome = g.model_copy(
            update={
                "models": [near(m) for m in g.models],
                "base_model": near(g.base_model),
                "tokenizer_source": (
                    g.tokenizer_source
                    if g.tokenizer_source in ("base", "union")  # keywords, not paths
                    else near(g.tokenizer_source)
                ),
            }
        )
        return self.model_copy(
            update={
                "genome": genome,
                "tokenizer": near(self.tokenizer),
                "tasks_dir": near(self.tasks_dir),
                "zoo": near(self.zoo),
            }
        )

    def with_overrides(self, **changes: Any) -> EvolveConfig:
        """The config with CLI overrides (``max_fevals``, ``device``, ``tasks_dir``; ``None``:
        unchanged), validated again."""
        data = self.model_dump(mode="json")
        if changes.get("max_fevals") is not None:
            data["search"]["max_fevals"] = changes["max_fevals"]
            data["search"]["generations"] = None
        for key in ("device", "tasks_dir"):
            if changes.get(key) is not None:
                data[key] = str(changes[key])
        return EvolveConfig.from_dict(data)

    def for_run(self, stored: EvolveConfig | None = None) -> EvolveConfig:
        """The config with its null ``search`` keys settled: those of ``stored`` (the config of
        the run folder it continues, whose nulls stay null), else :data:`NEW_RUN`'s."""
        data = self.model_dump(mode="json")
        for key, new in NEW_RUN.items():
            if data["search"][key] is None:
                data["search"][key] = new if stored is None else getattr(stored.search, key)
        return EvolveConfig.from_dict(data)

    # ---- identity -----------------------------------------------------------------------------
    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)

    def fingerprint(self) -> str:
        """sha256 of the canonical JSON of the config: a run folder belongs to one config."""
        data = self.model_dump(mode="json")
        models = {"search": SearchSettings, "genome": GenomeSpec}
        for section, key in LATER_KEYS:  # a run begun before the key existed
            default = models[section].model_fields[key].default
            if data[section].get(key, default) == default:
                data[section].pop(key, None)
        text = json.dumps(data, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode()).hexdigest()

    def differences(self, other: EvolveConfig) -> list[str]:
        """Dotted keys whose values differ between the two configs."""
        out: list[str] = []
        _diff(self.model_dump(mode="json"), other.model_dump(mode="json"), "", out)
        return out

    def report_split(self) -> list[str]:
        """The report tasks: ``report_tasks``, else ``X`` for each fitness task ``X_fit``."""
        if self.report_tasks is not None:
            return list(self.report_tasks)
        names = [t.name.removesuffix("_fit") for t in self.tasks if t.name.endswith("_fit")]
        return list(dict.fromkeys(names))

    def split_warnings(self) -> list[str]:
        """A fitness task that is also a report task (the report would be scored on what the
        search fitted), or a zoo report split used as fitness while a fitness split exists."""
        fit = [t.name for t in self.tasks]
        out = [
            f"task {n} is both a fitness and a report task: the report would score what the "
            "search fitted"
            for n in fit
            if n in self.report_split()
        ]
        zoo_report = ("zoo_math", "zoo_lang", "zoo_math_lang")
        out += [
            f"task {n} is a zoo report split; search on {n}_fit and report on {n}"
            for n in fit
            if n in zoo_report and n not in self.report_split()
        ]
        return out

    def source_models(self) -> list[str]:
        """Every model the merge reads: base first, then the genome's models."""
        refs = [self.genome.base_model, *self.genome.models]
        return list(dict.fromkeys(r for r in refs if r))

    def tokenizer_ref(self) -> str:
        """The tokenizer candidates are scored with (``tokenizer``, else the genome's
        ``tokenizer_source``, else the base model, else the first model; of a LoRA reference
        ``BASE+ADAPTER``, the adapter's folder when it ships a tokenizer, else the base)."""
        from splice.lora import tokenizer_ref

        return tokenizer_ref(
            self.tokenizer
            or self.genome.tokenizer_source
            or self.genome.base_model
            or self.genome.models[0]
        )


def _diff(a: Any, b: Any, where: str, out: list[str]) -> None:
    if isinstance(a, dict) and isinstance(b, dict):
        for k in dict.fromkeys([*a, *b]):
            _diff(a.get(k), b.get(k), f"{where}.{k}" if where else str(k), out)
    elif a != b:
        out.append(where)


def _printable(part: Any) -> str:
    """A location part as one line of text (a key with a newline or control character quoted)."""
    text = str(part)
    return text if text.isprintable() else repr(text)


def _format(e: ValidationError, what: str) -> str:
    lines = []
    for err in e.errors():
        loc = ".".join(_printable(p) for p in err["loc"] if not str(p).startswith("function-"))
        msg = " ".join(err["msg"].removeprefix("Value error, ").splitlines())
        if err["type"] == "extra_forbidden":
            msg = "unknown key"
        elif err["type"] == "missing":
            msg = "required key is missing"
        elif err["type"] == "too_short":
            msg = "must not be empty"
        lines.append(f"{what}: {loc}: {msg}" if loc else f"{what}: {msg}")
    return "\n".join(dict.fromkeys(lines))
