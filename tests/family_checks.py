"""Every verb of splice on every family of ``families.FAMILIES``, against an independent
construction (litgpt-style): transformers' own model of the family, built from a config and a
state dict computed here from the source's safetensors files, never through splice.

``check_<verb>(family, work) -> Outcome`` runs ``splice <verb>`` in-process
(:func:`splice.cli.main`) on tiny float32 models built by :func:`families.build` (cached per
family and seed under ``work/sources``) and compares:

- inspect: exit code 0, and ``--json``'s layer count, sizes, parameter and tensor counts are
  the config's and the files';
- merge: a linear merge (0.3 / 0.7) of the seed-0 and seed-1 builds against the model whose
  tensors are ``0.3 * A + 0.7 * B`` of the two builds' files;
- upscale: ``--duplicate 1:3`` (layers ``[0, 1, 2, 1, 2, 3]``) against the source's file
  tensors with layer ``j`` taken from source layer ``map[j]`` and every per-layer config field
  mapped the same way;
- prune: ``--drop 2`` (layers ``[0, 1, 3]``), the same kind of reference;
- slice: at 0% sparsity the source's logits (the output loaded with ``load_sliced``); at 25% an
  output that ``load_sliced`` loads and runs without NaN.

Each output must also load in stock transformers with no missing or unexpected keys (sliced
outputs: their standard tensors into the family's model at width ``d``, as ``load_sliced``
does) and keep every tensor name of the input that should survive (biases, the final norm's
bias, ``lm_head.bias``, ...). Logits are compared on a fixed 12-token input (max abs diff
< 1e-4, float32, one thread).

A refusal (exit code 2, one ``splice: error:`` line) is ``Outcome("refused", line)``; any other
exit code, an exception or a failed comparison is ``Outcome("fail", one line)``.

``family`` may also be a multimodal model type of ``mm_families.MM_FAMILIES`` (Gemma 3,
Mistral 3, Qwen2.5-VL, Qwen3-VL, Llama 4): the sources are :func:`mm_families.build_mm`'s,
every model (outputs, references, sources) loads with ``AutoModelForImageTextToText`` as the
input's ``architectures[0]``, layer maps act on the language model's tensors only (under its
stored prefix, ``language_model.model.layers.N.``, ``model.layers.N.`` ...: the vision tower's
own ``layers.N`` / ``blocks.N`` stay) and on the per-layer fields of ``text_config``, the
references are written in the multimodal layout, logits are the text input's, and every
tensor outside the language model must be the source's (the first model's) byte for byte in
every output (slice --basis shared: the projector linears that write the language model's
stream go through the embedding's rotation instead). Slicing a multimodal model is checked
with ``--basis shared`` (``per-layer`` has no multimodal form).
"""

from __future__ import annotations

import contextlib
import io
import json
import re
import shutil
import tempfile
import traceback
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import families
import mm_families
import torch

torch.set_num_threads(1)

#: the verbs checked, in the order of ``splice --help`` (``evolve-dfs``: evolve's data-flow
#: path model, run live in memory as its fitness does)
VERBS = ("inspect", "merge", "upscale", "prune", "slice", "collapse", "evolve-dfs")
#: a fixed 12-token input (ids inside every family's 96-token vocabulary, no special token)
IDS = torch.tensor([[5, 17, 42, 8, 63, 29, 71, 11, 90, 36, 54, 23]])
TOL = 1e-4
#: linear merge weights of the seed-0 and seed-1 builds (they sum to 1: normalizing changes
#: nothing)
WEIGHTS = (0.3, 0.7)
#: ``upscale --duplicate A:B`` and the layer map it should give on a 4-layer model
DUPLICATE = (1, 3)
#: ``prune --drop`` this layer
DROP = 2
#: the data-flow path of the evolve check, ``(seed, layer)``: both builds, layer 1 twice
PATH = ((0, 0), (1, 1), (0, 1), (1, 2), (0, 3))
#: config fields that list layer INDICES rather than one entry per layer
INDEX_LISTS = ("full_attn_idxs", "mlp_only_layers", "moe_layers")
#: calibration of the slice checks (made-up words w0 ... of the sources' tokenizer)
SLICE_CALIB = ["--seq-len", "24", "--max-samples", "8", "--batch-size", "4"]
_LAYER = re.compile(r"^((?:[^.]+\.)*?(?:layers|layer|h|blocks))\.(\d+)\.(.+)$")
#: multimodal model types (vision-language checkpoints whose language model is checked)
MM = mm_families.MM_FAMILIES
#: multimodal model type -> (a regex on the stored names of the linears outside the language
#: model whose output is its residual stream, the axis of that output in the stored tensor):
#: ``slice --basis shared`` rotates them as it rotates the embedding rows
STREAM_WRITERS: dict[str, tuple[str, int]] = {
    "gemma3": (r"multi_modal_projector\.mm_input_projection_weight", 1),
    "mistral3": (r"multi_modal_projector\.linear_2\.(weight|bias)", 0),
    "llama4": (r"multi_modal_projector\.linear_1\.(weight|bias)", 0),
    "qwen2_5_vl": (r"(model\.)?visual\.merger\.mlp\.2\.(weight|bias)", 0),
    "qwen3_vl": (
        r"(model\.)?visual\.(merger|deepstack_merger_list\.\d+)\.linear_fc2\.(weight|bias)",
        0,
    ),
}
STREAM_WRITERS["qwen3_vl_moe"] = STREAM_WRITERS["qwen3_vl"]


