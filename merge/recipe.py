"""Merge recipes: mergekit's YAML schema as frozen pydantic models, plus splice's additions.

Existing mergekit recipes run unchanged: ``models`` or ``slices`` (with ``sources`` and
``layer_range``), ``merge_method``, ``base_model``, ``parameters`` at global / slice / per-model
level with per-layer gradients (lists interpolated across layers) and name filters
(``[{filter: self_attn, value: 0.5}, {value: 0.3}]``), ``dtype``, ``out_dtype``,
``tokenizer_source`` and ``chat_template``; mergekit-moe's ``experts`` / ``shared_experts`` /
``gate_mode`` / ``experts_per_token`` / ``architecture`` for ``merge_method: moe``. A recipe as
mergekit-moe writes it (``experts`` and no ``merge_method``) is read as ``merge_method: moe``.
mergekit-multi's files (several YAML
documents, each with a ``name`` the later ones use as a model) are read by
:func:`splice.merge.multi.read_recipe` as a ``MultiRecipe`` and run by ``splice.merge.runner``.

mergekit's modular form runs too: ``modules: {text_decoder: {models | slices, parameters},
vision_tower: {...}, multi_modal_projector: {...}}`` in place of top-level ``models`` / ``slices``
(:class:`Module`; planned by ``splice.merge.planner``).

splice adds ``layer_path`` (Sakana's data-flow merge: an ordered list of ``{model, layer |
layer_range, scale}`` steps), ``seed`` (for DARE / DELLA) and ``keep_experts`` (an MoE output
that keeps some experts: one entry per output layer, the source experts it keeps in written
order, null for a layer without routed experts; :mod:`splice.expert_subset`).

Every field that names a model takes a LoRA reference, as mergekit writes it: ``BASE+ADAPTER``
or ``{model: BASE, lora: ADAPTER}`` (read as the former); :mod:`splice.lora` applies the
adapter while reading, with no merged copy on disk.

Only the schema lives here; checks that need the models (shapes, layer counts) are in
``splice.merge.planner``.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal, Union

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictInt,
    ValidationError,
    field_validator,
    model_validator,
)

from splice.errors import SpliceError
from splice.merge.recipe_text import format_errors, one_mapping, source_text, yaml_documents
from splice.paths import resolve_path

Scalar = Union[bool, int, float, str]  # noqa: UP007 - pydantic needs the runtime union
ScalarOrGradient = Union[Scalar, list[Scalar]]  # noqa: UP007


class Conditional(BaseModel):
    """``{filter: self_attn, value: 0.5}``: applies to tensors whose name contains ``filter``."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    value: ScalarOrGradient
    filter: str | None = None


Setting = Union[Conditional, list[Conditional], ScalarOrGradient]  # noqa: UP007
Params = dict[str, Setting]


def _model_ref(value: Any) -> Any:
    """Accept ``path``, ``{path: p}``, ``{model: {path: p}}`` and LoRA references: mergekit's
    ``BASE+ADAPTER`` and ``{model: BASE, lora: ADAPTER}`` (each side a path or ``{path: p}``),
    the latter read as the former (:mod:`splice.lora`); refuse other keys (``revision``,
    ...), empty references and URLs."""
    if isinstance(value, dict):
        other = sorted(str(k) for k in value if k not in ("model", "path", "lora"))
        if other:
            raise ValueError(f"model reference key {other[0]!r} is not supported")
        lora = value.get("lora")
        value = _path_of(value.get("model", {k: v for k, v in value.items() if k != "lora"}))
        if lora is not None:
            adapter = _path_of(lora, "a LoRA reference")
            if not isinstance(value, str) or not isinstance(adapter, str):
                raise ValueError("a LoRA reference is {model: BASE, lora: ADAPTER}, two paths")
            for side in (value, adapter):
                _check_ref(side)
            value = f"{value}+{adapter}"
    if isinstance(value, str):
        _check_ref(value)
    return value


