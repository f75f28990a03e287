"""The tables of numbers in README.md and docs/*.md, written from the results' JSON files.

Every such table sits between two marker comments, ``<!-- table:NAME -->`` and
``<!-- /table:NAME -->``; :data:`TABLES` says which JSON file (``benchmarks/results/*.json``, or
the committed zoo's ``assets/zoo/zoo.json``) each one comes from and how it is drawn. A table is
never typed by hand: rerun a benchmark (it rewrites its JSON), then

    python scripts/doc_tables.py           # rewrite every marked table from the JSON
    python scripts/doc_tables.py --check   # exit 1 naming each table that differs (CI)

``tests/test_docs_tables.py`` fails when a marked table is not what this script writes now (a
hand edit, or a JSON changed without rerunning it). Plain ``json`` only: no torch, no numpy.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
RESULTS = Path("benchmarks") / "results"
#: the markdown files whose marked tables this script owns
DOCS = ("README.md", "docs/*.md")
MARKER = re.compile(r"<!-- table:([a-z0-9_-]+) -->\n(.*?)<!-- /table:\1 -->", re.S)
ANY_MARKER = re.compile(r"<!-- (/?)table:([^ ]*) -->")


class Sources:
    """The JSON files a table reads, from ``root`` (the repository, or a test's copy)."""

    def __init__(self, root: Path = ROOT) -> None:
        self.root = Path(root)
        self.read: list[Path] = []  # what the table being drawn read, for its source line

    def load(self, rel: str | Path) -> dict:
        self.read.append(Path(rel))
        return json.loads((self.root / rel).read_text())

    def result(self, name: str) -> dict:
        return self.load(RESULTS / name)


# ---- formatting ------------------------------------------------------------------------------


def _missing(x: object) -> bool:
    return x is None or (isinstance(x, float) and math.isnan(x))


def f(x: object, digits: int = 3) -> str:
    """A fixed number of decimals; ``-`` for a missing value."""
    return "-" if _missing(x) else f"{x:.{digits}f}"


def mb(x: object) -> str:
    return "-" if _missing(x) else f"{x:.0f}"


def diff(x: float) -> str:
    return "0" if x == 0 else f"{x:.2g}"


def table(header: list[str], rows: list[list[str]], *, text_columns: int = 1) -> list[str]:
    """Markdown lines: the first ``text_columns`` columns left-aligned, the rest right."""
    align = ["---"] * text_columns + ["---:"] * (len(header) - text_columns)
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(align) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return lines


def source_line(files: list[Path], command: str) -> str:
    """The line under a table: the JSON files it was drawn from and what writes them."""
    names = ", ".join(f"`{p.as_posix()}`" for p in dict.fromkeys(files))
    return f"*From {names} (`{command}`), drawn by `scripts/doc_tables.py`.*"


def layer_ranges(layers: list[int]) -> str:
    """``[0, 1, 2, 5, 6, 7]`` -> ``0-2, 5-7`` (output order, repeats kept)."""
    parts: list[list[int]] = []
    for i in layers:
        if parts and i == parts[-1][1] + 1:
            parts[-1][1] = i
        else:
            parts.append([i, i])
    return ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in parts)


# ---- the tables ------------------------------------------------------------------------------

ZOO_TASKS = ("zoo_math", "zoo_lang", "zoo_math_lang")


def merge_vs_mergekit(src: Sources) -> list[str]:
    data = src.result("merge.json")
    rows = [
        [
            recipe,
            f(r["splice_s"], 1),
            f(r["mergekit_s"], 1),
            f(r["time_ratio"], 2),
            mb(r["splice_rss_mb"]),
            mb(r["mergekit_rss_mb"]),
            f(r["rss_ratio"], 2),
            diff(r["max_abs_diff"]),
        ]
        for recipe, r in data.items()
    ]
    head = ["recipe", "splice s", "mergekit s", "time ratio", "splice peak RSS MB"]
    head += ["mergekit peak RSS MB", "RSS ratio", "max abs diff"]
    return table(head, rows)


def zoo_merges(src: Sources) -> list[str]:
    data = src.result("zoo_merges.json")
    tasks = [*ZOO_TASKS, "zoo_math_gen", "zoo_lang_gen", "zoo_math_lang_gen"]
    rows = [[model, *(f(s[t]) for t in tasks)] for model, s in data.items()]
    head = ["model", *(t.removeprefix("zoo_") for t in tasks)]
    return table(head, rows)


