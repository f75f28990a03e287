"""Healing: a short causal-LM fine-tune on text after surgery, written as a standard checkpoint.

What Gromov et al. (QLoRA) and SOLAR (continued pre-training) do after pruning / up-scaling:
AdamW on random windows of ``seq_len`` tokens of the text (every token a target), linear warm-up
then cosine decay to a tenth of ``lr``, gradients clipped at 1. Trained are all parameters, the
decoder layers ``train_layers``, or with ``only_new_layers`` the blocks up-scaling added (read
from the input's ``splice_surgery.json``, as LLaMA-Pro trains only its new blocks). ``lora=R``
trains rank-``R`` adapters (peft; the optional extra ``splice[lora]``) on every linear of those
layers instead and merges them back, so the output is again a plain checkpoint.

The output is written by :func:`splice.output.write_model`: tensors that did not change are
copied file to file from the input; the trained ones come from the live module. On an MoE model
(transformers' packed experts) full fine-tuning trains the experts too, while LoRA adapts the
linear modules only (attention, and the router where it is a linear).
"""

from __future__ import annotations

import math
import os
import time
import warnings
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

from splice.checkpoint import Checkpoint, open_checkpoint
from splice.errors import SpliceError
from splice.execute import ExecOptions, TensorTask
from splice.limits import MAX_SEED, check_number
from splice.output import ModelPlan
from splice.schedule import lr_at
from splice.surgery.depth import SurgeryResult, run_surgery, surgery_plan
from splice.surgery.layermaps import format_ranges
from splice.surgery.report import RECORD, Recorded, read_record
from splice.text import plural

if TYPE_CHECKING:
    import torch


