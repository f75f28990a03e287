"""Benchmark: `splice analyze weights A B` on two 1.6 GB bf16 Llama checkpoints, all metrics.

Target (issue "analysis"): peak RSS under 1.5 GB (streaming, tensor by tensor) and an honest
wall time. A is the synthetic base, B a fine-tune (base + 2% seeded noise). The command runs in
a fresh process; per-metric seconds come from the report's meta.
Run: `python benchmarks/analyze_weights.py [--metrics all] [--threads 2]`; results go to
`results/analyze_weights.json` (all metrics) or `results/analyze_weights_<metrics>.json`.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import make_llama, measure

SPLICE = str(Path(sys.executable).with_name("splice"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--workdir", default="/tmp/splice-bench", type=Path)
    ap.add_argument("--metrics", default="all")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    a = make_llama(args.workdir / "llama-1.6gb")
    b = make_llama(args.workdir / "llama-1.6gb-ft1", variant=1)
    size_gb = sum(f.stat().st_size for f in a.glob("*.safetensors")) / 1e9
    out = args.workdir / "analyze-weights"
    shutil.rmtree(out, ignore_errors=True)
    cmd = [SPLICE, "analyze", "weights", str(a), str(b), "--out", str(out)]
    cmd += ["--metrics", args.metrics, "--threads", str(args.threads), "--device", args.device]
    cmd += ["--no-progress"]
    m = measure(cmd)
    assert m.returncode == 0, "splice analyze weights failed"
    meta = json.loads((out / "report.json").read_text())["meta"]
    per_metric = meta["seconds_per_metric"]
    print(f"checkpoints: 2 x {size_gb:.2f} GB bf16, metrics {args.metrics}, {args.threads} threads")
    print("| command | wall s | peak RSS MB |")
    print("|---|---:|---:|")
    print(
        f"| splice analyze weights A B --metrics {args.metrics} | {m.wall_s:.1f} | "
        f"{m.peak_rss_mb:.0f} |"
    )
    print("\n| metric (incl. Gaussian and other-layer baselines) | seconds |")
    print("|---|---:|")
    for name, s in sorted(per_metric.items(), key=lambda kv: -kv[1]):
        print(f"| {name} | {s:.1f} |")
    tag = "" if args.metrics == "all" else "_" + args.metrics.replace(",", "_")
    dest = Path(__file__).parent / "results" / f"analyze_weights{tag}.json"
    dest.parent.mkdir(exist_ok=True)
    result = {
        "size_gb": size_gb,
        "command": " ".join(["splice", *cmd[1:]]),
        "metrics": args.metrics,
        "threads": args.threads,
        "device": args.device,
        "wall_s": m.wall_s,
        "peak_rss_mb": m.peak_rss_mb,
        "seconds_per_metric": per_metric,
        "cpu": platform.processor() or platform.machine(),
        "torch": torch.__version__,
    }
    dest.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
