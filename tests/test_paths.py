"""One rule for relative paths in files (splice.paths): the current folder first (mergekit's
reading), else the folder of the file naming the path; hub ids pass; anything else found
nowhere is one line naming the path and both folders. Merge recipes (one document or several)
and evolve configs follow it alike."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import yaml

from splice.cli import main
from splice.errors import SpliceError
from splice.evolve import EvolveConfig
from splice.merge import MultiRecipe, Recipe, read_recipe
from splice.paths import is_hub_id, resolve_path

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "evolve" / "zoo_ps.yml"


@pytest.fixture
def layout(tmp_path, monkeypatch):
    """``tmp/cwd`` (the current folder) and ``tmp/files/sub`` (where files live); ``m``
    exists in both, ``only_cwd`` in the first, ``only_file`` beside the files."""
    cwd, files = tmp_path / "cwd", tmp_path / "files" / "sub"
    for d in (cwd / "m", cwd / "only_cwd", files / "m", files / "only_file"):
        d.mkdir(parents=True)
    monkeypatch.chdir(cwd)
    return cwd, files


def test_current_folder_first_then_the_files_folder(layout):
    cwd, files = layout
    assert resolve_path("m", files) == "m"  # both have it: the current folder's, as written
    assert resolve_path("only_cwd", files) == "only_cwd"
    assert resolve_path("only_file", files) == str((files / "only_file").resolve())
    assert resolve_path(str(cwd / "gone"), files) == str(cwd / "gone")  # absolute: as is
    assert resolve_path("gone", None) == "gone"  # no file (YAML text): nothing to resolve


def test_hub_ids_pass_and_other_missing_paths_name_both_folders(layout):
    cwd, files = layout
    assert resolve_path("org/name", files) == "org/name"
    assert resolve_path("Qwen/Qwen2.5-0.5B", files) == "Qwen/Qwen2.5-0.5B"
    assert not is_hub_id("../model") and not is_hub_id("./m") and not is_hub_id("a/b/c")
    for ref in ("gone", "../gone", "a/b/gone", "../../assets/zoo/base"):
        with pytest.raises(SpliceError) as e:
            resolve_path(ref, files, what="recipe r.yml")
        msg = str(e.value)
        assert "\n" not in msg and msg.startswith(f"recipe r.yml: {ref}: no such folder")
        assert str(cwd) in msg and str(files.resolve()) in msg


def recipe_file(folder: Path, *refs: str, name: str = "r.yml") -> Path:
    path = folder / name
    path.write_text(
        yaml.safe_dump(
            {
                "merge_method": "linear",
                "models": [{"model": r, "parameters": {"weight": 1}} for r in refs],
            }
        )
    )
    return path


def test_recipe_paths(layout):
    _, files = layout
    path = recipe_file(files, "m", "only_file", "org/name")
    refs = [m.model for m in Recipe.from_yaml(path).models]
    assert refs == ["m", str((files / "only_file").resolve()), "org/name"]
    assert [m.model for m in read_recipe(path).models] == refs  # the CLI's reader agrees


def test_recipe_path_found_nowhere_is_one_line_exit_2(layout, capsys):
    cwd, files = layout
    path = recipe_file(files, "only_file", "../../elsewhere/model")
    assert main(["merge", str(path), "--dry-run"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "../../elsewhere/model: no such folder" in err
    assert str(path) in err and str(cwd) in err and str(files.resolve()) in err


def test_multi_document_recipe_paths(layout):
    cwd, files = layout
    first = {"name": "stage", "merge_method": "linear",
             "models": [{"model": "only_file", "parameters": {"weight": 1}}]}  # fmt: skip
    final = {"merge_method": "linear",
             "models": [{"model": "stage", "parameters": {"weight": 1}},
                        {"model": "m", "parameters": {"weight": 1}}]}  # fmt: skip
    path = files / "multi.yml"
    path.write_text(yaml.safe_dump_all([first, final]))
    multi = read_recipe(path)
    assert isinstance(multi, MultiRecipe)
    assert multi.external_models() == [str((files / "only_file").resolve()), "m"]
    out = multi.resolved(multi.final, {"stage": cwd / "built"})
    assert [m.model for m in out.models] == [str(cwd / "built"), "m"]
    first["models"][0]["model"] = "gone"
    path.write_text(yaml.safe_dump_all([first, final]))
    with pytest.raises(SpliceError, match=r"gone: no such folder, from the current folder"):
        read_recipe(path)  # at reading, not when the document runs


def test_moe_recipe_paths(layout):
    _, files = layout
    path = files / "moe.yml"
    path.write_text(
        yaml.safe_dump({"base_model": "only_file", "gate_mode": "random",
                        "experts": [{"source_model": "m"}, {"source_model": "only_cwd"}]})
    )  # fmt: skip
    r = read_recipe(path)
    assert r.merge_method == "moe" and r.base_model == str((files / "only_file").resolve())
    assert [e.source_model for e in r.experts] == ["m", "only_cwd"]


def evolve_config(folder: Path, **genome) -> Path:
    path = folder / "evolve.yml"
    path.write_text(yaml.safe_dump({"genome": {"merge_method": "ties", **genome}, "tasks": ["t"]}))
    return path


def test_evolve_config_paths_follow_the_same_rule(layout):
    cwd, files = layout
    path = evolve_config(files, models=["m", "only_file", "org/name"], base_model="only_cwd",
                         tokenizer_source="union")  # fmt: skip
    cfg = EvolveConfig.from_yaml(path)
    # the current folder first (before: the config's folder first), made absolute
    assert cfg.genome.models == [str(cwd / "m"), str((files / "only_file").resolve()), "org/name"]
    assert cfg.genome.base_model == str(cwd / "only_cwd")
    assert cfg.genome.tokenizer_source == "union"  # a keyword, not a path
    path = evolve_config(files, models=["m", "gone"], base_model="m")
    with pytest.raises(SpliceError) as e:
        EvolveConfig.from_yaml(path)
    assert f"config {path}: gone: no such folder" in str(e.value) and str(cwd) in str(e.value)


def test_a_copied_example_evolve_config(tmp_path, monkeypatch):
    """examples/evolve/zoo_ps.yml names ``../../assets/zoo/...`` (from its own folder). A copy
    elsewhere finds the zoo from a current folder where those paths exist, and otherwise says
    which two folders it looked in (it used to fail later with 'no such folder' alone)."""
    copy = tmp_path / "runs" / "mine" / "zoo_ps.yml"
    copy.parent.mkdir(parents=True)
    shutil.copy(EXAMPLE, copy)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SpliceError) as e:
        EvolveConfig.from_yaml(copy)
    msg = str(e.value)
    assert "\n" not in msg and "../../assets/zoo/math: no such folder" in msg
    assert str(tmp_path) in msg and str(copy.parent) in msg
    monkeypatch.chdir(ROOT / "examples" / "evolve")  # where ../../assets/zoo is the zoo
    cfg = EvolveConfig.from_yaml(copy)
    zoo = ROOT / "assets" / "zoo"
    assert cfg.genome.models == [str(zoo / "math"), str(zoo / "lang")]
    assert cfg.genome.base_model == str(zoo / "base")
    monkeypatch.chdir(tmp_path)  # the original, from anywhere: its own folder's paths
    assert EvolveConfig.from_yaml(EXAMPLE).genome.base_model == str(zoo / "base")
