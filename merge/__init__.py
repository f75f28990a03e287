"""splice.merge: parameter-space and data-flow merges from YAML recipes.

from splice.merge import run, merge_into, Recipe
run("recipe.yml", "out/")                    # streams to a checkpoint folder
merge_into(model, recipe, models)            # writes into a live nn.Module

Modules: ``recipe`` (the schema), ``params`` (resolving a setting for one tensor), ``planner``
(recipe -> MergePlan), ``runner`` (run / plan / merge_into / multi-document recipes),
``dry_run`` (a plan's resolved parameters per tensor and by layer range), ``moe``, ``vocab``,
``chat_template``, ``methods``. A module path always names the module: the functions
``run`` and ``plan`` live in ``runner``.
"""

from splice.merge import methods
from splice.merge.multi import MultiRecipe, read_recipe
from splice.merge.planner import MergePlan, plan_merge
from splice.merge.recipe import Recipe
from splice.merge.runner import MergeOptions, load_recipe, merge_into, plan, run, run_multi

__all__ = [
    "MergeOptions",
    "MergePlan",
    "MultiRecipe",
    "Recipe",
    "load_recipe",
    "merge_into",
    "methods",
    "plan",
    "plan_merge",
    "read_recipe",
    "run",
    "run_multi",
]
