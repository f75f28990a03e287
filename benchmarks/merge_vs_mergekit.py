"""Benchmark: splice merge vs mergekit on the same recipes and ~1.6 GB bf16 Llama checkpoints.

Makes a base and two fine-tunes (hidden 2048, 16 layers, vocab 32000; base + small deltas),
then runs each recipe with splice and with mergekit (`mergekit-yaml --no-write-model-card`),
alternately, each in a fresh process after a `sync`, and prints wall time, peak RSS and their ratios, plus
the largest difference between the two outputs. Results go to benchmarks/results/merge.json.

    python benchmarks/merge_vs_mergekit.py [--recipes linear,slerp,ties,passthrough] [--repeat 1]

Issue targets on a 2-core machine: splice <= 0.5x mergekit's wall time, <= 1.5 GB peak RSS.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).parent))
from common import Measurement, make_llama, measure

BIN = Path(sys.executable).parent


def recipes(base: Path, ft1: Path, ft2: Path) -> dict[str, dict]:
    return {
        "linear": {
            "merge_method": "linear",
            "models": [
                {"model": str(ft1), "parameters": {"weight": 0.6}},
                {"model": str(ft2), "parameters": {"weight": 0.4}},
            ],
            "dtype": "bfloat16",
        },
        "slerp": {
            "merge_method": "slerp",
            "base_model": str(ft1),
            "slices": [
                {
                    "sources": [
                        {"model": str(ft1), "layer_range": [0, 16]},
                        {"model": str(ft2), "layer_range": [0, 16]},
                    ]
                }
            ],
            "parameters": {
                "t": [
                    {"filter": "self_attn", "value": [0, 0.5, 0.3, 0.7, 1]},
                    {"filter": "mlp", "value": [1, 0.5, 0.7, 0.3, 0]},
                    {"value": 0.5},
                ]
            },
            "dtype": "bfloat16",
        },
        "ties": {
            "merge_method": "ties",
            "base_model": str(base),
            "models": [
                {"model": str(ft1), "parameters": {"density": 0.5, "weight": 0.5}},
                {"model": str(ft2), "parameters": {"density": 0.5, "weight": 0.5}},
            ],
            "parameters": {"normalize": True},
            "dtype": "bfloat16",
        },
        "passthrough": {
            "merge_method": "passthrough",
            "slices": [
                {"sources": [{"model": str(base), "layer_range": [0, 12]}]},
                {"sources": [{"model": str(base), "layer_range": [4, 16]}]},
            ],
            "dtype": "bfloat16",
        },
    }


def max_diff(a: Path, b: Path) -> float:
    """Largest |a - b| over all tensors (streamed, one tensor at a time)."""
    from splice import open_checkpoint

    ca, cb = open_checkpoint(a), open_checkpoint(b)
    if set(ca) != set(cb):
        return float("inf")
    worst = 0.0
    for name in ca:
        x, y = ca.load(name, dtype="float32"), cb.load(name, dtype="float32")
        worst = max(worst, (x - y).abs().max().item())
    return worst


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--workdir", default="/tmp/splice-bench", type=Path)
    ap.add_argument("--recipes", default="linear,slerp,ties,passthrough")
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--splice-args", default="", help="extra arguments for splice merge")
    args = ap.parse_args()
    work = args.workdir
    work.mkdir(parents=True, exist_ok=True)
    base = make_llama(work / "llama-1.6gb")
    ft1 = make_llama(work / "llama-1.6gb-ft1", variant=1)
    ft2 = make_llama(work / "llama-1.6gb-ft2", variant=2)
    env = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    rows = {}
    for name in args.recipes.split(","):
        recipe = recipes(base, ft1, ft2)[name]
        path = work / f"{name}.yml"
        path.write_text(yaml.safe_dump(recipe, sort_keys=False))
        outs = {"splice": work / f"out-splice-{name}", "mergekit": work / f"out-mergekit-{name}"}
        cmds = {
            "splice": [
                str(BIN / "splice"),
                "merge",
                str(path),
                str(outs["splice"]),
                "--no-progress",
                *args.splice_args.split(),
            ],
            "mergekit": [
                str(BIN / "mergekit-yaml"),
                str(path),
                str(outs["mergekit"]),
                "--no-write-model-card",
                "--quiet",
            ],
        }
        runs: dict[str, list[Measurement]] = {"splice": [], "mergekit": []}
        for _ in range(args.repeat):
            for tool in ("mergekit", "splice"):
                shutil.rmtree(outs[tool], ignore_errors=True)
                os.sync()  # no dirty pages of the last run's output written back during this one
                m = measure(cmds[tool], env)
                if m.returncode != 0:
                    raise SystemExit(f"{tool} failed on {name}: {' '.join(cmds[tool])}")
                runs[tool].append(m)
        best = {tool: min(rs, key=lambda r: r.wall_s) for tool, rs in runs.items()}
        diff = max_diff(outs["splice"], outs["mergekit"])
        for out in outs.values():
            shutil.rmtree(out, ignore_errors=True)
        s, k = best["splice"], best["mergekit"]
        rows[name] = {
            "splice_s": s.wall_s,
            "splice_rss_mb": s.peak_rss_mb,
            "mergekit_s": k.wall_s,
            "mergekit_rss_mb": k.peak_rss_mb,
            "time_ratio": s.wall_s / k.wall_s,
            "rss_ratio": s.peak_rss_mb / k.peak_rss_mb,
            "max_abs_diff": diff,
            # every run, in order: on a shared machine the spread shows others' load
            "splice_runs_s": [round(r.wall_s, 2) for r in runs["splice"]],
            "mergekit_runs_s": [round(r.wall_s, 2) for r in runs["mergekit"]],
        }
        print(f"{name}: {json.dumps(rows[name])}", flush=True)
    print(
        f"\n{os.cpu_count()} cores; 3 x {sum(f.stat().st_size for f in base.glob('*.safetensors')) / 1e9:.2f} GB bf16 inputs; best of {args.repeat}\n"
    )
    print(
        "| recipe | splice s | mergekit s | time ratio | splice RSS MB | mergekit RSS MB | RSS ratio | max abs diff |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for name, r in rows.items():
        print(
            f"| {name} | {r['splice_s']:.1f} | {r['mergekit_s']:.1f} | {r['time_ratio']:.2f} | "
            f"{r['splice_rss_mb']:.0f} | {r['mergekit_rss_mb']:.0f} | {r['rss_ratio']:.2f} | {r['max_abs_diff']:.2g} |"
        )
    dest = Path(__file__).parent / "results" / "merge.json"
    dest.parent.mkdir(exist_ok=True)
    old = json.loads(dest.read_text()) if dest.exists() else {}
    old.update(rows)
    dest.write_text(json.dumps(old, indent=2) + "\n")


if __name__ == "__main__":
    main()
