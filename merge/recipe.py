"""Merge recipes: mergekit's YAML schema as frozen pydantic models, plus splice's additions.

Existing mergekit recipes run unchanged: ``models`` or ``slices`` (with ``sources`` and
``layer_range``), ``merge_method``, ``base_model``, ``parameters`` at global / slice / per-model
level with per-layer gradients (lists interpolated across layers) and name filters
(``[{filter: self_attn, value: 0.5}, {value: 0.3}]``), ``dtype``, ``out_dtype``,
``tokenizer_source`` and ``chat_template``; mergekit-moe's ``experts`` / ``gate_mode`` /
``experts_per_token`` for ``merge_method: moe``. A recipe as mergekit-moe writes it (``experts``
and no ``merge_method``) is read as ``merge_method: moe``. mergekit-multi's files (several YAML
documents, each with a ``name`` the later ones use as a model) are read by :func:`read_recipe`
as a :class:`MultiRecipe` and run by ``splice.merge.runner``.

splice adds ``layer_path`` (Sakana's data-flow merge: an ordered list of ``{model, layer |
layer_range, scale}`` steps) and ``seed`` (for DARE / DELLA).

Only the schema lives here; checks that need the models (shapes, layer counts) are in
``splice.merge.planner``.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal, Union

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from splice.errors import SpliceError

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
    """Accept ``path``, ``{path: p}`` and ``{model: {path: p}}``; refuse LoRA references, other
    keys (``revision``, ...), empty references and URLs."""
    if isinstance(value, dict):
        if value.get("lora"):
            raise ValueError("LoRA model references (model+lora) are not supported yet")
        other = sorted(str(k) for k in value if k not in ("model", "path", "lora"))
        if other:
            raise ValueError(f"model reference key {other[0]!r} is not supported")
        inner = value.get("model", value)
        if isinstance(inner, dict):
            other = sorted(str(k) for k in inner if k != "path")
            if other:
                raise ValueError(
                    f"model reference key {other[0]!r} is not supported (give `path` only)"
                )
            if "path" not in inner:
                raise ValueError("a model reference needs `path`")
            inner = inner["path"]
        value = inner
    if isinstance(value, str):
        if not value.strip():
            raise ValueError("a model reference is empty (give a model folder or a hub id)")
        if "://" in value:
            raise ValueError(
                f"{value!r} is a URL; give a local model folder or a hub id (org/name)"
            )
        if "+" in value and not os.path.exists(value):
            raise ValueError(f"{value!r}: LoRA model references (model+lora) are not supported yet")
    return value


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
    ``merge_method``) is ``merge_method: moe``; its ``shared_experts`` (Qwen2-MoE / DeepSeek
    outputs) are refused in one line."""
    if not isinstance(data, dict) or "experts" not in data:
        return data
    if data.get("shared_experts"):
        raise ValueError(
            "shared_experts is not supported: splice's moe writes Mixtral, which has none "
            "(mergekit-moe writes them for qwen2_moe / deepseek outputs)"
        )
    data = {k: v for k, v in data.items() if k != "shared_experts"}  # null or []: nothing
    if "merge_method" not in data:
        data["merge_method"] = "moe"
    return data


