"""Run a causal LM on calibration text and accumulate per-layer statistics, batch by batch.

Forward hooks on the decoder layers see each layer's input and output residual stream; every
statistic is summed per batch and the hidden states are dropped, so memory stays at one batch
whatever the number of samples. Statistics (:class:`LayerStats`):

- input/output cosine of each layer per token, summed over positions ≥ 1 (first token
  excluded, as Yi-9B's criterion) and over all positions (ShortGPT's block influence), plus a
  null: the same cosine between a token's input and the output at another position;
- angles between the last token's residual stream at every pair of layer boundaries
  (boundary 0 = input of layer 0, boundary l+1 = output of layer l), for Gromov et al.'s
  angular distance, plus a null between different samples.

Calibration text comes from a text file, an lm-eval task (``lm-eval:TASK``) or the zoo
(``zoo``), and is cut into windows of ``seq_len`` tokens (:func:`token_windows`).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from splice.errors import SpliceError
from splice.progress import progress

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel


def resolve_device(device: str | None) -> str:
    """``auto``/None -> ``cuda`` when available else ``cpu``; a cuda device must exist."""
    import torch

    if device in (None, "", "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        raise SpliceError(f"--device {device}: not a device (cpu, cuda, cuda:1, mps)") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise SpliceError(f"--device {device}: no CUDA device here (use cpu or auto)")
        count = torch.cuda.device_count()
        if dev.index is not None and dev.index >= count:
            raise SpliceError(
                f"--device {device}: this machine has {count} CUDA device(s), "
                f"cuda:0 to cuda:{count - 1}"
            )
    elif dev.type == "mps":
        if not torch.backends.mps.is_available():
            raise SpliceError(f"--device {device}: no MPS device here (use cpu or auto)")
    elif dev.type != "cpu":
        raise SpliceError(f"--device {device}: cannot run here; use cpu, cuda, cuda:N or mps")
    return device


# ---- the model ----------------------------------------------------------------------------------
def check_finite(t: torch.Tensor, label: str, why: str = "analysis needs finite weights") -> None:
    """``SpliceError`` naming ``label`` (and ``why``) if the float tensor ``t`` holds NaN or inf.

    Checked block by block, so no tensor-sized mask is made.
    """
    import torch

    if not t.is_floating_point():
        return
    v = t.detach().reshape(-1)
    step = 1 << 22
    blocks = range(0, v.numel(), step)
    if all(bool(torch.isfinite(v[i : i + step]).all()) for i in blocks):
        return
    nan = sum(int(torch.isnan(v[i : i + step]).sum()) for i in blocks)
    inf = sum(int(torch.isinf(v[i : i + step]).sum()) for i in blocks)
    what = " and ".join(f"{n} {k}" for n, k in ((nan, "NaN"), (inf, "inf")) if n)
    raise SpliceError(f"{label} has {what} values; {why}")


def check_model_code(path: str | os.PathLike[str], trust_remote_code: bool) -> None:
    """``SpliceError`` if the model at ``path`` cannot be built without its own Python code
    (a model type transformers does not know, with ``auto_map``) and ``trust_remote_code`` is
    off, or cannot be built at all (an unknown model type and no ``auto_map``)."""
    import json

    from transformers import CONFIG_MAPPING

    file = Path(path) / "config.json"
    try:
        config = json.loads(file.read_text())
    except (OSError, ValueError) as e:
        raise SpliceError(f"{file}: cannot read it ({e})") from None
    if not isinstance(config, dict):
        raise SpliceError(f"{file}: not a JSON object")
    model_type = config.get("model_type")
    if model_type in CONFIG_MAPPING:
        return
    if not config.get("auto_map"):
        raise SpliceError(f"{path}: transformers does not know model type {model_type!r}")
    if not trust_remote_code:
        raise SpliceError(
            f"{path}: model type {model_type!r} needs the model's own code (auto_map in "
            "config.json); pass --trust-remote-code to run it"
        )


def load_model(
    path: str | os.PathLike[str],
    *,
    dtype: str = "float32",
    device: str = "cpu",
    trust_remote_code: bool = False,
    allow_pickle: bool = False,
    why: str = "analysis needs finite weights",
) -> PreTrainedModel:
    """``AutoModelForCausalLM`` from a model folder, in eval mode, with finite weights (else
    ``SpliceError`` naming the tensor and ``why``).

    Safetensors only unless ``allow_pickle`` (then ``.bin`` too, with ``weights_only=True``);
    the model's own code runs only with ``trust_remote_code`` (:func:`check_model_code`).
    Check the folder first (``open_checkpoint(...).validate()``): transformers fills missing
    tensors with random ones. Failures are one-line :class:`SpliceError`.
    """
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    from splice.dtypes import dtype_name, to_torch

    check_model_code(path, trust_remote_code)
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        model = AutoModelForCausalLM.from_pretrained(
            str(path),
            dtype=to_torch(dtype),
            trust_remote_code=trust_remote_code,
            use_safetensors=None if allow_pickle else True,
            weights_only=True,
        )
    except (OSError, ValueError, KeyError, TypeError, RuntimeError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise SpliceError(f"{path}: cannot load as a causal LM ({first})") from None
    finally:
        if bars:
            hf_logging.enable_progress_bar()
    cast = f" (in {dtype_name(dtype)})" if dtype_name(dtype) != "float32" else ""
    with torch.no_grad():
        for name, p in model.named_parameters():
            check_finite(p, f"{path}: {name}{cast}", why)
    try:
        model = model.to(device)
    except (RuntimeError, AssertionError) as e:  # e.g. out of device memory
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise SpliceError(f"--device {device}: cannot move the model there ({first})") from None
    return model.eval()


# ---- calibration text ---------------------------------------------------------------------------
def calibration_text(source: str | os.PathLike[str], *, include_path: str | None = None) -> str:
    """Text of a calibration source: a text file, ``lm-eval:TASK`` or ``zoo``."""
    src = str(source)
    if src.startswith("lm-eval:"):
        text = _lm_eval_text(src.removeprefix("lm-eval:"), include_path)
    elif src == "zoo" and not Path(src).exists():
        text = _zoo_text()
    else:
        path = Path(src)
        if not path.is_file():
            raise SpliceError(
                f"{src}: no such calibration file (give a text file, lm-eval:TASK or zoo)"
            )
        try:
            text = path.read_text()
        except UnicodeDecodeError:
            raise SpliceError(f"{src}: calibration file is not UTF-8 text") from None
    if not text.strip():
        raise SpliceError(f"{src}: calibration text is empty")
    return text


def _lm_eval_text(task: str, include_path: str | None) -> str:
    """Documents of an lm-eval task (its evaluation split), each prompt plus its target."""
    try:
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise SpliceError("lm-eval:TASK needs lm-eval (pip install 'splice[eval]')") from None
    try:
        manager = TaskManager(include_path=include_path)
        tasks = manager.load([task])["tasks"]
    except Exception as e:  # lm-eval raises many types for unknown tasks / missing datasets
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise SpliceError(f"lm-eval task {task!r} cannot be loaded ({first})") from None
    texts = []
    for t in tasks.values():
        for doc in t.eval_docs:
            prompt = t.doc_to_text(doc)
            target = t.doc_to_target(doc)
            if isinstance(target, int) and hasattr(t, "doc_to_choice"):
                choices = t.doc_to_choice(doc)
                target = choices[target] if isinstance(choices, list) else ""
            texts.append(f"{prompt}{t.config.target_delimiter}{target}".strip())
    return "\n\n".join(texts)


def _zoo_text() -> str:
    try:
        from splice.zoo import calibration_text as zoo_text
    except ImportError:
        raise SpliceError(
            "--calibration zoo: this build has no zoo corpus (splice.zoo.calibration_text); "
            "give a text file instead"
        ) from None
    return zoo_text()


def token_windows(tokenizer: Any, text: str, seq_len: int, max_samples: int) -> torch.Tensor:
    """``[N, T]`` token ids: consecutive windows of the tokenized text, N ≤ ``max_samples``.

    Each window starts with the tokenizer's BOS (if it has one) followed by ``seq_len - 1``
    text tokens (``seq_len`` when there is no BOS). Only the text needed is tokenized. A text
    shorter than one window gives one shorter window.
    """
    import torch

    bos = getattr(tokenizer, "bos_token_id", None)
    body = seq_len - 1 if bos is not None else seq_len
    need = body * max_samples
    ids: list[int] = []
    lines = text.splitlines(keepends=True)
    step = 256
    for k in range(0, len(lines), step):
        chunk = "".join(lines[k : k + step])
        ids += tokenizer(chunk, add_special_tokens=False, verbose=False)["input_ids"]
        if len(ids) >= need:
            break
    if not ids:
        raise SpliceError("calibration text has no tokens for this tokenizer")
    count = min(max_samples, max(1, len(ids) // body))
    width = min(body, len(ids))
    rows = [ids[i * body : i * body + width] for i in range(count)]
    t = torch.tensor(rows, dtype=torch.long)
    if bos is not None:
        t = torch.cat([torch.full((count, 1), bos, dtype=torch.long), t], dim=1)
    if t.shape[1] < 2:
        raise SpliceError("calibration text is too short: fewer than 2 tokens in a window")
    return t


# ---- the runner -----------------------------------------------------------------------------------
@dataclass
class LayerStats:
    """Per-layer statistics summed over calibration batches (see the module docstring).

    ``io_cos[l]`` sums cos(input, output) of layer l over tokens at positions ≥ 1
    (``tokens`` of them); ``io_cos_all[l]`` over all positions (``tokens_all``);
    ``io_cos_other[l]`` over positions ≥ 1 with the output taken at another position (null).
    ``angles[a, b]`` sums, over samples, the angle in radians between the last token's
    residual stream at boundaries a and b (``[L+1, L+1]``); ``angles_other`` the same between
    a sample and the next one in its batch (``pairs_other`` of them).
    """

    num_layers: int
    samples: int
    tokens: int
    tokens_all: int
    io_cos: np.ndarray
    io_cos_all: np.ndarray
    io_cos_other: np.ndarray
    angles: np.ndarray
    angles_other: np.ndarray
    pairs_other: int

    @classmethod
    def zeros(cls, num_layers: int) -> LayerStats:
        z = np.zeros(num_layers)
        b = np.zeros((num_layers + 1, num_layers + 1))
        return cls(num_layers, 0, 0, 0, z.copy(), z.copy(), z.copy(), b.copy(), b.copy(), 0)

    def angular_distance(self) -> np.ndarray:
        """``[L+1, L+1]``: mean over samples of angle / π between boundaries a and b."""
        return self.angles / (math.pi * max(self.samples, 1))

    def angular_distance_other(self) -> np.ndarray | None:
        """``[L+1, L+1]``: the same between different samples (None if never batched ≥ 2)."""
        return self.angles_other / (math.pi * self.pairs_other) if self.pairs_other else None


def decoder_layers(model: PreTrainedModel, layer_prefix: str) -> Any:
    """The ``ModuleList`` of decoder layers, found from the spec's ``model.layers.{i}.``."""
    path = layer_prefix.split("{i}")[0].rstrip(".")
    try:
        return model.get_submodule(path)
    except AttributeError:
        raise SpliceError(f"model has no module {path!r} holding its layers") from None


