"""Depth up-scaling: SOLAR, Yi, in-place duplication, LLaMA-Pro block expansion, any layer list.

Exactly one mode:

- ``solar=M`` — SOLAR 10.7B: two copies of the ``n`` layers, the first without its last ``M``,
  the second without its first ``M`` (``n = 32, M = 8``: ``[0, 24) + [8, 32)``, 48 layers);
- ``yi=K`` with ``calibration`` — Yi-9B: the ``K`` consecutive layers (first and last layer
  kept out) whose mean input/output cosine on the text is highest are duplicated in place;
- ``duplicate="A:B"`` — layers ``[A, B)`` duplicated in place: ``[0, B) + [A, n)``;
- ``expand=N`` — LLaMA-Pro: ``N`` new blocks spread evenly, each a copy of the block before it
  with its residual writers (``o_proj``, ``down_proj`` / experts' ``w2``, and their biases)
  zeroed, so the output computes exactly the source's function;
- ``layers="0:24,8:32"`` — any list of half-open ranges / indices of the one model (several
  models: a mergekit ``slices`` recipe through ``splice merge`` does that).

Every mode works on MoE models too (experts are copied with their layer; ``expand`` zeroes
every expert's ``w2``). Duplicated tensors are real copies; same-dtype copies go file to file
in the kernel, so ``--solar`` on a 1.6 GB checkpoint never holds a tensor in memory (and never
imports torch).
"""

from __future__ import annotations

import os
from typing import Any

from splice.checkpoint import open_checkpoint
from splice.dtypes import output_dtype
from splice.errors import SpliceError
from splice.execute import ExecOptions
from splice.sliced_check import refuse_sliced
from splice.surgery import layermaps
from splice.surgery.calibration import Calibration, layer_report, meta, yi_candidates
from splice.surgery.depth import SurgeryResult, layer_map_plan, run_surgery
from splice.surgery.report import SurgeryReport

MODES = ("solar", "yi", "duplicate", "expand", "layers")


def _mode(given: dict[str, Any]) -> str:
    chosen = [m for m in MODES if given.get(m) is not None]
    if len(chosen) != 1:
        got = ", ".join(f"--{m}" for m in chosen) or "none"
        raise SpliceError(
            f"upscale: give exactly one of --solar, --yi, --duplicate, --expand, --layers "
            f"(got {got})"
        )
    return chosen[0]


def plan_upscale(
    model: str | os.PathLike[str],
    *,
    solar: int | None = None,
    yi: int | None = None,
    duplicate: str | tuple[int, int] | None = None,
    expand: int | None = None,
    layers: str | list[int] | None = None,
    calibration: str | os.PathLike[str] | None = None,
    calib: Calibration | None = None,
    dtype: str | None = None,
    allow_pickle: bool = False,
    trust_remote_code: bool = False,
) -> SurgeryResult:
    """Plan an up-scaled copy of ``model`` (nothing is written); see the module docstring.

    Options are checked before the model is opened, and the layer indices before any
    calibration runs. Returns the plan and its :class:`SurgeryReport`.
    """
    mode = _mode(dict(solar=solar, yi=yi, duplicate=duplicate, expand=expand, layers=layers))
    output_dtype(dtype)
    if mode == "yi" and calibration is None:
        raise SpliceError("--yi needs --calibration FILE (a text file, lm-eval:TASK or zoo)")
    if mode != "yi" and calibration is not None:
        raise SpliceError(f"--calibration is only used by --yi, not --{mode}")
    ckpt = open_checkpoint(model, allow_pickle=allow_pickle)
    refuse_sliced(ckpt, "upscale")
    ckpt.arch.refuse("upscale")
    ckpt.validate()
    n = ckpt.num_layers
    report = SurgeryReport(operation="", source=str(ckpt.path), num_layers=n, layers=[])
    if mode == "solar":
        report.layers = layermaps.solar(n, solar)  # type: ignore[arg-type]
        report.operation = f"upscale --solar {solar}"
    elif mode == "duplicate":
        a, b = (
            layermaps.parse_range(duplicate, n) if isinstance(duplicate, str) else tuple(duplicate)  # type: ignore[arg-type]
        )
        report.layers = layermaps.duplicate(n, a, b)
        report.operation = f"upscale --duplicate {a}:{b}"
        report.chosen = list(range(a, b))
    elif mode == "expand":
        report.layers, report.zeroed = layermaps.expand(n, expand)  # type: ignore[arg-type]
        report.operation = f"upscale --expand {expand}"
    elif mode == "layers":
        report.layers = (
            layermaps.parse_ranges(layers, n)
            if isinstance(layers, str)
            else [layermaps._whole(v, "--layers") for v in layers]  # type: ignore[union-attr]
        )
        bad = [v for v in report.layers if not 0 <= v < n]
        if bad:
            raise SpliceError(f"--layers: layer {bad[0]} is out of range (0-{n - 1})")
        if not report.layers:
            raise SpliceError("--layers: no layers given")
        report.operation = f"upscale --layers {layermaps.format_spec(report.layers)}"
    else:  # yi
        k = layermaps._whole(yi, "--yi")
        if not 1 <= k <= n - 2:
            raise SpliceError(
                f"--yi {k}: K must be between 1 and {n - 2} (the first and last of the {n} "
                "layers are never duplicated)"
            )
        calib = calib or Calibration()
        run = layer_report(
            ckpt.path,
            calibration,  # type: ignore[arg-type]
            calib,
            allow_pickle=allow_pickle,
            trust_remote_code=trust_remote_code,
        )
        report.candidates, start = yi_candidates(run, k)
        report.metric, report.better = "mean io cosine", "the highest is duplicated"
        report.chosen = list(range(start, start + k))
        report.layers = layermaps.duplicate(n, start, start + k, "--yi")
        report.operation = f"upscale --yi {k}"
        report.meta.update(meta(run))
    if mode != "expand":
        report.new_layers = layermaps.repeats(report.layers)
    else:
        report.new_layers = list(report.zeroed)
    report.removed = sorted(set(range(n)) - set(report.layers))
    plan = layer_map_plan(ckpt, report, dtype=dtype, tags=("upscale", mode))
    return SurgeryResult(plan, report)


def upscale(
    model: str | os.PathLike[str],
    out: str | os.PathLike[str] | None = None,
    *,
    dry_run: bool = False,
    options: ExecOptions | None = None,
    **kwargs: Any,
) -> SurgeryResult:
    """Up-scale ``model`` into ``out`` (atomically) as :func:`plan_upscale` plans it; with
    ``dry_run`` only plan. ``out`` is locked and checked before any calibration runs."""
    return run_surgery(plan_upscale, model, out, dry_run=dry_run, options=options, **kwargs)
