"""From a recipe to a list of tensor tasks, checked against the models before any data is read.

``plan_merge(recipe, options)`` opens every referenced model lazily (headers only), normalizes the
recipe to output slices (a ``models`` recipe is one slice over all layers, with the base model
added if it is not listed, as mergekit does), and builds one ``TensorTask`` per output tensor:

* embeddings use the first slice's sources, the final norm and head the last slice's (``t = 0``);
* layer ``i`` of a slice of ``n`` layers resolves gradients at ``t = i / (n - 1)``;
* ``passthrough`` copies its single source (times an optional ``scale``);
* other methods get the non-base sources in recipe order and the base separately.

A ``modules:`` recipe (mergekit's modular form, for multimodal models) plans its
``text_decoder`` entry as the recipe above on the language models (the base's language model
copied where it has none), and every other module's tensors, by the stored names of the model
the output's other modules come from (:func:`splice.multimodal.carry_modules`), with the same
task builder: each tensor from the same tensor of the module's models (the base added), layer
``i`` of ``n`` (``layers.i`` / ``blocks.i``) at ``t = i / (n - 1)``, others at ``t = 0``; its
``parameters`` rank between the recipe's and the slice's. A module the recipe leaves out is
carried from that model.

Every problem found (unknown method, missing base, layer range out of bounds, architecture or
shape mismatch, missing or unusable parameter) is collected and raised as one ``SpliceError``
with a line per cause: a cause met in many tensors (a hidden-size mismatch, a parameter a model
lacks) is one line that counts them and names the first.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from splice.arch import ArchSpec
from splice.checkpoint import Checkpoint
from splice.dtypes import config_with_dtype, dtype_name
from splice.errors import SpliceError
from splice.execute import Source, TensorTask, tensor_seed
from splice.layerplan import LayerPlan, LayerRef
from splice.merge.methods import METHODS, REQUIRED, MergeMethod
from splice.merge.params import MISSING, coerce, resolve
from splice.merge.recipe import Module, Params, Recipe, Slice, SliceSource
from splice.merge.vocab import ReindexVocab, RowOverride, VocabPlan, plan_vocab
from splice.multimodal import TEXT_MODULE, LanguageModel
from splice.output import ModelPlan
from splice.problems import Problems, open_models, shape_mismatch
from splice.st_format import TensorInfo
from splice.text import plural


@dataclass(kw_only=True)
class MergePlan(ModelPlan):
    """A :class:`ModelPlan` made from a recipe (``files``: a re-indexed tokenizer's, then the
    chat template's; ``chat_template``: the template text the output gets)."""

    recipe: Recipe
    warnings: list[str] = field(default_factory=list)
    chat_template: str | None = None
    #: the seed of stochastic methods' per-tensor generators (``tensor_seed(seed, name)``)
    seed: int = 0

    def describe(self) -> str:
        """A readable table of the plan (``splice merge --dry-run``)."""
        lines = super().describe().splitlines()
        if self.chat_template:
            lines.insert(1, f"chat template: {self.chat_template[:70]!r}...")
        return "\n".join(lines)


@dataclass(frozen=True)
class _SliceSrc:
    model: str
    start: int
    end: int
    params: Params | None


@dataclass(frozen=True)
class _Slice:
    sources: tuple[_SliceSrc, ...]
    base: str | None
    params: Params | None
    module: Params | None = None  # a ``modules:`` entry's parameters


def _parameter_scopes(recipe: Recipe) -> list[tuple[str, Params]]:
    """Every ``parameters`` mapping of the recipe, with where it is (for messages)."""
    scopes: list[tuple[str, Params | None]] = [("parameters", recipe.parameters)]
    names = list(recipe.modules) if recipe.modules is not None else [None]
    for name, part in zip(names, recipe.parts(), strict=True):
        at = f"modules.{name} " if name else ""
        if name:
            scopes.append((f"{at}parameters", part.parameters))
        for m in part.models or []:
            scopes.append((f"{at}parameters of model {m.model}", m.parameters))
        for i, sl in enumerate(part.slices or []):
            scopes.append((f"{at}slice {i} parameters", sl.parameters))
            for src in sl.sources:
                scopes.append((f"{at}slice {i} parameters of {src.model}", src.parameters))
    return [(where, params) for where, params in scopes if params]


def _check_parameter_names(
    recipe: Recipe, method: MergeMethod | None, problems: Problems
) -> list[str]:
    """A parameter no merge method knows is an error (a typo such as ``desnity`` would
    otherwise silently merge with the default); one that another method takes (``density``
    in a ``linear`` recipe copied from a TIES one) is ignored, as mergekit does, with a
    warning. Returns the warnings."""
    accepted = sorted({*method.global_params, *method.per_model}) if method is not None else []
    known = set().union(*({*m.global_params, *m.per_model} for m in map(METHODS.get, METHODS)))
    takes = ", ".join(accepted) if accepted else "no parameters"
    warnings = []
    for where, params in _parameter_scopes(recipe):
        for key in params:
            if key in accepted:
                continue
            line = (
                f"{where}: {key!r} is not a parameter of {recipe.merge_method} (it takes {takes})"
            )
            if key in known:
                warnings.append(f"{line}; ignored")
            else:
                problems.add(line)
    return warnings


def _check_architectures(
    models: Mapping[str, Checkpoint], donor: str, allow_crimes: bool, problems: Problems
) -> None:
    arch = models[donor].config.get("architectures")
    mtype = models[donor].config.get("model_type")
    for ref, ckpt in models.items():
        other = (ckpt.config.get("model_type"), ckpt.config.get("architectures"))
        if other != (mtype, arch) and not allow_crimes:
            problems.add(
                f"architecture mismatch: {ref} is {other[0]} {other[1]}, {donor} is {mtype} "
                f"{arch} (pass --allow-crimes to merge them anyway)"
            )


def _slices(
    part: Recipe | Module, base: str | None, models: Mapping[str, Checkpoint]
) -> list[_Slice]:
    """The output slices of a recipe or of one of its ``modules`` (``base``: the recipe's)."""
    module = part.parameters if isinstance(part, Module) else None
    if part.models:
        sources = [
            _SliceSrc(m.model, 0, models[m.model].num_layers, m.parameters) for m in part.models
        ]
        if base and base not in [m.model for m in part.models]:
            sources.append(_SliceSrc(base, 0, models[base].num_layers, None))
        return [_Slice(tuple(sources), base, None, module)]
    return [
        _Slice(
            tuple(_SliceSrc(s.model, *s.layer_range, s.parameters) for s in sl.sources),
            sl.base_model or base,
            sl.parameters,
            module,
        )
        for sl in part.slices or []
    ]


COMPUTE_DTYPES = ("bfloat16", "float16", "float32", "float64")


def check_dtypes(recipe: Recipe, problems: Problems) -> None:
    """``dtype`` (the arithmetic's) must be a float type torch computes in; ``out_dtype`` any
    floating-point type."""
    if recipe.dtype and dtype_name(recipe.dtype) not in COMPUTE_DTYPES:
        problems.add(
            f"dtype {recipe.dtype}: merges compute in floating point; use "
            f"{', '.join(COMPUTE_DTYPES)}"
        )
    out = recipe.out_dtype
    if out and not dtype_name(out).startswith(("float", "bfloat")):
        problems.add(f"out_dtype {out}: the output's weights must be a floating-point dtype")


@dataclass
class _Context:
    recipe: Recipe
    method: MergeMethod | None  # None: passthrough
    models: Mapping[str, Checkpoint]
    compute_dtype: str
    out_dtype: str | None
    seed: int
    problems: Problems


def _params(
    ctx: _Context,
    slc: _Slice,
    inputs: list[tuple[_SliceSrc, str]],
    out_name: str,
    t: float,
) -> dict[str, Any]:
    """Resolved keyword arguments for the method on one tensor (globals and per-model lists),
    after the method's checks of their values (problems go to ``ctx.problems``)."""
    method = ctx.method
    assert method is not None
    kwargs: dict[str, Any] = {}
    complete = True
    for key, default in method.global_params.items():
        value = resolve(key, (slc.params, slc.module, ctx.recipe.parameters), out_name, t)
        if value is MISSING:
            if default is REQUIRED:
                ctx.problems.add(f"{method.name}: parameter {key!r} is required", out_name)
                complete = False
                continue
            value = default
        kwargs[method.python_name(key)] = coerce(value, default, f"{key} for {out_name}")
    for key, default in method.per_model.items():
        values = []
        for src, in_name in inputs:
            scopes = (src.params, slc.params, slc.module, ctx.recipe.parameters)
            value = resolve(key, scopes, in_name, t)
            if value is MISSING:
                if default is None:
                    ctx.problems.add(
                        f"{method.name}: parameter {key!r} is required for model {src.model}",
                        in_name,
                    )
                    value, complete = 0.0, False
                else:
                    value = default
            values.append(coerce(value, 1.0, f"{key} for {src.model}"))
        kwargs[key] = values
    if complete:
        for index, problem in method.problems(kwargs):
            of = f"model {inputs[index][0].model}: " if index is not None else ""
            ctx.problems.add(f"{method.name}: {of}{problem}", out_name)
    return kwargs


def _merge_task(
    ctx: _Context,
    slc: _Slice,
    out_name: str,
    inputs: list[tuple[_SliceSrc, str]],
    t: float,
    vocab: VocabPlan | None = None,
) -> TensorTask | None:
    """The task for one output tensor from the slice's sources (``inputs``: source, name).

    ``vocab``: the tensor is indexed by token (embeddings, head) and is re-indexed to the
    output vocabulary first (:mod:`splice.merge.vocab`); only its other dimensions must agree.
    """
    problems, models = ctx.problems, ctx.models
    shapes: list[tuple[str, tuple[int, ...]]] = []
    for src, name in inputs:
        info = _info(models[src.model], name)
        if info is None:
            problems.add(
                f"{src.model} lacks tensors the merge needs",
                name if name == out_name else f"{name} (for {out_name})",
            )
            return None
        shapes.append((src.model, info.shape if vocab is None else info.shape[1:]))
    ref = next((p for p in shapes if p[0] == slc.base), shapes[0])  # the base, if it is one
    odd = next(((m, sh) for m, sh in shapes if sh != ref[1]), None)
    if odd is not None:
        (a, sa), (b, sb) = ref, odd
        problems.add(
            shape_mismatch(models, a, b),
            f"{out_name} {list(sa)} vs {list(sb)}",
            first=True,
        )
        return None
    shape = shapes[0][1]
    if vocab is not None:
        shape = (vocab.size, *shape)
    first = _info(models[inputs[0][0].model], inputs[0][1])
    assert first is not None
    out_dtype = ctx.out_dtype or first.dtype
    if ctx.method is None:  # passthrough
        if len(inputs) != 1:
            problems.add(f"passthrough takes one source per slice, got {len(inputs)}")
            return None
        src, name = inputs[0]
        scopes = (src.params, slc.params, slc.module, ctx.recipe.parameters)
        scale = resolve("scale", scopes, name, t)
        scale = 1.0 if scale is MISSING else coerce(scale, 1.0, f"scale for {src.model}")
        computed = scale != 1.0 or out_dtype != first.dtype or vocab is not None
        reindex = None
        if vocab is not None:
            fixed = _overrides(vocab, [src.model], out_name, problems)
            reindex = ReindexVocab((vocab.rows[src.model],), None, overrides=fixed)
        return TensorTask.copy(
            out_name,
            src.model,
            name,
            first,
            dtype=out_dtype,
            scale=scale,
            compute=reindex,
            shape=shape,
            load_dtype=ctx.compute_dtype if computed else None,
            note=" (re-indexed vocabulary)" if vocab is not None else "",
        )
    method = ctx.method
    base_pair = None
    others = inputs
    if method.base != "none" and slc.base is not None:
        base_pairs = [p for p in inputs if p[0].model == slc.base]
        if not base_pairs:
            problems.add(f"{method.name}: base model {slc.base} is not among the slice's sources")
            return None
        base_pair = base_pairs[0]
        others = [p for p in inputs if p[0].model != slc.base]
    elif method.base == "required":
        problems.add(f"{method.name} needs a base_model")
        return None
    if not others:
        problems.add(f"{method.name}: no models to merge besides the base")
        return None
    count = method.count_problem(len(others), base_pair is not None)
    if count:
        problems.add(count)
        return None
    kwargs = _params(ctx, slc, others, out_name, t)
    seed = tensor_seed(ctx.seed, out_name) if method.stochastic else None
    srcs = tuple(Source(s.model, n) for s, n in others)
    if base_pair is not None:
        srcs = (Source(base_pair[0].model, base_pair[1]), *srcs)
    compute: Any = _MethodCall(method, kwargs, base_pair is not None, seed)
    if vocab is not None:
        rows = tuple(vocab.rows[s.model] for s in srcs)
        fixed = _overrides(vocab, [s.model for s in srcs], out_name, problems)
        compute = ReindexVocab(rows, 0 if base_pair is not None else None, compute, fixed)
    return TensorTask(
        name=out_name,
        shape=shape,
        dtype=out_dtype,
        sources=srcs,
        compute=compute,
        load_dtype=ctx.compute_dtype,
        label=f"{method.name}({', '.join(s.model for s, _ in others)}"
        + (f"; base {base_pair[0].model})" if base_pair else ")")
        + (" (re-indexed vocabulary)" if vocab is not None else ""),
    )


def _info(ckpt: Checkpoint, name: str) -> TensorInfo | None:
    """A tensor of the language model, or (by stored name) of another module of a multimodal
    model."""
    info = ckpt.tensors.get(name)
    if info is None and isinstance(ckpt, LanguageModel):
        info = ckpt.module_tensors.get(name)
    return info


def _overrides(
    vocab: VocabPlan, sources: list[str], out_name: str, problems: Problems
) -> tuple[RowOverride, ...]:
    """``vocab.fixed`` for one task, naming source models by their index in ``sources``."""
    out = []
    for i, f in vocab.fixed.items():
        if f.model is not None and f.model not in sources:
            problems.add(
                f"tokenizer.tokens[{f.token!r}]: its source {f.model} is not among the models "
                "merged into {tensors}",
                out_name,
            )
            continue
        source = None if f.model is None else sources.index(f.model)
        out.append(RowOverride(i, source, f.row, f.force))
    return tuple(out)


@dataclass(frozen=True)
class _MethodCall:
    """``compute`` for a merge task: calls the method with its resolved parameters."""

    method: MergeMethod
    kwargs: dict[str, Any]
    has_base: bool
    seed: int | None = None  # stochastic methods: a generator seeded per tensor

    def __call__(self, tensors: list[Any]) -> Any:
        import torch

        kwargs = dict(self.kwargs)
        if self.seed is not None:
            kwargs["generator"] = torch.Generator(device=tensors[0].device).manual_seed(self.seed)
        base = tensors[0] if self.has_base else None
        others = tensors[1:] if self.has_base else tensors
        return self.method(others, base, **kwargs)


def _name_in(ckpt: Checkpoint, spec: ArchSpec, role: str) -> str:
    """The model's tensor for a global role; a tied head reads the embedding."""
    if role == "head" and ckpt.tied:
        return ckpt.arch.embed
    return {
        "embed": ckpt.arch.embed,
        "final_norm": ckpt.arch.final_norm,
        "head": ckpt.arch.lm_head,
    }[role]


def plan_merge(
    recipe: Recipe,
    *,
    models: Mapping[str, Checkpoint] | None = None,
    allow_pickle: bool = False,
    allow_crimes: bool = False,
    seed: int | None = None,
    device: str = "cpu",
    trust_remote_code: bool = False,
) -> MergePlan:
    """Validate ``recipe`` against its models and build the tasks (no tensor data is read;
    a ``moe`` recipe with a ``hidden`` router runs its base model on ``device``, and its
    routers' tokenizer may run its own code with ``trust_remote_code``)."""
    if recipe.merge_method == "moe":
        from splice.merge.moe import plan_moe

        return plan_moe(
            recipe,
            models=models,
            allow_pickle=allow_pickle,
            seed=seed,
            device=device,
            trust_remote_code=trust_remote_code,
        )
    problems = Problems()  # an unknown method and missing models are reported together
    method = None
    try:
        method = METHODS.get(recipe.merge_method)
    except SpliceError as e:
        problems.add(str(e))
    try:
        ckpts = open_models(recipe.referenced_models(), allow_pickle=allow_pickle, models=models)
    except SpliceError as e:
        for line in str(e).splitlines():
            problems.add(line)
    problems.raise_if_any()
    ignored = _check_parameter_names(recipe, method, problems)
    if method is not None and method.planner == "layers":
        method = None  # passthrough / layer_path: copies, planned from the slices or the path
    donor = recipe.base_model or recipe.referenced_models()[0]
    _check_architectures(ckpts, donor, allow_crimes, problems)
    compute_dtype = dtype_name(recipe.dtype) if recipe.dtype else "float32"
    out_dtype = (
        dtype_name(recipe.out_dtype or recipe.dtype) if (recipe.out_dtype or recipe.dtype) else None
    )
    check_dtypes(recipe, problems)
    problems.raise_if_any()
    tok = recipe.tokenizer  # mergekit's tokenizer section, or the older tokenizer_source
    source, pad_to, tokens = (
        (tok.source, tok.pad_to_multiple_of, tok.tokens)
        if tok
        else (recipe.tokenizer_source, None, None)
    )
    vocab, tokenizer_from = plan_vocab(source, donor, ckpts, pad_to, tokens)
    for ckpt in ckpts.values() if vocab is not None else ():
        ckpt.arch.refuse("vocab")

    if recipe.layer_path:
        p = _plan_layer_path(recipe, ckpts, donor, out_dtype, tokenizer_from)
        p = _reindexed(p, vocab, ckpts[donor].arch, problems) if vocab is not None else p
        p.warnings.extend(ignored)
        return _with_experts(p, ckpts[donor].arch)

    text: Recipe | Module = recipe
    text_method, modules = method, {}
    if recipe.modules is not None:
        entry, modules = _modules(recipe, ckpts, tokenizer_from, problems)
        problems.raise_if_any()
        if entry is None:  # the donor's language model, copied
            n = ckpts[donor].num_layers
            entry = Module(slices=[Slice(sources=[SliceSource(model=donor, layer_range=(0, n))])])
            text_method = None
        text = entry
    slices = _slices(text, recipe.base_model, ckpts)
    ctx = _Context(
        recipe,
        text_method,
        ckpts,
        compute_dtype,
        out_dtype,
        seed if seed is not None else (recipe.seed or 0),
        problems,
    )
    every = [*slices, *modules.values()] if method is not None else []
    if method is not None and method.base == "required" and not all(s.base for s in every):
        problems.add(f"{method.name} needs a base_model")
        problems.raise_if_any()
    for i, slc in enumerate(slices):
        lengths = set()
        for src in slc.sources:
            n = ckpts[src.model].num_layers
            if src.end > n:
                problems.add(
                    f"slice {i}: layer_range [{src.start}, {src.end}] is out of bounds for "
                    f"{src.model}, which has {plural(n, 'layer')}"
                )
            lengths.add(src.end - src.start)
        if len(lengths) > 1:
            problems.add(f"slice {i}: sources span different numbers of layers {sorted(lengths)}")
    problems.raise_if_any()

    tasks: list[TensorTask] = []

    def global_tasks(groups: tuple[str, ...], slc: _Slice) -> None:
        """The donor's tensors outside the layers of ``groups``, each merged from the slice's
        sources: a role's main weight by role (a tied head reads the embedding), anything else
        (biases, unclassified tensors) by its own name."""
        for out_name in donor_ckpt.global_names(*groups):
            role = spec.main_role(out_name)
            inputs = [
                (s, _name_in(ckpts[s.model], spec, role) if role else out_name) for s in slc.sources
            ]
            by_token = vocab if role in ("embed", "head") else None
            task = _merge_task(ctx, slc, out_name, inputs, 0.0, by_token)
            if task is not None:
                tasks.append(task)

    donor_ckpt = ckpts[donor]
    spec = donor_ckpt.arch
    global_tasks(("embed", "other"), slices[0])
    out_layer = 0
    layer_sources: list[LayerRef] = []
    for slc in slices:
        n = slc.sources[0].end - slc.sources[0].start
        for idx in range(n):
            t = idx / (n - 1) if n > 1 else 1.0
            first = slc.sources[0]
            first_ckpt = ckpts[first.model]
            layer_sources.append(LayerRef(first.model, first.start + idx))
            for name in first_ckpt.layer_index.get(first.start + idx, []):
                inputs = [
                    (s, ckpts[s.model].arch.rename(name, layer=s.start + idx)) for s in slc.sources
                ]
                out_name = spec.rename(name, layer=out_layer)
                task = _merge_task(ctx, slc, out_name, inputs, t)
                if task is not None:
                    tasks.append(task)
            out_layer += 1
    global_tasks(("final_norm", "head"), slices[-1])
    problems.raise_if_any()
    check_fit(tasks, ckpts, donor, vocab is not None, problems)
    problems.raise_if_any()
    if modules:
        tasks += _module_tasks(replace(ctx, method=method), modules, tokenizer_from)
        problems.raise_if_any()

    config = LayerPlan(tuple(layer_sources), donor, donor).config(ckpts, donor)
    config["tie_word_embeddings"] = donor_ckpt.tied
    if vocab is not None:
        config["vocab_size"] = vocab.size
    if out_dtype:
        config = config_with_dtype(config, out_dtype)
    files = dict(vocab.files) if vocab is not None else {}
    p = MergePlan(
        recipe=recipe,
        models=dict(ckpts),
        tasks=tasks,
        config=config,
        tokenizer_from=tokenizer_from,
        files=files,
        warnings=ignored,
        seed=ctx.seed,
    )
    return _with_experts(p, spec)


def _with_experts(p: MergePlan, spec: ArchSpec) -> MergePlan:
    """The plan with only the recipe's ``keep_experts`` (:mod:`splice.expert_subset`)."""
    keep = p.recipe.keep_experts
    if keep is None:
        return p
    from splice import expert_subset as xs
    from splice.mtp import removed_mtp

    count = int(p.config[spec.num_layers_key])
    moe = xs.moe_layers_of((t.name for t in p.tasks), spec)
    subset = xs.check_subset(keep, spec, p.config, moe, count)
    config, note = xs.subset_config(p.config, spec, subset)
    warnings = [*p.warnings, *([f"keep_experts: {note}"] if note else [])]
    tasks, dropped = xs.subset_tasks(p.tasks, spec, subset)
    why = "multi-token prediction: its experts not subset (keep_experts)"
    mtp = {key: removed_mtp(ckpt, why) for key, ckpt in p.models.items() if ckpt.mtp}
    if mtp:  # their experts would no longer match the config's count
        warnings.append("keep_experts: the multi-token-prediction layers are left out")
    removed = {key: dict(names) for key, names in p.removed.items()}
    for part in (dropped, mtp):
        for key, names in part.items():
            removed.setdefault(key, {}).update(names)
    return replace(p, tasks=tasks, config=config, warnings=warnings, removed=removed)


#: mergekit's name for the one module of a text model
DEFAULT_MODULE = "default"
#: a layer of a vision tower (``encoder.layers.3.``, ``visual.blocks.3.``) or of Qwen3-VL's
#: projector (``deepstack_merger_list.1.``): gradients spread over them as over text layers
_MODULE_LAYER = re.compile(r"(?:^|\.)(?:layers|blocks|deepstack_merger_list)\.(\d+)\.")


def _modules(
    recipe: Recipe, ckpts: Mapping[str, Checkpoint], holder: str, problems: Problems
) -> tuple[Module | None, dict[str, _Slice]]:
    """A ``modules:`` recipe checked against the models: its language-model entry
    (``text_decoder``; a text model's ``default``, as mergekit names it), and each other
    module's slice. ``holder``: the model whose modules the output carries
    (:func:`splice.multimodal.carry_modules`), whose module names are the known ones."""
    assert recipe.modules is not None
    ckpt = ckpts[holder]
    multimodal = isinstance(ckpt, LanguageModel)
    text_key = TEXT_MODULE if multimodal else DEFAULT_MODULE
    known = {text_key, *ckpt.layout.modules.values()} if multimodal else {text_key}
    model_type = (ckpt.mm_config if multimodal else ckpt.config).get("model_type")
    out: dict[str, _Slice] = {}
    for name, entry in recipe.modules.items():
        if name not in known:
            problems.add(
                f"modules: {name!r} is not a module of {model_type} models (known: "
                f"{', '.join(sorted(known))})"
                if multimodal
                else f"modules: {name!r}: {holder} is not a multimodal model (model_type "
                f"{model_type}); a text model's one module is 'default', as mergekit names it "
                "(or give top-level `models` / `slices`)"
            )
            continue
        if name == text_key:
            continue
        assert isinstance(ckpt, LanguageModel)
        slices = _slices(entry, recipe.base_model, ckpts)
        count = len(_module_layers(ckpt.modules.get(name, {})))
        cut = entry.slices and any((s.start, s.end) != (0, count) for s in slices[0].sources)
        if len(slices) > 1 or cut:
            problems.add(
                f"modules.{name}: slices that cut, repeat or reorder its layers are not "
                f"supported; give `models`, or one slice whose every source takes layer_range "
                f"[0, {count}] (the {name} of {holder} has {plural(count, 'layer')})"
            )
            continue
        for src in slices[0].sources:
            if not isinstance(ckpts[src.model], LanguageModel):
                problems.add(
                    f"modules.{name}: {src.model} is not a multimodal model (model_type "
                    f"{ckpts[src.model].config.get('model_type')}), so it has no {name}"
                )
        out[name] = slices[0]
    return recipe.modules.get(text_key), out


def _module_layers(names: Mapping[str, object]) -> set[int]:
    """The layer numbers among a module's tensor names."""
    return {int(m.group(1)) for n in names if (m := _MODULE_LAYER.search(n))}


def _module_tasks(ctx: _Context, modules: dict[str, _Slice], holder: str) -> list[TensorTask]:
    """The tasks of every module but the language model's: each tensor of the module as
    ``holder`` stores it, merged from the same tensor of the slice's sources (see the module
    docstring for ``t``)."""
    ckpt = ctx.models[holder]
    assert isinstance(ckpt, LanguageModel)
    tasks = []
    for name, slc in modules.items():
        stored = ckpt.modules.get(name, {})
        count = len(_module_layers(stored))
        for out_name, info in stored.items():
            m = _MODULE_LAYER.search(out_name)
            t = 0.0 if m is None else int(m.group(1)) / (count - 1) if count > 1 else 1.0
            inputs = [(s, _stored_as(ctx.models[s.model], out_name, ckpt)) for s in slc.sources]
            task = _merge_task(ctx, slc, out_name, inputs, t)
            if task is not None and task.shape != info.shape:  # sources of another size
                other = next(s.model for s in task.sources if s.model != holder)
                ctx.problems.add(
                    shape_mismatch(ctx.models, holder, other, donor=True),
                    f"{out_name} {list(info.shape)} vs {list(task.shape)}",
                    first=True,
                )
            elif task is not None:
                tasks.append(task)
    return tasks


def _stored_as(ckpt: Checkpoint, name: str, holder: LanguageModel) -> str:
    """``name``, a module tensor of ``holder``, as ``ckpt`` stores it: transformers saves a
    module under one of several prefixes (``vision_tower.``, ``model.vision_tower.``)."""
    if not isinstance(ckpt, LanguageModel) or _info(ckpt, name) is not None:
        return name
    prefix = next(p for p in holder.layout.modules if name.startswith(p))
    module, rest = holder.layout.modules[prefix], name[len(prefix) :]
    mine = ckpt.modules.get(module, {})
    found = (p + rest for p, m in ckpt.layout.modules.items() if m == module and p + rest in mine)
    return next(found, name)


def check_fit(
    tasks: list[TensorTask],
    models: Mapping[str, Checkpoint],
    donor: str,
    reindexed: bool,
    problems: Problems,
) -> None:
    """Every output tensor must have the shape the output config (the donor's) implies: the
    donor's tensor of that name (a layer past the donor's: of its layer 0). Slices or a
    data-flow path from models of other sizes fail here rather than in the loader."""
    d = models[donor]
    spec = d.arch
    for t in tasks:
        layer = spec.layer_of(t.name)
        ref = t.name if layer is None or layer < d.num_layers else spec.rename(t.name, layer=0)
        info = d.tensors.get(ref)
        if info is None or not t.sources:
            continue
        want, got = info.shape, t.shape
        if reindexed and spec.parse(t.name).group in ("embed", "head"):
            want, got = want[1:], got[1:]
        if want != got:
            other = next((s.model for s in t.sources if s.model != donor), t.sources[0].model)
            problems.add(
                shape_mismatch(models, donor, other, donor=True),
                f"{t.name} {list(want)} vs {list(got)}",
                first=True,
            )


def _reindexed(p: MergePlan, vocab: VocabPlan, spec: ArchSpec, problems: Problems) -> MergePlan:
    """A data-flow plan whose embedding and head (one source each) are re-indexed to ``vocab``."""
    tasks = []
    for t in p.tasks:
        if t.name in (spec.embed, spec.lm_head):
            model = t.sources[0].model
            t = replace(
                t,
                shape=(vocab.size, *t.shape[1:]),
                compute=ReindexVocab(
                    (vocab.rows[model],),
                    None,
                    overrides=_overrides(vocab, [model], t.name, problems),
                ),
                load_dtype=t.load_dtype or "float32",
                label=f"{t.label} (re-indexed vocabulary)",
            )
        tasks.append(t)
    problems.raise_if_any()
    config = {**p.config, "vocab_size": vocab.size}
    return replace(p, tasks=tasks, config=config, files=dict(vocab.files))


def _plan_layer_path(
    recipe: Recipe,
    ckpts: Mapping[str, Checkpoint],
    donor: str,
    out_dtype: str | None,
    tokenizer_from: str | None,
) -> MergePlan:
    refs = []
    for step in recipe.layer_path or []:
        for k, layer in enumerate(step.layers):
            refs.append(LayerRef(step.model, layer, step.scale if k == 0 else 1.0))
    plan = LayerPlan(tuple(refs), donor, donor)
    config = plan.config(ckpts, donor)  # first: a family no layer map fits says why
    tasks = plan.tasks(ckpts, dtype=out_dtype)
    problems = Problems()
    check_fit(tasks, ckpts, donor, False, problems)
    problems.raise_if_any()
    if out_dtype:
        config = config_with_dtype(config, out_dtype)
    return MergePlan(
        recipe=recipe, models=dict(ckpts), tasks=tasks, config=config, tokenizer_from=tokenizer_from
    )