@dataclass(frozen=True)
class Outcome:
    """What one check found: ``status`` "pass" | "fail" | "refused" and a one-line ``detail``."""

    status: str
    detail: str = ""

    def as_dict(self) -> dict[str, str]:
        return {"status": self.status, "detail": self.detail}


class Failed(Exception):
    """A check's comparison failed (the message is the outcome's detail)."""


class Refused(Exception):
    """splice refused (exit code 2; the message is its one line)."""


def one_line(text: str, limit: int = 240) -> str:
    line = " ".join(str(text).split())
    return line if len(line) <= limit else line[: limit - 1] + "…"


# ---- running things quietly ---------------------------------------------------------------------
@contextlib.contextmanager
def quiet():
    """Python warnings and transformers' logging silenced for the block."""
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


def run_cli(argv: list[str]) -> str:
    """``splice.cli.main(argv)``; returns its stdout. Exit 2 raises :class:`Refused` with the
    first ``splice: error:`` line, any other non-zero exit :class:`Failed`."""
    from splice.cli import main

    out, err = io.StringIO(), io.StringIO()
    with quiet(), contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main([str(a) for a in argv])
    lines = [ln for ln in err.getvalue().splitlines() if ln.strip()]
    errors = [ln.removeprefix("splice: error: ") for ln in lines if ln.startswith("splice: error:")]
    if code == 2:
        raise Refused(one_line(errors[0] if errors else (lines[-1] if lines else "exit code 2")))
    if code != 0:
        why = errors[0] if errors else (lines[-1] if lines else "")
        raise Failed(one_line(f"exit code {code}: {why}"))
    return out.getvalue()


def crash(e: BaseException) -> str:
    """A crash in one line: its type, message's first line and last frame (in splice or
    transformers)."""
    tb = traceback.extract_tb(e.__traceback__)
    where = f" ({Path(tb[-1].filename).name}:{tb[-1].lineno})" if tb else ""
    first = str(e).strip().splitlines()[0] if str(e).strip() else ""
    return f"{type(e).__name__}: {first}{where}"


def outcome_of(body: Callable[[], None]) -> Outcome:
    """Run a check's ``body``: "pass" unless it raises."""
    try:
        body()
    except Refused as e:
        return Outcome("refused", str(e))
    except Failed as e:
        return Outcome("fail", one_line(str(e)))
    except Exception as e:  # a crash is a failure with its last frame in splice or transformers
        return Outcome("fail", one_line(crash(e)))
    return Outcome("pass", "")


# ---- sources ------------------------------------------------------------------------------------
#: the tokenizer's symbols: byte-level characters (``Ġ`` a space, ``Ċ`` a newline), then a
#: space merged with each lowercase letter; 94 tokens with the 4 special ones
_CHARS = [chr(c) for c in range(ord("a"), ord("z") + 1)]
_CHARS += [chr(c) for c in range(ord("A"), ord("Z") + 1)] + [str(d) for d in range(10)]


def tokenizer() -> Any:
    """A byte-level BPE over letters and digits (vocabulary 94 < 96) with <pad> <s> </s> <unk>.

    Byte-level, so that the family tokenizer classes transformers forces on some model types
    (Qwen2Tokenizer rebuilds a byte-level BPE from the vocabulary and merges) read it alike.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<pad>", "<s>", "</s>", "<unk>", "Ġ", "Ċ", *_CHARS]
    words += [f"Ġ{c}" for c in _CHARS[:26]]
    merges = [("Ġ", c) for c in _CHARS[:26]]
    bpe = models.BPE({w: i for i, w in enumerate(words)}, merges, unk_token="<unk>")
    tok = Tokenizer(bpe)
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
        unk_token="<unk>",
    )  # fmt: skip


def word_text(words: int = 3000, seed: int = 0) -> str:
    """Calibration text: made-up words of 1-5 letters or digits, 20 a line."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, 6, (words,), generator=g).tolist()
    picks = torch.randint(0, len(_CHARS), (sum(lengths),), generator=g).tolist()
    out, at = [], 0
    for n in lengths:
        out.append("".join(_CHARS[i] for i in picks[at : at + n]))
        at += n
    return "\n".join(" ".join(out[k : k + 20]) for k in range(0, words, 20))