class Recipe(_Strict):
    """A merge recipe (see the module docstring)."""

    merge_method: str
    models: list[ModelEntry] | None = None
    slices: list[Slice] | None = None
    layer_path: list[LayerStep] | None = None
    base_model: str | None = None
    parameters: Params | None = None
    dtype: str | None = None
    out_dtype: str | None = None
    tokenizer_source: str | None = None
    tokenizer: TokenizerConfig | None = None
    chat_template: str | None = None
    seed: int | None = None
    name: str | None = None
    # mergekit-moe
    experts: list[Expert] | None = None
    gate_mode: str = "hidden"
    experts_per_token: int = 2
    architecture: str | None = None

    _ref = field_validator("base_model", "tokenizer_source", mode="before")(_model_ref)
    _params = model_validator(mode="before")(_check_parameters)
    _moe = model_validator(mode="before")(_mergekit_moe)

    @model_validator(mode="after")
    def _shape(self) -> Recipe:
        if self.merge_method == "moe":
            if not self.experts:
                raise ValueError("merge_method moe needs an `experts` list")
            if not self.base_model:
                raise ValueError("merge_method moe needs a `base_model` (attention and embeddings)")
            return self
        given = [k for k in ("models", "slices", "layer_path") if getattr(self, k)]
        empty = [k for k in ("models", "slices", "layer_path") if getattr(self, k) == []]
        if not given and empty:
            raise ValueError(f"`{empty[0]}` is empty")
        if len(given) != 1:
            raise ValueError(
                "give exactly one of `models`, `slices` or `layer_path`"
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
        text, base_dir, what = _source_text(source)
        docs = _yaml_documents(text, what)
        if len(docs) > 1:
            raise SpliceError(
                f"{what} holds {len(docs)} YAML documents (a mergekit-multi recipe); "
                "`splice merge` runs it (splice.merge.runner, or read_recipe to load it)"
            )
        return cls.from_dict(_one_mapping(docs, what), base_dir=base_dir)

    @classmethod
    def from_dict(
        cls, data: dict[str, Any], base_dir: Path | None = None, *, what: str = "recipe"
    ) -> Recipe:
        """Validate a recipe dict; ``SpliceError`` with one line per problem (each line starts
        with ``what``)."""
        if not isinstance(data, dict):
            raise SpliceError(f"{what} must be a mapping, not {type(data).__name__}")
        try:
            recipe = cls.model_validate(data)
        except ValidationError as e:
            raise SpliceError(_format_errors(e, what)) from None
        return recipe.with_paths(base_dir) if base_dir else recipe

    def with_paths(self, base_dir: Path) -> Recipe:
        """Resolve relative model paths that do not exist from the CWD against ``base_dir``."""

        return self.map_models(lambda ref: _near(ref, base_dir))

    def map_models(self, fn: Callable[[str], str]) -> Recipe:
        """The recipe with every model reference ``ref`` replaced by ``fn(ref)`` (the
        tokenizer sources ``base`` and ``union`` are keywords, not references)."""

        def f(ref: str | None) -> str | None:
            return None if ref is None else fn(ref)

        def source(ref: str | None) -> str | None:
            return ref if ref in ("base", "union") else f(ref)

        data = self.model_dump()
        for key in ("base_model", "tokenizer_source"):
            data[key] = source(data[key])
        if data.get("tokenizer"):
            data["tokenizer"]["source"] = source(data["tokenizer"]["source"])
            for entry in (data["tokenizer"]["tokens"] or {}).values():
                if isinstance(entry["source"], dict):
                    entry["source"]["model"] = f(entry["source"]["model"])
                else:
                    entry["source"] = f(entry["source"])
        for m in data.get("models") or []:
            m["model"] = f(m["model"])
        for sl in data.get("slices") or []:
            sl["base_model"] = f(sl["base_model"])
            for src in sl["sources"]:
                src["model"] = f(src["model"])
        for step in data.get("layer_path") or []:
            step["model"] = f(step["model"])
        for e in data.get("experts") or []:
            e["source_model"] = f(e["source_model"])
        return type(self).model_validate(data)

    def to_yaml(self) -> str:
        """The recipe as YAML, without defaults (for model cards)."""
        return yaml.safe_dump(
            self.model_dump(exclude_defaults=True, exclude_none=True, mode="json"),
            sort_keys=False,
        )

    # ---- queries ----------------------------------------------------------------------------
    def referenced_models(self) -> list[str]:
        """Every model the recipe names, base first, without repeats, in recipe order."""
        refs: list[str | None] = [self.base_model]
        refs += [m.model for m in self.models or []]
        for s in self.slices or []:
            refs.append(s.base_model)
            refs += [src.model for src in s.sources]
        refs += [step.model for step in self.layer_path or []]
        refs += [e.source_model for e in self.experts or []]
        src = self.tokenizer.source if self.tokenizer else self.tokenizer_source
        if src not in (None, "base", "union"):
            refs.append(src)
        for entry in (self.tokenizer.tokens or {}).values() if self.tokenizer else ():
            source = entry.source
            refs.append(source.model if isinstance(source, TokenFrom) else source)
        return list(dict.fromkeys(r for r in refs if r))


def _near(ref: str, base_dir: Path) -> str:
    """``ref``, or ``base_dir / ref`` when only that exists (a path relative to the recipe)."""
    if os.path.exists(ref) or os.path.isabs(ref):
        return ref
    candidate = base_dir / ref
    return str(candidate) if candidate.exists() else ref


def _read_text(path: Path) -> str:
    """A recipe file's text; one line saying why when it is unreadable, binary or not UTF-8."""
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise SpliceError(f"recipe {path}: cannot read it ({e.strerror})") from None
    if raw.startswith((b"\xff\xfe", b"\xfe\xff")):
        raise SpliceError(f"recipe {path} is UTF-16 text; save it as UTF-8")
    if b"\x00" in raw:
        raise SpliceError(f"recipe {path} is a binary file, not YAML text")
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise SpliceError(
            f"recipe {path} is not UTF-8 text (byte 0x{raw[e.start]:02x} at offset {e.start}); "
            "save it as UTF-8"
        ) from None


_TAG = re.compile(r"tag '([^']*)'")


class _Loader(yaml.SafeLoader):
    """``yaml.SafeLoader`` (plain data only) that also refuses a key given twice in a mapping,
    which YAML loaders otherwise settle silently by keeping the last."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *base` may be overridden
                continue
            key = self.construct_object(key_node, deep=True)  # type: ignore[no-untyped-call]
            try:
                duplicate = key in seen
            except TypeError:  # an unhashable key: the base class reports it
                break
            if duplicate:
                raise yaml.constructor.ConstructorError(
                    None, None, f"the key {key!r} is given twice", key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def _source_text(source: str | os.PathLike[str]) -> tuple[str, Path | None, str]:
    """``(text, folder of the file or None, what to call it)`` for a recipe file or YAML text
    (a string with a newline)."""
    if isinstance(source, str) and "\n" in source:
        return str(source), None, "recipe"
    path = Path(source)
    if path.is_dir():
        raise SpliceError(f"{path}: a folder, not a recipe file")
    if not path.is_file():
        raise SpliceError(f"{path}: no such recipe file")
    return _read_text(path), path.parent, f"recipe {path}"


def _yaml_documents(text: str, what: str) -> list[Any]:
    """The YAML documents of a recipe (``---`` separates them; empty ones are dropped), read
    as plain data only (a ``SafeLoader``); ``SpliceError`` in one line."""
    try:
        return [d for d in yaml.load_all(text, Loader=_Loader) if d is not None]
    except RecursionError:  # the YAML parser recurses per nesting level
        raise SpliceError(f"{what} nests lists or mappings too deeply to read") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark else ""
        problem = str(getattr(e, "problem", None) or "").replace("\n", " ")
        tag = _TAG.search(problem) if isinstance(e, yaml.constructor.ConstructorError) else None
        if tag:
            name = re.sub(r"^tag:yaml\.org,2002:", "!!", tag.group(1))
            raise SpliceError(
                f"{what} uses the YAML tag {name}{where}, which splice refuses: recipes are data"
            ) from None
        if problem.startswith("the key "):
            raise SpliceError(f"{what}: {problem}{where}") from None
        raise SpliceError(
            f"{what} is not valid YAML{where}" + (f": {problem}" if problem else "")
        ) from None


def _one_mapping(docs: list[Any], what: str) -> dict[str, Any]:
    """The recipe mapping of a one-document recipe; ``SpliceError`` in one line otherwise."""
    if not docs:
        raise SpliceError(f"{what} is empty; it needs at least `merge_method`")
    (data,) = docs
    if isinstance(data, list):
        raise SpliceError(
            f"{what} is a YAML list; a recipe is a mapping with at least `merge_method`"
        )
    if not isinstance(data, dict):
        raise SpliceError(
            f"{what} is a single YAML value ({_shown(data)}); a recipe is a mapping with at "
            "least `merge_method`"
        )
    return data


# ---- mergekit-multi: several recipes in one file ----------------------------------------------
_STAGE_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]*")
_RESERVED = ("base", "union")  # tokenizer_source keywords


@dataclass(frozen=True)
class Stage:
    """One document of a multi-document recipe: its ``name`` (``None``: the final merge), its
    recipe with model references as written, and the names of the documents it uses."""

    index: int  # 1-based position in the file
    name: str | None
    recipe: Recipe
    uses: tuple[str, ...]

    @property
    def label(self) -> str:
        """``document 2 (second-merge)``: how messages name it."""
        return f"document {self.index} ({self.name or 'final, unnamed'})"


@dataclass(frozen=True)
class MultiRecipe:
    """mergekit-multi's format: YAML documents separated by ``---``, each a recipe; a document
    with a ``name`` is an intermediate merge, and a later document that names it as a model
    (``model``, ``base_model``, a slice source, ``tokenizer_source``, ...) merges its output.
    A name always means that document's output, even where a folder of that name exists.

    ``stages`` are in run order (every document after the ones it uses, otherwise in file
    order); the last is the final merge: the document without a ``name``, or else the only one
    that no other document uses. Every other document must be used (perhaps through others) by
    the final one.
    """

    stages: tuple[Stage, ...]
    base_dir: Path | None = None

    @property
    def final(self) -> Stage:
        return self.stages[-1]

    @property
    def intermediates(self) -> tuple[Stage, ...]:
        return self.stages[:-1]

    def resolved(self, stage: Stage, outputs: Mapping[str, str | os.PathLike[str]]) -> Recipe:
        """``stage``'s recipe with the documents it uses replaced by their ``outputs`` (folders,
        made absolute) and relative paths resolved against the recipe file's folder."""
        missing = [n for n in stage.uses if n not in outputs]
        if missing:
            raise SpliceError(f"{stage.label}: no output for {missing[0]!r} yet")
        done = {n: os.path.abspath(outputs[n]) for n in stage.uses}
        recipe = stage.recipe.map_models(lambda ref: done.get(ref, ref))
        return recipe.with_paths(self.base_dir) if self.base_dir else recipe

    def external_models(self) -> list[str]:
        """The models the documents name that are no document's output, in file order
        (relative paths resolved as in :meth:`resolved`)."""
        names = {s.name for s in self.stages}
        refs = [
            ref if self.base_dir is None else _near(ref, self.base_dir)
            for s in sorted(self.stages, key=lambda s: s.index)
            for ref in s.recipe.referenced_models()
            if ref not in names
        ]
        return list(dict.fromkeys(refs))

    def to_yaml(self) -> str:
        """Every document, in file order, names as written (for the final model's card)."""
        parts = []
        for s in sorted(self.stages, key=lambda s: s.index):
            parts.append(s.recipe.to_yaml())
        return "---\n".join(parts)


