"""Multi-token-prediction layers: carried to every output, after its last decoder layer.

DeepSeek-V3 / R1 and GLM-4.5 store ``num_nextn_predict_layers`` extra layers after their decoder
layers (``model.layers.61.*`` of DeepSeek-V3: a decoder layer plus ``enorm``, ``hnorm``,
``eh_proj`` and ``shared_head``) that speculative decoding in vLLM and SGLang reads, at index
``num_hidden_layers + k``, and transformers does not use. A checkpoint lists them apart
(:attr:`splice.checkpoint.Checkpoint.mtp`), so no verb plans them as layers; :func:`carry_mtp`
then adds them to the plan, copied unchanged from the model whose head the output takes and
renumbered after the output's last layer, with ``num_nextn_predict_layers`` set to match. A verb
that changes what they would have to match (collapse: the expert layout; slice: the hidden
width) names them in ``ModelPlan.removed`` instead (:func:`removed_mtp`), and the output holds
none. transformers ignores them at their original index only (``model.layers.61`` / ``46`` /
``92``) and warns about unused weights elsewhere; :func:`splice.verify.loadable_view` leaves them
out of the load check.
"""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from splice.checkpoint import Checkpoint
    from splice.output import ModelPlan


def _head_source(plan: ModelPlan) -> str | None:
    """The model key the output's head (or tied embedding) is read from."""
    from splice.arch import ArchSpec

    spec = ArchSpec.of_output(plan.config)
    if spec is None:
        return None
    by_name = {t.name: t for t in plan.tasks}
    task = by_name.get(spec.lm_head) or by_name.get(spec.embed)
    if task is None or not task.sources:
        return None
    return task.sources[0].model


def carry_mtp(plan: ModelPlan) -> ModelPlan:
    """``plan`` with the multi-token-prediction layers of its head's model appended (renamed
    after the output's last layer) and the config's count set; unchanged when that model has
    none, when the plan already reads them, or when it removes them (count set to 0)."""
    from splice.execute import TensorTask

    key = _head_source(plan)
    ckpt = plan.models.get(key) if key is not None else None
    if ckpt is None or not ckpt.mtp:
        return plan
    spec = ckpt.arch
    count_key = spec.config_keys["mtp_layers"]
    gone = plan.removed.get(key, {})  # type: ignore[arg-type]
    read = {s.name for t in plan.tasks for s in t.sources if s.model == key}
    config = dict(plan.config)
    if any(n in gone for n in ckpt.mtp):
        config[count_key] = 0
        return replace(plan, config=config)
    if any(n in read for n in ckpt.mtp):
        return plan
    first = spec.mtp_layers(ckpt.config).start
    out_layers = spec.num_layers(config)
    assert out_layers is not None
    tasks = list(plan.tasks)
    for name, info in ckpt.mtp.items():
        layer = spec.layer_of(name)
        assert layer is not None
        new = spec.rename(name, layer=out_layers + layer - first)
        tasks.append(TensorTask.copy(new, key, name, info, note=" (multi-token prediction)"))  # type: ignore[arg-type]
    config[count_key] = len(spec.mtp_layers(ckpt.config))
    return replace(plan, tasks=tasks, config=config)


def removed_mtp(ckpt: Checkpoint, why: str) -> dict[str, str]:
    """``{name: why}`` for every multi-token-prediction tensor of ``ckpt`` (a verb's
    ``ModelPlan.removed`` entry)."""
    return dict.fromkeys(ckpt.mtp, why)


def mtp_names(config: dict, names: list[str]) -> set[str]:
    """The names of ``names`` that are multi-token-prediction layers under ``config``."""
    from splice.arch import ArchSpec

    spec = ArchSpec.of_output(config)
    if spec is None:
        return set()
    mtp = spec.mtp_layers(config)
    return {n for n in names if spec.layer_of(n) in mtp}
