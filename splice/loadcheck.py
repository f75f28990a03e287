"""Will transformers load this output exactly? Answered before the model folder is written.

:func:`check_loads` takes the planned ``config.json`` and the planned tensors (names, shapes,
dtypes) and checks them the way ``AutoModelForCausalLM.from_pretrained`` would: the config
with transformers' own config class (fields it rebuilds from others, such as ``layer_types``
from an interval, must come out as planned), the model class built on the meta device (no
memory, no weights, no code from the hub or the folder), and the tensors matched against its
state dict through transformers' own key renamings and conversions (MoE experts packed at
load), tied weights, and the patterns each model ignores. A tensor the model would not find,
one it would not use, or one of the wrong shape is refused in one :class:`SpliceError` line:
transformers only warns of a missing tensor and fills it with random numbers.

Transformers and torch are imported inside the functions: the CLI imports this module.
"""

from __future__ import annotations

import contextlib
import json
import re
import warnings
from collections.abc import Iterator, Mapping
from copy import deepcopy
from dataclasses import dataclass, field
from functools import lru_cache
from typing import TYPE_CHECKING, Any

from splice.errors import SpliceError, first_line

if TYPE_CHECKING:
    import torch
    from transformers import PretrainedConfig, PreTrainedModel

__all__ = ["LoadReport", "check_loads", "load_report"]

_UNCHECKED = "pass --no-verify to write it unchecked"
_SHOWN = 3  # names quoted per kind of problem


@dataclass
class LoadReport:
    """What transformers would report on loading the tensors: ``missing`` (model tensors no
    planned tensor fills, after tying and the model's ignore patterns), ``unexpected`` (planned
    tensors the model has no place for, by their planned names), ``mismatched`` (model name ->
    (planned shape, model shape)), ``unconverted`` (converted tensor -> why the conversion
    failed)."""

    model_class: str
    missing: set[str] = field(default_factory=set)
    unexpected: set[str] = field(default_factory=set)
    mismatched: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = field(default_factory=dict)
    unconverted: dict[str, str] = field(default_factory=dict)

    def problems(self) -> str | None:
        """The problems as one line (``"1 missing tensor (lm_head.weight)"``), or None."""
        parts = []
        missing = self.missing - set(self.unconverted)  # a failed conversion leaves it missing
        if missing:
            parts.append(_count(missing, "missing tensor"))
        if self.unexpected:
            parts.append(_count(self.unexpected, "unexpected tensor"))
        if self.mismatched:
            shown = [
                f"{n}: {list(got)} for {list(want)}"
                for n, (got, want) in sorted(self.mismatched.items())[:_SHOWN]
            ]
            parts.append(_count(self.mismatched, "tensor of the wrong shape", shown))
        if self.unconverted:
            shown = [f"{n}: {why}" for n, why in sorted(self.unconverted.items())[:1]]
            parts.append(_count(self.unconverted, "tensor it cannot convert", shown))
        return "; ".join(parts) or None


def check_loads(config: dict[str, Any], tensors: Mapping[str, tuple[tuple[int, ...], str]]) -> None:
    """SpliceError (one line) unless transformers accepts ``config`` (a config.json dict) with
    its own config class and its model would load ``tensors`` (name -> (shape, dtype name like
    ``'float32'``)) with no missing, unexpected or wrongly shaped tensor."""
    report = load_report(config, tensors)
    problems = report.problems()
    if problems:
        raise SpliceError(f"the output would not load into {report.model_class}: {problems}")


def load_report(
    config: dict[str, Any], tensors: Mapping[str, tuple[tuple[int, ...], str]]
) -> LoadReport:
    """The :class:`LoadReport` of loading ``tensors`` (name -> (shape, dtype name)) into the
    model of ``config``; SpliceError (one line) if transformers rejects the config or has no
    model class for it (see :func:`check_loads`)."""
    model_type = config.get("model_type")
    if config.get("auto_map"):
        raise SpliceError(
            f"the output's config names its own model code (auto_map), which is never run to "
            f"check it; {_UNCHECKED}"
        )
    with _quiet():
        cfg = _config(config)
        _check_lists(config, cfg, str(model_type))
        _check_quantization(config)
        cls = _model_class(config, cfg)
        model = _meta_model(cls, json.dumps(config, sort_keys=True, default=str))
        return _simulate(model, tensors)


