"""MoE from dense models (``merge_method: moe``, mergekit-moe's recipe): a Mixtral model whose
attention, norms and embeddings come from ``base_model`` and whose expert ``e`` in layer ``l`` is
the MLP of ``experts[e].source_model`` at layer ``l``.

Routers (``block_sparse_moe.gate.weight``, ``[num_experts, hidden]`` per layer) are set by
``gate_mode``:

* ``hidden`` (default): for each expert, the base model's hidden state entering layer ``l`` at
  the last real token of each positive prompt, averaged over prompts, minus the same for its
  negative prompts, normalized (mergekit reads position -1, which is a pad token for padded
  prompts; splice uses each prompt's last real token);
* ``hidden_avg``: the same with states averaged over each prompt's real tokens;
* ``cheap_embed``: the normalized sum of the prompts' token embeddings, the same for every layer;
* ``random``: standard normal; ``uniform_random``: U(-1/sqrt(hidden), 1/sqrt(hidden)).

Per expert, ``noise_scale`` adds seeded Gaussian noise to its weights and ``residual_scale``
multiplies its ``down_proj``.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator, Mapping
from typing import Any

from splice.arch import ArchSpec
from splice.checkpoint import Checkpoint
from splice.dtypes import config_with_dtype, dtype_name
from splice.execute import TensorTask, tensor_seed
from splice.merge.planner import MergePlan, check_dtypes
from splice.merge.recipe import Expert, Recipe
from splice.problems import Problems, open_models

GATE_MODES = ("hidden", "hidden_avg", "cheap_embed", "random", "uniform_random")
DENSE_TYPES = ("llama", "mistral")


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
        self._gates: Any = None
        self._lock = threading.Lock()

    def layer(self, index: int) -> Any:
        with self._lock:
            if self._gates is None:
                self._gates = self._compute()
        return self._gates[index]

    def _compute(self) -> Any:
        import torch

        cfg, experts = self.base.config, self.recipe.experts or []
        layers, hidden = self.base.num_layers, cfg["hidden_size"]
        mode = self.recipe.gate_mode
        g = torch.Generator().manual_seed(self.seed)
        if mode == "random":
            return torch.randn((layers, len(experts), hidden), generator=g)
        if mode == "uniform_random":
            bound = hidden**-0.5
            return (torch.rand((layers, len(experts), hidden), generator=g) * 2 - 1) * bound
        tok = self.tokenizer  # loaded by plan_moe, before anything is written
        if mode == "cheap_embed":
            embed = self.base.load(self.base.arch.embed, dtype="float32")
            state = lambda prompts: _cheap_embed(embed, tok, prompts, layers)  # noqa: E731
        else:
            from splice.modeling import load_causal_lm

            with _quiet_transformers():
                model = load_causal_lm(
                    self.base.path,
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

    if recipe.gate_mode not in ("hidden", "hidden_avg", "cheap_embed"):
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


def _check(recipe: Recipe, ckpts: Mapping[str, Checkpoint], problems: Problems) -> None:
    experts = recipe.experts or []
    base = ckpts[recipe.base_model]  # type: ignore[index]
    check_dtypes(recipe, problems)
    if recipe.architecture not in (None, "mixtral"):
        problems.add(f"moe: architecture {recipe.architecture!r} is not supported (only mixtral)")
    if recipe.gate_mode not in GATE_MODES:
        problems.add(
            f"moe: unknown gate_mode {recipe.gate_mode!r}; choose from {', '.join(GATE_MODES)}"
        )
    if not 1 <= recipe.experts_per_token <= len(experts):
        problems.add(
            f"moe: experts_per_token must be between 1 and the number of experts ({len(experts)})"
        )
    if base.config.get("model_type") not in DENSE_TYPES:
        problems.add(
            f"moe: base model {recipe.base_model} is {base.config.get('model_type')}; "
            f"experts from dense {' or '.join(DENSE_TYPES)} models only"
        )
    if base.config.get("attention_bias") or base.config.get("mlp_bias"):
        problems.add("moe: Mixtral has no attention or MLP biases; the base model has them")
    if recipe.gate_mode in ("hidden", "hidden_avg", "cheap_embed"):
        for i, e in enumerate(experts):
            if not e.positive_prompts:
                problems.add(f"moe: expert {i} ({e.source_model}) has no positive_prompts")
        keys = {(tuple(e.positive_prompts or []), tuple(e.negative_prompts or [])) for e in experts}
        if len(experts) > 1 and len(keys) == 1:
            problems.add(
                "moe: every expert has the same prompts, so the router cannot tell them apart"
            )
    for e in experts:
        ck = ckpts[e.source_model]
        diff = ", ".join(
            f"{key} {ck.config.get(key)} vs {base.config.get(key)}"
            for key in ("hidden_size", "intermediate_size", "num_hidden_layers")
            if ck.config.get(key) != base.config.get(key)
        )
        if diff:
            problems.add(f"moe: expert {e.source_model} does not fit the base model ({diff})")


def plan_moe(
    recipe: Recipe,
    *,
    models: Mapping[str, Checkpoint] | None = None,
    allow_pickle: bool = False,
    seed: int | None = None,
    device: str = "cpu",
    trust_remote_code: bool = False,
) -> MergePlan:
    """Plan a Mixtral model from dense experts (see the module docstring); the base model runs
    on ``device`` for the ``hidden`` / ``hidden_avg`` routers. The prompt routers' tokenizer
    (the base model's) is loaded here, so a tokenizer that cannot load (one that needs its own
    code without ``trust_remote_code``) is refused before anything is written."""
    ckpts = open_models(recipe.referenced_models(), allow_pickle=allow_pickle, models=models)
    problems = Problems()
    _check(recipe, ckpts, problems)
    problems.raise_if_any()
    base_key = recipe.base_model
    assert base_key is not None
    base = ckpts[base_key]
    tok = _router_tokenizer(recipe, base, trust_remote_code)
    dense = base.arch
    moe = ArchSpec.load("mixtral")
    assert moe.experts is not None
    to_expert = {  # dense MLP kind -> expert kind
        d: e for d in dense.required_layer_kinds() if (e := moe.expert_kind(d)) is not None
    }
    out_dtype = (
        dtype_name(recipe.out_dtype or recipe.dtype) if (recipe.out_dtype or recipe.dtype) else None
    )
    seed = seed if seed is not None else (recipe.seed or 0)
    router = _Router(recipe, base, seed, device, tok, trust_remote_code)
    experts: list[Expert] = recipe.experts or []
    tasks: list[TensorTask] = []

    def copy(
        out: str, model: str, name: str, scale: float = 1.0, noise: float | None = None
    ) -> None:
        compute = _Noise(noise, tensor_seed(seed, out)) if noise else None
        info = ckpts[model][name]
        tasks.append(
            TensorTask.copy(out, model, name, info, dtype=out_dtype, scale=scale, compute=compute)
        )

    copy(moe.embed, base_key, dense.embed)
    for layer, names in base.layer_index.items():
        for name in names:
            kind = dense.parse(name).kind
            if kind in to_expert:
                continue
            copy(moe.layer_name(layer, kind), base_key, name)
        for e, expert in enumerate(experts):
            ck = ckpts[expert.source_model]
            for kind, ekind in to_expert.items():
                scale = (expert.residual_scale or 1.0) if ekind == "w2.weight" else 1.0
                copy(
                    moe.layer_name(layer, ekind, expert=e),
                    expert.source_model,
                    ck.arch.layer_name(layer, kind),
                    scale=scale,
                    noise=expert.noise_scale,
                )
        tasks.append(
            TensorTask(
                moe.layer_name(layer, "block_sparse_moe.gate.weight"),
                (len(experts), base.config["hidden_size"]),
                out_dtype or base[dense.embed].dtype,
                (),
                compute=lambda _t, layer=layer: router.layer(layer),
                label=f"router ({recipe.gate_mode})",
            )
        )
    copy(moe.final_norm, base_key, dense.final_norm)
    if not base.tied:
        copy(moe.lm_head, base_key, dense.lm_head)
    config = dict(base.config, model_type=moe.model_type, architectures=list(moe.architectures))
    config = moe.config_with_experts(config, len(experts), recipe.experts_per_token)
    for key in ("mlp_bias", "attention_bias", "pretraining_tp"):
        config.pop(key, None)
    if out_dtype:
        config = config_with_dtype(config, out_dtype)
    removed: dict[str, dict[str, str]] = {}
    for key, ck in ckpts.items():  # what the output does not take, by design
        for name in ck.tensors:
            mlp = ck.arch.parse(name).kind in to_expert
            if key == base_key and mlp:
                removed.setdefault(key, {})[name] = "the base's MLP is replaced by the experts"
            elif key != base_key and not mlp:
                removed.setdefault(key, {})[name] = "an expert model gives only its MLP"
    return MergePlan(
        recipe=recipe,
        models=dict(ckpts),
        tasks=tasks,
        config=config,
        tokenizer_from=base_key,
        removed=removed,
    )


class _Noise:
    """``x + noise * N(0, 1)`` with a per-tensor seed."""

    def __init__(self, scale: float, seed: int) -> None:
        self.scale, self.seed = scale, seed

    def __call__(self, tensors: list[Any]) -> Any:
        import torch

        x = tensors[0]
        g = torch.Generator(device=x.device).manual_seed(self.seed)
        return x + self.scale * torch.randn(x.shape, generator=g, device=x.device, dtype=x.dtype)
