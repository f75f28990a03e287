"""Run a merge: to a checkpoint folder (``run``) or into a live module (``merge_into``).

A multi-document recipe (mergekit-multi's format, :class:`~splice.merge.recipe.MultiRecipe`)
runs its documents in dependency order, each through the same single-recipe path (planning,
output checks, atomic writes). The final document is written to ``OUT``; the intermediate ones
to ``DIR/NAME`` with ``keep_intermediates=DIR`` (kept, as mergekit-multi's
``--intermediate-dir``), else to a temporary folder beside ``OUT``
(``.OUT.multi-tmp-PID-XXXX``) that is removed when the run ends, however it ends. Before any
merge runs, every output folder is checked and every document that reads no intermediate is
planned; the others are checked for their method and their other models, and planned when their
inputs exist. ``OUT`` is claimed (:func:`splice.target.claim_output`) once, before all that, and
the claim handed to the final document's merge and its writer. mergekit-multi's ``--lazy``
reuse of existing intermediates is not done: an existing ``DIR/NAME`` is refused, or replaced
with ``--overwrite``, like any output.
"""

from __future__ import annotations

import os
import shutil
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from splice.arch import ArchSpec
from splice.card import model_card
from splice.checkpoint import Checkpoint, open_checkpoint
from splice.errors import SpliceError, SpliceWarning
from splice.execute import ExecOptions, execute_into
from splice.merge.chat_template import resolve_chat_template, template_files
from splice.merge.multi import MultiRecipe, Stage, read_recipe
from splice.merge.planner import MergePlan, plan_merge
from splice.merge.recipe import Recipe
from splice.output import write_model
from splice.sliced_check import refuse_sliced
from splice.target import Claim, check_target, claim_output, staging_dir

if TYPE_CHECKING:
    import torch


@dataclass
class MergeOptions(ExecOptions):
    """Execution options plus the safety switches and the seed for stochastic methods."""

    allow_pickle: bool = False
    allow_crimes: bool = False
    seed: int | None = None
    #: a ``moe`` recipe's router may load the base model's own tokenizer / model code
    trust_remote_code: bool = False


RecipeLike = Recipe | str | os.PathLike[str] | dict
T = TypeVar("T")


def load_recipe(recipe: RecipeLike) -> Recipe:
    """A ``Recipe`` from a Recipe, a dict, a YAML file path or YAML text (one document)."""
    if isinstance(recipe, Recipe):
        return recipe
    if isinstance(recipe, dict):
        return Recipe.from_dict(recipe)
    return Recipe.from_yaml(recipe)


def load_recipes(recipe: RecipeLike | MultiRecipe) -> Recipe | MultiRecipe:
    """As :func:`load_recipe`, but a YAML file or text of several documents (mergekit-multi)
    gives a ``MultiRecipe``."""
    if isinstance(recipe, (Recipe, MultiRecipe)):
        return recipe
    if isinstance(recipe, dict):
        return Recipe.from_dict(recipe)
    return read_recipe(recipe)


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
        device=opts.device,
        trust_remote_code=opts.trust_remote_code,
    )
    p.chat_template = resolve_chat_template(p.recipe.chat_template, p.models)
    for line in p.warnings:
        warnings.warn(line, SpliceWarning, stacklevel=2)
    return p


def run(
    recipe: RecipeLike | MultiRecipe,
    out: str | os.PathLike[str],
    options: MergeOptions | None = None,
    *,
    keep_intermediates: str | os.PathLike[str] | None = None,
) -> Path:
    """Merge as the recipe says and write the model to ``out`` (atomically). Returns ``out``.

    A multi-document recipe runs as :func:`run_multi` says (``keep_intermediates``: the folder
    for its intermediate merges; for a one-document recipe it is an error).
    """
    opts = options or MergeOptions()
    loaded = load_recipes(recipe)
    if isinstance(loaded, MultiRecipe):
        return run_multi(loaded, out, opts, keep_intermediates=keep_intermediates)
    if keep_intermediates is not None:
        raise SpliceError(NOTHING_TO_KEEP)
    return _run_one(loaded, out, opts)


NOTHING_TO_KEEP = (
    "--keep-intermediates: the recipe is one document, so no intermediate merges are made"
)


