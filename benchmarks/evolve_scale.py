"""One evolve candidate at 1.6 GB scale on the CPU: splice's resident merge against
mergekit-evolve's merge-to-disk-then-load, next to what evaluating the candidate costs.

Three 1.67 GB bf16 Llamas (a base and two "fine-tunes", benchmarks/common.py) are the sources of
a TIES candidate. splice (evolve's path) holds them resident and merges each candidate into one
live model: the first merge reads the sources, a later one with new weights reads nothing.
mergekit-evolve's path writes each candidate with ``mergekit-yaml`` and loads it with
``from_pretrained``. Evaluation is measured as what one lm-eval item costs on this model (a
forward pass over 512 tokens, in ``--eval-dtype``), times ``--items``, the fitness split's
size.

    python benchmarks/evolve_scale.py [--items 250] [--threads 2]

Writes benchmarks/results/evolve_scale.json (issue "evolve at scale": merge time < 10% of the
evaluation time per candidate).
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml

sys.path.insert(0, str(Path(__file__).parent))
from common import make_llama

from splice.merge import MergeOptions, merge_into, plan
from splice.resident import ResidentCheckpoint, empty_model

RESULTS = Path(__file__).parent / "results"


def ties(base: Path, ft1: Path, ft2: Path, w: float) -> dict:
    return {
        "merge_method": "ties",
        "base_model": str(base),
        "models": [
            {"model": str(ft1), "parameters": {"weight": w, "density": 0.7}},
            {"model": str(ft2), "parameters": {"weight": 1.0 - w / 2, "density": 0.7}},
        ],
        "parameters": {"normalize": False},
        "dtype": "bfloat16",
    }


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", default="/tmp/splice-bench", type=Path)
    ap.add_argument("--items", type=int, default=250)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--eval-dtype", default="float32")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    base = make_llama(args.workdir / "llama-1.6gb")
    ft1 = make_llama(args.workdir / "llama-1.6gb-ft1", variant=1)
    ft2 = make_llama(args.workdir / "llama-1.6gb-ft2", variant=2)

    # splice: resident sources, one live model
    opts = MergeOptions(show_progress=False, threads=args.threads)
    sources = {str(p): ResidentCheckpoint(p, dtype="bfloat16") for p in (base, ft1, ft2)}
    p = plan(ties(base, ft1, ft2, 0.6), opts, sources)
    model = empty_model(p.config, dtype="bfloat16")
    t = time.perf_counter()
    merge_into(model, p, options=opts)
    first = time.perf_counter() - t
    t = time.perf_counter()
    merge_into(model, ties(base, ft1, ft2, 0.4), sources, options=opts)  # a new candidate
    later = time.perf_counter() - t
    splice_rss = rss_mb()

    # one lm-eval item: a forward pass over 512 tokens, in float32 (bf16 matmuls on a CPU
    # without bf16 units are ten times slower: a search on the CPU scores in float32)
    model = model.to(getattr(torch, args.eval_dtype))
    ids = torch.randint(
        0, p.config["vocab_size"], (1, 512), generator=torch.Generator().manual_seed(0)
    )
    with torch.no_grad():
        model(ids)  # warm
        t = time.perf_counter()
        model(ids)
        item = time.perf_counter() - t
    del model, sources

    # mergekit-evolve: mergekit-yaml to disk, then from_pretrained
    tmp = Path(tempfile.mkdtemp(dir=args.workdir))
    recipe = tmp / "candidate.yml"
    recipe.write_text(yaml.safe_dump(ties(base, ft1, ft2, 0.4)))
    mergekit = Path(sys.executable).with_name("mergekit-yaml")
    t = time.perf_counter()
    subprocess.run([str(mergekit), str(recipe), str(tmp / "out")], check=True, capture_output=True)
    mk_merge = time.perf_counter() - t
    from transformers import AutoModelForCausalLM

    t = time.perf_counter()
    AutoModelForCausalLM.from_pretrained(tmp / "out", dtype=torch.bfloat16)
    mk_load = time.perf_counter() - t
    shutil.rmtree(tmp, ignore_errors=True)

    evaluation = item * args.items
    result = {
        "size_gb": 1.67,
        "threads": args.threads,
        "items": args.items,
        "eval_dtype": args.eval_dtype,
        "splice_first_merge_s": first,
        "splice_later_merge_s": later,
        "splice_peak_rss_mb": splice_rss,
        "item_s": item,
        "evaluation_s": evaluation,
        "splice_merge_share_of_evaluation": later / evaluation,
        "mergekit_merge_to_disk_s": mk_merge,
        "mergekit_load_s": mk_load,
        "mergekit_candidate_s": mk_merge + mk_load,
    }
    print(json.dumps(result, indent=2))
    (RESULTS / "evolve_scale.json").write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