def tokensurgeon_zoo(src: Sources) -> list[str]:
    """``examples/tokensurgeon_zoo.py``: the zoo's base moved onto two other tokenizers."""
    data = src.result("tokensurgeon_zoo.json")
    rows = [
        [r["model"], r["tokenizer"], r.get("method") or "-", str(r.get("k") or "-"),
         str(r.get("exact", "-")), str(r.get("approximated", "-")), f"{r['ppl']:.4g}",
         f(r["bits_per_char"], 4)]
        for r in data["rows"]
    ]  # fmt: skip
    head = ["model", "tokenizer", "method", "k", "exact rows", "new rows", "ppl", "bits/char"]
    return table(head, rows, text_columns=3)


def extract_lora(src: Sources) -> list[str]:
    """``benchmarks/extract_lora.py`` at both sizes: splice against mergekit-extract-lora."""
    rows = []
    for name in ("extract_lora-small.json", "extract_lora.json"):
        data = src.result(name)
        errors = data.get("layer0_relative_errors", {})
        for tool, run in data["runs"].items():
            q = errors.get(tool, {}).get("model.layers.0.self_attn.q_proj")
            rows.append([f"{data['size_gb']:.2f} GB", tool, f(run["wall_s"], 1),
                         f(run["peak_rss_mb"], 0), f(q, 4)])  # fmt: skip
    head = ["checkpoints", "tool", "wall s", "peak RSS MB", "layer 0 q_proj error"]
    return table(head, rows, text_columns=2)


def core_io(src: Sources) -> list[str]:
    data = src.result("core_io.json")["runs"]
    cp = data["cp -r (reference)"]["wall_s"]
    rows = [
        [f"`{name}`", f(r["wall_s"], 2), f(r["wall_s"] / cp, 2), mb(r["peak_rss_mb"])]
        for name, r in data.items()
    ]
    return table(["command", "wall s", "x cp", "peak RSS MB"], rows)


def quant_io(src: Sources) -> list[str]:
    data = src.result("quant_io.json")
    cp = data["runs"]["cp -r bf16 (reference)"]["wall_s"]
    rows = [
        [f"`{name}`", f(r["wall_s"], 2), f(r["wall_s"] / cp, 2), mb(r["peak_rss_mb"])]
        for name, r in data["runs"].items()
    ]
    return table(["command", "wall s", "x cp bf16", "peak RSS MB"], rows)


def upscale(src: Sources) -> list[str]:
    data = src.result("upscale.json")
    cp = data["runs"]["cp -r (reference)"]["wall_s"]
    rows = []
    for name, r in data["runs"].items():
        gb = data["size_gb"] if name == "cp -r (reference)" else data["out_gb"]
        ratio = r["wall_s"] / cp
        rows.append(
            [
                name,
                f(gb, 2),
                f(r["wall_s"], 2),
                f(ratio, 2),
                f(ratio / (gb / data["size_gb"]), 2),
                mb(r["peak_rss_mb"]),
            ]
        )
    head = ["command", "GB written", "wall s", "x cp", "x cp per byte", "peak RSS MB"]
    return table(head, rows)


def analyze_weights(src: Sources) -> list[str]:
    files = {
        "default (`cosine,svd_cosine,frobenius,frobenius_rel`)": (
            "analyze_weights_cosine_svd_cosine_frobenius_frobenius_rel.json"
        ),
        "`all` (adds `eig_cosine`, `cka`)": "analyze_weights.json",
    }
    data = {label: src.result(name) for label, name in files.items()}
    rows = [[label, f(d["wall_s"], 0), mb(d["peak_rss_mb"])] for label, d in data.items()]
    out = table(["metrics", "wall s", "peak RSS MB"], rows)
    # where the time of the `all` run goes
    per = data["`all` (adds `eig_cosine`, `cka`)"]["seconds_per_metric"]
    out += ["", *table(["`all`: part", "s"], [[f"`{k}`", f(v, 0)] for k, v in per.items()])]
    return out


def _code(option: str) -> str:
    return f"`{option}`" if option.startswith("--") else option


