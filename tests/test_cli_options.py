"""The CLI's options agree across verbs: one name, one meaning, one type, one default.

Every verb's parser is built the way ``splice VERB`` builds it (:func:`splice.cli.build_parser`
with that verb only), sub-verbs included (``analyze weights``, ``zoo eval``, ...). The few names
that mean different things on different verbs are listed in :data:`DIFFERENT`, each with why.
"""

from __future__ import annotations

import argparse
from collections import defaultdict

import pytest

from splice import cli
from splice.cli import DEVICE_DEFAULT, build_parser, thread_count

VERBS = {
    "inspect", "convert", "eval", "merge", "analyze", "zoo", "upscale", "prune", "heal",
    "slice", "collapse", "evolve", "tokensurgeon", "extract-lora",
}  # fmt: skip

#: option names that are, on purpose, different options on different verbs
DIFFERENT = {
    "--seed": "merge: DARE/DELLA's seed; heal: windows and LoRA init (default 0); zoo build: "
    "the build's seed, checked",
    "--workers": "merge: tensors in flight (default 2); evolve: scoring processes (default 1)",
    "--top-k": "analyze tasks: a fraction of entries; collapse: experts per token",
    "--by": "prune: the layer metric (angular, influence); collapse --prune: the expert "
    "criterion (naee, frequency, reap)",
    "--max-tokens": "eval: score only the first N tokens; heal: text tokens read (default 2M)",
    "--dtype": "the output dtype everywhere, with each writer's own default and help text",
    "--seq-len": "analyze activations needs 2 or more (its first token is excluded)",
    "--device": "merge defaults to cpu, evolve to its config's (test_device_default)",
    "--method": "collapse: how experts become one MLP (uniform, frequency, slice); tokensurgeon: "
    "how a missing token's rows are approximated (omp, mean, ...)",
}

#: verbs (and sub-verbs) that print a report, each of which takes --json
REPORTS = [
    "inspect", "eval", "upscale", "prune", "heal", "slice", "collapse", "zoo eval",
    "analyze weights", "analyze experts", "analyze tasks", "analyze activations", "tokensurgeon",
    "extract-lora",
]  # fmt: skip


def _parsers() -> dict[str, argparse.ArgumentParser]:
    """``{"verb": parser, "analyze weights": parser, ...}`` for every verb and sub-verb."""
    found: dict[str, argparse.ArgumentParser] = {}

    def walk(name: str, parser: argparse.ArgumentParser) -> None:
        subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        if name:
            found[name] = parser
        for action in subs:
            for verb, sub in action.choices.items():
                walk(f"{name} {verb}".strip(), sub)

    for verb in sorted(cli._verbs()):
        top = build_parser(verb)
        action = next(a for a in top._actions if isinstance(a, argparse._SubParsersAction))
        walk(verb, action.choices[verb])
    return found


PARSERS = _parsers()


def _options() -> dict[str, list[tuple[str, argparse.Action]]]:
    """Each option string -> ``[(verb, action), ...]``; deprecated aliases (hidden) left out."""
    table: dict[str, list[tuple[str, argparse.Action]]] = defaultdict(list)
    for verb, parser in PARSERS.items():
        for action in parser._actions:
            if action.help == argparse.SUPPRESS or isinstance(action, argparse._HelpAction):
                continue
            for option in action.option_strings:
                table[option].append((verb, action))
    return table


OPTIONS = _options()


def _action(verb: str, option: str) -> argparse.Action:
    return next(a for a in PARSERS[verb]._actions if option in a.option_strings)


def test_every_verb_builds():
    assert {v.split()[0] for v in PARSERS} == VERBS
    assert {"analyze weights", "analyze activations", "zoo build", "zoo eval"} <= set(PARSERS)


def _meaning(action: argparse.Action) -> tuple:
    return (
        type(action).__name__,
        action.dest,
        action.type,
        action.metavar,
        action.default,
        action.nargs,
        tuple(action.choices) if action.choices else None,
    )


@pytest.mark.parametrize("option", sorted(set(OPTIONS) - set(DIFFERENT)))
def test_same_option_same_meaning(option):
    """An option on several verbs: the same action, dest, type, metavar, default, choices."""
    meanings = defaultdict(list)
    for verb, action in OPTIONS[option]:
        meanings[_meaning(action)].append(verb)
    assert len(meanings) == 1, f"{option} differs across verbs: {dict(meanings)}"


SHARED = [
    "--device", "--threads", "--allow-pickle", "--trust-remote-code", "--no-progress",
    "--overwrite", "--max-shard-size", "--calibration", "--seq-len", "--max-samples",
    "--batch-size", "--calibration-dtype", "--include-path", "--json", "--ppl", "--tasks",
    "--zoo", "--limit",
]  # fmt: skip


@pytest.mark.parametrize("option", SHARED)
def test_shared_options_are_shared(option):
    """Each of the shared options is on two verbs or more (else it is no group's)."""
    assert len({v for v, _ in OPTIONS[option]}) >= 2, OPTIONS[option]


