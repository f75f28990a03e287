"""The zoo's lm-eval tasks: local jsonl data and YAML configs, written into ``ZOO/tasks``.

Each skill has a report split, a multiple-choice task named for the skill (``zoo_math``:
log-likelihood of each choice after the prompt, metric ``acc``) with a generate-until twin
(``zoo_math_gen``: greedy answer, metric ``exact_match``), and a disjoint fitness split
(``zoo_math_fit``, multiple choice), the one a search may optimise on. The YAML files read
their jsonl through ``zoo_data.py`` beside them (:mod:`splice.zoo.zoo_data`, copied there,
named by the template :data:`TEMPLATE` they include, so each task file stays plain YAML),
which finds a relative path in its own folder: ``ZOO/tasks`` works as it is with lm-eval from
any current folder, moved or committed (``lm_eval --include_path ZOO/tasks --tasks
zoo_math``). The scorers write their own copy into a temporary folder, naming the zoo's jsonl by
absolute path, and leave the zoo untouched (:class:`splice.lmeval.LmEvalScorer`).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from splice.errors import SpliceError
from splice.zoo.corpus import Item, lang_items, math_items
from splice.zoo.world import World

SKILLS = ("zoo_math", "zoo_lang", "zoo_math_lang")
MC_TASKS = SKILLS  # the report splits
FIT_TASKS = tuple(f"{s}_fit" for s in SKILLS)  # the fitness splits
GEN_TASKS = tuple(f"{s}_gen" for s in SKILLS)
ALL_TASKS = MC_TASKS + FIT_TASKS + GEN_TASKS
DATA = SKILLS + FIT_TASKS  # one jsonl each (the _gen tasks read their skill's report split)
TAG = "zoo"
#: the module the YAML files load their jsonl with (``custom_dataset``), beside them
LOADER = "zoo_data.py"
#: the template every task YAML includes: the loader (lm-eval indexes no file of this name,
#: which does not end in ``.yaml``; the ``!function`` tag stays out of the task files)
TEMPLATE = "_zoo_template_yaml"


def test_items(world: World, seed: int, split: str = "report") -> dict[str, list[Item]]:
    """Held-out items per skill of one split (``report`` or ``fit``; see
    :mod:`splice.zoo.corpus` for how they are kept apart)."""
    return {
        "zoo_math": math_items(world, seed, zeta=False, split=split),
        "zoo_lang": lang_items(world, seed, split=split),
        "zoo_math_lang": math_items(world, seed, zeta=True, split=split),
    }


def all_items(world: World, seed: int) -> dict[str, list[Item]]:
    """Every task's items by data name: the report splits (``zoo_math``) and the fitness
    splits (``zoo_math_fit``)."""
    fit = {f"{k}_fit": v for k, v in test_items(world, seed, "fit").items()}
    return {**test_items(world, seed, "report"), **fit}


def _yaml(name: str, data: str, generate: bool) -> str:
    """A task's YAML; ``data``: its jsonl, relative to the YAML's folder or absolute."""
    head = (
        f"include: {TEMPLATE}\n"
        f"task: {name}\n"
        f"tag: [{TAG}]\n"
        "dataset_kwargs:\n"
        "  data_files:\n"
        f"    test: {json.dumps(data)}\n"
        "test_split: test\n"
        'doc_to_text: "{{prompt}}"\n'
    )
    if not generate:
        return head + (
            "output_type: multiple_choice\n"
            'doc_to_choice: "{{choices}}"\n'
            'doc_to_target: "{{gold}}"\n'
            'target_delimiter: " "\n'
            "metric_list:\n"
            "  - metric: acc\n"
            "    aggregation: mean\n"
            "    higher_is_better: true\n"
        )
    return head + (
        "output_type: generate_until\n"
        'doc_to_target: "{{answer}}"\n'
        'target_delimiter: " "\n'
        "generation_kwargs:\n"
        '  until: ["<eos>", "?", "."]\n'
        "  do_sample: false\n"
        "  max_gen_toks: 6\n"
        "filter_list:\n"
        "  - name: strip\n"
        "    filter:\n"
        "      - function: remove_whitespace\n"
        "      - function: take_first\n"
        "metric_list:\n"
        "  - metric: exact_match\n"
        "    aggregation: mean\n"
        "    higher_is_better: true\n"
    )


def write_data(items: dict[str, list[Item]], folder: str | os.PathLike[str]) -> None:
    """One ``<name>.jsonl`` per task data (``zoo_math``, ``zoo_math_fit``, ...): ``prompt``,
    ``choices`` (no leading space), ``gold``, ``answer``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for skill, rows in items.items():
        with open(folder / f"{skill}.jsonl", "w") as f:
            for it in rows:
                choices = [c.strip() for c in it.choices]
                doc = {"prompt": it.prompt, "choices": choices, "gold": it.gold}
                doc["answer"] = choices[it.gold]
                f.write(json.dumps(doc) + "\n")


def write_tasks(folder: str | os.PathLike[str], data: str | os.PathLike[str] | None = None) -> Path:
    """(Re)write the YAML configs in ``folder`` with their template (:data:`TEMPLATE`) and
    loader (:data:`LOADER`), for the jsonl files in ``data`` (default: beside them, named
    relative to the folder; elsewhere: by absolute path); returns ``folder``. ``SpliceError``
    if a jsonl file is missing."""
    folder = Path(folder).resolve()
    data_dir = Path(data).resolve() if data is not None else folder
    for name in DATA:
        file = data_dir / f"{name}.jsonl"
        if not file.is_file():
            raise SpliceError(f"{file}: missing; not a built zoo (run `splice zoo build`)")
        ref = file.name if data_dir == folder else str(file)
        (folder / f"{name}.yaml").write_text(_yaml(name, ref, generate=False))
        if name in SKILLS:
            (folder / f"{name}_gen.yaml").write_text(_yaml(f"{name}_gen", ref, generate=True))
    shutil.copyfile(Path(__file__).with_name(LOADER), folder / LOADER)
    (folder / TEMPLATE).write_text(
        f"dataset_path: json\ncustom_dataset: !function {LOADER.removesuffix('.py')}.load\n"
    )
    return folder


def check_data(folder: str | os.PathLike[str]) -> None:
    """``SpliceError`` naming the file and line if a task's jsonl is missing or malformed."""
    for name in DATA:
        file = Path(folder) / f"{name}.jsonl"
        try:
            lines = file.read_text().splitlines()
        except FileNotFoundError:
            raise SpliceError(
                f"{file}: missing; not a built zoo (run `splice zoo build`)"
            ) from None
        except (OSError, UnicodeDecodeError) as e:
            raise SpliceError(f"{file}: cannot read it ({e})") from None
        if not any(line.strip() for line in lines):
            raise SpliceError(f"{file}: no items")
        for n, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                doc = json.loads(line)
                ok = (
                    isinstance(doc, dict)
                    and isinstance(doc.get("prompt"), str)
                    and isinstance(doc.get("choices"), list)
                    and isinstance(doc.get("gold"), int)
                    and 0 <= doc["gold"] < len(doc["choices"])
                    and isinstance(doc.get("answer"), str)
                )
            except ValueError:
                ok = False
            if not ok:
                raise SpliceError(
                    f"{file}:{n}: not a zoo task item (a JSON object with prompt, choices, gold "
                    "and answer)"
                )