def analyze_threads(src: Sources) -> list[str]:
    data = src.result("analyze_threads.json")
    rows = [
        [
            f"`splice {r['command']}`",
            "default, with `--out`" if r["options"].startswith("--out") else _code(r["options"]),
            f(r["wall_s"], 1),
            f(r["report_s"], 1),
            mb(r["peak_rss_mb"]),
        ]
        for r in data["zoo"]
    ]
    out = table(
        ["command (zoo)", "options", "wall s", "analysis s", "peak RSS MB"], rows, text_columns=2
    )
    sizes = [
        [" × ".join(map(str, r["shape"])), f(r["ms_1"], 1), f(r["ms_2"], 1), f(r["ratio"], 1)]
        for r in data["sizes"]
    ]
    out += ["", *table(["matrix", "1 thread ms", "2 threads ms", "2 / 1"], sizes)]
    return out


def _surgery_zoo(src: Sources, name: str) -> list[str]:
    """``examples/surgery_zoo.py``'s table; a row of random draws ("prune 2 random (mean of
    5)") has no one layer list, only the count its label gives."""
    data = src.result(name)
    depth = len(data["layers"][data["model"]])
    rows = []
    for label, s in data["table"].items():
        layers = data["layers"].get(label)
        if layers is None:  # the mean or median of the random draws
            count, where = depth - int(label.split()[1]), "-"
        elif label.endswith(" healed"):
            count, where = len(layers), "as before healing"
        else:
            count, where = len(layers), layer_ranges(layers)
        rows.append([label, str(count), where, f(s["ppl"]), *(f(s[t]) for t in ZOO_TASKS)])
    head = ["model", "layers", "source layers", "ppl", *ZOO_TASKS]
    return table(head, rows, text_columns=3)


def surgery_zoo(src: Sources) -> list[str]:
    return _surgery_zoo(src, "surgery_zoo.json")


def surgery_zoo_math(src: Sources) -> list[str]:
    return _surgery_zoo(src, "surgery_zoo_math.json")


def slice_zoo(src: Sources) -> list[str]:
    data = src.result("slice_zoo.json")
    rows = [
        [
            label,
            str(s["hidden"]),
            f(s["params (k)"], 1),
            f(s.get("params share"), 3),
            f(s.get("retained (mean)"), 3),
            f(s.get("retained (all, shared)"), 3),
            f(s["ppl"], 3),
            f(s["kl"] * 1e3, 2),
        ]
        for label, s in data["scores"].items()
    ]
    head = ["model", "hidden", "params (k)", "params share", "retained (mean)"]
    head += ["retained (all, shared)", "ppl", "KL ×10³"]
    return table(head, rows)


def _collapse_zoo(src: Sources, name: str) -> list[str]:
    data = src.result(name)
    rows = [
        [
            label,
            f(s["ppl"], 2),
            f(s["ppl en"], 3),
            f(s["ppl zeta"], 3),
            *(f(s[t]) for t in ZOO_TASKS),
            f(s["recon error"]),
        ]
        for label, s in data["scores"].items()
    ]
    head = ["model", "ppl", "ppl en", "ppl zeta", *ZOO_TASKS, "recon error"]
    return table(head, rows)


def collapse_zoo(src: Sources) -> list[str]:
    return _collapse_zoo(src, "collapse_zoo.json")


def collapse_zoo_prune(src: Sources) -> list[str]:
    return _collapse_zoo(src, "collapse_zoo_prune.json")


def collapse_memory(src: Sources) -> list[str]:
    files = ["collapse_memory.json", "collapse_memory-32layers.json"]
    data = [src.result(n) for n in files]
    runs: list[str] = []
    for d in data:
        runs += [r for r in d["runs"] if r not in runs]
    head = ["peak RSS MB"] + [
        f"{d['shape']['num_hidden_layers']} layers, {d['model_mb']:.0f} MB bf16" for d in data
    ]
    rows = [
        [name] + [mb(d["runs"].get(name, {}).get("peak_rss_mb")) for d in data] for name in runs
    ]
    return table(head, rows)


def collapse_memory_families(src: Sources) -> list[str]:
    data = src.result("collapse_memory_families.json")
    rows = []
    for family in data["families"]:
        per = data[family]
        sizes = sorted((k for k in per if k.isdigit()), key=int)
        for run in per["growth_mb"]:
            cells = [mb(per[n][run]["peak_rss_mb"]) for n in sizes]
            rows.append([family, run, *cells, mb(per["growth_mb"][run])])
    sizes = sorted((k for k in data[next(iter(data["families"]))] if k.isdigit()), key=int)
    head = ["family", "run", *(f"{n} layers MB" for n in sizes), "growth MB"]
    return table(head, rows, text_columns=2)


