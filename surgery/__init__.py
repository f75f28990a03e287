"""splice.surgery: depth surgery on checkpoints, each a plan plus the one writer.

``upscale(model, out, solar=M | yi=K, calibration= | duplicate="A:B" | expand=N | layers=...)``,
``prune(model, out, n=N, by="angular" | "influence", calibration= | drop=...)`` and
``heal(model, out, text=, steps=)`` return a :class:`SurgeryResult` (the
:class:`~splice.output.ModelPlan` and a report: the layer map, the chosen layers, every
candidate's metric); ``plan_upscale`` / ``plan_prune`` plan without writing.
``slice_model(model, out, sparsity=, calibration=, basis="per-layer" | "shared")`` (SliceGPT)
returns a :class:`SliceResult` with a :class:`SliceReport`; ``load_sliced`` loads a per-layer
output. ``collapse(moe, out, method="uniform" | "frequency" | "slice", keep_experts=k,
prune=, align=)`` turns an MoE into a dense model or one of fewer experts (a
:class:`CollapseReport`). Every report satisfies :class:`Report` and is written beside the
weights as ``splice_surgery.json`` (its ``kind`` field names the report; :func:`read_record`
reads it back, and older records too). Importing this package loads no torch.
"""

from importlib import import_module
from typing import Any

from splice.surgery.calibration import Calibration
from splice.surgery.collapse import collapse, plan_collapse
from splice.surgery.collapse_report import CollapseReport, LayerCollapse
from splice.surgery.depth import SurgeryResult, layer_map_plan
from splice.surgery.heal import HealReport, heal
from splice.surgery.prune import plan_prune, prune
from splice.surgery.report import RECORD, Report, SurgeryReport, read_record
from splice.surgery.upscale import plan_upscale, upscale

#: loaded on first use (slicing imports numpy and the activation runner), so `splice upscale`
#: does not pay for them at start-up; a name here is never also a module's name
_LAZY = {
    "load_sliced": "sliced",
    "SliceReport": "slicing",
    "SliceResult": "slicing",
    "plan_slice": "slicing",
    "slice_model": "slicing",
}


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'splice.surgery' has no attribute {name!r}")
    value = getattr(import_module(f"splice.surgery.{_LAZY[name]}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_LAZY])


__all__ = [
    "RECORD",
    "Calibration",
    "CollapseReport",
    "HealReport",
    "LayerCollapse",
    "Report",
    "SliceReport",
    "SliceResult",
    "SurgeryReport",
    "SurgeryResult",
    "collapse",
    "heal",
    "layer_map_plan",
    "load_sliced",
    "plan_collapse",
    "plan_prune",
    "plan_slice",
    "plan_upscale",
    "prune",
    "read_record",
    "slice_model",
    "upscale",
]
