"""splice demo on the built-in zoo (``make demo``).

1. Build the zoo, or reuse it (it is committed in ``assets/zoo``; ``make zoo`` rebuilds it).
2. Merge its two specialists with splice recipes (mergekit schema): linear, task arithmetic,
   TIES, DARE-TIES, written to ``out/demo/`` as ordinary checkpoints.
3. Score everything on the zoo's held-out tasks with lm-eval: each merge should carry both
   skills, which no specialist has.
4. Analyze: base vs each specialist, layer redundancy of base (weights and activations), and the
   MoE's experts vs base, saved under ``out/demo/analysis/``.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
    os.environ.setdefault(var, "1")

sys.path.insert(0, str(Path(__file__).parent))
from zoo_merges import markdown, zoo_recipes  # noqa: E402

DEMO_MERGES = (
    "linear 0.5/0.5",
    "task_arithmetic 1.0/0.8",
    "ties 1.0/1.0 d=0.7 normalize=false",
    "dare_ties 1.0/0.8 d=0.9",
)


def merge_step(zoo: Path, out: Path) -> dict[str, Path]:
    """Run the demo's recipes on the zoo's specialists; returns name -> output folder."""
    from splice.merge import MergeOptions, run

    recipes = zoo_recipes(zoo)
    opts = MergeOptions(overwrite=True, show_progress=False)
    return {name: run(recipes[name], out / name.split()[0], opts) for name in DEMO_MERGES}


def analysis_step(zoo: Path, out: Path) -> None:
    """Run every analysis on the zoo and save the reports under ``out``."""
    from splice.analysis import compare_experts, compare_layers, compare_models
    from splice.analysis.activations import analyze_activations

    reports = {
        f"base-vs-{name}": compare_models(zoo / "base", zoo / name) for name in ("math", "lang")
    }
    reports["base-layers"] = compare_layers(zoo / "base", metrics="cosine")
    reports["base-activations"] = analyze_activations(
        zoo / "base", "zoo", seq_len=64, max_samples=32
    )
    reports["moe-experts-vs-base"] = compare_experts(zoo / "moe", zoo / "base")
    for name, report in reports.items():
        report.save(out / name)
        print(f"\n== {name} ==\n{report.summary()}")
    print(f"\nanalysis reports in {out}/")


def main() -> int:
    from splice.zoo import build, evaluate

    out = Path("out") / "demo"
    zoo = build()
    print(f"zoo: {zoo}\n", file=sys.stderr)
    merged = merge_step(zoo, out)
    models = {n: zoo / n for n in ("base", "math", "lang", "moe")} | merged
    scores = evaluate(models, ["zoo_math", "zoo_lang", "zoo_math_lang"], zoo=zoo)
    print("accuracy on the zoo's held-out tasks (multiple choice; chance is 0.25)\n")
    print(markdown(scores))
    analysis_step(zoo, out / "analysis")
    return 0


if __name__ == "__main__":
    sys.exit(main())
