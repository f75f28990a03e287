"""Merge recipes: mergekit's YAML schema as frozen pydantic models, plus splice's additions.

Existing mergekit recipes run unchanged: ``models`` or ``slices`` (with ``sources`` and
``layer_range``), ``merge_method``, ``base_model``, ``parameters`` at global / slice / per-model
level with per-layer gradients (lists interpolated across layers) and name filters
(``[{filter: self_attn, value: 0.5}, {value: 0.3}]``), ``dtype``, ``out_dtype``,
``tokenizer_source`` and ``chat_template``; mergekit-moe's ``experts`` / ``gate_mode`` /
``experts_per_token`` for ``merge_method: moe``.

splice adds ``layer_path`` (Sakana's data-flow merge: an ordered list of ``{model, layer |
layer_range, scale}`` steps) and ``seed`` (for DARE / DELLA).

Only the schema lives here; checks that need the models (shapes, layer counts) are in
``splice.merge.plan``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal, Union

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError, field_validator, model_validator

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
    """Accept ``path``, ``{path: p}`` and ``{model: {path: p}}``; refuse LoRA references."""
    if isinstance(value, dict):
        if value.get("lora"):
            raise ValueError("LoRA model references (model+lora) are not supported yet")
        inner = value.get("model", value)
        if isinstance(inner, dict):
            inner = inner.get("path")
        value = inner
    if isinstance(value, str) and "+" in value and not os.path.exists(value):
        raise ValueError(f"{value!r}: LoRA model references (model+lora) are not supported yet")
    return value


class _Strict(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class ModelEntry(_Strict):
    model: str
    parameters: Params | None = None

    _ref = field_validator("model", mode="before")(_model_ref)


class SliceSource(_Strict):
    model: str
    layer_range: tuple[int, int]
    parameters: Params | None = None

    _ref = field_validator("model", mode="before")(_model_ref)

    @field_validator("layer_range")
    @classmethod
    def _ordered(cls, v: tuple[int, int]) -> tuple[int, int]:
        if v[0] < 0 or v[1] < v[0]:
            raise ValueError(f"layer_range {list(v)} must be [start, end) with 0 <= start <= end")
        return v


class Slice(_Strict):
    sources: list[SliceSource]
    base_model: str | None = None
    parameters: Params | None = None
    residual_weight: float | None = None

    _ref = field_validator("base_model", mode="before")(_model_ref)


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

    _ref = field_validator("base_model", mode="before")(_model_ref)

    @model_validator(mode="after")
    def _shape(self) -> Recipe:
        if self.merge_method == "moe":
            if not self.experts:
                raise ValueError("merge_method moe needs an `experts` list")
            if not self.base_model:
                raise ValueError("merge_method moe needs a `base_model` (attention and embeddings)")
            return self
        given = [k for k in ("models", "slices", "layer_path") if getattr(self, k)]
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
        """Read a recipe from a YAML file (a path) or from YAML text (a string with a newline)."""
        is_text = isinstance(source, str) and "\n" in source
        if is_text:
            text, base_dir = str(source), None
        else:
            path = Path(source)
            if not path.is_file():
                raise SpliceError(f"{path}: no such recipe file")
            text, base_dir = path.read_text(), path.parent
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f" (line {mark.line + 1})" if mark else ""
            raise SpliceError(f"recipe is not valid YAML{where}") from None
        if not isinstance(data, dict):
            raise SpliceError("recipe must be a YAML mapping with at least `merge_method`")
        return cls.from_dict(data, base_dir=base_dir)

    @classmethod
    def from_dict(cls, data: dict[str, Any], base_dir: Path | None = None) -> Recipe:
        """Validate a recipe dict; ``SpliceError`` with one line per problem."""
        try:
            recipe = cls.model_validate(data)
        except ValidationError as e:
            raise SpliceError(_format_errors(e)) from None
        return recipe.with_paths(base_dir) if base_dir else recipe

    def with_paths(self, base_dir: Path) -> Recipe:
        """Resolve relative model paths that do not exist from the CWD against ``base_dir``."""

        def fix(ref: str | None) -> str | None:
            if ref is None or os.path.exists(ref) or os.path.isabs(ref):
                return ref
            candidate = base_dir / ref
            return str(candidate) if candidate.exists() else ref

        data = self.model_dump()
        for key in ("base_model", "tokenizer_source"):
            if data.get(key) not in (None, "base", "union"):
                data[key] = fix(data[key])
        if data.get("tokenizer"):
            if data["tokenizer"]["source"] not in ("base", "union"):
                data["tokenizer"]["source"] = fix(data["tokenizer"]["source"])
            for entry in (data["tokenizer"]["tokens"] or {}).values():
                if isinstance(entry["source"], dict):
                    entry["source"]["model"] = fix(entry["source"]["model"])
                else:
                    entry["source"] = fix(entry["source"])
        for m in data.get("models") or []:
            m["model"] = fix(m["model"])
        for s in data.get("slices") or []:
            s["base_model"] = fix(s["base_model"])
            for src in s["sources"]:
                src["model"] = fix(src["model"])
        for step in data.get("layer_path") or []:
            step["model"] = fix(step["model"])
        for e in data.get("experts") or []:
            e["source_model"] = fix(e["source_model"])
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


def _format_errors(e: ValidationError) -> str:
    lines = []
    for err in e.errors():
        loc = ".".join(str(p) for p in err["loc"] if not str(p).startswith(("function-", "union")))
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = "unknown key"
        elif err["type"] == "missing":
            msg = "required key is missing"
        lines.append(f"recipe: {loc}: {msg}" if loc else f"recipe: {msg}")
    return "\n".join(dict.fromkeys(lines))
