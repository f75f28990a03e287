"""Benchmark: FP8 checkpoints in and out, on the 1.6 GB bf16 Llama of ``core_io.py``.

Issue "Quantized checkpoints": convert bf16 -> FP8 (128x128 block scales, as DeepSeek-V3 ships)
and FP8 -> bf16, an upscale of the FP8 model (moved layers byte-copied with their scales) and
inspect, against ``cp -r`` of the same bytes; peak RSS must stay < 1 GB. Each command runs in a
fresh process after a ``sync``, inputs warm in the page cache; the median of ``--repeat`` runs.
Run: ``python benchmarks/quant_io.py`` (writes ``benchmarks/results/quant_io.json``).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import Measurement, make_llama, measure_fresh

SPLICE = str(Path(sys.executable).with_name("splice"))


def size_gb(folder: Path) -> float:
    return sum(f.stat().st_size for f in folder.glob("*.safetensors")) / 1e9


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--workdir", default="/tmp/splice-bench", type=Path)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    bf16 = make_llama(args.workdir / "llama-1.6gb")
    fp8 = args.workdir / "llama-1.6gb-fp8"
    if not fp8.exists():  # the FP8 input, made by splice itself
        subprocess.run(
            [SPLICE, "convert", str(bf16), str(fp8), "--dtype", "fp8", "--no-progress"], check=True
        )
    out = args.workdir / "out"

    def fresh(cmd: list[str]) -> Measurement:
        return measure_fresh(cmd, out, args.repeat)

    rows = {
        "cp -r bf16 (reference)": fresh(["cp", "-r", str(bf16), str(out)]),
        "cp -r fp8 (reference)": fresh(["cp", "-r", str(fp8), str(out)]),
        "splice inspect fp8": fresh([SPLICE, "inspect", str(fp8)]),
        "splice convert bf16 -> fp8": fresh(
            [SPLICE, "convert", str(bf16), str(out), "--dtype", "fp8", "--no-progress"]
        ),
        "splice convert fp8 -> bf16": fresh(
            [SPLICE, "convert", str(fp8), str(out), "--dtype", "bfloat16", "--no-progress"]
        ),
        "splice upscale fp8 --duplicate 4:12 (keeps fp8)": fresh(
            [SPLICE, "upscale", str(fp8), str(out), "--duplicate", "4:12", "--no-progress"]
        ),
    }
    print(f"bf16 {size_gb(bf16):.2f} GB, fp8 {size_gb(fp8):.2f} GB, median of {args.repeat}\n")
    print("| command | wall s | peak RSS MB |")
    print("|---|---:|---:|")
    for name, m in rows.items():
        assert m.returncode == 0, f"{name} failed"
        print(f"| {name} | {m.wall_s:.2f} | {m.peak_rss_mb:.0f} |")
    dest = Path(__file__).parent / "results" / "quant_io.json"
    data = {
        "bf16_gb": size_gb(bf16),
        "fp8_gb": size_gb(fp8),
        "repeat": args.repeat,
        "runs": {name: vars(m) for name, m in rows.items()},
    }
    dest.write_text(json.dumps(data, indent=2) + "\n")


if __name__ == "__main__":
    main()
