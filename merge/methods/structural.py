"""Methods planned from whole layers or experts rather than tensor by tensor.

They are in ``METHODS`` like every other method, so a recipe names them the same way, an
unknown method's error lists them, and their parameters are checked the same way; the planner
(``planner=``) builds their copy tasks:

    passthrough  each output tensor is its single source's, times ``scale`` (frankenmerges)
    layer_path   each output layer is a source layer, the stream scaled before it (data flow)
    moe          dense experts and a router become a Mixtral (merge/moe.py)
"""

from __future__ import annotations

import torch

from splice.merge.methods.base import merge_method


@merge_method("passthrough", base="none", per_model={"scale": 1.0}, inputs=(1, 1), planner="layers")
def passthrough(tensors: list[torch.Tensor], base: None, *, scale: list[float]) -> torch.Tensor:
    """The one source tensor ``[...]`` times its ``scale``."""
    return tensors[0] * scale[0]


@merge_method("layer_path", base="none", inputs=(1, 1), planner="layers")
def layer_path(tensors: list[torch.Tensor], base: None) -> torch.Tensor:
    """The source layer's tensor ``[...]`` (a residual writer also carries the folded scales)."""
    return tensors[0].clone()


@merge_method("moe", base="none", inputs=(1, 1), planner="moe")
def moe(tensors: list[torch.Tensor], base: None) -> torch.Tensor:
    """An expert's or the base model's tensor ``[...]``, copied (routers are computed)."""
    return tensors[0].clone()
