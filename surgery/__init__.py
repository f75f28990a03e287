"""splice.surgery: depth surgery on checkpoints, each a plan plus the one writer.

``upscale(model, out, solar=M | yi=K, calibration= | duplicate="A:B" | expand=N | layers=...)``,
``prune(model, out, n=N, by="angular" | "influence", calibration= | drop=...)`` and
``heal(model, out, text=, steps=)`` return a :class:`SurgeryResult` (the
:class:`~splice.output.ModelPlan` and a report: the layer map, the chosen layers, every
candidate's metric); ``plan_upscale`` / ``plan_prune`` plan without writing. Importing this
package loads no torch.
"""

from splice.surgery.calibration import Calibration
from splice.surgery.depth import SurgeryResult, layer_map_plan
from splice.surgery.heal import HealReport, heal
from splice.surgery.prune import plan_prune, prune
from splice.surgery.report import RECORD, SurgeryReport, read_record
from splice.surgery.upscale import plan_upscale, upscale

__all__ = [
    "RECORD",
    "Calibration",
    "HealReport",
    "SurgeryReport",
    "SurgeryResult",
    "heal",
    "layer_map_plan",
    "plan_prune",
    "plan_upscale",
    "prune",
    "read_record",
    "upscale",
]
