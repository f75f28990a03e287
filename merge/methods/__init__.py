"""Merge methods: pure tensor functions, registered by name in ``METHODS``.

Each family lives in its own module, imported here explicitly so that registration happens on
``import splice.merge.methods``:

    linear.py           linear
    task_arithmetic.py  task_arithmetic, ties, dare_ties, dare_linear, breadcrumbs,
                        breadcrumbs_ties, della, della_linear (presets of one function)
    sparsify.py         the sparsifiers those presets choose from
    slerp.py            slerp, nuslerp, multislerp
    karcher.py          karcher
    model_stock.py      model_stock
    sce.py              sce
    nearswap.py         nearswap
    arcee_fusion.py     arcee_fusion
    ram.py              ram, ramplus_tl
    structural.py       passthrough, layer_path, moe (planned from whole layers / experts)

Names, parameters, defaults and formulas are mergekit's; in float32 results match its method
code to rounding. Where splice differs, on purpose:

* magnitude ties (equal ``|x|`` at a TIES / breadcrumbs cut) go by position, not by an unstable
  sort, so masks agree across devices; this shows only in bf16/fp16, where equal values occur;
* DARE / DELLA masks are ``u < p`` with float32 ``p`` from the executor's per-tensor generator
  (the same stream as mergekit's ``torch.bernoulli`` on CPU); mergekit rounds ``p`` and DELLA's
  ranks to bf16 for bf16 inputs; a DELLA row of one entry keeps with probability ``density``;
* the planner refuses, before anything runs (each method's ``check``), weights summing to ~0
  that ``linear``'s ``normalize`` or ``multislerp``'s ``normalize_weights`` would divide by
  (mergekit writes inf/NaN; ``linear`` itself also raises on an exact 0), a ``density`` or
  ``gamma`` outside [0, 1] (mergekit clamps or misbehaves), a DELLA ``density ± epsilon``
  outside (0, 1) (mergekit fails mid-merge) and a model count the method cannot take;
* ``consensus_method`` (``sum`` | ``count``) is an extra option of the sign-electing presets;
  its default is mergekit's fixed behaviour;
* SCE's variance selection breaks ties at its cut by position too (mergekit's ``topk`` leaves
  it open); ``arcee_fusion`` estimates the quartiles of a tensor over a million entries from a
  million draws of the per-tensor generator (mergekit: torch's global RNG, so its runs differ);
* ``arcee_fusion`` and ``ramplus_tl`` return the inputs' dtype, where mergekit's code returns
  float32 for bf16/fp16 inputs (a float32 mask or coefficient promotes the result) and
  mergekit-yaml writes it so: the same values once rounded;
* also refused at planning: ``nearswap`` ``t < 0`` (always the base), ``sce`` ``select_topk``
  outside [0, 1], ``ram`` ``epsilon < 0``, ``ramplus_tl`` ``epsilon <= 0`` (mergekit divides by
  it, NaN where a model changes nothing in a tensor) or ``alpha < 0``.
"""

from splice.merge.methods import (
    arcee_fusion,
    karcher,
    linear,
    model_stock,
    nearswap,
    ram,
    sce,
    slerp,
    structural,
    task_arithmetic,
)
from splice.merge.methods.base import METHODS, REQUIRED, MergeMethod, merge_method

__all__ = [
    "METHODS",
    "REQUIRED",
    "MergeMethod",
    "arcee_fusion",
    "karcher",
    "linear",
    "merge_method",
    "model_stock",
    "nearswap",
    "ram",
    "sce",
    "slerp",
    "structural",
    "task_arithmetic",
]