def _path_of(inner: Any, what: str = "a model reference") -> Any:
    """``p`` from ``p`` or ``{path: p}``."""
    if isinstance(inner, dict):
        other = sorted(str(k) for k in inner if k != "path")
        if other:
            raise ValueError(
                f"model reference key {other[0]!r} is not supported (give `path` only)"
            )
        if "path" not in inner:
            raise ValueError(f"{what} needs `path`")
        return inner["path"]
    return inner


def _check_ref(value: str) -> None:
    if not value.strip():
        raise ValueError("a model reference is empty (give a model folder or a hub id)")
    if "://" in value:
        raise ValueError(f"{value!r} is a URL; give a local model folder or a hub id (org/name)")


def _setting_problem(value: Any) -> str | None:
    """Why ``value`` is not a parameter setting (``None`` if it is one)."""
    if isinstance(value, (bool, str)):
        return None
    if isinstance(value, (int, float)):
        return None if math.isfinite(value) else f"{value} is not a finite number"
    if value is None:
        return "null is not a value"
    if isinstance(value, dict):
        unknown = sorted(str(k) for k in value if k not in ("filter", "value"))
        if unknown:
            return f"unknown key {unknown[0]!r} in a {{filter, value}} condition"
        if "value" not in value:
            return "a {filter, value} condition needs `value`"
        if value.get("filter") is not None and not isinstance(value["filter"], str):
            return f"filter {value['filter']!r} is not a string"
        inner = value["value"]
        if isinstance(inner, dict) or (
            isinstance(inner, list) and any(isinstance(v, (dict, list)) for v in inner)
        ):
            return "a condition's value is a number, a string or a list of them"
        return _setting_problem(inner)
    if isinstance(value, list):
        if not value:
            return "an empty list is not a value"
        if all(isinstance(v, dict) for v in value):
            return next((p for v in value if (p := _setting_problem(v))), None)
        if any(isinstance(v, (dict, list)) for v in value):
            return (
                "a list holds either values (a gradient) or {filter, value} conditions, "
                "not a mix or nested lists"
            )
        return next((p for v in value if (p := _setting_problem(v))), None)
    return f"{value!r} is not a number, a string, a list or a {{filter, value}} condition"


def _check_parameters(cls: type, data: Any) -> Any:
    """``model_validator(mode="before")``: one clear line for a bad ``parameters`` entry (a
    non-finite number, a malformed condition) instead of one per member of the union."""
    if not isinstance(data, dict) or not isinstance(data.get("parameters"), dict):
        return data
    owner = data.get("model")
    of = f" of model {owner}" if isinstance(owner, str) else ""
    for key, value in data["parameters"].items():
        problem = _setting_problem(value)
        if problem:
            raise ValueError(f"parameter {key!r}{of}: {problem}")
    return data


class _Strict(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)


def _layer_range(v: tuple[int, int]) -> tuple[int, int]:
    if v[0] < 0 or v[1] <= v[0]:
        raise ValueError(
            f"layer_range {list(v)} must be [start, end) with 0 <= start < end (end exclusive)"
        )
    return v


class ModelEntry(_Strict):
    model: str
    parameters: Params | None = None

    _ref = field_validator("model", mode="before")(_model_ref)
    _params = model_validator(mode="before")(_check_parameters)


class SliceSource(_Strict):
    model: str
    layer_range: tuple[int, int]
    parameters: Params | None = None

    _ref = field_validator("model", mode="before")(_model_ref)
    _params = model_validator(mode="before")(_check_parameters)
    _ordered = field_validator("layer_range")(_layer_range)


class Slice(_Strict):
    sources: list[SliceSource] = Field(min_length=1)
    base_model: str | None = None
    parameters: Params | None = None
    residual_weight: float | None = None

    _ref = field_validator("base_model", mode="before")(_model_ref)
    _params = model_validator(mode="before")(_check_parameters)


