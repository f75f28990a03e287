"""Weight similarities, streaming tensor by tensor over lazy checkpoints.

Three comparisons, each returning a :class:`~splice.analysis.report.SimilarityReport`, each in
its own module (``across``, ``within``, ``experts``; shared code in ``common``):

- :func:`compare_models`: A vs B with one architecture, layer i vs layer i, per tensor kind.
  Holds two tensors at a time (plus cached spectra), never two models.
- :func:`compare_layers`: within one model, layer i vs layer j for every pair, a layers ×
  layers matrix per kind. Holds one kind's tensors for all layers, one kind at a time.
- :func:`compare_experts`: every expert of every layer of a MoE against the dense model's MLP
  at the same layer, and expert vs expert within each layer. Holds one layer's experts of one
  kind at a time.

Every value comes with its null baseline: the metric between the first tensor and a Gaussian
matrix of its shape and Frobenius norm (``baseline_gaussian``) and, across models and for
experts, against an unrelated layer ``(i + L // 2) % L`` (``baseline_other_layer``).

Model folders with pickled ``.bin`` weights are opened only with ``allow_pickle=True``
(``torch.load(weights_only=True)``). A tensor holding NaN or inf is a :class:`SpliceError`
naming it (its metrics would be NaN, and the spectra's eigensolver fails on it).
"""

from splice.analysis.across import compare_models
from splice.analysis.experts import compare_experts
from splice.analysis.within import compare_layers

__all__ = ["compare_experts", "compare_layers", "compare_models"]
