"""SliceGPT slicing of the zoo base (and any other model), scored on held-out text (README table).

    python examples/slice_zoo.py [--zoo DIR] [--model NAME=DIR ...] [--calibration zoo]
                                 [--sparsities 0.1,0.2,0.3,0.5] [--random D,L] [--tasks none|mc|LIST]
                                 [--out DIR] [--json FILE]

For every model (default: the zoo's ``base``; ``--model`` adds others; ``--random D,L`` a
randomly initialised Llama with the zoo's tokenizer, whose residual stream is not low-rank) and
every sparsity, both bases: ``--basis per-layer`` (SliceGPT, loaded with
``splice.surgery.load_sliced``) and ``--basis shared`` (a stock checkpoint). Each row: the
perplexity on the held-out text (sliding windows of the zoo's training length), the new
hidden size, the mean KL divergence of its next-token distribution from the source's (64
held-out windows), the parameter count, the mean retained variance of the normed stream over the
block inputs, and for the shared basis the variance of all block inputs together. Everything
goes through ``splice.surgery.slice_model`` and ``splice.scoring.evaluate``. The held-out text
is the English half of the built zoo's ``text/heldout.txt`` (the base never saw Zeta), else zoo
text drawn with its own seed. Prints a markdown table and writes ``benchmarks/results/slice_zoo.json``.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
    os.environ.setdefault(var, "1")

HELDOUT_SEED = 777_001


def heldout_text(zoo: Path, model: Path, path: Path | None) -> str:
    """``path`` if given, else the English documents of the zoo's held-out text (the zoo's base
    never saw Zeta), else zoo text of another seed; documents joined as in training."""
    if path is not None:
        return path.read_text()
    from splice.modeling import load_tokenizer
    from splice.zoo import calibration_text, heldout_documents

    tok = load_tokenizer(model)
    joiner = f"{tok.eos_token or ''}{tok.bos_token or ''}" or "\n"
    if (zoo / "text" / "heldout.txt").is_file():
        docs = heldout_documents(zoo, "en")
    else:
        docs = calibration_text(400, seed=HELDOUT_SEED).splitlines()
    return joiner.join(docs) + "\n"


def random_llama(zoo: Path, out: Path, hidden: int, layers: int) -> Path:
    """A randomly initialised Llama (weights N(0, 0.02), as ``benchmarks/common.make_llama``)
    with the zoo's tokenizer: its residual stream is not low-rank, so slicing must cost."""
    import shutil

    sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))
    from common import make_llama

    vocab = json.loads((zoo / "base" / "config.json").read_text())["vocab_size"]
    folder = make_llama(out, hidden_size=hidden, intermediate_size=2 * hidden,
                        num_hidden_layers=layers, num_attention_heads=hidden // 64,
                        num_key_value_heads=hidden // 64, vocab_size=vocab)  # fmt: skip
    for f in (zoo / "base").iterdir():
        if f.name.startswith(("tokenizer", "special_tokens")):
            shutil.copy(f, folder / f.name)
    return folder


def kl_to_source(source: Any, sliced: Any, windows: Any) -> float:
    """Mean KL(source || sliced) of the next-token distributions over ``windows`` ``[N, T]``."""
    import torch

    total, count = 0.0, 0
    with torch.no_grad():
        for batch in windows.split(16):
            p = source(batch).logits.float().log_softmax(-1)
            q = sliced(batch).logits.float().log_softmax(-1)
            total += (p.exp() * (p - q)).sum(-1).sum().item()
            count += p.shape[0] * p.shape[1]
    return total / count


def load_source(folder: Path):
    from splice.modeling import load_causal_lm

    return load_causal_lm(folder)


def parse_models(items: list[str], zoo: Path) -> dict[str, Path]:
    if not items:
        return {"base": zoo / "base"}
    out = {}
    for item in items:
        name, sep, folder = item.partition("=")
        out[name if sep else Path(item).name] = Path(folder if sep else item)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--zoo", type=Path, help="built zoo (default: splice.zoo.default_dir())")
    ap.add_argument("--model", action="append", default=[], help="NAME=DIR (default: zoo base)")
    ap.add_argument("--calibration", default="zoo", help="calibration text (default zoo)")
    ap.add_argument("--heldout", type=Path, help="held-out text (default: the zoo's)")
    ap.add_argument("--sparsities", default="0.1,0.2,0.3,0.5")
    ap.add_argument(
        "--random",
        metavar="D,L",
        help="also a random Llama of hidden size D and L layers (stream not low-rank), e.g. 256,4",
    )
    ap.add_argument(
        "--pca-of", default="normed", help="normed, raw (SliceGPT's), or normed,raw for both"
    )
    ap.add_argument("--out", type=Path, default=Path("/tmp/splice-slice-zoo"))
    ap.add_argument("--seq-len", type=int, default=64, help="window length (zoo training: 64)")
    ap.add_argument("--max-samples", type=int, default=128, help="calibration windows (128)")
    ap.add_argument(
        "--tasks", default="none", help="'none', 'mc' (the zoo's multiple choice), a list"
    )
    ap.add_argument("--limit", type=int, help="score only the first N items of each task")
    ap.add_argument(
        "--json", type=Path, default=Path(__file__).parents[1] / "benchmarks/results/slice_zoo.json"
    )
    args = ap.parse_args()

    import torch

    from splice.calib import token_windows
    from splice.execute import ExecOptions
    from splice.modeling import load_tokenizer
    from splice.scoring import evaluate, format_table
    from splice.surgery import Calibration, load_sliced, slice_model
    from splice.zoo import default_dir

    torch.set_num_threads(1)
    start = time.perf_counter()
    zoo = args.zoo or default_dir()
    sources = parse_models(args.model, zoo)
    if args.random:
        hidden, layers = (int(x) for x in args.random.split(","))
        sources[f"random D{hidden}"] = random_llama(
            zoo, args.out / f"random-{hidden}-{layers}", hidden, layers
        )
    for folder in sources.values():
        if not (folder / "config.json").is_file():
            sys.exit(f"{folder}: no model here (build the zoo first: `splice zoo build {zoo}`)")
    sparsities = [float(s) for s in args.sparsities.split(",")]
    streams = args.pca_of.split(",")

    def tail(stream: str) -> str:
        return f" {stream}" if len(streams) > 1 else ""

    opts = ExecOptions(overwrite=True, show_progress=False)
    calib = Calibration(seq_len=args.seq_len, max_samples=args.max_samples, batch_size=16)
    tasks = None if args.tasks == "none" else args.tasks
    if tasks == "mc":
        from splice.zoo import MC_TASKS

        tasks = list(MC_TASKS)
    score_kw = dict(
        seq_len=args.seq_len,
        stride=args.seq_len // 2,
        batch_size=16,
        limit=args.limit,
        zoo=zoo if tasks else None,
    )
    table: dict[str, dict[str, float]] = {}
    records: dict[str, dict] = {}
    for label, src in sources.items():
        heldout = heldout_text(zoo, src, args.heldout)
        first = evaluate({label: str(src)}, text=heldout, tasks=tasks, **score_kw)[label]
        cfg = json.loads((src / "config.json").read_text())
        source = load_source(src)
        count = sum(p.numel() for p in source.parameters())
        table[label] = {**first, "kl": 0.0, "hidden": cfg["hidden_size"], "params (k)": count / 1e3}
        windows = token_windows(load_tokenizer(src), heldout, args.seq_len, 64)
        for sparsity, stream in itertools.product(sparsities, streams):
            for basis in ("per-layer", "shared"):
                name = f"{label} {basis} {sparsity:.0%}" + tail(stream)
                t = time.perf_counter()
                res = slice_model(
                    src, args.out / name.replace(" ", "_").replace("%", ""), sparsity=sparsity,
                    calibration=args.calibration, basis=basis, stream=stream, calib=calib,
                    options=opts,
                )  # fmt: skip
                model = load_source(res.out) if basis == "shared" else load_sliced(res.out)
                row = evaluate({name: model}, text=heldout, tasks=tasks, tokenizer=str(src),
                               **score_kw)[name]  # fmt: skip
                rep = res.report
                table[name] = {
                    **row,
                    "kl": kl_to_source(source, model, windows),
                    "hidden": rep.new_hidden_size,
                    "params (k)": rep.params_output / 1e3,
                    "params share": rep.params_output / rep.params_source,
                    "retained (mean)": rep.mean_retained,
                    "retained (all, shared)": rep.total_retained
                    if rep.total_retained is not None
                    else float("nan"),
                }
                records[name] = {**rep.to_dict(), "seconds": time.perf_counter() - t}
                print(f"{name}: ppl {row['ppl']:.3f}", file=sys.stderr)
    print(format_table(table, markdown=True))
    for label, sparsity, stream in itertools.product(sources, sparsities, streams):
        key = f"{sparsity:.0%}{tail(stream)}"
        per, shared = (table[f"{label} {b} {key}"]["ppl"] for b in ("per-layer", "shared"))
        verdict = "at or below" if per <= shared else "ABOVE"
        print(f"{label} {key}: per-layer ppl {per:.3f} is {verdict} shared {shared:.3f}")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(
        json.dumps(
            dict(
                models={k: str(v) for k, v in sources.items()},
                calibration=args.calibration,
                seq_len=args.seq_len,
                max_samples=args.max_samples,
                scores=table,
                reports=records,
                total_seconds=time.perf_counter() - start,
            ),
            indent=2,
            default=float,
        )
        + "\n"
    )
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