@dataclass
class HealReport(Recorded):
    """What a heal did: steps, learning rate, what was trained, and the loss of every step."""

    operation: str
    source: str
    num_layers: int
    steps: int
    lr: float
    batch_size: int
    seq_len: int
    text: str
    text_tokens: int
    trained_layers: list[int] | None  # None: every parameter
    lora: int | None = None
    lora_alpha: float | None = None
    trainable_params: int = 0
    changed_tensors: int = 0
    losses: list[float] = field(default_factory=list)
    seconds: float = 0.0
    new_layers: list[int] = field(default_factory=list)  # carried over from the input's record
    previous: dict[str, Any] | None = None  # the input's splice_surgery.json, if any
    scores: dict[str, dict[str, float]] = field(default_factory=dict)

    kind: ClassVar[str] = "heal"

    @property
    def title(self) -> str:
        return f"{self.operation}: {plural(self.steps, 'step')}"

    @property
    def layers(self) -> list[int]:
        """The layer map (healing keeps every layer where it is)."""
        return list(range(self.num_layers))

    def loss_span(self) -> tuple[float, float]:
        """Mean loss of the first and of the last tenth of the steps (at least one step)."""
        k = max(1, len(self.losses) // 10)
        if not self.losses:
            return math.nan, math.nan
        return sum(self.losses[:k]) / k, sum(self.losses[-k:]) / k

    def _what(self) -> str:
        if self.trained_layers is None:
            layers = "every layer" if self.lora else "every parameter"
        else:
            layers = f"layers {format_ranges(self.trained_layers)}"
        if self.lora:
            return (
                f"rank-{self.lora} LoRA (alpha {self.lora_alpha:g}) on the linears of {layers}, "
                "merged back"
            )
        return layers

    def summary(self) -> str:
        first, last = self.loss_span()
        lines = [
            self.title,
            f"  trained: {self._what()} ({self.trainable_params:,} parameters; "
            f"{self.changed_tensors} tensors changed)",
            f"  text: {self.text} ({self.text_tokens:,} tokens), windows of {self.seq_len}, "
            f"batch {self.batch_size}, lr {self.lr:g}",
            f"  loss: {first:.4f} (first steps) -> {last:.4f} (last steps), {self.seconds:.1f} s",
            *self.score_lines(),
        ]
        return "\n".join(lines)

    def card_details(self) -> str:
        first, last = self.loss_span()
        return "\n".join(
            [
                f"Healed `{self.source}` with a causal-LM fine-tune: {plural(self.steps, 'step')} of "
                f"{self.batch_size} windows of {self.seq_len} tokens of `{self.text}`, AdamW, lr "
                f"{self.lr:g} (warm-up, cosine decay).",
                "",
                f"Trained: {self._what()}. Loss {first:.4f} -> {last:.4f}.",
                "",
                self.record_line(),
            ]
        )


#: the largest learning rate (and weight decay): AdamW scales the weights by ``1 - lr * wd``
#: each step, which must stay in [0, 1]; a fine-tune's rates are far below it
MAX_LR = 1.0
#: the most optimizer steps and windows per step a heal takes (a short fine-tune; past these a
#: run would not end, or the batch of token ids alone would not fit in memory)
MAX_STEPS = 1_000_000
MAX_BATCH = 65_536


def check_options(
    *,
    steps: int,
    lr: float,
    batch_size: int,
    seq_len: int,
    warmup: int | None,
    weight_decay: float,
    seed: int,
    lora: int | None,
    lora_alpha: float | None,
    max_tokens: int | None,
    train_dtype: str,
    dtype: str | None,
) -> str:
    """Every numeric and dtype option of :func:`heal`, checked before anything is opened: one
    :class:`SpliceError` line naming the option and its limit. Returns the training dtype."""
    from splice.dtypes import output_dtype
    from splice.layer_metrics import float_dtype
    from splice.scoring import check_window

    check_number("--steps", steps, least=1, most=MAX_STEPS, whole=True)
    check_number("--lr", lr, positive=True, most=MAX_LR)
    check_number("--batch-size", batch_size, least=1, most=MAX_BATCH, whole=True)
    check_window(seq_len, seq_len)
    if warmup is not None:
        check_number("--warmup", warmup, least=0, most=steps, whole=True, why=f"--steps {steps}")
    check_number("--weight-decay", weight_decay, least=0, most=MAX_LR)
    check_number("--seed", seed, least=0, most=MAX_SEED, whole=True)
    if lora is not None:
        check_number("--lora", lora, least=1, whole=True)
        if lora_alpha is not None:
            check_number("--lora-alpha", lora_alpha, positive=True)
    elif lora_alpha is not None:
        raise SpliceError("--lora-alpha needs --lora R")
    if max_tokens is not None:
        why = f"one window of --seq-len {seq_len}"
        check_number("--max-tokens", max_tokens, least=seq_len, whole=True, why=why)
    output_dtype(dtype)
    return float_dtype(train_dtype, "--train-dtype")


def lora_limit(ckpt: Checkpoint, layers: list[int] | None) -> tuple[int, str, str] | None:
    """The smallest dimension of the attention and MLP matrices LoRA adapts in ``layers``
    (None: every layer), read from the headers, with the name and shape (``"32x96"``) of a
    tensor that has it; None if there is none."""
    spec = ckpt.arch
    wanted = None if layers is None else set(layers)
    dims = [
        (min(info.shape), name, "x".join(map(str, info.shape)))
        for name, info in ckpt.tensors.items()
        if len(info.shape) == 2
        and name.endswith(".weight")
        and (t := spec.parse(name)).group in ("attention", "mlp")
        and t.layer is not None
        and (wanted is None or t.layer in wanted)
    ]
    return min(dims) if dims else None


def check_lora_rank(ckpt: Checkpoint, layers: list[int] | None, lora: int) -> None:
    """One error line if rank ``lora`` exceeds :func:`lora_limit` (a rank-R adapter of a
    matrix with a smaller side R' has rank R' at most: the rest is wasted)."""
    limit = lora_limit(ckpt, layers)
    if limit is not None and lora > limit[0]:
        raise SpliceError(
            f"--lora {lora}: the rank must be at most {limit[0]}, the smallest dimension of the "
            f"matrices it adapts ({limit[1]} is {limit[2]})"
        )


def trained_layers(
    ckpt: Checkpoint, only_new_layers: bool, train_layers: Any
) -> tuple[list[int] | None, dict[str, Any] | None]:
    """The decoder layers to train (None: all parameters) and the input's record."""
    from splice.surgery.layermaps import parse_indices

    record = read_record(ckpt.path)
    if only_new_layers and train_layers is not None:
        raise SpliceError("give --only-new-layers or --train-layers, not both")
    if only_new_layers:
        new = (record or {}).get("new_layers")
        if not new:
            why = (
                f"its {RECORD} lists no added layers"
                if record is not None
                else f"it has no {RECORD} (it was not made by splice upscale)"
            )
            raise SpliceError(f"--only-new-layers: {ckpt.path}: {why}")
        return parse_indices(new, ckpt.num_layers, "--only-new-layers"), record
    if train_layers is not None:
        return parse_indices(train_layers, ckpt.num_layers, "--train-layers"), record
    return None, record


def heal(
    model: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    text: str | os.PathLike[str],
    steps: int,
    lr: float = 1e-4,
    batch_size: int = 8,
    seq_len: int = 128,
    warmup: int | None = None,
    weight_decay: float = 0.0,
    seed: int = 0,
    only_new_layers: bool = False,
    train_layers: str | list[int] | None = None,
    lora: int | None = None,
    lora_alpha: float | None = None,
    max_tokens: int | None = 2_000_000,
    device: str = "cpu",
    train_dtype: str = "float32",
    dtype: str | None = None,
    options: ExecOptions | None = None,
    allow_pickle: bool = False,
    trust_remote_code: bool = False,
    show_progress: bool = False,
) -> SurgeryResult:
    """Fine-tune ``model`` on ``text`` (a file, ``lm-eval:TASK`` or ``zoo``) for ``steps`` steps
    and write it to ``out``; returns the plan and its :class:`HealReport` (see the module
    docstring). ``dtype``: the output's (default: each tensor's own)."""
    from splice.devices import resolve_device
    from splice.modeling import check_runnable, load_causal_lm, load_tokenizer
    from splice.scoring import check_window, read_text, text_ids

    opts = options or ExecOptions()
    train_dtype = check_options(
        steps=steps,
        lr=lr,
        batch_size=batch_size,
        seq_len=seq_len,
        warmup=warmup,
        weight_decay=weight_decay,
        seed=seed,
        lora=lora,
        lora_alpha=lora_alpha,
        max_tokens=max_tokens,
        train_dtype=train_dtype,
        dtype=dtype,
    )
    device = resolve_device(device)
    if lora is not None:
        try:
            import peft  # noqa: F401
        except ImportError:
            raise SpliceError("--lora needs peft (pip install 'splice[lora]')") from None
    ckpt = open_checkpoint(model, allow_pickle=allow_pickle)

    def plan(_: Any) -> SurgeryResult:
        """Everything after the options, with ``out`` claimed: read, train, plan."""
        check_runnable(ckpt, trust_remote_code=trust_remote_code)
        layers, record = trained_layers(ckpt, only_new_layers, train_layers)
        if lora is not None:
            check_lora_rank(ckpt, layers, lora)
        raw = read_text(text, option="--calibration")
        tok = load_tokenizer(ckpt.path, trust_remote_code=trust_remote_code)
        ids = text_ids(tok, raw, max_tokens=max_tokens)
        check_window(seq_len, seq_len, int(ids.numel()), what=f"--calibration {text}")
        max_pos = ckpt.config.get("max_position_embeddings")
        if max_pos and seq_len > max_pos:
            raise SpliceError(f"--seq-len {seq_len} exceeds the model's {max_pos} positions")
        lm = load_causal_lm(
            ckpt,
            dtype=train_dtype,
            device=device,
            trust_remote_code=trust_remote_code,
            allow_pickle=allow_pickle,
            why="a model with NaN or inf weights cannot be trained",
        )
        if int(ids.max()) >= lm.get_input_embeddings().num_embeddings:
            raise SpliceError(
                f"{ckpt.path}: its tokenizer gives token id {int(ids.max())} but the model has "
                f"{lm.get_input_embeddings().num_embeddings} embeddings"
            )
        report = HealReport(
            operation="heal"
            + (f" --lora {lora}" if lora else "")
            + (" --only-new-layers" if only_new_layers else ""),
            source=str(ckpt.path),
            num_layers=ckpt.num_layers,
            steps=steps,
            lr=float(lr),
            batch_size=batch_size,
            seq_len=seq_len,
            text=str(text),
            text_tokens=int(ids.numel()),
            trained_layers=layers,
            lora=lora,
            lora_alpha=float(lora_alpha if lora_alpha is not None else 2 * lora) if lora else None,
            new_layers=list((record or {}).get("new_layers") or []),
            previous=record,
        )
        start = time.perf_counter()
        if opts.threads:
            import torch

            torch.set_num_threads(opts.threads)
        lm, changed = _train(lm, ckpt, ids, report, warmup, weight_decay, seed, show_progress)
        report.seconds = time.perf_counter() - start
        return SurgeryResult(heal_plan(ckpt, lm, changed, report, dtype=dtype), report)

    return run_surgery(plan, ckpt.path, out, options=opts)


def _layer_prefixes(ckpt: Checkpoint, layers: list[int]) -> list[str]:
    return [ckpt.arch.layer_prefix.replace("{i}", str(i)) for i in layers]


def _train(
    lm: Any,
    ckpt: Checkpoint,
    ids: torch.Tensor,
    report: HealReport,
    warmup: int | None,
    weight_decay: float,
    seed: int,
    show_progress: bool,
) -> tuple[Any, set[str]]:
    """Train in place; returns the (merged) model and the module parameter names that changed."""
    import torch

    from splice.progress import progress

    torch.manual_seed(seed)
    prefixes = _layer_prefixes(ckpt, report.trained_layers) if report.trained_layers else None

    def in_scope(name: str) -> bool:
        return prefixes is None or any(name.startswith(p) for p in prefixes)

    if report.lora:
        from peft import LoraConfig, get_peft_model

        targets = [
            name
            for name, mod in lm.named_modules()
            if isinstance(mod, torch.nn.Linear)
            and name != "lm_head"
            and ckpt.arch.layer_of(name + ".weight") is not None
            and in_scope(name + ".")
        ]
        if not targets:
            raise SpliceError("--lora: the layers to train have no linear modules")
        config = LoraConfig(
            r=report.lora,
            lora_alpha=report.lora_alpha,
            lora_dropout=0.0,
            target_modules=targets,
            bias="none",
        )
        with warnings.catch_warnings():  # peft asks transformers about a deprecated name
            warnings.filterwarnings("ignore", message=".*gradient_checkpointing.*")
            net = get_peft_model(lm, config)
        params = [p for p in net.parameters() if p.requires_grad]
        changed = {t + ".weight" for t in targets}
    else:
        net = lm
        params, changed = [], set()
        for name, p in lm.named_parameters():
            p.requires_grad_(in_scope(name))
            if p.requires_grad:
                params.append(p)
                changed.add(name)
        if not params:
            raise SpliceError("heal: nothing to train in the chosen layers")
    report.trainable_params = sum(p.numel() for p in params)
    opt = torch.optim.AdamW(params, lr=report.lr, betas=(0.9, 0.95), weight_decay=weight_decay)
    steps = report.steps
    warm = warmup if warmup is not None else max(1, steps // 10)
    gen = torch.Generator().manual_seed(seed)
    device = next(lm.parameters()).device
    n, width = int(ids.numel()), report.seq_len
    offsets = torch.arange(width)
    net.train()
    for step in progress(range(steps), "heal", enabled=show_progress):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, steps, report.lr, warm)
        starts = torch.randint(0, n - width + 1, (report.batch_size,), generator=gen)
        batch = ids[starts[:, None] + offsets].to(device)
        loss = net(input_ids=batch, labels=batch, use_cache=False).loss
        if not torch.isfinite(loss):
            raise SpliceError(f"heal: the loss became {float(loss)} at step {step}; lower --lr")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        report.losses.append(float(loss.detach()))
    net.eval()
    if report.lora:
        lm = net.merge_and_unload()
    for p in lm.parameters():
        p.requires_grad_(False)
    return lm, changed


def _module_tensor(ckpt: Checkpoint, state: dict[str, Any], name: str) -> tuple[str, Any] | None:
    """``(module parameter name, the checkpoint tensor's view of it)`` for checkpoint tensor
    ``name`` (packed experts and their aliases as the arch spec maps them); None if absent."""
    if name in state:
        return name, state[name]
    spec = ckpt.arch
    ex = spec.experts
    t = spec.parse(name)
    if ex is None or t.layer is None:
        return None
    for src, dst in ex.aliases.items():
        if t.kind == dst and spec.layer_name(t.layer, src) in state:
            key = spec.layer_name(t.layer, src)
            return key, state[key]
    if t.group == "experts":
        for packed, parts in ex.packed.items():
            key = spec.layer_name(t.layer, packed)
            if t.kind in parts and key in state:
                whole = state[key]
                rows = whole.shape[1] // len(parts)
                j = parts.index(t.kind)
                return key, whole[t.expert, j * rows : (j + 1) * rows]
    return None


def _const(tensor: Any) -> Any:
    def compute(_: list[Any]) -> Any:
        return tensor

    return compute


def heal_plan(
    ckpt: Checkpoint, lm: Any, changed: set[str], report: HealReport, *, dtype: str | None = None
) -> ModelPlan:
    """The healed model: changed tensors from ``lm``, the rest copied from ``ckpt``."""
    from splice.dtypes import config_with_dtype

    key = str(ckpt.path)
    state = lm.state_dict()
    tasks = []
    missing = []
    for name, info in ckpt.tensors.items():
        found = _module_tensor(ckpt, state, name)
        if found is None:
            missing.append(name)
            continue
        module_name, tensor = found
        if module_name in changed:
            tasks.append(
                TensorTask(
                    name=name,
                    shape=tuple(info.shape),
                    dtype=dtype or info.dtype,
                    sources=(),
                    compute=_const(tensor.detach()),
                    label="healed",
                )
            )
        else:
            tasks.append(TensorTask.copy(name, key, name, info, dtype=dtype))
    if missing:
        raise SpliceError(
            f"{ckpt.path}: {len(missing)} tensors have no parameter in the loaded model, e.g. "
            f"{missing[0]!r}"
        )
    report.changed_tensors = sum(1 for t in tasks if not t.sources)
    config = dict(ckpt.config)
    if dtype:
        config = config_with_dtype(config, dtype)
    # a healed tensor replaces its source, which is therefore not read (nor lost)
    healed = {t.name: "replaced by its healed value" for t in tasks if not t.sources}
    return surgery_plan(report, ckpt, tasks, config, ("heal",), healed)
