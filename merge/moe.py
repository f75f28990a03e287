"""MoE from dense models (``merge_method: moe``, mergekit-moe's recipe): attention, norms and
embeddings come from ``base_model``, expert ``e`` of layer ``l`` is the MLP of
``experts[e].source_model`` at layer ``l``, and each ``shared_experts`` entry (one at most) is the
MLP of its source model, which every token goes through. The output is Mixtral, DeepSeek-MoE,
Qwen2-MoE or Qwen3-MoE, chosen as mergekit-moe chooses (its ``architecture`` key, else by the
base model's type and the shared experts: :mod:`splice.merge.moe_layouts`).

Routers (``[num_experts, hidden]`` per layer) are set by ``gate_mode``:

* ``hidden`` (default): for each expert, the base model's hidden state entering layer ``l`` at
  the last real token of each positive prompt, averaged over prompts, minus the same for its
  negative prompts, normalized (mergekit reads position -1, which is a pad token for padded
  prompts; splice uses each prompt's last real token);
* ``hidden_avg``: the same with states averaged over each prompt's real tokens;
* ``cheap_embed``: the normalized sum of the prompts' token embeddings, the same for every layer;
* ``random``: standard normal; ``uniform_random``: U(-1/sqrt(hidden), 1/sqrt(hidden)).

Qwen2-MoE's ``shared_expert_gate`` (``[1, hidden]``) is the shared expert's row, made the same
way from its prompts (drawn, for the random modes). As in mergekit, the random modes draw one
``[layers, gates, hidden]`` tensor for the experts and then the shared experts (DeepSeek's too,
though it has no gate), so the same seed in torch's generator gives mergekit's routers.

Per expert (shared ones too), ``noise_scale`` adds seeded Gaussian noise to its weights and
``residual_scale`` multiplies its ``down_proj`` (after the noise, as mergekit does).
"""

from __future__ import annotations

import contextlib
import math
import threading
from collections.abc import Iterator, Mapping
from typing import Any

from splice.checkpoint import Checkpoint
from splice.dtypes import config_with_dtype, dtype_name
from splice.execute import TensorTask, tensor_seed
from splice.merge.moe_layouts import (
    DEEPSEEK,
    DEEPSEEK_CODE,
    DENSE_MLP,
    DOWN,
    MIXTRAL,
    QWEN2,
    RANDOM_GATES,
    Layout,
    choose,
    config_for,
    layout_problems,
)
from splice.merge.planner import MergePlan, check_dtypes
from splice.merge.recipe import Expert, Recipe
from splice.problems import Problems, open_models

PROMPT_GATES = ("hidden", "hidden_avg", "cheap_embed")
GATE_MODES = (*PROMPT_GATES, *RANDOM_GATES)


class _Router:
    """Computes every layer's router once, on first use: ``[layers, experts, hidden]``."""

    def __init__(
        self,
        recipe: Recipe,
        base: Checkpoint,
        seed: int,
        device: str = "cpu",
        tokenizer: Any = None,
        trust_remote_code: bool = False,
    ) -> None:
        self.recipe, self.base, self.seed, self.device = recipe, base, seed, device
        self.tokenizer, self.trust_remote_code = tokenizer, trust_remote_code
        #: the experts with a router row: the recipe's, then (plan_moe) gated shared experts
        self.gated: list[Expert] = list(recipe.experts or [])
        self._gates: Any = None
        self._lock = threading.Lock()

    def layer(self, index: int) -> Any:
        with self._lock:
            if self._gates is None:
                self._gates = self._compute()
        return self._gates[index]

    def _compute(self) -> Any:
        import torch

        cfg, experts = self.base.config, self.gated
        layers, hidden = self.base.num_layers, cfg["hidden_size"]
        mode = self.recipe.gate_mode
        g = torch.Generator().manual_seed(self.seed)
        if mode == "random":
            return torch.randn((layers, len(experts), hidden), generator=g)
        if mode == "uniform_random":  # mergekit's expression, so that its draws agree bitwise
            bound = math.sqrt(1.0 / hidden)
            return torch.rand((layers, len(experts), hidden), generator=g) * 2 * bound - bound
        tok = self.tokenizer  # loaded by plan_moe, before anything is written
        if mode == "cheap_embed":
            embed = self.base.load(self.base.arch.embed, dtype="float32")
            state = lambda prompts: _cheap_embed(embed, tok, prompts, layers)  # noqa: E731
        else:
            from splice.modeling import load_causal_lm

            with _quiet_transformers():
                model = load_causal_lm(
                    self.base,
                    device=self.device,
                    trust_remote_code=self.trust_remote_code,
                    why="the router's hidden states need finite weights",
                )
            prefix, average = self.base.arch.layer_prefix, mode == "hidden_avg"
            state = lambda prompts: _hidden(model, tok, prompts, average, self.device, prefix)  # noqa: E731
        vecs = []
        for e in experts:
            v = state(e.positive_prompts or [])
            if e.negative_prompts:
                v = v - state(e.negative_prompts)
            vecs.append(v / v.norm(dim=-1, keepdim=True).clamp(min=1e-8))
        return torch.stack(vecs, dim=1)  # [layers, experts, hidden]


