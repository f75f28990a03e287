"""A multimodal checkpoint's language model as its own text family (``convert --text-only``).

A vision-language checkpoint stores its language model beside a vision tower and a projector,
under a prefix, with the text settings in a config section (``text_config``). :data:`TEXT_ONLY`
says, per multimodal ``model_type``, where those are and which text family the language model
is; :func:`plan_text_only` plans the text model: each language-model tensor renamed to the text
family's name and copied byte for byte, the vision parts named as removed, the config section
completed from transformers' own config classes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from splice.errors import SpliceError, first_line

if TYPE_CHECKING:
    from splice.checkpoint import Checkpoint
    from splice.output import ModelPlan


@dataclass(frozen=True)
class TextOnly:
    """How one multimodal family stores its language model.

    ``text``: prefixes of the language model's tensors (each layout transformers has saved),
    renamed to ``model.``; ``head``: names of an untied output head (stored or not), renamed
    to ``lm_head.weight``; ``dropped``: prefix -> what the text-only output drops there.
    """

    text_type: str
    architectures: tuple[str, ...]
    section: str
    text: tuple[str, ...]
    head: tuple[str, ...]
    dropped: dict[str, str]


_TOWER = "the text-only output drops the vision tower"
_PROJECTOR = "the text-only output drops the multimodal projector"


def _llava_layout(text_type: str, architecture: str) -> TextOnly:
    """A LLaVA-style checkpoint (a language model, a ``vision_tower`` and a
    ``multi_modal_projector``), as transformers saves it: ``model.language_model.*`` and
    ``lm_head.*`` (4.52-4.x), or ``language_model.model.*`` and ``language_model.lm_head.*``
    (transformers 5, and Google's and Mistral's own files)."""
    return TextOnly(
        text_type=text_type,
        architectures=(architecture,),
        section="text_config",
        text=("model.language_model.", "language_model.model."),
        head=("lm_head.weight", "language_model.lm_head.weight"),
        dropped={
            "model.vision_tower.": _TOWER,
            "vision_tower.": _TOWER,
            "model.multi_modal_projector.": _PROJECTOR,
            "multi_modal_projector.": _PROJECTOR,
        },
    )


#: multimodal ``model_type`` -> its text-only mapping
TEXT_ONLY: dict[str, TextOnly] = {
    "gemma3": _llava_layout("gemma3_text", "Gemma3ForCausalLM"),
    "mistral3": _llava_layout("mistral", "MistralForCausalLM"),  # Mistral Small 3.x
}

#: top-level fields a text model takes when its section does not set them
_CARRIED = ("bos_token_id", "eos_token_id", "pad_token_id")
#: config sections that mark a multimodal checkpoint
_SECTIONS = ("text_config", "vision_config", "audio_config")


def text_mapping(config: dict[str, Any], where: str) -> TextOnly:
    """The mapping for a checkpoint's ``config``; one ``SpliceError`` line if it is not
    multimodal or its family has none yet (``where``: the model, for the message)."""
    model_type = config.get("model_type")
    if model_type in TEXT_ONLY:
        return TEXT_ONLY[str(model_type)]
    if not any(isinstance(config.get(s), dict) for s in _SECTIONS):
        raise SpliceError(
            f"{where}: --text-only takes a multimodal model, and model_type {model_type!r} is "
            "not one (it has no text_config or vision_config); nothing was written"
        )
    raise SpliceError(
        f"{where}: --text-only has no mapping for the multimodal model_type {model_type!r} yet "
        f"(known: {', '.join(sorted(TEXT_ONLY))}); nothing was written"
    )


def text_config(config: dict[str, Any], m: TextOnly, *, tied: bool) -> dict[str, Any]:
    """The text family's ``config.json``: the multimodal config's ``m.section`` as
    transformers reads it (with every default its class fills in, since a ``config.json`` holds
    only what differs from them), the token ids the top level sets, dtype and tying."""
    from transformers import CONFIG_MAPPING, AutoConfig, PretrainedConfig

    model_type = str(config["model_type"])
    try:
        full = CONFIG_MAPPING[model_type].from_dict(config)
    except Exception as e:  # a config transformers cannot read
        raise SpliceError(f"config.json: transformers cannot read it ({first_line(e)})") from None
    section = getattr(full, m.section).to_dict()
    defaults = AutoConfig.for_model(m.text_type).to_dict()
    generic = PretrainedConfig().to_dict()  # id2label, return_dict, ...: left out at their default
    stored = config.get(m.section) or {}
    out = {
        k: v
        for k, v in section.items()
        if k in defaults and not (k in generic and defaults[k] == v)
    }
    for key in _CARRIED:
        if key not in stored and config.get(key) is not None:
            out[key] = config[key]
    dtype = {k: config[k] for k in ("dtype", "torch_dtype") if config.get(k) is not None}
    out.update(dtype, model_type=m.text_type, architectures=list(m.architectures))
    out["tie_word_embeddings"] = tied
    return out


def plan_text_only(ckpt: Checkpoint, *, dtype: str | None = None, card: str = "") -> ModelPlan:
    """The language model of the multimodal ``ckpt`` as a plan of its text family: language
    tensors renamed (``<text prefix>X`` -> ``model.X``, the head -> ``lm_head.weight``) and
    copied (cast to ``dtype`` where given and floating), the vision parts removed."""
    import warnings

    from splice.dtypes import config_with_dtype
    from splice.execute import TensorTask
    from splice.output import ModelPlan

    m = text_mapping(ckpt.config, str(ckpt.path))
    with warnings.catch_warnings():  # no spec for the multimodal type; its layers are unused
        warnings.simplefilter("ignore")
        _ = ckpt.arch
    tasks, removed = [], {}
    for name, info in ckpt.tensors.items():
        new = _text_name(name, m)
        if new is not None:
            cast = dtype if dtype and info.dtype.startswith(("float", "bfloat")) else None
            tasks.append(TensorTask.copy(new, "mm", name, info, dtype=cast))
            continue
        why = next((w for p, w in m.dropped.items() if name.startswith(p)), None)
        if why is not None:
            removed[name] = why
    if not tasks:
        raise SpliceError(
            f"{ckpt.path}: no tensor under {' or '.join(m.text)}: not a {ckpt.config['model_type']}"
            " checkpoint as transformers saves it"
        )
    tied = not any(t.name == "lm_head.weight" for t in tasks)
    config = text_config(ckpt.config, m, tied=tied)
    if dtype:
        config = config_with_dtype(config, dtype)
    return ModelPlan(
        tasks=tasks,
        models={"mm": ckpt},
        config=config,
        tokenizer_from="mm",
        card=card or None,
        removed={"mm": removed},
    )


def _text_name(name: str, m: TextOnly) -> str | None:
    """The text family's name of a multimodal tensor; None outside the language model."""
    if name in m.head:
        return "lm_head.weight"
    prefix = next((p for p in m.text if name.startswith(p)), None)
    return None if prefix is None else "model." + name[len(prefix) :]
