"""Tiny lm-eval tasks and evolve configs for the evolve tests (no zoo, no hub)."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import yaml


def write_tasks(folder: Path, items: int = 16, seed: int = 0) -> Path:
    """Two local lm-eval tasks over the conftest tokenizer's words (w0 ...): ``tiny_mc``
    (multiple choice, acc) and ``tiny_ll`` (loglikelihood: perplexity, lower is better)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    rows = []
    for _ in range(items):
        a = rng.randrange(4, 80)
        rows.append(
            {
                "prompt": f"w{a} w{a + 1} w{a + 2}",
                "choices": [f"w{a + 3}", f"w{(a + 40) % 90}"],
                "gold": 0,
                "target": f" w{a + 3}",
            }
        )
    data = folder / "tiny.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    head = (
        "dataset_path: json\n"
        "dataset_kwargs:\n"
        "  data_files:\n"
        f"    test: {json.dumps(str(data))}\n"
        "test_split: test\n"
        'doc_to_text: "{{prompt}}"\n'
        'target_delimiter: " "\n'
    )
    (folder / "tiny_mc.yaml").write_text(
        "task: tiny_mc\n" + head + "output_type: multiple_choice\n"
        'doc_to_choice: "{{choices}}"\n'
        'doc_to_target: "{{gold}}"\n'
        "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n"
    )
    (folder / "tiny_ll.yaml").write_text(
        "task: tiny_ll\n" + head + "output_type: loglikelihood\n"
        'doc_to_target: "{{target}}"\n'
        "metric_list:\n"
        "  - metric: perplexity\n    aggregation: perplexity\n    higher_is_better: false\n"
        "  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n"
    )
    return folder


def config_dict(trio: dict[str, Path], tasks: Path, **search: Any) -> dict[str, Any]:
    """A small ties search over the trio (4 layers, 2 groups: 8 genes)."""
    return {
        "genome": {
            "models": [str(trio["ft1"]), str(trio["ft2"])],
            "merge_method": "ties",
            "base_model": str(trio["base"]),
            "layer_granularity": 2,
        },
        "tasks": [
            {"name": "tiny_ll", "metric": "perplexity"},
            {"name": "tiny_mc", "weight": 0.5},
        ],
        "lm_eval": {"batch_size": 16},
        # the plain CMA-ES loop (grid seeding and restarts have their own tests)
        "search": {"popsize": 4, "generations": 3, "seed": 1, "grid": False, "restarts": "none"}
        | search,
        "tasks_dir": str(tasks),
    }


def write_config(path: Path, data: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path