def _run_one(
    recipe: Recipe,
    out: str | os.PathLike[str] | Claim,
    opts: MergeOptions,
    card_recipe: tuple[str, list[str]] | None = None,
) -> Path:
    """One recipe to ``out`` (a path, or the claim :func:`run_multi` took on OUT);
    ``card_recipe``: (YAML, models) for the card instead of its own."""
    # claimed before any work: a second run into OUT is refused at once
    with claim_output(out, opts.overwrite) as claim:
        p = plan(recipe, opts)  # reads headers only
        claim.check([f for m in p.models.values() for f in m.folders])
        r = p.recipe
        shown, models = card_recipe or (r.to_yaml(), r.referenced_models())
        card = model_card(
            f"{claim.path.name}: {r.merge_method} merge",
            models,
            recipe=shown,
            details=f"Merged with splice using the `{r.merge_method}` method"
            + (", the final stage of a multi-document recipe." if card_recipe else "."),
            tags=["merge", r.merge_method],
        )
        files = dict(p.files)
        if p.chat_template:
            donor = p.models[p.tokenizer_from] if p.tokenizer_from else None
            files.update(template_files(p.chat_template, donor, files.get("tokenizer_config.json")))
        return write_model(replace(p, files=files, card=card), claim, opts)


def run_multi(
    multi: MultiRecipe,
    out: str | os.PathLike[str],
    options: MergeOptions | None = None,
    *,
    keep_intermediates: str | os.PathLike[str] | None = None,
) -> Path:
    """Run a multi-document recipe: each document in ``multi.stages`` order, the final one to
    ``out``, the others to ``keep_intermediates/NAME`` or a temporary folder beside ``out``
    (see the module docstring). Returns ``out``; a stage's problem is reported with its
    document's number and name."""
    opts = options or MergeOptions()
    keep = Path(keep_intermediates) if keep_intermediates is not None else None
    with claim_output(out, opts.overwrite) as claim:
        targets = _check_targets(multi, claim, opts, keep)
        _precheck(multi, opts)
        tmp = staging_dir(claim.path, "multi") if keep is None else None
        try:
            outputs: dict[str, Path] = {}
            for stage in multi.intermediates:
                assert stage.name is not None
                target = targets[stage.name] if tmp is None else tmp / stage.name
                recipe = _in_stage(stage, lambda s=stage: multi.resolved(s, outputs))
                _in_stage(stage, lambda r=recipe, t=target: _run_one(r, t, opts))
                outputs[stage.name] = target
            final = _in_stage(multi.final, lambda: multi.resolved(multi.final, outputs))
            card = (multi.to_yaml(), multi.external_models())
            return _in_stage(multi.final, lambda: _run_one(final, claim, opts, card_recipe=card))
        finally:
            if tmp is not None:
                shutil.rmtree(tmp, ignore_errors=True)


def _check_targets(
    multi: MultiRecipe, out: Claim, opts: MergeOptions, keep: Path | None
) -> dict[str, Path]:
    """Every output folder of the run may be written (before any merge runs): ``OUT`` (its
    claim), and with ``keep`` each ``keep/NAME`` (claimed when its document runs); none is an
    input or holds another. Returns the latter."""
    inputs = [r for r in multi.external_models() if os.path.exists(r)]
    targets: dict[str, Path] = {}
    if keep is not None:
        for stage in multi.intermediates:
            assert stage.name is not None
            target = keep / stage.name
            check = lambda t=target: check_target(t, opts.overwrite, inputs=[*inputs, out])  # noqa: E731
            _in_stage(stage, check)
            targets[stage.name] = target
    out.check([*inputs, *targets.values()])
    return targets