def _router_tokenizer(recipe: Recipe, base: Checkpoint, trust_remote_code: bool) -> Any:
    """The base model's tokenizer for the prompt routers (``None`` for the random ones); a
    one-line ``SpliceError`` naming the base model if it cannot be loaded."""
    from splice.modeling import load_tokenizer

    if recipe.gate_mode not in PROMPT_GATES:
        return None
    with _quiet_transformers():
        tok = load_tokenizer(
            base.path, trust_remote_code=trust_remote_code, name=f"base model {recipe.base_model}"
        )
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    """No transformers loading bars or info logs while the router loads the base model: they
    would cut through splice's own progress line (or print under ``--no-progress``)."""
    from transformers.utils import logging as hf_logging

    bars, level = hf_logging.is_progress_bar_enabled(), hf_logging.get_verbosity()
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
        if bars:
            hf_logging.enable_progress_bar()


def _tokenize(tok: Any, prompts: list[str]) -> Any:
    return tok(
        [(tok.bos_token or "") + p for p in prompts],
        return_tensors="pt",
        padding=True,
        add_special_tokens=False,
    )


def _hidden(
    model: Any,
    tok: Any,
    prompts: list[str],
    average: bool,
    device: str = "cpu",
    layer_prefix: str = "model.layers.{i}.",
) -> Any:
    """Hidden state entering each layer, per prompt at its last real token (or averaged over
    its real tokens), averaged over prompts: ``[layers, hidden]`` float32 on the CPU. The model
    runs on ``device`` in its dtype, a few prompts at a time (:func:`splice.calib.run`)."""
    import torch

    from splice.calib import PooledMean, run

    batch = _tokenize(tok, prompts)
    (means,) = run(
        model,
        batch["input_ids"],
        [PooledMean("layer", "input", "mean" if average else "last")],
        attention_mask=batch["attention_mask"],
        device=device,
        batch_size=8,
        layer_prefix=layer_prefix,
    )
    return torch.stack([means[i] for i in sorted(means)]).float().cpu()


def _cheap_embed(embed: Any, tok: Any, prompts: list[str], layers: int) -> Any:
    """Normalized sum of the prompts' token embeddings, repeated per layer: ``[layers, hidden]``."""
    batch = _tokenize(tok, prompts)
    h = embed[batch["input_ids"]] * batch["attention_mask"][..., None]
    v = h.sum((0, 1))
    return (v / v.norm().clamp(min=1e-8)).expand(layers, -1).clone()


def _shared_experts(recipe: Recipe) -> list[Expert]:
    """The recipe's ``shared_experts`` (none for a recipe schema without the field)."""
    return list(getattr(recipe, "shared_experts", None) or [])