def evolve_zoo(src: Sources) -> list[str]:
    data = src.result("evolve_zoo.json")
    rows = [
        [data["kinds"][label], label, *(f(s[t]) for t in ZOO_TASKS)]
        for label, s in data["scores"].items()
    ]
    out = table(["kind", "model", *ZOO_TASKS], rows, text_columns=2)
    fit = ", ".join(t["name"] for t in data["fitness"])
    searches = [
        [
            name,
            str(r["candidates"]),
            str(r["generations"]),
            r.get("fitness", "full"),
            f"{r['item_evaluations']:,}" if r.get("item_evaluations") else "",
            f(r["best_fitness"]),
            f(r["wall_s"], 0),
            f(r["merge_s_mean"], 3),
            f(r["eval_s_mean"], 2),
        ]
        for name, r in data["searches"].items()
    ]
    head = ["search", "candidates", "generations", "fitness", "item evaluations"]
    head += [f"best fitness ({fit})", "wall s", "merge s (mean)", "eval s (mean)"]
    out += ["", *table(head, searches)]
    return out


def dfs_paths_zoo(src: Sources) -> list[str]:
    data = src.result("dfs_paths_zoo.json")
    rows = []
    for r in data["rows"]:
        donor = r["donor"] if r["recipe"] else f"{r['donor']} embeddings, {r['head']} norm + head"
        rows.append([r["path"], donor, *(f(r[t]) for t in ZOO_TASKS)])
    return table(["path", "donor", *ZOO_TASKS], rows, text_columns=2)


def evolve_search(src: Sources) -> list[str]:
    files = {"zoo": "evolve_search.json", "tiny Llama": "evolve_search_tiny.json"}
    rows = []
    for setup, name in files.items():
        d = src.result(name)
        for r in d["runs"]:
            rows.append(
                [
                    setup,
                    str(r["workers"]),
                    str(r["candidates"]),
                    f(r["wall_s"], 1),
                    f(r["merge_s_median"], 3),
                    f(r["eval_s_median"], 3),
                    f(r["candidates_per_minute_median"], 0),
                    f(d.get("load_average_1min_after"), 2),
                ]
            )
    head = ["setup", "workers", "candidates", "wall s", "merge s", "eval s", "candidates / min"]
    head += ["load after"]
    return table(head, rows)


def generation_fitness(src: Sources) -> list[str]:
    """``benchmarks/generation_fitness.py``: splice's greedy generator against lm-eval's HFLM."""
    d = src.result("generation_fitness.json")
    rows = [
        [name, f(r["wall_s"], 2), f(r["cpu_s"], 2), f(r["items_per_cpu_s"], 0),
         f(r["speedup_cpu"], 2), str(r["items_differing"])]
        for name, r in d["generation"].items()
    ]  # fmt: skip
    tail = ["wall s", "CPU s", "items / CPU s", "x before (CPU)", "items differing"]
    out = table([f"generation alone ({d['items']} items)", *tail], rows)
    ev = d["evaluation"]
    labels = {
        "before": "lm-eval HFLM, templates compiled at each use (before)",
        "now": "LmEvalScorer: fast generation, templates compiled once (now)",
    }
    rows = [
        [label, f(ev[k]["wall_s"], 2), f(ev[k]["cpu_s"], 2), f(ev[k]["items_per_cpu_s"], 0),
         f(ev["before"]["cpu_s"] / ev[k]["cpu_s"], 2), str(ev[k]["items_differing"])]
        for k, label in labels.items()
    ]  # fmt: skip
    out += ["", *table(["whole evaluation (requests, generation, metrics)", *tail], rows)]
    return out


def evolve_scale(src: Sources) -> list[str]:
    d = src.result("evolve_scale.json")
    evaluation = d["evaluation_s"]
    rows = [
        [
            "splice (resident sources, one live model)",
            f(d["splice_first_merge_s"], 1),
            f(d["splice_later_merge_s"], 1),
            f(100 * d["splice_later_merge_s"] / evaluation, 1) + " %",
            mb(d["splice_peak_rss_mb"]),
        ],
        [
            "mergekit-evolve (mergekit-yaml to disk, then from_pretrained)",
            f(d["mergekit_candidate_s"], 1),
            f(d["mergekit_candidate_s"], 1),
            f(100 * d["mergekit_candidate_s"] / evaluation, 1) + " %",
            "",
        ],
    ]
    head = ["path", "first candidate s", "later candidate s", "of its evaluation", "peak RSS MB"]
    note = (
        f"Evaluation: {d['items']} items x {f(d['item_s'], 2)} s (a {d['eval_dtype']} forward "
        f"pass over 512 tokens) = {f(evaluation, 0)} s a candidate."
    )
    return [*table(head, rows), "", note]


