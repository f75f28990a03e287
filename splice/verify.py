"""The two promises every written model keeps, checked on the plan before a byte is written.

* **No tensor is lost.** Every tensor of every input is read by some output task, or is
  accounted for by what the operation does: a layer the output does not take (pruned, outside
  a slice), a tensor outside the layers that the output takes from another input (the
  embedding of a frankenmerge's first model, the head of its last), or a tensor the plan names
  as deliberately removed (:attr:`splice.output.ModelPlan.removed`, e.g. collapsed experts).
  Anything else is a bug in a planner or a spec (a LayerNorm's bias no spec named), refused
  before the output exists.
* **The output loads.** Its ``config.json`` is accepted by transformers' own config class and
  its tensors are exactly what that model expects (:func:`splice.loadcheck.check_loads`; no
  weights, no model code). ``--no-verify`` skips this for model types transformers does not
  know.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from splice.errors import SpliceError

if TYPE_CHECKING:
    from splice.checkpoint import Checkpoint
    from splice.execute import TensorTask
    from splice.output import ModelPlan


def lost_tensors(
    tasks: list[TensorTask],
    models: Mapping[str, Checkpoint],
    removed: Mapping[str, Mapping[str, str]] | None = None,
) -> list[tuple[str, str]]:
    """``(model key, tensor name)`` of every input tensor the plan neither uses nor accounts
    for (see the module docstring); ``removed``: model key -> {name: why}."""
    read: dict[str, set[str]] = {key: set() for key in models}
    for t in tasks:
        for s in t.sources:
            read.setdefault(s.model, set()).add(s.name)
    outputs = {name for t in tasks for name, _, _ in t.outputs()}
    lost = []
    for key, ckpt in models.items():
        spec, used = ckpt.arch, read.get(key, set())
        used_layers = {spec.layer_of(n) for n in used} - {None}
        gone = (removed or {}).get(key, {})
        for name in ckpt.tensors:
            if name in used or name in gone:
                continue
            layer = spec.layer_of(name)
            if layer is not None and layer not in used_layers:
                continue  # a layer the output does not take
            if layer is None and name in outputs:
                continue  # taken from another input
            lost.append((key, name))
    return lost


def check_nothing_lost(plan: ModelPlan) -> None:
    """``SpliceError`` (one line) if the plan loses an input tensor (see the module docstring)."""
    lost = lost_tensors(plan.tasks, plan.models, plan.removed)
    if lost:
        names = ", ".join(f"{key}:{name}" for key, name in lost[:3])
        more = f" and {len(lost) - 3} more" if len(lost) > 3 else ""
        raise SpliceError(
            f"internal error: the output would lose {len(lost)} input tensor"
            f"{'s' if len(lost) > 1 else ''} ({names}{more}); nothing was written. Please "
            "report this with the model's config.json"
        )


def check_plan(
    plan: ModelPlan, *, verify: bool = True, quantize: str | None = None, block: Any = None
) -> ModelPlan:
    """Both promises for a planned model; ``verify=False`` (``--no-verify``) skips the second.
    Returns the plan as it is written: the multi-token-prediction layers carried
    (:func:`splice.mtp.carry_mtp`), experts the output's family stores packed, packed
    (:func:`stored_plan`), a language model planned on a multimodal model written back into it
    (:func:`splice.multimodal.carry_modules`), and its tensors in the output's quantization
    (``quantize``: ``--dtype fp8`` / ``mxfp4`` / ``keep``, ``none`` for unquantized, None to keep
    the inputs' where they share one; ``block``: fp8's block size; :func:`splice.quant.
    quantized_plan`)."""
    from splice.mtp import carry_mtp
    from splice.multimodal import carry_modules
    from splice.quant import quantized_plan

    plan = carry_mtp(plan)
    check_nothing_lost(plan)
    plan = carry_modules(stored_plan(plan))
    plan = quantized_plan(plan, quantize, block)
    if verify:
        from splice.loadcheck import check_loads

        config, tensors = loadable_view(plan)
        check_loads(config, tensors)
    return plan


def stored_plan(plan: ModelPlan) -> ModelPlan:
    """``plan`` with its per-expert outputs packed where the output's family stores experts
    packed (:mod:`splice.stored`); the plan itself when it does not."""
    from dataclasses import replace

    from splice.arch import ArchSpec
    from splice.stored import pack_tasks

    spec = ArchSpec.of_output(plan.config)  # a per-layer sliced model: its source family
    if spec is None or spec.experts is None or not spec.experts.stored:
        return plan
    return replace(plan, tasks=pack_tasks(plan.tasks, spec, plan.models))


def loadable_view(plan: ModelPlan) -> tuple[dict, dict[str, tuple[tuple[int, ...], str]]]:
    """The config and tensors transformers will see: a per-layer sliced model
    (``splice_sliced``) is its source family at the new width, less the shortcut matrices
    :func:`splice.surgery.sliced.load_sliced` adds to its layers."""
    from splice.mtp import mtp_names
    from splice.quant import logical_view
    from splice.sliced_check import SLICED_TYPE

    config = dict(plan.config)
    tensors = {name: (shape, dt) for t in plan.tasks for name, shape, dt in t.outputs()}
    tensors = logical_view(tensors, config)  # a quantized weight as the model holds it
    for name in mtp_names(config, list(tensors)):  # transformers does not use them
        del tensors[name]
    if config.get("model_type") == SLICED_TYPE:
        config["model_type"] = config.get("sliced_from")
        config.pop("auto_map", None)
        tensors = {n: v for n, v in tensors.items() if not n.endswith("_shortcut_Q")}
    return config, tensors
