"""Layer pruning: remove ``n`` layers chosen on calibration text, or the layers given.

- ``n=N, by="angular"`` (Gromov et al., PruneMe) — the contiguous block ``[l, l+N)`` with the
  smallest angular distance ``d(l, l+N)`` between the last token's residual stream entering
  layer ``l`` and leaving layer ``l+N-1`` (windows are unpadded, so the last token is the last
  real one);
- ``n=N, by="influence"`` (ShortGPT) — the ``N`` layers of lowest block influence
  ``1 - cos(in, out)`` (mean over all tokens), not necessarily contiguous;
- ``drop="3,4,7"`` — exactly these layers; half-open ranges as ``upscale --layers`` takes
  them too (``"3:5,7"`` is ``3,4,7``: :func:`~splice.surgery.layermaps.parse_ranges`).

The report lists the metric of every candidate and the chosen layers. MoE models work the same
way (a layer goes with all its experts).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

from splice.checkpoint import open_checkpoint
from splice.dtypes import output_dtype
from splice.errors import SpliceError
from splice.execute import ExecOptions
from splice.registry import Registry
from splice.sliced_check import refuse_sliced
from splice.surgery import layermaps
from splice.surgery.calibration import (
    Calibration,
    angular_candidates,
    influence_candidates,
    layer_report,
    meta,
)
from splice.surgery.depth import SurgeryResult, layer_map_plan, run_surgery
from splice.surgery.report import SurgeryReport

#: ``(candidates, the removed layers, the metric's name, how the choice follows from it)``
Choice = tuple[list[dict[str, Any]], list[int], str, str]
#: how ``--n N --by NAME`` chooses the layers: ``criterion(run, N)`` on a
#: :func:`~splice.surgery.calibration.layer_report` run
CRITERIA: Registry[Callable[[Any, int], Choice]] = Registry("prune criterion")


@CRITERIA.register("angular")
def _angular(run: Any, count: int) -> Choice:
    """The contiguous block of lowest angular distance d(l, l+n) (Gromov et al.)."""
    candidates, start = angular_candidates(run, count)
    gone = list(range(start, start + count))
    return candidates, gone, "angular distance d(l, l+n)", "the lowest is removed"


@CRITERIA.register("influence")
def _influence(run: Any, count: int) -> Choice:
    """The ``count`` layers of lowest block influence (ShortGPT)."""
    candidates, gone = influence_candidates(run, count)
    better = "the lowest is removed" if count == 1 else f"the {count} lowest are removed"
    return candidates, gone, "block influence", better


def plan_prune(
    model: str | os.PathLike[str],
    *,
    n: int | None = None,
    by: str | None = None,
    calibration: str | os.PathLike[str] | None = None,
    drop: str | list[int] | None = None,
    calib: Calibration | None = None,
    dtype: str | None = None,
    allow_pickle: bool = False,
    trust_remote_code: bool = False,
) -> SurgeryResult:
    """Plan a pruned copy of ``model`` (nothing is written); see the module docstring."""
    output_dtype(dtype)
    if (n is None) == (drop is None):
        raise SpliceError(
            "prune: give exactly one of --n N (with --by and --calibration) or --drop LAYERS"
        )
    if drop is not None and (by is not None or calibration is not None):
        raise SpliceError("prune --drop takes no --by or --calibration (the layers are given)")
    if n is not None:
        by = by or "angular"
        if by not in CRITERIA:
            raise SpliceError(f"--by {by}: choose from {', '.join(CRITERIA.names())}")
        if calibration is None:
            raise SpliceError(f"prune --n needs --calibration FILE to measure {by} on")
    ckpt = open_checkpoint(model, allow_pickle=allow_pickle)
    refuse_sliced(ckpt, "prune")
    ckpt.arch.refuse("prune")
    ckpt.validate()
    total = ckpt.num_layers
    report = SurgeryReport(operation="", source=str(ckpt.path), num_layers=total, layers=[])
    if drop is not None:
        gone = layermaps.parse_indices(drop, total)
        layermaps.without(total, gone)
        report.operation = f"prune --drop {layermaps.format_spec(gone)}"
    else:
        count = layermaps._whole(n, "--n")
        if count < 1:
            raise SpliceError(f"--n {count}: prune at least 1 layer")
        layermaps.without(total, list(range(count)), "--n")  # refuses n >= total
        run = layer_report(
            ckpt.path,
            calibration,  # type: ignore[arg-type]
            calib or Calibration(),
            allow_pickle=allow_pickle,
            trust_remote_code=trust_remote_code,
        )
        report.candidates, gone, report.metric, report.better = CRITERIA.get(by)(run, count)
        report.operation = f"prune --n {count} --by {by}"
        report.meta.update(meta(run))
    report.chosen = list(gone)
    report.removed = list(gone)
    report.layers = layermaps.without(total, gone)
    plan = layer_map_plan(ckpt, report, dtype=dtype, tags=("prune",))
    return SurgeryResult(plan, report)


def prune(
    model: str | os.PathLike[str],
    out: str | os.PathLike[str] | None = None,
    *,
    dry_run: bool = False,
    options: ExecOptions | None = None,
    **kwargs: Any,
) -> SurgeryResult:
    """Prune ``model`` into ``out`` (atomically) as :func:`plan_prune` plans it; with
    ``dry_run`` only plan. ``out`` is locked and checked before any calibration runs."""
    return run_surgery(plan_prune, model, out, dry_run=dry_run, options=options, **kwargs)
