"""splice: model merging and layer surgery for LLMs.

Core API (lazy, torch is only imported when tensors are touched)::

    from splice import open_checkpoint, CheckpointWriter
    ckpt = open_checkpoint("path/to/model")
    ckpt["model.embed_tokens.weight"].shape     # metadata, no data read
    ckpt.load("model.norm.weight")              # one tensor
"""

from __future__ import annotations

__version__ = "0.1.0"

from splice import _checkout
from splice.arch import ArchSpec, TensorName
from splice.checkpoint import Checkpoint, TensorInfo, open_checkpoint
from splice.errors import SpliceError
from splice.registry import Registry

_checkout.install()  # splice.merge & co. from a plain checkout too (see splice/_checkout.py)

__all__ = [
    "ArchSpec",
    "Checkpoint",
    "Registry",
    "SpliceError",
    "TensorInfo",
    "TensorName",
    "__version__",
    "open_checkpoint",
]
