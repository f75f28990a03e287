"""Multimodal checkpoints: the language model as its text family, the other modules carried.

A vision-language checkpoint (``…ForConditionalGeneration``) stores its language model beside
a vision tower and a projector, under a prefix, with the text settings in a config section
(``text_config``). :data:`LAYOUTS` says, per multimodal ``model_type``, where each module is
and which text family the language model is. :class:`LanguageModel` opens such a folder as that
text family (``model.layers.N.…``, the section as its config), so every verb plans on the
language model as on any text model; :func:`carry_modules` turns the planned text model back
into the multimodal checkpoint (its names, its config with ``text_config`` rewritten, the other
modules copied from the model the tokenizer comes from); :func:`plan_text_only` writes the text
model alone (``convert --text-only``).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from splice.arch import ArchSpec
from splice.checkpoint import Checkpoint
from splice.errors import SpliceError, first_line
from splice.quant import logical_tensors, part_key
from splice.st_format import TensorInfo, show
from splice.stored import StoredLayout, pack_tasks

if TYPE_CHECKING:
    from splice.output import ModelPlan

#: the language model's module, as mergekit's ``modules:`` recipes name it
TEXT_MODULE = "text_decoder"


@dataclass(frozen=True)
class Layout:
    """How one multimodal family stores its modules.

    ``text``: prefixes of the language model's tensors (each layout transformers has saved),
    read as ``model.``; ``head``: the untied output head's name under each of them (same
    order); ``modules``: prefix -> module name of every other tensor (vision tower,
    projector; longest prefix first); ``text_type``: the text family, ``architectures`` its
    causal-LM class; ``text_types``: the section's own ``model_type`` -> text family where it
    names another (``ministral3``).
    """

    text_type: str
    architectures: tuple[str, ...]
    text: tuple[str, ...]
    head: tuple[str, ...]
    modules: dict[str, str]
    section: str = "text_config"
    text_types: dict[str, tuple[str, str]] = field(default_factory=dict)
    #: the modules' linears that write the language model's residual stream (the projector's
    #: last one), a regex on the stored name after any ``model.``: -> (the decoder layer whose
    #: input they write, or the ``layer`` group's offset; whether stored ``[in, hidden]``)
    writers: dict[str, tuple[int, bool]] = field(default_factory=dict)
    #: config paths (``section.key``) that hold the language model's width, set with it
    widths: tuple[str, ...] = ()
    #: why the language model cannot be sliced inside this checkpoint, if it cannot
    unsliceable: str | None = None
    #: the spec of the language model's tensors as stored, where its experts are stored
    #: packed unlike the text family's (read through it, written packed again by it)
    stored: str | None = None
    #: fields the text family's config needs to compute what the language model computes
    text_fields: dict[str, Any] = field(default_factory=dict)

    def stream_writers(self, names: Any) -> dict[str, tuple[int, bool]]:
        """``{stored name: (decoder layer whose input it writes, stored transposed)}`` of the
        module tensors among ``names`` that write the language model's residual stream
        (:attr:`writers`; a pattern's ``layer`` group counts from its offset)."""
        import re

        out = {}
        for name in names:
            bare = name.removeprefix("model.")
            for pattern, (at, transposed) in self.writers.items():
                m = re.fullmatch(pattern, bare)
                if m:
                    layer = at + int(m.group("layer")) if "layer" in m.groupdict() else at
                    out[name] = (layer, transposed)
        return out

    def module_of(self, name: str) -> str | None:
        """The module of a stored tensor other than the language model's, else None."""
        return next((m for p, m in self.modules.items() if name.startswith(p)), None)

    def text_name(self, name: str) -> tuple[str, int] | None:
        """``(text family name, layout index)`` of a stored language-model tensor, else None."""
        for i, (prefix, head) in enumerate(zip(self.text, self.head, strict=True)):
            if name == head:
                return "lm_head.weight", i
            if name.startswith(prefix):
                return "model." + name[len(prefix) :], i
        return None

    def stored_name(self, name: str, index: int) -> str:
        """A text family name (``model.X``, ``lm_head.weight``) in layout ``index``."""
        if name == "lm_head.weight":
            return self.head[index]
        return self.text[index] + name.removeprefix("model.")

    def family(self, section: dict[str, Any]) -> tuple[str, str]:
        """``(text family, causal-LM class)`` of the language model whose config section is
        ``section``."""
        return self.text_types.get(
            section.get("model_type"), (self.text_type, self.architectures[0])
        )


_TOWER, _PROJECTOR = "vision_tower", "multi_modal_projector"


def _llava(
    text_type: str,
    architecture: str,
    writers: dict[str, tuple[int, bool]],
    *,
    tower: str = _TOWER,
    **kw: Any,
) -> Layout:
    """A LLaVA-style checkpoint (a language model, a vision tower and a
    ``multi_modal_projector``), as transformers saves it: ``model.language_model.*`` and
    ``lm_head.*`` (4.52-4.x), or ``language_model.model.*`` and ``language_model.lm_head.*``
    (transformers 5, and Google's, Mistral's and Meta's own files)."""
    return Layout(
        text_type=text_type,
        architectures=(architecture,),
        text=("model.language_model.", "language_model.model."),
        head=("lm_head.weight", "language_model.lm_head.weight"),
        modules={
            f"model.{tower}.": tower,
            f"{tower}.": tower,
            f"model.{_PROJECTOR}.": _PROJECTOR,
            f"{_PROJECTOR}.": _PROJECTOR,
        },
        writers={f"{_PROJECTOR}\\.{w}": at for w, at in writers.items()},
        **kw,
    )


def _qwen_vl(
    text_type: str, architecture: str, writers: dict[str, tuple[int, bool]], **kw: Any
) -> Layout:
    """A Qwen-VL checkpoint: ``model.*`` / ``visual.*`` / ``lm_head.weight`` (Qwen's files and
    transformers 5) or ``model.language_model.*`` / ``model.visual.*`` (4.52-4.x); the
    projector is the vision tower's ``merger`` (and Qwen3-VL's ``deepstack_merger_list``)."""
    modules = {}
    for root in ("model.visual.", "visual."):
        modules[root + "merger."] = _PROJECTOR
        modules[root + "deepstack_merger_list."] = _PROJECTOR
    for root in ("model.visual.", "visual."):
        modules[root] = _TOWER
    return Layout(
        text_type=text_type,
        architectures=(architecture,),
        text=("model.language_model.", "model."),
        head=("lm_head.weight", "lm_head.weight"),
        modules=modules,
        writers={f"visual\\.{w}": at for w, at in writers.items()},
        widths=("vision_config.out_hidden_size",),
        **kw,
    )


_HEAD_DIM = (
    "its text config has no head_dim: transformers derives it from hidden_size / "
    "num_attention_heads, so a narrower stream would narrow every head"
)
#: multimodal ``model_type`` -> where its modules are
LAYOUTS: dict[str, Layout] = {
    "gemma3": _llava("gemma3_text", "Gemma3ForCausalLM", {"mm_input_projection_weight": (0, True)}),
    "mistral3": _llava(  # Mistral Small 3.x; Ministral 3's section says ministral3
        "mistral",
        "MistralForCausalLM",
        {r"linear_2\.(weight|bias)": (0, False)},
        text_types={"ministral3": ("ministral3", "Ministral3ForCausalLM")},
        unsliceable="its projector's inner width is the language model's (text_config."
        "hidden_size), and an activation between its linears does not commute with a rotation",
    ),
    "llama4": _llava(
        "llama4_text",
        "Llama4ForCausalLM",
        {r"linear_1\.(weight|bias)": (0, False)},
        tower="vision_model",
    ),
    "qwen2_vl": _qwen_vl(
        "qwen2",
        "Qwen2ForCausalLM",
        {r"merger\.mlp\.2\.(weight|bias)": (0, False)},
        unsliceable=_HEAD_DIM,
    ),
    "qwen2_5_vl": _qwen_vl(
        "qwen2",
        "Qwen2ForCausalLM",
        {r"merger\.mlp\.2\.(weight|bias)": (0, False)},
        unsliceable=_HEAD_DIM,
    ),
    "qwen3_vl": _qwen_vl(  # deepstack merger k adds to the stream after decoder layer k
        "qwen3",
        "Qwen3ForCausalLM",
        {
            r"merger\.linear_fc2\.(weight|bias)": (0, False),
            r"deepstack_merger_list\.(?P<layer>\d+)\.linear_fc2\.(weight|bias)": (1, False),
        },
    ),
    "qwen3_vl_moe": _qwen_vl(  # Qwen3-MoE's language model, its experts stored packed
        "qwen3_moe",
        "Qwen3MoeForCausalLM",
        {
            r"merger\.linear_fc2\.(weight|bias)": (0, False),
            r"deepstack_merger_list\.(?P<layer>\d+)\.linear_fc2\.(weight|bias)": (1, False),
        },
        stored="qwen3_vl_moe_text",
        text_fields={"norm_topk_prob": True},  # its router always renormalises the top k
    ),
    # Gemma 4: transformers 5 saves model.language_model.* (no renaming on save or load); the
    # vision and audio towers each reach the stream through an embedder (a scale-free RMSNorm,
    # then embedding_projection [text hidden, tower width])
    "gemma4": Layout(
        text_type="gemma4_text",
        architectures=("Gemma4ForCausalLM",),
        text=("model.language_model.",),
        head=("lm_head.weight",),
        modules={
            f"model.{_TOWER}.": _TOWER,
            "model.embed_vision.": _PROJECTOR,
            "model.audio_tower.": "audio_tower",
            "model.embed_audio.": "audio_projector",
        },
        writers={
            r"embed_vision\.embedding_projection\.weight": (0, False),
            r"embed_audio\.embedding_projection\.weight": (0, False),
        },
    ),
}

#: top-level fields a text model takes when its section does not set them
_CARRIED = ("bos_token_id", "eos_token_id", "pad_token_id")
#: Qwen-VL's multimodal RoPE fields: on text alone its three position axes are equal, which is
#: the text family's own RoPE, so the text config leaves them out
_MROPE = ("mrope_section", "mrope_interleaved")
#: config sections that mark a multimodal checkpoint
_SECTIONS = ("text_config", "vision_config", "audio_config")
#: files a multimodal model's processor reads, carried beside the tokenizer's
PROCESSOR_FILES = (
    "preprocessor_config.json",
    "processor_config.json",
    "video_preprocessor_config.json",
)


def is_multimodal(config: dict[str, Any]) -> bool:
    """Whether ``config`` is a multimodal model's (a vision or audio section beside the text)."""
    return any(isinstance(config.get(s), dict) for s in _SECTIONS[1:])


def layout_of(config: dict[str, Any], where: str) -> Layout:
    """The layout for a checkpoint's ``config``; one ``SpliceError`` line if it is not
    multimodal or its family has none yet (``where``: the model, for the message)."""
    model_type = config.get("model_type")
    if model_type in LAYOUTS:
        return LAYOUTS[str(model_type)]
    if not any(isinstance(config.get(s), dict) for s in _SECTIONS):
        raise SpliceError(
            f"{where}: --text-only takes a multimodal model, and model_type {model_type!r} is "
            "not one (it has no text_config or vision_config); nothing was written"
        )
    raise SpliceError(
        f"{where}: splice has no layout for the multimodal model_type {model_type!r} yet "
        f"(known: {', '.join(sorted(LAYOUTS))}); nothing was written"
    )


def text_config(config: dict[str, Any], m: Layout, *, tied: bool) -> dict[str, Any]:
    """The text family's ``config.json``: the multimodal config's ``m.section`` as
    transformers reads it (with every default its class fills in, since a ``config.json`` holds
    only what differs from them), the token ids the top level sets, dtype and tying."""
    from transformers import CONFIG_MAPPING, AutoConfig, PretrainedConfig

    model_type = str(config["model_type"])
    try:
        full = CONFIG_MAPPING[model_type].from_dict(config)
    except Exception as e:  # a config transformers cannot read
        raise SpliceError(f"config.json: transformers cannot read it ({first_line(e)})") from None
    stored = config.get(m.section) or {}
    text_type, architecture = m.family(stored)
    section = getattr(full, m.section).to_dict()
    defaults = AutoConfig.for_model(text_type).to_dict()
    generic = PretrainedConfig().to_dict()  # id2label, return_dict, ...: left out at their default
    out = {
        k: v
        for k, v in section.items()
        if k in defaults and not (k in generic and defaults[k] == v)
    }
    for key in _CARRIED:
        if key not in stored and config.get(key) is not None:
            out[key] = config[key]
    rope = out.get("rope_parameters")
    if isinstance(rope, dict) and any(k in rope for k in _MROPE):  # 3-D positions of images
        out["rope_parameters"] = {k: v for k, v in rope.items() if k not in _MROPE}
    dtype = {k: config[k] for k in ("dtype", "torch_dtype") if config.get(k) is not None}
    out.update(m.text_fields)
    out.update(dtype, model_type=text_type, architectures=[architecture])
    out["tie_word_embeddings"] = tied
    return out


class LanguageModel(Checkpoint):
    """A multimodal model folder read as its language model (module docstring).

    ``config`` is the text family's (:func:`text_config`), ``tensors`` the language model's
    under the text family's names; :attr:`modules` holds every other tensor, by module
    (``vision_tower``, ``multi_modal_projector``) and stored name, and ``load`` reads those too.
    ``mm_config`` is the folder's own config; ``layout`` where its modules are.
    """

    def _index(self, config: dict[str, Any], stored: dict[str, TensorInfo], where: Path) -> None:
        self.mm_config: dict[str, Any] = config
        self.layout = layout_of(config, str(self.path))
        section = config.get(self.layout.section)
        if not isinstance(section, dict):
            raise SpliceError(f"{where}: {self.layout.section} is missing or not an object")
        text: dict[str, TensorInfo] = {}
        outside: dict[str, TensorInfo] = {}
        #: the layouts of :attr:`Layout.text` this folder uses
        self._forms: set[int] = set()
        for name, info in stored.items():
            if self.layout.module_of(name) is not None:
                outside[name] = info
                continue
            found = self.layout.text_name(name)
            if found is None:
                raise SpliceError(
                    f"{self.path}: tensor {show(name)} is in none of {config['model_type']}'s "
                    "modules as transformers saves them (language model, vision tower, projector)"
                )
            text[found[0]] = info
            if found[0] != "lm_head.weight" or len(set(self.layout.head)) > 1:
                self._forms.add(found[1])
        if not text or len(self._forms) != 1:
            what = "no" if not text else "two layouts of"
            raise SpliceError(
                f"{self.path}: {what} language-model tensors under "
                f"{' or '.join(self.layout.text)}: not a {config['model_type']} checkpoint as "
                "transformers saves it"
            )
        tied = "lm_head.weight" not in text
        own = text_config(config, self.layout, tied=tied)
        if "quantization_config" in config:  # the language model's weights are quantized too
            own["quantization_config"] = config["quantization_config"]
        super()._index(own, text, where)
        #: every tensor outside the language model, by stored name (quantized ones folded with
        #: their scales, as the language model's are); ``load`` reads them too
        self.module_tensors: dict[str, TensorInfo] = logical_tensors(
            outside, config, str(self.path)
        )
        #: module name -> {stored name: metadata} of the same tensors
        self.modules: dict[str, dict[str, TensorInfo]] = {}
        for name, info in self.module_tensors.items():
            self.modules.setdefault(str(self.layout.module_of(name)), {})[name] = info
            for part in info.quant.parts if info.quant is not None else ():
                self.quant_parts[part_key(part.name)] = part
        self._stored.update(self.module_tensors)
        self._stored.update(self.quant_parts)

    def _unpack(self, spec: ArchSpec, stored: dict[str, TensorInfo]) -> dict[str, TensorInfo]:
        """Experts stored packed by :attr:`Layout.stored`'s spec are read through it, each
        stored tensor in the orientation its shape says (:meth:`StoredLayout.oriented`)."""
        #: stored kind -> its layout as this folder holds it (outputs are packed the same way)
        self.stored_layouts: dict[str, StoredLayout] = {}
        if self.layout.stored is None:
            return super()._unpack(spec, stored)
        own = ArchSpec.load(self.layout.stored)
        assert own.experts is not None
        hidden = int(self.config["hidden_size"])
        out: dict[str, TensorInfo] = {}
        for name, info in stored.items():
            t = own.parse(name)
            layout = own.experts.stored.get(t.kind)
            if t.expert is not None or t.layer is None or layout is None:
                out[name] = info
                continue
            writer = own.role(own.layer_name(t.layer, layout.parts[0], 0)) == "writer"
            try:
                layout = layout.oriented(tuple(info.shape[1:]), hidden, writer)
            except ValueError as e:
                raise SpliceError(f"{self.path}: {name} {list(info.shape)}: {e}") from None
            self.stored_layouts[t.kind] = layout
            out.update(own._stored_views(name, info, t.layer, layout))
        return out

    @property
    def form(self) -> int:
        """The index in :attr:`Layout.text` of the layout this folder's names use."""
        return next(iter(self._forms))

    def stored_name(self, name: str) -> str:
        """The name under which this model's files hold (or would hold) the language-model
        tensor ``name``."""
        return self.layout.stored_name(name, self.form)

    def __repr__(self) -> str:
        return f"LanguageModel({str(self.path)!r}, {len(self)} tensors)"


def multimodal_config(ckpt: LanguageModel, config: dict[str, Any]) -> dict[str, Any]:
    """``ckpt``'s own config with its text section rewritten to the planned text ``config``:
    every field the plan changes against ``ckpt.config`` (layer count, per-layer lists, ...),
    tying and dtype set on both levels."""
    mm = dict(ckpt.mm_config)
    section = dict(mm[ckpt.layout.section])
    # set below on both levels, or the checkpoint's own (quantization_config: quantized_plan)
    keep = ("model_type", "architectures", "dtype", "torch_dtype", "tie_word_embeddings",
            "quantization_config")  # fmt: skip
    for key in set(config) | set(ckpt.config):
        if key in keep or config.get(key) == ckpt.config.get(key):
            continue
        if key in config:
            section[key] = config[key]
        else:
            section.pop(key, None)
    tied = bool(config.get("tie_word_embeddings"))
    section["tie_word_embeddings"] = mm["tie_word_embeddings"] = tied
    for key in ("dtype", "torch_dtype"):
        if config.get(key) is not None:
            mm[key] = config[key]
            if key in section:
                section[key] = config[key]
    mm[ckpt.layout.section] = section
    width = config.get("hidden_size")
    if width != ckpt.config.get("hidden_size"):  # a sliced language model
        for path in ckpt.layout.widths:
            where, key = path.split(".")
            if isinstance(mm.get(where), dict):
                mm[where] = {**mm[where], key: width}
    return mm


def carry_modules(plan: ModelPlan) -> ModelPlan:
    """``plan``, a text model planned on language models, as the multimodal checkpoint of the
    model its tokenizer comes from: tensors under that model's names, its other modules copied
    (those the plan does not make itself, as a ``modules:`` recipe's merged vision tower), its
    config with the text section rewritten. Unchanged when that model is not multimodal or the
    plan is ``text_only``."""
    import warnings

    from splice.execute import TensorTask

    donor = plan.models.get(plan.tokenizer_from) if plan.tokenizer_from else None
    if plan.text_only or not isinstance(donor, LanguageModel):
        others = [k for k, m in plan.models.items() if isinstance(m, LanguageModel)]
        if others and not plan.text_only:
            warnings.warn(
                f"the output is a text model like {plan.tokenizer_from or 'its base'}: the "
                f"vision modules of {', '.join(others)} are not carried",
                stacklevel=2,
            )
        return plan
    key = plan.tokenizer_from
    assert key is not None
    if donor.layout.stored is not None:  # experts packed as the donor stores them
        spec = ArchSpec.load(donor.layout.stored)
        assert spec.experts is not None
        layouts = {**spec.experts.stored, **donor.stored_layouts}
        spec = replace(spec, experts=replace(spec.experts, stored=layouts))
        plan = replace(plan, tasks=pack_tasks(plan.tasks, spec, plan.models))
    own = donor.module_tensors
    tasks = [t if t.name in own else replace(t, name=donor.stored_name(t.name)) for t in plan.tasks]
    made = {t.name for t in tasks}
    for name, info in own.items():
        if name not in made:
            module = donor.layout.module_of(name)
            tasks.append(TensorTask.copy(name, key, name, info, note=f" ({module})"))
    return replace(plan, tasks=tasks, config=multimodal_config(donor, plan.config))


def plan_text_only(ckpt: Checkpoint, *, dtype: str | None = None, card: str = "") -> ModelPlan:
    """The language model of the multimodal ``ckpt`` (a :class:`LanguageModel`) as a plan of
    its text family: every language-model tensor copied (cast to ``dtype`` where given and
    floating), the other modules removed."""
    from splice.dtypes import config_with_dtype
    from splice.execute import copy_tasks
    from splice.output import ModelPlan

    if not isinstance(ckpt, LanguageModel):
        layout_of(ckpt.config, str(ckpt.path))  # the one-line refusal
        raise AssertionError("unreachable")  # pragma: no cover
    tasks = copy_tasks(ckpt, "mm", dtype)
    config = config_with_dtype(ckpt.config, dtype) if dtype else dict(ckpt.config)
    removed = {
        n: f"the text-only output drops the {ckpt.layout.module_of(n)}".replace("_", " ")
        for n in ckpt.module_tensors
    }
    return ModelPlan(
        tasks=tasks,
        models={"mm": ckpt},
        config=config,
        tokenizer_from="mm",
        card=card or None,
        removed={"mm": removed},
        text_only=True,
    )
