"""MoE expert collapsing: an MoE model to a dense one, or to one with fewer experts.

``collapse(moe, out, method=...)`` per MoE layer:

- ``uniform`` — the dense MLP is the mean of the experts' gate / up / down weights;
- ``frequency`` — the mean weighted by each expert's routing probability mass on the
  calibration text (the mean softmax probability over its tokens);
- ``slice`` — the ``E`` experts as one wide MLP of ``E·I`` neurons whose down-projection
  columns are scaled by each expert's mean routing weight (its top-k renormalised gate,
  averaged over all tokens, zero where not chosen); the ``I`` (or ``intermediate_size``)
  neurons that contribute most on calibration rows are kept (greedy pivoted selection: each
  pick is the neuron whose scaled activation adds most that the earlier picks do not explain,
  so a neuron duplicated across experts is kept once), their gate/up rows copied, and the down
  projection refit by ridge least squares in float64 so the dense MLP reproduces the MoE
  block's output on the calibration activations;
- ``keep_experts=k`` — a smaller MoE: experts grouped by the cosine similarity of their
  outputs on calibration rows (HC-SMoE; ``scipy.cluster.hierarchy``, average linkage) and
  merged within groups weighted by routing probability mass, the router row of a group the
  same weighted mean of its members' rows; or with ``prune=True`` the ``k`` experts whose
  keeping reconstructs the layer best (NAEE; every subset when there are at most 5000), their
  router rows kept. The config's expert count and top-k are rewritten.
- ``align`` — before any averaging, each expert's intermediate neurons are permuted to match a
  reference expert (the most used one; expert 0 without calibration) by
  ``scipy.optimize.linear_sum_assignment`` on the cosine similarity of the neurons' weights
  (MC-SMoE); the report says the share of the non-reference experts' neurons moved, and the
  error (and the experts' weight spread) before and after.

What is approximated, plainly: a dense MLP cannot route, so every dense method replaces the
token-dependent gates ``g_e(x)`` by constants (a mean of experts is exact only when the experts
are equal; ``slice``'s refit is the least-squares best dense MLP on the kept neurons, on the
calibration rows only, with at most ``max_rows`` rows per layer used for the selection and the
fit). A merged router row is a linear stand-in for the softmax mass of its group. Statistics of
layer ``l`` are taken on the *source* model's activations (the layers before it are not yet
collapsed), and the errors reported are relative Frobenius errors ``‖y − ŷ‖ / ‖y‖`` of the
layer's MoE block output over all calibration tokens (including those used to fit).

Memory: the model is never loaded whole. A skeleton is built on the meta device; layer by layer
one decoder layer (its attention and all its experts) is read, run on the calibration windows
(:func:`splice.activations.run`, sequential mode), decided, and dropped; only small decisions
(weights, permutations, neuron indices) are kept, and ``slice``'s refit down projections are
spilled to a temporary folder. Writing then streams as every other verb (one layer's experts of
one kind in flight). A dense result is written as the matching dense architecture (Mixtral ->
Mistral, the same attention, sliding window and rope settings).

Supported: Mixtral (``model_type`` ``mixtral``, both per-expert and packed storage). Qwen2-MoE
(shared expert, unnormalised top-k) and Qwen3-MoE have no architecture spec here and are refused.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from splice.checkpoint import Checkpoint, open_checkpoint
from splice.errors import SpliceError
from splice.execute import ExecOptions, Source, TensorTask
from splice.limits import check_number
from splice.scratch import scratch_folder
from splice.sliced_check import refuse_sliced
from splice.surgery.calibration import Calibration
from splice.surgery.depth import SurgeryResult, claimed, write_result
from splice.surgery.report import RECORD

if TYPE_CHECKING:
    import torch

    from splice.surgery.collapse_math import Experts

METHODS = ("uniform", "frequency", "slice")
#: the largest --ridge: lambda above 100 times the Gram matrix's mean diagonal leaves the
#: refit down projection close to zero
MAX_RIDGE = 100.0
SUPPORTED = ("mixtral",)
#: MoE model types transformers knows that collapse refuses, with why
UNSUPPORTED = {
    "qwen2_moe": "Qwen2-MoE has a shared expert and unnormalised top-k, and no splice spec",
    "qwen3_moe": "Qwen3-MoE has no splice architecture spec",
    "deepseek_v2": "DeepSeek-V2 has no splice architecture spec",
    "deepseek_v3": "DeepSeek-V3 has no splice architecture spec",
    "olmoe": "OLMoE has no splice architecture spec",
}
EXPERT_KINDS = ("w1", "w3", "w2")  # gate, up, down in collapse_math's notation


# ---- the report -----------------------------------------------------------------------------
@dataclass
class LayerCollapse:
    """One MoE layer. Per expert (lists of ``E``): ``frequency`` the share of tokens choosing
    it, ``probability`` its mean softmax probability (what ``frequency`` weights by),
    ``mean_gate`` its mean routing weight. ``weights`` the merge weights (dense methods),
    ``groups`` the source experts of each output expert (keep-k), ``neurons`` how many
    neurons ``slice`` kept from each expert. ``error`` the relative reconstruction error of
    the layer's output; ``error_unaligned`` the same without alignment, ``error_before_refit``
    ``slice`` with the wide MLP's scaled columns instead of the refit. ``moved`` the share of
    neurons alignment permuted, ``spread_before`` / ``spread_after`` the weighted relative
    distance of the experts from their mean before and after alignment."""

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


@dataclass
class CollapseReport:
    """What ``collapse`` did: the method, shapes before and after, and every layer's numbers.

    ``out_experts`` is None for a dense result; ``meta`` holds the calibration settings;
    ``scores`` evaluation numbers once scored."""

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
    layers: list[LayerCollapse] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)
    scores: dict[str, dict[str, float]] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def title(self) -> str:
        if self.out_experts is None:
            shape = f"dense {self.dense_model_type} MLP of {self.out_intermediate_size}"
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
            probs = " ".join(f"{p:.2f}" for p in r.probability) if r.probability else "-"
            line = f"    layer {r.layer:<3} error {f(r.error)}  p(expert) [{probs}]"
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
            out.append(line)
        return out

    def summary(self) -> str:
        """Plain text for the terminal."""
        lines = [self.title]
        if self.meta.get("calibration"):
            lines.append(
                f"  calibration {self.meta['calibration']}: {self.meta.get('samples')} windows "
                f"of {self.meta.get('seq_len')} tokens"
            )
        mean = self.mean_error()
        if mean is not None:
            lines.append(f"  mean relative reconstruction error {mean:.4f}")
        lines += self._rows()
        for name, row in self.scores.items():
            lines.append(f"  {name}: " + ", ".join(f"{k} {v:.4g}" for k, v in row.items()))
        return "\n".join(lines)

    def card_details(self) -> str:
        """Markdown for the model card."""
        lines = [f"Operation: `{self.operation}` on `{self.source}`.", "", self.title + "."]
        if self.meta.get("calibration"):
            lines.append(
                f"Calibration: `{self.meta['calibration']}`, {self.meta.get('samples')} windows "
                f"of {self.meta.get('seq_len')} tokens."
            )
        if any(r.error is not None for r in self.layers):
            lines += ["", "| layer | relative reconstruction error |", "|---:|---:|"]
            lines += [f"| {r.layer} | {r.error:.4f} |" for r in self.layers if r.error is not None]
        lines += ["", f"The full record is in `{RECORD}`."]
        return "\n".join(lines)

    def record(self) -> str:
        import json

        return json.dumps(self.to_dict(), indent=2, default=float) + "\n"


# ---- options ------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Options:
    method: str
    intermediate_size: int | None
    keep_experts: int | None
    top_k: int | None
    prune: bool
    align: bool
    ridge: float
    max_rows: int
    seed: int


def _check_options(
    method: str,
    calibration: Any,
    intermediate_size: int | None,
    keep_experts: int | None,
    top_k: int | None,
    prune: bool,
    align: bool,
    ridge: float,
    max_rows: int,
) -> None:
    """Everything that can be said before the model is opened."""
    if method not in METHODS:
        raise SpliceError(f"--method {method}: choose from {', '.join(METHODS)}")
    for name, value in (
        ("--intermediate-size", intermediate_size),
        ("--keep-experts", keep_experts),
        ("--top-k", top_k),
    ):
        if value is not None and (
            isinstance(value, bool) or not isinstance(value, int) or value < 1
        ):
            raise SpliceError(f"{name} {value}: must be a whole number of 1 or more")
    if keep_experts is None:
        if prune:
            raise SpliceError(
                "--prune keeps the best --keep-experts k experts; give --keep-experts"
            )
        if top_k is not None:
            raise SpliceError("--top-k is for --keep-experts (a dense result has no routing)")
        if method in ("frequency", "slice") and calibration is None:
            raise SpliceError(
                f"--method {method} needs --calibration FILE (a text file, lm-eval:TASK or zoo)"
            )
        if intermediate_size is not None and method != "slice":
            raise SpliceError(
                f"--intermediate-size is for --method slice (a {method} mean keeps the experts' "
                "width)"
            )
        if align and method == "slice":
            raise SpliceError(
                "--align is for averaging (uniform, frequency, --keep-experts); "
                "slice selects neurons instead"
            )
    else:
        if calibration is None:
            raise SpliceError(
                "--keep-experts needs --calibration FILE (experts are grouped or pruned on it)"
            )
        if method == "slice" or intermediate_size is not None:
            raise SpliceError(
                "--keep-experts merges or prunes whole experts; --method slice and "
                "--intermediate-size are for a dense result"
            )
        if prune and align:
            raise SpliceError("--align is for merging; --prune keeps experts as they are")
    check_number(
        "--ridge", ridge, least=0, most=MAX_RIDGE, why="relative to the Gram matrix's diagonal"
    )
    check_number("--max-rows", max_rows, least=1, whole=True)


def _refuse_unsupported(ref: str | os.PathLike[str]) -> None:
    """A known MoE type without a spec is refused before the checkpoint is opened (which
    would infer a spec for it, with a warning)."""
    import json

    file = Path(ref) / "config.json"
    try:
        model_type = json.loads(file.read_text()).get("model_type")
    except (OSError, ValueError, AttributeError):
        return  # not a local folder with a readable config: open_checkpoint says why
    if model_type in UNSUPPORTED:
        raise SpliceError(
            f"collapse: model type {model_type!r} is not supported ({UNSUPPORTED[model_type]}); "
            f"supported: {', '.join(SUPPORTED)}"
        )


def _check_model(ckpt: Checkpoint) -> None:
    model_type = ckpt.config.get("model_type")
    spec = ckpt.arch
    experts = spec.num_experts(ckpt.config) if spec.experts is not None else None
    if spec.experts is None or not experts:
        moe_keys = [
            k
            for k in ("num_experts", "num_local_experts", "n_routed_experts")
            if ckpt.config.get(k)
        ]
        if moe_keys:
            raise SpliceError(
                f"collapse: model type {model_type!r} is not supported (no expert spec); "
                f"supported: {', '.join(SUPPORTED)}"
            )
        raise SpliceError(
            f"collapse: {ckpt.path} is a dense model ({model_type}); there are no experts "
            "to collapse"
        )
    if model_type not in SUPPORTED or not spec.experts.dense_model_type:
        raise SpliceError(
            f"collapse: model type {model_type!r} is not supported; supported: "
            f"{', '.join(SUPPORTED)}"
        )


# ---- reading one layer --------------------------------------------------------------------
def _expert_name(ckpt: Checkpoint, layer: int, kind: str, e: int) -> str:
    return ckpt.arch.layer_name(layer, f"{kind}.weight", e)


def _router_name(ckpt: Checkpoint, layer: int) -> str:
    return ckpt.arch.layer_name(layer, ckpt.arch.layer_tensors["router"][0])


def layer_experts(ckpt: Checkpoint, layer: int) -> Experts:
    """One layer's experts and router from the checkpoint, float64 (see collapse_math)."""
    import torch

    from splice.surgery.collapse_math import Experts

    count = ckpt.arch.num_experts(ckpt.config)
    assert count is not None
    stacked = {
        k: torch.stack(
            [ckpt.load(_expert_name(ckpt, layer, k, e), dtype="float64") for e in range(count)]
        )
        for k in EXPERT_KINDS
    }
    router = ckpt.load(_router_name(ckpt, layer), dtype="float64")
    return Experts(stacked["w1"], stacked["w3"], stacked["w2"], router)


