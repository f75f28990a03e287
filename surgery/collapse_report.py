"""What ``splice collapse`` did, layer by layer: :class:`CollapseReport` (a surgery report:
``splice.surgery.report``) and its per-layer :class:`LayerCollapse`."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

from splice.surgery.report import Recorded


@dataclass
class LayerCollapse:
    """One MoE layer. Per expert (lists of ``E``): ``frequency`` the share of tokens choosing
    it, ``probability`` its mean router score (softmax probability, or sigmoid score for the
    DeepSeek-V3 kind: what ``frequency`` weights by), ``mean_gate`` its mean routing weight,
    ``saliency`` its REAP score (``--prune --by reap``). ``weights`` the merge weights (dense
    methods), ``groups`` the source experts of each output expert (keep-k), ``neurons`` how
    many neurons ``slice`` kept from each expert. ``mass`` the factor of a mean dense MLP's
    down projection (the routed mass ``Σ_e g_e(x)``: exact where the family's weights sum to a
    constant, else its calibration mean), ``mass_measured`` its calibration mean.
    ``shared_gate_mean`` Qwen's sigmoid shared-expert gate's calibration mean where it was
    folded into a dense MLP, ``shared_gate_error`` what that alone costs (relative to the
    block's output). ``error`` the relative reconstruction error of the layer's MoE block
    output (shared experts included); ``error_unaligned`` the same without alignment,
    ``error_before_refit`` ``slice`` with the wide MLP's scaled columns instead of the refit.
    ``moved`` the share of neurons alignment permuted, ``spread_before`` / ``spread_after`` the
    weighted relative distance of the experts from their mean before and after alignment.
    ``note``: what changed in the routing (expert groups dropped)."""

    layer: int
    tokens: int = 0
    frequency: list[float] | None = None
    probability: list[float] | None = None
    mean_gate: list[float] | None = None
    weights: list[float] | None = None
    groups: list[list[int]] | None = None
    neurons: list[int] | None = None
    error: float | None = None
    error_unaligned: float | None = None
    error_before_refit: float | None = None
    moved: float | None = None
    spread_before: float | None = None
    spread_after: float | None = None
    saliency: list[float] | None = None
    mass: float | None = None
    mass_measured: float | None = None
    shared_gate_mean: float | None = None
    shared_gate_error: float | None = None
    note: str | None = None


@dataclass
class CollapseReport(Recorded):
    """What ``collapse`` did: the method, shapes before and after, and every layer's numbers.

    ``out_experts`` is None for a dense result; ``form`` says how a dense result is written
    (``sibling``: the dense architecture ``out_model_type`` with one MLP; ``one-expert``: the
    same family with one routed expert at top-1 beside the shared experts; ``split``: the
    collapsed MLP's neurons as several routed experts every token chooses, where one expert
    cannot run or its width must divide the shared experts'; ``experts``: ``--keep-experts``);
    ``form_experts`` / ``form_width`` the routed experts a collapsed layer is written as and
    their width; ``prune_by`` the ``--prune`` criterion; ``params_before`` / ``params_after`` the
    parameter counts; ``notes`` what is approximated or changed beyond the experts; ``meta``
    holds the calibration settings; ``scores`` evaluation numbers once scored."""

    operation: str
    source: str
    method: str
    num_experts: int
    top_k: int
    intermediate_size: int
    out_intermediate_size: int
    out_experts: int | None = None
    out_top_k: int | None = None
    align: bool = False
    prune: bool = False
    dense_model_type: str | None = None
    form: str = ""
    out_model_type: str = ""
    form_experts: int | None = None
    form_width: int | None = None
    prune_by: str | None = None
    params_before: int = 0
    params_after: int = 0
    notes: list[str] = field(default_factory=list)
    layers: list[LayerCollapse] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)
    scores: dict[str, dict[str, float]] = field(default_factory=dict)

    kind: ClassVar[str] = "collapse"

    @property
    def title(self) -> str:
        if self.out_experts is None and self.form in ("", "sibling"):
            shape = f"dense {self.dense_model_type} MLP of {self.out_intermediate_size}"
        elif self.out_experts is None and self.form == "one-expert":
            shape = f"{self.out_model_type}, one routed expert of {self.form_width} at top-1"
        elif self.out_experts is None:
            shape = (
                f"{self.out_model_type}, one MLP of {self.out_intermediate_size} as "
                f"{self.form_experts} routed experts of {self.form_width}, all chosen"
            )
        else:
            shape = f"{self.out_experts} experts, top-{self.out_top_k}"
        return f"{self.operation}: {self.num_experts} experts (top-{self.top_k}) -> {shape}"

    def mean_error(self) -> float | None:
        errs = [r.error for r in self.layers if r.error is not None]
        return sum(errs) / len(errs) if errs else None

    def _rows(self) -> list[str]:
        def f(v: float | None) -> str:
            return "-" if v is None else f"{v:.4f}"

        out = []
        for r in self.layers:
            line = ""
            if r.error is not None:
                line += f"  error {f(r.error)}"
            if r.probability:
                line += "  p(expert) [" + " ".join(f"{p:.2f}" for p in r.probability) + "]"
            if r.error_unaligned is not None:
                line += f"  unaligned {f(r.error_unaligned)}"
            if r.error_before_refit is not None:
                line += f"  before refit {f(r.error_before_refit)}"
            if r.moved is not None:
                line += f"  moved {r.moved:.0%} spread {f(r.spread_before)}->{f(r.spread_after)}"
            if r.groups is not None:
                line += "  groups " + " ".join("+".join(map(str, g)) for g in r.groups)
            if r.neurons is not None:
                line += "  neurons/expert " + " ".join(map(str, r.neurons))
            if r.saliency is not None:
                line += "  reap " + " ".join(f"{v:.3g}" for v in r.saliency)
            if r.mass is not None and r.mass != 1.0:
                line += f"  mass {r.mass:.4f}"
            if r.shared_gate_mean is not None:
                line += f"  shared gate ~ {r.shared_gate_mean:.4f} (costs {f(r.shared_gate_error)})"
            if line:
                out.append(f"    layer {r.layer:<3}{line}")
        if self.layers and not out:  # nothing measured: weights alone
            n = len(self.layers)
            out.append(
                f"    {n} MoE layer{'s' if n != 1 else ''} collapsed from the weights alone "
                "(--calibration FILE measures each layer's error)"
            )
        return out

    def _params(self) -> str:
        if not self.params_before:
            return ""
        ratio = self.params_after / self.params_before
        return f"  parameters {self.params_before:,} -> {self.params_after:,} ({ratio:.1%})"

    def summary(self) -> str:
        """Plain text for the terminal."""
        lines = [self.title]
        if self.params_before:
            lines.append(self._params())
        lines += [f"  note: {n}" for n in self.notes]
        if self.meta.get("calibration"):
            lines.append(
                f"  calibration {self.meta['calibration']}: {self.meta.get('samples')} windows "
                f"of {self.meta.get('seq_len')} tokens"
            )
        mean = self.mean_error()
        if mean is not None:
            lines.append(f"  mean relative reconstruction error {mean:.4f}")
        lines += self._rows()
        lines += self.score_lines()
        return "\n".join(lines)

    def card_details(self) -> str:
        """Markdown for the model card."""
        lines = [f"Operation: `{self.operation}` on `{self.source}`.", "", self.title + "."]
        if self.params_before:
            lines.append(self._params().strip().capitalize() + ".")
        lines += [f"Note: {n}." for n in self.notes]
        if self.meta.get("calibration"):
            lines.append(
                f"Calibration: `{self.meta['calibration']}`, {self.meta.get('samples')} windows "
                f"of {self.meta.get('seq_len')} tokens."
            )
        if any(r.error is not None for r in self.layers):
            lines += ["", "| layer | relative reconstruction error |", "|---:|---:|"]
            lines += [f"| {r.layer} | {r.error:.4f} |" for r in self.layers if r.error is not None]
        lines += ["", self.record_line()]
        return "\n".join(lines)
