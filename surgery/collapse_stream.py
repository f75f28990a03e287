"""Reading an MoE model layer by layer for ``splice collapse``: one layer's experts, router and
selection bias as tensors (:func:`layer_experts`, the router named by the family's
:class:`~splice.surgery.collapse_routing.Family`), the layers that hold experts
(:func:`moe_layers`; the others are dense MLPs: DeepSeek's ``first_k_dense_replace``, Qwen's
``mlp_only_layers``, ERNIE's ``moe_layer_start_index``), and the calibration run that streams the
model one decoder layer at a time (:func:`stream_layers`: a skeleton model, each layer's weights
loaded, its MLP inputs and outputs handed to a callback, then freed), so a model far larger than
memory can be read."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from splice.checkpoint import Checkpoint
from splice.errors import SpliceError
from splice.surgery.calibration import Calibration

if TYPE_CHECKING:
    import torch

    from splice.surgery.collapse_math import Experts
    from splice.surgery.collapse_routing import Family

EXPERT_KINDS = ("w1", "w3", "w2")  # gate, up, down in collapse_math's notation
#: their biases (gpt-oss), where the spec names them
BIAS_KINDS = ("b1", "b3", "b2")
#: the per-expert tensor names of families that call them gate/up/down_proj
_PROJ = {
    "w1": "gate_proj.weight",
    "w3": "up_proj.weight",
    "w2": "down_proj.weight",
    "b1": "gate_proj.bias",
    "b3": "up_proj.bias",
    "b2": "down_proj.bias",
}


def expert_kind(ckpt: Checkpoint, kind: str) -> str:
    """The spec's expert tensor kind for ``w1`` / ``w3`` / ``w2`` (Mixtral's own names, or
    ``gate_proj`` / ``up_proj`` / ``down_proj``) and the biases ``b1`` / ``b3`` / ``b2``."""
    ex = ckpt.arch.experts
    assert ex is not None
    return f"{kind}.weight" if f"{kind}.weight" in ex.tensors else _PROJ[kind]


def expert_kinds(ckpt: Checkpoint) -> tuple[str, ...]:
    """The kinds each expert of ``ckpt`` has: weights, and biases where the spec names them."""
    ex = ckpt.arch.experts
    assert ex is not None
    return EXPERT_KINDS + tuple(k for k in BIAS_KINDS if _PROJ[k] in ex.tensors)


def expert_name(ckpt: Checkpoint, layer: int, kind: str, e: int) -> str:
    return ckpt.arch.layer_name(layer, expert_kind(ckpt, kind), e)


def router_name(ckpt: Checkpoint, layer: int, family: Family) -> str:
    return ckpt.arch.layer_name(layer, family.router)


def moe_layers(ckpt: Checkpoint) -> list[int]:
    """The layers holding routed experts (from the stored tensors, not the config's rules)."""
    from splice.expert_subset import moe_layers_of

    return moe_layers_of(ckpt.tensors, ckpt.arch)


def layer_experts(ckpt: Checkpoint, layer: int, family: Family) -> Experts:
    """One layer's experts, router and selection bias from the checkpoint, float64 (see
    collapse_math)."""
    import torch

    from splice.surgery.collapse_math import Experts

    count = ckpt.arch.num_experts(ckpt.config)
    assert count is not None
    stacked = {
        k: torch.stack(
            [ckpt.load(expert_name(ckpt, layer, k, e), dtype="float64") for e in range(count)]
        )
        for k in expert_kinds(ckpt)
    }
    router = ckpt.load(router_name(ckpt, layer, family), dtype="float64")

    def vector(kind: str | None) -> torch.Tensor | None:
        if kind is None:
            return None
        return ckpt.load(ckpt.arch.layer_name(layer, kind), dtype="float64").reshape(-1)

    return Experts(
        stacked.pop("w1"), stacked.pop("w3"), stacked.pop("w2"), router, vector(family.bias),
        router_bias=vector(family.router_bias), **stacked,
    )  # fmt: skip


def activation(config: dict[str, Any]) -> Any:
    """The experts' gated unit ``glu(gate, up)`` (collapse_math's ``Act``): ``act(gate) * up``,
    or gpt-oss's clamped form (transformers' ``GptOssExperts._apply_gate``: gate clamped above
    and up on both sides at ``swiglu_limit``, ``gate · σ(α · gate) · (up + 1)``)."""
    if config.get("model_type") == "gpt_oss":
        import torch

        limit = float(config.get("swiglu_limit", 7.0))
        alpha = float(config.get("swiglu_alpha", 1.702))

        def clamped(g: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
            g = g.clamp(max=limit)
            return g * torch.sigmoid(g * alpha) * (u.clamp(-limit, limit) + 1)

        return clamped
    from transformers.activations import ACT2FN

    act = ACT2FN[config.get("hidden_act", "silu")]
    return lambda g, u: act(g) * u


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
    layers = ckpt.arch.layer_prefix.split("{i}")[0]
    for name, module in list(model.named_modules()):
        meta = [n for n, b in module.named_buffers(recurse=False) if b.is_meta]
        if meta:
            transient = getattr(module, "_non_persistent_buffers_set", set())
            if f"{name}.".startswith(layers) and not set(meta) & transient:
                continue  # a layer's stored buffer (a router's selection bias): loaded with it
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


def stream_layers(
    ckpt: Checkpoint, windows: torch.Tensor, calib: Calibration, on_layer: Any
) -> None:
    """Run the source model layer by layer on ``windows``: before layer ``i`` its weights are
    read, and layer ``i-1`` is decided (``on_layer(i-1, x [n, H], y [n, H])`` gets its MoE
    block's input and output rows, float64 on the CPU) and dropped; the last layer after the
    run. Each layer runs once per batch (no ``after_layer``: the runner feeds the next layer
    the outputs of the pass the collector saw)."""
    from splice.calib import Collector, run

    model = _skeleton(ckpt, calib.device, calib.dtype)
    spec = ckpt.arch
    path = spec.layer_prefix.split("{i}")[0].rstrip(".")
    layers = model.get_submodule(path)
    rows = type("BlockRows", (_BlockRows, Collector), {})()

    def finish(i: int) -> None:
        layers[i].to("meta")
        x, y = rows.take()
        on_layer(i, x, y)

    def before(i: int) -> None:
        if i > 0:
            finish(i - 1)
        keys = list(layers[i].state_dict().keys())  # dense and MoE layers differ
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


def calibration_windows(ckpt: Checkpoint, calibration: Any, calib: Calibration) -> torch.Tensor:
    from splice.calib import windows_for

    return windows_for(ckpt, calibration, calib)
