"""README's architecture table: every verb of splice on every family of ``tests/families.py``
(dense, then MoE) and every multimodal model type of ``tests/mm_families.py`` (its language
model, the other modules kept).

``python scripts/arch_table.py`` runs the checks of ``tests/family_checks.py`` (tiny float32
models of each family against transformers' own model of it, built independently) in a
temporary folder, writes ``docs/architectures.json`` (the transformers version, then
family -> verb -> {status, detail}) and regenerates the table between the markers
``<!-- architectures:begin -->`` and ``<!-- architectures:end -->`` of README.md. Without the
markers it prints the table and leaves README.md alone.

``--check`` runs nothing: it exits 1 when README's table is not the one the JSON gives (or
README has no markers), 0 when it is. ``--from-json`` regenerates README's table from the
JSON without running the checks.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
JSON = ROOT / "docs" / "architectures.json"
README = ROOT / "README.md"
BEGIN, END = "<!-- architectures:begin -->", "<!-- architectures:end -->"
#: longest detail shown in a table cell (the JSON keeps the whole line)
CELL = 110

for key in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
    os.environ.setdefault(key, "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("OMP_NUM_THREADS", "1")


def _checks():
    """tests/families.py, tests/family_checks.py and every family they check, in order:
    dense, MoE, multimodal."""
    sys.path.insert(0, str(ROOT / "tests"))
    import families
    import family_checks
    import mm_families

    order = [*families.FAMILIES, *families.MOE_FAMILIES, *mm_families.MM_FAMILIES]
    return families, family_checks, order


def run_all(work: Path, only: list[str] | None = None) -> dict:
    """Every check of every family (``only``: these families) into ``work``; the JSON data."""
    import transformers

    families, fc, every = _checks()
    results: dict[str, dict[str, dict[str, str]]] = {}
    for family in only or every:
        results[family] = {}
        for verb in fc.VERBS:
            if not families.known(family):
                results[family][verb] = {
                    "status": "skipped",
                    "detail": f"transformers {transformers.__version__} has no model type",
                }
                continue
            start = time.perf_counter()
            outcome = fc.check(family, verb, work)
            took = time.perf_counter() - start
            results[family][verb] = outcome.as_dict()
            print(f"{family:12s} {verb:8s} {outcome.status:8s} {took:5.1f} s  {outcome.detail}",
                  file=sys.stderr, flush=True)  # fmt: skip
    return {"transformers": transformers.__version__, "verbs": list(fc.VERBS), "families": results}


def _cell(result: dict[str, str]) -> str:
    status, detail = result.get("status", "?"), result.get("detail", "")
    # a refusal's reason, without what the JSON repeats (the sparsity, the verb, the family)
    detail = re.sub(r"^(at \d+%: )?[\w ]+: architecture '[^']+' is not supported: ", "", detail)
    detail = re.sub(  # a multimodal model's: the same without the source's path
        r"^(at \d+%: )?(<source>: )?\w+: the language model of \w+ cannot be sliced in place: ",
        "",
        detail,
    )
    if len(detail) > CELL:
        detail = detail[: CELL - 1] + "…"
    detail = detail.replace("|", "\\|").replace("`", "'")
    if status == "pass":
        return "✓"
    if status == "refused":
        return f"refused: {detail}"
    if status == "skipped":
        return "–"
    return f"✗ fail: {detail}"


def table(data: dict) -> str:
    """The Markdown between the markers: a line naming the transformers version, the table."""
    verbs = data.get("verbs") or sorted({v for r in data["families"].values() for v in r})
    lines = [
        f"Checked with transformers {data['transformers']} by `python scripts/arch_table.py` "
        "(tiny float32 models against transformers' own; ✓ tested, refused: splice's one-line "
        "refusal, ✗ fail: what differed, – not applicable (collapse of a dense model); details "
        "in `docs/architectures.json`).",
        "",
        "| family | " + " | ".join(verbs) + " |",
        "|---|" + "---|" * len(verbs),
    ]
    for family, row in data["families"].items():
        cells = [_cell(row.get(v, {"status": "?", "detail": "not run"})) for v in verbs]
        lines.append(f"| {family} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def readme_table(text: str) -> str | None:
    """What README has between the markers (stripped), or None without them."""
    if BEGIN not in text or END not in text or text.index(BEGIN) > text.index(END):
        return None
    return text[text.index(BEGIN) + len(BEGIN) : text.index(END)].strip()


def write_readme(readme: Path, block: str) -> bool:
    """Put ``block`` between README's markers; False (README untouched) without markers."""
    text = readme.read_text() if readme.exists() else ""
    if readme_table(text) is None:
        return False
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    readme.write_text(f"{head}{BEGIN}\n{block}\n{END}{tail}")
    return True


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--check", action="store_true",
                    help="run nothing; exit 1 if README's table is not the JSON's")  # fmt: skip
    ap.add_argument("--from-json", action="store_true",
                    help="run nothing; rewrite README's table from the JSON")  # fmt: skip
    ap.add_argument("--json", type=Path, default=JSON, help=f"results file (default {JSON})")
    ap.add_argument("--readme", type=Path, default=README, help=f"(default {README})")
    ap.add_argument("--workdir", type=Path,
                    help="keep the sources and outputs here (default: a temporary folder)")  # fmt: skip
    ap.add_argument("--families", help="comma-separated families only (the JSON then has those)")
    args = ap.parse_args(argv)

    if args.check:
        if not args.json.exists():
            print(f"{args.json}: no such file (run scripts/arch_table.py first)", file=sys.stderr)
            return 1
        want = table(json.loads(args.json.read_text()))
        got = readme_table(args.readme.read_text() if args.readme.exists() else "")
        if got is None:
            print(f"{args.readme}: no {BEGIN} / {END} markers", file=sys.stderr)
            return 1
        if got != want.strip():
            print(f"{args.readme}: the architecture table differs from {args.json} "
                  "(run python scripts/arch_table.py --from-json)", file=sys.stderr)  # fmt: skip
            return 1
        print(f"{args.readme}: the architecture table is {args.json}'s")
        return 0

    if args.from_json:
        data = json.loads(args.json.read_text())
    else:
        only = [f.strip() for f in args.families.split(",") if f.strip()] if args.families else None
        start = time.perf_counter()
        if args.workdir:
            args.workdir.mkdir(parents=True, exist_ok=True)
            data = run_all(args.workdir, only)
        else:
            with tempfile.TemporaryDirectory(prefix="splice-arch-") as tmp:
                data = run_all(Path(tmp), only)
        print(f"checks took {time.perf_counter() - start:.0f} s", file=sys.stderr)
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n")
        print(f"wrote {args.json}", file=sys.stderr)

    block = table(data)
    if write_readme(args.readme, block):
        print(f"updated the table in {args.readme}", file=sys.stderr)
    else:
        print(block)
        print(f"\n{args.readme} has no {BEGIN} / {END} markers: the table is printed above, "
              f"{args.readme} is unchanged", file=sys.stderr)  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
