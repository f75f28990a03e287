"""Training loops of the zoo: batches from a token stream or from prompt/answer examples, and
AdamW with linear warm-up and cosine decay. CPU, deterministic for a given seed."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING

from splice.progress import progress
from splice.schedule import lr_at

if TYPE_CHECKING:
    import torch
    from tokenizers import Tokenizer

    from splice.zoo.corpus import Example

Batch = tuple["torch.Tensor", "torch.Tensor"]  # input_ids [B, T], labels [B, T] (-100: no loss)


def token_stream(tok: Tokenizer, texts: Sequence[str]) -> torch.Tensor:
    """``<bos> text <eos>`` for every text, concatenated: ``[N]`` int64."""
    import torch

    eos = tok.token_to_id("<eos>")
    ids: list[int] = []
    for enc in tok.encode_batch(list(texts)):
        ids += enc.ids
        ids.append(eos)
    return torch.tensor(ids, dtype=torch.long)


def stream_batches(stream: torch.Tensor, batch: int, seq: int, seed: int) -> Iterator[Batch]:
    """Random windows of ``seq`` tokens from ``stream``; every token is a target."""
    import torch

    g = torch.Generator().manual_seed(seed)
    offsets = torch.arange(seq)
    while True:
        starts = torch.randint(0, len(stream) - seq, (batch,), generator=g)
        ids = stream[starts[:, None] + offsets]
        yield ids, ids.clone()


def encode_examples(tok: Tokenizer, examples: Sequence[Example]) -> list[tuple[list[int], int]]:
    """``(ids, prompt_length)`` per example: ``<bos> prompt answer <eos>``."""
    eos = tok.token_to_id("<eos>")
    prompts = tok.encode_batch([e.prompt for e in examples])
    full = tok.encode_batch([e.prompt + e.answer for e in examples])
    out = []
    for p, f in zip(prompts, full, strict=True):
        if f.ids[: len(p.ids)] != p.ids:
            raise ValueError("a prompt's tokens are not a prefix of prompt + answer")
        out.append(([*f.ids, eos], len(p.ids)))
    return out


def example_batches(
    encoded: Sequence[tuple[list[int], int]], batch: int, seed: int, pad_id: int = 0
) -> Iterator[Batch]:
    """Random batches of examples, right-padded; loss only on the answer and its ``<eos>``."""
    import torch

    g = torch.Generator().manual_seed(seed)
    while True:
        picks = torch.randint(0, len(encoded), (batch,), generator=g).tolist()
        width = max(len(encoded[i][0]) for i in picks)
        ids = torch.full((batch, width), pad_id, dtype=torch.long)
        labels = torch.full((batch, width), -100, dtype=torch.long)
        for row, i in enumerate(picks):
            seq, n_prompt = encoded[i]
            ids[row, : len(seq)] = torch.tensor(seq)
            labels[row, n_prompt : len(seq)] = torch.tensor(seq[n_prompt:])
        yield ids, labels


def mixed_batches(sources: Sequence[Iterator[Batch]], pad_id: int = 0) -> Iterator[Batch]:
    """One batch from each source, padded to one width and stacked."""
    import torch

    while True:
        parts = [next(s) for s in sources]
        width = max(p[0].shape[1] for p in parts)
        ids = torch.cat(
            [torch.nn.functional.pad(i, (0, width - i.shape[1]), value=pad_id) for i, _ in parts]
        )
        labels = torch.cat(
            [
                torch.nn.functional.pad(lab, (0, width - lab.shape[1]), value=-100)
                for _, lab in parts
            ]
        )
        yield ids, labels


def train(
    model: torch.nn.Module,
    batches: Iterator[Batch],
    steps: int,
    *,
    lr: float,
    warmup: int = 30,
    trainable: Callable[[str], bool] = lambda name: True,
    weight_decay: float = 0.0,
    desc: str = "train",
    show_progress: bool = True,
    schedule: str = "cosine",
    check: Callable[[int], bool] | None = None,
    check_every: int = 50,
) -> list[float]:
    """Train ``model`` in place for at most ``steps`` steps; returns the loss of every step.

    Only parameters whose name passes ``trainable`` are updated (the others get no gradient).
    ``schedule``: ``cosine`` (warm-up, then cosine down to 10% over ``steps``) or ``constant``
    (warm-up, then ``lr``). ``check(step)``, called every ``check_every`` steps in eval mode,
    stops the run when it returns true: ``steps`` is then only a cap.
    """
    import torch

    params = []
    for name, p in model.named_parameters():
        p.requires_grad_(trainable(name))
        if p.requires_grad:
            params.append(p)
    opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.95), weight_decay=weight_decay)
    model.train()
    losses = []
    bar = progress(range(steps), desc, enabled=show_progress)
    for step in bar:
        for group in opt.param_groups:
            group["lr"] = (
                lr_at(step, steps, lr, warmup)
                if schedule == "cosine"
                else lr * min(1.0, (step + 1) / warmup)
            )
        ids, labels = next(batches)
        out = model(input_ids=ids, labels=labels)
        loss = out.loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        losses.append(loss.item())
        if check is not None and (step + 1) % check_every == 0:
            model.eval()
            done = check(step + 1)
            model.train()
            if done:
                break
    model.eval()
    for p in model.parameters():
        p.requires_grad_(True)
    return losses


def code_switched(
    batches: Iterator[Batch],
    table: torch.Tensor,
    seed: int,
    low: float = 0.4,
    high: float = 1.0,
    switch_labels: bool = False,
) -> Iterator[Batch]:
    """``batches`` with their inputs partly translated: each row draws a rate ``p`` in
    ``[low, high)`` and every input token ``t`` becomes ``table[t]`` (``[V]`` int64: the
    token's Zeta twin, or itself) with probability ``p``. The labels stay the original tokens
    (the model reads both languages and writes the original), or, with ``switch_labels``, are
    the switched tokens too (it writes the mixed text)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    for ids, labels in batches:
        rate = low + (high - low) * torch.rand(ids.shape[0], 1, generator=g)
        swap = torch.rand(ids.shape, generator=g) < rate
        switched = torch.where(swap, table[ids], ids)
        if switch_labels:
            labels = torch.where(labels == -100, labels, switched)
        yield switched, labels
