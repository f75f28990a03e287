"""The zoo's base given a second tokenizer by every ``splice tokensurgeon`` method, scored on
held-out text.

    python examples/tokensurgeon_zoo.py [--zoo DIR] [--out DIR] [--ks 8,32,64]
                                        [--donor-steps 600] [--json FILE]

The second tokenizer is a BPE trained with ``tokenizers`` over the zoo's texts
(``assets/zoo/text/*.txt``, one document at a time; tokens may span up to three words; special
tokens ``<s>`` ``</s>`` ``<pad>`` ``<unk>``); it shares whole words with the zoo's word-level
tokenizer and has sub-words and runs of words the zoo's lacks. ``omp`` and
``common_interpolation`` read a donor model's embeddings, so a small donor Llama (hidden 64, 4
layers) is trained on fresh English documents of the zoo's pre-training distribution with that
tokenizer. The zoo's base then gets the tokenizer with each method (``--ks`` for the two that
take ``k``), and every output is scored by :func:`splice.scoring.perplexity` on the held-out
English text (``text/heldout_en.txt``, else the English lines of ``text/heldout.txt``), its
documents joined by each tokenizer's own ``eos bos``. Perplexity is per token of the model's own
tokenizer, so rows of different tokenizers also get bits per character (the summed negative
log-likelihood over the documents' characters), the figure that compares them. Prints a
markdown table and writes ``benchmarks/results/tokensurgeon_zoo.json``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
    os.environ.setdefault(var, "1")

ROOT = Path(__file__).resolve().parents[1]
SPECIALS = {"pad": "<pad>", "bos": "<s>", "eos": "</s>", "unk": "<unk>"}
DONOR_SEED = 424_242  # the donor's training documents: a seed of their own
SEQ_LEN = 64  # the zoo's training length


def documents(text: str) -> list[str]:
    """The documents of a zoo text file (``<eos><bos>`` between them, or one per line)."""
    return [d.strip() for line in text.splitlines() for d in line.split("<eos><bos>") if d.strip()]


#: the second tokenizers: BPE over words (as most tokenizers), and BPE over runs of up to three
#: words (tokens the zoo's tokenizer makes several of: what ``subword`` averages)
KINDS = {"words": "▁[^▁]+", "phrases": "▁[^▁]+(?:▁[^▁]+){0,2}"}


def train_tokenizer(folder: Path, texts: list[Path], kind: str, vocab_size: int = 400) -> Path:
    """A second tokenizer of ``kind`` (:data:`KINDS`), trained over ``texts`` one document at a
    time and saved for ``AutoTokenizer``."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    docs = [d for path in texts for d in documents(path.read_text())]
    tok = Tokenizer(models.BPE(unk_token=SPECIALS["unk"]))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=False),
            pre_tokenizers.Split(Regex(KINDS[kind]), behavior="isolated"),
        ]
    )
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always", split=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=list(SPECIALS.values()), show_progress=False
    )
    tok.train_from_iterator(docs, trainer)
    bos = SPECIALS["bos"]
    tok.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A $B", special_tokens=[(bos, tok.token_to_id(bos))]
    )
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": 128}
    config.update({f"{role}_token": t for role, t in SPECIALS.items()})
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    return folder


def train_donor(folder: Path, tokenizer: Path, steps: int, seed: int = 0) -> dict[str, Any]:
    """A small Llama with ``tokenizer``, trained from scratch on fresh zoo documents (English,
    the base's distribution), saved to ``folder`` with the tokenizer files."""
    import torch
    from tokenizers import Tokenizer

    from splice.zoo import calibration_text
    from splice.zoo.models import Shape, llama
    from splice.zoo.train import stream_batches, train

    tok = Tokenizer.from_file(str(tokenizer / "tokenizer.json"))
    eos = tok.token_to_id(SPECIALS["eos"])
    ids: list[int] = []
    for enc in tok.encode_batch(calibration_text(6000, seed=DONOR_SEED).splitlines()):
        ids += [*enc.ids, eos]  # <s> doc </s>, as the zoo trains
    stream = torch.tensor(ids, dtype=torch.long)
    shape = Shape(hidden=64, intermediate=128, layers=4, heads=4)
    model = llama(shape, tok.get_vocab_size(True), seed)
    for role, i in (("pad", 0), ("bos", 1), ("eos", 2)):
        assert tok.token_to_id(SPECIALS[role]) == i, role
    t0 = time.perf_counter()
    losses = train(
        model, stream_batches(stream, 32, SEQ_LEN, seed), steps, lr=3e-3, show_progress=False
    )
    model.save_pretrained(folder)
    for f in tokenizer.iterdir():
        shutil.copy(f, folder / f.name)
    return {
        "steps": steps,
        "tokens": len(ids),
        "shape": {"hidden": shape.hidden, "layers": shape.layers, "tied": shape.tie_embeddings},
        "final_loss": sum(losses[-20:]) / 20,
        "seconds": time.perf_counter() - t0,
    }


