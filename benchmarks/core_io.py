"""Benchmark: `splice inspect` and `splice convert` on a 1.6 GB bf16 Llama checkpoint.

Targets (issue "Foundation"): inspect < 2 s and < 300 MB peak RSS; convert < 1 GB peak RSS and
at most 2x the wall time of `cp` of the same files. Run: `python benchmarks/core_io.py`.
Each command runs in a fresh process after a `sync`, inputs in the page cache (warm); the median
of --repeat runs is reported.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import Measurement, make_llama, measure_fresh

SPLICE = str(Path(sys.executable).with_name("splice"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--workdir", default="/tmp/splice-bench", type=Path)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    model = make_llama(args.workdir / "llama-1.6gb")
    size_gb = sum(f.stat().st_size for f in model.glob("*.safetensors")) / 1e9
    out = args.workdir / "out"

    def fresh(cmd: list[str]) -> Measurement:
        return measure_fresh(cmd, out, args.repeat)

    rows = {
        "splice inspect": fresh([SPLICE, "inspect", str(model)]),
        "splice inspect --json": fresh([SPLICE, "inspect", "--json", str(model)]),
        "cp -r (reference)": fresh(["cp", "-r", str(model), str(out)]),
        "splice convert (re-shard 500MB)": fresh(
            [SPLICE, "convert", str(model), str(out), "--max-shard-size", "500MB", "--no-progress"]
        ),
        "splice convert --dtype float16": fresh(
            [SPLICE, "convert", str(model), str(out), "--dtype", "float16", "--no-progress"]
        ),
        "splice convert --dtype float32": fresh(
            [SPLICE, "convert", str(model), str(out), "--dtype", "float32", "--no-progress"]
        ),
    }
    cp = rows["cp -r (reference)"].wall_s
    print(f"checkpoint: {model} ({size_gb:.2f} GB bf16), median of {args.repeat} runs\n")
    print("| command | wall s | x cp | peak RSS MB |")
    print("|---|---:|---:|---:|")
    for name, m in rows.items():
        assert m.returncode == 0, f"{name} failed"
        print(f"| {name} | {m.wall_s:.2f} | {m.wall_s / cp:.2f} | {m.peak_rss_mb:.0f} |")
    results = {name: vars(m) for name, m in rows.items()}
    dest = Path(__file__).parent / "results" / "core_io.json"
    dest.parent.mkdir(exist_ok=True)
    dest.write_text(json.dumps({"size_gb": size_gb, "runs": results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
