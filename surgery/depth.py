"""The one write path of every surgery verb, and a depth operation as a
:class:`splice.output.ModelPlan`.

A verb is a plan function ``plan_x(model, **options) -> SurgeryResult`` and a report (a
:class:`splice.surgery.report.Report`): the plan function ends in :func:`surgery_plan`, which
adds the card and the ``splice_surgery.json`` record from the report, and the verb itself is
:func:`run_surgery` (``out`` claimed, i.e. locked and checked, before any calibration runs,
then the plan, then :func:`write_result` with the claim). :class:`SurgeryResult` is what every
surgery function returns.

:func:`layer_map_plan` turns a :class:`SurgeryReport`'s layer map into a
:class:`splice.layerplan.LayerPlan` over one model (every tensor a copy: same dtype, a kernel
file-to-file copy), replaces the residual writers of the ``zeroed`` layers by zeros
(LLaMA-Pro), and adds the rewritten config (layer count, per-layer lists such as
``layer_types``) and the source's tokenizer.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from splice.card import model_card
from splice.checkpoint import Checkpoint
from splice.errors import SpliceError
from splice.execute import ExecOptions, TensorTask
from splice.layerplan import LayerPlan, LayerRef
from splice.output import ModelPlan, write_model
from splice.surgery import layermaps
from splice.surgery.report import RECORD, Report, SurgeryReport
from splice.target import Claim, claim_output
from splice.text import plural

if TYPE_CHECKING:
    import torch


def _zeros(tensors: list[torch.Tensor]) -> torch.Tensor:
    import torch

    return torch.zeros_like(tensors[0])


def layer_map_plan(
    ckpt: Checkpoint, report: SurgeryReport, *, dtype: str | None = None, tags: tuple = ()
) -> ModelPlan:
    """The output model of ``report`` (its ``layers`` and ``zeroed``) drawn from ``ckpt``."""
    from splice.dtypes import config_with_dtype

    key = str(ckpt.path)
    models = {key: ckpt}
    plan = LayerPlan(tuple(LayerRef(key, s) for s in report.layers), key, key)
    tasks = plan.tasks(models, dtype=dtype)
    spec = ckpt.arch
    zeroed = set(report.zeroed)
    if zeroed:
        out = []
        for t in tasks:
            layer = spec.layer_of(t.name)
            if layer in zeroed and spec.is_residual_writer(t.name):
                src = t.sources[0]
                t = TensorTask.copy(
                    t.name,
                    src.model,
                    src.name,
                    ckpt[src.name],
                    dtype=t.dtype,
                    compute=_zeros,
                    note=" zeroed (new block)",
                )
            out.append(t)
        tasks = out
    config = plan.config(models)
    if dtype:
        config = config_with_dtype(config, dtype)
    return surgery_plan(report, ckpt, tasks, config, tags)


def describe_layer_map(report: SurgeryReport, plan: ModelPlan) -> str:
    """What a depth operation's dry run prints after its summary: the layer map (output layers
    <- the source layers they copy), the counts and size, and only the tensors that are not
    copies (LLaMA-Pro's zeroed writers), not every tensor."""
    from splice.dtypes import format_size, nbytes

    (ckpt,) = plan.models.values()
    tasks = plan.tasks
    in_layers = sum(ckpt.arch.layer_of(t.name) is not None for t in tasks)
    size = sum(nbytes(t.shape, t.dtype) for t in tasks)
    dtypes = ", ".join(sorted({t.dtype for t in tasks})) or "no dtype"
    computed = [t for t in tasks if t.compute is not None]
    cast = [t for t in tasks if t.compute is None and ckpt[t.sources[0].name].dtype != t.dtype]
    changes = [
        plural(len(report.new_layers), "added copy", "added copies"),
        f"{len(report.removed)} removed",
    ]
    changes = [c for c in changes if not c.startswith("0 ")]
    copied = "the rest copied" if computed else "all copied"
    if cast:
        copied += f" ({len(cast)} cast to {dtypes})"
    lines = [
        f"layer map (output <- source): {layermaps.format_map(report.layers)}",
        f"{plural(len(report.layers), 'output layer')} from "
        f"{plural(report.num_layers, 'source layer')}"
        + (f" ({', '.join(changes)})" if changes else ""),
        f"{plural(len(tasks), 'tensor')} to write ({in_layers} in layers, "
        f"{len(tasks) - in_layers} outside them), {dtypes}, {format_size(size)}: "
        + (f"{len(computed)} computed, " if computed else "")
        + copied
        + (":" if computed else ""),
    ]
    for t in computed:
        lines.append(f"  {t.name:<50} {list(t.shape)!s:<14} {t.dtype:<9} {t.label}")
    return "\n".join(lines)


def surgery_plan(
    report: Report,
    ckpt: Checkpoint,
    tasks: list[TensorTask],
    config: dict[str, Any],
    tags: Sequence[str] = (),
    removed: dict[str, str] | None = None,
) -> ModelPlan:
    """The output of one surgery on ``ckpt``: ``tasks`` and ``config``, the source's tokenizer,
    the model card (``report``'s title and details, tagged ``surgery`` and ``tags``) and the
    ``splice_surgery.json`` record; ``removed``: source tensors the surgery drops, or replaces
    without reading, on purpose (name -> why; whole layers need no entry)."""
    key = str(ckpt.path)
    card = model_card(
        report.title, [report.source], details=report.card_details(), tags=["surgery", *tags]
    )
    return ModelPlan(
        tasks=tasks,
        models={key: ckpt},
        config=config,
        tokenizer_from=key,
        files={RECORD: report.record()},
        card=card,
        removed={key: dict(removed)} if removed else {},
    )


@dataclass
class SurgeryResult:
    """A planned surgery: the :class:`ModelPlan` to write, its report, and where it went."""

    plan: ModelPlan
    report: Report
    out: Path | None = None

    def describe(self) -> str:
        """The report and the plan (``--dry-run``): a depth operation's layer map and tensor
        counts (:func:`describe_layer_map`), any other surgery's tensor table."""
        if isinstance(self.report, SurgeryReport):
            return self.report.summary() + "\n" + describe_layer_map(self.report, self.plan)
        return self.report.summary() + "\n" + self.plan.describe()

    def score(
        self, *, text: str | None = None, tasks: Any = None, **kwargs: Any
    ) -> dict[str, dict[str, float]]:
        """Score the source and the written output (:func:`splice.scoring.evaluate`); the
        numbers also go into ``report.scores``."""
        from splice.scoring import evaluate

        if self.out is None:
            raise SpliceError("nothing was written to score (a dry run)")
        scores = evaluate(
            {"source": self.report.source, "output": str(self.out)},
            text=text,
            tasks=tasks,
            **kwargs,
        )
        self.report.scores = scores
        return scores


R = TypeVar("R", bound=SurgeryResult)


def write_result(result: R, out: str | os.PathLike[str] | Claim, options: ExecOptions) -> R:
    """Write ``result.plan`` to ``out``, a path or the verb's claim (see
    :func:`splice.output.write_model`)."""
    path = write_model(result.plan, out, options)
    return replace(result, out=path)


def run_surgery(
    plan: Callable[..., R],
    model: Any,
    out: str | os.PathLike[str] | None,
    *,
    dry_run: bool = False,
    options: ExecOptions | None = None,
    **kwargs: Any,
) -> R:
    """A surgery verb: ``plan(model, **kwargs)`` written to ``out`` (atomically); with
    ``dry_run`` only planned. ``out`` is claimed (locked and checked,
    :func:`splice.target.claim_output`) before the plan (and any calibration in it) runs, and
    the claim handed to the writer."""
    opts = options or ExecOptions()
    if out is None and not dry_run:
        raise SpliceError("give an output folder OUT (or --dry-run)")
    if dry_run:
        return plan(model, **kwargs)
    with claim_output(out, opts.overwrite, inputs=[model]) as claim:
        return write_result(plan(model, **kwargs), claim, opts)
