"""Demo placeholder until the zoo lands: build a tiny model and inspect it.

Analysis step (issue "analysis"): once ``splice.zoo`` exists, ``make demo`` runs
:func:`analysis_step` on the zoo: base vs each specialist, layer redundancy of base (weights
and activations on the zoo's corpus), and the MoE's experts vs base, saved under
``out/analysis/`` with a summary printed.
"""

from __future__ import annotations

import sys
from pathlib import Path


def analysis_step(zoo: Path, out: Path) -> None:
    """Run every analysis on the zoo and save the reports under ``out``."""
    import torch

    from splice.analysis import compare_experts, compare_layers, compare_models
    from splice.analysis.activations import analyze_activations

    torch.set_num_threads(2)
    reports = {
        f"base-vs-{name}": compare_models(zoo / "base", zoo / name) for name in ("math", "lang")
    }
    reports["base-layers"] = compare_layers(zoo / "base", metrics="cosine")
    corpus = zoo / "corpus.txt"
    reports["base-activations"] = analyze_activations(
        zoo / "base", corpus if corpus.is_file() else "zoo", seq_len=64, max_samples=32
    )
    reports["moe-experts-vs-base"] = compare_experts(zoo / "moe", zoo / "base")
    for name, report in reports.items():
        report.save(out / name)
        print(f"\n== {name} ==\n{report.summary()}")
    print(f"\nanalysis reports in {out}/")


def main() -> int:
    try:
        import splice.zoo  # type: ignore[import-not-found]
    except ImportError:
        print("splice.zoo is not built yet: no demo to run")
        return 0
    zoo = Path(splice.zoo.build(splice.zoo.default_dir()))
    analysis_step(zoo, Path("out") / "analysis")
    return 0


if __name__ == "__main__":
    sys.exit(main())
