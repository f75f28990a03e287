"""Merging models whose vocabularies differ: ``tokenizer_source`` / ``tokenizer:`` (mergekit's).

When a recipe names a tokenizer source (``base``, ``union`` or a model), the output vocabulary
is that tokenizer's (``union``: the base's, then the other models' tokens it lacks, ordinary
ones first, then added ones, each in the order of the models and of their ids; then the
recipe's ``tokenizer.tokens`` it still lacks), padded to ``pad_to_multiple_of`` rows. Every
vocabulary-indexed tensor (embeddings ``[V, H]``, an untied head ``[V, H]``) of every model is
re-indexed to it before the merge method runs. A row a model lacks is filled as mergekit does:
from the only model that has the token, else from the base model if it has it, else with the
mean over the models that have it, else zeros; a ``tokenizer.tokens`` entry with a source
replaces that rule for its token; padding rows are each model's mean row.

Vocabularies come from ``tokenizer.json`` (the ``tokenizers`` library); tokens with ids past a
model's embedding rows are ignored, and a model without a tokenizer.json is taken to share the
donor's vocabulary (as mergekit does). Without a tokenizer source nothing is re-indexed (the
donor's tokenizer is copied and vocabulary shapes must agree), and when every model has the
output's vocabulary and rows the merge runs as if none were given (kernel copies stay copies).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, NamedTuple

from splice.checkpoint import Checkpoint
from splice.errors import SpliceError
from splice.merge.recipe import TokenEmbedding, TokenFrom

if TYPE_CHECKING:
    import torch


PAD = -2  # a row past the vocabulary (pad_to_multiple_of): the model's mean row


@dataclass(frozen=True)
class FixedRow:
    """A configured source for one output token (``tokenizer.tokens``): ``model``'s original
    row ``row`` (``model`` None: zeros), for the models that lack the token, or for all of them
    (``force``)."""

    token: str
    model: str | None
    row: int
    force: bool


@dataclass(frozen=True)
class VocabPlan:
    """The output vocabulary: ``size`` rows; ``rows[model][i]`` is the model's row for output
    token ``i`` (-1: the model lacks it); ``files`` are tokenizer files written over the
    holder's (union or added tokens), empty when a tokenizer is copied as it is; ``fixed``:
    output row -> configured source."""

    size: int
    rows: Mapping[str, tuple[int, ...]]
    files: Mapping[str, str]
    fixed: Mapping[int, FixedRow] = field(default_factory=dict)


def _tokenizer_json(ckpt: Checkpoint) -> dict[str, Any]:
    path = ckpt.path / "tokenizer.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def _rows_of(ckpt: Checkpoint) -> int:
    return ckpt[ckpt.arch.embed].shape[0]


def model_vocab(ckpt: Checkpoint) -> dict[str, int] | None:
    """``{token: row}`` of a model: its tokenizer's tokens whose ids fit its embedding rows
    (``None`` without a ``tokenizer.json``)."""
    from tokenizers import Tokenizer

    path = ckpt.path / "tokenizer.json"
    if not path.is_file():
        return None
    vocab = Tokenizer.from_file(str(path)).get_vocab(True)
    return {t: i for t, i in vocab.items() if i < _rows_of(ckpt)}


def plan_vocab(
    source: str | None,
    donor: str,
    models: Mapping[str, Checkpoint],
    pad_to: int | None = None,
    tokens: Mapping[str, TokenEmbedding] | None = None,
) -> tuple[VocabPlan | None, str]:
    """The vocabulary plan for ``tokenizer_source`` and the model whose tokenizer files to copy.

    ``pad_to``: round the output rows up to a multiple of it; the extra rows are each model's
    mean row (as mergekit does). ``tokens``: tokens to add, and where rows come from for those
    that name a source (``tokenizer.tokens``). ``None`` when nothing needs re-indexing (no
    source, or every model has the same vocabulary and embedding rows as the output).
    """
    if source is None:
        return None, donor
    holder = donor if source in ("base", "union") else source
    found = {ref: model_vocab(ckpt) for ref, ckpt in models.items()}
    lacking = next((r for r in (holder, donor) if found[r] is None), None)
    if lacking is not None:
        if len({_rows_of(ckpt) for ckpt in models.values()}) == 1 and not (pad_to or tokens):
            return None, holder  # nothing to align by, and nothing needs it
        raise SpliceError(
            f"tokenizer source {source}: {lacking} has no tokenizer.json, which is needed to "
            "align vocabularies of different sizes, to pad or to add tokens"
        )
    # like mergekit, a model without a tokenizer is taken to share the donor's vocabulary
    donor_vocab = found[donor] or {}
    vocabs = {
        ref: v if v is not None else _fit(donor_vocab, _rows_of(models[ref]))
        for ref, v in found.items()
    }
    plain, added = _union_tokens(donor, models, vocabs) if source == "union" else ([], [])
    out = vocabs[holder]
    new = [t for t in tokens or {} if t not in out and t not in plain]  # added as plain tokens
    files: dict[str, str] = {}
    if plain or added or new:
        out, files = _extend(models[holder], plain + new, added)
    size = max(out.values(), default=-1) + 1
    padded = -(-size // pad_to) * pad_to if pad_to else size
    fixed = _fixed(tokens or {}, out, vocabs, models)
    same = all(vocabs[r] == out and _rows_of(models[r]) == padded == size for r in models)
    if same and not fixed:
        return None, holder
    rows = {
        ref: _rows(out, size, vocab) + (PAD,) * (padded - size) for ref, vocab in vocabs.items()
    }
    return VocabPlan(padded, rows, files, fixed), holder


def _fixed(
    tokens: Mapping[str, TokenEmbedding],
    out: dict[str, int],
    vocabs: dict[str, dict[str, int]],
    models: Mapping[str, Checkpoint],
) -> dict[int, FixedRow]:
    """Output row -> its configured source, for the ``tokenizer.tokens`` that name one."""
    fixed: dict[int, FixedRow] = {}
    for token, entry in tokens.items():
        src = entry.source
        if src is None:
            if entry.force:
                raise SpliceError(f"tokenizer.tokens[{token!r}]: force needs a source")
            continue  # only added to the vocabulary; missing rows follow the usual rule
        if isinstance(src, TokenFrom) and src.kind == "zero":
            fixed[out[token]] = FixedRow(token, None, -1, entry.force)
            continue
        model = src.model if isinstance(src, TokenFrom) else src
        assert model is not None
        if isinstance(src, TokenFrom) and src.token_id is not None:
            row = src.token_id
            if not 0 <= row < _rows_of(models[model]):
                raise SpliceError(
                    f"tokenizer.tokens[{token!r}]: token_id {row} is out of range for {model}"
                )
        else:
            wanted = src.token if isinstance(src, TokenFrom) else token
            if wanted not in vocabs[model]:
                raise SpliceError(f"tokenizer.tokens[{token!r}]: {model} has no token {wanted!r}")
            row = vocabs[model][wanted]
        fixed[out[token]] = FixedRow(token, model, row, entry.force)
    return fixed


def _fit(vocab: dict[str, int], rows: int) -> dict[str, int]:
    return {t: i for t, i in vocab.items() if i < rows}


def _rows(out: dict[str, int], size: int, vocab: dict[str, int]) -> tuple[int, ...]:
    rows = [-1] * size
    for token, i in out.items():
        rows[i] = vocab.get(token, -1)
    return tuple(rows)


def _union_tokens(
    donor: str, models: Mapping[str, Checkpoint], vocabs: dict[str, dict[str, int]]
) -> tuple[list[str], list[dict[str, Any]]]:
    """Tokens the donor lacks: ordinary ones, then added ones (their tokenizer.json specs),
    each in the order of the models and, within a model, of their ids."""
    known = vocabs[donor]
    plain: list[str] = []
    added: dict[str, dict[str, Any]] = {}
    for ref in [donor, *(r for r in models if r != donor)]:
        specs = {a["content"]: a for a in _tokenizer_json(models[ref]).get("added_tokens", [])}
        for token in sorted(vocabs[ref], key=vocabs[ref].__getitem__):
            if token in specs:
                added.setdefault(token, specs[token])
            elif token not in known and token not in plain:
                plain.append(token)
    plain = [t for t in plain if t not in added]
    return plain, [a for t, a in added.items() if t not in known]


_SPEC_KEYS = ("content", "lstrip", "normalized", "rstrip", "single_word", "special")


def _extend(
    holder: Checkpoint, plain: list[str], added: list[dict[str, Any]]
) -> tuple[dict[str, int], dict[str, str]]:
    """The holder's tokenizer with ``plain`` tokens, then ``added`` ones (tokenizer.json specs)
    appended: its vocabulary and its files (tokenizer.json, tokenizer_config.json)."""
    from tokenizers import AddedToken, Tokenizer

    tok = Tokenizer.from_file(str(holder.path / "tokenizer.json"))
    specs = [{"content": t, "special": False} for t in plain] + added
    for a in specs:
        token = AddedToken(
            a["content"],
            single_word=a.get("single_word", False),
            lstrip=a.get("lstrip", False),
            rstrip=a.get("rstrip", False),
            normalized=a.get("normalized", not a.get("special", False)),
            special=a.get("special", False),
        )
        (tok.add_special_tokens if a.get("special") else tok.add_tokens)([token])
    out = tok.get_vocab(True)
    files = {"tokenizer.json": tok.to_str(pretty=True)}
    config = holder.path / "tokenizer_config.json"
    if config.is_file():
        data = json.loads(config.read_text())
        decoder = data.setdefault("added_tokens_decoder", {})
        for a in specs:
            full = {"lstrip": False, "rstrip": False, "single_word": False, **a}
            full.setdefault("normalized", not full.get("special", False))
            decoder[str(out[a["content"]])] = {k: full[k] for k in _SPEC_KEYS}
        files["tokenizer_config.json"] = json.dumps(data, indent=2, ensure_ascii=False) + "\n"
    return out, files


class RowOverride(NamedTuple):
    """One output row a ``tokenizer.tokens`` entry sets instead of the fill rule: from input
    ``source`` (an index among the task's inputs; ``None``: zeros) at ``row``, for every model
    if ``force``."""

    out_row: int
    source: int | None
    row: int
    force: bool


def align_rows(
    tensors: Sequence[torch.Tensor],
    rows: Sequence[Sequence[int]],
    base: int | None,
    overrides: Sequence[RowOverride] = (),
) -> list[torch.Tensor]:
    """Each model's ``[V_m, *rest]`` tensor re-indexed to the output's ``[V, *rest]``.

    ``rows[m][i]`` is model m's row for output token i, -1 if it lacks it, or ``PAD`` past
    the vocabulary; ``base`` is the index of the base model among ``tensors`` (or None). A
    missing row takes the only model's row that has it, else the base's, else the mean of
    those that have it, else zeros; a ``PAD`` row is the mean of the model's aligned rows.
    ``overrides`` replace that rule for single tokens (:class:`RowOverride`).
    """
    import torch

    device = tensors[0].device
    index = torch.tensor(rows, dtype=torch.long, device=device)  # [M, V]
    present = index >= 0
    gathered = [t[index[m].clamp(min=0)] for m, t in enumerate(tensors)]  # [V, *rest] each
    shape = (-1,) + (1,) * (tensors[0].dim() - 1)
    mask = [present[m].reshape(shape) for m in range(len(tensors))]
    count = present.sum(0).reshape(shape)
    default = sum(torch.where(mk, g, 0) for mk, g in zip(mask, gathered, strict=True))
    default = default / count.clamp(min=1)
    if base is not None:
        default = torch.where(mask[base], gathered[base], default)
    for i, m, row, force in overrides:
        default[i] = 0 if m is None else tensors[m][row]
        if force:
            present[:, i] = False
    mask = [present[m].reshape(shape) for m in range(len(tensors))]
    out = [torch.where(mk, g, default) for mk, g in zip(mask, gathered, strict=True)]
    pad = index[0] == PAD  # the same for every model
    if bool(pad.any()):
        real = ~pad
        for t in out:
            t[pad] = t[real].mean(0)
    return out


@dataclass(frozen=True)
class ReindexVocab:
    """``compute`` for a vocabulary-indexed tensor (embeddings, head): re-index each input's
    rows to the output vocabulary, then merge them (``inner``: a method call) or take the
    first (passthrough)."""

    rows: tuple[tuple[int, ...], ...]
    base: int | None
    inner: Any = None
    overrides: tuple[RowOverride, ...] = ()

    def __call__(self, tensors: list[torch.Tensor]) -> torch.Tensor:
        aligned = align_rows(tensors, self.rows, self.base, self.overrides)
        return self.inner(aligned) if self.inner is not None else aligned[0]
