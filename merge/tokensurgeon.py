"""Tokenizer transplant (``splice tokensurgeon``, mergekit-tokensurgeon's job): MODEL gets
DONOR's tokenizer.

The output's vocabulary is the donor's: its tokenizer files are copied, ``vocab_size`` becomes
the donor's row count (its embedding rows, or its tokenizer's size if larger) and the special
token ids of the config become the donor's. Every vocabulary-indexed tensor of MODEL (the
embedding ``[V, H]``, an untied head ``[V, H]`` and a head bias ``[V]``) is re-indexed to the
donor's ids with :func:`splice.merge.vocab.align_rows`; everything else is copied byte for byte.

Which rows are exact: a donor token the model also has keeps the model's row, bit for bit.
Tokens are the same when their strings are, with two normalisations mergekit also makes: the
special tokens of a role (``bos``, ``eos``, ``unk``, ``sep``, ``pad``, ``cls``, ``mask``) are
one token whatever their strings (``<s>`` and ``<bos>``), and a word-start marker is one
marker whatever its character (SentencePiece's ``▁``, byte-level BPE's ``Ġ``; read from the
tokenizer's pre-tokenizer or decoder). mergekit's optional prefix and byte matches are not made.

The donor tokens the model lacks are approximated by a method of :data:`METHODS`:

- ``omp``: orthogonal matching pursuit in the donor's embedding space. The token's donor row is
  written as a combination of ``k`` rows of shared tokens (picked greedily, each the one most
  correlated with what is left, the coefficients a least-squares fit on the picked rows), and
  the same coefficients combine the model's rows of those tokens. The head is done the same
  way with the donor's head rows (its embedding when the donor is tied).
- ``common_interpolation``: the ``k`` shared tokens nearest to the token in the donor's
  embedding space (Euclidean), weighted by inverse distance.
- ``subword``: the mean of the model's rows of the tokens the model's tokenizer makes of the
  token's text (zeros if it makes none).
- ``mean``: the mean of all the model's rows. ``zero``: zeros.

A donor row with no token (padding rows) is zeros, as is a new token's row under a method that
reads the donor's rows when the donor has no row for it. ``omp`` and ``common_interpolation``
need ``k`` shared tokens at least. Everything is computed in float32 and written in the model's
dtype; rows of new tokens go in batches of :data:`BATCH` (mergekit's default batch size), which
bounds the memory ``omp`` holds (``BATCH x`` shared tokens scores, ``BATCH x H x k`` bases).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from splice.checkpoint import Checkpoint, open_checkpoint
from splice.errors import SpliceError, first_line
from splice.execute import ExecOptions, Source, TensorTask
from splice.layerplan import LayerPlan, LayerRef
from splice.merge.vocab import align_rows, model_vocab
from splice.output import ModelPlan, write_model
from splice.registry import Registry
from splice.text import plural

if TYPE_CHECKING:
    import torch
    from tokenizers import Tokenizer

#: special-token roles, in the order a token with two roles takes the first (transformers')
ROLES = ("bos", "eos", "unk", "sep", "pad", "cls", "mask")
#: new tokens approximated at once (mergekit-tokensurgeon's ``--batch-size`` default)
BATCH = 512
#: ``--k`` default (mergekit's)
DEFAULT_K = 64

Key = str | tuple[str, str]  # a token as compared across vocabularies (see the module docstring)


# ---- which donor token gets which row -------------------------------------------------------
@dataclass(frozen=True)
class TokenMap:
    """Where each output row comes from. Output rows are the donor's ids, ``size`` of them.

    ``rows[i]``: the model's row for output row ``i`` (-1: none); ``new``: the output rows to
    approximate; ``targets[j]``: the donor's row of ``new[j]`` (-1: the donor has none);
    ``shared_donor`` / ``shared_model``: the donor's and the model's rows of every shared token,
    in donor id order; ``pieces[j]``: the model's ids for the text of ``new[j]`` (subword).
    """

    size: int
    rows: tuple[int, ...]
    new: tuple[int, ...]
    targets: tuple[int, ...]
    shared_donor: tuple[int, ...]
    shared_model: tuple[int, ...]
    pieces: tuple[tuple[int, ...], ...] = ()

    @property
    def exact(self) -> int:
        return len(self.shared_donor)


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise SpliceError(f"{path}: not readable JSON ({first_line(e)})") from None
    return data if isinstance(data, dict) else {}


def special_roles(folder: Path) -> dict[str, str]:
    """``{token: role}`` of a tokenizer folder's named special tokens (``tokenizer_config.json``
    and ``special_tokens_map.json``: ``bos_token`` ...), a token with two roles taking the
    first of :data:`ROLES`."""
    found: dict[str, str] = {}
    for fname in ("special_tokens_map.json", "tokenizer_config.json"):
        data = _read_json(folder / fname)
        for role in ROLES:
            value = data.get(f"{role}_token")
            if isinstance(value, dict):
                value = value.get("content")
            if isinstance(value, str) and value:
                found.setdefault(role, value)
    roles: dict[str, str] = {}
    for role in ROLES:
        if role in found:
            roles.setdefault(found[role], role)
    return roles


def special_tokens(folder: Path) -> list[str]:
    """Every special token a tokenizer folder's config names (the roles' tokens,
    ``additional_special_tokens``, ``added_tokens_decoder``): what transformers' tokenizer
    registers, so that their strings in a text are those tokens."""
    found = list(special_roles(folder))
    for fname in ("special_tokens_map.json", "tokenizer_config.json"):
        data = _read_json(folder / fname)
        extra = data.get("additional_special_tokens") or []
        decoder = data.get("added_tokens_decoder") or {}
        extra = list(extra) + list(decoder.values() if isinstance(decoder, dict) else [])
        for value in extra:
            value = value.get("content") if isinstance(value, dict) else value
            if isinstance(value, str) and value and value not in found:
                found.append(value)
    return found


def word_marker(spec: dict[str, Any]) -> str | None:
    """The word-start character of a ``tokenizer.json``: Metaspace's replacement (``▁``) or
    byte-level BPE's ``Ġ``; ``None`` when its pre-tokenizer and decoder use neither."""
    stack = [spec.get("pre_tokenizer"), spec.get("decoder")]
    while stack:
        node = stack.pop()
        if not isinstance(node, dict):
            continue
        if node.get("type") == "Metaspace":
            return str(node.get("replacement", "▁"))
        if node.get("type") == "ByteLevel":
            return "Ġ"
        stack += node.get("pretokenizers", []) + node.get("decoders", [])
    return None


