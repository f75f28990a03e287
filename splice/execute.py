"""Write a model described tensor by tensor: the one executor behind merges and surgery.

A plan is a list of :class:`TensorTask`, one per output tensor: which source tensors to read
(model key + name), an optional ``compute`` function over them, and a ``scale``. The executor
owns everything else: opening and reading sources, dtype and device, threads, the memory
budget, and writing. It streams: a task reads its inputs, computes, writes and drops them,
with a few tasks in flight at once (``splice.parallel.bounded_map``). A task that only copies
a tensor unchanged is a kernel file-to-file copy.

``execute`` writes a checkpoint folder atomically; ``execute_into`` writes the same tensors into
the parameters of a live ``nn.Module`` (evolve merges hundreds of candidates this way, with no
disk I/O).
"""

from __future__ import annotations

import os
import zlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from splice.checkpoint import Checkpoint, TensorInfo
from splice.dtypes import nbytes
from splice.errors import SpliceError
from splice.parallel import bounded_map
from splice.progress import progress
from splice.writer import CheckpointWriter, TensorSpec

if TYPE_CHECKING:
    import torch

    from splice.arch import ArchSpec
    from splice.target import Claim

Compute = Callable[[list["torch.Tensor"]], "torch.Tensor"]


@dataclass(frozen=True)
class Source:
    """Tensor ``name`` of the model registered under ``model`` (a key into the models map)."""

    model: str
    name: str


@dataclass(frozen=True)
class TensorTask:
    """How to make one output tensor ``[*shape]`` of ``dtype``.

    ``compute`` receives the ``sources`` loaded in ``load_dtype`` (``None``: as stored) on the
    execution device and returns the result; without ``compute`` the first source is taken as is.
    The result is multiplied by ``scale`` (data-flow scale folding, passthrough ``scale``).
    """

    name: str
    shape: tuple[int, ...]
    dtype: str
    sources: tuple[Source, ...]
    compute: Compute | None = field(default=None, compare=False)
    scale: float = 1.0
    load_dtype: str | None = None
    label: str = ""  # what the task does, for dry runs and errors
    #: further tensors the same computation makes, ``(name, shape, dtype)`` each (a quantized
    #: weight's scales): ``compute`` then returns the main tensor and these, in order
    extra: tuple[tuple[str, tuple[int, ...], str], ...] = ()

    def outputs(self) -> list[tuple[str, tuple[int, ...], str]]:
        """Every tensor the task writes: ``(name, shape, dtype)``, the main one first."""
        return [(self.name, self.shape, self.dtype), *self.extra]

    @classmethod
    def copy(
        cls,
        out: str,
        model: str,
        name: str,
        info: TensorInfo,
        *,
        dtype: str | None = None,
        scale: float = 1.0,
        compute: Compute | None = None,
        shape: tuple[int, ...] | None = None,
        load_dtype: str | None = None,
        note: str = "",
    ) -> TensorTask:
        """Output tensor ``out`` made from tensor ``name`` of ``model`` (``info``: its metadata).

        The one way to build a copy: renamed, optionally re-typed (``dtype``), multiplied by
        ``scale`` and transformed by ``compute`` (a vocabulary re-index, noise) with its output
        ``shape``. Arithmetic runs in ``load_dtype``, float32 by default when there is any; a
        copy with none is a kernel file-to-file copy.
        """
        if load_dtype is None and (compute is not None or scale != 1.0):
            load_dtype = "float32"
        return cls(
            name=out,
            shape=tuple(shape or info.shape),
            dtype=dtype or info.dtype,
            sources=(Source(model, name),),
            compute=compute,
            scale=scale,
            load_dtype=load_dtype,
            label=f"{model}:{name}" + (f" x{scale:.6g}" if scale != 1.0 else "") + note,
        )

    def is_plain_copy(self, models: Mapping[str, Checkpoint]) -> bool:
        """True if the output is one source's bytes, unchanged."""
        if self.compute is not None or self.scale != 1.0 or len(self.sources) != 1:
            return False
        info = models[self.sources[0].model].stored_info(self.sources[0].name)
        return info.dtype == self.dtype and info.shape == self.shape and info.readable

    def cost(self, models: Mapping[str, Checkpoint]) -> int:
        """Bytes a running task holds, roughly: inputs in compute dtype, plus temporaries."""
        if self.compute is None and self.scale == 1.0:
            return 0 if self.is_plain_copy(models) else 2 * nbytes(self.shape, "float32")
        per = nbytes(self.shape, self.load_dtype or "float32")
        return (len(self.sources) + 3) * per


