"""A planned output model and the one function that writes it.

Every verb that writes a model (convert aside: it copies) is "build a :class:`ModelPlan`, call
:func:`write_model`": a merge plans its tasks from a recipe, a surgery from a layer list or
calibration statistics. The plan owns everything around the tensors (config, the tokenizer
donor, extra files such as a re-indexed tokenizer or a chat template, and the model card); the
writer owns the streaming executor and writes into the output folder the verb claimed at its
start (:func:`splice.target.claim_output`; a direct call claims it itself).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from splice.checkpoint import Checkpoint
from splice.execute import ExecOptions, TensorTask, execute
from splice.target import Claim, claim_output
from splice.text import plural
from splice.verify import check_plan


@dataclass(kw_only=True)
class ModelPlan:
    """An output model, fully planned before any tensor is read.

    ``tasks`` make the tensors from ``models`` (key -> open checkpoint); ``tokenizer_from``
    names the model whose tokenizer and generation files are copied; ``files`` (name -> text)
    are written after them, replacing any of the same name; ``card`` is the ``README.md``.
    """

    tasks: list[TensorTask]
    models: dict[str, Checkpoint]
    config: dict[str, Any]
    tokenizer_from: str | None = None
    #: file name -> text, or a function giving it once every tensor is written (a report)
    files: dict[str, str | Callable[[], str]] = field(default_factory=dict)
    card: str | None = None
    #: input tensors the operation removes on purpose: model key -> {name: why}
    removed: dict[str, dict[str, str]] = field(default_factory=dict)
    #: a text model even where the tokenizer's model is multimodal (``convert --text-only``);
    #: else its other modules are carried (:func:`splice.multimodal.carry_modules`)
    text_only: bool = False

    def describe(self) -> str:
        """A readable table of the plan (``--dry-run``)."""
        layers = self.config.get("num_hidden_layers")
        lines = [f"{plural(len(self.tasks), 'tensor')}, {layers} layers"]
        for t in self.tasks:
            lines.append(f"  {t.name:<50} {list(t.shape)!s:<14} {t.dtype:<9} {t.label}")
        return "\n".join(lines)


def write_model(
    plan: ModelPlan, out: str | os.PathLike[str] | Claim, options: ExecOptions | None = None
) -> Path:
    """Write ``plan`` to the folder ``out`` (atomically; see :mod:`splice.target`).

    ``out`` is the verb's :class:`~splice.target.Claim` (taken before its work began; the
    plan's models are checked as its inputs, nothing is locked again), or a path, claimed here.
    """
    opts = options or ExecOptions()
    plan = check_plan(plan, verify=opts.verify, quantize=opts.quantize, block=opts.block_size)
    inputs = [f for m in plan.models.values() for f in m.folders]
    with claim_output(out, opts.overwrite, inputs=inputs) as claim:
        return execute(
            plan.tasks,
            plan.models,
            claim,
            config=plan.config,
            tokenizer_from=plan.models[plan.tokenizer_from] if plan.tokenizer_from else None,
            card=plan.card,
            extra_files=plan.files,
            options=opts,
        )