def _load_tokenizer(folder: Path, what: str) -> tuple[Tokenizer, dict[str, Any]]:
    from tokenizers import Tokenizer

    path = folder / "tokenizer.json"
    if not path.is_file():
        raise SpliceError(
            f"{what} {folder}: no tokenizer.json (a fast tokenizer's file is needed to read "
            "its vocabulary)"
        )
    try:
        return Tokenizer.from_file(str(path)), json.loads(path.read_text(encoding="utf-8"))
    except Exception as e:  # tokenizers raises plain Exceptions for a bad file
        raise SpliceError(f"{path}: not a readable tokenizer ({first_line(e)})") from None


def token_keys(vocab: Mapping[str, int], folder: Path, spec: dict[str, Any]) -> dict[Key, int]:
    """``{key: id}`` of a vocabulary: a named special token is ``("special", role)``, a token
    starting with the word-start marker ``("word", rest)``, any other token itself."""
    roles = special_roles(folder)
    marker = word_marker(spec)
    keys: dict[Key, int] = {}
    for token, i in sorted(vocab.items(), key=lambda kv: kv[1]):
        key: Key = token
        if token in roles:
            key = ("special", roles[token])
        elif marker and token.startswith(marker) and len(token) > len(marker):
            key = ("word", token[len(marker) :])
        keys.setdefault(key, i)
    return keys


def token_text(tok: Tokenizer, token: str, added: set[str] | None = None) -> str:
    """The text a token stands for inside a text, as the tokenizer's decoder writes it
    (``▁the`` and ``Ġthe`` -> `` the``; an added token: its content). ``added``: the
    tokenizer's added tokens, if the caller has them already."""
    if added is None:
        added = {a.content for a in tok.get_added_tokens_decoder().values()}
    if token in added or tok.decoder is None:
        return token
    lead = tok.decoder.decode(["a"])
    both = tok.decoder.decode(["a", token])
    return both[len(lead) :] if both.startswith(lead) else token