def copy_tasks(ckpt: Checkpoint, key: str, dtype: str | None = None) -> list[TensorTask]:
    """A task copying every tensor ``ckpt`` lists (registered as model ``key``) under its own
    name, floating ones cast to ``dtype`` where given (integers keep theirs)."""
    return [
        TensorTask.copy(
            name,
            key,
            name,
            info,
            dtype=dtype if dtype and info.dtype.startswith(("float", "bfloat")) else None,
        )
        for name, info in ckpt.tensors.items()
    ]


@dataclass
class ExecOptions:
    """How to run a plan: device for the arithmetic, threads, memory, output shards."""

    device: str = "cpu"
    threads: int | None = None  # torch intra-op threads (None: leave torch's default)
    workers: int = 2  # tensors in flight
    memory_budget: int = 1 * 2**30  # bytes held by tensors in flight
    max_shard_size: str | int = "2GB"
    overwrite: bool = False
    show_progress: bool = True
    verify: bool = True  # check the output loads in transformers (--no-verify: unknown types)
    #: the output's quantization: fp8 | mxfp4 | keep | none (unquantized); None: the inputs'
    #: where they all share one (splice.quant.quantized_plan)
    quantize: str | None = None
    block_size: tuple[int, int] | None = None  # fp8's block, default the input's or 128x128

    def __post_init__(self) -> None:
        """Checked here, not only in the CLI, so a notebook gets the same one-line errors."""
        if self.device != "cpu":  # resolving imports torch; a plain-copy run needs none
            from splice.devices import resolve_device

            self.device = resolve_device(self.device)
        for name in ("threads", "workers"):
            value = getattr(self, name)
            if value is not None and (
                isinstance(value, bool) or not isinstance(value, int) or value < 1
            ):
                raise SpliceError(f"{name} must be a whole number of 1 or more, got {value!r}")
        if self.memory_budget <= 0:
            raise SpliceError(f"memory_budget must be positive, got {self.memory_budget!r}")


def tensor_seed(seed: int, name: str) -> int:
    """Seed for one tensor's generator: stable across runs, threads and orders."""
    return (seed * 1_000_003 + zlib.crc32(name.encode())) % (2**63)


def _run_task(
    task: TensorTask, models: Mapping[str, Checkpoint], device: str
) -> list[torch.Tensor]:
    """The task's tensors (:meth:`TensorTask.outputs` order), shapes checked."""
    tensors = [
        models[s.model].load(s.name, dtype=task.load_dtype, device=device) for s in task.sources
    ]
    result = task.compute(tensors) if task.compute is not None else tensors[0]
    del tensors
    results = list(result) if task.extra else [result]
    if task.scale != 1.0:
        results[0] = results[0] * task.scale
    for t, (name, shape, _) in zip(results, task.outputs(), strict=True):
        if tuple(t.shape) != shape:
            raise RuntimeError(f"{name}: computed shape {list(t.shape)}, planned {shape}")
    return results


def _set_threads(threads: int | None) -> None:
    if threads:
        import torch

        torch.set_num_threads(threads)


def execute(
    tasks: Sequence[TensorTask],
    models: Mapping[str, Checkpoint],
    out: str | os.PathLike[str] | Claim,
    *,
    config: dict[str, Any],
    tokenizer_from: Checkpoint | None = None,
    card: str | None = None,
    extra_files: Mapping[str, str | Callable[[], str]] | None = None,
    options: ExecOptions | None = None,
) -> Path:
    """Run ``tasks`` and write the result to ``out`` (atomic; see ``CheckpointWriter``).

    The folders of ``models`` are the run's inputs: ``out`` may be none of them nor an ancestor.
    ``out`` may be the verb's :class:`~splice.target.Claim` (see :class:`CheckpointWriter`).
    """
    opts = options or ExecOptions()
    _set_threads(opts.threads)
    specs = [TensorSpec(*out) for t in tasks for out in t.outputs()]

    def run_one(task: TensorTask) -> None:
        if task.is_plain_copy(models):
            src = task.sources[0]
            writer.copy(task.name, models[src.model], src.name)
        else:
            results = _run_task(task, models, opts.device)
            for (name, _, _), t in zip(task.outputs(), results, strict=True):
                writer.write(name, t)

    with CheckpointWriter(
        out,
        specs,
        max_shard_size=opts.max_shard_size,
        overwrite=opts.overwrite,
        inputs=[f for m in models.values() for f in m.folders],
    ) as writer:
        done = bounded_map(
            run_one,
            writer.interleaved(tasks),
            cost=lambda t: t.cost(models),
            workers=opts.workers,
            budget=opts.memory_budget,
        )
        for _ in progress(done, "tensors", enabled=opts.show_progress, total=len(tasks)):
            pass
        writer.write_config(config)
        if tokenizer_from is not None:
            from splice.multimodal import is_multimodal

            writer.copy_tokenizer(tokenizer_from, processor=is_multimodal(config))
        for fname, text in (extra_files or {}).items():  # a callable: made once tensors are
            writer.write_text(fname, text() if callable(text) else text)
        if card is not None:
            writer.write_card(card)
    return Path(out)


