"""``splice eval --tasks`` takes any lm-eval task: the zoo's by name, a YAML file, the tasks
of ``--include-path DIR``, lm-eval's own (hellaswag, passed through to lm-eval), with
``--num-fewshot N`` and ``--limit N``. The zoo's task files in ``ZOO/tasks`` work with lm-eval
as they are, from any current folder and copied elsewhere (``zoo_data.py`` beside them reads a
relative data path from its own folder). The accuracy is checked against a multiple-choice
log-likelihood computed by hand from the model's logits."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
import yaml

from splice.cli import main
from splice.errors import SpliceError
from splice.lmeval import LmEvalScorer, local_tasks, yaml_task
from splice.scoring import resolve_tasks, task_columns
from splice.zoo.tasks import ALL_TASKS, TEMPLATE, write_tasks

CPU = ["--device", "cpu", "--json"]


def _eval(args, capsys) -> tuple[int, dict | str]:
    code = main(["eval", *args, *CPU])
    out = capsys.readouterr()
    return code, (json.loads(out.out) if code == 0 else out.err)


def hand_accuracy(folder, jsonl, limit: int) -> float:
    """lm-eval's ``acc`` recomputed: for each of the first ``limit`` items, the choice whose
    tokens after the prompt (``prompt + " " + choice`` tokenized whole, BOS first, minus the
    prompt's tokens) have the largest summed log-probability; the share where it is gold."""
    from transformers import AutoModelForCausalLM

    from splice.modeling import load_tokenizer

    tok = load_tokenizer(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    docs = [json.loads(line) for line in jsonl.read_text().splitlines()[:limit]]
    right = 0
    for doc in docs:
        context = tok.encode(doc["prompt"])
        scores = []
        for choice in doc["choices"]:
            whole = tok.encode(doc["prompt"] + " " + choice)
            with torch.no_grad():
                logp = model(torch.tensor([whole])).logits[0, :-1].float().log_softmax(-1)
            cont = range(len(context), len(whole))
            scores.append(sum(float(logp[i - 1, whole[i]]) for i in cont))
        right += int(max(range(len(scores)), key=scores.__getitem__) == doc["gold"])
    return right / len(docs)


def test_zoo_task_files_work_with_lm_eval_from_anywhere(zoo, tmp_path, monkeypatch):
    """``lm_eval --include_path ZOO/tasks --tasks zoo_math`` as lm-eval's TaskManager does it,
    from another current folder, and on a copy of the folder whose data was cut to 10 items
    (the copy's YAML files read the data beside them, not the zoo's)."""
    copy = tmp_path / "copied-tasks"
    shutil.copytree(zoo / "tasks", copy)
    for data in ("zoo_math", "zoo_lang"):
        lines = (copy / f"{data}.jsonl").read_text().splitlines(keepends=True)
        (copy / f"{data}.jsonl").write_text("".join(lines[:10]))
    monkeypatch.chdir(tmp_path)
    for folder in (zoo / "tasks", copy):
        manager = local_tasks([folder])
        assert set(ALL_TASKS) | {"zoo"} <= set(manager.all_tasks)
        loaded = manager.load(["zoo_math", "zoo_lang_gen"])["tasks"]
        for name, data in (("zoo_math", "zoo_math"), ("zoo_lang_gen", "zoo_lang")):
            docs = list(loaded[name].test_docs())
            rows = [json.loads(x) for x in (folder / f"{data}.jsonl").read_text().splitlines()]
            assert [d["prompt"] for d in docs] == [r["prompt"] for r in rows]
            assert len(docs) == (10 if folder == copy else 500 if name == "zoo_math" else 512)


def test_write_tasks_names_data_relative_in_place_absolute_elsewhere(zoo, tmp_path):
    copy = tmp_path / "tasks"
    shutil.copytree(zoo / "tasks", copy)
    write_tasks(copy)
    assert 'test: "zoo_math.jsonl"' in (copy / "zoo_math.yaml").read_text()
    assert (copy / "zoo_data.py").read_bytes() == (zoo / "tasks" / "zoo_data.py").read_bytes()
    # the committed files are what write_tasks writes; each task file is plain YAML (the
    # !function tag lives in the template it includes, which lm-eval does not index)
    for f in [*zoo.joinpath("tasks").glob("*.yaml"), zoo / "tasks" / TEMPLATE]:
        assert (copy / f.name).read_text() == f.read_text(), f.name
    assert yaml.safe_load((copy / "zoo_math.yaml").read_text())["include"] == TEMPLATE
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    write_tasks(scratch, copy)
    assert f'test: "{copy / "zoo_math.jsonl"}"' in (scratch / "zoo_math.yaml").read_text()
    assert not list(scratch.glob("*.jsonl"))


def test_eval_a_yaml_task_end_to_end(zoo, capsys):
    """The zoo's task by name (the zoo), by --include-path and by YAML file: one number, the
    hand-computed multiple-choice accuracy."""
    base, limit = str(zoo / "base"), 40
    want = hand_accuracy(zoo / "base", zoo / "tasks" / "zoo_math.jsonl", limit)
    lim = ["--limit", str(limit)]
    for tasks in (
        ["--tasks", "zoo_math"],
        ["--tasks", "zoo_math", "--include-path", str(zoo / "tasks")],
        ["--tasks", str(zoo / "tasks" / "zoo_math.yaml")],
    ):
        code, got = _eval([base, *tasks, *lim], capsys)
        assert code == 0, got
        assert got == {base: {"zoo_math": pytest.approx(want, abs=1e-9)}}, tasks


def test_a_tag_scores_each_of_its_tasks(zoo, capsys):
    base = str(zoo / "base")
    code, got = _eval([base, "--tasks", "zoo", "--include-path", str(zoo / "tasks"),
                       "--limit", "4"], capsys)  # fmt: skip
    assert code == 0, got
    assert set(got[base]) == set(ALL_TASKS)


def test_num_fewshot_reaches_lm_eval(zoo, capsys):
    """Two examples in context: each task's prompt holds two solved items; the zoo's models
    never saw the blank-line separator, so math falls from its zero-shot accuracy."""
    with LmEvalScorer(["zoo_math"], tokenizer=None, task_dirs=[zoo / "tasks"], num_fewshot=2) as s:
        ((_, task),) = s.leaves()
        doc = task.test_docs()[0]
        context = task.fewshot_context(doc, num_fewshot=task.config.num_fewshot)
        assert task.config.num_fewshot == 2 and context.count("answer :") == 3
    math = str(zoo / "math")
    shots = {}
    for n in ("0", "3"):
        code, got = _eval(
            [math, "--tasks", "zoo_math", "--limit", "40", "--num-fewshot", n], capsys
        )
        assert code == 0, got
        shots[n] = got[math]["zoo_math"]
    assert shots["0"] > 0.9 and shots["3"] < shots["0"]


@pytest.mark.parametrize(
    ("tasks", "message"),
    [
        ("no_such_task_xyz", "unknown task no_such_task_xyz: not found among lm-eval's tasks"),
        ("zoo_chess", "unknown zoo task zoo_chess; choose from: zoo_math"),
        ("missing.yaml", "--tasks missing.yaml: no such task file"),
        (",", "--tasks names no task"),
    ],
)
def test_unknown_tasks_are_one_line_exit_2(tasks, message, zoo, capsys):
    code, err = _eval([str(zoo / "base"), "--tasks", tasks], capsys)
    assert code == 2 and message in err, err
    assert len(err.strip().splitlines()) == 1


def test_lm_evals_own_tasks_are_passed_through(zoo, capsys):
    """hellaswag is one of lm-eval's tasks: it goes to lm-eval, which (offline, without its
    data) says so in one line; with its data cached, it is scored."""
    base = str(zoo / "base")
    code, got = _eval([base, "--tasks", "hellaswag", "--limit", "2"], capsys)
    if code == 0:
        assert "hellaswag" in got[base]
    else:
        assert code == 2 and "lm-eval cannot load task hellaswag" in got, got
        assert len(got.strip().splitlines()) == 1


def test_bad_options_are_one_line(zoo, tmp_path, capsys):
    base = str(zoo / "base")
    for args, message in (
        (["--tasks", "zoo_math", "--num-fewshot", "-1"], "num_fewshot must be"),
        (["--tasks", "zoo_math", "--include-path", str(tmp_path / "no")], "no such folder"),
    ):
        code, err = _eval([base, *args], capsys)
        assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    (tmp_path / "empty.yaml").write_text("dataset_path: json\n")
    with pytest.raises(SpliceError, match="names no task"):
        yaml_task(tmp_path / "empty.yaml")


def test_resolve_tasks(zoo):
    assert resolve_tasks("zoo_math, zoo_lang").zoo == ("zoo_math", "zoo_lang")
    assert resolve_tasks("all").names == ALL_TASKS
    local = resolve_tasks("zoo_math", zoo / "tasks")
    assert local.zoo == () and local.dirs == (str(zoo / "tasks"),)
    by_file = resolve_tasks([str(zoo / "tasks" / "zoo_lang_gen.yaml")])
    assert by_file.names == ("zoo_lang_gen",) and by_file.dirs == (str(zoo / "tasks"),)


def test_task_columns():
    rows = {
        "zoo_math": {"acc,none": 0.5},
        "zoo_math_gen": {"exact_match,strip": 0.25},
        "hellaswag": {"acc,none": 0.3, "acc_norm,none": 0.4},
        "a": {"acc,none": 0.1},
        "b": {"f1,none": 0.2},
        "tag": {},
    }
    got = task_columns(rows, ["zoo_math", "zoo_math_gen", "hellaswag", "tag"], {"tag": ["a", "b"]})
    assert got == {
        "zoo_math": 0.5,
        "zoo_math_gen": 0.25,
        "hellaswag": 0.3,
        "hellaswag:acc_norm,none": 0.4,
        "a": 0.1,
        "b": 0.2,
    }
