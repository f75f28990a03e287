"""splice.merge: parameter-space and data-flow merges from YAML recipes.

from splice.merge import run, merge_into, Recipe
run("recipe.yml", "out/")                    # streams to a checkpoint folder
merge_into(model, recipe, models)            # writes into a live nn.Module
"""

from splice.merge import methods
from splice.merge.plan import MergePlan, plan_merge
from splice.merge.recipe import Recipe
from splice.merge.run import MergeOptions, load_recipe, merge_into, plan, run

__all__ = [
    "MergeOptions",
    "MergePlan",
    "Recipe",
    "load_recipe",
    "merge_into",
    "methods",
    "plan",
    "plan_merge",
    "run",
]
