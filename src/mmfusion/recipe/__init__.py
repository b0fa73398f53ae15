"""Recipes: one file that takes your data from training to a running service (``mmfusion run RECIPE.yaml``).

A recipe names an ``out`` folder and ordered steps of known kinds (data, train, eval, export, quantize, index,
serve), each of which is the mmfusion command of the same name run in this process, with the step's keys as that
command's options. Steps refer to earlier steps' outputs by name. Like make targets or dvc stages, a step runs only
when it is not up to date: :mod:`.state` keeps a stamp per step, written last, with a fingerprint of its settings
and inputs.

- :mod:`.spec`: the file read and checked (keys, kinds, references), with line numbers in every error.
- :mod:`.commands`: a step as its command line, parsed and run by the command's own parser and function.
- :mod:`.state`: stamps, fingerprints and why a step is stale.
- :mod:`.runner`: the order, the skipping, resuming and clearing, and the summary table.
- :mod:`.metrics`: the headline numbers of each step's reports.
"""

from .runner import Outcome, RunOptions, run_recipe
from .spec import KINDS, Recipe, RecipeError, Step, load_recipe

__all__ = ["KINDS", "Outcome", "Recipe", "RecipeError", "RunOptions", "Step", "load_recipe", "run_recipe"]