def map_tokens(
    model: Checkpoint, donor: Checkpoint, *, pieces: bool = False, donor_rows: int | None = None
) -> TokenMap:
    """The :class:`TokenMap` of transplanting ``donor``'s tokenizer onto ``model``;
    ``pieces``: also tokenize each new token's text with the model's tokenizer (subword).
    ``donor_rows``: the donor's embedding rows (default: read from its checkpoint)."""
    model_tok, model_spec = _load_tokenizer(model.path, "MODEL")
    donor_tok, donor_spec = _load_tokenizer(donor.path, "DONOR")
    ours = model_vocab(model) or {}
    theirs = donor_tok.get_vocab(True)
    if not theirs:
        raise SpliceError(f"DONOR {donor.path}: its tokenizer has no tokens")
    rows_d = donor[donor.arch.embed].shape[0] if donor_rows is None else donor_rows
    size = max(rows_d, max(theirs.values()) + 1)
    mine = token_keys(ours, model.path, model_spec)
    keys = token_keys(theirs, donor.path, donor_spec)
    rows = [-1] * size
    new: list[int] = []
    shared: list[tuple[int, int]] = []
    for key, i in sorted(keys.items(), key=lambda kv: kv[1]):
        if key in mine:
            rows[i] = mine[key]
            shared.append((i, mine[key]))
        else:
            new.append(i)
    text_of = {i: t for t, i in theirs.items()}
    split: list[tuple[int, ...]] = []
    if pieces:
        from tokenizers import AddedToken

        model_tok.add_special_tokens(
            [AddedToken(t, special=True, normalized=False) for t in special_tokens(model.path)]
        )
        limit = model[model.arch.embed].shape[0]
        added = {a.content for a in donor_tok.get_added_tokens_decoder().values()}
        texts = [token_text(donor_tok, text_of[i], added) for i in new]
        for enc in model_tok.encode_batch(texts, add_special_tokens=False):
            split.append(tuple(j for j in enc.ids if j < limit))
    return TokenMap(
        size=size,
        rows=tuple(rows),
        new=tuple(new),
        targets=tuple(i if i < rows_d else -1 for i in new),
        shared_donor=tuple(d for d, _ in shared),
        shared_model=tuple(m for _, m in shared),
        pieces=tuple(split),
    )


