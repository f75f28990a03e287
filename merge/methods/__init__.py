"""Merge methods: pure tensor functions, registered by name in ``METHODS``.

Each family lives in its own module, imported here explicitly so that registration happens on
``import splice.merge.methods``.
"""

from splice.merge.methods import karcher, linear, model_stock, slerp, task_arithmetic
from splice.merge.methods.base import METHODS, REQUIRED, MergeMethod, merge_method

__all__ = [
    "METHODS",
    "REQUIRED",
    "MergeMethod",
    "karcher",
    "linear",
    "merge_method",
    "model_stock",
    "slerp",
    "task_arithmetic",
]