def execute_into(
    tasks: Sequence[TensorTask],
    models: Mapping[str, Checkpoint],
    module: torch.nn.Module,
    *,
    options: ExecOptions | None = None,
    spec: ArchSpec | None = None,
) -> None:
    """Run ``tasks`` and copy each result into ``module``'s parameter or buffer of that name.

    The module keeps its own dtype and device; its state-dict names must be the checkpoint's,
    or, given the output's ``spec``, where the module packs experts into one parameter
    (transformers 5's MoE modules), each expert's tensor goes into its block of that parameter
    (:meth:`splice.arch.ArchSpec.module_location`). A tied head (no ``lm_head`` task) stays tied.
    """
    import torch

    opts = options or ExecOptions(show_progress=False)
    _set_threads(opts.threads)
    if spec is not None and spec.experts is not None and spec.experts.stored:
        from splice.stored import pack_tasks

        tasks = pack_tasks(tasks, spec, models)  # the module holds them packed, as stored
    state = module.state_dict(keep_vars=True)
    targets = _targets(tasks, state, spec, module)
    check_module(tasks, targets)

    def run_one(task: TensorTask) -> None:
        (result,) = _run_task(task, models, opts.device)
        with torch.no_grad():
            targets[task.name].copy_(result)

    for _ in bounded_map(
        run_one,
        tasks,
        cost=lambda t: t.cost(models),
        workers=opts.workers,
        budget=opts.memory_budget,
    ):
        pass


def _targets(
    tasks: Sequence[TensorTask],
    state: Mapping[str, torch.Tensor],
    spec: ArchSpec | None,
    module: torch.nn.Module,
) -> dict[str, torch.Tensor]:
    """Each task's tensor in the module: its parameter (under the name transformers' loader
    gives the checkpoint key), or its view into a packed one."""
    out: dict[str, torch.Tensor] = {}
    for task, (name, expert, part, parts) in target_names(tasks, state, spec, module).items():
        param = state[name]
        if expert is None:
            out[task] = param
            continue
        rows = param.shape[1] // parts
        out[task] = param[expert, part * rows : (part + 1) * rows]
    return out


def target_names(
    tasks: Sequence[TensorTask],
    state: Mapping[str, torch.Tensor],
    spec: ArchSpec | None,
    module: torch.nn.Module,
) -> dict[str, tuple[str, int | None, int, int]]:
    """Where each task's tensor is in ``module`` (whose state dict is ``state``): ``(state
    name, expert, part, parts)`` (:meth:`splice.arch.ArchSpec.module_location`; expert None:
    the whole tensor); tasks with no place in the module are left out."""
    out: dict[str, tuple[str, int | None, int, int]] = {}
    unknown = [t.name for t in tasks if t.name not in state]
    renamed: dict[str, str] = {}
    if unknown and hasattr(module, "base_model_prefix"):  # a transformers model
        from splice.loadcheck import module_names

        renamed = module_names(module, unknown, state)  # type: ignore[arg-type]
    for t in tasks:
        if t.name in state:
            out[t.name] = (t.name, None, 0, 1)
        elif renamed.get(t.name) in state:
            out[t.name] = (renamed[t.name], None, 0, 1)
        elif spec is not None:
            name, expert, part, parts = spec.module_location(t.name)
            if name in state:
                out[t.name] = (name, expert, part, parts)
    return out


def check_module(tasks: Sequence[TensorTask], state: Mapping[str, torch.Tensor]) -> None:
    """``SpliceError`` unless every task has a parameter of its shape and kind in ``state``.

    Checked for all tasks before any is run, so a wrong module is refused before it is touched.
    """
    missing = [t.name for t in tasks if t.name not in state]
    if missing:
        raise SpliceError(
            f"{len(missing)} merged tensors have no parameter in the module, e.g. {missing[0]!r} "
            "(is it the output's architecture and layer count?)"
        )
    for t in tasks:
        param = state[t.name]
        if tuple(param.shape) != t.shape:
            raise SpliceError(
                f"{t.name}: the module's parameter is {list(param.shape)}, the merge makes "
                f"{list(t.shape)} (is the module built from the output's config?)"
            )
        if param.dtype.is_floating_point != t.dtype.startswith(("float", "bfloat")):
            raise SpliceError(
                f"{t.name}: the module holds {param.dtype}, the merge makes {t.dtype}"
            )