def read_recipe(source: str | os.PathLike[str]) -> Recipe | MultiRecipe:
    """A recipe file (or YAML text): a ``Recipe`` when it holds one document, a ``MultiRecipe``
    (mergekit-multi) when it holds several; ``SpliceError``, one line per problem."""
    text, base_dir, what = _source_text(source)
    docs = _yaml_documents(text, what)
    if len(docs) <= 1:
        return Recipe.from_dict(_one_mapping(docs, what), base_dir=base_dir)
    return _multi(docs, what, base_dir)


def _multi(docs: list[Any], what: str, base_dir: Path | None) -> MultiRecipe:
    stages: list[Stage] = []
    unnamed: list[int] = []
    for i, data in enumerate(docs, start=1):
        where = f"{what} document {i}"
        if not isinstance(data, dict):
            raise SpliceError(f"{where} is not a mapping; each document is a recipe")
        name = data.get("name")
        if name is not None and (
            not isinstance(name, str) or not _STAGE_NAME.fullmatch(name) or name in _RESERVED
        ):
            raise SpliceError(
                f"{where}: name {name!r} must be a plain folder name (letters, digits, . _ -), "
                f"not {' or '.join(_RESERVED)}"
            )
        if name is None:
            unnamed.append(i)
        elif any(s.name == name for s in stages):
            raise SpliceError(f"{where}: the name {name!r} is given to two documents")
        label = f"{where} ({name})" if name else where
        recipe = Recipe.from_dict(data, what=label)  # paths are resolved once names are
        stages.append(Stage(i, name, recipe, ()))
    if len(unnamed) > 1:
        raise SpliceError(
            f"{what}: documents {unnamed[0]} and {unnamed[1]} have no `name`; only the final "
            "merge may go without one"
        )
    names = [s.name for s in stages if s.name]
    for k, s in enumerate(stages):
        refs = s.recipe.referenced_models()
        stages[k] = replace(s, uses=tuple(n for n in names if n in refs))
    order: list[Stage] = []  # every document after those it uses, otherwise in file order
    while len(order) < len(stages):
        done = {s.name for s in order}
        ready = [s for s in stages if s not in order and all(u in done for u in s.uses)]
        if not ready:
            rest = [s for s in stages if s not in order]
            raise SpliceError(f"{what}: the documents use each other in a cycle ({_cycle(rest)})")
        order.append(ready[0])
    used = {n for s in stages for n in s.uses}
    finals = [s for s in stages if s.name is None] or [s for s in stages if s.name not in used]
    if len(finals) > 1:
        shown = ", ".join(str(s.name) for s in finals)
        raise SpliceError(
            f"{what}: documents {shown} are each used by no other document; leave the `name` "
            "out of the final one (the others must feed it)"
        )
    (final,) = finals
    by_name = {s.name: s for s in stages if s.name}
    needed: set[str] = set()
    todo = list(final.uses)
    while todo:
        n = todo.pop()
        if n not in needed:
            needed.add(n)
            todo += by_name[n].uses
    unused = [s for s in stages if s is not final and s.name not in needed]
    if unused:
        raise SpliceError(
            f"{what}: {unused[0].label} is not used by the final merge, {final.label}; remove "
            "it, or merge it on its own"
        )
    order.remove(final)  # nothing uses the final merge: it can go last
    return MultiRecipe((*order, final), base_dir)


