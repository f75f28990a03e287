"""Architecture specs as data: one JSON per ``model_type`` names every tensor of a model.

A spec knows the embedding, final norm and head (tied or not), the per-layer template
``model.layers.{i}.<kind>`` with its kinds grouped as attention / mlp / norms (/ router), the
expert template for MoE (``block_sparse_moe.experts.{e}.<kind>``) and the config keys that change
when the layer or expert count changes. Surgery and data-flow merges only ever need
``spec.parse(name)`` and ``spec.rename(name, layer=j)``. Residual-stream roles are data too
(``norm_feeds``: which norm feeds which linears; ``residual_writers``): ``spec.role(name)``,
``spec.residual_dims(name, ndim)`` and ``spec.feeding_norm(name)`` are all that slicing and norm
folding need, with no tensor-name tests in code.

A spec's JSON fields: ``embed`` / ``final_norm`` / ``lm_head`` (the weight of each global
role) and ``global_tensors`` (further tensors of a role: ``{"final_norm": ["….bias"], "head":
["lm_head.bias"]}``); ``layer_prefix`` and ``layer_tensors`` / ``optional_layer_tensors`` (kinds
by group; hybrid families list each mixer's kinds as optional, since a layer has one of them);
``norm`` (``kind``: ``rms`` | ``layer``, LayerNorm with mean-centering; ``offset``: 1.0 where the
weight is stored as ``w - 1``); ``block``: ``pre_norm`` (norms feed the block, the stream is
written unnormalised), ``parallel`` (attention and MLP read one norm's output and write the
stream together), ``post_norm`` (a norm on each block's *output*, none on its input: OLMo 2/3)
or ``sandwich`` (norms on both sides: Gemma 2/3, GLM-4); ``norm_feeds`` and
``residual_writers`` (the residual stream roles); ``fused``; ``experts``; ``embed_scale``;
``config_keys`` (``num_layers``; ``per_layer``: config lists with one value per layer;
``layer_indices``: config lists of layer indices, e.g. LFM2's ``full_attn_idxs``; a key or a
list of its spellings for ``num_experts`` / ``experts_per_token``); ``unsupported`` (verb ->
the reason it refuses this family, e.g. slicing experts stored packed).

Unknown model types fall back to :meth:`ArchSpec.infer`, which finds the ``…layers.{i}.…``
pattern in the tensor names and warns; every global tensor it cannot classify is ``other``, and
layer-independent operations copy those as they are.
"""

from __future__ import annotations

import json
import re
import warnings
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from functools import cache
from pathlib import Path
from typing import Any

from splice.errors import SpliceError
from splice.st_format import TensorInfo
from splice.stored import StoredLayout, StoredView, layout_of

SPEC_DIR = Path(__file__).parent
GLOBAL_GROUPS = ("embed", "final_norm", "head")


@dataclass(frozen=True)
class TensorName:
    """What a tensor name means: its group, layer, expert and layer-relative kind.

    ``kind`` is the name with the layer (and expert) prefix removed, e.g. ``self_attn.q_proj.weight``
    or ``w1.weight`` for an expert tensor; for global tensors it is the full name.
    """

    group: str  # embed | head | final_norm | attention | mlp | norms | router | experts | other
    kind: str
    layer: int | None = None
    expert: int | None = None


@dataclass(frozen=True)
class ExpertSpec:
    """MoE experts inside a layer: ``prefix`` holds ``{e}``; ``tensors`` are per-expert kinds.

    ``packed`` describes a second storage layout in which all experts of a layer share one tensor
    (transformers >= 5's Mixtral, as mergekit-moe writes it): a layer-relative name such as
    ``mlp.experts.gate_up_proj`` ``[E, 2I, H]`` maps to the per-expert kinds stacked along dim 1
    of each expert's block (``w1.weight``, ``w3.weight``). ``aliases`` renames layer-relative
    tensors of that layout (``mlp.gate.weight`` -> ``block_sparse_moe.gate.weight``).
    """

    prefix: str
    tensors: tuple[str, ...]
    dense_equivalent: dict[str, str] = field(default_factory=dict)
    dense_model_type: str | None = None
    packed: dict[str, tuple[str, ...]] = field(default_factory=dict)
    aliases: dict[str, str] = field(default_factory=dict)
    #: layer-relative module prefixes of the shared experts every token goes through
    #: (``mlp.shared_expert.`` in Qwen2-MoE, ``mlp.shared_experts.`` in DeepSeek)
    shared: tuple[str, ...] = ()
    #: tensors the family stores packed on disk and nowhere else (gpt-oss, GraniteMoE): read
    #: per expert, written packed again (:mod:`splice.stored`)
    stored: dict[str, StoredLayout] = field(default_factory=dict)
    #: router tensors (layer-relative) with one entry per expert, and the axis of the entries
    #: (the router's rows, selection biases): what keeping some experts keeps of them
    per_expert: dict[str, int] = field(default_factory=dict)


