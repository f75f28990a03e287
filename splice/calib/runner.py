"""Run a causal LM on token windows with pluggable collectors, batch by batch.

:func:`run` hooks modules of the decoder layers (a *site*: the layer itself, its attention or
MLP block, an MoE router, the MLP intermediate) and hands what each hooked module saw on a
batch (:class:`~splice.calib.collectors.Capture`) to the collectors that asked for it; every
collector folds it into running sums and the hidden states are dropped, so memory stays at one
batch whatever the number of windows.

``sequential=True`` is SliceGPT's procedure: layer by layer, each layer fed the outputs of the
already modified layers before it (callbacks ``before_layer`` / ``after_layer``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from splice.calib.collectors import SITES, Capture, Collector
from splice.errors import SpliceError
from splice.progress import progress
from splice.text import plural

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel


def decoder_layers(model: PreTrainedModel, layer_prefix: str) -> Any:
    """The ``ModuleList`` of decoder layers, found from the spec's ``model.layers.{i}.``."""
    path = layer_prefix.split("{i}")[0].rstrip(".")
    try:
        return model.get_submodule(path)
    except AttributeError:
        raise SpliceError(f"model has no module {path!r} holding its layers") from None


class _Stop(Exception):
    """Raised inside a forward pass to end it (after the last hooked layer)."""


def _child(module: Any, names: Sequence[str]) -> Any:
    for n in names:
        sub = getattr(module, n, None)
        if sub is not None and hasattr(sub, "register_forward_hook"):
            return sub
    return None


def _site_module(layer: Any, site: str, index: int) -> tuple[Any, str]:
    """``(module, kind)`` to hook for ``site`` in decoder layer ``index``; kind ``experts``
    means a packed MoE experts module whose intermediates are computed from its input."""
    import torch

    if site == "layer":
        return layer, "plain"
    if site == "attn":
        attn = _child(layer, ("self_attn", "attn", "self_attention"))
        if attn is None:
            raise SpliceError(f"layer {index} has no attention module (self_attn)")
        return attn, "plain"
    mlp = _child(layer, ("mlp", "block_sparse_moe", "feed_forward"))
    if site == "mlp":
        if mlp is None:
            raise SpliceError(f"layer {index} has no MLP module (mlp)")
        return mlp, "plain"
    if site == "router":
        gate = _child(mlp, ("gate", "router")) if mlp is not None else None
        if gate is None:
            raise SpliceError(f"layer {index} has no MoE router (mlp.gate): not an MoE layer")
        return gate, "plain"
    if site == "mlp_hidden":
        down = _child(mlp, ("down_proj", "w2")) if mlp is not None else None
        if down is not None:
            return down, "plain"
        experts = getattr(mlp, "experts", None) if mlp is not None else None
        packed = all(
            isinstance(getattr(experts, n, None), torch.Tensor) and getattr(experts, n).dim() == 3
            for n in ("gate_up_proj", "down_proj")
        )
        if not packed:
            raise SpliceError(f"layer {index}: no MLP down_proj or packed experts to read")
        plain = (
            getattr(experts, "has_gate", True)
            and getattr(experts, "is_concatenated", True)
            and not getattr(experts, "is_transposed", False)
            and not getattr(experts, "has_bias", False)
            and not getattr(experts, "has_post_expert_norm", False)
        )
        if not plain:
            raise SpliceError(
                f"layer {index}: experts layout not supported for mlp_hidden (only "
                "concatenated [E, 2I, H] gate_up_proj without bias or transposition)"
            )
        return experts, "experts"
    try:
        return layer.get_submodule(site), "plain"
    except AttributeError:
        known = ", ".join(SITES)
        raise SpliceError(
            f"layer {index} has no module {site!r} (sites: {known}, or a module path)"
        ) from None


@dataclass
class _State:
    """The batch being run, shared by the hooks."""

    batch: int = 0
    mask: Any = None  # [B, T] bool on the device
    active: bool = True

    def mask_for(self, x: torch.Tensor, where: str) -> torch.Tensor:
        m = self.mask
        if x.dim() >= 3 and tuple(x.shape[:2]) == tuple(m.shape):
            return m
        if x.dim() >= 1 and x.shape[0] == m.numel():
            return m.reshape(-1)
        raise SpliceError(
            f"{where}: input {list(x.shape)} does not line up with the batch's tokens "
            f"{list(m.shape)}"
        )


