"""Quantized checkpoints read as logical tensors, and written quantized again.

Three formats, recognised from ``quantization_config`` and the tensor names:

* ``fp8`` (DeepSeek-V3/R1, Qwen3-FP8; transformers' FineGrainedFP8): ``X.weight``
  ``float8_e4m3fn`` ``[R, C]`` beside ``X.weight_scale_inv`` ``[⌈R/br⌉, ⌈C/bc⌉]``, one scale per
  ``weight_block_size`` block (float32, or power-of-two ``ue8m0`` exponents);
* ``compressed-tensors`` FP8 (llm-compressor's ``float-quantized``): ``X.weight`` ``float8_e4m3fn``
  beside ``X.weight_scale`` per tensor or per output channel;
* ``mxfp4`` (gpt-oss's experts): ``X_blocks`` ``uint8`` ``[..., R, C/32, 16]`` (two e2m1 values a
  byte) beside ``X_scales`` ``uint8`` ``[..., R, C/32]`` (e8m0 exponents); the logical tensor is
  the dequantized one with its last two axes swapped, as transformers hands it to the model.

:func:`logical_tensors` folds each weight and its scales into one :class:`~splice.st_format.
TensorInfo` of the logical name, shape and dtype (the config's), whose ``quant`` lists the
stored parts: the planner sees one tensor, ``Checkpoint.load`` dequantizes it
(:func:`dequantize`), and an output that keeps the format copies the parts byte for byte where
a tensor only moves (:func:`quantized_plan`) and quantizes computed ones with the format's own
rounding (:mod:`splice.quant_math`). Tensors the format leaves unquantized (norms, embeddings,
routers, ``modules_to_not_convert``) pass through as they are.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

from splice.errors import SpliceError
from splice.st_format import TensorInfo, show

if TYPE_CHECKING:
    import torch

#: quant_method values splice reads, and how each names its scales
METHODS = ("fp8", "compressed-tensors", "mxfp4")
#: what users pass as ``--dtype`` for the output's quantization (``none``: unquantized, in
#: the planned dtypes; a merge's float dtype is its recipe's)
TARGETS = ("fp8", "mxfp4", "keep", "none")
FP8 = "float8_e4m3fn"


@dataclass(frozen=True)
class Scheme:
    """A checkpoint's quantization: ``method`` (one of :data:`METHODS`); fp8: ``block``
    ``(rows, cols)`` and ``scale_fmt`` (``float`` | ``ue8m0``); compressed-tensors:
    ``strategy`` (``tensor`` | ``channel``); ``skip``: module patterns left unquantized;
    ``config`` the ``quantization_config`` as read."""

    method: str
    block: tuple[int, int] | None = None
    scale_fmt: str = "float"
    strategy: str | None = None
    skip: tuple[str, ...] = ()
    config: dict[str, Any] = field(default_factory=dict, compare=False)

    @property
    def label(self) -> str:
        """For people: ``fp8 e4m3, 128x128 blocks``."""
        if self.method == "fp8":
            blocks = f"{self.block[0]}x{self.block[1]} blocks" if self.block else "per tensor"
            return f"fp8 e4m3, {blocks}" + (", ue8m0 scales" if self.scale_fmt == "ue8m0" else "")
        if self.method == "compressed-tensors":
            return f"compressed-tensors fp8 e4m3, per {self.strategy or 'tensor'}"
        return "mxfp4 (e2m1, 32-value blocks, e8m0 scales)"


@dataclass(frozen=True)
class Quantized:
    """How a logical tensor is stored: ``scheme``, its ``parts`` (the quantized values first,
    then the scales), ``transposed`` (mxfp4: the logical tensor swaps the last two axes of the
    dequantized one)."""

    scheme: Scheme
    parts: tuple[TensorInfo, ...]
    transposed: bool = False

    @property
    def nbytes(self) -> int:
        return sum(p.nbytes for p in self.parts)


def part_key(name: str) -> str:
    """The name under which a checkpoint lists the stored part ``name`` of a quantized tensor
    for reading as stored (an fp8 weight's values are stored under its logical name)."""
    return name + "#stored"


def scheme_of(config: Mapping[str, Any], where: str = "config.json") -> Scheme | None:
    """The :class:`Scheme` of ``config``'s ``quantization_config``; None when it has none. A
    quantization splice cannot read (GPTQ, AWQ, bitsandbytes, ...) is one ``SpliceError``
    line."""
    qc = config.get("quantization_config")
    if qc is None:
        return None
    if not isinstance(qc, dict):
        raise SpliceError(f"{where}: quantization_config is {show(qc)}, not an object")
    method = qc.get("quant_method")
    if method not in METHODS:
        raise SpliceError(
            f"{where}: weights quantized with {show(method)}, which splice does not read "
            f"(it reads {', '.join(METHODS)}: FP8 block-scaled, compressed-tensors FP8, MXFP4)"
        )
    skip = tuple(str(m) for m in qc.get("modules_to_not_convert") or qc.get("ignore") or ())
    if method == "fp8":
        fmt = qc.get("fmt", "e4m3")
        if fmt != "e4m3":
            raise SpliceError(f"{where}: fp8 format {show(fmt)}: splice reads e4m3 only")
        block = qc.get("weight_block_size")
        if block is not None and not (
            isinstance(block, list) and len(block) == 2 and all(_positive(b) for b in block)
        ):
            raise SpliceError(f"{where}: weight_block_size {show(block)} is not [rows, cols]")
        scale_fmt = qc.get("scale_fmt") or "float"
        if scale_fmt not in ("float", "ue8m0"):
            raise SpliceError(f"{where}: scale_fmt {show(scale_fmt)}: splice reads ue8m0 only")
        return Scheme("fp8", tuple(block) if block else None, scale_fmt, skip=skip, config=qc)
    if method == "compressed-tensors":
        return Scheme(method, strategy=_ct_strategy(qc, where), skip=skip, config=qc)
    return Scheme("mxfp4", skip=skip, config=qc)


def _positive(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _ct_strategy(qc: dict[str, Any], where: str) -> str:
    """The weight strategy of a compressed-tensors FP8 config (one group, 8-bit floats)."""
    fmt = qc.get("format")
    if fmt not in ("float-quantized", "naive-quantized"):
        raise SpliceError(
            f"{where}: compressed-tensors format {show(fmt)}: splice reads float-quantized "
            "(FP8) only"
        )
    groups = qc.get("config_groups") or {}
    strategies = set()
    for group in groups.values() if isinstance(groups, dict) else ():
        weights = (group or {}).get("weights") or {}
        if weights.get("type") != "float" or weights.get("num_bits") != 8:
            raise SpliceError(
                f"{where}: compressed-tensors weights of {weights.get('num_bits')} bits, type "
                f"{show(weights.get('type'))}: splice reads 8-bit floats (FP8) only"
            )
        strategies.add(weights.get("strategy") or "tensor")
    if len(strategies) != 1 or not strategies <= {"tensor", "channel"}:
        raise SpliceError(
            f"{where}: compressed-tensors strategy {sorted(strategies) or 'none'}: splice reads "
            "one strategy, tensor or channel"
        )
    return strategies.pop()


def logical_dtype(config: Mapping[str, Any]) -> str:
    """The dtype a quantized checkpoint's weights dequantize to: its config's (transformers 5's
    ``dtype`` or 4's ``torch_dtype``), bfloat16 where it names none."""
    return str(config.get("dtype") or config.get("torch_dtype") or "bfloat16")


def _names_a_layer(module: Any) -> bool:
    """Whether a ``modules_to_not_convert`` entry names a layer by its index."""
    return re.search(r"\.\d+(\.|$)", str(module)) is not None


def logical_tensors(
    stored: dict[str, TensorInfo], config: Mapping[str, Any], where: str
) -> dict[str, TensorInfo]:
    """``stored`` with every quantized weight and its scales folded into one tensor of its
    logical name, shape and dtype (the config's ``dtype``, bfloat16 if it names none), its
    ``quant`` listing the parts; unquantized tensors as they are; storage order kept."""
    scheme = scheme_of(config, where)
    if scheme is None:
        return stored
    dtype = logical_dtype(config)
    folded, taken = {}, set()
    for name, info in stored.items():
        found = _fold(name, info, stored, scheme, dtype, where)
        if found is not None:
            folded[name], keys = found
            taken.update(keys)
    out: dict[str, TensorInfo] = {}
    for name, info in stored.items():  # storage order (scales may come before their weight)
        if name in folded:
            out[folded[name].name] = folded[name]
        elif name not in taken:
            out[name] = info
    return out


def _fold(
    name: str,
    info: TensorInfo,
    stored: Mapping[str, TensorInfo],
    scheme: Scheme,
    dtype: str,
    where: str,
) -> tuple[TensorInfo, tuple[str, ...]] | None:
    """The logical tensor whose first stored part is ``name``, with its parts' keys in
    ``stored``; None for a tensor that is not one (unquantized, or a scale)."""
    if scheme.method == "mxfp4":
        if not name.endswith("_blocks"):
            return None
        base = name.removesuffix("_blocks")
        scales = stored.get(base + "_scales")
        if scales is None or info.dtype != "uint8" or len(info.shape) < 3:
            raise SpliceError(f"{where}: {name} {list(info.shape)} has no {base}_scales beside it")
        *lead, rows, groups, width = info.shape
        if width != 16 or tuple(scales.shape) != (*lead, rows, groups):
            raise SpliceError(
                f"{where}: {name} {list(info.shape)} and its scales {list(scales.shape)} are not "
                "MXFP4 blocks [..., rows, groups, 16] and scales [..., rows, groups]"
            )
        shape = (*lead, groups * 32, rows)  # transposed, as transformers hands it over
        quant = Quantized(scheme, (info, scales), transposed=True)
        return _logical(base, shape, dtype, info, quant), (name, base + "_scales")
    suffix = "_scale_inv" if scheme.method == "fp8" else "_scale"
    scale = stored.get(name + suffix)
    if scale is None or info.dtype != FP8:
        if info.dtype == FP8 and scale is None:
            raise SpliceError(f"{where}: {name} is {FP8} but has no {name}{suffix} beside it")
        return None
    if len(info.shape) < 2:
        raise SpliceError(f"{where}: {name} {list(info.shape)} is quantized but not a matrix")
    parts: tuple[TensorInfo, ...] = (info, scale)
    keys = (name, name + suffix)
    extra = name.removesuffix("weight") + "input_scale"
    if scheme.method == "compressed-tensors" and extra in stored:
        parts += (stored[extra],)  # a static activation scale: carried with its weight
        keys += (extra,)
    return _logical(name, tuple(info.shape), dtype, info, Quantized(scheme, parts)), keys


def _logical(
    name: str, shape: tuple[int, ...], dtype: str, first: TensorInfo, quant: Quantized
) -> TensorInfo:
    from splice.dtypes import nbytes

    return replace(
        first, name=name, shape=shape, dtype=dtype, nbytes=nbytes(shape, dtype), quant=quant
    )


def dequantize(quant: Quantized, parts: list[torch.Tensor], dtype: str) -> torch.Tensor:
    """The logical tensor of ``quant`` from its loaded ``parts``, in ``dtype``."""
    from splice import quant_math
    from splice.dtypes import to_torch

    scheme, target = quant.scheme, to_torch(dtype)
    if scheme.method == "fp8":
        block = scheme.block or tuple(parts[0].shape[-2:])
        return quant_math.dequantize_fp8_block(parts[0], parts[1], block, target)
    if scheme.method == "compressed-tensors":
        return quant_math.dequantize_fp8_scaled(parts[0], parts[1], target)
    out = quant_math.dequantize_mxfp4(parts[0], parts[1], target)
    return out.transpose(-1, -2).contiguous() if quant.transposed else out


def expert_part(part: TensorInfo, expert: int) -> TensorInfo:
    """Expert ``expert``'s slice of a stored part ``[E, ...]`` (contiguous: experts first)."""
    stride = part.nbytes // part.shape[0]
    return replace(part, shape=part.shape[1:], offset=part.offset + expert * stride, nbytes=stride)


# ---- writing ----------------------------------------------------------------------------------
def new_scheme(method: str, block: tuple[int, int] | None = None) -> Scheme:
    """The scheme of ``--dtype fp8`` / ``--dtype mxfp4`` (fp8: ``block``, default 128x128,
    as DeepSeek-V3 and Qwen3-FP8 ship)."""
    if method == "fp8":
        block = block or (128, 128)
        config = {
            "quant_method": "fp8",
            "fmt": "e4m3",
            "activation_scheme": "dynamic",
            "weight_block_size": list(block),
        }
        return Scheme("fp8", block, config=config)
    if method == "mxfp4":
        return Scheme("mxfp4", config={"quant_method": "mxfp4"})
    raise SpliceError(f"--dtype {method}: quantized outputs are fp8 and mxfp4")


def output_scheme(target: str | None, schemes: list[Scheme | None], block: Any) -> Scheme | None:
    """The output's scheme: ``target`` ``keep`` (or None, the default) keeps the inputs' one
    where they all share it, else unquantized; ``none``: unquantized; ``fp8`` / ``mxfp4``: a
    new one (``block``: fp8's block size, else the inputs' where they have one)."""
    if target in (None, "keep"):
        kinds = set(schemes)
        if len(kinds) > 1:
            import warnings

            quantized = sorted({s.label for s in kinds if s is not None})
            warnings.warn(
                f"the inputs are stored in {len(kinds)} ways ({', '.join(quantized)}"
                f"{', unquantized' if None in kinds else ''}): the output is unquantized; "
                "--dtype fp8 or mxfp4 quantizes it",
                stacklevel=2,
            )
        return kinds.pop() if len(kinds) == 1 else None
    if target == "none":
        return None
    if target == "fp8" and block is None:
        blocks = {s.block for s in schemes if s is not None and s.method == "fp8" and s.block}
        block = blocks.pop() if len(blocks) == 1 else None
    return new_scheme(str(target), block)


def part_names(name: str, scheme: Scheme, with_input_scale: bool = False) -> list[str]:
    """The stored names of logical tensor ``name`` in ``scheme``: values first, then scales."""
    if scheme.method == "mxfp4":
        return [name + "_blocks", name + "_scales"]
    if scheme.method == "fp8":
        return [name, name + "_scale_inv"]
    names = [name, name + "_scale"]
    return [*names, name.removesuffix("weight") + "input_scale"] if with_input_scale else names


def quantizable(name: str, shape: tuple[int, ...], scheme: Scheme, spec: Any) -> bool:
    """Whether a new tensor ``name`` is written quantized in ``scheme``: a linear's weight in a
    layer (attention, MLP, experts; never a norm, router, embedding or head, nor a module
    ``skip`` names); mxfp4: experts only."""
    import fnmatch

    if len(shape) < 2 or spec is None or name.endswith("bias"):
        return False
    t = spec.parse(name)
    if t.layer is None or t.group not in ("attention", "mlp", "experts"):
        return False
    if scheme.method == "mxfp4" and t.group != "experts":
        return False
    if not (name.endswith("weight") or t.group == "experts"):
        return False
    module = name.rsplit(".", 1)[0]
    return not any(
        fnmatch.fnmatch(module, p) or module == p or module.startswith(p + ".") for p in scheme.skip
    )


def stored_outputs(name: str, shape: tuple[int, ...], scheme: Scheme) -> list[tuple]:
    """``(name, shape, dtype)`` of every stored part of logical tensor ``name`` ``[*shape]``
    written in ``scheme`` (:func:`part_names` order)."""
    names = part_names(name, scheme)
    *lead, rows, cols = shape
    if scheme.method == "mxfp4":  # stored [..., R, C/32, 16] for the logical [..., C, R]
        if rows % 32:
            raise SpliceError(f"{name} {list(shape)}: MXFP4 takes rows in groups of 32")
        return [
            (names[0], (*lead, cols, rows // 32, 16), "uint8"),
            (names[1], (*lead, cols, rows // 32), "uint8"),
        ]
    if scheme.method == "fp8":
        br, bc = scheme.block or (rows, cols)
        for size, b in ((rows, br), (cols, bc)):
            grid = -(-size // b)
            # a partial edge block is the format's (DeepSeek-V3's kv_a_proj: 576 rows in
            # 128-blocks); but where the grid also divides the size evenly, transformers'
            # dequantizing loader (it reads the block off the grid) would take it for another
            # block size without a word
            if size % b and grid > 1 and size % grid == 0:
                raise SpliceError(
                    f"{name} {list(shape)}: fp8 blocks of {br}x{bc} leave a partial block of "
                    f"{size % b} that transformers would read as {grid} blocks of {size // grid}"
                    " (it divides the weight by its scale grid); choose a --block-size that "
                    "divides every quantized weight, or one larger than it"
                )
        grid = (*lead, -(-rows // br), -(-cols // bc))
        scale = "float8_e8m0fnu" if scheme.scale_fmt == "ue8m0" else "float32"
        return [(names[0], tuple(shape), FP8), (names[1], grid, scale)]
    grid = (*lead, rows, 1) if scheme.strategy == "channel" else (1,)
    return [(names[0], tuple(shape), FP8), (names[1], grid, "float32")]


class QuantReport:
    """The relative error ``‖w - ŵ‖ / ‖w‖`` of every tensor a plan quantizes, summed by group
    (attention, mlp, experts, ...), written beside the output as ``splice_quantization.json``
    (thread-safe: tasks run in parallel)."""

    FILE = "splice_quantization.json"

    def __init__(self, scheme: Scheme) -> None:
        import threading

        self.scheme = scheme
        self._lock = threading.Lock()
        self.groups: dict[str, list[float]] = {}  # group -> [tensors, Σ‖w-ŵ‖², Σ‖w‖²]

    def add(self, group: str, err2: float, norm2: float) -> None:
        with self._lock:
            g = self.groups.setdefault(group, [0, 0.0, 0.0])
            g[0] += 1
            g[1] += err2
            g[2] += norm2

    def to_json(self) -> str:
        import json
        import math

        groups = {
            k: {"tensors": int(n), "relative_error": math.sqrt(e / w) if w else 0.0}
            for k, (n, e, w) in sorted(self.groups.items())
        }
        return json.dumps({"format": self.scheme.label, "groups": groups}, indent=2) + "\n"


@dataclass(frozen=True)
class _Quantize:
    """compute: the task's logical tensor (its own compute and scale, rounded to its dtype),
    then quantized in ``scheme``: ``(values, scales)``; its error goes to ``report``."""

    inner: Any  # the TensorTask it quantizes
    scheme: Scheme
    report: QuantReport
    group: str

    def __call__(self, tensors: list[torch.Tensor]) -> tuple[torch.Tensor, ...]:
        from splice import quant_math
        from splice.dtypes import to_torch

        t = self.inner
        x = t.compute(tensors) if t.compute is not None else tensors[0]
        if t.scale != 1.0:
            x = x * t.scale
        x = x.to(to_torch(t.dtype))
        s = self.scheme
        if s.method == "fp8":
            block = s.block or tuple(x.shape[-2:])
            out = quant_math.quantize_fp8_block(x, block, s.scale_fmt)
            back = quant_math.dequantize_fp8_block(*out, block, x.dtype)
        elif s.method == "compressed-tensors":
            out = quant_math.quantize_fp8_scaled(x, s.strategy or "tensor")
            back = quant_math.dequantize_fp8_scaled(*out, x.dtype)
        else:
            out = quant_math.quantize_mxfp4(x.transpose(-1, -2))
            back = quant_math.dequantize_mxfp4(*out, x.dtype).transpose(-1, -2)
        w = x.float()
        err2 = float((w - back.float()).pow_(2).sum())  # float32 sums: a report, not a test
        self.report.add(self.group, err2, float(w.pow_(2).sum()))
        return out


def quantized_plan(plan: Any, target: str | None = None, block: Any = None) -> Any:
    """``plan`` (a :class:`~splice.output.ModelPlan` of logical tensors) written in its output
    scheme (:func:`output_scheme`): a tensor only moved from an input of that scheme is a byte
    copy of its parts; a computed one, quantizable (an input of that scheme gives it, or
    :func:`quantizable` for a new scheme), quantized; the others as planned. The config's
    ``quantization_config`` follows (dropped for an unquantized output)."""
    from splice.arch import ArchSpec
    from splice.execute import TensorTask

    schemes = [m.quant_scheme for m in plan.models.values()]
    if target in (None, "keep") and not any(schemes):
        return plan
    out = output_scheme(target, schemes, block)
    config = {k: v for k, v in plan.config.items() if k != "quantization_config"}
    if out is None:
        return replace(plan, config=config)
    config["quantization_config"] = dict(out.config)
    spec = ArchSpec.of_output(config)
    report = QuantReport(out)
    tasks: list[TensorTask] = []
    for t in plan.tasks:
        infos = [plan.models[s.model].stored_info(s.name) for s in t.sources]
        plain = t.compute is None and t.scale == 1.0 and len(infos) == 1
        q = infos[0].quant if infos else None
        if plain and q is not None and q.scheme == out and infos[0].view is None:
            names = part_names(t.name, out, with_input_scale=len(q.parts) == 3)
            src = t.sources[0].model
            tasks += [
                TensorTask.copy(n, src, part_key(p.name), p)
                for n, p in zip(names, q.parts, strict=True)
            ]
            continue
        if target in (None, "keep"):
            wanted = len(t.shape) >= 2 and any(i.quant is not None for i in infos)
        else:
            wanted = quantizable(t.name, t.shape, out, spec)
        if not wanted:
            tasks.append(t)
            continue
        static = next((i.name for i in infos if i.quant and len(i.quant.parts) == 3), None)
        if static is not None and out.method == "compressed-tensors":
            raise SpliceError(
                f"{t.name}: computed from {static}, whose static activation scale "
                "(input_scale) only calibration could make again; --dtype none (or a float "
                "dtype) writes the output unquantized"
            )
        (name, shape, dtype), *extra = stored_outputs(t.name, t.shape, out)
        tasks.append(
            TensorTask(
                name=name,
                shape=shape,
                dtype=dtype,
                sources=t.sources,
                compute=_Quantize(t, out, report, spec.parse(t.name).group if spec else "all"),
                load_dtype=t.load_dtype,
                label=f"{t.label} -> {out.method}",
                extra=tuple(extra),
            )
        )
    qc = config["quantization_config"]
    listed = qc.get("modules_to_not_convert") or qc.get("ignore") or []
    indexed = any(_names_a_layer(m) for m in listed)
    if out.method != "mxfp4" and (indexed or target not in (None, "keep")):
        config["quantization_config"] = _not_converted(qc, tasks, out)
    files = {**plan.files, QuantReport.FILE: report.to_json}
    return replace(plan, tasks=tasks, config=config, files=files)


def _not_converted(qc: dict[str, Any], tasks: list[Any], scheme: Scheme) -> dict[str, Any]:
    """``qc`` listing every linear the output leaves unquantized (a router, the head) by its
    module name: transformers quantizes every other ``nn.Linear`` on a GPU and would look for
    its scales. The input's entries that name no layer by index are kept; those that do are
    dropped (a layer map moved them), the new list names them again."""
    key = "modules_to_not_convert" if scheme.method == "fp8" else "ignore"
    written = {n for t in tasks for n, _, _ in t.outputs()}
    plain = {
        name.removesuffix(".weight")
        for t in tasks
        for name, shape, dtype in t.outputs()
        if name.endswith(".weight") and len(shape) == 2 and dtype != FP8
        and not any(n in written for n in part_names(name, scheme)[1:])
    }  # fmt: skip
    kept = [m for m in qc.get(key) or [] if not _names_a_layer(m)]
    return {**qc, key: sorted(set(kept) | plain)}


def logical_view(
    tensors: dict[str, tuple[tuple[int, ...], str]], config: Mapping[str, Any]
) -> dict[str, tuple[tuple[int, ...], str]]:
    """The planned ``tensors`` of a quantized output as the model sees them once loaded: each
    weight at its logical shape, its scales gone (for the load check)."""
    scheme = scheme_of(config)
    if scheme is None:
        return dict(tensors)
    dtype = logical_dtype(config)
    out = {}
    for name, (shape, dt) in tensors.items():
        if scheme.method == "mxfp4":
            if name.endswith("_scales") and name.removesuffix("_scales") + "_blocks" in tensors:
                continue
            if name.endswith("_blocks"):
                *lead, rows, groups, _ = shape
                out[name.removesuffix("_blocks")] = ((*lead, groups * 32, rows), dtype)
                continue
        elif name.endswith(("_scale_inv", "_scale", "input_scale")):
            weight = name.removesuffix("_inv").removesuffix("_scale")
            if weight in tensors or name.removesuffix("input_scale") + "weight" in tensors:
                continue
        out[name] = (shape, dt)
    return out
