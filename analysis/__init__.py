"""splice.analysis: per-layer weight and activation similarities with null baselines.

``compare_models(A, B)``, ``compare_layers(M)``, ``compare_experts(MOE, DENSE)`` (weights),
``analyze_activations(M, text)``, ``task_vectors(BASE, [A, B])`` and
``compare_activations(A, B, text)`` return a :class:`SimilarityReport` (``.to_frame()``,
``.plot()``, ``.save(dir)``). Metrics are registered in ``METRICS``. Importing this package
loads neither pandas nor matplotlib (nor torch).
"""

from splice.analysis import compare, metrics, report, tasks, weights
from splice.analysis.compare import compare_activations
from splice.analysis.metrics import DEFAULT_METRICS, METRICS, Metric, gaussian_like
from splice.analysis.report import SimilarityMatrix, SimilarityReport
from splice.analysis.tasks import task_vectors
from splice.analysis.weights import compare_experts, compare_layers, compare_models

__all__ = [
    "DEFAULT_METRICS",
    "METRICS",
    "Metric",
    "SimilarityMatrix",
    "SimilarityReport",
    "compare",
    "compare_activations",
    "compare_experts",
    "compare_layers",
    "compare_models",
    "gaussian_like",
    "metrics",
    "report",
    "task_vectors",
    "tasks",
    "weights",
]