# ---- the approximations: pure tensor functions ----------------------------------------------
def omp(targets: torch.Tensor, atoms: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Orthogonal matching pursuit of each row of ``targets`` ``[B, D]`` over the rows of
    ``atoms`` ``[N, D]``: ``(index [B, k], coef [B, k])`` with ``targets ~ coef @ atoms[index]``.

    Each step picks the atom with the largest ``|<residual, atom>|`` not yet picked (the first
    on a tie), extends an orthonormal basis of the picked atoms by Gram-Schmidt (``Q R = A``),
    and makes the residual the target minus its projection on that basis; the coefficients
    solve ``R coef = Qᵀ target``.
    """
    import torch

    b, d = targets.shape
    q = targets.new_zeros(b, d, k)
    r = targets.new_zeros(b, k, k)
    index = torch.zeros(b, k, dtype=torch.long, device=targets.device)
    taken = torch.zeros(b, atoms.shape[0], dtype=torch.bool, device=targets.device)
    batch = torch.arange(b, device=targets.device)
    residual = targets
    for t in range(k):
        score = (residual @ atoms.T).abs().masked_fill(taken, float("-inf"))
        pick = score.max(dim=1).indices
        index[:, t] = pick
        taken[batch, pick] = True
        atom = atoms[pick]  # [B, D]
        if t == 0:
            r[:, 0, 0] = atom.norm(dim=1)
            q[:, :, 0] = atom / r[:, 0, 0].clamp(min=1e-8).unsqueeze(1)
        else:
            proj = torch.bmm(q[:, :, :t].transpose(1, 2), atom.unsqueeze(-1)).squeeze(-1)
            rest = atom - torch.bmm(q[:, :, :t], proj.unsqueeze(-1)).squeeze(-1)
            norm = rest.norm(dim=1).clamp(min=1e-8)
            r[:, :t, t] = proj
            r[:, t, t] = norm
            q[:, :, t] = rest / norm.unsqueeze(-1)
        basis = q[:, :, : t + 1]
        along = torch.bmm(basis.transpose(1, 2), targets.unsqueeze(-1))
        residual = targets - torch.bmm(basis, along).squeeze(-1)
    qt = torch.bmm(q.transpose(1, 2), targets.unsqueeze(-1))
    coef = torch.linalg.solve_triangular(r, qt, upper=True).squeeze(-1)
    return index, coef


def nearest(
    targets: torch.Tensor, atoms: torch.Tensor, k: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` rows of ``atoms`` ``[N, D]`` nearest (Euclidean) to each row of ``targets``
    ``[B, D]`` and their inverse-distance weights summing to 1: ``(index, weight)``, ``[B, k]``."""
    import torch

    dist = torch.cdist(targets, atoms)
    near, index = torch.topk(dist, k, dim=1, largest=False)
    weight = 1.0 / near.clamp(min=1e-6)
    return index, weight / weight.sum(dim=1, keepdim=True).clamp(min=1e-6)


@dataclass(frozen=True)
class Method:
    """An approximation: ``fn(orig [V, H], donor [V_d, H_d] | None, tokens, k) -> [n, H]``
    for the ``n`` new tokens of ``tokens``; ``reads_donor``: it needs the donor's rows."""

    fn: Callable[..., torch.Tensor]
    reads_donor: bool = False


METHODS: Registry[Method] = Registry("token approximation method")


def _combine(index: torch.Tensor, coef: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """``Σ_j coef[b, j] · rows[index[b, j]]`` for every ``b``: ``[B, H]``."""
    import torch

    return torch.bmm(coef.unsqueeze(1), rows[index]).squeeze(1)


def _sparse(
    solve: Callable[[torch.Tensor, torch.Tensor, int], tuple[torch.Tensor, torch.Tensor]],
) -> Callable[..., torch.Tensor]:
    """A method that writes each donor row over the shared donor rows with ``solve`` and
    applies the same weights to the model's rows of those tokens."""

    def approximate(
        orig: torch.Tensor, donor: torch.Tensor | None, tokens: TokenMap, k: int
    ) -> torch.Tensor:
        import torch

        assert donor is not None
        out = orig.new_zeros(len(tokens.new), orig.shape[1])
        have = [j for j, row in enumerate(tokens.targets) if row >= 0]
        atoms = donor[list(tokens.shared_donor)]
        theirs = orig[list(tokens.shared_model)]
        for start in range(0, len(have), BATCH):
            part = have[start : start + BATCH]
            targets = donor[[tokens.targets[j] for j in part]]
            index, coef = solve(targets, atoms, k)
            out[torch.tensor(part, dtype=torch.long)] = _combine(index, coef, theirs)
        return out

    return approximate


METHODS.register("omp")(Method(_sparse(omp), reads_donor=True))
METHODS.register("common_interpolation")(Method(_sparse(nearest), reads_donor=True))


def _subword(orig: torch.Tensor, donor: Any, tokens: TokenMap, k: int) -> torch.Tensor:
    out = orig.new_zeros(len(tokens.new), orig.shape[1])
    for j, ids in enumerate(tokens.pieces):
        if ids:
            out[j] = orig[list(ids)].sum(dim=0) / len(ids)
    return out


def _mean(orig: torch.Tensor, donor: Any, tokens: TokenMap, k: int) -> torch.Tensor:
    return orig.mean(dim=0).expand(len(tokens.new), -1)


def _zero(orig: torch.Tensor, donor: Any, tokens: TokenMap, k: int) -> torch.Tensor:
    return orig.new_zeros(len(tokens.new), orig.shape[1])


METHODS.register("subword")(Method(_subword))
METHODS.register("mean")(Method(_mean))
METHODS.register("zero")(Method(_zero))


# ---- the plan -------------------------------------------------------------------------------
@dataclass(frozen=True)
class Transplant:
    """``compute`` of one vocabulary-indexed tensor: the model's ``[V, *rest]`` (then the
    donor's ``[V_d, H_d]`` for a method that reads it) -> ``[size, *rest]``: shared tokens'
    rows copied, new tokens' rows by ``method`` (``None``: zeros, for a head bias)."""

    tokens: TokenMap = field(repr=False)
    method: str | None
    k: int

    def __call__(self, tensors: list[torch.Tensor]) -> torch.Tensor:
        (out,) = align_rows(tensors[:1], [self.tokens.rows], None)
        if self.method is not None and self.tokens.new:
            m = METHODS.get(self.method)
            donor = tensors[1] if m.reads_donor else None
            new = m.fn(tensors[0], donor, self.tokens, self.k)
            out[list(self.tokens.new)] = new.to(out.dtype)
        return out


@dataclass
class TokenSurgeonResult:
    """A planned transplant: the :class:`ModelPlan`, its :class:`TokenMap`, and where it went."""

    plan: ModelPlan
    tokens: TokenMap
    method: str
    k: int
    model: str
    donor: str
    out: Path | None = None

    def to_dict(self) -> dict[str, Any]:
        t = self.tokens
        return {
            "model": self.model,
            "donor": self.donor,
            "method": self.method,
            "k": self.k,
            "vocab_size": t.size,
            "exact": t.exact,
            "approximated": len(t.new),
            "empty_rows": t.size - t.exact - len(t.new),
            "out": str(self.out) if self.out is not None else None,
        }

    def summary(self) -> str:
        d = self.to_dict()
        k = f", k={self.k}" if METHODS.get(self.method).reads_donor else ""
        return (
            f"tokenizer of {self.donor} on {self.model}: {d['vocab_size']} rows, "
            f"{d['exact']} shared tokens kept exactly, {d['approximated']} new by "
            f"{self.method}{k}"
            + (f", {d['empty_rows']} without a token (zeros)" if d["empty_rows"] else "")
        )

    def describe(self) -> str:
        """The summary and the tensors computed (every other tensor is a copy)."""
        lines = [self.summary()]
        for t in self.plan.tasks:
            if t.compute is not None:
                lines.append(f"  {t.name:<50} {list(t.shape)!s:<14} {t.dtype:<9} {t.label}")
        lines.append(f"  {plural(len(self.plan.tasks), 'tensor')} in all, the rest copied")
        return "\n".join(lines)


def _check_k(k: Any) -> int:
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise SpliceError(f"k must be a whole number of 1 or more, got {k!r}")
    return k


def _open(ref: str | os.PathLike[str] | Checkpoint, what: str, allow_pickle: bool) -> Checkpoint:
    if isinstance(ref, Checkpoint):
        return ref
    try:
        return open_checkpoint(ref, allow_pickle=allow_pickle)
    except SpliceError as e:
        raise SpliceError(f"{what}: {e}") from None


def _token_ids(model: Checkpoint, donor: Checkpoint, tok: Tokenizer) -> dict[str, Any]:
    """The config's special token ids for the donor's vocabulary: the donor's config's, else
    its tokenizer's token of that role (``None`` if it has none), for every ``*_token_id``
    either config has."""
    by_role = {role: tok.token_to_id(t) for t, role in special_roles(donor.path).items()}
    out: dict[str, Any] = {}
    for role in ROLES:
        key = f"{role}_token_id"
        if key in donor.config:
            out[key] = donor.config[key]
        elif key in model.config:
            out[key] = by_role.get(role)
    return out


def plan_tokensurgeon(
    model: str | os.PathLike[str] | Checkpoint,
    donor: str | os.PathLike[str] | Checkpoint,
    *,
    method: str = "omp",
    k: int = DEFAULT_K,
    allow_pickle: bool = False,
) -> TokenSurgeonResult:
    """The output of giving ``model`` the tokenizer of ``donor`` (see the module docstring),
    planned: every input checked, no tensor read."""
    approx = METHODS.get(method)
    k = _check_k(k)
    ours = _open(model, "MODEL", allow_pickle)
    theirs = _open(donor, "DONOR", allow_pickle)
    spec, dspec = ours.arch, theirs.arch
    spec.refuse("vocab")
    if spec.embed not in ours:
        raise SpliceError(f"MODEL {ours.path}: no embedding tensor {spec.embed}")
    donor_embed = dspec.embed if dspec.embed in theirs else None
    if approx.reads_donor and donor_embed is None:
        raise SpliceError(
            f"DONOR {theirs.path}: no embedding tensor {dspec.embed}, which --method {method} "
            "reads (subword, mean and zero do not)"
        )
    rows_d = theirs[donor_embed].shape[0] if donor_embed else 0
    tokens = map_tokens(ours, theirs, pieces=method == "subword", donor_rows=rows_d)
    if approx.reads_donor and tokens.new and k > tokens.exact:
        raise SpliceError(
            f"--method {method} takes k={k} shared tokens per new one, but MODEL and DONOR "
            f"share {plural(tokens.exact, 'token')} (give a smaller -k)"
        )
    models = {"model": ours, "donor": theirs}
    layers = LayerPlan(tuple(LayerRef("model", i) for i in ours.layer_index), "model", "model")
    rows = ours[spec.embed].shape[0]
    donor_head = dspec.lm_head if dspec.lm_head in theirs else donor_embed
    tasks = []
    for t in layers.tasks(models):
        name = t.sources[0].name
        info = ours[name]
        weight = name in (spec.embed, spec.lm_head)
        if not (
            weight or (spec.parse(name).group in ("embed", "head") and info.shape[:1] == (rows,))
        ):
            tasks.append(t)
            continue
        sources = (Source("model", name),)
        if weight and approx.reads_donor:
            sources += (Source("donor", donor_embed if name == spec.embed else donor_head),)
        tasks.append(
            TensorTask(
                name=t.name,
                shape=(tokens.size, *info.shape[1:]),
                dtype=info.dtype,
                sources=sources,
                compute=Transplant(tokens, method if weight else None, k),
                load_dtype="float32",
                label=f"model:{name} re-indexed to DONOR's vocabulary, "
                + (f"new tokens by {method}" if weight else "new tokens zero"),
            )
        )
    read = {s.name for t in tasks for s in t.sources if s.model == "donor"}
    config = layers.config(models)
    config["vocab_size"] = tokens.size
    config.update(_token_ids(ours, theirs, _load_tokenizer(theirs.path, "DONOR")[0]))
    plan = ModelPlan(
        tasks=tasks,
        models=models,
        config=config,
        tokenizer_from="donor",
        card=_card(ours, theirs, tokens, method, k),
        removed={
            "donor": {n: "DONOR gives its tokenizer" for n in theirs.tensors if n not in read}
        },
    )
    return TokenSurgeonResult(plan, tokens, method, k, str(ours.path), str(theirs.path))


def _card(model: Checkpoint, donor: Checkpoint, tokens: TokenMap, method: str, k: int) -> str:
    from splice.card import model_card

    how = f"`{method}`" + (f" (k={k})" if METHODS.get(method).reads_donor else "")
    details = (
        f"The tokenizer of `{donor.path}` transplanted onto `{model.path}`: "
        f"{tokens.exact} shared tokens keep their rows exactly, {len(tokens.new)} new tokens "
        f"are approximated by {how}; all other tensors are copies."
    )
    return model_card(
        "Tokenizer transplant",
        [str(model.path), str(donor.path)],
        details=details,
        tags=["tokensurgeon"],
    )


def tokensurgeon(
    model: str | os.PathLike[str] | Checkpoint,
    donor: str | os.PathLike[str] | Checkpoint,
    out: str | os.PathLike[str] | None,
    *,
    method: str = "omp",
    k: int = DEFAULT_K,
    dry_run: bool = False,
    options: ExecOptions | None = None,
    allow_pickle: bool = False,
) -> TokenSurgeonResult:
    """Write ``model`` with ``donor``'s tokenizer to ``out`` (atomically; nothing is written on
    a refusal); with ``dry_run`` only plan it. Returns the :class:`TokenSurgeonResult`."""
    result = plan_tokensurgeon(model, donor, method=method, k=k, allow_pickle=allow_pickle)
    if dry_run:
        return result
    if out is None:
        raise SpliceError("give an output folder OUT (or --dry-run)")
    return replace(result, out=write_model(result.plan, out, options))


__all__ = [
    "METHODS",
    "Method",
    "TokenMap",
    "TokenSurgeonResult",
    "Transplant",
    "map_tokens",
    "nearest",
    "omp",
    "plan_tokensurgeon",
    "special_roles",
    "token_keys",
    "token_text",
    "tokensurgeon",
    "word_marker",
]