def evolve_path(src: Sources) -> list[str]:
    d = src.result("evolve_path.json")
    rows = [
        [
            d["recipe"],
            f(d["first_merge_s"], 2),
            f(d["later_merge_s_median"], 2),
            f(d["replanned_merge_s_median"], 2),
            str(d["bytes_read_by_later_merges"]),
            f"{d['eval_s']:.1f} ({d['eval_task']})",
        ]
    ]
    head = ["recipe", "first merge s", "later merges s", "re-planned s", "bytes read later"]
    head += ["scoring s"]
    return table(head, rows)


def _pareto_table(
    d: dict[str, Any], points: list[dict[str, Any]], column: str, cell: Callable, note: str
) -> list[str]:
    """A size-weight sweep's table: per point its series, model, ``column`` (``cell(point)``),
    parameters, size, the zoo's report splits and whether it is on the front; then ``note``."""
    rows = [
        [
            pt["kind"],
            f"size weight {pt['size_weight']:g}" if pt["kind"] == "search" else pt["label"],
            cell(pt),
            f"{pt['params']:,}",
            f(pt["size"], 3),
            *(f(pt["scores"][t]) for t in ZOO_TASKS),
            "**yes**" if pt["front"] else "",
        ]
        for pt in points
    ]
    head = ["series", "model", column, "parameters", "size", *ZOO_TASKS, f"front ({d['axis']})"]
    return [*table(head, rows, text_columns=3), "", note]


def pareto_zoo(src: Sources) -> list[str]:
    d = src.result("pareto_zoo.json")
    runs = list(d["searches"].values())
    note = (
        f"{len(runs)} search{'es' if len(runs) != 1 else ''} of {', '.join(sorted({str(r['candidates']) for r in runs}))} "
        f"candidates; the sweep took {f(d['wall_s'] / 60, 1)} min on {d['threads']} thread "
        f"(searches {f(d['search_s'], 0)} s, naive merge and prunes {f(d['naive_s'], 0)} s, "
        f"report scoring {f(d['report_s'], 0)} s)."
    )
    return _pareto_table(d, d["points"], "layers kept", lambda pt: layer_ranges(pt["layers"]), note)


def pareto_moe_zoo(src: Sources) -> list[str]:
    d = src.result("pareto_moe_zoo.json")
    runs = list(d["searches"].values())
    fevals = ", ".join(sorted({str(r["candidates"]) for r in runs}))
    note = (
        f"{len(runs)} searches of {fevals} candidates (fitness {d['fitness'][0]['name']}); the "
        f"sweep took {f(d['wall_s'] / 60, 1)} min on {d['threads']} thread (searches "
        f"{f(d['search_s'], 0)} s, pruning {f(d['prune_s'], 0)} s, report scoring "
        f"{f(d['report_s'], 0)} s)."
    )
    points = sorted(d["points"], key=lambda p: (-p["experts"], p["kind"] != "moe", p["label"]))
    return _pareto_table(d, points, "experts per layer", lambda pt: str(pt["experts"]), note)


def evolve_mergekit(src: Sources) -> list[str]:
    d = src.result("evolve_mergekit.json")
    cols = ["zoo_math_lang", "zoo_math", "zoo_lang"]
    rows = []
    for label, scores in d["report"].items():
        kind = (
            "seeded grid"
            if label.startswith("grid: ") or label.endswith("(start)")
            else ("evolved" if label == "winner" else "baseline")
        )
        name = label.removeprefix("grid: ")
        rows.append([kind, name, *(f(scores[c]) for c in cols)])
    best = d["best_naive"]
    rows.insert(
        3, ["zoo's naive grid", f"best: {best}", *(f(d["zoo_naive"][best][c]) for c in cols)]
    )
    note = (
        f"`{d['config']}` run by `splice evolve --max-fevals 200`: {d['candidates']} candidates "
        f"in {f(d['search_s'] / 60, 1)} min, {d['restarts']} restart"
        f"{'s' if d['restarts'] != 1 else ''}; best fitness {f(d['best_fitness'])} against the "
        f"seeded grid's {f(d['grid_best_fitness'])} on the fitness split (zoo_math_lang_fit)."
    )
    return [*table(["kind", "model", *cols], rows, text_columns=2), "", note]


