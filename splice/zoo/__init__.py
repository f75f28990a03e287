"""The zoo: tiny Llama models trained on CPU whose skills merging can combine.

``build(dir)`` trains ``base`` (English only: stories, colours, single-digit arithmetic), the
specialists ``math`` (two-digit arithmetic, four operations, asked in English; only the layers
change) and ``lang`` (reads and writes the toy language Zeta; only the Zeta rows of the
embeddings and the head change), and a 4-expert ``moe`` up-cycled from the base; it writes the
lm-eval tasks ``zoo_math``, ``zoo_lang`` and ``zoo_math_lang`` (arithmetic asked in Zeta: it
needs both skills) with their disjoint fitness splits ``*_fit``, and a held-out text with its
English and Zeta halves (:func:`heldout_text_path`, :func:`read_heldout`); it ends by checking
its own acceptance criteria.
``evaluate(models, tasks)`` scores models with lm-eval; :class:`Scorer` keeps the tasks loaded
for many live models (the path a search takes). Importing this package loads neither torch nor
lm-eval.
"""

from __future__ import annotations

from splice.zoo.build import (
    MODELS,
    Settings,
    build,
    default_dir,
    heldout_documents,
    heldout_text_path,
    is_built,
    read_heldout,
)
from splice.zoo.corpus import calibration_text
from splice.zoo.evaluate import Scorer, evaluate, format_table, load_model, parse_tasks, throughput
from splice.zoo.tasks import ALL_TASKS, FIT_TASKS, GEN_TASKS, MC_TASKS

__all__ = [
    "ALL_TASKS",
    "FIT_TASKS",
    "GEN_TASKS",
    "MC_TASKS",
    "MODELS",
    "Scorer",
    "Settings",
    "build",
    "calibration_text",
    "default_dir",
    "evaluate",
    "format_table",
    "heldout_documents",
    "heldout_text_path",
    "is_built",
    "load_model",
    "parse_tasks",
    "read_heldout",
    "throughput",
]
