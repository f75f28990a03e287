"""Batched greedy generation for a live causal LM: what lm-eval's ``generate_until`` needs, fast.

:func:`generate_greedy` continues token prompts greedily (the arg-max token at every step, as
transformers' ``generate`` does without sampling) and returns each prompt's new tokens. Each
prompt has its own ``max_new_tokens`` and stop strings (:class:`GenRequest`), so requests with
different generation settings share batches. The prompts run in left-padded batches sorted by
length (longest first, as lm-eval sorts them), bounded by rows and by tokens; a row ends at an
EOS id, at ``max_new_tokens`` or when a stop string appears in its decoded tail, which is
checked exactly as lm-eval's stopping criterion checks it (the last ``len(encode(stop)) + 2``
new tokens decoded, special tokens kept), and a batch ends when all its rows have.

Faster than ``generate`` (the model's own forward pass, called with the inputs ``generate``
gives it: positions counted over real tokens, a 2-D mask only where there is padding, the
last position's logits only), by doing less around it:

* the KV cache is transformers' ``DynamicCache`` whose plain layers write into a buffer sized
  for the batch at once (the same keys and values, no growing ``torch.cat`` at every step);
* a prefix that every prompt of a batch shares (an instruction, fixed few-shot examples) is
  run once and its keys and values copied to every row; each row's own part then follows
  after its padding (``[prefix | pads | own tokens]``, the pads masked, positions counted
  over real tokens only, so the model sees what it would see unpadded). Only where every
  cache layer is a plain one (no sliding window, no recurrent state) and the forward takes
  ``position_ids``; elsewhere batches are plain left-padded ones, as in ``generate``;
* rows that finished are dropped from the batch once half of them have;
* batches as large as the caller allows (:mod:`splice.lmeval` sizes them by tokens: see
  ``GENERATION_ROWS_FACTOR``), which on a small model is most of the gain;
* on a CUDA out-of-memory error a batch is halved and run again.

Padding, batch size and the shared prefix change float rounding (not the maths), so a
near-tie between two tokens can in principle break the other way than in another batching;
``generate`` itself differs between batch sizes in the same way. Greedy only: sampling is
lm-eval's path (:class:`splice.lmeval.LmEvalScorer` sends such requests there).
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

#: a prefix shared by a batch's prompts is run once when it saves at least this many tokens
#: of prefill ((rows - 1) * prefix length): below it the extra forward pass costs more
SHARE_MIN_TOKENS = 128


@dataclass(frozen=True)
class GenRequest:
    """One prompt to continue: its token ids (no padding; at least one), the most tokens to
    generate, and the strings that end it (matched as lm-eval matches them)."""

    ids: Sequence[int]
    max_new_tokens: int
    until: tuple[str, ...] = ()


def generate_greedy(
    model: torch.nn.Module,
    requests: Sequence[GenRequest],
    *,
    tokenizer: Any = None,
    eos_token_ids: Collection[int] = (),
    pad_token_id: int = 0,
    batch_size: int = 32,
    max_batch_tokens: int | None = None,
    share_prefix: bool = True,
    device: Any = None,
) -> list[list[int]]:
    """Each request's greedy continuation: its new token ids, in request order, the EOS id or
    the tokens of the stop string that ended it included (decode and cut them as lm-eval does).

    ``tokenizer`` (a transformers tokenizer: ``encode``, ``batch_decode``) decodes the rows'
    tails for stop strings; needed only where a request has any. ``eos_token_ids`` end a row
    (transformers' ``generate`` takes the model's ``generation_config.eos_token_id``);
    ``pad_token_id`` fills the padding (masked; any id the embedding has). A batch holds at
    most ``batch_size`` rows and, with ``max_batch_tokens``, at most that many tokens
    (rows x (longest prompt + most new tokens)). ``share_prefix`` runs a prefix common to a
    batch's prompts once (:data:`SHARE_MIN_TOKENS`). ``device``: where the inputs go (default:
    the model's first parameter's). Runs under ``torch.no_grad``, as ``generate`` does.
    """
    import torch

    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, not {batch_size}")
    for r in requests:
        if len(r.ids) == 0:
            raise ValueError("a prompt needs at least one token")
        if r.until and tokenizer is None:
            raise ValueError("stop strings need a tokenizer to decode the generated tokens")
    if device is None:
        device = next(model.parameters()).device
    gen = _Generator(model, tokenizer, eos_token_ids, pad_token_id, share_prefix, device)
    out: list[list[int]] = [[] for _ in requests]
    todo = [i for i, r in enumerate(requests) if r.max_new_tokens > 0]
    with torch.no_grad():
        for rows in batches(requests, todo, batch_size, max_batch_tokens):
            for i, ids in zip(rows, gen.run_safely([requests[i] for i in rows]), strict=True):
                out[i] = ids
    return out


def batches(
    requests: Sequence[GenRequest],
    todo: Sequence[int],
    batch_size: int,
    max_batch_tokens: int | None = None,
) -> list[list[int]]:
    """The indices ``todo`` of ``requests`` in batches: sorted by prompt length, longest first
    (ties in request order), each of at most ``batch_size`` rows and, with
    ``max_batch_tokens``, rows x (its longest prompt + its most new tokens) <= the budget
    (a batch has one row at least)."""
    order = sorted(todo, key=lambda i: (-len(requests[i].ids), i))
    out: list[list[int]] = []
    rows: list[int] = []
    longest = most = 0
    for i in order:
        r = requests[i]
        width = max(longest, len(r.ids)) + max(most, r.max_new_tokens)
        full = len(rows) >= batch_size or (
            max_batch_tokens is not None and (len(rows) + 1) * width > max_batch_tokens
        )
        if rows and full:
            out.append(rows)
            rows, longest, most = [], 0, 0
        rows.append(i)
        longest, most = max(longest, len(r.ids)), max(most, r.max_new_tokens)
    if rows:
        out.append(rows)
    return out


def shared_prefix(prompts: Sequence[Sequence[int]]) -> int:
    """The length of the longest prefix all ``prompts`` share, short of the shortest prompt
    (every row keeps a token of its own, whose logits give its first new token)."""
    shortest = min(len(p) for p in prompts)
    n = 0
    first = prompts[0]
    while n < shortest - 1 and all(p[n] == first[n] for p in prompts):
        n += 1
    return n


@functools.cache
def _buffered_layer() -> type | None:
    """A ``DynamicLayer`` writing into a buffer of a fixed capacity (set before first use),
    returning views of the filled part: the keys and values ``DynamicLayer`` returns, without
    the ``torch.cat`` per step. None where transformers has no ``DynamicLayer`` (< 4.56)."""
    try:
        from transformers.cache_utils import DynamicLayer
    except ImportError:
        return None

    class BufferedLayer(DynamicLayer):  # type: ignore[misc,valid-type]
        capacity = 0

        def lazy_initialization(self, key_states: Any, value_states: Any) -> None:
            super().lazy_initialization(key_states, value_states)
            b, h, _, d = key_states.shape
            self._k = key_states.new_empty((b, h, self.capacity, d))
            self._v = value_states.new_empty((b, h, self.capacity, value_states.shape[-1]))
            self._n = 0

        def update(self, key_states: Any, value_states: Any, *args: Any, **kwargs: Any) -> Any:
            if not self.is_initialized:
                self.lazy_initialization(key_states, value_states)
            end = self._n + key_states.shape[-2]
            if end > self.capacity:
                raise RuntimeError(f"KV buffer of {self.capacity} positions overflows")
            self._k[:, :, self._n : end] = key_states
            self._v[:, :, self._n : end] = value_states
            self._n = end
            self.keys, self.values = self._k[:, :, :end], self._v[:, :, :end]
            return self.keys, self.values

        def seed(self, keys: Any, values: Any, rows: int) -> None:
            """Start from ``keys``/``values`` (1, heads, n, dim) repeated over ``rows``."""
            shape = (rows, keys.shape[1], 0, keys.shape[-1])
            self.lazy_initialization(keys.new_empty(shape), values.new_empty(shape))
            self.update(keys.expand(rows, -1, -1, -1), values.expand(rows, -1, -1, -1))

        def keep_rows(self, rows: Any) -> None:
            self._k, self._v = self._k[rows], self._v[rows]
            self.keys, self.values = self._k[:, :, : self._n], self._v[:, :, : self._n]

    return BufferedLayer


class _Generator:
    """One model's forward conventions (how it takes the cache, positions, logits to keep)
    and the batch loop."""

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        eos: Collection[int],
        pad: int,
        share_prefix: bool,
        device: Any,
    ) -> None:
        self.model, self.tokenizer, self.device = model, tokenizer, device
        self.eos, self.pad = frozenset(int(e) for e in eos), int(pad)
        params = inspect.signature(model.forward).parameters
        self.cache_key = "cache" if "cache" in params else "past_key_values"
        self.positions = "position_ids" in params
        self.keep_key = next(
            (k for k in ("logits_to_keep", "num_logits_to_keep") if k in params), None
        )
        self.buffered = self._layers_plain()
        self.share = share_prefix and self.buffered and self.positions
        self._windows: dict[str, int] = {}

    # ---- the cache -------------------------------------------------------------------------
    def _new_cache(self) -> Any:
        from transformers import DynamicCache

        config = getattr(self.model, "config", None)
        try:
            return DynamicCache(config=config) if config is not None else DynamicCache()
        except TypeError:  # transformers < 4.56: no config argument
            return DynamicCache()

    def _layers_plain(self) -> bool:
        """Whether every layer of the model's ``DynamicCache`` is a plain ``DynamicLayer`` (no
        sliding window, no recurrent state): those layers are swapped for buffered ones."""
        layer = _buffered_layer()
        if layer is None:
            return False
        from transformers.cache_utils import DynamicLayer

        layers = getattr(self._new_cache(), "layers", None)
        return bool(layers) and all(type(x) is DynamicLayer for x in layers)

    def cache(self, capacity: int) -> Any:
        """A ``DynamicCache``; with plain layers, buffered ones holding ``capacity`` positions."""
        cache = self._new_cache()
        if self.buffered:
            layer = _buffered_layer()
            assert layer is not None
            cache.layers = [layer() for _ in cache.layers]
            for x in cache.layers:
                x.capacity = capacity
        return cache

    # ---- one forward pass ------------------------------------------------------------------
    def forward(self, ids: torch.Tensor, mask: Any, positions: Any, cache: Any) -> torch.Tensor:
        """The last position's logits (rows, vocab) of ``ids`` (rows, n) after ``cache``;
        ``mask`` (rows, cached + n) or None (no padding); ``positions`` (rows, n)."""
        kw: dict[str, Any] = {self.cache_key: cache, "use_cache": True}
        if mask is not None:
            kw["attention_mask"] = mask
        if self.positions:
            kw["position_ids"] = positions
        if self.keep_key is not None:
            kw[self.keep_key] = 1
        return self.model(input_ids=ids, **kw).logits[:, -1]

    # ---- stop strings ----------------------------------------------------------------------
    def window(self, stop: str) -> int:
        """lm-eval's look-back for ``stop``: its token count + 2."""
        if stop not in self._windows:
            self._windows[stop] = len(self.tokenizer.encode(stop, add_special_tokens=False)) + 2
        return self._windows[stop]

    def stopped(self, tails: dict[int, list[int]], until: dict[int, tuple[str, ...]]) -> set[int]:
        """The rows among ``tails`` (row -> new tokens) whose last tokens, decoded as lm-eval's
        stopping criterion decodes them, hold one of their stop strings."""
        done: set[int] = set()
        checks: dict[int, list[tuple[int, str]]] = {}
        for row in tails:
            for stop in until[row]:
                checks.setdefault(self.window(stop), []).append((row, stop))
        for width, pairs in checks.items():
            rows = list(dict.fromkeys(r for r, _ in pairs))
            texts = dict(
                zip(
                    rows,
                    self.tokenizer.batch_decode([tails[r][-width:] for r in rows]),
                    strict=True,
                )
            )
            done.update(r for r, stop in pairs if stop in texts[r])
        return done

    # ---- a batch ---------------------------------------------------------------------------
    def run_safely(self, reqs: list[GenRequest]) -> list[list[int]]:
        """:meth:`run`; on a CUDA out-of-memory error, each half of the batch on its own."""
        import torch

        oom = getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)
        try:
            return self.run(reqs)
        except oom:
            if len(reqs) == 1:
                raise
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        half = len(reqs) // 2
        return self.run_safely(reqs[:half]) + self.run_safely(reqs[half:])

    def run(self, reqs: list[GenRequest]) -> list[list[int]]:
        """The batch's new tokens per request. Tensors: ``ids`` (rows, width) left-padded
        prompts (after the shared prefix), ``mask`` (rows, prefix + width + steps) 1 on real
        tokens, ``pos`` (rows, 1) the position of each row's last token."""
        import torch

        rows = len(reqs)
        prompts = [list(r.ids) for r in reqs]
        prefix = shared_prefix(prompts) if self.share and rows > 1 else 0
        if (rows - 1) * prefix < SHARE_MIN_TOKENS:
            prefix = 0
        own = [p[prefix:] for p in prompts]
        width = max(len(p) for p in own)
        steps = max(r.max_new_tokens for r in reqs)
        cache = self.cache(prefix + width + steps)
        dev = self.device
        if prefix:
            head = torch.tensor([prompts[0][:prefix]], device=dev)
            one = self.cache(prefix)
            self.forward(head, None, torch.arange(prefix, device=dev)[None], one)
            for layer, done in zip(cache.layers, one.layers, strict=True):
                layer.seed(done.keys, done.values, rows)
        ids = torch.full((rows, width), self.pad, dtype=torch.long)
        mask = torch.zeros((rows, prefix + width), dtype=torch.long)
        mask[:, :prefix] = 1
        for r, p in enumerate(own):
            ids[r, width - len(p) :] = torch.tensor(p, dtype=torch.long)
            mask[r, prefix + width - len(p) :] = 1
        ids, mask = ids.to(dev), mask.to(dev)
        # transformers' positions: real tokens counted from 0, padding at 0
        positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)
        padded = bool((mask == 0).any())
        logits = self.forward(ids, mask if padded else None, positions[:, prefix:], cache)
        pos = positions[:, -1:]

        out: list[list[int]] = [[] for _ in reqs]
        live: list[int | None] = list(range(rows))  # each batch row's request; None: ended
        while True:
            nxt = logits.float().argmax(-1)
            check: dict[int, int] = {}  # request -> batch row, of rows to check for stops
            for b, tok in enumerate(nxt.tolist()):
                r = live[b]
                if r is None:
                    continue  # an ended row stays until the batch is compacted: not read
                out[r].append(tok)
                if tok in self.eos or len(out[r]) >= reqs[r].max_new_tokens:
                    live[b] = None
                elif reqs[r].until:
                    check[r] = b
            if check:
                tails = {r: out[r] for r in check}
                for r in self.stopped(tails, {r: reqs[r].until for r in check}):
                    live[check[r]] = None
            left = [b for b, r in enumerate(live) if r is not None]
            if not left:
                return out
            if self.buffered and 2 * len(left) <= len(live):
                index = torch.tensor(left, device=dev)
                for layer in cache.layers:
                    layer.keep_rows(index)
                nxt, pos = nxt[index], pos[index]
                mask = mask[index]
                live = [live[b] for b in left]
            pos = pos + 1
            if padded:
                mask = torch.cat([mask, mask.new_ones((mask.shape[0], 1))], dim=-1)
            logits = self.forward(nxt[:, None], mask if padded else None, pos, cache)
