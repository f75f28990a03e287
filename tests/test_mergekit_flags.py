"""mergekit-yaml's flags on ``splice merge`` (:mod:`splice.merge.mergekit_flags`): the table
covers every option mergekit's own click parser defines, each flag parses, the mapped ones set
splice's options, the ignored ones print one note each, the refused ones one error, and an
unknown flag is still a usage error. mergekit is only introspected here, never run."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import pytest
import yaml
from safetensors import safe_open

from splice import cli
from splice.cli import build_parser
from splice.errors import SpliceError
from splice.merge import mergekit_flags as mf
from splice.merge.mergekit_flags import FLAGS, NO_LIMIT, OLDER, kmb_size

VALUES = {"DEVICE": "cpu", "N": "3", "SIZE": "2B", "DIR": "/tmp/somewhere", "DTYPE": "bfloat16"}


def mergekit_options() -> dict[str, bool]:
    """Every option string of ``mergekit-yaml``'s click command -> whether it takes a value."""
    run_yaml = pytest.importorskip("mergekit.scripts.run_yaml")
    import click

    found: dict[str, bool] = {}
    for param in run_yaml.main.params:
        if not isinstance(param, click.Option):
            continue  # CONFIG_FILE, OUT_PATH
        takes = not (param.is_flag or param.count)
        for name in [*param.opts, *param.secondary_opts]:
            found[name] = takes
    return found