def evolve_fitness(src: Sources) -> list[str]:
    d = src.result("evolve_fitness.json")
    rows = []
    for r in d["runs"]:
        mae = (
            ""
            if r["estimate_mae"] is None
            else f"{f(r['estimate_mae'])} ({r['estimates_checked']})"
        )
        rows.append(
            [
                r["mode"],
                str(r["seed"]),
                str(r["candidates"]),
                str(r["fully_scored"]),
                f"{r['item_evaluations']:,}",
                f(r["best_fitness"]),
                f"{f(r['report'])} ± {f(r['report_se'])}",
                mae,
                f(r["wall_s"], 0),
            ]
        )
    head = ["fitness", "seed", "candidates", "fully scored", "item evaluations",
            "best fitness", "report zoo_math_lang ± SE", "estimate error (n)", "wall s"]  # fmt: skip
    means = [
        f"{m}: {v['item_evaluations_mean']:,} items ({f(v.get('fewer_items_x', 1), 2)}x fewer), "
        f"report {f(v['report_mean'])} ({v.get('report_minus_full', 0):+.3f} against full)"
        + (
            f", within one SE of full's winner or above it on {v['seeds_within_one_se']} of "
            f"{v['seeds']} seeds"
            if m != "full" and "seeds" in v
            else ""
        )
        for m, v in d["summary"].items()
    ]
    return [
        *table(head, rows, text_columns=1),
        "",
        "Means over the seeds: " + "; ".join(means) + ".",
    ]


def zoo_acceptance(src: Sources) -> list[str]:
    zoo = Path("assets") / "zoo" / "zoo.json"
    data = src.load(zoo)["acceptance"]
    rows = [
        [c["name"], f"`{c['bound']}`", f"{c['value']:g}", "yes" if c["passed"] else "**no**"]
        for c in data["criteria"]
    ]
    return table(["criterion", "bound", "value", "passed"], rows, text_columns=2)


def zoo_build(src: Sources) -> list[str]:
    zoo = Path("assets") / "zoo" / "zoo.json"
    data = src.load(zoo)
    steps, seconds = data["steps"], data["seconds"]
    names = list(dict.fromkeys([*steps, *seconds]))
    rows = [[n, str(steps.get(n, "-")), f(seconds.get(n), 0)] for n in names]
    return table(["stage", "steps", "seconds"], rows)


#: table name -> (the function that draws it, the command that writes its JSON)
TABLES: dict[str, tuple[Callable[[Sources], list[str]], str]] = {
    "merge-vs-mergekit": (merge_vs_mergekit, "python benchmarks/merge_vs_mergekit.py"),
    "zoo-merges": (zoo_merges, "python examples/zoo_merges.py"),
    "core-io": (core_io, "python benchmarks/core_io.py"),
    "upscale": (upscale, "python benchmarks/upscale.py"),
    "quant-io": (quant_io, "python benchmarks/quant_io.py"),
    "analyze-weights": (analyze_weights, "python benchmarks/analyze_weights.py"),
    "analyze-threads": (analyze_threads, "python benchmarks/analyze_threads.py"),
    "surgery-zoo": (surgery_zoo, "python examples/surgery_zoo.py"),
    "surgery-zoo-math": (surgery_zoo_math, "python examples/surgery_zoo.py --model math"),
    "slice-zoo": (slice_zoo, "python examples/slice_zoo.py --random 64,4"),
    "collapse-zoo": (collapse_zoo, "python examples/collapse_zoo.py"),
    "collapse-zoo-prune": (
        collapse_zoo_prune,
        'python examples/collapse_zoo.py --only "keep 2 prune,keep 3 prune"',
    ),
    "collapse-memory": (collapse_memory, "python benchmarks/collapse_memory.py"),
    "collapse-memory-families": (
        collapse_memory_families,
        "python benchmarks/collapse_memory_families.py",
    ),
    "evolve-zoo": (evolve_zoo, "python examples/evolve_zoo.py --fresh"),
    "dfs-paths-zoo": (dfs_paths_zoo, "python examples/dfs_paths_zoo.py"),
    "evolve-search": (evolve_search, "python benchmarks/evolve_search.py"),
    "evolve-path": (evolve_path, "python benchmarks/evolve_path.py"),
    "evolve-scale": (evolve_scale, "python benchmarks/evolve_scale.py"),
    "generation-fitness": (generation_fitness, "python benchmarks/generation_fitness.py"),
    "evolve-mergekit": (evolve_mergekit, "python benchmarks/evolve_mergekit.py"),
    "evolve-fitness": (evolve_fitness, "python benchmarks/evolve_fitness.py"),
    "pareto-zoo": (pareto_zoo, "python examples/pareto_zoo.py --fresh"),
    "pareto-moe-zoo": (pareto_moe_zoo, "python examples/pareto_moe_zoo.py --fresh"),
    "tokensurgeon-zoo": (tokensurgeon_zoo, "python examples/tokensurgeon_zoo.py"),
    "extract-lora": (
        extract_lora,
        "python benchmarks/extract_lora.py --size small; python benchmarks/extract_lora.py",
    ),
    "zoo-acceptance": (zoo_acceptance, "splice zoo build"),
    "zoo-build": (zoo_build, "splice zoo build"),
}


