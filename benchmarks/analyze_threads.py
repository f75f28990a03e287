"""Benchmark: torch threads for the weight analyses, per tensor size, and the zoo wall times.

``sizes``: the default metrics' tensor work on one matrix (spectrum via the Gram matrix,
flattened cosine, Frobenius distances, and a Gaussian null of the same shape) timed with one
thread and with torch's default, for matrices of growing size. The smallest size where the
default threads win is the threshold ``splice.threads.SMALL_NUMEL`` stands for.
``zoo``: `splice analyze weights base math` and `splice analyze experts moe base` on the
committed zoo under ``/usr/bin/time`` (a fresh process each, default options, then with
``--threads`` given explicitly: ``--threads <torch's default>`` is what every tensor ran on
before the per-size choice, and with ``--out``, which adds the files and figures).

Run: `python benchmarks/analyze_threads.py [sizes] [zoo] [--repeat 3]`; results go to
``results/analyze_threads.json``. The machine's load changes the figures a lot: the result
records ``os.getloadavg()`` before each part.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path

import torch

from splice.analysis.metrics import cosine_of, distance_of, gaussian_like, singular_values

ROOT = Path(__file__).resolve().parent.parent
SPLICE = str(Path(sys.executable).with_name("splice"))
ZOO = ROOT / "assets" / "zoo"
#: [out, in] shapes, from smaller than the zoo's (96 hidden) to a 1B model's attention
SHAPES = [
    (32, 32),
    (96, 96),
    (192, 96),
    (256, 256),
    (512, 256),
    (512, 512),
    (1024, 512),
    (1024, 1024),
    (2048, 1024),
    (2048, 2048),
    (4096, 2048),
]


def work(t: torch.Tensor, g: torch.Tensor) -> None:
    """What the default metrics compute for one tensor against one other (here its null)."""
    singular_values(t)
    singular_values(g)
    cosine_of(t.reshape(-1), g.reshape(-1))
    distance_of(t.reshape(-1), g.reshape(-1))


def seconds(fn, repeat: int) -> float:
    """Median wall seconds of ``fn()`` over ``repeat`` runs (after one warm-up run)."""
    fn()
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return sorted(times)[len(times) // 2]


def sizes(repeat: int) -> list[dict]:
    default = torch.get_num_threads()
    rows = []
    print(f"| shape | numel | 1 thread ms | {default} threads ms | ratio |")
    print("|---|---:|---:|---:|---:|")
    for shape in SHAPES:
        t = torch.randn(shape)
        g = gaussian_like(shape)
        row = {"shape": list(shape), "numel": t.numel()}
        for n in (1, default):
            torch.set_num_threads(n)
            row[f"ms_{n}"] = 1e3 * seconds(lambda t=t, g=g: work(t, g), repeat)
        torch.set_num_threads(default)
        row["ratio"] = row[f"ms_{default}"] / row["ms_1"]
        rows.append(row)
        print(
            f"| {shape[0]}x{shape[1]} | {t.numel()} | {row['ms_1']:.2f} | "
            f"{row[f'ms_{default}']:.2f} | {row['ratio']:.2f} |"
        )
    return rows


def timed(cmd: list[str]) -> dict:
    """Wall seconds and peak RSS of ``cmd`` under /usr/bin/time, and the report's own time."""
    p = subprocess.run(
        ["/usr/bin/time", "-f", "TIME %e %M", *cmd], capture_output=True, text=True, check=False
    )
    assert p.returncode == 0, p.stderr[-2000:]
    wall, rss = re.findall(r"TIME ([\d.]+) (\d+)", p.stderr)[-1]
    inner = re.findall(r"time: ([\d.]+) s", p.stdout)
    return {
        "wall_s": float(wall),
        "peak_rss_mb": int(rss) / 1024,
        "report_s": float(inner[-1]) if inner else None,
    }


def zoo(repeat: int) -> list[dict]:
    runs = {
        "analyze weights base math": ["weights", str(ZOO / "base"), str(ZOO / "math")],
        "analyze experts moe base": ["experts", str(ZOO / "moe"), str(ZOO / "base")],
    }
    rows = []
    print("| command | options | wall s (median) | analysis s | peak RSS MB |")
    print("|---|---|---:|---:|---:|")
    for name, args in runs.items():
        out = f"/tmp/splice-bench-threads/{args[0]}"
        variants = (
            [],
            ["--threads", "1"],
            ["--threads", str(torch.get_num_threads())],  # torch's default for every tensor
            ["--out", out, "--overwrite"],  # with the report's files and PNGs
        )
        for extra in variants:
            cmd = [SPLICE, "analyze", *args, "--no-progress", *extra]
            ms = [timed(cmd) for _ in range(repeat)]
            ms.sort(key=lambda m: m["wall_s"])
            m = ms[len(ms) // 2]
            row = {"command": name, "options": " ".join(extra) or "(default)", **m}
            row["wall_s_all"] = [x["wall_s"] for x in ms]
            rows.append(row)
            print(
                f"| splice {name} | {row['options']} | {m['wall_s']:.1f} | "
                f"{m['report_s']} | {m['peak_rss_mb']:.0f} |"
            )
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("parts", nargs="*", default=["sizes", "zoo"], choices=["sizes", "zoo"])
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    result: dict = {
        "cpu": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "torch": torch.__version__,
        "default_threads": torch.get_num_threads(),
    }
    for part in args.parts:
        result[f"{part}_loadavg"] = os.getloadavg()
        print(f"\n{part} (load average {os.getloadavg()[0]:.2f})")
        result[part] = sizes(args.repeat) if part == "sizes" else zoo(args.repeat)
    dest = Path(__file__).parent / "results" / "analyze_threads.json"
    old = json.loads(dest.read_text()) if dest.exists() else {}
    dest.write_text(json.dumps({**old, **result}, indent=2) + "\n")


if __name__ == "__main__":
    main()