def merge_parser() -> argparse.ArgumentParser:
    top = build_parser("merge")
    sub = next(a for a in top._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices["merge"]


def parse(*argv: str) -> argparse.Namespace:
    return build_parser("merge").parse_args(["merge", "r.yml", "out", *argv])


def test_table_covers_every_mergekit_option():
    theirs = mergekit_options()
    assert set(theirs) == set(FLAGS) - set(OLDER), "FLAGS must list exactly mergekit's flags"
    assert len(theirs) > 30 and {"--cuda", "-j", "-v", "--out-shard-size"} <= set(theirs)
    for name, takes in theirs.items():  # a flag takes a value in splice iff it does in mergekit
        assert (FLAGS[name].metavar is not None) == takes, name


def test_markdown_table_lists_every_flag_once():
    table = mf.markdown_table()
    lines = table.splitlines()
    assert lines[:2] == ["| mergekit-yaml flag | on `splice merge` |", "|---|---|"]
    shown = re.findall(r"`(-[-\w]+)(?: [A-Z]+)?`", "\n".join(r.split(" | ")[0] for r in lines[2:]))
    assert sorted(shown) == sorted(FLAGS)
    for line in lines[2:]:
        assert line.startswith("| `-") and line.endswith(" |") and line.count(" | ") == 1, line


@pytest.mark.parametrize("name", sorted(FLAGS))
def test_every_flag_parses(name):
    f = FLAGS[name]
    args = parse(name, *([VALUES[f.metavar]] if f.metavar else []))
    if f.kind == "same":  # splice's own option, visible in --help
        assert merge_parser()._option_string_actions[name].help != argparse.SUPPRESS
    if f.kind in ("ignored", "refused") or f.note:
        assert args.mergekit_flags == [name]
    else:
        assert args.mergekit_flags == ()


def test_mapped_flags_set_splice_options():
    args = parse(
        "--out-shard-size", "2B", "--random-seed", "7", "-j", "3", "--quiet", "--no-allow-crimes"
    )  # fmt: skip
    assert (args.max_shard_size, args.seed, args.threads, args.no_progress) == (
        2 * 10**9,
        7,
        3,
        True,
    )
    assert args.allow_crimes is False and args.mergekit_flags == ()
    same = parse("--max-shard-size", "2GB", "--seed", "7", "--threads", "3", "--no-progress")
    assert (same.max_shard_size, same.seed, same.threads) == ("2GB", 7, 3)
    assert parse("--num-threads", "5").threads == parse("-j5").threads == 5
    assert parse("--allow-crimes", "--no-allow-crimes").allow_crimes is False
    assert parse("--quiet", "--no-quiet").no_progress is False
    assert parse("--trust-remote-code").trust_remote_code is True
    assert parse("--trust-remote-code", "--no-trust-remote-code").trust_remote_code is False
    plain = parse()
    assert (plain.cuda, plain.device, plain.mergekit_flags) == (False, "cpu", ())
    assert plain.max_shard_size == "2GB" and plain.seed is None and plain.allow_crimes is False


def test_kmb_size_reads_mergekit_sizes():
    assert kmb_size("2B") == kmb_size("2b") == kmb_size("2000M") == 2 * 10**9
    assert kmb_size("500k") == 500_000 and kmb_size("1000") == 1000
    assert kmb_size("0") == NO_LIMIT  # mergekit: no limit, one shard
    for bad in ("2GB", "1.5B", "-1", "", "B", "two"):
        with pytest.raises(argparse.ArgumentTypeError, match="is not a size"):
            kmb_size(bad)


def test_bad_values_are_usage_errors(capsys):
    for argv in (["-j", "0"], ["--out-shard-size", "2GB"], ["--random-seed", "x"]):
        assert cli.main(["merge", "r.yml", "out", *argv]) == 2
        err = capsys.readouterr().err
        assert err.startswith("splice merge: error: argument") and err.count("\n") == 1, err


def test_unknown_flags_are_still_refused(capsys):
    for flag in ("--bogus", "--no-device", "--cudaa", "--out-shard", "-x"):
        assert cli.main(["merge", "r.yml", "out", flag]) == 2, flag
        err = capsys.readouterr().err
        assert "error:" in err and err.count("\n") == 1, err


def test_mergekit_flags_are_hidden_from_help():
    text = merge_parser().format_help()
    assert "--lazy-unpickle" in text and "accepted too" in text  # the epilog names them
    assert "--out-shard-size SIZE" not in text and "--no-copy-tokenizer" not in text


def test_notes_once_each_in_order():
    assert mf.notes([]) == []
    lines = mf.notes(["-v", "--lazy-unpickle", "-v", "--gpu-rich"])
    assert [line.split(" ", 1)[0].rstrip(":") for line in lines] == [
        "-v", "--lazy-unpickle", "--gpu-rich",
    ]  # fmt: skip
    assert lines[1] == f"--lazy-unpickle ignored: {mf.LAZY}"
    with pytest.raises(SpliceError, match=r"^--transformers-cache .*HF_HUB_CACHE"):
        mf.notes(["-v", "--transformers-cache"])


class Captured(Exception):
    pass


def merge_options(monkeypatch, *argv: str) -> dict:
    """The keyword arguments ``splice merge ... ARGV`` builds its MergeOptions from (nothing
    is read or run)."""
    import splice.merge.runner as runner

    seen: dict = {}

    def capture(**kw):
        seen.update(kw)
        raise Captured

    monkeypatch.setattr(runner, "MergeOptions", capture)
    with pytest.raises(Captured):
        cli.main(["merge", "r.yml", "out", *argv])
    return seen


@pytest.mark.parametrize(
    ("argv", "device"),
    [
        ([], "cpu"),
        (["--cuda"], "cuda"),
        (["--gpu-rich"], "cuda"),
        (["--cuda", "--device", "cuda:1"], "cuda:1"),
        (["--device", "auto", "--cuda"], "auto"),
        (["--cuda", "--no-cuda"], "cpu"),
        (["--device", "cuda:1"], "cuda:1"),
    ],
)
def test_cuda_is_device_cuda(monkeypatch, capsys, argv, device):
    kw = merge_options(monkeypatch, *argv)
    assert kw["device"] == device
    err = capsys.readouterr().err
    note = f"splice: note: --gpu-rich: {FLAGS['--gpu-rich'].note}\n"
    assert err == (note if "--gpu-rich" in argv else "")


def test_mapped_flags_reach_merge_options(monkeypatch, capsys):
    kw = merge_options(
        monkeypatch, "--out-shard-size", "20K", "--random-seed", "3", "-j", "2", "--quiet",
        "--allow-crimes", "--trust-remote-code",
    )  # fmt: skip
    assert (kw["max_shard_size"], kw["seed"], kw["threads"]) == (20_000, 3, 2)
    assert kw["show_progress"] is False and kw["allow_crimes"] and kw["trust_remote_code"]
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize(
    "argv", [["--transformers-cache", "/tmp/c"], ["--unsafe-truncate-embeddings"]]
)
def test_refused_flags_are_one_error_line(tmp_path, capsys, argv):
    out = tmp_path / "out"
    assert cli.main(["merge", str(tmp_path / "r.yml"), str(out), "-v", *argv]) == 2
    err = capsys.readouterr().err
    why = FLAGS[argv[0]].note
    assert err == f"splice: error: {argv[0]} (mergekit-yaml's) is not supported: {why}\n"
    assert not out.exists()


def shards(folder: Path) -> dict[str, list[str]]:
    found = {}
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(f, "pt") as st:
            found[f.name] = sorted(st.keys())
    return found


def test_the_issues_mergekit_command_runs(trio, tmp_path, capsys):
    """``mergekit-yaml recipe.yml out --out-shard-size ... --lazy-unpickle --copy-tokenizer
    --allow-crimes`` (issue 27; --cuda aside, for want of a GPU) runs on splice, as the same
    merge with splice's own options does, with one note per ignored flag."""
    recipe = tmp_path / "recipe.yml"
    recipe.write_text(
        yaml.safe_dump(
            {
                "merge_method": "task_arithmetic",
                "base_model": str(trio["base"]),
                "models": [
                    {"model": str(trio["ft1"]), "parameters": {"weight": 0.6}},
                    {"model": str(trio["ft2"]), "parameters": {"weight": 0.4}},
                ],
                "dtype": "bfloat16",
            }
        )
    )
    ignored = ["--lazy-unpickle", "--copy-tokenizer", "--no-write-model-card", "-v"]
    theirs = [
        "--out-shard-size", "20K", *ignored, "--allow-crimes", "--random-seed", "1", "-j", "1",
        "--quiet", "-v",
    ]  # fmt: skip
    ours = ["--max-shard-size", "20KB", "--allow-crimes", "--seed", "1", "--threads", "1"]
    assert cli.main(["merge", str(recipe), str(tmp_path / "a"), *theirs]) == 0
    err = capsys.readouterr().err
    assert err.splitlines() == [f"splice: note: {line}" for line in mf.notes(ignored)]
    assert cli.main(["merge", str(recipe), str(tmp_path / "b"), "--no-progress", *ours]) == 0
    a, b = shards(tmp_path / "a"), shards(tmp_path / "b")
    assert a == b and len(a) > 1  # 20K = 20KB: the same shards
    assert (tmp_path / "a" / "README.md").is_file()  # written whatever the flags say
    for name in ("tokenizer.json", "config.json"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    for f in a:
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes()


def test_the_docs_table_is_the_code_s():
    """docs/merging.md's flag table is ``markdown_table()`` (regenerate it, never edit it)."""
    from pathlib import Path

    from splice.merge.mergekit_flags import markdown_table

    text = (Path(__file__).parents[1] / "docs" / "merging.md").read_text()
    begin, end = "<!-- mergekit-flags -->\n", "<!-- /mergekit-flags -->"
    assert text[text.index(begin) + len(begin) : text.index(end)] == markdown_table()
