"""splice evolve, measured: per-candidate merge time vs evaluation time, and candidates per
minute, in process and with ``--workers 2``.

    python benchmarks/evolve_search.py                 # the zoo (zoo_math_lang_fit, v2)
    python benchmarks/evolve_search.py --zoo /path/to/zoo
    python benchmarks/evolve_search.py --tiny          # tiny random llamas + a tiny local task
    python benchmarks/evolve_search.py --generations 4 --workers 2

Writes benchmarks/results/evolve_search[_tiny].json. The first generation is a warm-up (the
sources are read, the module is built, the tasks loaded); the medians are over later ones.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch

from splice.evolve import EvolveConfig, evolve
from splice.evolve.search import load_state

RESULTS = Path(__file__).parent / "results"


def tiny_setup(root: Path) -> tuple[dict[str, str], Path, list[str]]:
    """base + two fine-tunes (tiny llama, word-level tokenizer) and a multiple-choice task."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast

    words = ["<pad>", "<s>", "</s>", "<unk>"] + [f"w{i}" for i in range(92)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>"
    )
    cfg = AutoConfig.for_model(
        "llama", vocab_size=96, hidden_size=64, intermediate_size=136, num_hidden_layers=8,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        tie_word_embeddings=False,
    )  # fmt: skip
    paths = {}
    for i, name in enumerate(("base", "ft1", "ft2")):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(cfg)
        if i:
            g = torch.Generator().manual_seed(i)
            with torch.no_grad():
                for p in model.parameters():
                    p.add_(0.02 * torch.randn(p.shape, generator=g))
        model.save_pretrained(root / name)
        fast.save_pretrained(root / name)
        paths[name] = str(root / name)
    tasks = root / "tasks"
    tasks.mkdir()
    g = torch.Generator().manual_seed(0)
    rows = []
    for a in torch.randint(4, 80, (250,), generator=g).tolist():
        rows.append({"prompt": f"w{a} w{a + 1}", "choices": [f"w{a + 2}", f"w{a + 9}"], "gold": 0})
    (tasks / "tiny.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tasks / "tiny_mc.yaml").write_text(
        "task: tiny_mc\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
        f"    test: {json.dumps(str(tasks / 'tiny.jsonl'))}\ntest_split: test\n"
        'doc_to_text: "{{prompt}}"\noutput_type: multiple_choice\n'
        'doc_to_choice: "{{choices}}"\ndoc_to_target: "{{gold}}"\ntarget_delimiter: " "\n'
        "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n"
    )
    return paths, tasks, ["tiny_mc"]


def zoo_setup(zoo: Path | None, root: Path) -> tuple[dict[str, str], Path | None, list[str]]:
    """The zoo's base, math and lang, and its combined fitness split (task configs for the
    ``*_fit`` splits written as examples/evolve_zoo.py does; a zoo without them, v1, falls back
    to ``zoo_math_lang`` with a note)."""
    import sys

    from splice.zoo.build import default_dir

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
    from evolve_zoo import zoo_tasks

    zoo = (zoo or default_dir()).resolve()
    tasks_dir, have = zoo_tasks(zoo, root / "tasks")
    task = "zoo_math_lang_fit"
    if task not in have:
        print(f"NOTE: {zoo} has no {task} (zoo v1): timing zoo_math_lang instead", file=sys.stderr)
        task = "zoo_math_lang"
    return {n: str(zoo / n) for n in ("base", "math", "lang")}, tasks_dir, [task]


def measure(config: EvolveConfig, out: Path, workers: int) -> dict:
    t = time.perf_counter()
    result = evolve(config, out, workers=workers)
    wall = time.perf_counter() - t
    records = [r for r in load_state(out)["records"] if r["generation"] > 0]
    merge = statistics.median(r["merge_s"] for r in records)
    evals = statistics.median(r["eval_s"] for r in records if r.get("eval_s") is not None)
    per_min = statistics.median(h["per_minute"] for h in result.history[1:])
    return {
        "workers": workers,
        "candidates": result.evaluations,
        "wall_s": round(wall, 2),
        "merge_s_median": round(merge, 4),
        "eval_s_median": round(evals, 4),
        "merge_over_eval": round(merge / evals, 3),
        "candidates_per_minute_median": per_min,
        "best_fitness": result.best_fitness,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiny", action="store_true", help="tiny random models, not the zoo")
    ap.add_argument("--zoo", type=Path, default=None, help="zoo folder (default: the zoo)")
    ap.add_argument("--generations", type=int, default=4)
    ap.add_argument("--popsize", type=int, default=6)
    ap.add_argument("--workers", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(1)
    tmp = Path(tempfile.mkdtemp(prefix="splice-evolve-bench-"))
    try:
        models, tasks_dir, tasks = tiny_setup(tmp) if args.tiny else zoo_setup(args.zoo, tmp)
        genome = {
            "models": [m for k, m in models.items() if k != "base"],
            "merge_method": "ties",
            "base_model": models["base"],
            "layer_granularity": 2,
        }
        if not args.tiny:  # the parameter-space genome of examples/evolve_zoo.py
            genome.update(
                merge_method="task_arithmetic",
                layer_granularity=2,
                filters=["self_attn", "mlp"],
                ranges={"weight": [0.0, 2.0]},
            )
        data = {
            "genome": genome,
            "tasks": tasks,
            "lm_eval": {"batch_size": 64},
            "search": {"popsize": args.popsize, "generations": args.generations, "seed": 0},
            "tasks_dir": str(tasks_dir) if tasks_dir else None,
            "zoo": None if args.tiny else str(Path(models["base"]).parent),
        }
        config = EvolveConfig.from_dict(data)
        rows = [measure(config, tmp / "run1", 1)]
        if args.workers > 1:
            rows.append(measure(config, tmp / f"run{args.workers}", args.workers))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    result = {
        "setup": "tiny llama (8 layers, hidden 64), 250-item MC task"
        if args.tiny
        else f"zoo {Path(models['base']).parent}",
        "tasks": tasks,
        "genome": "ties, 2 models + base, layer_granularity 2"
        if args.tiny
        else "task_arithmetic, 2 models + base, layer_granularity 2, filters self_attn/mlp",
        "popsize": args.popsize,
        "generations": args.generations,
        "threads_per_process": 1,
        "cpus": os.cpu_count(),
        "load_average_1min_after": round(os.getloadavg()[0], 2),
        "runs": rows,
    }
    RESULTS.mkdir(exist_ok=True)
    name = "evolve_search_tiny.json" if args.tiny else "evolve_search.json"
    (RESULTS / name).write_text(json.dumps(result, indent=2) + "\n")
    for r in rows:
        print(
            f"workers {r['workers']}: merge {r['merge_s_median']:.3f} s, eval "
            f"{r['eval_s_median']:.3f} s per candidate (merge/eval {r['merge_over_eval']:.2f}); "
            f"{r['candidates_per_minute_median']:.0f} candidates/min; {r['wall_s']:.1f} s wall"
        )


if __name__ == "__main__":
    main()
