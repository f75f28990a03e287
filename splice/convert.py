"""Re-shard and/or re-type a checkpoint through the streaming reader and writer."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from splice.card import model_card
from splice.checkpoint import Checkpoint, open_checkpoint
from splice.dtypes import config_with_dtype, output_dtype
from splice.execute import ExecOptions, copy_tasks
from splice.multimodal import LAYOUTS
from splice.output import ModelPlan, write_model
from splice.parallel import bounded_map
from splice.progress import progress
from splice.target import Claim, claim_output
from splice.writer import DEFAULT_SHARD_SIZE, CheckpointWriter, TensorSpec


def convert(
    source: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    dtype: str | None = None,
    max_shard_size: str | int = DEFAULT_SHARD_SIZE,
    overwrite: bool = False,
    allow_pickle: bool = False,
    show_progress: bool = False,
    workers: int = 2,
    text_only: bool = False,
    quantize: str | None = None,
    block_size: tuple[int, int] | None = None,
) -> Path:
    """Copy ``source`` to ``out`` with new shards and optionally a new dtype.

    Tensors whose dtype does not change are copied byte for byte (kernel copy); others are
    loaded one at a time and cast. Integer tensors keep their dtype. Returns the output folder.
    ``text_only``: a multimodal model's language model alone, as its text family
    (:mod:`splice.multimodal`; written through the plan and its checks). A quantized input, or
    ``quantize`` (``fp8``, ``mxfp4``, ``keep``; ``none`` with a float ``dtype``), is written
    through the plan too: dequantized, quantized or kept tensor by tensor
    (:func:`splice.quant.quantized_plan`).
    """
    local = [source] if str(source).strip() and Path(source).exists() else []
    with claim_output(out, overwrite, inputs=local) as claim:  # before any work
        # a plain convert copies every tensor as stored, a multimodal model's modules included
        ckpt = open_checkpoint(source, allow_pickle=allow_pickle, language_model=text_only)
        target = output_dtype(dtype or None)
        if text_only:
            return _text_only(ckpt, source, claim, target, max_shard_size, show_progress, workers)
        if ckpt.quant_scheme is not None or quantize not in (None, "none"):
            if ckpt.config.get("model_type") in LAYOUTS:  # the plan's way: its language model
                ckpt = open_checkpoint(source, allow_pickle=allow_pickle)
            options = ExecOptions(
                workers=workers,
                max_shard_size=max_shard_size,
                show_progress=show_progress,
                quantize=quantize,
                block_size=block_size,
                verify=False,  # a plain convert: the input's tensors, as transformers read them
            )
            return write_model(_plan_all(ckpt, source, claim, target, quantize), claim, options)
        ckpt.validate()

        def out_dtype(d: str) -> str:
            floating = d.startswith(("float", "bfloat"))
            return target if target and floating else d

        specs = [TensorSpec(n, i.shape, out_dtype(i.dtype)) for n, i in ckpt.tensors.items()]
        config = config_with_dtype(ckpt.config, target) if target else dict(ckpt.config)
        with CheckpointWriter(
            claim, specs, max_shard_size=max_shard_size, inputs=ckpt.folders
        ) as w:
            tasks = bounded_map(
                lambda spec: w.copy(spec.name, ckpt),
                specs,
                cost=lambda spec: 3 * max(spec.nbytes, ckpt[spec.name].nbytes),
                workers=workers,
            )
            for _ in progress(
                tasks, "convert", enabled=show_progress, total=len(specs), unit="tensor"
            ):
                pass
            w.write_config(config)
            w.copy_tokenizer(ckpt)
            what = f"converted to {target}" if target else "re-sharded"
            w.write_card(
                model_card(
                    f"{Path(out).name}: {what}",
                    [str(source)],
                    details=f"`splice convert` {what}, shards of at most {max_shard_size}.",
                )
            )
    return Path(out)


def _text_only(
    ckpt: Checkpoint,
    source: str | os.PathLike[str],
    claim: Claim,
    dtype: str | None,
    max_shard_size: str | int,
    show_progress: bool,
    workers: int,
) -> Path:
    """Write the language model of the multimodal ``ckpt`` into ``claim`` (see :func:`convert`)."""
    from splice.multimodal import plan_text_only

    what = f"text-only, {dtype}" if dtype else "text-only"
    card = model_card(
        f"{claim.path.name}: {what}",
        [str(source)],
        details="`splice convert --text-only`: the language model of a multimodal model, "
        "as its text family (the vision tower and projector dropped).",
    )
    plan = plan_text_only(ckpt, dtype=dtype, card=card)
    options = ExecOptions(
        workers=workers, max_shard_size=max_shard_size, show_progress=show_progress
    )
    return write_model(plan, claim, options)


def _plan_all(
    ckpt: Checkpoint, source: Any, claim: Claim, dtype: str | None, quantize: str | None
) -> ModelPlan:
    """Every tensor of ``ckpt`` copied (cast to ``dtype`` where given and floating): a
    quantized one as its logical tensor, which the plan's quantization writes as asked."""
    tasks = copy_tasks(ckpt, "in", dtype)
    what = {None: "converted", "keep": "converted", "none": "dequantized"}.get(
        quantize, f"quantized to {quantize}"
    )
    if dtype:
        what += f", {dtype}"
    card = model_card(
        f"{claim.path.name}: {what}", [str(source)], details=f"`splice convert`: {what}."
    )
    config = config_with_dtype(ckpt.config, dtype) if dtype else dict(ckpt.config)
    return ModelPlan(
        tasks=tasks, models={"in": ckpt}, config=config, tokenizer_from="in", card=card
    )