class Module(_Strict):
    """One entry of ``modules:`` (mergekit's modular recipes): a module of a multimodal model
    (``text_decoder``, ``vision_tower``, ``multi_modal_projector``, ...) merged from ``models``
    or ``slices`` with the recipe's method; its ``parameters`` rank between the recipe's and a
    slice's or model's own."""

    models: list[ModelEntry] | None = None
    slices: list[Slice] | None = None
    parameters: Params | None = None

    _params = model_validator(mode="before")(_check_parameters)

    @model_validator(mode="after")
    def _one_of(self) -> Module:
        if bool(self.models) == bool(self.slices):
            raise ValueError("a module needs exactly one of `models` or `slices` (not empty)")
        return self


class LayerStep(_Strict):
    """One step of a data-flow path: layer(s) of a model, the stream scaled by ``scale`` first."""

    model: str
    layer: int | None = None
    layer_range: tuple[int, int] | None = None
    scale: float = 1.0

    _ref = field_validator("model", mode="before")(_model_ref)

    @model_validator(mode="after")
    def _one_of(self) -> LayerStep:
        if (self.layer is None) == (self.layer_range is None):
            raise ValueError("a layer_path step needs exactly one of `layer` or `layer_range`")
        if self.layer is not None and self.layer < 0:
            raise ValueError(f"layer {self.layer} must be 0 or more")
        if self.layer_range is not None:
            _layer_range(self.layer_range)
        if self.scale <= 0:
            raise ValueError(f"layer_path scale must be > 0 (got {self.scale})")
        return self

    @property
    def layers(self) -> list[int]:
        if self.layer is not None:
            return [self.layer]
        start, end = self.layer_range  # type: ignore[misc]
        return list(range(start, end))


class Expert(_Strict):
    """mergekit-moe: a dense model whose MLPs become one expert per layer."""

    source_model: str
    positive_prompts: list[str] | None = None
    negative_prompts: list[str] | None = None
    noise_scale: float | None = None
    residual_scale: float | None = None

    _ref = field_validator("source_model", mode="before")(_model_ref)


class TokenFrom(_Strict):
    """Where a token's embedding comes from: zeros, or a model's row for ``token`` / ``token_id``."""

    kind: Literal["zero", "model_token"]
    model: str | None = None
    token: str | None = None
    token_id: int | None = None

    _ref = field_validator("model", mode="before")(_model_ref)

    @model_validator(mode="after")
    def _complete(self) -> TokenFrom:
        if self.kind == "model_token":
            if self.model is None:
                raise ValueError("a model_token source needs `model`")
            if (self.token is None) == (self.token_id is None):
                raise ValueError("a model_token source needs exactly one of `token`, `token_id`")
        return self


class TokenEmbedding(_Strict):
    """One entry of ``tokenizer.tokens``: the token's embedding source (a model reference: that
    model's row for the token), and ``force``: every model takes it, not only those lacking it."""

    source: TokenFrom | str | None = None
    force: bool = False

    @field_validator("source", mode="before")
    @classmethod
    def _ref(cls, value: Any) -> Any:
        if not (isinstance(value, dict) and "kind" in value):
            return _model_ref(value)
        try:  # validated here, so that a bad one is one message, not one per union member
            return TokenFrom.model_validate(value)
        except ValidationError as e:
            raise ValueError(
                "; ".join(err["msg"].removeprefix("Value error, ") for err in e.errors())
            ) from None


class TokenizerConfig(_Strict):
    """mergekit's ``tokenizer:`` section (its ``source`` defaults to ``union`` there too).
    ``tokens`` are added to the output vocabulary if new, with their embedding sources."""

    source: str = "union"
    tokens: dict[str, TokenEmbedding] | None = None
    pad_to_multiple_of: int | None = None

    _ref = field_validator("source", mode="before")(_model_ref)

    @field_validator("pad_to_multiple_of")
    @classmethod
    def _positive(cls, v: int | None) -> int | None:
        if v is not None and v < 1:
            raise ValueError(f"pad_to_multiple_of must be >= 1 (got {v})")
        return v


