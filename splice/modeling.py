"""The one loader of a Hugging Face causal LM (:func:`load_causal_lm`) and of its tokenizer,
and the one check of a model folder before it is run (:func:`check_runnable`).

The loaders refuse the model's own code unless ``trust_remote_code``; the model's weights must be
safetensors (unless ``allow_pickle``) and finite. A per-layer sliced model (``splice slice
--basis per-layer``, model type ``splice_sliced``) is checked and loaded only where the caller
says ``sliced=True`` (scoring: built by :func:`splice.sliced_check.load_sliced_model`);
elsewhere it is refused with one line naming ``--basis shared``. Failures are
:class:`SpliceError` one-liners.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from splice.errors import SpliceError, first_line
from splice.paths import lora_parts

if TYPE_CHECKING:
    from transformers import PreTrainedModel

    from splice.checkpoint import Checkpoint
    from splice.lora import LoraCheckpoint
    from splice.multimodal import LanguageModel


def _read_config(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The model folder's ``config.json`` (one-line ``SpliceError`` if unreadable)."""
    import json

    file = Path(path) / "config.json"
    try:
        config = json.loads(file.read_text())
    except (OSError, ValueError) as e:
        raise SpliceError(f"{file}: cannot read it ({e})") from None
    if not isinstance(config, dict):
        raise SpliceError(f"{file}: not a JSON object")
    return config


def check_model_code(
    path: str | os.PathLike[str], trust_remote_code: bool, *, sliced: bool = False
) -> None:
    """``SpliceError`` if the model at ``path`` cannot be built without its own Python code
    (a model type transformers does not know, with ``auto_map``) and ``trust_remote_code`` is
    off, or cannot be built at all (an unknown model type and no ``auto_map``). A per-layer
    sliced model needs no code of its own but is refused unless ``sliced`` (the caller runs it
    through :func:`load_causal_lm` with ``sliced=True``)."""
    from transformers import CONFIG_MAPPING

    from splice.sliced_check import RUN_REFUSAL, is_sliced

    config = _read_config(path)
    if is_sliced(config):
        if not sliced:
            raise SpliceError(f"{path}: {RUN_REFUSAL}")
        return
    model_type = config.get("model_type")
    if model_type in CONFIG_MAPPING:
        return
    if not config.get("auto_map"):
        raise SpliceError(f"{path}: transformers does not know model type {model_type!r}")
    if not trust_remote_code:
        raise SpliceError(
            f"{path}: model type {model_type!r} needs the model's own code (auto_map in "
            "config.json); pass --trust-remote-code to run it"
        )


def check_runnable(
    model: str | os.PathLike[str] | Checkpoint,
    *,
    allow_pickle: bool = False,
    trust_remote_code: bool = False,
    local_only: bool = False,
    sliced: bool = False,
) -> Checkpoint:
    """The model ``model`` (a folder or hub id, or a :class:`~splice.checkpoint.Checkpoint`
    already open) checked before it is loaded to run it: read (``open_checkpoint``: pickled
    ``.bin`` only with ``allow_pickle``), its own code only with ``trust_remote_code``
    (:func:`check_model_code`), its tensors complete and shaped (``Checkpoint.validate``).
    ``local_only``: a path that is not an existing folder is refused (no hub download; a LoRA
    reference ``BASE+ADAPTER`` needs both folders).
    ``sliced``: a per-layer sliced model is accepted (else refused, naming ``--basis shared``).
    Returns the checkpoint; failures are one-line :class:`SpliceError`. The one such check:
    every verb that runs a model (eval, zoo eval, analyze, calibration, heal) calls it."""
    import warnings

    from splice.checkpoint import Checkpoint, open_checkpoint
    from splice.sliced_check import SLICED_TYPE, is_sliced

    if isinstance(model, Checkpoint):
        ckpt = model
    else:
        for folder in (lora_parts(str(model)) or (model,)) if local_only else ():
            if not Path(folder).is_dir():
                what = "not a folder" if Path(folder).exists() else "no such folder"
                raise SpliceError(f"{folder}: not a model folder ({what})")
        ckpt = open_checkpoint(model, allow_pickle=allow_pickle)
    check_model_code(ckpt.path, trust_remote_code, sliced=sliced)
    with warnings.catch_warnings():
        if is_sliced(ckpt.config):  # its layers are its source family's: nothing to warn of
            warnings.filterwarnings("ignore", f"no spec for model_type '{SLICED_TYPE}'")
        ckpt.validate()
    return ckpt


def _adapter_of(ref: Any, allow_pickle: bool) -> LoraCheckpoint | None:
    """The open LoRA checkpoint ``ref`` is or names (``BASE+ADAPTER``), else None."""
    from splice.lora import LoraCheckpoint

    if isinstance(ref, LoraCheckpoint):
        return ref
    if isinstance(ref, (str, os.PathLike)) and lora_parts(str(ref)) is not None:
        from splice.checkpoint import open_checkpoint

        ckpt = open_checkpoint(ref, allow_pickle=allow_pickle)
        return ckpt if isinstance(ckpt, LoraCheckpoint) else None
    return None


