"""The learning-rate schedule every training loop uses (the zoo's builds and ``splice heal``)."""

from __future__ import annotations

import math


def lr_at(step: int, steps: int, lr: float, warmup: int, floor: float = 0.1) -> float:
    """Linear warm-up to ``lr`` over ``warmup`` steps, then cosine down to ``floor * lr`` at
    step ``steps``."""
    if step < warmup:
        return lr * (step + 1) / warmup
    t = (step - warmup) / max(1, steps - warmup)
    return lr * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * t)))