def score(model_dir: Path, docs: list[str]) -> dict[str, Any]:
    """Perplexity on ``docs`` joined by the model's tokenizer's ``eos bos``, and bits per
    character of the documents."""
    from splice.modeling import load_causal_lm, load_tokenizer
    from splice.scoring import perplexity

    tok = load_tokenizer(model_dir)
    text = f"{tok.eos_token}{tok.bos_token}".join(docs) + "\n"
    model = load_causal_lm(model_dir)
    p = perplexity(model, text, tokenizer=tok, seq_len=SEQ_LEN)
    chars = sum(len(d) for d in docs)
    return {
        "ppl": p.ppl,
        "tokens": p.tokens,
        "bits_per_char": p.nll * p.tokens / chars / math.log(2),
    }


def heldout_docs(zoo: Path) -> tuple[list[str], str]:
    path = zoo / "text" / "heldout_en.txt"
    if path.is_file():
        return documents(path.read_text()), str(path)
    path = zoo / "text" / "heldout.txt"  # English and Zeta lines alternately, English first
    return path.read_text().splitlines()[0::2], str(path) + " (English lines)"


def table(rows: list[dict[str, Any]]) -> str:
    head = (
        "| model | tokenizer | method | k | exact | new | ppl (own tokens) | tokens | bits/char |"
    )
    lines = [head, "|" + "---|" * 9]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['tokenizer']} | {r.get('method', '-')} | {r.get('k') or '-'} | "
            f"{r.get('exact', '-')} | {r.get('approximated', '-')} | {r['ppl']:.4g} | "
            f"{r['tokens']} | {r['bits_per_char']:.4f} |"
        )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--zoo", type=Path, default=ROOT / "assets" / "zoo", help="the zoo")
    ap.add_argument("--out", type=Path, default=Path("/tmp/splice-tokensurgeon-zoo"))
    ap.add_argument("--ks", default="8,32,64", help="k for omp and common_interpolation")
    ap.add_argument("--donor-steps", type=int, default=600, help="donor training steps")
    ap.add_argument(
        "--json", type=Path, default=ROOT / "benchmarks" / "results" / "tokensurgeon_zoo.json"
    )
    args = ap.parse_args()

    import torch

    from splice.checkpoint import open_checkpoint
    from splice.merge.tokensurgeon import map_tokens, tokensurgeon

    torch.set_num_threads(1)
    base = args.zoo / "base"
    if args.out.exists():
        shutil.rmtree(args.out)
    texts = sorted((args.zoo / "text").glob("*.txt"))
    docs, heldout = heldout_docs(args.zoo)
    ks = [int(k) for k in args.ks.split(",")]
    runs = [(m, k) for m in ("omp", "common_interpolation") for k in ks]
    runs += [(m, None) for m in ("subword", "mean", "zero")]
    rows = [{"model": "base", "tokenizer": "zoo (word-level)", **score(base, docs)}]
    tokenizers: dict[str, Any] = {}
    for kind in KINDS:
        tokenizer = train_tokenizer(args.out / kind / "tokenizer", texts, kind)
        donor = args.out / kind / "donor"
        print(f"{kind}: training the donor ({args.donor_steps} steps) ...", file=sys.stderr)
        donor_info = train_donor(donor, tokenizer, args.donor_steps)
        tm = map_tokens(open_checkpoint(base), open_checkpoint(donor))
        tokenizers[kind] = {"vocab": tm.size, "shared_with_zoo": tm.exact, "new": len(tm.new)}
        tokenizers[kind]["donor"] = donor_info
        rows.append({"model": "donor (trained here)", "tokenizer": kind, **score(donor, docs)})
        for method, k in runs:
            out = args.out / kind / (method + (f"-k{k}" if k else ""))
            t0 = time.perf_counter()
            info = tokensurgeon(base, donor, out, method=method, k=k or 64).to_dict()
            seconds = time.perf_counter() - t0
            row = {"model": "base", "tokenizer": kind, "method": method, "k": k}
            row.update(score(out, docs))
            row.update(exact=info["exact"], approximated=info["approximated"], seconds=seconds)
            rows.append(row)
            print(f"{kind} {method} k={k}: ppl {row['ppl']:.3f}", file=sys.stderr)
    trained_on = [str(p.relative_to(ROOT)) if p.is_relative_to(ROOT) else str(p) for p in texts]
    report = {
        "heldout": f"text/{Path(heldout).name}",
        "seq_len": SEQ_LEN,
        "tokenizers_trained_on": trained_on,
        "tokenizers": tokenizers,
        "torch": torch.__version__,
        "rows": rows,
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=2) + "\n")
    print(table(rows))
    print(f"wrote {args.json}", file=sys.stderr)


if __name__ == "__main__":
    main()