def load_causal_lm(
    path: str | os.PathLike[str] | Checkpoint,
    *,
    dtype: str = "float32",
    device: str = "cpu",
    trust_remote_code: bool = False,
    allow_pickle: bool = False,
    why: str = "analysis needs finite weights",
    sliced: bool = False,
) -> PreTrainedModel:
    """``AutoModelForCausalLM`` from a model folder in ``dtype`` on ``device`` (resolved:
    ``resolve_device``), in eval mode; the one model loader. With ``sliced``, a per-layer sliced
    model (``splice_sliced``) loads too, through :func:`splice.sliced_check.load_sliced_model`
    (safetensors only); without, it is refused (:func:`check_model_code`). A LoRA reference
    ``BASE+ADAPTER`` (or its open :class:`~splice.lora.LoraCheckpoint`) loads the base and
    applies the adapter to the module; a multimodal model of a family splice knows loads as its
    language model alone (:class:`~splice.multimodal.LanguageModel`: its text family's causal
    LM, whose text logits are the multimodal model's); any other open checkpoint loads from its
    folder.

    Checked (one-line :class:`SpliceError`): own code only with ``trust_remote_code``
    (:func:`check_model_code`); safetensors only unless ``allow_pickle`` (then ``.bin`` with
    ``weights_only=True``); finite weights in ``dtype`` (``check_finite``: the tensor and
    ``why``; a sliced model's shortcut matrices too); the move to ``device``. Check the folder
    first (:func:`check_runnable`): transformers fills missing tensors with random ones.
    """
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    from splice.dtypes import dtype_name, to_torch
    from splice.finite import check_finite
    from splice.sliced_check import is_sliced, load_sliced_model

    adapted = _adapter_of(path, allow_pickle)
    language = _language_model_of(path, allow_pickle)
    if adapted is not None:
        path = adapted.base_path
    elif not isinstance(path, (str, os.PathLike)):
        path = path.path
    check_model_code(path, trust_remote_code, sliced=sliced)
    per_layer = is_sliced(_read_config(path))
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        if language is not None:
            model = _text_model(language, dtype)
        elif per_layer:
            model = load_sliced_model(path, dtype=dtype, device="cpu")
        else:
            model = AutoModelForCausalLM.from_pretrained(
                str(path),
                dtype=to_torch(dtype),
                trust_remote_code=trust_remote_code,
                use_safetensors=None if allow_pickle else True,
                weights_only=True,
            )
    except (OSError, ValueError, KeyError, TypeError, RuntimeError) as e:
        raise SpliceError(f"{path}: cannot load as a causal LM ({first_line(e)})") from None
    finally:
        if bars:
            hf_logging.enable_progress_bar()
    if adapted is not None:
        adapted.apply_to(model)
    cast = f" (in {dtype_name(dtype)})" if dtype_name(dtype) != "float32" else ""
    with torch.no_grad():
        for name, p in model.named_parameters():
            check_finite(p, f"{path}: {name}{cast}", why)
        for name, b in model.named_buffers():
            if name.endswith(".shortcut"):  # a per-layer sliced model's [d, d] basis changes
                check_finite(b, f"{path}: {name}{cast}", why)
    try:
        model = model.to(device)
    except (RuntimeError, AssertionError) as e:  # e.g. out of device memory
        raise SpliceError(
            f"--device {device}: cannot move the model there ({first_line(e)})"
        ) from None
    return model.eval()


def _language_model_of(ref: Any, allow_pickle: bool) -> LanguageModel | None:
    """The open multimodal model ``ref`` is or names, read as its language model, else None."""
    from splice.checkpoint import Checkpoint, _model_type
    from splice.multimodal import LAYOUTS, LanguageModel

    if isinstance(ref, LanguageModel):
        return ref
    if isinstance(ref, Checkpoint) or lora_parts(str(ref)) is not None:
        return None
    if _model_type(Path(ref)) not in LAYOUTS:
        return None
    return LanguageModel(ref, allow_pickle=allow_pickle)


def _text_model(lm: LanguageModel, dtype: str) -> PreTrainedModel:
    """The language model of a multimodal checkpoint as its text family's causal LM (on the
    CPU, in ``dtype``): built empty from its text config, every tensor read into it."""
    from splice.execute import copy_tasks, execute_into
    from splice.resident import empty_model

    model = empty_model(lm.config, dtype=dtype, device="cpu")
    execute_into(copy_tasks(lm, "lm"), {"lm": lm}, model, spec=lm.arch)
    return model


def load_tokenizer(
    path: str | os.PathLike[str], *, trust_remote_code: bool = False, name: str | None = None
) -> Any:
    """``AutoTokenizer`` from ``path`` (SpliceError if the folder has none, or if its tokenizer
    is its own code, ``auto_map`` in tokenizer_config.json, and ``trust_remote_code`` is off;
    ``name``: the model as the messages call it, default ``path``). ``trust_remote_code`` is
    always passed as a bool: transformers' default (``None``) would ask on the terminal. A
    per-layer sliced model's tokenizer loads without transformers' warning that its model
    type (``splice_sliced``) is not the tokenizer's."""
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    from splice.sliced_check import is_sliced

    label = name if name is not None else path
    try:
        sliced = is_sliced(_read_config(path))
    except SpliceError:  # a hub id, or no config: transformers says what is missing
        sliced = False
    verbosity = hf_logging.get_verbosity()
    if sliced:
        hf_logging.set_verbosity_error()
    try:
        return AutoTokenizer.from_pretrained(str(path), trust_remote_code=bool(trust_remote_code))
    except ValueError as e:
        if trust_remote_code or "trust_remote_code" not in str(e):
            raise SpliceError(f"{label}: cannot load its tokenizer ({first_line(e)})") from None
        raise SpliceError(
            f"{label}: its tokenizer needs its own code (auto_map in tokenizer_config.json); "
            "pass --trust-remote-code to run it"
        ) from None
    except (OSError, KeyError, TypeError, ImportError) as e:
        raise SpliceError(f"{label}: cannot load its tokenizer ({first_line(e)})") from None
    finally:
        hf_logging.set_verbosity(verbosity)