def _precheck(multi: MultiRecipe, opts: MergeOptions) -> None:
    """Plan every document that reads no intermediate merge; for the others, check their
    method and open their other models (headers). One ``SpliceError`` for all problems."""
    from splice.merge.methods import METHODS

    problems: list[str] = []
    for stage in multi.stages:
        try:
            if not stage.uses:
                with warnings.catch_warnings():  # they come when the document runs
                    warnings.simplefilter("ignore", SpliceWarning)
                    plan(multi.resolved(stage, {}), opts)
                continue
            recipe = multi.resolved(stage, dict.fromkeys(stage.uses, "/"))
            if recipe.merge_method not in ("passthrough", "layer_path", "moe"):
                METHODS.get(recipe.merge_method)
            for ref in recipe.referenced_models():
                if ref != "/":
                    ckpt = open_checkpoint(ref, allow_pickle=opts.allow_pickle)
                    refuse_sliced(ckpt, "merge", name=ref)
        except SpliceError as e:
            problems += [f"{stage.label}: {line}" for line in str(e).splitlines()]
    if problems:
        raise SpliceError("\n".join(dict.fromkeys(problems)))


def _in_stage(stage: Stage, fn: Callable[[], T]) -> T:
    """``fn()``, with each line of a ``SpliceError`` it raises prefixed by the stage's label."""
    try:
        return fn()
    except SpliceError as e:
        lines = str(e).splitlines() or [type(e).__name__]
        raise SpliceError("\n".join(f"{stage.label}: {line}" for line in lines)) from None


def describe(
    recipe: RecipeLike | MultiRecipe,
    options: MergeOptions | None = None,
    *,
    keep_intermediates: str | os.PathLike[str] | None = None,
) -> str:
    """The plan as text (``splice merge --dry-run``): its tensors, then the resolved parameters
    by layer range and tensor group (:mod:`splice.merge.dry_run`); for a multi-document recipe,
    each document in run order with its output, and the plans of those that read no
    intermediate (the others are planned when they run)."""
    from splice.merge.dry_run import describe as describe_plan

    loaded = load_recipes(recipe)
    if isinstance(loaded, Recipe):
        if keep_intermediates is not None:
            raise SpliceError(NOTHING_TO_KEEP)
        return describe_plan(plan(loaded, options))
    lines = [f"{len(loaded.stages)} documents (mergekit-multi), in run order:"]
    for stage, where, p in _dry_stages(loaded, options, keep_intermediates):
        lines.append(f"{stage.label} -> {where}")
        if p is None:
            lines.append(f"  uses {', '.join(stage.uses)}: planned when it runs")
        else:
            lines += ["  " + line for line in describe_plan(p).splitlines()]
    return "\n".join(lines)


def describe_json(
    recipe: RecipeLike | MultiRecipe,
    options: MergeOptions | None = None,
    *,
    keep_intermediates: str | os.PathLike[str] | None = None,
) -> dict[str, Any]:
    """:func:`describe` as data (``splice merge --dry-run --json``): every tensor's resolved
    parameters and the table's rows (:func:`splice.merge.dry_run.plan_json`); for a
    multi-document recipe, ``documents`` in run order, each with ``plan`` (``None`` for those
    planned when they run)."""
    from splice.merge.dry_run import plan_json

    loaded = load_recipes(recipe)
    if isinstance(loaded, Recipe):
        if keep_intermediates is not None:
            raise SpliceError(NOTHING_TO_KEEP)
        return plan_json(plan(loaded, options))
    return {
        "documents": [
            {
                "document": stage.index,
                "name": stage.name,
                "output": where,
                "uses": list(stage.uses),
                "plan": None if p is None else plan_json(p),
            }
            for stage, where, p in _dry_stages(loaded, options, keep_intermediates)
        ]
    }


def _dry_stages(
    multi: MultiRecipe,
    options: MergeOptions | None,
    keep_intermediates: str | os.PathLike[str] | None,
) -> list[tuple[Stage, str, MergePlan | None]]:
    """Each document in run order: where it is written, and its plan when it reads no
    intermediate (after :func:`_precheck` of them all)."""
    _precheck(multi, options or MergeOptions())
    out = []
    for stage in multi.stages:
        if stage is multi.final:
            where = "OUT"
        elif keep_intermediates is not None:
            where = str(Path(keep_intermediates) / str(stage.name))
        else:
            where = f"a temporary folder beside OUT ({stage.name})"
        p = None if stage.uses else plan(multi.resolved(stage, {}), options)
        out.append((stage, where, p))
    return out


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
    model_type = p.config.get("model_type")
    spec = ArchSpec.load(model_type) if model_type in ArchSpec.known() else None
    execute_into(p.tasks, p.models, module, options=opts, spec=spec)
    return p