def expected_shapes(config: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    """The state-dict shapes of the model transformers builds from ``config`` (a config.json
    dict of a family it knows), on the meta device: no memory, no weights, no model code.
    SpliceError (one line) if transformers rejects the config or cannot build the model."""
    with _quiet():
        cfg = _config(config)
        model = _meta_model(
            _model_class(config, cfg), json.dumps(config, sort_keys=True, default=str)
        )
        return {k: tuple(v.shape) for k, v in model.state_dict().items()}


# ---- config -----------------------------------------------------------------------------------
def _config(config: dict[str, Any]) -> PretrainedConfig:
    """transformers' config object of ``config``, as ``AutoConfig.from_pretrained`` builds it."""
    from transformers import CONFIG_MAPPING

    model_type = config.get("model_type")
    if not isinstance(model_type, str) or model_type not in CONFIG_MAPPING:
        what = (
            f"model type {model_type!r}"
            if model_type is not None
            else "a config without model_type"
        )
        raise SpliceError(f"transformers does not know {what} of the output; {_UNCHECKED}")
    if model_type == "mistral" and "layer_types" in config:
        model_type = "ministral"  # AutoConfig.from_pretrained's own heuristic
    try:
        return CONFIG_MAPPING[model_type].from_dict(deepcopy(config))
    except Exception as e:  # any exception of the config class is its verdict
        raise SpliceError(f"transformers rejects the output's config: {_why(e)}") from None


def _check_quantization(config: dict[str, Any]) -> None:
    """SpliceError unless transformers' own quantization config class accepts the output's
    ``quantization_config`` (its tensors are checked at their dequantized shapes)."""
    qc = config.get("quantization_config")
    if qc is None:
        return
    from transformers.quantizers import AutoQuantizationConfig

    try:
        AutoQuantizationConfig.from_dict(deepcopy(qc))
    except Exception as e:  # any exception of the config class is its verdict
        raise SpliceError(
            f"transformers rejects the output's quantization_config: {_why(e)}"
        ) from None


def _why(e: BaseException) -> str:
    """The first line of ``e``, with the next one where the first only introduces it
    (huggingface_hub's validation errors: "Class validation error for validator 'x':")."""
    lines = [line.strip() for line in str(e).strip().splitlines() if line.strip()]
    if len(lines) > 1 and lines[0].endswith(":"):
        return f"{lines[0]} {lines[1]}"
    return first_line(e)


def _check_lists(config: dict[str, Any], cfg: PretrainedConfig, model_type: str) -> None:
    """SpliceError if a list field of ``config`` (a per-layer field) comes out of transformers'
    config class as something else: it rebuilds it from other fields."""
    for key, planned in config.items():
        if not isinstance(planned, list) or not hasattr(cfg, key):
            continue
        got = getattr(cfg, key)
        if isinstance(got, tuple):
            got = list(got)
        if got != planned:
            raise SpliceError(
                f"transformers rebuilds {key} of {model_type} from other fields: planned "
                f"{_short(planned)}, got {_short(got)}"
            )


def _short(value: Any, most: int = 8) -> str:
    if isinstance(value, list) and len(value) > most:
        return f"[{', '.join(map(repr, value[:most]))}, ... ({len(value)} in all)]"
    return repr(value)


# ---- model ------------------------------------------------------------------------------------
def _model_class(config: dict[str, Any], cfg: PretrainedConfig) -> type[PreTrainedModel]:
    """``config["architectures"][0]`` if transformers has it (for this config class), else the
    class ``AutoModelForCausalLM`` maps the config to."""
    import transformers

    archs = config.get("architectures")
    if isinstance(archs, list) and archs and isinstance(archs[0], str):
        cls = getattr(transformers, archs[0], None) if archs[0].isidentifier() else None
        if (
            isinstance(cls, type)
            and issubclass(cls, transformers.PreTrainedModel)
            and isinstance(cfg, cls.config_class)
        ):
            return cls
    try:
        return transformers.AutoModelForCausalLM._model_mapping[type(cfg)]
    except (KeyError, ValueError, AttributeError):
        name = archs[0] if isinstance(archs, list) and archs else cfg.model_type
        raise SpliceError(
            f"transformers has no causal LM class for the output ({name}); {_UNCHECKED}"
        ) from None


@lru_cache(maxsize=4)
def _meta_model(cls: type[PreTrainedModel], config_json: str) -> PreTrainedModel:
    """``cls`` built from the config ``config_json`` on the meta device, as ``from_pretrained``
    builds it (no memory, no weights initialised; cached per class and config)."""
    import torch

    cfg = _config(json.loads(config_json))

    try:
        from transformers import initialization as init
    except ImportError:  # transformers 4
        init = None
    with contextlib.ExitStack() as stack:
        stack.enter_context(torch.device("meta"))
        for name in ("no_init_weights", "no_tie_weights", "meta_device_safe_creation_ops"):
            if hasattr(init, name):
                stack.enter_context(getattr(init, name)())
        try:
            return cls(cfg)
        except Exception as e:  # the model's own verdict on the config
            raise SpliceError(
                f"transformers cannot build {cls.__name__} from the output's config: {_why(e)}"
            ) from None


# ---- loading ----------------------------------------------------------------------------------
def _simulate(
    model: PreTrainedModel, tensors: Mapping[str, tuple[tuple[int, ...], str]]
) -> LoadReport:
    """The loading of ``tensors`` into ``model`` as transformers 5 does it (its
    ``convert_and_load_state_dict_in_model`` then ``_finalize_model_loading``), on meta
    tensors."""
    import torch

    report = LoadReport(type(model).__name__)
    expected = model.state_dict()
    report.missing = set(expected)
    renamings, converters = _conversions(model)
    by_pattern = {p: c for c in converters for p in c.source_patterns}
    prefix = model.base_model_prefix
    groups: dict[str, Any] = {}  # first target name -> the converter collecting its sources
    unexpected: dict[str, str] = {}  # planned name -> transformers' name for it
    for name in sorted(tensors, key=_natural):
        shape, dtype = tensors[name]
        target, pattern = _rename(name, renamings, converters, prefix, expected)
        if target not in expected and name in expected:
            target, pattern = _rename(name, [], [], prefix, expected)
        if target in expected:
            if pattern is None:
                _place(model, expected, target, tuple(shape), report, name)
                continue
            group = groups.setdefault(target, deepcopy(by_pattern[pattern]))
            group.add_tensor(target, name, pattern, _meta_tensor(shape, dtype))
        else:  # no such tensor in the model (a converter's source among them)
            unexpected[name] = target
    with torch.no_grad():
        for target, group in groups.items():
            _convert(model, expected, target, group, report)
    _tie(model, report.missing)
    _ignore(model, report, unexpected)
    return report


def _conversions(model: PreTrainedModel) -> tuple[list[Any], list[Any]]:
    """The model's checkpoint key renamings and converters (none before transformers 5)."""
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter, WeightRenaming
    except ImportError:
        return [], []
    mapping = get_model_conversion_mapping(model)
    return (
        [t for t in mapping if isinstance(t, WeightRenaming)],
        [t for t in mapping if isinstance(t, WeightConverter)],
    )


def _rename(
    name: str, renamings: list[Any], converters: list[Any], prefix: str, expected: Mapping
) -> tuple[str, str | None]:
    """transformers' name for checkpoint key ``name`` and the source pattern of the converter
    that takes it (None: a plain renaming)."""
    try:
        from transformers.core_model_loading import rename_source_key
    except ImportError:  # transformers 4: only the base model prefix
        if not name.startswith(f"{prefix}.") and f"{prefix}.{name}" in expected:
            return f"{prefix}.{name}", None
        return name, None
    return rename_source_key(name, renamings, converters, prefix, expected)


def module_names(
    model: PreTrainedModel, names: list[str], expected: Mapping[str, Any]
) -> dict[str, str]:
    """transformers' parameter name in live ``model`` (whose state dict is ``expected``) of each
    checkpoint key in ``names`` that a plain renaming of its loader changes (GraniteMoE's
    ``block_sparse_moe.input_linear.weight`` is ``block_sparse_moe.experts.gate_up_proj``);
    keys it converts or keeps are left out."""
    renamings, _ = _conversions(model)
    prefix = getattr(model, "base_model_prefix", "") or ""
    out = {}
    for name in names:
        new, _ = _rename(name, renamings, [], prefix, expected)
        if new != name:
            out[name] = new
    return out


def _natural(name: str) -> list[tuple]:
    """transformers' order of checkpoint keys (numbers numerically)."""
    return [(0, int(p), "") if p.isdigit() else (1, 0, p) for p in name.split(".")]


def _meta_tensor(shape: tuple[int, ...], dtype: str) -> Any:
    """A zero-argument callable making a meta tensor of ``shape`` (what a converter collects)."""
    import torch

    from splice.dtypes import SAFETENSORS_DTYPES, to_torch

    dtype = SAFETENSORS_DTYPES.get(dtype, (dtype, 0))[0]
    try:
        torch_dtype = to_torch(dtype)
    except SpliceError:  # a dtype does not change what loads where
        torch_dtype = torch.float32
    return lambda: torch.empty(tuple(shape), dtype=torch_dtype, device="meta")


def _place(
    model: PreTrainedModel,
    expected: Mapping[str, torch.Tensor],
    target: str,
    shape: tuple[int, ...],
    report: LoadReport,
    source: str,
) -> None:
    """Record the tensor of ``shape`` put at model name ``target`` (``source``: its planned
    name), as transformers' ``set_param_for_module`` does."""
    ref = expected.get(target)
    if ref is None:  # a converter made a tensor the model has no place for
        report.unexpected.add(source)
        return
    report.missing.discard(target)
    if tuple(ref.shape) != tuple(shape):
        report.mismatched[target] = (tuple(shape), tuple(ref.shape))


def _convert(
    model: PreTrainedModel,
    expected: Mapping[str, torch.Tensor],
    target: str,
    group: Any,
    report: LoadReport,
) -> None:
    """Run converter ``group`` (its sources collected for ``target``) on meta tensors and
    place what it makes; if it fails for want of real data, check the names only."""
    sources = sorted(s for names in group.layer_targets.values() for s in names)
    try:
        made = group.convert(target, model=model, config=model.config)
    except Exception as e:
        if "meta" not in str(e).lower():
            report.unconverted[target] = first_line(e)
            return
        for t in group.target_patterns:  # the ops need data: names only
            report.missing.discard(target.replace(group.target_patterns[0], t))
        return
    for name, value in made.items():
        value = value[0] if isinstance(value, list) else value
        _place(model, expected, name, tuple(value.shape), report, sources[0])


def _tie(model: PreTrainedModel, missing: set[str]) -> None:
    """Drop from ``missing`` the tied tensors loading fills from their partner, as
    ``tie_weights(missing_keys=...)`` does: either of a pair may be there; if neither is,
    another tensor tied to the same source may be."""
    tied = getattr(model, "all_tied_weights_keys", None)
    if tied is None:  # transformers 4: parameters shared on the meta model
        tied = _shared(model)
    pairs = list(tied.items())
    for i, (target, source) in enumerate(pairs):
        if source not in missing or target not in missing:
            missing.discard(target)
            missing.discard(source)
            continue
        if any(s == source and t not in missing for t, s in pairs[i + 1 :]):
            missing.discard(target)
            missing.discard(source)


def _shared(model: PreTrainedModel) -> dict[str, str]:
    """name -> first name of each parameter that appears under several names."""
    first: dict[int, str] = {}
    tied: dict[str, str] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        tied_to = first.setdefault(id(p), name)
        if tied_to != name:
            tied[name] = tied_to
    return tied


def _ignore(model: PreTrainedModel, report: LoadReport, unexpected: dict[str, str]) -> None:
    """Keep in ``report`` the missing tensors and the ``unexpected`` ones (planned name ->
    transformers' name) that the model's ``_keys_to_ignore_on_load_missing/unexpected``
    patterns (and the old ``rotary_emb.inv_freq`` and ``position_ids`` buffers) do not let
    pass, as ``_adjust_missing_and_unexpected_keys`` does."""
    buffers = [n for n, _ in model.named_buffers()]
    missing_patterns = set(_patterns(model, "_keys_to_ignore_on_load_missing"))
    unexpected_patterns = set(_patterns(model, "_keys_to_ignore_on_load_unexpected"))
    if any(n.endswith("rotary_emb.inv_freq") for n in buffers):
        unexpected_patterns.add(r"rotary_emb\.inv_freq")
    if any(n.endswith("position_ids") for n in buffers):
        unexpected_patterns.add(r"(^|\.)position_ids$")
    if missing_patterns:
        regex = re.compile("|".join(f"({p})" for p in missing_patterns))
        report.missing = {k for k in report.missing if not regex.search(k)}
    regex = re.compile("|".join(f"({p})" for p in unexpected_patterns) or "(?!)")
    report.unexpected |= {k for k, renamed in unexpected.items() if not regex.search(renamed)}


def _patterns(model: PreTrainedModel, attr: str) -> Iterator[str]:
    """The patterns ``attr`` of the model and of every submodel (transformers 5 gathers them
    on the top model in ``post_init``)."""
    for module in model.modules():
        yield from getattr(module, attr, None) or ()


def _count(names: Any, what: str, shown: list[str] | None = None) -> str:
    shown = shown if shown is not None else sorted(names)[:_SHOWN]
    more = ", ..." if len(names) > len(shown) else ""
    what = what if len(names) == 1 else what.replace("tensor", "tensors", 1)
    return f"{len(names)} {what} ({', '.join(shown)}{more})"


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """transformers' log and Python warnings silenced (the verdict is the one line we raise)."""
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        hf_logging.set_verbosity(level)