def _angles(x: torch.Tensor) -> torch.Tensor:
    """``[B, K, H]`` -> ``[K, K]`` angles summed over B between every pair of the K vectors."""
    import torch

    u = torch.nn.functional.normalize(x.to(torch.float64), dim=-1)
    cos = (u @ u.transpose(1, 2)).clamp(-1, 1)
    return torch.arccos(cos).sum(0)


def _cross_angles(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``[B, K, H]`` x2 -> ``[K, K]``: angles summed over B between x[b, a] and y[b, c]."""
    import torch

    u = torch.nn.functional.normalize(x.to(torch.float64), dim=-1)
    v = torch.nn.functional.normalize(y.to(torch.float64), dim=-1)
    return torch.arccos((u @ v.transpose(1, 2)).clamp(-1, 1)).sum(0)


def layer_statistics(
    model: PreTrainedModel,
    input_ids: torch.Tensor,
    *,
    layer_prefix: str = "model.layers.{i}.",
    batch_size: int = 8,
    device: str = "cpu",
    show_progress: bool = False,
) -> LayerStats:
    """Run ``model`` on ``input_ids`` ``[N, T]`` in batches and accumulate :class:`LayerStats`.

    Windows have no padding, so every position is a real token and the last position is the
    last token.
    """
    import torch

    layers = decoder_layers(model, layer_prefix)
    n_layers = len(layers)
    stats = LayerStats.zeros(n_layers)
    batch_state: dict[str, Any] = {}

    def hook(index: int):
        def fn(module: Any, args: tuple, kwargs: dict, output: Any) -> None:
            x = args[0] if args else kwargs["hidden_states"]
            y = output[0] if isinstance(output, (tuple, list)) else output
            xf, yf = x.float(), y.float()
            cos = torch.nn.functional.cosine_similarity(xf, yf, dim=-1)  # [B, T]
            stats.io_cos_all[index] += float(cos.sum())
            stats.io_cos[index] += float(cos[:, 1:].sum())
            t = x.shape[1]
            if t > 2:
                shifted = torch.roll(yf[:, 1:], shifts=(t - 1) // 2, dims=1)
                other = torch.nn.functional.cosine_similarity(xf[:, 1:], shifted, dim=-1)
                stats.io_cos_other[index] += float(other.sum())
            if index == 0:
                batch_state["last"] = [x[:, -1].detach().float()]
            batch_state["last"].append(y[:, -1].detach().float())

        return fn

    handles = [
        layer.register_forward_hook(hook(i), with_kwargs=True) for i, layer in enumerate(layers)
    ]
    try:
        batches = list(torch.split(input_ids, batch_size))
        with torch.inference_mode():
            for batch in progress(batches, "calibration", enabled=show_progress):
                model(input_ids=batch.to(device), use_cache=False, logits_to_keep=1)
                last = torch.stack(batch_state.pop("last"), dim=1).cpu()  # [B, L+1, H]
                b, t = batch.shape
                stats.samples += b
                stats.tokens += b * (t - 1)
                stats.tokens_all += b * t
                stats.angles += _angles(last).numpy()
                if b > 1:
                    stats.angles_other += _cross_angles(last, torch.roll(last, 1, dims=0)).numpy()
                    stats.pairs_other += b
    finally:
        for h in handles:
            h.remove()
    if t <= 2:
        stats.io_cos_other[:] = np.nan
    return stats