def _mergekit_moe(cls: type, data: Any) -> Any:
    """``model_validator(mode="before")``: mergekit-moe's format (``experts``, no
    ``merge_method``) is ``merge_method: moe``; an empty ``shared_experts`` is none."""
    if not isinstance(data, dict) or "experts" not in data:
        return data
    if "shared_experts" in data and not data["shared_experts"]:  # null or []: nothing
        data = {k: v for k, v in data.items() if k != "shared_experts"}
    if "merge_method" not in data:
        data["merge_method"] = "moe"
    return data


class Recipe(_Strict):
    """A merge recipe (see the module docstring)."""

    merge_method: str
    models: list[ModelEntry] | None = None
    slices: list[Slice] | None = None
    layer_path: list[LayerStep] | None = None
    modules: dict[str, Module] | None = None
    base_model: str | None = None
    parameters: Params | None = None
    dtype: str | None = None
    out_dtype: str | None = None
    tokenizer_source: str | None = None
    tokenizer: TokenizerConfig | None = None
    chat_template: str | None = None
    seed: int | None = None
    name: str | None = None
    #: per output layer: the source experts kept, in written order (null: no routed experts)
    keep_experts: list[list[StrictInt] | None] | None = None
    # mergekit-moe
    experts: list[Expert] | None = None
    shared_experts: list[Expert] | None = None
    gate_mode: str = "hidden"
    experts_per_token: int = 2
    architecture: str | None = None

    _ref = field_validator("base_model", "tokenizer_source", mode="before")(_model_ref)
    _params = model_validator(mode="before")(_check_parameters)
    _moe = model_validator(mode="before")(_mergekit_moe)

    @model_validator(mode="after")
    def _shape(self) -> Recipe:
        if self.merge_method == "moe":
            if self.modules is not None:
                raise ValueError("`modules` does not go with merge_method moe")
            if not self.experts:
                raise ValueError("merge_method moe needs an `experts` list")
            if not self.base_model:
                raise ValueError("merge_method moe needs a `base_model` (attention and embeddings)")
            if self.keep_experts is not None:
                raise ValueError("`keep_experts` does not go with merge_method moe")
            return self
        if self.shared_experts:
            raise ValueError("`shared_experts` goes with merge_method moe")
        if self.keep_experts is not None and self.modules is not None:
            raise ValueError("`keep_experts` goes with `models`, `slices` or `layer_path`")
        given = [k for k in ("models", "slices", "layer_path") if getattr(self, k)]
        empty = [k for k in ("models", "slices", "layer_path") if getattr(self, k) == []]
        if self.modules is not None:
            if given or empty:
                raise ValueError(
                    f"give `modules` or top-level `{(given or empty)[0]}`, not both (the "
                    "language model's models or slices go under modules.text_decoder)"
                )
            if not self.modules:
                raise ValueError("`modules` is empty")
        elif not given and empty:
            raise ValueError(f"`{empty[0]}` is empty")
        elif len(given) != 1:
            raise ValueError(
                "give exactly one of `models`, `slices`, `layer_path` or `modules`"
                + (f" (got {', '.join(given)})" if given else "")
            )
        if self.layer_path and self.merge_method not in ("passthrough", "layer_path"):
            raise ValueError("`layer_path` goes with merge_method passthrough (or layer_path)")
        if self.tokenizer_source and self.tokenizer:
            raise ValueError("give `tokenizer_source` or `tokenizer`, not both")
        return self

    # ---- loading ----------------------------------------------------------------------------
    @classmethod
    def from_yaml(cls, source: str | os.PathLike[str]) -> Recipe:
        """Read a recipe from a YAML file (a path) or from YAML text (a string with a newline).

        Only plain YAML data is read (``yaml.safe_load``): a tag such as ``!!python/object`` is
        refused, never constructed.
        """
        text, base_dir, what = source_text(source)
        docs = yaml_documents(text, what)
        if len(docs) > 1:
            raise SpliceError(
                f"{what} holds {len(docs)} YAML documents (a mergekit-multi recipe); "
                "`splice merge` runs it (splice.merge.runner, or read_recipe to load it)"
            )
        recipe = cls.from_dict(one_mapping(docs, what))
        return recipe.with_paths(base_dir, what=what) if base_dir else recipe

    @classmethod
    def from_dict(
        cls, data: dict[str, Any], base_dir: Path | None = None, *, what: str = "recipe"
    ) -> Recipe:
        """Validate a recipe dict; ``SpliceError`` with one line per problem (each line starts
        with ``what``). ``base_dir``: the folder of the file it was read from, for relative
        model paths (:mod:`splice.paths`)."""
        if not isinstance(data, dict):
            raise SpliceError(f"{what} must be a mapping, not {type(data).__name__}")
        try:
            recipe = cls.model_validate(data)
        except ValidationError as e:
            raise SpliceError(format_errors(e, what)) from None
        return recipe.with_paths(base_dir, what=what) if base_dir else recipe

    def with_paths(self, base_dir: Path, *, what: str = "recipe") -> Recipe:
        """Relative model paths resolved as :func:`splice.paths.resolve_path` says: from the
        current folder when they exist there, else from ``base_dir`` (the recipe's folder)."""
        return self.map_models(lambda ref: resolve_path(ref, base_dir, what=what))

    def map_models(self, fn: Callable[[str], str]) -> Recipe:
        """The recipe with every model reference ``ref`` replaced by ``fn(ref)`` (the
        tokenizer sources ``base`` and ``union`` are keywords, not references)."""

        def f(ref: str | None) -> str | None:
            return None if ref is None else fn(ref)

        def source(ref: str | None) -> str | None:
            return ref if ref in ("base", "union") else f(ref)

        data = self.model_dump()
        data["base_model"] = f(data["base_model"])  # a folder named base is a folder here
        data["tokenizer_source"] = source(data["tokenizer_source"])
        if data.get("tokenizer"):
            data["tokenizer"]["source"] = source(data["tokenizer"]["source"])
            for entry in (data["tokenizer"]["tokens"] or {}).values():
                if isinstance(entry["source"], dict):
                    entry["source"]["model"] = f(entry["source"]["model"])
                else:
                    entry["source"] = f(entry["source"])
        for part in [data, *(data.get("modules") or {}).values()]:
            for m in part.get("models") or []:
                m["model"] = f(m["model"])
            for sl in part.get("slices") or []:
                sl["base_model"] = f(sl["base_model"])
                for src in sl["sources"]:
                    src["model"] = f(src["model"])
        for step in data.get("layer_path") or []:
            step["model"] = f(step["model"])
        for e in (data.get("experts") or []) + (data.get("shared_experts") or []):
            e["source_model"] = f(e["source_model"])
        return type(self).model_validate(data)

    def to_yaml(self) -> str:
        """The recipe as YAML, without defaults (for model cards)."""
        return yaml.safe_dump(
            self.model_dump(exclude_defaults=True, exclude_none=True, mode="json"),
            sort_keys=False,
        )

    # ---- queries ----------------------------------------------------------------------------
    def parts(self) -> list[Recipe | Module]:
        """What holds ``models`` / ``slices``: the recipe, or each of its ``modules``."""
        return list(self.modules.values()) if self.modules is not None else [self]

    def referenced_models(self) -> list[str]:
        """Every model the recipe names, base first, without repeats, in recipe order."""
        refs: list[str | None] = [self.base_model]
        for part in self.parts():
            refs += [m.model for m in part.models or []]
            for s in part.slices or []:
                refs.append(s.base_model)
                refs += [src.model for src in s.sources]
        refs += [step.model for step in self.layer_path or []]
        refs += [e.source_model for e in self.experts or []]
        refs += [e.source_model for e in self.shared_experts or []]
        src = self.tokenizer.source if self.tokenizer else self.tokenizer_source
        if src not in (None, "base", "union"):
            refs.append(src)
        for entry in (self.tokenizer.tokens or {}).values() if self.tokenizer else ():
            source = entry.source
            refs.append(source.model if isinstance(source, TokenFrom) else source)
        return list(dict.fromkeys(r for r in refs if r))