def _act(config: dict[str, Any]) -> Any:
    from transformers.activations import ACT2FN

    return ACT2FN[config.get("hidden_act", "silu")]


# ---- the layer-by-layer calibration run -----------------------------------------------------
def _skeleton(ckpt: Checkpoint, device: str, dtype: str) -> Any:
    """A causal LM of ``ckpt``'s config whose weights are on the meta device, except the
    embeddings (read from the checkpoint) and the rotary tables (computed): enough to run the
    embedding and hand layer 0 its inputs."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from splice.dtypes import to_torch

    data = dict(ckpt.config)
    cfg = AutoConfig.for_model(data.pop("model_type"), **data)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg, dtype=to_torch(dtype))
    emb = model.get_input_embeddings()
    emb.weight = torch.nn.Parameter(
        ckpt.load(ckpt.arch.embed, dtype=dtype, device=device), requires_grad=False
    )
    for name, module in list(model.named_modules()):
        if any(b.is_meta for b in module.buffers(recurse=False)):
            if not hasattr(module, "inv_freq"):
                raise SpliceError(f"collapse: cannot rebuild buffer module {name!r} of the model")
            with torch.device(device):
                fresh = type(module)(config=cfg)
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, fresh)
    return model.eval()


def _layer_state(ckpt: Checkpoint, layer: int, keys: list[str], dtype: str, device: str) -> dict:
    """The decoder layer's state dict (module-relative ``keys``) from the checkpoint, packed
    expert tensors assembled from the per-expert views as the spec describes."""
    import torch

    spec = ckpt.arch
    ex = spec.experts
    assert ex is not None
    count = spec.num_experts(ckpt.config) or 0
    out = {}
    for key in keys:
        if key in ex.packed:
            parts = ex.packed[key]
            out[key] = torch.stack(
                [
                    torch.cat(
                        [ckpt.load(spec.layer_name(layer, p, e), dtype, device) for p in parts]
                    )
                    for e in range(count)
                ]
            )
        elif key in ex.aliases:
            out[key] = ckpt.load(spec.layer_name(layer, ex.aliases[key]), dtype, device)
        else:
            out[key] = ckpt.load(spec.layer_name(layer, key), dtype, device)
    return out


class _BlockRows:
    """Collector of the MoE block's input and output rows (real tokens) of the layer being run;
    :meth:`take` hands them over and forgets them."""

    site = "mlp"
    layers = None

    def start(self, model: Any, num_layers: int) -> None:
        self._x: list[Any] = []
        self._y: list[Any] = []

    def update(self, c: Any) -> None:
        self._x.append(c.rows("input").detach().to("cpu", copy=True))
        self._y.append(c.rows("output").detach().to("cpu", copy=True))

    def finish_batch(self, batch: int) -> None:
        pass

    def take(self) -> tuple[torch.Tensor, torch.Tensor]:
        import torch

        x, y = torch.cat(self._x).double(), torch.cat(self._y).double()
        self._x, self._y = [], []
        return x, y

    def result(self) -> None:
        return None


def _stream_layers(
    ckpt: Checkpoint, windows: torch.Tensor, calib: Calibration, on_layer: Any
) -> None:
    """Run the source model layer by layer on ``windows``: before layer ``i`` its weights are
    read, and layer ``i-1`` is decided (``on_layer(i-1, x [n, H], y [n, H])`` gets its MoE
    block's input and output rows, float64 on the CPU) and dropped; the last layer after the
    run. Each layer runs once per batch (no ``after_layer``: the runner feeds the next layer
    the outputs of the pass the collector saw)."""
    from splice.activations import Collector, run

    model = _skeleton(ckpt, calib.device, calib.dtype)
    spec = ckpt.arch
    path = spec.layer_prefix.split("{i}")[0].rstrip(".")
    layers = model.get_submodule(path)
    keys = list(layers[0].state_dict().keys())
    rows = type("BlockRows", (_BlockRows, Collector), {})()

    def finish(i: int) -> None:
        layers[i].to("meta")
        x, y = rows.take()
        on_layer(i, x, y)

    def before(i: int) -> None:
        if i > 0:
            finish(i - 1)
        state = _layer_state(ckpt, i, keys, calib.dtype, calib.device)
        layers[i].load_state_dict(state, assign=True, strict=True)

    try:
        run(
            model,
            windows,
            [rows],  # type: ignore[list-item]
            device=calib.device,
            batch_size=calib.batch_size,
            sequential=True,
            before_layer=before,
            layer_prefix=spec.layer_prefix,
            show_progress=calib.show_progress,
        )
        finish(len(layers) - 1)
    finally:
        layers.to("meta")


def _windows(ckpt: Checkpoint, calibration: Any, calib: Calibration) -> torch.Tensor:
    from splice.activations import calibration_text, token_windows
    from splice.layer_metrics import check_windows
    from splice.modeling import load_tokenizer

    text = calibration_text(calibration, include_path=calib.include_path)
    tok = load_tokenizer(ckpt.path)
    windows = token_windows(tok, text, calib.seq_len, calib.max_samples)
    check_windows(windows, calib.seq_len, calibration)
    return windows


# ---- deciding one layer -------------------------------------------------------------------
@dataclass
class _Decision:
    """What the writer needs for one layer: per output expert (one for a dense result) its
    source experts, their weights and permutations; for slice the kept neurons (flat
    ``e·I + j``) and the file of the refit down projection; the router mix ``[k, E]``."""

    members: list[list[int]] = field(default_factory=list)
    weights: list[list[float]] = field(default_factory=list)
    perms: list[list[Any] | None] = field(default_factory=list)
    picks: list[int] | None = None
    down_file: Path | None = None
    router_mix: Any = None


def _blocks(fn: Any, x: torch.Tensor, block: int = 2048) -> torch.Tensor:
    import torch

    return torch.cat([fn(x[lo : lo + block]) for lo in range(0, x.shape[0], block)])


def _merged(ex: Experts, members: list[int], weights: Any, align: bool, ref: int) -> tuple:
    """``(merged Experts of one expert, perms or None, moved, spread before, after)`` of the
    ``weights``-mean of ``members`` (aligned to member ``ref`` first when ``align``)."""
    from splice.surgery import collapse_math as cm

    sub = cm.Experts(ex.w1[members], ex.w3[members], ex.w2[members], ex.router[members])
    perms, moved, before, after = None, None, None, None
    if align and len(members) > 1:
        at = members.index(ref)
        perms = cm.align_permutations(sub, at)
        before = cm.weight_spread(sub, weights)
        sub = sub.permuted(perms)
        after = cm.weight_spread(sub, weights)
        moved = cm.moved_fraction([p for j, p in enumerate(perms) if j != at])
    w1, w3, w2 = cm.average(sub, weights)
    merged = cm.Experts(w1[None], w3[None], w2[None], (weights @ sub.router)[None])
    return merged, perms, moved, before, after


def _decide(
    i: int,
    ex: Experts,
    x: torch.Tensor | None,
    y: torch.Tensor | None,
    opts: _Options,
    top_k: int,
    act: Any,
    spill: Path | None,
) -> tuple[LayerCollapse, _Decision]:
    import numpy as np
    import torch

    from splice.surgery import collapse_math as cm

    count = ex.count
    rec, dec = LayerCollapse(layer=i), _Decision()
    probability = torch.full((count,), 1.0 / count, dtype=torch.float64)
    if x is not None:
        rec.tokens = int(x.shape[0])
        probs, gates = cm.routing(x @ ex.router.T, top_k)
        probability = probs.mean(0)
        rec.probability = probability.tolist()
        rec.frequency = (gates > 0).double().mean(0).tolist()
        rec.mean_gate = gates.mean(0).tolist()
        rng = np.random.default_rng([opts.seed, i])
        n = x.shape[0]
        sample = np.sort(rng.choice(n, opts.max_rows, replace=False)) if n > opts.max_rows else None
        xs = x if sample is None else x[torch.from_numpy(sample)]
        ys = y if sample is None else y[torch.from_numpy(sample)]  # type: ignore[index]
    ref = int(torch.argmax(probability)) if x is not None else 0

    if opts.keep_experts is None and opts.method in ("uniform", "frequency"):
        weights = (
            probability / probability.sum()
            if opts.method == "frequency"
            else torch.full((count,), 1.0 / count, dtype=torch.float64)
        )
        merged, perms, rec.moved, rec.spread_before, rec.spread_after = _merged(
            ex, list(range(count)), weights, opts.align, ref
        )
        rec.weights = weights.tolist()
        dec.members, dec.weights, dec.perms = [list(range(count))], [weights.tolist()], [perms]
        if x is not None:
            w1, w3, w2 = merged.w1[0], merged.w3[0], merged.w2[0]
            rec.error = cm.relative_error(
                y, _blocks(lambda b: cm.mlp_forward(w1, w3, w2, b, act), x)
            )
            if opts.align:
                w1, w3, w2 = cm.average(ex, weights)
                rec.error_unaligned = cm.relative_error(
                    y, _blocks(lambda b: cm.mlp_forward(w1, w3, w2, b, act), x)
                )
        return rec, dec

    assert x is not None and y is not None
    if opts.keep_experts is None:  # slice
        width = ex.w1.shape[1]
        keep = opts.intermediate_size or width
        mean_gate = gates.mean(0)
        h = ex.hidden(xs, act).permute(1, 0, 2).reshape(xs.shape[0], count * width)
        scale = cm.wide_scores(ex, mean_gate).reshape(-1)
        picks = sorted(cm.select_neurons(h, scale, keep)[0])
        down = cm.ridge_refit(h[:, picks], ys, opts.ridge)  # [H, keep]
        w1 = ex.w1.reshape(count * width, -1)[picks]
        w3 = ex.w3.reshape(count * width, -1)[picks]
        rec.error = cm.relative_error(y, _blocks(lambda b: cm.mlp_forward(w1, w3, down, b, act), x))
        wide = (ex.w2 * mean_gate[:, None, None]).permute(1, 0, 2).reshape(-1, count * width)
        rec.error_before_refit = cm.relative_error(
            y, _blocks(lambda b: cm.mlp_forward(w1, w3, wide[:, picks], b, act), x)
        )
        rec.neurons = np.bincount(np.array(picks) // width, minlength=count).tolist()
        assert spill is not None
        dec.down_file = spill / f"down_{i}.pt"
        torch.save(down.float().contiguous(), dec.down_file)
        dec.picks = picks
        return rec, dec

    k = opts.keep_experts
    out_k = opts.top_k or min(top_k, k)
    outputs = ex.outputs(xs, act)  # [E, m, H]
    mix = torch.zeros((k, count), dtype=torch.float64)
    if opts.prune:
        kept, _ = cm.prune_experts(xs @ ex.router.T, outputs, ys, k, out_k)
        groups = [[e] for e in kept]
    else:
        groups = cm.group_experts(outputs, k)
    parts, moved, before, after, unaligned = [], [], [], [], []
    for g, members in enumerate(groups):
        w = probability[members] / probability[members].sum()
        gref = members[int(torch.argmax(probability[members]))]
        merged, perms, mv, b, a = _merged(ex, members, w, opts.align, gref)
        parts.append(merged)
        if opts.align:
            unaligned.append(_merged(ex, members, w, False, gref)[0])
            if mv is not None:
                moved.append(mv * (len(members) - 1))
                before.append(b)
                after.append(a)
        mix[g, members] = w
        dec.members.append(members)
        dec.weights.append(w.tolist())
        dec.perms.append(perms)
    dec.router_mix = mix

    def stack(ps: list[Experts]) -> Experts:
        return cm.Experts(
            *(torch.cat([getattr(p, f) for p in ps]) for f in ("w1", "w3", "w2", "router"))
        )

    rec.groups = groups
    rec.error = cm.relative_error(y, cm.moe_forward(stack(parts), x, out_k, act))
    if opts.align:
        rec.error_unaligned = cm.relative_error(y, cm.moe_forward(stack(unaligned), x, out_k, act))
        total = sum(len(m) - 1 for m in groups)
        rec.moved = sum(moved) / total if total else 0.0
        rec.spread_before = float(np.mean(before)) if before else 0.0
        rec.spread_after = float(np.mean(after)) if after else 0.0
    return rec, dec


# ---- the plan -----------------------------------------------------------------------------
class _Merge:
    """compute: the weighted sum of the source experts' tensors of one kind, each with its
    intermediate neurons permuted first (rows of gate/up ``[I, H]``, columns of down ``[H, I]``)."""

    def __init__(self, weights: list[float], perms: list[Any] | None, axis: int) -> None:
        self.weights, self.perms, self.axis = weights, perms, axis

    def __call__(self, tensors: list[Any]) -> Any:
        out = None
        for j, (w, t) in enumerate(zip(self.weights, tensors, strict=True)):
            if self.perms is not None:
                t = t.index_select(self.axis, self.perms[j].to(t.device))
            out = t * w if out is None else out + t * w
        return out


class _Pick:
    """compute: the kept neurons' rows ``[k, H]`` of the stacked experts' gate/up ``[E·I, H]``."""

    def __init__(self, picks: list[int]) -> None:
        self.picks = picks

    def __call__(self, tensors: list[Any]) -> Any:
        import torch

        stacked = torch.cat(tensors)
        return stacked[torch.tensor(self.picks, device=stacked.device)]


class _Spilled:
    """compute: a tensor saved in the run's temporary folder (kept alive by this object)."""

    def __init__(self, path: Path, folder: Any) -> None:
        self.path, self.folder = path, folder

    def __call__(self, _: list[Any]) -> Any:
        import torch

        return torch.load(self.path, weights_only=True)


class _Mix:
    """compute: the router ``[k, H]`` = ``mix [k, E] @ router [E, H]``."""

    def __init__(self, mix: Any) -> None:
        self.mix = mix

    def __call__(self, tensors: list[Any]) -> Any:
        t = tensors[0]
        return self.mix.to(t.device, t.dtype) @ t


def _dense_config(ckpt: Checkpoint, width: int) -> dict[str, Any]:
    """The source config as the dense architecture's: keys the dense config class does not know
    (expert count, top-k, router losses) dropped, ``intermediate_size`` the new width."""
    from transformers import AutoConfig

    from splice.arch import ArchSpec

    assert ckpt.arch.experts is not None
    dense_type = ckpt.arch.experts.dense_model_type
    assert dense_type is not None
    dense = ArchSpec.load(dense_type)
    known = set(AutoConfig.for_model(dense_type).to_dict())
    cfg = {k: v for k, v in ckpt.config.items() if k in known}
    cfg.update(model_type=dense_type, architectures=list(dense.architectures))
    cfg["intermediate_size"] = width
    return cfg


def _tasks(
    ckpt: Checkpoint, decisions: dict[int, _Decision], opts: _Options, dtype: str | None, spill: Any
) -> tuple[list[TensorTask], dict[str, Any]]:
    from splice.arch import ArchSpec

    spec, key = ckpt.arch, str(ckpt.path)
    assert spec.experts is not None
    dense = ArchSpec.load(spec.experts.dense_model_type) if opts.keep_experts is None else None  # type: ignore[arg-type]
    routers = set(spec.layer_tensors.get("router", ()))
    tasks: list[TensorTask] = []
    width = None
    for name, info in ckpt.tensors.items():
        t = spec.parse(name)
        if t.group == "experts":
            continue
        if t.group == "router" or t.kind in routers:
            if dense is None:
                dec = decisions[t.layer]  # type: ignore[index]
                k = dec.router_mix.shape[0]
                tasks.append(
                    TensorTask.copy(
                        name,
                        key,
                        name,
                        info,
                        dtype=dtype,
                        compute=_Mix(dec.router_mix),
                        shape=(k, info.shape[1]),
                        note=" router rows mixed",
                    )
                )
            continue
        tasks.append(TensorTask.copy(name, key, name, info, dtype=dtype))
    for layer in sorted(decisions):
        dec = decisions[layer]
        for kind in EXPERT_KINDS:
            first = ckpt[_expert_name(ckpt, layer, kind, 0)]
            out_dtype = dtype or first.dtype
            axis = 1 if kind == "w2" else 0
            if dec.picks is not None:
                width = len(dec.picks)
                name = dense.layer_name(layer, spec.dense_kind(f"{kind}.weight"))  # type: ignore[union-attr]
                count = spec.num_experts(ckpt.config) or 0
                if kind == "w2":
                    shape = (first.shape[0], width)
                    tasks.append(
                        TensorTask(
                            name,
                            shape,
                            out_dtype,
                            (),
                            compute=_Spilled(dec.down_file, spill),  # type: ignore[arg-type]
                            label="down_proj refit (ridge least squares)",
                        )
                    )
                else:
                    srcs = tuple(
                        Source(key, _expert_name(ckpt, layer, kind, e)) for e in range(count)
                    )
                    tasks.append(
                        TensorTask(
                            name,
                            (width, first.shape[1]),
                            out_dtype,
                            srcs,
                            compute=_Pick(dec.picks),
                            load_dtype="float32",
                            label=f"{width} neurons of {count} experts",
                        )
                    )
                continue
            width = first.shape[axis]
            for out_e, (members, weights, perms) in enumerate(
                zip(dec.members, dec.weights, dec.perms, strict=True)
            ):
                if dense is not None:
                    name = dense.layer_name(layer, spec.dense_kind(f"{kind}.weight"))
                else:
                    name = _expert_name(ckpt, layer, kind, out_e)
                srcs = tuple(Source(key, _expert_name(ckpt, layer, kind, e)) for e in members)
                label = " + ".join(f"{w:.3g}*e{e}" for w, e in zip(weights, members, strict=True))
                tasks.append(
                    TensorTask(
                        name,
                        tuple(first.shape),
                        out_dtype,
                        srcs,
                        compute=_Merge(weights, perms, axis),
                        load_dtype="float32",
                        label=label + (" (aligned)" if perms else ""),
                    )
                )
    if dense is not None:
        config = _dense_config(ckpt, width or int(ckpt.config["intermediate_size"]))
    else:
        config = spec.config_with_experts(
            dict(ckpt.config),
            opts.keep_experts,
            opts.top_k or min(spec_top_k(ckpt), opts.keep_experts),  # type: ignore[type-var]
        )
    return tasks, config


def spec_top_k(ckpt: Checkpoint) -> int:
    """The source's experts per token (``num_experts_per_tok`` for Mixtral)."""
    key = ckpt.arch.config_keys.get("experts_per_token", "num_experts_per_tok")
    return int(ckpt.config[key])


def plan_collapse(
    moe: str | os.PathLike[str],
    *,
    method: str = "uniform",
    calibration: str | os.PathLike[str] | None = None,
    intermediate_size: int | None = None,
    keep_experts: int | None = None,
    top_k: int | None = None,
    prune: bool = False,
    align: bool = False,
    calib: Calibration | None = None,
    ridge: float = 1e-6,
    max_rows: int = 4096,
    seed: int = 0,
    dtype: str | None = None,
    allow_pickle: bool = False,
) -> SurgeryResult:
    """Plan the collapse of ``moe`` (see the module docstring); calibration runs here, nothing
    is written. Returns the plan and its :class:`CollapseReport`.

    ``keep_experts=k`` gives an MoE of ``k`` experts (``top_k``: its experts per token, default
    the source's, which must then be ≤ k); ``ridge`` is ``slice``'s ridge relative to the mean
    diagonal of the Gram matrix; ``max_rows`` the calibration rows per layer used to select and
    fit (a seeded sample when there are more).
    """
    from splice.card import model_card
    from splice.dtypes import config_with_dtype, output_dtype
    from splice.output import ModelPlan

    _check_options(
        method, calibration, intermediate_size, keep_experts, top_k, prune, align, ridge, max_rows
    )
    output_dtype(dtype)
    _refuse_unsupported(moe)
    ckpt = open_checkpoint(moe, allow_pickle=allow_pickle)
    refuse_sliced(ckpt, "collapse")
    ckpt.validate()
    _check_model(ckpt)
    count = ckpt.arch.num_experts(ckpt.config) or 0
    src_k = spec_top_k(ckpt)
    width = ckpt[_expert_name(ckpt, 0, "w1", 0)].shape[0]
    if keep_experts is not None:
        if keep_experts > count:
            raise SpliceError(
                f"--keep-experts {keep_experts}: the model has only {count} experts per layer"
            )
        if top_k is None and keep_experts < src_k:
            raise SpliceError(
                f"--keep-experts {keep_experts} is fewer than the {src_k} experts each token "
                "uses; give --top-k (at most the kept count) too"
            )
        if top_k is not None and top_k > keep_experts:
            raise SpliceError(f"--top-k {top_k}: more than the {keep_experts} kept experts")
    if intermediate_size is not None and intermediate_size > count * width:
        raise SpliceError(
            f"--intermediate-size {intermediate_size}: more than the {count * width} neurons of "
            f"the {count} experts together"
        )
    opts = _Options(
        method, intermediate_size, keep_experts, top_k, prune, align, ridge, max_rows, seed
    )
    calib = calib or Calibration()
    op = (
        f"collapse --method {method}"
        if keep_experts is None
        else f"collapse --keep-experts {keep_experts}"
    )
    if keep_experts is not None:
        op += " --prune" if prune else " (merge)"
    if align:
        op += " --align"
    report = CollapseReport(
        operation=op,
        source=str(ckpt.path),
        method="prune" if prune else ("merge" if keep_experts is not None else method),
        num_experts=count,
        top_k=src_k,
        intermediate_size=width,
        out_intermediate_size=(intermediate_size or width) if keep_experts is None else width,
        out_experts=keep_experts,
        out_top_k=(top_k or min(src_k, keep_experts)) if keep_experts is not None else None,
        align=align,
        prune=prune,
        dense_model_type=ckpt.arch.experts.dense_model_type if keep_experts is None else None,  # type: ignore[union-attr]
    )
    act = _act(ckpt.config)
    folder = scratch_folder("collapse") if method == "slice" else None
    spill = Path(folder.name) if folder is not None else None
    decisions: dict[int, _Decision] = {}

    def on_layer(i: int, x: Any, y: Any) -> None:
        rec, dec = _decide(i, layer_experts(ckpt, i), x, y, opts, src_k, act, spill)
        report.layers.append(rec)
        decisions[i] = dec

    if calibration is None:
        for i in range(ckpt.num_layers):
            on_layer(i, None, None)
    else:
        import time

        windows = _windows(ckpt, calibration, calib)
        start = time.perf_counter()
        _stream_layers(ckpt, windows, calib, on_layer)
        report.meta.update(
            calibration=str(calibration),
            samples=int(windows.shape[0]),
            seq_len=int(windows.shape[1]),
            device=calib.device,
            dtype=calib.dtype,
            seconds=round(time.perf_counter() - start, 3),
            max_rows=max_rows,
            ridge=ridge,
        )
    tasks, config = _tasks(ckpt, decisions, opts, dtype, folder)
    if dtype:
        config = config_with_dtype(config, dtype)
    card = model_card(
        report.title,
        [report.source],
        details=report.card_details(),
        tags=["surgery", "collapse", report.method],
    )
    key = str(ckpt.path)
    plan = ModelPlan(
        tasks=tasks,
        models={key: ckpt},
        config=config,
        tokenizer_from=key,
        files={RECORD: report.record()},
        card=card,
    )
    return SurgeryResult(plan, report)  # type: ignore[arg-type]


def collapse(
    moe: str | os.PathLike[str],
    out: str | os.PathLike[str] | None = None,
    *,
    method: str = "uniform",
    calibration: str | os.PathLike[str] | None = None,
    intermediate_size: int | None = None,
    keep_experts: int | None = None,
    prune: bool = False,
    align: bool = False,
    dry_run: bool = False,
    options: ExecOptions | None = None,
    **kwargs: Any,
) -> SurgeryResult:
    """Collapse ``moe`` into ``out`` (atomically) as :func:`plan_collapse` plans it; with
    ``dry_run`` only plan. ``out`` is locked and checked before calibration runs. Returns a
    :class:`SurgeryResult` whose ``report`` is a :class:`CollapseReport`."""
    opts = options or ExecOptions()
    if out is None and not dry_run:
        raise SpliceError("give an output folder OUT (or --dry-run)")
    target = None if dry_run else out
    with claimed(target, opts, [moe]):
        result = plan_collapse(
            moe,
            method=method,
            calibration=calibration,
            intermediate_size=intermediate_size,
            keep_experts=keep_experts,
            prune=prune,
            align=align,
            **kwargs,
        )
        if target is None:
            return result
        return write_result(result, target, opts)