def _check(
    recipe: Recipe, ckpts: Mapping[str, Checkpoint], shared: list[Expert], problems: Problems
) -> tuple[Layout | None, list[str]]:
    """Every problem of the recipe against its models, and the output layout (None if it has
    none) with the plan's warnings."""
    experts = recipe.experts or []
    base = ckpts[recipe.base_model]  # type: ignore[index]
    base_type = str(base.config.get("model_type"))
    warns: list[str] = []
    check_dtypes(recipe, problems)
    if recipe.gate_mode not in GATE_MODES:
        problems.add(
            f"moe: unknown gate_mode {recipe.gate_mode!r}; choose from {', '.join(GATE_MODES)}"
        )
    if not 1 <= recipe.experts_per_token <= len(experts):
        problems.add(
            f"moe: experts_per_token must be between 1 and the number of experts ({len(experts)})"
        )
    layout, why = choose(recipe.architecture, base_type, shared, recipe.gate_mode)
    if why:
        problems.add(why)
    if recipe.gate_mode in PROMPT_GATES:
        for i, e in enumerate(experts):
            if not e.positive_prompts:
                problems.add(f"moe: expert {i} ({e.source_model}) has no positive_prompts")
        keys = {(tuple(e.positive_prompts or []), tuple(e.negative_prompts or [])) for e in experts}
        if len(experts) > 1 and len(keys) == 1:
            problems.add(
                "moe: every expert has the same prompts, so the router cannot tell them apart"
            )
    for what, e in [("expert", e) for e in experts] + [("shared expert", e) for e in shared]:
        ck = ckpts[e.source_model]
        diff = ", ".join(
            f"{key} {ck.config.get(key)} vs {base.config.get(key)}"
            for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "hidden_act")
            if ck.config.get(key) != base.config.get(key)
        )
        if diff:
            problems.add(f"moe: {what} {e.source_model} does not fit the base model ({diff})")
        _check_mlp(ck, f"{what} {e.source_model}", problems)
    if layout is None:
        return None, warns
    for name in base:
        t = base.arch.parse(name)
        if t.layer is None or t.kind in DENSE_MLP:
            continue
        if t.kind.startswith("mlp.") or t.group == "mlp":
            problems.add(
                f"moe: the base model's MLP has {t.kind}, which {layout.name} has no place for"
            )
        elif t.kind.endswith(".bias") and layout is MIXTRAL:
            problems.add("moe: Mixtral has no attention or MLP biases; the base model has them")
        elif t.kind == "self_attn.o_proj.bias" and layout is QWEN2:
            problems.add("moe: Qwen2-MoE has no o_proj bias; the base model has one")
    refused, warns = layout_problems(layout, base.config, base.num_layers)
    for line in refused:
        problems.add(line)
    if layout is DEEPSEEK:
        warns.append(
            "moe: the DeepSeek-MoE output (model_type deepseek, as mergekit-moe writes it) loads "
            f"only with DeepSeek's own model code ({DEEPSEEK_CODE}, trust_remote_code), which "
            "transformers lacks to check it: splice writes it only with --no-verify"
        )
    return layout, warns


def _check_mlp(ck: Checkpoint, what: str, problems: Problems) -> None:
    """An expert's source must have the dense MLP (gate, up, down; no biases) in every layer."""
    for layer, names in ck.layer_index.items():
        kinds = {ck.arch.parse(n).kind for n in names}
        missing = [k for k in DENSE_MLP if k not in kinds]
        if missing:
            problems.add(f"moe: {what} has no dense MLP ({missing[0]}) in layer {layer}")
            return
        extra = sorted(k for k in kinds if k.startswith("mlp.") and k not in DENSE_MLP)
        if extra:
            problems.add(f"moe: {what} has {extra[0]} in its MLP, which an expert has no place for")
            return


