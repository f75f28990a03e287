"""Load a Hugging Face causal LM and its tokenizer from a folder, with a dtype and a device.

``trust_remote_code`` is off unless asked for. Failures are :class:`SpliceError` one-liners.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

from splice.errors import SpliceError

if TYPE_CHECKING:
    from transformers import PreTrainedModel


def load_causal_lm(
    path: str | os.PathLike[str],
    *,
    dtype: str = "float32",
    device: str = "cpu",
    trust_remote_code: bool = False,
) -> PreTrainedModel:
    """``AutoModelForCausalLM`` from ``path`` in ``dtype`` on ``device``, in eval mode."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    from splice.dtypes import to_torch

    hf_logging.disable_progress_bar()

    try:
        model = AutoModelForCausalLM.from_pretrained(
            str(path), dtype=to_torch(dtype), trust_remote_code=trust_remote_code
        )
    except (OSError, ValueError, KeyError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise SpliceError(f"{path}: cannot load as a causal LM ({first})") from None
    return model.to(device).eval()


def load_tokenizer(
    path: str | os.PathLike[str], *, trust_remote_code: bool = False, name: str | None = None
) -> Any:
    """``AutoTokenizer`` from ``path`` (SpliceError if the folder has none, or if its tokenizer
    is its own code, ``auto_map`` in tokenizer_config.json, and ``trust_remote_code`` is off;
    ``name``: the model as the messages call it, default ``path``). ``trust_remote_code`` is
    always passed as a bool: transformers' default (``None``) would ask on the terminal."""
    from transformers import AutoTokenizer

    label = name if name is not None else path
    try:
        return AutoTokenizer.from_pretrained(str(path), trust_remote_code=bool(trust_remote_code))
    except ValueError as e:
        if trust_remote_code or "trust_remote_code" not in str(e):
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise SpliceError(f"{label}: cannot load its tokenizer ({first})") from None
        raise SpliceError(
            f"{label}: its tokenizer needs its own code (auto_map in tokenizer_config.json); "
            "pass --trust-remote-code to run it"
        ) from None
    except (OSError, KeyError, TypeError, ImportError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise SpliceError(f"{label}: cannot load its tokenizer ({first})") from None
