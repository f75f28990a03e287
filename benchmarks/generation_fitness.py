"""Generation fitness, measured: splice's batched greedy generator against lm-eval's own
``HFLM.generate_until``, on the zoo's ``zoo_math_gen`` (500 items, greedy, at most 6 new
tokens) with the zoo's math model, in one process on one torch thread.

    python benchmarks/generation_fitness.py [--repeat 5] [--batch-size 32]

Two measurements, each configuration run in turn ``--repeat`` times (the best run: the one
least slowed by other work on a shared machine):

* the generation step alone: the task's 500 ``generate_until`` requests, by lm-eval's
  ``HFLM`` at the scorer's batch size (what the scorer ran before), by splice's generator as
  the scorer runs it now (:data:`splice.lmeval.GENERATION_ROWS_FACTOR` x batch size rows, at
  most ``batch_size * max_length`` tokens a batch) and, to tell the batching from the rest, by
  each of them at the other's rows;
* the whole evaluation (lm-eval's ``evaluate``: requests built, generated, filtered, scored):
  lm-eval as the scorer ran it before (stock ``HFLM``, every Jinja template compiled at each
  use) against :class:`splice.lmeval.LmEvalScorer` now (fast generation, templates compiled
  once).

Every run's generated strings and per-item ``exact_match`` are compared with lm-eval's
stock path, item by item; the script exits 1 if any differs. Wall and CPU seconds are both
recorded (CPU time is the steadier one on a shared machine). Writes
``benchmarks/results/generation_fitness.json``.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent.parent
RESULTS = Path(__file__).parent / "results"
TASK = "zoo_math_gen"


def quiet() -> contextlib.ExitStack:
    stack = contextlib.ExitStack()
    stack.enter_context(contextlib.redirect_stdout(io.StringIO()))
    stack.enter_context(contextlib.redirect_stderr(io.StringIO()))
    return stack


def timed(fn: Callable[[], Any]) -> tuple[Any, float, float]:
    """``fn()``, its wall seconds and its CPU seconds (this process)."""
    wall, cpu = time.perf_counter(), time.process_time()
    out = fn()
    return out, time.perf_counter() - wall, time.process_time() - cpu


def evaluate_items(lm: Any, task_dict: dict) -> dict[int, tuple[str, float]]:
    """lm-eval's ``evaluate`` of ``lm``: per document, the generated string and exact_match."""
    from lm_eval.evaluator import evaluate

    with quiet():
        res = evaluate(lm, task_dict, log_samples=True, bootstrap_iters=0, verbosity="ERROR")
    return {s["doc_id"]: (s["resps"][0][0], float(s["exact_match"])) for s in res["samples"][TASK]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeat", type=int, default=7)
    ap.add_argument("--batch-size", type=int, default=32, help="the scorer's (evolve's default)")
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(1)

    from lm_eval.models.huggingface import HFLM
    from transformers import AutoTokenizer

    from splice.generate import GenRequest, batches
    from splice.lmeval import GENERATION_ROWS_FACTOR, LmEvalScorer, _encode, fast_hflm
    from splice.modeling import load_causal_lm

    zoo = ROOT / "assets" / "zoo"
    model = load_causal_lm(zoo / "math")
    tok = AutoTokenizer.from_pretrained(zoo / "math")
    bs = args.batch_size

    def lm(cls: type, rows: int | None = None) -> Any:
        with quiet():
            out = cls(pretrained=model, tokenizer=tok, batch_size=bs)
        if rows is not None:
            out.generation_rows = rows
        return out

    stock = lm(HFLM)
    scorer = LmEvalScorer([TASK], tokenizer=tok, task_dirs=[zoo / "tasks"], batch_size=bs)
    task_dict = scorer.task_dict
    # lm-eval's stock path, outside the scorer (templates compiled at each use): the reference
    scorer.close()
    reference, _, _ = timed(lambda: evaluate_items(stock, task_dict))
    task = dict(scorer.leaves())[TASK]
    requests = list(task.instances)
    n = len(requests)
    strings = [reference[r.doc_id][0] for r in requests]

    fast, fast_bs, big = lm(fast_hflm()), lm(fast_hflm(), bs), lm(HFLM)
    max_length = fast.max_length
    # the rows of the generator's first batch as the scorer sizes them
    max_gen_toks = int(requests[0].args[1]["max_gen_toks"])
    prompts = [GenRequest(p, max_gen_toks) for p in _encode(fast, [r.args[0] for r in requests])]
    rows = len(batches(prompts, range(n), GENERATION_ROWS_FACTOR * bs, bs * max_length)[0])
    big.batch_size_per_gpu = rows
    gen = {
        f"lm-eval HFLM, {bs} rows (before)": lambda: HFLM.generate_until(stock, requests, True),
        f"splice generator, {rows} rows (now)": lambda: fast.generate_until(requests, True),
        f"splice generator, {bs} rows": lambda: fast_bs.generate_until(requests, True),
        f"lm-eval HFLM, {rows} rows": lambda: HFLM.generate_until(big, requests, True),
    }
    runs: dict[str, dict[str, list[float]]] = {k: {"wall": [], "cpu": []} for k in gen}
    mismatches: dict[str, int] = {k: 0 for k in gen}
    with quiet():
        fast.generate_until(requests[:8], True)  # warm-up
    for _ in range(args.repeat):
        for name, fn in gen.items():
            out, wall, cpu = timed(fn)
            runs[name]["wall"].append(wall)
            runs[name]["cpu"].append(cpu)
            mismatches[name] = max(
                mismatches[name], sum(a != b for a, b in zip(out, strings, strict=True))
            )
        print(".", end="", flush=True)

    # the whole evaluation: before (stock HFLM, templates compiled per use) and now (the scorer)
    whole: dict[str, dict[str, list[float]]] = {"before": {"wall": [], "cpu": []}}
    whole["now"] = {"wall": [], "cpu": []}
    item_mismatches = {"before": 0, "now": 0}
    for _ in range(args.repeat):
        items, wall, cpu = timed(lambda: evaluate_items(stock, task_dict))
        whole["before"]["wall"].append(wall)
        whole["before"]["cpu"].append(cpu)
        item_mismatches["before"] += sum(items[d] != reference[d] for d in reference)
        with LmEvalScorer([TASK], tokenizer=tok, task_dirs=[zoo / "tasks"], batch_size=bs) as now:
            now.score(model, limit=4)  # builds its FastHFLM
            items, wall, cpu = timed(lambda now=now: evaluate_items(now._lm, now.task_dict))
        whole["now"]["wall"].append(wall)
        whole["now"]["cpu"].append(cpu)
        item_mismatches["now"] += sum(items[d] != reference[d] for d in reference)
        print(".", end="", flush=True)
    print()

    def summary(r: dict[str, list[float]]) -> dict[str, float]:
        wall, cpu = min(r["wall"]), min(r["cpu"])
        return {"wall_s": round(wall, 3), "cpu_s": round(cpu, 3),
                "items_per_s": round(n / wall, 1), "items_per_cpu_s": round(n / cpu, 1)}  # fmt: skip

    base = summary(runs[next(iter(gen))])
    result: dict[str, Any] = {
        "task": TASK,
        "items": n,
        "model": "zoo math (8 layers, hidden 96, float32)",
        "batch_size": bs,
        "fast_rows": rows,
        "max_length": max_length,
        "torch_threads": torch.get_num_threads(),
        "cpus": os.cpu_count(),
        "repeat": args.repeat,
        "exact_match": sum(v[1] for v in reference.values()) / n,
        "generation": {},
        "evaluation": {},
    }
    for name, r in runs.items():
        s = summary(r)
        s["speedup_cpu"] = round(base["cpu_s"] / s["cpu_s"], 2)
        s["speedup_wall"] = round(base["wall_s"] / s["wall_s"], 2)
        s["items_differing"] = mismatches[name]
        result["generation"][name] = s
    for name, r in whole.items():
        s = summary(r)
        s["items_differing"] = item_mismatches[name]
        result["evaluation"][name] = s
    for key in ("cpu", "wall"):
        before, now = result["evaluation"]["before"], result["evaluation"]["now"]
        result["evaluation"][f"speedup_{key}"] = round(before[f"{key}_s"] / now[f"{key}_s"], 2)
    result["load_average_1min_after"] = round(os.getloadavg()[0], 2)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "generation_fitness.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    differing = [k for k, v in mismatches.items() if v] + [
        k for k, v in item_mismatches.items() if v
    ]
    if differing:
        print(f"items differ from lm-eval's stock path: {', '.join(differing)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
