"""splice demo: build (or reuse) the zoo and show that merging combines its specialists' skills.

Prints accuracy on the zoo's held-out tasks for the base model, the two specialists, two simple
merges of them and the up-cycled MoE. ``make demo`` runs this; the first run trains the zoo
(a few minutes on 2 CPU cores), later runs reuse it.
"""

from __future__ import annotations

import os
import sys

for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
    os.environ.setdefault(var, "1")

from splice.zoo import build, evaluate, format_table  # noqa: E402
from splice.zoo.simple_merge import linear, task_arithmetic  # noqa: E402

zoo = build()  # splice.zoo.default_dir(), or $SPLICE_ZOO_DIR
print(f"zoo: {zoo}", file=sys.stderr)
models = {
    "base": zoo / "base",
    "math": zoo / "math",
    "lang": zoo / "lang",
    "linear 50/50": linear([zoo / "math", zoo / "lang"], [0.5, 0.5]),
    "task arithmetic 1.0/0.8": task_arithmetic(
        zoo / "base", [zoo / "math", zoo / "lang"], [1.0, 0.8]
    ),
    "moe": zoo / "moe",
}
print(format_table(evaluate(models, "all", zoo=zoo)))
