"""splice.evolve: CMA-ES over merge recipes, scored by lm-eval in memory, resumable.

from splice.evolve import EvolveConfig, evolve, resume, report
result = evolve("search.yml", "runs/a")      # RUN written after every generation
resume("runs/a")                             # continues to the uninterrupted result
resume("runs/a", generations=20)             # extends it: the result of a 20-generation run
print(format_report(report("runs/a")))

Modules: ``config`` (the schema; mergekit-evolve files run unchanged), ``genome`` (genes <->
recipes), ``dataflow`` (Sakana's layer-path genome, run on shared modules), ``pruning`` (merge
and drop layers in one genome), ``scorer`` (lm-eval tasks loaded once, HFLM on the live module), ``search`` (the
loop, the run folder), ``report``, ``cli``. Importing it loads neither torch nor lm-eval.
"""

from splice.evolve import dataflow  # registers the "dataflow" genome space
from splice.evolve.config import EvolveConfig, GenomeSpec, LmEvalArgs, SearchSettings, TaskSpec
from splice.evolve.dataflow import DataFlowGenome, PathModels
from splice.evolve.genome import GENOMES, ParameterGenome, build_genome, check_genome
from splice.evolve.report import EvolveReport, format_report, plot_history, report
from splice.evolve.search import EvolveResult, default_popsize, evolve, resume

__all__ = [
    "GENOMES",
    "DataFlowGenome",
    "EvolveConfig",
    "EvolveReport",
    "EvolveResult",
    "GenomeSpec",
    "LmEvalArgs",
    "ParameterGenome",
    "PathModels",
    "SearchSettings",
    "TaskSpec",
    "build_genome",
    "check_genome",
    "dataflow",
    "default_popsize",
    "evolve",
    "format_report",
    "plot_history",
    "report",
    "resume",
]