def test_threads_is_thread_count_everywhere():
    assert all(a.type is thread_count for _, a in OPTIONS["--threads"])


def test_seq_len_batch_size_calibration_defaults():
    for option, default in [("--seq-len", 128), ("--batch-size", 8), ("--max-samples", 64)]:
        assert {a.default for _, a in OPTIONS[option]} == {default}, option
    for option, metavar in [("--calibration", "FILE"), ("--include-path", "DIR")]:
        assert {a.metavar for _, a in OPTIONS[option]} == {metavar}, option


def test_device_default():
    """``auto`` (cuda if there is one) everywhere, but merge (cpu: a seeded merge must not
    depend on the machine) and evolve (the config's device unless given)."""
    defaults = {verb: a.default for verb, a in OPTIONS["--device"]}
    assert defaults.pop("merge") == "cpu"
    assert defaults.pop("evolve") is None
    assert set(defaults.values()) == {DEVICE_DEFAULT} == {"auto"}, defaults
    assert {"eval", "upscale", "heal", "analyze weights", "analyze activations"} <= set(defaults)


@pytest.mark.parametrize("verb", REPORTS)
def test_report_verbs_take_json(verb):
    assert _action(verb, "--json").default is False


def test_evolve_takes_json():
    assert _action("evolve", "--json").default is False


def test_dtype_is_the_output_dtype_everywhere():
    """``--dtype`` only on verbs that write a checkpoint (which also take --max-shard-size)."""
    for verb, _ in OPTIONS["--dtype"]:
        assert "--max-shard-size" in PARSERS[verb]._option_string_actions, verb


# ---- deprecated aliases ---------------------------------------------------------------------
def _parse(argv, capsys):
    args = build_parser(argv[0]).parse_args(argv)
    return args, capsys.readouterr().err


def test_heal_text_is_calibration(capsys):
    base = ["heal", "M", "O", "--steps", "1"]
    args, err = _parse([*base, "--text", "t.txt"], capsys)
    assert args.calibration == "t.txt" and not hasattr(args, "text")
    assert err == "splice: warning: --text is deprecated; use --calibration\n"
    args, err = _parse([*base, "--calibration", "t.txt"], capsys)
    assert args.calibration == "t.txt" and err == ""


def test_heal_needs_a_text(tmp_path, capsys):
    assert cli.main(["heal", str(tmp_path), str(tmp_path / "o"), "--steps", "1"]) == 2
    err = capsys.readouterr().err
    assert err == "splice: error: heal: give the training text with --calibration FILE\n"


def test_evolve_tasks_dir_is_include_path(capsys):
    args, err = _parse(["evolve", "c.yml", "--out", "r", "--tasks-dir", "T"], capsys)
    assert args.include_path == "T" and not hasattr(args, "tasks_dir")
    assert err == "splice: warning: --tasks-dir is deprecated; use --include-path\n"
    args, err = _parse(["evolve", "c.yml", "--out", "r", "--include-path", "T"], capsys)
    assert args.include_path == "T" and err == ""


def test_evolve_resume_refuses_include_path(capsys):
    assert cli.main(["evolve", "resume", "RUN", "--include-path", "T"]) == 2
    assert "--include-path does not apply" in capsys.readouterr().err


def test_aliases_are_hidden():
    assert "--text" not in PARSERS["heal"].format_help()
    assert "--tasks-dir" not in PARSERS["evolve"].format_help()


# ---- --json on the analyses ----------------------------------------------------------------
def test_analyze_json_prints_the_report(tiny_models, tmp_path, capsys):
    import json

    model = str(tiny_models["llama"])
    out = tmp_path / "rep"
    argv = ["analyze", "weights", model, "--json", "--no-baselines", "--device", "cpu"]
    assert cli.main([*argv, "--out", str(out), "--no-figures"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["out"] == str(out) and (out / "report.json").is_file()
    saved = json.loads((out / "report.json").read_text())
    assert set(saved) <= set(data)
    assert cli.main(argv) == 0
    assert json.loads(capsys.readouterr().out)["out"] is None


def test_evolve_json(trio, tmp_path, capsys):
    """``evolve run`` and ``evolve report`` with --json print their data as JSON."""
    import json

    pytest.importorskip("cma")
    pytest.importorskip("lm_eval")
    from evolve_helpers import config_dict, write_config, write_tasks

    tasks = write_tasks(tmp_path / "tasks")
    cfg = write_config(tmp_path / "c.yml", config_dict(trio, tasks, generations=1, popsize=2))
    run = tmp_path / "run"
    assert cli.main(["evolve", str(cfg), "--out", str(run), "--no-progress", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["generation"] == 1 and data["best_recipe_path"] == str(run / "best.yml")
    assert cli.main(["evolve", "report", str(run), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["generation"] == 1 and data["table"] is None and data["top"]