def _first_tensor(args: tuple, kwargs: dict) -> torch.Tensor:
    import torch

    if args and isinstance(args[0], torch.Tensor):
        return args[0]
    if isinstance(kwargs.get("hidden_states"), torch.Tensor):
        return kwargs["hidden_states"]
    return next(v for v in kwargs.values() if isinstance(v, torch.Tensor))


def _expert_captures(
    experts: Any, args: tuple, kwargs: dict, layer: int, state: _State
) -> list[Capture]:
    """Per expert hit: the intermediate ``[n, I]`` and down projection ``[n, H]`` of the real
    tokens routed to it, computed from the experts module's own weights."""
    import torch

    names = ("hidden_states", "top_k_index", "top_k_weights")
    x, index, weights = (*args, *(kwargs[n] for n in names[len(args) :]))[:3]
    real = state.mask_for(x, f"layer {layer} experts")
    out = []
    for e in range(experts.gate_up_proj.shape[0]):
        rows, pos = ((index == e) & real[:, None]).nonzero(as_tuple=True)
        if rows.numel() == 0:
            continue
        up = torch.nn.functional.linear(x[rows], experts.gate_up_proj[e])
        if hasattr(experts, "_apply_gate"):
            h = experts._apply_gate(up)
        else:
            gate, up = up.chunk(2, dim=-1)
            h = experts.act_fn(gate) * up
        y = torch.nn.functional.linear(h, experts.down_proj[e])
        ones = torch.ones(h.shape[0], dtype=torch.bool, device=h.device)
        out.append(Capture(layer, state.batch, h, y, ones, e, weights[rows, pos]))
    return out


def _attach(layers: Any, collectors: Sequence[Collector], state: _State) -> list[Any]:
    """One forward hook per hooked (layer, module), feeding its collectors."""
    groups: dict[tuple[int, str], list[Collector]] = {}
    for c in collectors:
        for i in _layers_of(c, len(layers)):
            groups.setdefault((i, c.site), []).append(c)
    handles = []
    for (i, site), cs in groups.items():
        module, kind = _site_module(layers[i], site, i)

        def hook(
            module: Any, args: tuple, kwargs: dict, output: Any, i=i, site=site, cs=cs, kind=kind
        ) -> None:
            if not state.active:
                return
            if kind == "experts":
                caps = _expert_captures(module, args, kwargs, i, state)
            else:
                x = _first_tensor(args, kwargs)
                y = output[0] if isinstance(output, (tuple, list)) else output
                caps = [Capture(i, state.batch, x, y, state.mask_for(x, f"layer {i} {site}"))]
            for cap in caps:
                for c in cs:
                    c.update(cap)

        handles.append(module.register_forward_hook(hook, with_kwargs=True))
    return handles


def _layers_of(c: Collector, n_layers: int) -> list[int]:
    if c.layers is None:
        return list(range(n_layers))
    out = [int(i) for i in c.layers]
    bad = [i for i in out if not 0 <= i < n_layers]
    if bad:
        raise SpliceError(
            f"{type(c).__name__}: layer {bad[0]} is out of range (the model has {plural(n_layers, 'layer')})"
        )
    return out