# ---- the markdown files ----------------------------------------------------------------------


def render(name: str, src: Sources | None = None) -> str:
    """What the region of table ``name`` holds: the table, a blank line and its source line,
    each line ending in a newline."""
    if name not in TABLES:
        raise KeyError(f"unknown table {name!r} (known: {', '.join(TABLES)})")
    draw, command = TABLES[name]
    src = src or Sources()
    src.read = []
    lines = [*draw(src), "", source_line(src.read, command)]
    return "\n".join(lines) + "\n"


def marker_problems(text: str) -> list[str]:
    """Markers that do not pair up, nest, or name no known table."""
    problems, open_name = [], None
    for m in ANY_MARKER.finditer(text):
        closing, name = m.group(1) == "/", m.group(2)
        if name not in TABLES:
            problems.append(f"unknown table {name!r}")
        if not closing:
            if open_name is not None:
                problems.append(f"table:{name} opens inside table:{open_name}")
            open_name = name
        elif open_name != name:
            problems.append(f"/table:{name} closes {'nothing' if open_name is None else open_name}")
            open_name = None
        else:
            open_name = None
    if open_name is not None:
        problems.append(f"table:{open_name} is never closed")
    return problems


def regions(text: str) -> list[tuple[str, str]]:
    """``(name, body)`` of every marked table in ``text``, in order."""
    return [(m.group(1), m.group(2)) for m in MARKER.finditer(text)]


def rewrite(text: str, src: Sources | None = None) -> str:
    """``text`` with every marked table drawn anew."""
    src = src or Sources()
    return MARKER.sub(
        lambda m: (
            f"<!-- table:{m.group(1)} -->\n{render(m.group(1), src)}<!-- /table:{m.group(1)} -->"
        ),
        text,
    )


def doc_files(root: Path = ROOT) -> list[Path]:
    files: list[Path] = []
    for pattern in DOCS:
        files += sorted(root.glob(pattern))
    return files


def check(root: Path = ROOT, src: Sources | None = None) -> list[str]:
    """One line per problem: a table that is not what :func:`rewrite` writes, a bad marker."""
    src = src or Sources(root)
    problems = []
    for path in doc_files(root):
        text = path.read_text()
        rel = path.relative_to(root)
        problems += [f"{rel}: {p}" for p in marker_problems(text)]
        for (name, body), (_, want) in zip(regions(text), regions(rewrite(text, src)), strict=True):
            if body != want:
                problems.append(f"{rel}: table:{name} differs from its JSON")
    return problems


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--check", action="store_true", help="write nothing; exit 1 if a table differs")
    ap.add_argument("--print", metavar="NAME", help="print one table (to paste its markers around)")
    args = ap.parse_args(argv)
    if args.print:
        sys.stdout.write(render(args.print))
        return 0
    if args.check:
        problems = check()
        for p in problems:
            print(p, file=sys.stderr)
        if problems:
            print("run: python scripts/doc_tables.py", file=sys.stderr)
            return 1
        print(f"every marked table is its JSON's ({len(TABLES)} tables)")
        return 0
    bad = [
        f"{p.relative_to(ROOT)}: {m}" for p in doc_files() for m in marker_problems(p.read_text())
    ]
    if bad:
        print("\n".join(bad), file=sys.stderr)
        return 1
    for path in doc_files():
        text = path.read_text()
        new = rewrite(text)
        if new != text:
            path.write_text(new)
            print(f"rewrote {path.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