def source(family: str, work: Path, seed: int = 0) -> Path:
    """The tiny ``family`` model of ``seed`` (with a tokenizer), built once under ``work``."""
    folder = Path(work) / "sources" / family / f"seed{seed}"
    if (folder / "config.json").exists():
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".seed{seed}-"))
    with quiet():
        if family in MM:
            mm_families.build_mm(family, tmp, seed=seed)
        else:
            families.build(family, tmp, seed=seed)
        tokenizer().save_pretrained(tmp)
    try:
        tmp.rename(folder)
    except OSError:  # built meanwhile by someone else
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def fresh(work: Path, verb: str, family: str) -> Path:
    """An empty folder for one check's outputs and references."""
    parent = Path(work) / "runs" / verb
    parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(dir=parent, prefix=f"{family}-"))


def calibration_file(work: Path) -> Path:
    path = Path(work) / "sources" / "calibration.txt"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(word_text())
        tmp.replace(path)
    return path


# ---- files, configs, models ---------------------------------------------------------------------
def read_tensors(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a folder's safetensors files, by name."""
    from safetensors.torch import load_file

    out: dict[str, torch.Tensor] = {}
    for f in sorted(Path(folder).glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def tensor_names(folder: Path) -> set[str]:
    from safetensors import safe_open

    names: set[str] = set()
    for f in sorted(Path(folder).glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as h:
            names |= set(h.keys())
    return names


def read_config(folder: Path) -> dict[str, Any]:
    return json.loads((Path(folder) / "config.json").read_text())


def multimodal(cfg: dict[str, Any]) -> bool:
    """Whether ``cfg`` is a multimodal model type's (:data:`MM`)."""
    return cfg.get("model_type") in MM


def text_section(cfg: dict[str, Any]) -> dict[str, Any]:
    """The language model's config: a multimodal config's ``text_config``, else ``cfg``."""
    return cfg["text_config"] if multimodal(cfg) else cfg


def with_text_section(cfg: dict[str, Any], section: dict[str, Any]) -> dict[str, Any]:
    """``cfg`` with its language model's config replaced by ``section``."""
    return {**cfg, "text_config": section} if multimodal(cfg) else section


def layer_count(cfg: dict[str, Any]) -> int:
    return int(cfg["num_hidden_layers"])


def per_layer_keys(cfg: dict[str, Any]) -> list[str]:
    """Top-level config lists with one entry per layer (``layer_types``, ``no_rope_layers``)."""
    n = layer_count(cfg)
    return [
        k for k, v in cfg.items()
        if isinstance(v, list) and len(v) == n and k not in INDEX_LISTS and k != "architectures"
    ]  # fmt: skip


def mapped_config(cfg: dict[str, Any], mapping: list[int]) -> dict[str, Any]:
    """``cfg`` for the layers ``mapping`` of its model: per-layer lists follow the map; index
    lists (``full_attn_idxs``) become the output positions whose source layer was listed
    (a multimodal config: those of its ``text_config``)."""
    if multimodal(cfg):
        return with_text_section(cfg, mapped_config(text_section(cfg), mapping))
    new = dict(cfg)
    for key in per_layer_keys(cfg):
        new[key] = [cfg[key][i] for i in mapping]
    for key in INDEX_LISTS:
        if isinstance(cfg.get(key), list):
            old = set(cfg[key])
            new[key] = [j for j, i in enumerate(mapping) if i in old]
    new["num_hidden_layers"] = len(mapping)
    return new


def with_moe_placement(want: dict[str, Any], out: dict[str, Any]) -> dict[str, Any]:
    """``want`` with the output's MoE-placement rule fields (``first_k_dense_replace``,
    ``moe_layer_end_index``, ...: refitted to the new depth by splice, checked by hand in
    tests/test_layer_config.py); the reference checks the layers, not those fields."""
    from splice.layer_config import INTERVAL_RULES

    if multimodal(want):
        return with_text_section(want, with_moe_placement(text_section(want), text_section(out)))
    fields = {f for rule in INTERVAL_RULES for f in rule.fields} | {"mlp_only_layers"}
    return {**want, **{k: out[k] for k in fields if k in out}}


def text_prefix(names: Any) -> tuple[str, str | None]:
    """A multimodal model's language model as stored: the prefix of its body (the one
    ``embed_tokens.weight`` is under: ``language_model.model.``, ``model.language_model.``,
    ``model.``) and its head's name (None when tied)."""
    bodies = sorted({n.removesuffix("embed_tokens.weight") for n in names
                     if n.endswith("embed_tokens.weight")})  # fmt: skip
    if len(bodies) != 1:
        raise Failed(f"checker: {len(bodies)} embed_tokens.weight tensors, not one")
    heads = [n for n in names if n.endswith("lm_head.weight") and not n.startswith(bodies[0])]
    return bodies[0], heads[0] if heads else None


def in_text(name: str, text: tuple[str, str | None] | None) -> bool:
    """Whether stored tensor ``name`` is the language model's (``text``: :func:`text_prefix`;
    None: a text model, all of it)."""
    return text is None or name.startswith(text[0]) or name == text[1]


def layer_of(name: str, body: str | None = None) -> tuple[str, int, str] | None:
    """``(prefix, layer, rest)`` of a decoder layer's tensor, else None (``body``: a multimodal
    model's language-model prefix, whose ``layers.N.`` only are decoder layers)."""
    if body is None:
        m = _LAYER.match(name)
    else:
        m = re.match(rf"^({re.escape(body)}layers)\.(\d+)\.(.+)$", name)
    return (m.group(1), int(m.group(2)), m.group(3)) if m else None


def mapped_name(name: str, mapping: list[int], body: str | None = None) -> list[str]:
    """The output names of source tensor ``name`` under the layer map (one per copy)."""
    m = layer_of(name, body)
    if not m:
        return [name]
    prefix, i, rest = m
    return [f"{prefix}.{j}.{rest}" for j, src in enumerate(mapping) if src == i]


def mapped_tensors(
    tensors: dict[str, torch.Tensor], mapping: list[int], body: str | None = None
) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for name, t in tensors.items():
        for new in mapped_name(name, mapping, body):
            out[new] = t.clone()
    return out


def text_of(folder: Path) -> tuple[str, str | None] | None:
    """:func:`text_prefix` of a multimodal model's folder; None for a text model's."""
    return text_prefix(tensor_names(folder)) if multimodal(read_config(folder)) else None


def write_reference(folder: Path, cfg: dict[str, Any], tensors: dict[str, torch.Tensor]) -> Path:
    """A checkpoint folder written here (json + safetensors), for transformers to load."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(cfg, indent=2))
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(folder / "model.safetensors"),
              metadata={"format": "pt"})  # fmt: skip
    return folder


def load_checked(folder: Path, what: str = "output") -> torch.nn.Module:
    """``AutoModelForCausalLM.from_pretrained`` with ``output_loading_info``: no key missing,
    unexpected or of another shape, else :class:`Failed`. A multimodal model's folder loads
    with ``AutoModelForImageTextToText``, as the class its config's ``architectures`` names
    (:func:`modules_kept` checks an output's is the input's)."""
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

    cfg = read_config(folder)
    auto = AutoModelForImageTextToText if multimodal(cfg) else AutoModelForCausalLM
    try:
        with quiet():
            model, info = auto.from_pretrained(
                str(folder), dtype=torch.float32, output_loading_info=True
            )
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise Failed(f"{what} does not load in transformers: {type(e).__name__}: {first}") from e
    problems = []
    for kind in ("missing_keys", "unexpected_keys", "mismatched_keys"):
        keys = sorted(str(k if isinstance(k, str) else k[0]) for k in info.get(kind) or [])
        if keys:
            more = f" (+{len(keys) - 3})" if len(keys) > 3 else ""
            problems.append(f"{kind.replace('_', ' ')}: {', '.join(keys[:3])}{more}")
    if problems:
        raise Failed(f"{what} loads with " + "; ".join(problems))
    if multimodal(cfg) and type(model).__name__ != (cfg.get("architectures") or ["?"])[0]:
        raise Failed(f"{what} loads as {type(model).__name__}, its config says "
                     f"{(cfg.get('architectures') or ['nothing'])[0]}")  # fmt: skip
    return model.eval()


def logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad(), quiet():
        return model(input_ids=IDS, use_cache=False).logits.float()


def distinct(ref: torch.Tensor, source: torch.Tensor, what: str) -> None:
    """The reference is not the source's logits again (else the check would prove nothing)."""
    if not (ref - source).abs().max().item() > 100 * TOL:
        raise Failed(f"checker: the reference's logits are the {what}'s (a vacuous check)")


def compare(got: torch.Tensor, want: torch.Tensor, what: str = "logits") -> None:
    if got.shape != want.shape:
        raise Failed(f"{what}: shape {tuple(got.shape)} != reference {tuple(want.shape)}")
    if not torch.isfinite(got).all():
        raise Failed(f"{what}: not finite")
    diff = (got - want).abs().max().item()
    if not diff < TOL:
        raise Failed(f"{what} differ from the reference: max abs diff {diff:.3g}")


def no_tensor_lost(expected: set[str], out: Path) -> None:
    lost = sorted(expected - tensor_names(out))
    if lost:
        more = f" (+{len(lost) - 4} more)" if len(lost) > 4 else ""
        raise Failed(f"tensors lost: {', '.join(lost[:4])}{more}")


def config_follows(model: torch.nn.Module, want: dict[str, Any]) -> None:
    """The loaded output's per-layer config fields are the mapped ones (a multimodal model's:
    those of its text config)."""
    config = model.config.get_text_config() if multimodal(want) else model.config
    want = text_section(want)
    for key in [*per_layer_keys(want), *INDEX_LISTS]:
        if key not in want:
            continue
        got = getattr(config, key, None)
        if got is not None and list(got) != list(want[key]):
            raise Failed(f"config {key} {list(got)} != expected {want[key]}")


def modules_kept(src: Path, out: Path, family: str, *, sliced: bool = False) -> None:
    """A multimodal output (nothing for a text model's): the input's model type and class;
    its ``vision_config`` (sliced: but a width that was the language model's and is now the
    output's); and every tensor outside the language model the source's byte for byte (same
    names, dtype, shape, bytes; none added), except where ``sliced`` the linears that write the
    language model's stream (:data:`STREAM_WRITERS`), which must go through the map the
    embedding rows went through (``E' = E·M``: ``W' = Mᵀ·W`` along the stream axis)."""
    s_cfg, o_cfg = read_config(src), read_config(out)
    if not multimodal(s_cfg):
        return
    for key in ("model_type", "architectures"):
        if o_cfg.get(key) != s_cfg.get(key):
            raise Failed(f"config {key} {o_cfg.get(key)!r}, the input's is {s_cfg.get(key)!r}")
    widths = (text_section(s_cfg)["hidden_size"], text_section(o_cfg)["hidden_size"])
    s_vis, o_vis = s_cfg.get("vision_config") or {}, o_cfg.get("vision_config") or {}
    for key in sorted(set(s_vis) | set(o_vis)):
        if o_vis.get(key) != s_vis.get(key) and not (
            sliced and (s_vis.get(key), o_vis.get(key)) == widths
        ):
            raise Failed(f"vision_config {key} {o_vis.get(key)!r}, the input's is "
                         f"{s_vis.get(key)!r}")  # fmt: skip
    s_t, o_t = read_tensors(src), read_tensors(out)
    s_text, o_text = text_prefix(s_t), text_prefix(o_t)
    outside = {n: t for n, t in s_t.items() if not in_text(n, s_text)}
    added = sorted(n for n in o_t if not in_text(n, o_text) and n not in outside)
    if added:
        raise Failed(f"tensors outside the language model added: {', '.join(added[:4])}")
    pattern, axis = STREAM_WRITERS.get(family, ("", 0))  # none listed: every tensor kept
    writers = {n for n in outside if sliced and pattern and re.fullmatch(pattern, n)}
    for name, t in outside.items():
        got = o_t.get(name)
        if got is None:
            raise Failed(f"tensor outside the language model lost: {name}")
        if name in writers:
            continue
        if got.dtype != t.dtype or got.shape != t.shape:
            raise Failed(f"{name}: {got.dtype} {tuple(got.shape)}, the source's is {t.dtype} "
                         f"{tuple(t.shape)}")  # fmt: skip
        if not torch.equal(got.reshape(-1).view(torch.uint8), t.reshape(-1).view(torch.uint8)):
            raise Failed(f"{name} is not the source's byte for byte (outside the language model)")
    if writers:
        embed = s_text[0] + "embed_tokens.weight"
        e, e_out = s_t[embed].double(), o_t[o_text[0] + "embed_tokens.weight"].double()
        m = torch.linalg.lstsq(e, e_out).solution  # [D, d]: E' = E·M
        if not (e @ m - e_out).abs().max().item() < TOL:
            raise Failed("checker: the output's embedding rows are not a linear map of the "
                         "source's")  # fmt: skip
        for name in sorted(writers):
            w = outside[name].double().movedim(axis, 0)
            want = torch.tensordot(m, w, dims=([0], [0]))  # Mᵀ·W along the stream axis
            got = o_t[name].double().movedim(axis, 0)
            if got.shape != want.shape:
                raise Failed(f"{name}: {tuple(o_t[name].shape)}, the stream's map of the "
                             f"source's gives {tuple(want.movedim(0, axis).shape)}")  # fmt: skip
            diff = (got - want).abs().max().item()
            if not diff < TOL:
                raise Failed(f"{name} (it writes the language model's stream) is not the "
                             f"embedding's map of the source's: max abs diff {diff:.3g}")  # fmt: skip


def check_layer_map(
    family: str, work: Path, verb: str, args: list[str], mapping: list[int]
) -> None:
    """``splice <verb> SRC OUT *args`` gives the source's layers ``mapping`` in order."""
    src = source(family, work)
    run = fresh(work, verb, family)
    out = run / "out"
    run_cli([verb, src, out, *args, "--device", "cpu", "--threads", "1", "--dtype", "float32",
             "--no-progress"])  # fmt: skip
    cfg = read_config(src)
    want_cfg = with_moe_placement(mapped_config(cfg, mapping), read_config(out))
    tensors = read_tensors(src)
    text = text_of(src)
    body = text[0] if text else None
    no_tensor_lost({new for name in tensors for new in mapped_name(name, mapping, body)}, out)
    modules_kept(src, out, family)
    model = load_checked(out)
    config_follows(model, want_cfg)
    ref_tensors = mapped_tensors(tensors, mapping, body)
    ref = load_checked(write_reference(run / "reference", want_cfg, ref_tensors), "reference")
    want = logits(ref)
    distinct(want, logits(load_checked(src, "source")), "source")
    compare(logits(model), want)


# ---- the checks ---------------------------------------------------------------------------------
def check_inspect(family: str, work: Path) -> Outcome:
    def body() -> None:
        src = source(family, work)
        run_cli(["inspect", src])
        data = json.loads(run_cli(["inspect", src, "--json"]))
        if not isinstance(data, dict):
            raise Failed(f"inspect --json printed {type(data).__name__}, not an object")
        cfg, tensors = read_config(src), read_tensors(src)
        text = text_of(src)
        lm = {n: t for n, t in tensors.items() if in_text(n, text)}
        section = text_section(cfg)
        want = {
            # a multimodal model's language model, as its text family
            "model_type": MM[family]["text"] if family in MM else cfg["model_type"],
            "num_layers": section["num_hidden_layers"],
            "hidden_size": section["hidden_size"],
            "vocab_size": section["vocab_size"],
            "num_params": sum(t.numel() for t in lm.values()),
        }
        for key, value in want.items():
            if data.get(key) != value:
                raise Failed(f"inspect --json: {key} {data.get(key)!r}, the files say {value!r}")
        if text is not None:  # the other modules listed, every tensor in one of them
            mm = data.get("multimodal") or {}
            mods = mm.get("modules") or []
            for key, value in (("model_type", cfg["model_type"]),
                               ("architectures", cfg["architectures"]),
                               ("text_prefix", text[0])):  # fmt: skip
                if mm.get(key) != value:
                    raise Failed(f"inspect --json: multimodal.{key} {mm.get(key)!r}, the files "
                                 f"say {value!r}")  # fmt: skip
            rest = [t for n, t in tensors.items() if n not in lm]
            got = (sum(m.get("tensors", 0) for m in mods), sum(m.get("params", 0) for m in mods))
            if got != (len(rest), sum(t.numel() for t in rest)):
                raise Failed(f"inspect --json: its modules hold {got[0]} tensors, {got[1]} "
                             f"parameters; the files hold {len(rest)}, "
                             f"{sum(t.numel() for t in rest)} outside the language model")  # fmt: skip
        counted = sum(f.get("tensors", 0) for f in data.get("files") or [])
        if counted != len(tensors):
            raise Failed(
                f"inspect --json: {counted} tensors in its files, the files hold {len(tensors)}"
            )

    return outcome_of(body)


def check_merge(family: str, work: Path) -> Outcome:
    def body() -> None:
        a, b = source(family, work, 0), source(family, work, 1)
        run = fresh(work, "merge", family)
        recipe = run / "recipe.yml"
        recipe.write_text(
            "merge_method: linear\n"
            "dtype: float32\n"
            "parameters: {normalize: false}\n"
            "models:\n"
            f"  - model: {a}\n    parameters: {{weight: {WEIGHTS[0]}}}\n"
            f"  - model: {b}\n    parameters: {{weight: {WEIGHTS[1]}}}\n"
        )
        out = run / "out"
        run_cli(["merge", recipe, out, "--no-progress"])
        ta, tb = read_tensors(a), read_tensors(b)
        if set(ta) != set(tb):
            raise Failed("the two builds have different tensor names")
        text = text_of(a)  # a multimodal model's other modules: the first model's
        mixed = {k: WEIGHTS[0] * ta[k] + WEIGHTS[1] * tb[k] if in_text(k, text) else ta[k]
                 for k in ta}  # fmt: skip
        no_tensor_lost(set(ta), out)
        modules_kept(a, out, family)
        model = load_checked(out)
        ref = load_checked(write_reference(run / "reference", read_config(a), mixed), "reference")
        want = logits(ref)
        distinct(want, logits(load_checked(a, "source")), "first source")
        compare(logits(model), want)

    return outcome_of(body)


def check_upscale(family: str, work: Path) -> Outcome:
    a, b = DUPLICATE
    n = families.BASE["num_hidden_layers"]
    mapping = list(range(b)) + list(range(a, n))  # --duplicate A:B: [0, B) then [A, n)
    return outcome_of(
        lambda: check_layer_map(family, work, "upscale", ["--duplicate", f"{a}:{b}"], mapping)
    )


def check_prune(family: str, work: Path) -> Outcome:
    n = families.BASE["num_hidden_layers"]
    mapping = [i for i in range(n) if i != DROP]
    return outcome_of(
        lambda: check_layer_map(family, work, "prune", ["--drop", str(DROP)], mapping)
    )


def _sliced_tensors_load(out: Path) -> None:
    """The standard tensors of a per-layer sliced output into the family's transformers model
    at width d (what ``load_sliced`` does): nothing missing, only shortcuts unexpected."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from splice.surgery.sliced import SHORTCUTS, SLICED_FROM

    raw = read_config(out)
    family = raw.get(SLICED_FROM) or raw.get("model_type")
    fields = {
        k: v for k, v in raw.items() if k not in ("model_type", SLICED_FROM, "splice_slicing")
    }
    with quiet():
        config = AutoConfig.for_model(family, **fields)
        _, info = AutoModelForCausalLM.from_pretrained(
            str(out), config=config, dtype=torch.float32, output_loading_info=True
        )
    missing = sorted(info.get("missing_keys") or [])
    unexpected = sorted(
        k for k in info.get("unexpected_keys") or [] if k.rsplit(".", 1)[-1] not in SHORTCUTS
    )
    if missing or unexpected:
        parts = [f"missing keys: {', '.join(missing[:3])}"] if missing else []
        parts += [f"unexpected keys: {', '.join(unexpected[:3])}"] if unexpected else []
        raise Failed("sliced output's tensors load with " + "; ".join(parts))


def check_slice(family: str, work: Path) -> Outcome:
    def body() -> None:
        from splice.surgery import load_sliced

        src = source(family, work)
        text = calibration_file(work)
        run = fresh(work, "slice", family)
        names = tensor_names(src)
        want = logits(load_checked(src, "source"))
        # a multimodal model: one basis for the whole stream, a standard checkpoint
        basis = ["--basis", "shared"] if family in MM else []
        for sparsity in ("0", "0.25"):
            out = run / f"out{sparsity}"
            try:
                run_cli(["slice", src, out, "--sparsity", sparsity, "--calibration", text,
                         *basis, *SLICE_CALIB, "--device", "cpu", "--threads", "1",
                         "--dtype", "float32", "--no-progress"])  # fmt: skip
            except (Refused, Failed) as e:
                raise type(e)(f"at {float(sparsity):.0%}: {e}") from e
            try:
                if not out.is_dir() or not any(out.glob("*.safetensors")):
                    raise Failed("no safetensors written")
                no_tensor_lost(names, out)
                if family in MM:
                    modules_kept(src, out, family, sliced=True)
                    model = load_checked(out)
                else:
                    _sliced_tensors_load(out)
                    with quiet():
                        model = load_sliced(out)
                got = logits(model)
                if not torch.isfinite(got).all():
                    raise Failed("the sliced model's logits are not finite")
                if sparsity == "0":
                    compare(got, want, "logits at 0% sparsity")
            except Failed as e:
                raise Failed(f"at {float(sparsity):.0%}: {e}") from e
            except Exception as e:  # load_sliced's SpliceError or a crash in the forward pass
                first = str(e).strip().splitlines()[0] if str(e).strip() else ""
                raise Failed(f"at {float(sparsity):.0%}: {type(e).__name__}: {first}") from e

    return outcome_of(body)


def check_dataflow(family: str, work: Path) -> Outcome:
    """Evolve's live path model (the source modules run in the path's order, no copy) gives
    the logits of the same ``layer_path`` written by ``splice merge`` and loaded by
    transformers, and those are the logits of a reference whose layer j is the path's j-th."""

    def body() -> None:
        import yaml

        from splice.checkpoint import open_checkpoint
        from splice.evolve.dataflow import PathModels
        from splice.merge import MergeOptions
        from splice.resident import ResidentCheckpoint

        seeds = {0: source(family, work, 0), 1: source(family, work, 1)}
        steps = [{"model": str(seeds[s]), "layer": i, "scale": 1.0} for s, i in PATH]
        run = fresh(work, "evolve-dfs", family)
        recipe = run / "recipe.yml"
        recipe.write_text(yaml.safe_dump({"merge_method": "passthrough", "dtype": "float32",
                                          "base_model": str(seeds[0]), "layer_path": steps}))  # fmt: skip
        out = run / "out"
        run_cli(["merge", recipe, out, "--no-progress"])
        modules_kept(seeds[0], out, family)  # a multimodal model's other modules: the base's
        written = logits(load_checked(out))
        tensors = {s: read_tensors(seeds[s]) for s in seeds}
        text = text_of(seeds[0])
        body = text[0] if text else None
        ref_tensors = {n: t for n, t in tensors[0].items() if not layer_of(n, body)}
        for j, (s, i) in enumerate(PATH):
            for name, t in tensors[s].items():
                m = layer_of(name, body)
                if m and m[1] == i:
                    ref_tensors[f"{m[0]}.{j}.{m[2]}"] = t.clone()
        want_cfg = with_moe_placement(
            mapped_config(read_config(seeds[0]), [i for _, i in PATH]), read_config(out)
        )
        section = text_section(want_cfg)
        for key in per_layer_keys(section):  # each position's value from its own source
            section[key] = [text_section(read_config(seeds[s]))[key][i] for s, i in PATH]
        want = logits(load_checked(write_reference(run / "reference", want_cfg, ref_tensors),
                                   "reference"))  # fmt: skip
        distinct(want, logits(load_checked(seeds[0], "source")), "source")
        compare(written, want, "the written path's logits")
        try:
            with quiet():
                # as evolve opens its sources (splice.evolve.search._sources): a multimodal
                # folder as its language model, then held resident
                sources = {str(p): ResidentCheckpoint.of(open_checkpoint(p))
                           for p in seeds.values()}  # fmt: skip
                options = MergeOptions(show_progress=False)
                live = PathModels(sources, str(seeds[0]), options, "float32").build(steps)
                got = logits(live)
        except Exception as e:
            raise Failed(f"the live path model: {crash(e)} (the written path passed)") from e
        compare(got, want, "the live path model's logits")

    return outcome_of(body)


def check_collapse(family: str, work: Path) -> Outcome:
    """MoE families: ``--keep-experts E --prune`` (all of them) keeps the logits; a dense
    ``uniform`` collapse writes a model transformers loads (its numbers against identical
    experts are tests/test_collapse_families.py's). Dense families: not applicable."""
    text_family = MM[family]["text"] if family in MM else family
    if text_family not in families.MOE_FAMILIES and text_family != "qwen3_next":
        return Outcome("skipped", "not an MoE")

    def body() -> None:
        from splice.arch import ArchSpec

        src = source(family, work)
        run = fresh(work, "collapse", family)
        n = ArchSpec.load(text_family).num_experts(text_section(read_config(src)))
        base = ["--device", "cpu", "--threads", "1", "--dtype", "float32", "--no-progress"]
        text = calibration_file(work)
        calib = ["--calibration", text, "--seq-len", "24", "--max-samples", "8"]
        run_cli(["collapse", src, run / "all", "--keep-experts", n, "--prune", *calib, *base])
        modules_kept(src, run / "all", family)
        compare(logits(load_checked(run / "all")), logits(load_checked(src, "source")),
                "logits with every expert kept")  # fmt: skip
        run_cli(["collapse", src, run / "dense", "--method", "frequency", *calib, *base])
        modules_kept(src, run / "dense", family)
        load_checked(run / "dense")

    return outcome_of(body)


CHECKS: dict[str, Callable[[str, Path], Outcome]] = {
    "inspect": check_inspect,
    "merge": check_merge,
    "upscale": check_upscale,
    "prune": check_prune,
    "slice": check_slice,
    "collapse": check_collapse,
    "evolve-dfs": check_dataflow,
}


def redact(text: str, work: Path) -> str:
    """``text`` with the paths under ``work`` written as ``<source>`` / ``<output>`` /
    ``<work>``, so details read the same from run to run."""
    root = re.escape(str(Path(work)))
    text = re.sub(root + r"/sources/[^/\s:]+/seed\d+", "<source>", text)
    text = re.sub(root + r"/runs/[^\s:]*", "<output>", text)
    return text.replace(str(Path(work)), "<work>")


def check(family: str, verb: str, work: Path) -> Outcome:
    """``check_<verb>(family, work)``, its detail free of ``work``'s paths."""
    outcome = CHECKS[verb](family, work)
    return Outcome(outcome.status, redact(outcome.detail, work))