def _template_regex(template: str, placeholder: str) -> re.Pattern[str]:
    before, after = template.split(placeholder)
    return re.compile(f"^{re.escape(before)}(\\d+){re.escape(after)}(.*)$")


@dataclass(frozen=True)
class ArchSpec:
    """Names and config keys of one architecture (see the module docstring)."""

    model_type: str
    embed: str
    final_norm: str
    lm_head: str
    layer_prefix: str
    layer_tensors: dict[str, tuple[str, ...]]
    architectures: tuple[str, ...] = ()
    optional_layer_tensors: dict[str, tuple[str, ...]] = field(default_factory=dict)
    experts: ExpertSpec | None = None
    residual_writers: tuple[str, ...] = ()
    norm_feeds: dict[str, tuple[str, ...]] = field(default_factory=dict)
    fused: dict[str, tuple[str, ...]] = field(default_factory=dict)
    tied_default: bool = False
    embed_scale: str | None = None
    global_tensors: dict[str, tuple[str, ...]] = field(default_factory=dict)
    block: str = "pre_norm"
    #: verb -> why it cannot handle this family yet (its one-line refusal); besides the verbs,
    #: ``layer_map`` (any plan that moves, repeats, drops or scales layers) and ``vocab`` (a
    #: merge or transplant onto another vocabulary): see :meth:`refuse`
    unsupported: dict[str, str] = field(default_factory=dict)
    #: every layer holds the same tensors of the same shapes (False: Gemma 4, whose full- and
    #: sliding-attention layers differ; ``validate`` then leaves the shapes to the load check)
    uniform_layers: bool = True
    norm: dict[str, Any] = field(default_factory=lambda: {"kind": "rms", "offset": 0.0})
    config_keys: dict[str, Any] = field(default_factory=dict)
    inferred: bool = False

    # ---- construction -------------------------------------------------------------------
    @classmethod
    def from_dict(cls, d: dict[str, Any], inferred: bool = False) -> ArchSpec:
        experts = d.get("experts")
        return cls(
            model_type=d["model_type"],
            architectures=tuple(d.get("architectures", ())),
            embed=d["embed"],
            final_norm=d["final_norm"],
            lm_head=d["lm_head"],
            layer_prefix=d["layer_prefix"],
            layer_tensors={k: tuple(v) for k, v in d["layer_tensors"].items()},
            optional_layer_tensors={
                k: tuple(v) for k, v in d.get("optional_layer_tensors", {}).items()
            },
            experts=ExpertSpec(
                prefix=experts["prefix"],
                tensors=tuple(experts["tensors"]),
                dense_equivalent=dict(experts.get("dense_equivalent", {})),
                dense_model_type=experts.get("dense_model_type"),
                packed={k: tuple(v) for k, v in experts.get("packed", {}).items()},
                aliases=dict(experts.get("aliases", {})),
                shared=tuple(experts.get("shared", ())),
                stored={k: layout_of(v) for k, v in experts.get("stored", {}).items()},
                per_expert={k: int(v) for k, v in experts.get("per_expert", {}).items()},
            )
            if experts
            else None,
            residual_writers=tuple(d.get("residual_writers", ())),
            norm_feeds={k: tuple(v) for k, v in d.get("norm_feeds", {}).items()},
            fused={k: tuple(v) for k, v in d.get("fused", {}).items()},
            tied_default=bool(d.get("tied_default", False)),
            embed_scale=d.get("embed_scale"),
            global_tensors={k: tuple(v) for k, v in d.get("global_tensors", {}).items()},
            block=d.get("block", "pre_norm"),
            unsupported=dict(d.get("unsupported", {})),
            uniform_layers=bool(d.get("uniform_layers", True)),
            norm=dict(d.get("norm", {"kind": "rms", "offset": 0.0})),
            config_keys=dict(d.get("config_keys", {})),
            inferred=inferred,
        )

    def refuse(self, what: str) -> None:
        """One-line ``SpliceError`` if this family cannot do ``what`` (a verb, ``layer_map`` or
        ``vocab``: :attr:`unsupported`); nothing otherwise."""
        why = self.unsupported.get(what)
        if why:
            verb = {"layer_map": "a layer map", "vocab": "another vocabulary"}.get(what, what)
            raise SpliceError(f"{verb}: architecture {self.model_type!r} is not supported: {why}")

    @staticmethod
    def known() -> list[str]:
        """Model types with a spec file."""
        return sorted(p.stem for p in SPEC_DIR.glob("*.json"))

    @staticmethod
    def load(model_type: str) -> ArchSpec:
        """The spec for a known ``model_type`` (``SpliceError`` if there is none)."""
        return _load_spec(model_type)

    @staticmethod
    def of_output(config: Mapping[str, Any]) -> ArchSpec | None:
        """The spec whose names an output with ``config`` is written in: its ``model_type``'s,
        a per-layer sliced model's source family's (``sliced_from``); None when unknown."""
        from splice.sliced_check import SLICED_TYPE

        model_type = config.get("model_type")
        if model_type == SLICED_TYPE:
            model_type = config.get("sliced_from")
        return _load_spec(model_type) if model_type in ArchSpec.known() else None

    @staticmethod
    def for_model(config: dict[str, Any], names: Iterable[str] = ()) -> ArchSpec:
        """Spec for a model's config; unknown types are inferred from ``names`` with a warning."""
        model_type = config.get("model_type")
        if model_type in ArchSpec.known():
            return _load_spec(model_type)
        spec = ArchSpec.infer(str(model_type), list(names))
        n = config.get(spec.num_layers_key)
        lists = [k for k, v in config.items() if isinstance(v, list) and n and len(v) == n]
        warnings.warn(
            f"no spec for model_type {model_type!r}; inferred layers "
            f"{spec.layer_prefix!r} from tensor names"
            + (f" and per-layer config fields {', '.join(lists)}" if lists else "")
            + f" (known: {', '.join(ArchSpec.known())})",
            stacklevel=2,
        )
        return spec

    @staticmethod
    def infer(model_type: str, names: list[str]) -> ArchSpec:
        """Guess a spec from tensor names: the most common ``<prefix>.<digits>.`` is the layer."""
        pattern = re.compile(r"^(.*?\b(?:layers|layer|h|blocks|block))\.(\d+)\.(.+)$")
        prefixes = Counter(m.group(1) for n in names if (m := pattern.match(n)))
        if not prefixes:
            raise SpliceError(
                f"unknown architecture {model_type!r}: no spec and no per-layer tensor names "
                f"like '<...>.layers.N.<...>' to infer one from (known: "
                f"{', '.join(ArchSpec.known())})"
            )
        prefix = prefixes.most_common(1)[0][0]
        layer_prefix = f"{prefix}.{{i}}."
        kinds: dict[str, list[str]] = {"attention": [], "mlp": [], "norms": [], "other": []}
        seen: set[str] = set()
        rx = _template_regex(layer_prefix, "{i}")
        for n in names:
            m = rx.match(n)
            if not m or m.group(2) in seen:
                continue
            kind = m.group(2)
            seen.add(kind)
            low = kind.lower()
            if "norm" in low or re.search(r"(^|\.)ln", low):
                kinds["norms"].append(kind)
            elif "attn" in low or "attention" in low:
                kinds["attention"].append(kind)
            elif "mlp" in low or "ffn" in low or "fc" in low or "feed_forward" in low:
                kinds["mlp"].append(kind)
            else:
                kinds["other"].append(kind)
        globals_ = sorted((n for n in names if not rx.match(n)), key=_weights_first)
        token_embeds = [n for n in globals_ if "embed" in n or "wte" in n]
        embed = next(  # the token embedding, not a position embedding (OPT, GPT-2)
            (n for n in token_embeds if re.search(r"tok|wte|word", n)),
            next((n for n in token_embeds if "pos" not in n and "wpe" not in n), ""),
        )
        head = next((n for n in globals_ if "lm_head" in n), "lm_head.weight")
        norm = next((n for n in globals_ if "norm" in n or "ln_f" in n), "")
        extra = {  # the rest of the head's and the final norm's module (biases)
            group: tuple(
                n for n in globals_ if n != main and main and _module_of(n) == _module_of(main)
            )
            for group, main in (("final_norm", norm), ("head", head))
        }
        return ArchSpec(
            model_type=model_type,
            embed=embed,
            final_norm=norm,
            lm_head=head,
            layer_prefix=layer_prefix,
            layer_tensors={k: tuple(v) for k, v in kinds.items() if v},
            global_tensors={k: v for k, v in extra.items() if v},
            inferred=True,
        )

    # ---- names ----------------------------------------------------------------------------
    @property
    def _layer_rx(self) -> re.Pattern[str]:
        return _compiled(self.layer_prefix, "{i}")

    def _kind_groups(self) -> dict[str, str]:
        groups: dict[str, str] = {}
        for table in (self.layer_tensors, self.optional_layer_tensors):
            for group, kinds in table.items():
                for kind in kinds:
                    groups[kind] = group
        return groups

    def _global_groups(self) -> dict[str, str]:
        return {n: group for group, names in self.global_tensors.items() for n in names}

    def globals_of(self, group: str) -> tuple[str, ...]:
        """Every tensor name of a global role (``embed``, ``final_norm``, ``head``): its weight
        first, then the role's further tensors (biases), e.g. ``("model.final_layernorm.weight",
        "model.final_layernorm.bias")``."""
        main = {"embed": self.embed, "final_norm": self.final_norm, "head": self.lm_head}[group]
        return tuple(n for n in (main, *self.global_tensors.get(group, ())) if n)

    def main_role(self, name: str) -> str | None:
        """The global role (``embed``, ``final_norm``, ``head``) whose main weight ``name``
        is, or None (a bias, a layer tensor, anything else)."""
        return next((g for g in GLOBAL_GROUPS if self.globals_of(g)[:1] == (name,)), None)

    def parse(self, name: str) -> TensorName:
        """Classify a tensor name (see :class:`TensorName`)."""
        if name == self.embed:
            return TensorName("embed", name)
        if name == self.lm_head:
            return TensorName("head", name)
        if name == self.final_norm:
            return TensorName("final_norm", name)
        m = self._layer_rx.match(name)
        if not m:
            return TensorName(self._global_groups().get(name, "other"), name)
        layer, kind = int(m.group(1)), m.group(2)
        if self.experts is not None:
            e = _compiled(self.experts.prefix, "{e}").match(kind)
            if e:
                return TensorName("experts", e.group(2), layer, int(e.group(1)))
            if kind in self.experts.stored:  # all experts of the layer, as stored
                return TensorName("experts", kind, layer)
        return TensorName(self._kind_groups().get(kind, "other"), kind, layer)

    def layer_of(self, name: str) -> int | None:
        """Layer index of a per-layer tensor, ``None`` for embeddings, head and final norm."""
        m = self._layer_rx.match(name)
        return int(m.group(1)) if m else None

    def layer_name(self, layer: int, kind: str, expert: int | None = None) -> str:
        """Full name of ``kind`` in ``layer`` (and ``expert`` for expert kinds)."""
        prefix = self.layer_prefix.replace("{i}", str(layer))
        if expert is not None:
            if self.experts is None:
                raise ValueError(f"{self.model_type} has no experts")
            prefix += self.experts.prefix.replace("{e}", str(expert))
        return prefix + kind

    def rename(self, name: str, layer: int | None = None, expert: int | None = None) -> str:
        """The same tensor moved to another layer and/or expert: ``rename(n, layer=j)``."""
        t = self.parse(name)
        if t.layer is None:
            if layer is not None or expert is not None:
                raise ValueError(f"{name!r} is not a per-layer tensor")
            return name
        new_layer = t.layer if layer is None else layer
        if t.group == "experts":
            return self.layer_name(new_layer, t.kind, t.expert if expert is None else expert)
        if expert is not None:
            raise ValueError(f"{name!r} is not an expert tensor")
        return self.layer_name(new_layer, t.kind)

    def is_residual_writer(self, name: str) -> bool:
        """True for tensors that write into the residual stream (``o_proj``, ``down_proj``, ...).

        Scaling the stream by ``w`` before a layer equals dividing these tensors (weights and
        biases) of that layer and all later ones by ``w``, because RMSNorm is scale-invariant.
        """
        return self.role(name) == "writer"

    # ---- residual-stream roles (what slicing and norm folding need, as data) ----------------
    def _module(self, name: str) -> tuple[TensorName, str, str] | None:
        """``(parsed, layer-relative module with {e} for experts, parameter)`` of a layer
        tensor, e.g. ``("block_sparse_moe.experts.{e}.w1", "weight")``; None for globals."""
        t = self.parse(name)
        if t.layer is None:
            return None
        kind = t.kind if t.expert is None else self.experts.prefix + t.kind  # type: ignore[union-attr]
        module, _, param = kind.rpartition(".")
        return t, module, param

    def role(self, name: str) -> str:
        """How ``name`` touches the residual stream of width ``hidden``:

        ``embed`` ``[V, hidden]`` and ``head`` ``[V, hidden]`` (rows are tokens); ``final_norm``
        and ``norm`` ``[hidden]``, each feeding the linears ``norm_feeds`` lists (the final norm
        feeds the head); ``reader``: a linear whose input is the normed stream (q/k/v, gate/up,
        the router, experts' w1/w3), weight ``[out, hidden]``, bias not on the stream;
        ``writer``: a linear whose output is added to the stream (o_proj, down_proj, experts'
        w2), weight ``[hidden, in]``, bias ``[hidden]``; ``inner``: a tensor the spec names
        that never touches the stream (q/k norms over head dims, a convolution's kernel, an
        activation's parameters), which slicing copies as it is; ``other`` for anything else
        (a name the spec does not know).
        """
        t = self.parse(name)
        if t.layer is None:
            return t.group if t.group in GLOBAL_GROUPS else "other"
        parsed = self._module(name)
        if parsed is None:
            return "other"
        t, module, _ = parsed
        if t.kind in self.norm_feeds or f"{module}.weight" in self.norm_feeds:
            return "norm"  # a norm's weight, or its bias (LayerNorm families)
        if module in self.residual_writers:
            return "writer"
        if any(module in feeds for feeds in self.norm_feeds.values()):
            return "reader"
        if t.group not in ("other", "norms"):  # a norm feeding nothing is on the stream
            return "inner"
        return "other"

    def residual_dims(self, name: str, ndim: int) -> tuple[int, ...]:
        """The dimensions of tensor ``name`` (``ndim`` of them) that index the residual stream:
        ``(1,)`` for embeddings, head and reader weights, ``(0,)`` for norms and writer weights
        and biases, ``()`` for reader biases and anything else (as mergekit's input / output
        spaces say which side of a tensor lives in the stream)."""
        role = self.role(name)
        if role in ("embed", "head"):
            return (1,) if ndim == 2 else ()  # a head's bias is over the vocabulary
        if role in ("final_norm", "norm"):
            return (0,)
        if role == "reader":
            return (1,) if ndim == 2 else ()
        if role == "writer":
            return (0,)
        return ()

    def feeding_norm(self, name: str) -> str | None:
        """The norm whose output a reader (or the head) reads: a full tensor name, or None."""
        if name == self.lm_head:
            return self.final_norm
        parsed = self._module(name)
        if parsed is None:
            return None
        t, module, _ = parsed
        for norm, feeds in self.norm_feeds.items():
            if module in feeds:
                return self.layer_name(t.layer, norm)  # type: ignore[arg-type]
        return None

    # ---- experts and their dense equivalent ------------------------------------------------
    def dense_kind(self, expert_kind: str) -> str:
        """The dense MLP's layer-relative kind an expert kind corresponds to
        (Mixtral ``w1.weight`` -> ``mlp.gate_proj.weight``); ``SpliceError`` if none."""
        mapping = self.experts.dense_equivalent if self.experts else {}
        if expert_kind not in mapping:
            raise SpliceError(f"{self.model_type}: no dense equivalent for expert {expert_kind!r}")
        return mapping[expert_kind]

    def expert_kind(self, dense_kind: str) -> str | None:
        """The inverse of :meth:`dense_kind` (``None``: not an MLP tensor experts replace)."""
        mapping = self.experts.dense_equivalent if self.experts else {}
        return next((e for e, d in mapping.items() if d == dense_kind), None)

    def unpack(self, tensors: Mapping[str, TensorInfo]) -> dict[str, TensorInfo]:
        """``tensors`` with packed expert tensors replaced by per-expert views (see ExpertSpec).

        A packed ``[E, k·R, *rest]`` tensor becomes ``E·k`` views ``[R, *rest]`` named by the
        expert template, in storage order. Each expert's block and each part of it are
        contiguous, so a view is the same file at another offset: nothing is read or copied, and
        everything downstream (merge, analysis, convert) sees the per-expert layout.
        """
        ex = self.experts
        if ex is None or not (ex.packed or ex.aliases or ex.stored):
            return dict(tensors)
        out: dict[str, TensorInfo] = {}
        for name, info in tensors.items():
            m = self._layer_rx.match(name)
            kind = m.group(2) if m else None
            if m is None or kind not in {**ex.packed, **ex.aliases, **ex.stored}:
                out[name] = info
                continue
            layer = int(m.group(1))
            if kind in ex.stored:
                out.update(self._stored_views(name, info, layer, ex.stored[kind]))
                continue
            if kind in ex.aliases:
                new = self.layer_name(layer, ex.aliases[kind])
                out[new] = replace(info, name=new)
                continue
            parts = ex.packed[kind]
            if info.offset < 0 or len(info.shape) < 2 or info.shape[1] % len(parts):
                raise SpliceError(
                    f"{name}: packed experts of shape {list(info.shape)} cannot be split into "
                    f"{', '.join(parts)}" + (" (pickled weights)" if info.offset < 0 else "")
                )
            n_experts, rows = info.shape[0], info.shape[1] // len(parts)
            size = info.nbytes // (n_experts * len(parts))
            for e in range(n_experts):
                for j, part in enumerate(parts):
                    new = self.layer_name(layer, part, e)
                    offset = info.offset + (e * len(parts) + j) * size
                    out[new] = replace(
                        info, name=new, shape=(rows, *info.shape[2:]), offset=offset, nbytes=size
                    )
        return out

    def _stored_views(
        self, name: str, info: TensorInfo, layer: int, layout: StoredLayout
    ) -> dict[str, TensorInfo]:
        """The per-expert views of stored tensor ``name`` ``[E, *block]`` (splice.stored)."""
        try:
            if info.offset < 0 or len(info.shape) < 2:
                raise ValueError("pickled weights" if info.offset < 0 else "no expert axis")
            part = layout.part_shape(info.shape[1:])
        except ValueError as e:
            raise SpliceError(
                f"{name}: experts stored as {list(info.shape)} cannot be split into "
                f"{', '.join(layout.parts)} ({e})"
            ) from None
        n_experts, n = info.shape[0], len(layout.parts)
        block = info.nbytes // n_experts
        size = block // n
        out = {}
        for e in range(n_experts):
            start = info.offset + e * block
            for j, kind in enumerate(layout.parts):
                new = self.layer_name(layer, kind, e)
                view = StoredView(name, e, j, layout, start, block, tuple(info.shape[1:]))
                offset = start + j * size if layout.contiguous else start
                out[new] = replace(
                    info, name=new, shape=part, offset=offset, nbytes=size, view=view
                )
        return out

    def module_location(self, name: str) -> tuple[str, int | None, int, int]:
        """Where tensor ``name`` (this spec's per-expert layout) lives in transformers' module
        when that packs experts (see ExpertSpec): ``(parameter name, expert, part, parts)``,
        the expert's block ``[e]`` of the packed ``[E, parts·R, *rest]`` parameter, rows
        ``part·R`` to ``(part + 1)·R``; ``(name, None, 0, 1)`` when it is stored as it is
        (an alias renamed back). The inverse of :meth:`unpack`."""
        ex = self.experts
        t = self.parse(name)
        if ex is None or t.layer is None:
            return name, None, 0, 1
        if t.group == "experts" and t.expert is not None:
            for packed, parts in ex.packed.items():
                if t.kind in parts:
                    return (
                        self.layer_name(t.layer, packed),
                        t.expert,
                        parts.index(t.kind),
                        len(parts),
                    )
            return name, None, 0, 1
        back = {v: k for k, v in ex.aliases.items()}
        if t.kind in back:
            return self.layer_name(t.layer, back[t.kind]), None, 0, 1
        return name, None, 0, 1

    def required_layer_kinds(self) -> list[str]:
        """Layer-relative kinds every layer must have (experts excluded)."""
        return [k for kinds in self.layer_tensors.values() for k in kinds]

    # ---- config ---------------------------------------------------------------------------
    @property
    def num_layers_key(self) -> str:
        return self.config_keys.get("num_layers", "num_hidden_layers")

    def num_layers(self, config: dict[str, Any]) -> int | None:
        value = config.get(self.num_layers_key)
        return int(value) if value is not None else None

    def config_key(self, role: str, config: Mapping[str, Any]) -> str | None:
        """The config key of ``role`` (``num_experts``, ``experts_per_token``): the spec names
        one, or several spellings (transformers 5 vs hub configs), of which the first present
        in ``config`` (else the first) is meant."""
        keys = self.config_keys.get(role)
        if not keys:
            return None
        keys = [keys] if isinstance(keys, str) else list(keys)
        return next((k for k in keys if config.get(k) is not None), keys[0])

    def mtp_layers(self, config: Mapping[str, Any]) -> range:
        """The layer indices of the multi-token-prediction layers a checkpoint stores after its
        decoder layers (``config_keys.mtp_layers``: DeepSeek-V3 and GLM-4.5's
        ``num_nextn_predict_layers``); empty for other families."""
        key = self.config_keys.get("mtp_layers")
        n = self.num_layers(dict(config))
        count = int(config.get(key) or 0) if key else 0
        return range(n, n + count) if n is not None and count > 0 else range(0)

    def num_experts(self, config: dict[str, Any]) -> int | None:
        key = self.config_key("num_experts", config)
        return int(config[key]) if key and config.get(key) is not None else None

    def experts_per_token(self, config: dict[str, Any]) -> int | None:
        key = self.config_key("experts_per_token", config)
        return int(config[key]) if key and config.get(key) is not None else None

    def shared_expert(self, kind: str) -> str | None:
        """The shared expert (its module prefix, ``mlp.shared_experts.``) a layer-relative
        kind belongs to, or None."""
        shared = self.experts.shared if self.experts else ()
        return next((p for p in shared if kind.startswith(p)), None)

    def is_tied(self, config: dict[str, Any], names: Iterable[str] | None = None) -> bool:
        """Whether the head shares the embedding matrix (no ``lm_head`` tensor is stored)."""
        if names is not None:
            return self.lm_head not in set(names)
        return bool(config.get("tie_word_embeddings", self.tied_default))

    def config_with_experts(
        self, config: dict[str, Any], num_experts: int | None, per_token: int | None = None
    ) -> dict[str, Any]:
        """Config with a new expert count (``None``: the experts were collapsed to a dense MLP)."""
        out = dict(config)
        for role, value in (("num_experts", num_experts), ("experts_per_token", per_token)):
            key = self.config_key(role, config)
            if key and value is not None:
                out[key] = value
        return out


def _module_of(name: str) -> str:
    return name.rpartition(".")[0]


def _weights_first(name: str) -> tuple[bool, str]:
    """Sort key: a module's ``weight`` before its ``bias`` and other parameters."""
    return (not name.endswith(".weight"), name)


@cache
def _compiled(template: str, placeholder: str) -> re.Pattern[str]:
    return _template_regex(template, placeholder)


@cache
def _load_spec(model_type: str) -> ArchSpec:
    path = SPEC_DIR / f"{model_type}.json"
    if not path.is_file():
        raise SpliceError(
            f"unknown architecture {model_type!r}; known: {', '.join(ArchSpec.known())}"
        )
    return ArchSpec.from_dict(json.loads(path.read_text()))
