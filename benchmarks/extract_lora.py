"""Benchmark: `splice extract-lora` vs `mergekit-extract-lora` on the same base and fine-tune.

The checkpoints are common.py's synthetic Llama (`--size full`: the 1.67 GB bf16 one, 16
layers, hidden 2048; `--size small`: 8 layers, hidden 1024, 0.31 GB) and its variant 1 (base
plus seeded noise: a full-rank delta, the hardest case for a low-rank adapter). Both tools
run at `--rank R` in a fresh process each, inputs in the page cache; wall time and peak RSS
of the same run are recorded. Target (issue 27): splice under 1 GB peak RSS.

mergekit runs an exact float32 SVD of every Linear delta (on a loaded 2-core machine about
30 s for a 2048 x 2048 matrix: the full size takes it most of an hour, hence `--size small`
there); splice's `--svd auto` takes a randomized SVD for matrices of 1024+ rows and columns at
a small rank. So the quality of the two adapters is compared too: for the first layer's
Linears, the relative error `|D - B A|_F / |D|_F` of each adapter (the optimum is the exact
SVD's, mergekit's) and splice's reported retained energy.

Run: `python benchmarks/extract_lora.py [--size small] [--rank 32] [--no-mergekit]`; results go
to benchmarks/results/extract_lora.json (`extract_lora-small.json` for the small size).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import LLAMA_1_6GB, make_llama, measure

from splice.checkpoint import open_checkpoint

SPLICE = str(Path(sys.executable).with_name("splice"))
MERGEKIT = str(Path(sys.executable).with_name("mergekit-extract-lora"))
SMALL = dict(
    hidden_size=1024,
    intermediate_size=2816,
    num_hidden_layers=8,
    num_attention_heads=16,
    num_key_value_heads=4,
    vocab_size=32000,
)
LAYER0 = [f"model.layers.0.{m}" for m in ("self_attn.q_proj", "self_attn.k_proj", "mlp.down_proj")]


def relative_errors(adapter: Path, ft: Path, base: Path) -> dict[str, float]:
    """``|D - B A|_F / |D|_F`` of the adapter's LoRA for each module of :data:`LAYER0`."""
    from safetensors import safe_open

    a, b = open_checkpoint(ft), open_checkpoint(base)
    out = {}
    with safe_open(adapter / "adapter_model.safetensors", "pt") as f:
        for m in LAYER0:
            d = a.load(f"{m}.weight", "float64") - b.load(f"{m}.weight", "float64")
            p = f"base_model.model.{m}"
            ba = (
                f.get_tensor(f"{p}.lora_B.weight").double()
                @ f.get_tensor(f"{p}.lora_A.weight").double()
            )
            out[m] = float(torch.linalg.matrix_norm(d - ba) / torch.linalg.matrix_norm(d))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--workdir", default="/tmp/splice-bench", type=Path)
    ap.add_argument("--size", choices=("full", "small"), default="full")
    ap.add_argument("--rank", type=int, default=32)
    ap.add_argument("--no-mergekit", action="store_true", help="measure splice only")
    args = ap.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    stem = "llama-1.6gb" if args.size == "full" else "llama-small"
    shape = LLAMA_1_6GB if args.size == "full" else SMALL
    base = make_llama(args.workdir / stem, **shape).resolve()
    ft = make_llama(args.workdir / f"{stem}-ft1", variant=1, **shape).resolve()
    size_gb = sum(f.stat().st_size for f in base.glob("*.safetensors")) / 1e9
    outs = {"splice": args.workdir / "lora-splice", "mergekit": args.workdir / "lora-mergekit"}
    rank = ["--rank", str(args.rank)]
    commands = {
        "splice": [SPLICE, "extract-lora", str(ft), str(base), str(outs["splice"]), *rank],
        "mergekit": [MERGEKIT, "--model", str(ft), "--base-model", str(base), "--out-path"],
    }
    commands["splice"].append("--no-progress")
    commands["mergekit"] += [str(outs["mergekit"]), "--max-rank", str(args.rank)]
    if args.no_mergekit:
        del commands["mergekit"]
    rows, errors = {}, {}
    for name, cmd in commands.items():
        shutil.rmtree(outs[name], ignore_errors=True)
        os.sync()
        rows[name] = measure(cmd, env={"HF_HUB_OFFLINE": "1"})
        assert rows[name].returncode == 0, f"{name} failed"
        errors[name] = relative_errors(outs[name], ft, base)
    report = subprocess.run(  # splice's own report (energy per module), not timed
        [*commands["splice"], "--json", "--overwrite"], capture_output=True, text=True, check=True
    )
    energy = json.loads(report.stdout)["energy"]
    adapter_mb = {n: (outs[n] / "adapter_model.safetensors").stat().st_size / 1e6 for n in commands}
    print(f"base {base} ({size_gb:.2f} GB bf16), fine-tune {ft}, rank {args.rank}\n")
    print("| tool | wall s | peak RSS MB | adapter MB | layer-0 relative errors |")
    print("|---|---:|---:|---:|---|")
    for name, r in rows.items():
        errs = ", ".join(f"{m.split('.')[-1]} {e:.4f}" for m, e in errors[name].items())
        print(
            f"| {name} | {r.wall_s:.1f} | {r.peak_rss_mb:.0f} | {adapter_mb[name]:.1f} | {errs} |"
        )
    print(f"\nsplice's retained energy over all LoRA modules: {100 * energy:.2f}%")
    for out in outs.values():
        shutil.rmtree(out, ignore_errors=True)
    suffix = "" if args.size == "full" else f"-{args.size}"
    dest = Path(__file__).parent / "results" / f"extract_lora{suffix}.json"
    dest.parent.mkdir(exist_ok=True)
    result = {
        "size": args.size,
        "size_gb": size_gb,
        "shape": shape,
        "rank": args.rank,
        "threads": torch.get_num_threads(),
        "cpus": os.cpu_count(),
        "splice_energy": energy,
        "adapter_mb": adapter_mb,
        "layer0_relative_errors": errors,
        "runs": {name: vars(r) for name, r in rows.items()},
    }
    if "mergekit" in rows:
        result["wall_ratio_vs_mergekit"] = rows["splice"].wall_s / rows["mergekit"].wall_s
        result["rss_ratio_vs_mergekit"] = rows["splice"].peak_rss_mb / rows["mergekit"].peak_rss_mb
    dest.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
