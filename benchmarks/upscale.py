"""Benchmark: `splice upscale --solar` of the 1.6 GB bf16 Llama checkpoint vs `cp` of its files.

Target (issue "surgery, depth"): at most 1.5x the wall time of `cp -r` of the checkpoint, with
peak RSS under 500 MB: every tensor, duplicated ones included, is copied file to file in the
kernel, never held in memory. The output is bigger than the input
(16 layers -> 24 with --solar 4, SOLAR's 25%), so `cp` of as many bytes is shown too, and splice
writing one output file (`--max-shard-size 5GB`: its two workers then queue on the file's lock).
Since every written model is checked to load in transformers first (torch and transformers
imported, the model built on the meta device: a fixed cost, whatever the model's size), the
copy alone is measured too (`--no-verify`: torch never imported).
Run: `python benchmarks/upscale.py`. Each command runs in a fresh process after a `sync`, inputs
in the page cache (warm); the median of --repeat runs is reported. splice's modules are compiled
to bytecode first, as `pip install` does (`common.compile_splice`).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import Measurement, make_llama, measure, measure_fresh

SPLICE = str(Path(sys.executable).with_name("splice"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--workdir", default="/tmp/splice-bench", type=Path)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--solar", type=int, default=4, help="M (default 4: 16 -> 24 layers)")
    args = ap.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    model = make_llama(args.workdir / "llama-1.6gb").resolve()  # a link: cp -r its target
    files = sorted(model.glob("*.safetensors"))
    size_gb = sum(f.stat().st_size for f in files) / 1e9
    out = args.workdir / "out"

    def fresh(cmd: list[str]) -> Measurement:
        return measure_fresh(cmd, out, args.repeat)

    upscale = [SPLICE, "upscale", str(model), str(out), "--solar", str(args.solar)]
    one_file = f"splice upscale --solar {args.solar} --max-shard-size 5GB (one output file)"
    rows = {
        "cp -r (reference)": fresh(["cp", "-r", str(model), str(out)]),
        f"splice upscale --solar {args.solar}": fresh([*upscale, "--no-progress"]),
        f"splice upscale --solar {args.solar} --no-verify": fresh(
            [*upscale, "--no-progress", "--no-verify"]
        ),
        one_file: fresh([*upscale, "--no-progress", "--max-shard-size", "5GB"]),
    }
    shutil.rmtree(out, ignore_errors=True)
    os.sync()
    m = measure([*upscale, "--no-progress"])
    assert m.returncode == 0
    out_gb = sum(f.stat().st_size for f in out.glob("*.safetensors")) / 1e9
    layers = json.loads((out / "config.json").read_text())["num_hidden_layers"]
    # the output is bigger: cp of as many bytes (the checkpoint plus a file of the difference,
    # cut from a shard beforehand so it is in the page cache too). Past ~2 GB of dirty pages the
    # kernel throttles writers here, so bytes beyond the input's cost more than the first ones.
    pad = args.workdir / "pad.bin"
    extra = int((out_gb - size_gb) * 1e9)
    with open(files[0], "rb") as src, open(pad, "wb") as dst:
        done = 0
        while done < extra:
            done += os.copy_file_range(src.fileno(), dst.fileno(), extra - done, done, done)
    shutil.rmtree(out, ignore_errors=True)
    same = f"cp -r + {extra / 1e9:.2f} GB (as many bytes as the output)"
    rows[same] = fresh(["sh", "-c", f"cp -r {model} {out} && cp {pad} {out}/"])
    pad.unlink()
    cp = rows["cp -r (reference)"].wall_s
    print(f"checkpoint: {model} ({size_gb:.2f} GB bf16, 16 layers) -> {layers} layers, "
          f"{out_gb:.2f} GB; median of {args.repeat} runs\n")  # fmt: skip
    print("| command | GB written | wall s | x cp | x cp per byte | peak RSS MB |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, r in rows.items():
        assert r.returncode == 0, f"{name} failed"
        gb = out_gb if name != "cp -r (reference)" else size_gb
        per_byte = (r.wall_s / gb) / (cp / size_gb)
        print(
            f"| {name} | {gb:.2f} | {r.wall_s:.2f} | {r.wall_s / cp:.2f} | {per_byte:.2f} "
            f"| {r.peak_rss_mb:.0f} |"
        )
    shutil.rmtree(out, ignore_errors=True)
    results = {name: vars(r) for name, r in rows.items()}
    dest = Path(__file__).parent / "results" / "upscale.json"
    dest.parent.mkdir(exist_ok=True)
    dest.write_text(
        json.dumps(
            {
                "size_gb": size_gb,
                "out_gb": out_gb,
                "out_layers": layers,
                "solar": args.solar,
                "ratio_vs_cp": rows[f"splice upscale --solar {args.solar}"].wall_s / cp,
                "ratio_vs_cp_per_byte": rows[f"splice upscale --solar {args.solar}"].wall_s
                / out_gb
                / (cp / size_gb),
                "ratio_vs_cp_of_as_many_bytes": rows[f"splice upscale --solar {args.solar}"].wall_s
                / rows[same].wall_s,
                "runs": results,
            },
            indent=2,
        )
        + "\n"
    )


if __name__ == "__main__":
    main()