def _cycle(stages: list[Stage]) -> str:
    """``a -> b -> a``: one cycle among ``stages`` (each of which uses another of them)."""
    by_name = {s.name: s for s in stages if s.name}
    path = [next(iter(by_name))]
    while True:
        nxt = next(u for u in by_name[path[-1]].uses if u in by_name)
        if nxt in path:
            return " -> ".join([*path[path.index(nxt) :], nxt])
        path.append(nxt)


_EXPECTED = {
    "model_type": "a mapping",
    "model_attributes_type": "a mapping",
    "dict_type": "a mapping",
    "list_type": "a list",
    "tuple_type": "a list",
    "string_type": "a string",
    "int_type": "an integer",
    "int_parsing": "an integer",
    "int_from_float": "an integer",
    "float_type": "a number",
    "float_parsing": "a number",
    "bool_type": "true or false",
    "bool_parsing": "true or false",
    "finite_number": "a finite number",
}


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _format_errors(e: ValidationError, what: str = "recipe") -> str:
    lines = []
    for err in e.errors():
        loc = ".".join(str(p) for p in err["loc"] if not str(p).startswith(("function-", "union")))
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = "unknown key"
        elif err["type"] == "missing":
            msg = "required key is missing"
        elif err["type"] in _EXPECTED:
            msg = f"expected {_EXPECTED[err['type']]}, got {_shown(err.get('input'))}"
        elif err["loc"] and err["loc"][-1] == "layer_range" and err["type"] != "value_error":
            msg = f"expected [start, end], got {_shown(err.get('input'))}"
        elif err["type"] == "too_short":
            msg = "must not be empty"
        lines.append(f"{what}: {loc}: {msg}" if loc else f"{what}: {msg}")
    return "\n".join(dict.fromkeys(lines))
