"""Run a merge: to a checkpoint folder (``run``) or into a live module (``merge_into``)."""

from __future__ import annotations

import os
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

from splice.card import model_card
from splice.checkpoint import Checkpoint
from splice.errors import SpliceWarning
from splice.execute import ExecOptions, execute_into
from splice.merge.chat_template import resolve_chat_template, template_files
from splice.merge.plan import MergePlan, plan_merge
from splice.merge.recipe import Recipe
from splice.output import write_model
from splice.target import check_target, lock_target

if TYPE_CHECKING:
    import torch


@dataclass
class MergeOptions(ExecOptions):
    """Execution options plus the safety switches and the seed for stochastic methods."""

    allow_pickle: bool = False
    allow_crimes: bool = False
    seed: int | None = None


def load_recipe(recipe: Recipe | str | os.PathLike[str] | dict) -> Recipe:
    """A ``Recipe`` from a Recipe, a dict, a YAML file path or YAML text."""
    if isinstance(recipe, Recipe):
        return recipe
    if isinstance(recipe, dict):
        return Recipe.from_dict(recipe)
    return Recipe.from_yaml(recipe)


def plan(
    recipe: Recipe | str | os.PathLike[str] | dict,
    options: MergeOptions | None = None,
    models: Mapping[str, Checkpoint] | None = None,
) -> MergePlan:
    """Validate and plan a merge without reading any tensor data."""
    opts = options or MergeOptions()
    p = plan_merge(
        load_recipe(recipe),
        models=models,
        allow_pickle=opts.allow_pickle,
        allow_crimes=opts.allow_crimes,
        seed=opts.seed,
    )
    p.chat_template = resolve_chat_template(p.recipe.chat_template, p.models)
    for line in p.warnings:
        warnings.warn(line, SpliceWarning, stacklevel=2)
    return p


def run(
    recipe: Recipe | str | os.PathLike[str] | dict,
    out: str | os.PathLike[str],
    options: MergeOptions | None = None,
) -> Path:
    """Merge as the recipe says and write the model to ``out`` (atomically). Returns ``out``."""
    opts = options or MergeOptions()
    with lock_target(out):  # before any work: a second run into OUT is refused at once
        p = plan(recipe, opts)  # reads headers only
        check_target(out, opts.overwrite, inputs=[m.path for m in p.models.values()])
        r = p.recipe
        card = model_card(
            f"{Path(out).name}: {r.merge_method} merge",
            r.referenced_models(),
            recipe=r.to_yaml(),
            details=f"Merged with splice using the `{r.merge_method}` method.",
            tags=["merge", r.merge_method],
        )
        files = dict(p.files)
        if p.chat_template:
            donor = p.models[p.tokenizer_from] if p.tokenizer_from else None
            files.update(template_files(p.chat_template, donor, files.get("tokenizer_config.json")))
        return write_model(replace(p, files=files, card=card), out, opts)


def merge_into(
    module: torch.nn.Module,
    recipe: MergePlan | Recipe | str | os.PathLike[str] | dict,
    models: Mapping[str, Checkpoint] | None = None,
    options: MergeOptions | None = None,
) -> MergePlan:
    """Merge into ``module``'s parameters in place (no disk writes); returns the plan used.

    ``recipe`` may be a plan from :func:`plan` (evolve prepares one per candidate, so tokenizer,
    vocabulary and chat template are not resolved again). ``models`` maps the recipe's model
    references to open checkpoints, so that repeated calls reuse them; with
    ``splice.resident.ResidentCheckpoint`` s the second and later calls read nothing from disk.
    The module must have the output's architecture and layer count (``splice.resident.empty_model``
    builds one from ``plan.config``); a mismatch is a ``SpliceError`` before anything is written.
    """
    opts = options or MergeOptions(show_progress=False)
    p = recipe if isinstance(recipe, MergePlan) else plan(recipe, opts, models)
    if isinstance(recipe, MergePlan) and models is not None:
        p = replace(p, models={**p.models, **{k: v for k, v in models.items() if k in p.models}})
    execute_into(p.tasks, p.models, module, options=opts)
    return p
