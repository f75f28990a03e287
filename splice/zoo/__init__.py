"""The zoo: tiny Llama models trained on CPU whose skills merging can combine.

``build(dir)`` trains ``base`` (English + the toy language Zeta), the specialists ``math``
(two-digit addition asked in English) and ``lang`` (colour questions asked in Zeta), and a 4-expert
``moe`` up-cycled from the base, and writes lm-eval tasks ``zoo_math``, ``zoo_lang`` and
``zoo_math_lang`` (addition asked in Zeta: the skill no single specialist was trained on).
``evaluate(models, tasks)`` scores models with lm-eval; :class:`Scorer` keeps the tasks loaded
for many live models (the path a search takes). Importing this package loads neither
torch nor lm-eval.
"""

from __future__ import annotations

from splice.zoo.build import MODELS, Settings, build, default_dir, is_built
from splice.zoo.corpus import calibration_text
from splice.zoo.evaluate import Scorer, evaluate, format_table, load_model, parse_tasks, throughput
from splice.zoo.tasks import ALL_TASKS, GEN_TASKS, MC_TASKS

__all__ = [
    "ALL_TASKS",
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
    "is_built",
    "load_model",
    "parse_tasks",
    "throughput",
]