def _check_windows(windows: Any, mask: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
    import torch

    if not isinstance(windows, torch.Tensor) or windows.dim() != 2 or windows.is_floating_point():
        raise SpliceError("windows must be an [N, T] tensor of token ids")
    if windows.shape[0] < 1 or windows.shape[1] < 1:
        raise SpliceError(f"windows {list(windows.shape)} hold no tokens")
    if mask is None:
        return windows, None
    if not isinstance(mask, torch.Tensor) or tuple(mask.shape) != tuple(windows.shape):
        raise SpliceError(
            f"attention_mask must be a tensor of the windows' shape {list(windows.shape)}"
        )
    if not bool(((mask == 0) | (mask == 1)).all()):
        raise SpliceError("attention_mask must hold 0 and 1 only")
    if not bool(mask.bool().any(1).all()):
        raise SpliceError("attention_mask: a window has no real token")
    return windows, mask


@dataclass
class _Batch:
    """Token ids ``[B, T]`` of one batch and its attention mask (None: no padding)."""

    ids: torch.Tensor
    mask: torch.Tensor | None
    device: str

    def real(self) -> torch.Tensor:
        """``[B, T]`` bool on the device: True at real tokens."""
        import torch

        if self.mask is None:
            return torch.ones(self.ids.shape, dtype=torch.bool, device=self.device)
        return self.mask.to(self.device).bool()

    def forward(self, model: Any) -> Any:
        import torch

        mask = None if self.mask is None else self.mask.to(self.device, torch.long)
        return model(input_ids=self.ids.to(self.device), attention_mask=mask, use_cache=False)


def _check_device(model: Any, device: str) -> None:
    """``SpliceError`` unless the model's weights are on ``device``."""
    import torch

    try:
        want = torch.device(device)
    except (RuntimeError, ValueError):
        raise SpliceError(f"device {device!r}: not a device (cpu, cuda, cuda:1, mps)") from None
    param = next(iter(model.parameters()), None)
    have = param.device if param is not None else want
    if have.type != want.type or (want.index is not None and have.index != want.index):
        raise SpliceError(f"the model is on {have}, not on the run's device {device}; move it")


def _editing() -> Any:
    """For callbacks: no autograd, but not inference mode (so edited weights stay ordinary)."""
    import torch

    stack = contextlib.ExitStack()
    stack.enter_context(torch.inference_mode(False))
    stack.enter_context(torch.no_grad())
    return stack


def run(
    model: PreTrainedModel,
    windows: torch.Tensor,
    collectors: Sequence[Collector],
    *,
    device: str = "cpu",
    batch_size: int = 8,
    attention_mask: torch.Tensor | None = None,
    sequential: bool = False,
    before_layer: Callable[[int], None] | None = None,
    after_layer: Callable[[int, Sequence[Collector]], None] | None = None,
    layer_prefix: str = "model.layers.{i}.",
    layer_types: Sequence[str] | None = None,
    show_progress: bool = False,
) -> list[Any]:
    """Run ``model`` (already on ``device``) on ``windows`` ``[N, T]`` in batches, feeding every
    collector; returns ``[c.result() for c in collectors]``.

    ``attention_mask`` ``[N, T]`` (1 = real token) is passed to the model when given, and
    collectors see only real tokens. A forward pass ends after the last hooked layer.

    ``sequential=True`` runs layer by layer: the inputs of layer 0 for all windows are kept on
    the device in the model dtype (``N × T × hidden`` values, plus per batch what the model
    hands its layers: rotary tables ``[B, T, head_dim]`` and, with padding, a ``[B, 1, T, T]``
    mask); for each layer i, ``before_layer(i)``, then layer i runs on every batch with its
    hooks on (its collectors see the inputs made by the layers before it as they are now),
    then ``after_layer(i, collectors)`` may modify layer i, and the stored inputs are replaced
    by layer i's outputs recomputed with the modified layer (without a callback: the outputs
    of the pass that fed the collectors). Callbacks run under ``no_grad``, outside inference
    mode. Where layers get different attention masks (``layer_types`` mixing sliding and full
    attention), what the model hands layer 0 is captured once per type, with the config saying
    every layer is of that type, and each layer runs with its own type's: ``layer_types`` gives
    the type of each module under ``layer_prefix`` (default: the config's, when it has one per
    module).
    """
    import torch

    windows, attention_mask = _check_windows(windows, attention_mask)
    if batch_size < 1:
        raise SpliceError(f"batch_size must be 1 or more, got {batch_size}")
    if not collectors:
        raise SpliceError("run needs at least one collector")
    if (before_layer or after_layer) and not sequential:
        raise SpliceError("before_layer / after_layer need sequential=True")
    _check_device(model, device)
    layers = decoder_layers(model, layer_prefix)
    n_layers = len(layers)
    needed = sorted({i for c in collectors for i in _layers_of(c, n_layers)})
    for c in collectors:
        c.start(model, n_layers)
    masks = torch.split(attention_mask, batch_size) if attention_mask is not None else None
    batches = [
        _Batch(ids, masks[b] if masks is not None else None, device)
        for b, ids in enumerate(torch.split(windows, batch_size))
    ]
    state = _State()
    handles = _attach(layers, collectors, state)
    try:
        with torch.inference_mode():
            if sequential:
                last = n_layers - 1 if (before_layer or after_layer) else needed[-1]
                _run_sequential(
                    model,
                    layers,
                    batches,
                    collectors,
                    state,
                    last=last,
                    before_layer=before_layer,
                    after_layer=after_layer,
                    layer_types=layer_types,
                    show_progress=show_progress,
                )
            else:
                _run_batches(model, layers[needed[-1]], batches, collectors, state, show_progress)
    finally:
        for h in handles:
            h.remove()
    return [c.result() for c in collectors]


def _run_batches(
    model: Any,
    last_layer: Any,
    batches: list[_Batch],
    collectors: Sequence[Collector],
    state: _State,
    show_progress: bool,
) -> None:
    def stop(*_: Any) -> None:
        raise _Stop

    handle = last_layer.register_forward_hook(stop)  # after the collectors' hooks on it
    try:
        for b, batch in enumerate(progress(batches, "calibration", enabled=show_progress)):
            state.batch, state.mask = b, batch.real()
            with contextlib.suppress(_Stop):
                batch.forward(model)
            for c in collectors:
                c.finish_batch(b)
    finally:
        handle.remove()


def _layer_kinds(model: Any, n: int, given: Sequence[str] | None) -> list[str | None]:
    """The attention type of each of the ``n`` modules the sequential run calls (one ``None``
    type when all layers get the same mask)."""
    kinds = getattr(model.config, "layer_types", None)
    if not kinds or len(set(kinds)) == 1:
        return [None] * n
    if given is None and len(kinds) == n:
        given = kinds
    if given is None or len(given) != n:
        raise SpliceError(
            f"sequential mode: this model's layers get different attention masks "
            f"(layer_types {sorted(set(kinds))}), and the {n} modules run are not its layers"
        )
    return list(given)


@contextlib.contextmanager
def _all_layers_of_type(model: Any, kind: str | None) -> Iterator[None]:
    """The model's config says every layer is of type ``kind`` (``None``: unchanged), so what
    the model hands layer 0 (its attention mask) is what a layer of that type gets."""
    if kind is None:
        yield
        return
    cfg = model.config
    saved = cfg.layer_types
    cfg.layer_types = [kind] * len(saved)
    try:
        yield
    finally:
        cfg.layer_types = saved


def _run_sequential(
    model: Any,
    layers: Any,
    batches: list[_Batch],
    collectors: Sequence[Collector],
    state: _State,
    *,
    last: int,
    before_layer: Callable[[int], None] | None,
    after_layer: Callable[[int, Sequence[Collector]], None] | None,
    layer_types: Sequence[str] | None,
    show_progress: bool,
) -> None:
    kinds = _layer_kinds(model, len(layers), layer_types)

    def catch(module: Any, args: tuple, kwargs: dict) -> None:
        raise _Stop(args, kwargs)

    inputs: list[torch.Tensor] = []  # [B, T, H] per batch, model dtype, on the device
    # per layer type, the rest of what the model hands its layers (masks, rotary tables)
    calls: dict[str | None, list[tuple[tuple, dict]]] = {}
    state.active = False
    handle = layers[0].register_forward_pre_hook(catch, with_kwargs=True)
    try:
        for kind in dict.fromkeys(kinds):
            calls[kind] = []
            with _all_layers_of_type(model, kind):
                for batch in batches:
                    try:
                        batch.forward(model)
                    except _Stop as s:
                        args, kwargs = s.args
                        kwargs = dict(kwargs)
                        h = args[0] if args else kwargs.pop("hidden_states")
                        if len(inputs) < len(batches):
                            inputs.append(h)
                        calls[kind].append((tuple(args[1:]), kwargs))
                    else:
                        raise RuntimeError("layer 0 was never called")
    finally:
        handle.remove()

    def forward(i: int, b: int) -> torch.Tensor:
        args, kwargs = calls[kinds[i]][b]
        out = layers[i](inputs[b], *args, **kwargs)
        return out[0] if isinstance(out, (tuple, list)) else out

    for i in progress(range(last + 1), "layers", enabled=show_progress):
        if before_layer is not None:
            with _editing():
                before_layer(i)
        state.active = True
        for b in range(len(batches)):
            state.batch, state.mask = b, batches[b].real()
            out = forward(i, b)
            if after_layer is None:
                inputs[b] = out
        state.active = False
        if after_layer is not None:
            with _editing():
                after_layer(i, collectors)
            for b in range(len(batches)):
                inputs[b] = forward(i, b)
    for b in range(len(batches)):
        for c in collectors:
            c.finish_batch(b)