def plan_moe(
    recipe: Recipe,
    *,
    models: Mapping[str, Checkpoint] | None = None,
    allow_pickle: bool = False,
    seed: int | None = None,
    device: str = "cpu",
    trust_remote_code: bool = False,
) -> MergePlan:
    """Plan an MoE from dense experts (see the module docstring); the base model runs on
    ``device`` for the ``hidden`` / ``hidden_avg`` routers. The prompt routers' tokenizer
    (the base model's) is loaded here, so a tokenizer that cannot load (one that needs its own
    code without ``trust_remote_code``) is refused before anything is written."""
    shared = _shared_experts(recipe)
    refs = [*recipe.referenced_models(), *(e.source_model for e in shared)]
    ckpts = open_models(dict.fromkeys(refs), allow_pickle=allow_pickle, models=models)
    problems = Problems()
    layout, warns = _check(recipe, ckpts, shared, problems)
    problems.raise_if_any()
    assert layout is not None and recipe.base_model is not None
    base_key = recipe.base_model
    base = ckpts[base_key]
    tok = _router_tokenizer(recipe, base, trust_remote_code)
    dense = base.arch
    out_dtype = (
        dtype_name(recipe.out_dtype or recipe.dtype) if (recipe.out_dtype or recipe.dtype) else None
    )
    seed = seed if seed is not None else (recipe.seed or 0)
    experts: list[Expert] = recipe.experts or []
    router = _Router(recipe, base, seed, device, tok, trust_remote_code)
    if recipe.gate_mode in RANDOM_GATES or any(e.positive_prompts for e in shared):
        router.gated += shared  # mergekit draws / computes their rows after the experts'
    n, hidden = len(experts), base.config["hidden_size"]
    router_dtype = out_dtype or base[dense.embed].dtype
    tasks: list[TensorTask] = []

    def copy(
        out: str, model: str, name: str, scale: float = 1.0, noise: float | None = None
    ) -> None:
        compute = _Noise(noise, tensor_seed(seed, out)) if noise else None
        info = ckpts[model][name]
        tasks.append(
            TensorTask.copy(out, model, name, info, dtype=out_dtype, scale=scale, compute=compute)
        )

    def mlp(expert: Expert, layer: int, e: int | None) -> None:
        """Expert ``e``'s MLP in ``layer`` (``None``: the shared expert's)."""
        ck = ckpts[expert.source_model]
        for kind in DENSE_MLP:
            out = (
                layout.shared_name(layer, kind) if e is None else layout.expert_name(layer, e, kind)
            )
            scale = (
                expert.residual_scale if kind == DOWN and expert.residual_scale is not None else 1.0
            )
            src = ck.arch.layer_name(layer, kind)
            copy(out, expert.source_model, src, scale=scale, noise=expert.noise_scale)

    def gate(name: str, rows: slice, label: str, layer: int) -> None:
        """Router rows ``rows`` (of ``router.gated``) as tensor ``name`` of ``layer``."""
        tasks.append(
            TensorTask(
                f"model.layers.{layer}.{name}",
                (rows.stop - rows.start, hidden),
                router_dtype,
                (),
                compute=lambda _t, layer=layer, rows=rows: router.layer(layer)[rows],
                label=f"{label} ({recipe.gate_mode})",
            )
        )

    copy(dense.embed, base_key, dense.embed)
    for layer, names in base.layer_index.items():
        kinds = {}
        for name in names:
            kind = dense.parse(name).kind
            if kind not in DENSE_MLP:
                kinds[kind] = name
                copy(f"model.layers.{layer}.{kind}", base_key, name)
        if layout is QWEN2:  # its attention has q/k/v biases: zeros where the base has none
            for proj in ("q_proj", "k_proj", "v_proj"):
                if f"self_attn.{proj}.bias" not in kinds:
                    rows = base[kinds[f"self_attn.{proj}.weight"]].shape[0]
                    tasks.append(
                        TensorTask(
                            f"model.layers.{layer}.self_attn.{proj}.bias",
                            (rows,),
                            router_dtype,
                            (),
                            compute=_Zeros((rows,)),
                            label="zeros (Qwen2-MoE has q/k/v biases, the base model none)",
                        )
                    )
        for e, expert in enumerate(experts):
            mlp(expert, layer, e)
        for expert in shared:
            mlp(expert, layer, None)
        gate(layout.router, slice(0, n), "router", layer)
        if layout.shared_gate:
            gate(layout.shared_gate, slice(n, n + 1), "shared expert gate", layer)
    copy(dense.final_norm, base_key, dense.final_norm)
    if not base.tied:
        copy(dense.lm_head, base_key, dense.lm_head)
    config = config_for(
        layout,
        base.config,
        num_experts=n,
        per_token=recipe.experts_per_token,
        num_shared=len(shared),
        num_layers=base.num_layers,
    )
    if out_dtype:
        config = config_with_dtype(config, out_dtype)
    removed: dict[str, dict[str, str]] = {}
    for key, ck in ckpts.items():  # what the output does not take, by design
        for name in ck.tensors:
            is_mlp = ck.arch.parse(name).kind in DENSE_MLP
            if key == base_key and is_mlp:
                removed.setdefault(key, {})[name] = "the base's MLP is replaced by the experts"
            elif key != base_key and not is_mlp:
                removed.setdefault(key, {})[name] = "an expert model gives only its MLP"
    return MergePlan(
        recipe=recipe,
        models=dict(ckpts),
        tasks=tasks,
        config=config,
        tokenizer_from=base_key,
        removed=removed,
        warnings=warns,
        seed=seed,
    )


class _Zeros:
    """A tensor of zeros (no sources)."""

    def __init__(self, shape: tuple[int, ...]) -> None:
        self.shape = shape

    def __call__(self, _tensors: list[Any]) -> Any:
        import torch

        return torch.zeros(self.shape)


class _Noise:
    """``x + noise * N(0, 1)`` with a per-tensor seed."""

    def __init__(self, scale: float, seed: int) -> None:
        self.scale, self.seed = scale, seed

    def __call__(self, tensors: list[Any]) -> Any:
        import torch

        x = tensors[0]
        g = torch.Generator(device=x.device).manual_seed(self.seed)
        return x + self.scale * torch.randn(x.shape, generator=g, device=x.device, dtype=x.dtype)
